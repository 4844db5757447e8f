"""The math the other tests leave open: each function against hand-computed values or an
independent computation. In-process, tiny models, one torch thread; the whole file runs in seconds."""

import json
import math
import os

import numpy as np
import pytest
import torch

from conftest import one_thread

import common
import ppo
import sft
import train_rm

os.environ.update({"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})


@pytest.fixture(autouse=True, scope="module")
def _one_thread_for_this_module():
    with one_thread():
        yield


# ----------------------------------------------------------------------------------------------
# Log-probabilities and entropy
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scale", [1.0, 30.0, 1000.0])
def test_logprobs_and_entropy_match_categorical(scale):
    """ppo.logprobs_from_logits / entropy_from_logits on random (B, T, V) logits, small and large, against
    torch.distributions.Categorical's log_prob / entropy computed in float64."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=g, dtype=torch.float64) * scale + 50.0  # an offset changes nothing
    tokens = torch.randint(0, 11, (3, 5), generator=g)
    reference = torch.distributions.Categorical(logits=logits)
    expected_logprobs, expected_entropy = reference.log_prob(tokens), reference.entropy()
    # float64 in, float64 out: the same numbers to rounding
    torch.testing.assert_close(ppo.logprobs_from_logits(logits, tokens), expected_logprobs, atol=1e-10, rtol=1e-12)
    torch.testing.assert_close(ppo.entropy_from_logits(logits), expected_entropy, atol=1e-10, rtol=1e-12)
    # float32, as in training: float32 rounding of logits of this size, and no overflow
    logprobs32, entropy32 = ppo.logprobs_from_logits(logits.float(), tokens), ppo.entropy_from_logits(logits.float())
    assert logprobs32.dtype == entropy32.dtype == torch.float32
    ulp = 1e-6 * (scale + 50.0)
    torch.testing.assert_close(logprobs32.double(), expected_logprobs, atol=10 * ulp, rtol=1e-6)
    torch.testing.assert_close(entropy32.double(), expected_entropy, atol=10 * ulp, rtol=1e-6)
    assert (entropy32 >= -10 * ulp).all() and (entropy32 <= math.log(11) + 1e-5).all()


# ----------------------------------------------------------------------------------------------
# policy_forward's alignment, on a model with learned absolute positions
# ----------------------------------------------------------------------------------------------
def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=40, n_positions=32, n_embd=32, n_layer=2, n_head=2, initializer_range=0.3,
                        bos_token_id=1, eos_token_id=1, pad_token_id=0,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config).eval()


def test_policy_forward_matches_unpadded_single_sequence_forwards():
    """ppo.policy_forward's logprobs of the real response tokens of left-padded rows (queries of 3, 5 and 7
    tokens; responses with padding after an EOS) equal log_softmax(logits / T) of each row's real tokens run
    alone, unpadded, on a tiny GPT-2: learned absolute positions show any shift of the position ids."""
    model = tiny_gpt2()
    PAD, EOS, T, temperature = 0, 1, 4, 0.7
    g = torch.Generator().manual_seed(1)
    queries = [torch.randint(2, 40, (n,), generator=g) for n in (3, 5, 7)]
    responses = torch.randint(2, 40, (3, T), generator=g)
    responses[1, 1], responses[1, 2:] = EOS, PAD  # row 1 ended after 2 tokens; padding follows
    response_lengths = [T, 2, T]
    P = max(len(q) for q in queries)
    query_ids = torch.full((3, P), PAD)
    query_mask = torch.zeros(3, P, dtype=torch.long)
    for i, q in enumerate(queries):
        query_ids[i, P - len(q):], query_mask[i, P - len(q):] = q, 1
    query_responses = torch.cat([query_ids, responses], 1)
    attention_mask = torch.cat([query_mask, torch.ones_like(responses)], 1)  # as ppo.main builds it
    with torch.no_grad():
        logits, values = ppo.policy_forward(model, query_responses, attention_mask, T, temperature)
        logprobs = ppo.logprobs_from_logits(logits, responses)
        assert logits.shape == (3, T, 40) and values is None
        for i, q in enumerate(queries):
            n = response_lengths[i]
            alone = torch.cat([q, responses[i, :n]])[None]  # no padding, positions 0, 1, ...
            logp = torch.log_softmax(model(input_ids=alone).logits[0] / temperature, -1)
            # the logits at position j predict token j + 1: the response tokens from position len(q) - 1 on
            expected = logp[len(q) - 1 : len(q) - 1 + n].gather(-1, responses[i, :n, None]).squeeze(-1)
            torch.testing.assert_close(logprobs[i, :n], expected, atol=1e-5, rtol=0)
        # the check can fail: positions counted from the padding instead (no position_ids) move the
        # logprobs of the padded rows far beyond the tolerance
        shifted = model(input_ids=query_responses[:, :-1], attention_mask=attention_mask[:, :-1]).logits[:, -T:]
        shifted = ppo.logprobs_from_logits(shifted / temperature, responses)
        assert (shifted[0] - logprobs[0]).abs().max() > 0.1


# ----------------------------------------------------------------------------------------------
# Logged statistics and the learning-rate annealing (ppo.py)
# ----------------------------------------------------------------------------------------------
RAGGED_MASK = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.bool)  # row 2 ended after 1 token


def test_explained_variance_hand_values():
    """ppo.explained_variance = 1 - Var[R - V] / Var[R] over the kept tokens, population variances, against
    hand values on a ragged mask; perfect values give 1, values equal to the mean return give 0."""
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    returns = torch.tensor([[2.0, 2.0, 5.0], [3.0, 9.0, -9.0]])  # the padded 9, -9 must be ignored
    # kept returns 2, 2, 5, 3: mean 3, Var = (1 + 1 + 4 + 0) / 4 = 1.5
    # kept R - V 1, 0, 2, -1: mean 0.5, Var = (.25 + .25 + 2.25 + 2.25) / 4 = 1.25;  1 - 1.25 / 1.5 = 1/6
    ev = ppo.explained_variance(values, returns, RAGGED_MASK)
    assert isinstance(ev, torch.Tensor) and ev.dim() == 0
    assert ev.item() == pytest.approx(1.0 / 6.0)
    assert ppo.explained_variance(returns, returns, RAGGED_MASK).item() == pytest.approx(1.0)
    mean_return = torch.full_like(returns, 3.0)
    assert ppo.explained_variance(mean_return, returns, RAGGED_MASK).item() == pytest.approx(0.0, abs=1e-6)


def test_approx_kl_hand_values():
    """ppo.approx_kl = 0.5 * masked mean of (log pi - log pi_old)^2 (k2; Huang et al. 2024), against hand
    values on a ragged mask."""
    logprobs = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -3.0, 0.0]])
    old_logprobs = torch.tensor([[-1.5, -2.0, -1.5], [0.0, 5.0, 7.0]])  # padding differs wildly: ignored
    # kept differences .5, 0, 1, -1: squares sum to 2.25 over 4 tokens; half of the mean is 0.28125
    kl = ppo.approx_kl(logprobs, old_logprobs, RAGGED_MASK)
    assert isinstance(kl, torch.Tensor)
    assert kl.item() == pytest.approx(0.28125)
    assert ppo.approx_kl(logprobs, logprobs, RAGGED_MASK).item() == 0.0


def test_gold_wins_counts_ties_as_half():
    """common.gold_wins: wins of golds over the baseline, ties 1/2, against hand counts."""
    assert common.gold_wins([1.0, 2.0, 3.0], [0.0, 2.0, 4.0]) == pytest.approx(1.5)
    assert common.gold_wins([5.0, 5.0], [1.0, 1.0]) == pytest.approx(2.0)
    assert common.gold_wins([0.0, 0.0], [1.0, 0.0]) == pytest.approx(0.5)
    assert common.gold_wins([], []) == 0.0
    assert isinstance(common.gold_wins([1.0], [1.0]), float)


def test_annealed_learning_rate_hand_values():
    """ppo.annealed_learning_rate = (1 - (update - 1) / num_updates) * lr, update counted from 1 (CleanRL),
    against hand values: the full rate at update 1, a quarter less each update of 4, 0 after the last."""
    f = ppo.annealed_learning_rate
    assert [f(u, 4, 1e-3) for u in (1, 2, 3, 4)] == pytest.approx([1e-3, 7.5e-4, 5e-4, 2.5e-4])
    assert f(5, 4, 1e-3) == pytest.approx(0.0, abs=1e-15)
    assert f(1, 1, 2e-4) == pytest.approx(2e-4)


# ----------------------------------------------------------------------------------------------
# The KL that evaluate() reports
# ----------------------------------------------------------------------------------------------
def test_evaluate_kl_is_the_exact_kl_summed_over_the_response(toy_dir, monkeypatch):
    """ppo.evaluate's "kl" against an independent computation on the responses it sampled: per prompt, each
    sequence (prompt + response up to its stop token) run alone and unpadded through the policy and the
    reference, sum over response tokens of KL(softmax(pi / T) || softmax(pi_ref / T)) at the training
    temperature (sampling at another), then the mean over prompts. The same policy as reference gives 0."""
    from common import load_causal_lm, load_reward_model, load_tokenizer

    base = os.path.join(toy_dir, "base_model")
    tokenizer = load_tokenizer(base, "left")
    ref_policy = load_causal_lm(base, tokenizer).eval()
    policy = load_causal_lm(base, tokenizer).eval()
    torch.manual_seed(0)
    with torch.no_grad():  # a policy that differs from the reference
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    reward_model = ppo.ScalarModel(load_reward_model(base, tokenizer)).eval()
    with open(os.path.join(toy_dir, "prompts", "validation.jsonl")) as f:
        prompts = [json.loads(line)["prompt"] for _, line in zip(range(12), f)]
    prompt_ids = tokenizer(prompts)["input_ids"]
    # 25 words as stop tokens too, so that many responses end early and padding follows them
    stop_ids = [tokenizer.eos_token_id, *range(5, 30)]
    args = ppo.Args(response_length=6, temperature=0.7, eval_temperature=1.0, eval_batch_size=8,
                    local_rollout_forward_batch_size=4, num_sample_rows=2)
    sampled = []

    def recording_generate(*a, **k):
        out = generate(*a, **k)
        sampled.append(out.clone())
        return out

    generate = ppo.generate
    monkeypatch.setattr(ppo, "generate", recording_generate)
    torch.manual_seed(1)
    metrics, _, _ = ppo.evaluate(args, policy, ref_policy, ppo.Reward([reward_model], None, None), tokenizer, prompts, prompt_ids, None,
                                 torch.device("cpu"), stop_ids)
    responses = [r for batch in sampled for r in batch]
    assert len(responses) == len(prompts)
    kls, lengths = [], []
    with torch.no_grad():
        for ids, response in zip(prompt_ids, responses):
            is_stop = torch.isin(response, torch.tensor(stop_ids))
            n = int(is_stop.int().argmax()) + 1 if is_stop.any() else len(response)  # up to the stop token
            alone = torch.cat([torch.tensor(ids), response[:n]])[None]
            rows = slice(len(ids) - 1, len(ids) - 1 + n)  # the positions that predict the response tokens
            logp = torch.log_softmax(policy(input_ids=alone).logits[0, rows] / args.temperature, -1)
            ref_logp = torch.log_softmax(ref_policy(input_ids=alone).logits[0, rows] / args.temperature, -1)
            kls.append(torch.nn.functional.kl_div(ref_logp, logp, log_target=True, reduction="sum").item())
            lengths.append(n)
    assert min(lengths) < args.response_length  # some responses ended early: padding was masked
    assert metrics["response_length"] == pytest.approx(np.mean(lengths))
    assert np.mean(kls) > 0.05
    assert metrics["kl"] == pytest.approx(np.mean(kls), rel=1e-4, abs=1e-5)
    torch.manual_seed(1)
    same, _, _ = ppo.evaluate(args, policy, policy, ppo.Reward([reward_model], None, None), tokenizer, prompts, prompt_ids, None,
                              torch.device("cpu"), stop_ids)
    assert same["kl"] == 0.0


# ----------------------------------------------------------------------------------------------
# Loss details and reward ensembles
# ----------------------------------------------------------------------------------------------
def test_policy_loss_dual_clip_hand_values():
    """--dual_clip c (Ye et al. 2020): a token with A < 0 loses at most -c * A; A > 0 is untouched."""
    ratio = torch.tensor([[5.0, 5.0, 0.5]])
    adv = torch.tensor([[-1.0, 1.0, -2.0]])
    old, mask = torch.zeros(1, 3), torch.ones(1, 3, dtype=torch.bool)
    # r=5,A=-1: max(5, 1.2) = 5, bounded by 3 | r=5,A=1: max(-5, -1.2) = -1.2 | r=.5,A=-2: max(1, 1.6) = 1.6 < 6
    plain = ppo.policy_loss(ratio.log(), old, adv, mask, 0.2)[0]
    dual = ppo.policy_loss(ratio.log(), old, adv, mask, 0.2, 3.0)[0]
    torch.testing.assert_close(plain, torch.tensor((5.0 - 1.2 + 1.6) / 3))
    torch.testing.assert_close(dual, torch.tensor((3.0 - 1.2 + 1.6) / 3))


def test_ensemble_scores_hand_values():
    """ppo.ensemble_scores on 3 members' scores of 2 responses (Coste et al. 2023): mean, min, and
    uwo = mean - lambda * the members' variance (1/M)."""
    members = torch.tensor([[1.0, 0.0], [3.0, 0.0], [2.0, 3.0]])  # (M, B)
    # response 1: 1, 3, 2: mean 2, variance 2/3; response 2: 0, 0, 3: mean 1, variance (1 + 1 + 4) / 3 = 2
    torch.testing.assert_close(ppo.ensemble_scores(members, "mean", 0.5), torch.tensor([2.0, 1.0]))
    torch.testing.assert_close(ppo.ensemble_scores(members, "min", 0.5), torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(ppo.ensemble_scores(members, "uwo", 0.5), torch.tensor([2.0 - 0.5 * 2 / 3, 1.0 - 0.5 * 2]))
    torch.testing.assert_close(ppo.ensemble_scores(members, "uwo", 0.0), torch.tensor([2.0, 1.0]))


def test_clip_reward_hand_values():
    scores = torch.tensor([-3.0, 0.5, 2.0])
    assert ppo.clip_reward(scores, 1.0).tolist() == [-1.0, 0.5, 1.0]
    assert ppo.clip_reward(scores, None) is scores


# ----------------------------------------------------------------------------------------------
# Learning-rate schedules (sft.py, train_rm.py)
# ----------------------------------------------------------------------------------------------
def test_sft_cosine_with_warmup_hand_values():
    """sft.cosine_with_warmup: (s + 1) / warmup during warmup, then 0.5 * (1 + cos(pi * progress)), against
    hand values at the warmup's start and end, the middle of the decay and the end."""
    f = sft.cosine_with_warmup
    assert f(0, 10, 110) == pytest.approx(0.1)  # warmup start
    assert f(9, 10, 110) == pytest.approx(1.0)  # warmup end
    assert f(10, 10, 110) == pytest.approx(1.0)  # decay start: cos 0
    assert f(35, 10, 110) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))  # a quarter of the decay
    assert f(60, 10, 110) == pytest.approx(0.5)  # the middle
    assert f(110, 10, 110) == pytest.approx(0.0, abs=1e-12)  # the end
    assert f(200, 10, 110) == pytest.approx(0.0, abs=1e-12)  # past the end: stays 0


