"""grpo.py: the critic-free estimators' equations against hand-computed values, the loss details that came with
them, and short end-to-end runs of each estimator with each reward source. In-process, tiny models."""

import math
import os

import pytest
import torch

from conftest import one_thread

import grpo

os.environ.update({"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})

RAGGED_MASK = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.bool)  # row 2 ended after 1 token


@pytest.fixture(autouse=True, scope="module")
def _one_thread_for_this_module():
    with one_thread():
        yield


# ----------------------------------------------------------------------------------------------
# The equations
# ----------------------------------------------------------------------------------------------
def test_grpo_advantages_hand_values():
    """grpo.grpo_advantages = (R - group mean) / (group std + 1e-4), Bessel-corrected std, per group of k
    consecutive responses: a group of 4 by hand, a group whose returns are all equal (all 0), a group of 2."""
    returns = torch.tensor([1.0, 2.0, 3.0, 6.0, 5.0, 5.0, 5.0, 5.0])
    # group 1: mean 3, deviations -2, -1, 0, 3; variance (4 + 1 + 0 + 9) / 3 = 14/3
    std = math.sqrt(14 / 3)
    expected = torch.tensor([-2.0 / (std + 1e-4), -1.0 / (std + 1e-4), 0.0, 3.0 / (std + 1e-4), 0.0, 0.0, 0.0, 0.0])
    torch.testing.assert_close(grpo.grpo_advantages(returns, 4), expected)
    assert (grpo.grpo_advantages(returns, 4)[4:] == 0).all()  # all equal: no signal, and no division by 0
    # k = 2: 0 and 1 have mean 1/2 and std sqrt(1/2): +-0.5 / (0.70711 + 1e-4)
    pair = grpo.grpo_advantages(torch.tensor([0.0, 1.0]), 2)
    torch.testing.assert_close(pair, torch.tensor([-0.5, 0.5]) / (math.sqrt(0.5) + 1e-4))


def test_rloo_advantages_hand_values():
    """grpo.rloo_advantages = R_i - mean of the other k - 1 returns of the prompt (Ahmadian et al. 2024), by
    hand; equal returns give 0; it is k / (k - 1) times R_i - group mean."""
    returns = torch.tensor([1.0, 2.0, 3.0, 6.0, 5.0, 5.0, 5.0, 5.0])
    # group 1 sums to 12: baselines (12 - R_i) / 3 = 11/3, 10/3, 3, 2
    expected = torch.tensor([1 - 11 / 3, 2 - 10 / 3, 0.0, 4.0, 0.0, 0.0, 0.0, 0.0])
    advantages = grpo.rloo_advantages(returns, 4)
    torch.testing.assert_close(advantages, expected)
    torch.testing.assert_close(advantages[:4], 4 / 3 * (returns[:4] - returns[:4].mean()))
    torch.testing.assert_close(grpo.rloo_advantages(torch.tensor([0.0, 1.0]), 2), torch.tensor([-1.0, 1.0]))


def test_reinforce_pp_advantages_hand_values():
    """grpo.reinforce_pp_advantages = whiten(reward-to-go) over the batch's real tokens (Hu 2025), on a ragged
    mask whose padding holds garbage rewards: nothing flows back from the padding, which stays 0."""
    rewards = torch.tensor([[0.1, -0.2, 1.0], [0.5, 7.0, -9.0]])  # row 2 ended after 1 token
    # reward-to-go of the real tokens: .9, .8, 1.0 and .5; mean .8, deviations .1, 0, .2, -.3; var .14 / 3
    expected = torch.tensor([[0.1, 0.0, 0.2], [-0.3, 0.0, 0.0]]) / math.sqrt(0.14 / 3 + 1e-8)
    torch.testing.assert_close(grpo.reinforce_pp_advantages(rewards, RAGGED_MASK), expected)


def test_aggregate_loss_each_mode_on_a_ragged_mask():
    """grpo.aggregate_loss on per-token losses of a 3-token and a 1-token response (padding holds 9s): the
    token mean, the mean of the sequences' token means, and Dr. GRPO's token sums over a constant L = 4;
    token_mean is masked_mean itself, bit for bit."""
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0]])
    assert grpo.aggregate_loss(per_token, RAGGED_MASK, "token_mean").item() == pytest.approx((1 + 2 + 3 + 4) / 4)
    by_sequence = grpo.aggregate_loss(per_token, RAGGED_MASK, "seq_mean_token_mean").item()
    assert by_sequence == pytest.approx((6 / 3 + 4 / 1) / 2)
    dr_grpo = grpo.aggregate_loss(per_token, RAGGED_MASK, "seq_mean_token_sum_norm", 4).item()
    assert dr_grpo == pytest.approx((6 / 4 + 4 / 4) / 2)
    assert torch.equal(grpo.aggregate_loss(per_token, RAGGED_MASK), grpo.masked_mean(per_token, RAGGED_MASK))


def test_policy_loss_asymmetric_clip_hand_values():
    """--cliprange_high (Yu et al. 2025): the ratio clipped to [1 - 0.2, 1 + 0.28]; by hand, per token
    max(-A r, -A clip(r)). cliprange_high = cliprange is the symmetric clip, bit for bit."""
    ratio = torch.tensor([[1.5, 1.25, 0.7, 0.5]])
    adv = torch.tensor([[1.0, 1.0, -1.0, 1.0]])
    old, mask = torch.zeros(1, 4), torch.ones(1, 4, dtype=torch.bool)
    loss, clipfrac, _ = grpo.policy_loss(ratio.log(), old, adv, mask, 0.2, 0.28)
    # r=1.5,A=1: max(-1.5, -1.28) = -1.28 (clipped) | r=1.25,A=1: -1.25, inside [.8, 1.28] (symmetric: -1.2)
    # r=.7,A=-1: max(.7, .8) = .8 (clipped) | r=.5,A=1: max(-.5, -.8) = -.5
    torch.testing.assert_close(loss, torch.tensor((-1.28 - 1.25 + 0.8 - 0.5) / 4))
    torch.testing.assert_close(clipfrac, torch.tensor(0.5))
    symmetric = grpo.policy_loss(ratio.log(), old, adv, mask, 0.2)
    assert symmetric[0].item() == pytest.approx((-1.2 - 1.2 + 0.8 - 0.5) / 4)
    same = grpo.policy_loss(ratio.log(), old, adv, mask, 0.2, 0.2)
    assert all(torch.equal(a, b) for a, b in zip(same, symmetric))