@pytest.mark.parametrize("schedule, middle", [("cosine", 0.5), ("linear", 0.5), ("constant", 1.0)])
def test_train_rm_learning_rate_at_hand_values(schedule, middle):
    """train_rm.learning_rate_at: linear warmup, then cosine / linear to 0 or constant, against hand values at
    the warmup's start and end, the middle of the decay and the end (lr 1e-3, 10 warmup steps, 110 in all)."""
    args = train_rm.Args(learning_rate=1e-3, warmup_steps=10, lr_schedule=schedule)
    f = lambda step: train_rm.learning_rate_at(step, 110, args)  # noqa: E731
    assert f(0) == pytest.approx(1e-4)  # warmup start
    assert f(9) == pytest.approx(1e-3)  # warmup end
    assert f(10) == pytest.approx(1e-3)  # decay start
    assert f(60) == pytest.approx(1e-3 * middle)
    assert f(85) == pytest.approx(1e-3 * {"cosine": 0.5 * (1 + math.cos(0.75 * math.pi)), "linear": 0.25,
                                           "constant": 1.0}[schedule])
    assert f(110) == pytest.approx(1e-3 if schedule == "constant" else 0.0, abs=1e-15)
    no_warmup = train_rm.Args(learning_rate=1e-3, warmup_steps=0, lr_schedule=schedule)
    assert train_rm.learning_rate_at(0, 110, no_warmup) == pytest.approx(1e-3)