# ----------------------------------------------------------------------------------------------
# End-to-end runs
# ----------------------------------------------------------------------------------------------
def tiny_args(toy_dir, rm, output_dir, *extra):
    return grpo.parse_args([
        "--sft_model", os.path.join(toy_dir, "base_model"), "--reward_model", rm,
        "--dataset", os.path.join(toy_dir, "prompts"), "--output_dir", str(output_dir),
        "--total_episodes", "64", "--batch_size", "32", "--response_length", "8",
        "--learning_rate", "3e-3", "--kl_coef", "0.01", "--missing_eos_penalty", "None",
        "--eval_samples", "16", "--eval_every", "5", "--sample_every", "5", "--no_save", "--gold_reward_fn", "None",
        *extra,
    ])


@pytest.mark.parametrize("extra, ensemble", [
    (["--loss_aggregation", "seq_mean_token_mean"], "min"),
    (["--advantage_estimator", "rloo", "--loss_aggregation", "seq_mean_token_sum_norm"], "uwo"),
    (["--advantage_estimator", "reinforce_pp", "--cliprange_high", "0.28"], None),
], ids=["grpo-ensemble_min", "rloo-ensemble_uwo", "reinforce_pp-clip_higher"])
def test_estimators_and_ensembles_run(toy_dir, standin_rm, second_rm, tmp_path, monkeypatch, extra, ensemble):
    """Each advantage estimator and each ensemble mode trains two updates to finite numbers. No critic is built (the
    optimizer holds the policy's parameters only, no value loss is logged); GRPO's and RLOO's groups are k copies of
    one prompt in a row; an ensemble logs its members' disagreement, a single RM does not."""
    monkeypatch.chdir(tmp_path)
    built, rollouts = [], []
    real_build, real_scores = grpo.build_models, grpo.reward_scores
    monkeypatch.setattr(grpo, "build_models", lambda *a: built.append(real_build(*a)) or built[-1])
    monkeypatch.setattr(grpo, "reward_scores", lambda reward, tok, qr, *a: (rollouts.append(qr[:, :a[2]])
                                                                          if len(qr) == 32 else None)
                        or real_scores(reward, tok, qr, *a))
    members = [standin_rm, second_rm] if ensemble else [standin_rm]
    out = grpo.main(tiny_args(toy_dir, standin_rm, tmp_path / "o", "--reward_model", *members,
                              "--ensemble", ensemble or "mean", *extra))
    history = out["history"]
    assert len(history) == 2 and all(math.isfinite(v) for h in history for v in h.values())
    # the evaluation's exact KL: 0 for the SFT policy against its own copy, positive after training
    assert out["sft"]["kl"] == 0.0 and out["ppo"]["kl"] > 0.0
    models = built[0]
    assert set(models.trainables) == {"policy"} and not hasattr(models, "critic")
    assert len(models.optimizer.param_groups[0]["params"]) == len(list(models.policy.parameters()))
    assert not any(k in history[0] for k in ("loss/value_avg", "val/clipfrac_avg", "val/explained_variance"))
    assert ("loss/kl_avg" in history[0]) == ("rloo" not in extra and "reinforce_pp" not in extra)  # GRPO: in the loss
    k = 1 if "reinforce_pp" in extra else 4
    for queries in rollouts:  # each prompt k times in a row
        groups = queries.view(32 // k, k, -1)
        assert (groups == groups[:, :1]).all() and len({tuple(g[0].tolist()) for g in groups}) > 1
    assert ("objective/ensemble_std" in history[0]) == (ensemble is not None)
    if ensemble:  # the members' normalisations differ, and so do their scores
        assert history[0]["objective/ensemble_std"] > 0.01


def test_estimator_alone_runs_as_published(capsys):
    """--advantage_estimator alone gives the estimator as its paper runs it: RLOO with k = 4 and the KL in the
    reward, REINFORCE++ with k = 1 and the KL in the reward, GRPO (the default) with k = 4 and the KL in the loss;
    one line says what followed. A --samples_per_prompt or KL placement the user gave is kept."""
    rloo = grpo.parse_args(["--advantage_estimator", "rloo"])
    assert (rloo.samples_per_prompt, rloo.kl_in_reward) == (4, True)
    assert "--advantage_estimator rloo, as published: --kl_in_reward True" in capsys.readouterr().out
    reinforce = grpo.parse_args(["--advantage_estimator", "reinforce_pp"])
    assert (reinforce.samples_per_prompt, reinforce.kl_in_reward) == (1, True)
    default = grpo.parse_args([])
    assert (default.samples_per_prompt, default.kl_in_reward) == (4, False) and capsys.readouterr().out.count(
        "as published") == 1  # reinforce_pp's line; the default changes nothing and says nothing
    kept = grpo.parse_args(["--advantage_estimator", "rloo", "--samples_per_prompt", "8", "--no_kl_in_reward"])
    assert (kept.samples_per_prompt, kept.kl_in_reward) == (8, False)