@pytest.mark.parametrize("schedule, end", [("cosine", 0.0), ("linear", 0.0), ("constant", 1e-3)])
def test_train_rm_learning_rate_at_stays_at_the_end_past_total_steps(schedule, end):
    """train_rm.learning_rate_at past total_steps keeps the rate of total_steps, as sft.cosine_with_warmup does:
    0 for cosine and linear decay (progress capped at 1). Uncapped, cosine rose again and linear went negative."""
    args = train_rm.Args(learning_rate=1e-3, warmup_steps=10, lr_schedule=schedule)
    for step in (110, 111, 160, 210, 1000):
        assert train_rm.learning_rate_at(step, 110, args) == pytest.approx(end, abs=1e-15)


# ----------------------------------------------------------------------------------------------
# Reward normalisation and the RM head (train_rm.py)
# ----------------------------------------------------------------------------------------------
def test_reward_normalisation_against_numpy():
    """train_rm.reward_normalisation from sums against numpy on known samples: the mean is np.mean, the std is
    Bessel-corrected (n - 1, np.std(ddof=1)), and the third value, the raw std, is that std whatever
    normalize_std (reward_std is then 1) and without the 1e-8 floor."""
    r = np.array([1.0, 2.0, 3.0, 4.0, 10.0])  # mean 4; sum of squared deviations 50: std sqrt(12.5), not sqrt(10)
    sums = (r.sum(), (r**2).sum(), float(len(r)))
    mean, std, raw_std = train_rm.reward_normalisation(*sums, normalize_std=True)
    assert mean == pytest.approx(np.mean(r)) == pytest.approx(4.0)
    assert std == pytest.approx(np.std(r, ddof=1)) == pytest.approx(math.sqrt(12.5))
    assert raw_std == pytest.approx(np.std(r, ddof=1))
    mean, std, raw_std = train_rm.reward_normalisation(*sums, normalize_std=False)
    assert (mean, std) == (pytest.approx(4.0), 1.0)
    assert raw_std == pytest.approx(np.std(r, ddof=1))
    # random samples at an offset, where E[r^2] - E[r]^2 cancels more
    r = np.random.default_rng(0).normal(3.0, 0.5, size=1000)
    mean, std, raw_std = train_rm.reward_normalisation(r.sum(), (r**2).sum(), float(len(r)), True)
    assert mean == pytest.approx(np.mean(r), rel=1e-12)
    assert std == raw_std == pytest.approx(np.std(r, ddof=1), rel=1e-9)
    # equal rewards: the raw std is 0, and reward_std floors at 1e-8 rather than dividing by 0
    mean, std, raw_std = train_rm.reward_normalisation(6.0, 12.0, 3.0, True)
    assert (mean, raw_std) == (pytest.approx(2.0), pytest.approx(0.0, abs=1e-7))
    assert 0 < std <= 1e-7 + 1e-8


def test_rm_head_init_std(toy_dir, tmp_path, monkeypatch):
    """train_rm.main initialises the fresh (1, d_model) scalar head with std 1/sqrt(d_model + 1) (Ziegler et al.
    2019): torch.nn.init.normal_ records its calls during a 1-step run on the toy task (base model 64 wide)."""
    calls = []
    normal_ = torch.nn.init.normal_

    def recording_normal_(tensor, mean=0.0, std=1.0, *args, **kwargs):
        calls.append((tuple(tensor.shape), std))
        return normal_(tensor, mean, std, *args, **kwargs)

    monkeypatch.setattr(torch.nn.init, "normal_", recording_normal_)
    monkeypatch.chdir(tmp_path)
    args = train_rm.parse_args(["--model_name_or_path", os.path.join(toy_dir, "base_model"),
                                "--dataset", os.path.join(toy_dir, "prefs"), "--output_dir", str(tmp_path / "rm"),
                                "--run_name", "test_math_rm_init", "--num_train_pairs", "64", "--batch_size", "64",
                                "--num_eval_pairs", "64", "--no_normalize", "--checkpoint_every", "0"])
    train_rm.main(args)
    head_calls = [std for shape, std in calls if shape == (1, 64)]
    assert any(std == pytest.approx(1 / math.sqrt(64 + 1), rel=1e-12) for std in head_calls), calls
