"""ppo.py's equations, each against hand-computed values or an independent computation: GAE, whitening, the KL
estimators and the KL-penalised reward, the clipped policy and value losses with their options (dual clip, reward
clipping, ensembles), the logged statistics, and the forwards that feed them (log-probabilities, entropy, position ids
under left padding, a re-tokenising RM, the KL that evaluate() reports). In-process, tiny models, one torch thread;
ppo.py's end-to-end runs are in test_ppo_runs.py."""

import json
import math
import os

import numpy as np
import pytest
import torch

from conftest import one_thread

import common
import ppo

os.environ.update({"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})


@pytest.fixture(autouse=True, scope="module")
def _one_thread_for_this_module():
    with one_thread():
        yield


# ----------------------------------------------------------------------------------------------
# The equations
# ----------------------------------------------------------------------------------------------
def test_gae_hand_computed():
    gamma, lam = 0.9, 0.8
    rewards = torch.tensor([[0.1, -0.2, 1.0], [0.0, 1.0, 5.0]])
    values = torch.tensor([[0.5, 0.3, 0.2], [0.4, 0.6, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)  # row 2 ended after 2 tokens
    advantages, returns = ppo.gae(rewards, values, mask, gamma, lam)
    # row 1: d2 = 1 - .2 = .8; d1 = -.2 + .9*.2 - .3 = -.32; d0 = .1 + .9*.3 - .5 = -.13
    #        A2 = .8; A1 = -.32 + .72*.8 = .256; A0 = -.13 + .72*.256 = .05432
    # row 2: V after the last real token is 0, and padding is ignored: d1 = 1 - .6 = .4; d0 = .9*.6 - .4 = .14
    #        A1 = .4; A0 = .14 + .72*.4 = .428; A2 = 0
    expected = torch.tensor([[0.05432, 0.256, 0.8], [0.428, 0.4, 0.0]])
    torch.testing.assert_close(advantages, expected)
    torch.testing.assert_close(returns, expected + values * mask)


def test_gae_lambda_one_is_reward_to_go_minus_value():
    torch.manual_seed(0)
    rewards, values = torch.randn(4, 6), torch.randn(4, 6)
    mask = torch.ones(4, 6, dtype=torch.bool)
    advantages, returns = ppo.gae(rewards, values, mask, gamma=1.0, lam=1.0)
    reward_to_go = rewards.flip(1).cumsum(1).flip(1)
    torch.testing.assert_close(advantages, reward_to_go - values)
    torch.testing.assert_close(returns, reward_to_go)


def test_whiten_ignores_padding():
    x = torch.tensor([[1.0, 2.0, 3.0, 1e6], [4.0, 5.0, -1e6, 7e5]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    kept = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    expected = (kept - kept.mean()) / torch.sqrt(kept.var() + 1e-8)  # unbiased variance, as ppo.whiten
    out = ppo.whiten(x, mask)
    torch.testing.assert_close(out[mask], expected)
    assert (out[~mask] == 0).all()
    # other padding values change nothing
    torch.testing.assert_close(ppo.whiten(x.masked_fill(~mask, -3.0), mask), out)
    # reward whitening scales but keeps the mean (Huang et al. 2024)
    torch.testing.assert_close(ppo.whiten(x, mask, shift_mean=False)[mask], expected + kept.mean())


def test_kl_estimators_match_known_kl():
    torch.manual_seed(0)
    p = torch.tensor([0.5, 0.2, 0.2, 0.1])
    q = torch.tensor([0.25, 0.25, 0.25, 0.25])
    true_kl = (p * (p / q).log()).sum()
    y = torch.multinomial(p, 400_000, replacement=True)
    logp, logq = p.log()[y], q.log()[y]
    k1 = ppo.kl_estimate(logp, logq, "k1")
    k3 = ppo.kl_estimate(logp, logq, "k3")
    for k in (k1, k3):
        assert abs(k.mean() - true_kl) < 4 * k.std() / math.sqrt(len(k)) + 1e-4
    assert (k3 >= 0).all() and (k1 < 0).any()  # k3 is never negative, k1 can be
    assert k3.std() < k1.std()  # and k3 has the lower variance here
    # Gaussians N(0,1) vs N(1,1): KL = 1/2
    x = torch.randn(400_000)
    logp, logq = -0.5 * x**2, -0.5 * (x - 1) ** 2
    for est in ("k1", "k3"):
        k = ppo.kl_estimate(logp, logq, est)
        assert abs(k.mean() - 0.5) < 4 * k.std() / math.sqrt(len(k))


def test_k2_loss_gradient_is_the_kl_gradient():
    """As a loss term, E_pi[grad k2] = grad KL(pi || pi_ref); E_pi[grad k1] = 0 (exact sums over a categorical)."""
    logits = torch.tensor([0.3, -1.0, 0.5, 2.0], requires_grad=True)
    ref = torch.log_softmax(torch.tensor([0.0, 0.2, -0.4, 0.1]), 0)
    logp = torch.log_softmax(logits, 0)
    (grad_kl,) = torch.autograd.grad((logp.exp() * (logp - ref)).sum(), logits, retain_graph=True)
    weights = logp.exp().detach()  # the sampling distribution, not differentiated
    (grad_k2,) = torch.autograd.grad((weights * ppo.kl_estimate(logp, ref, "k2")).sum(), logits, retain_graph=True)
    (grad_k1,) = torch.autograd.grad((weights * ppo.kl_estimate(logp, ref, "k1")).sum(), logits)
    torch.testing.assert_close(grad_k2, grad_kl)
    torch.testing.assert_close(grad_k1, torch.zeros(4), atol=1e-6, rtol=0)


def test_truncate_after_eos_and_missing_eos_penalty():
    EOS, PAD = 1, 0
    responses = torch.tensor([
        [5, 6, 1, 7, 8],   # EOS at 2: tokens after it become padding
        [5, 6, 7, 8, 9],   # no EOS
        [1, 5, 1, 6, 7],   # EOS first: the response is just EOS; a later EOS is padding too
        [5, 6, 7, 8, 1],   # EOS at the very end
    ])
    out, mask, has_eos = ppo.truncate_after_eos(responses, EOS, PAD)
    assert out.tolist() == [[5, 6, 1, 0, 0], [5, 6, 7, 8, 9], [1, 0, 0, 0, 0], [5, 6, 7, 8, 1]]
    assert mask.sum(1).tolist() == [3, 5, 1, 5]
    assert has_eos.tolist() == [True, False, True, True]
    scores = torch.tensor([0.5, 2.0, -0.25, 1.5])
    assert ppo.apply_missing_eos_penalty(scores, has_eos, -1.0).tolist() == [0.5, -1.0, -0.25, 1.5]
    assert ppo.apply_missing_eos_penalty(scores, has_eos, None).tolist() == scores.tolist()


def test_kl_penalized_reward_at_the_last_real_token():
    lengths = [3, 1, 4]
    mask = torch.arange(4)[None] < torch.tensor(lengths)[:, None]
    kl = torch.full((3, 4), 0.5)
    scores = torch.tensor([2.0, -1.0, 3.0])
    rewards = ppo.kl_penalized_rewards(scores, kl * mask, mask, kl_coef=0.1)
    expected = torch.tensor([
        [-0.05, -0.05, -0.05 + 2.0, 0.0],  # the score on the EOS at index 2, nothing after it
        [-0.05 - 1.0, 0.0, 0.0, 0.0],
        [-0.05, -0.05, -0.05, -0.05 + 3.0],
    ])
    torch.testing.assert_close(rewards, expected)
    # even a KL left unmasked after EOS gives no reward there
    torch.testing.assert_close(ppo.kl_penalized_rewards(scores, kl, mask, kl_coef=0.1), expected)


def test_policy_loss_hand_values_and_clipping():
    eps = 0.2
    ratio = torch.tensor([[1.0, 1.5, 0.5, 1.5, 0.5, 1.1]])
    adv = torch.tensor([[1.0, 1.0, 1.0, -1.0, -1.0, 2.0]])
    old = torch.zeros(1, 6)
    mask = torch.ones(1, 6, dtype=torch.bool)
    loss, clipfrac, r = ppo.policy_loss(ratio.log(), old, adv, mask, eps)
    # per token max(-A*r, -A*clip(r)):
    #   r=1,A=1: -1 | r=1.5,A=1: max(-1.5,-1.2) = -1.2 (clipped) | r=.5,A=1: max(-.5,-.8) = -.5
    #   r=1.5,A=-1: max(1.5,1.2) = 1.5 | r=.5,A=-1: max(.5,.8) = .8 (clipped) | r=1.1,A=2: -2.2
    per_token = torch.tensor([-1.0, -1.2, -0.5, 1.5, 0.8, -2.2])
    torch.testing.assert_close(loss, per_token.mean())
    torch.testing.assert_close(clipfrac, torch.tensor(2 / 6))
    torch.testing.assert_close(r, ratio)
    # masked tokens do not count
    mask2 = torch.tensor([[1, 1, 0, 0, 0, 0]], dtype=torch.bool)
    loss2, clipfrac2, _ = ppo.policy_loss(ratio.log(), old, adv, mask2, eps)
    torch.testing.assert_close(loss2, torch.tensor(-1.1))
    torch.testing.assert_close(clipfrac2, torch.tensor(0.5))


def test_value_loss_hand_values_and_clipping():
    old = torch.tensor([[0.0, 0.0, 0.0, 1.0]])
    new = torch.tensor([[0.1, 0.5, -0.5, 1.0]])
    returns = torch.tensor([[0.0, 1.0, 0.0, 3.0]])
    mask = torch.ones(1, 4, dtype=torch.bool)
    loss, clipfrac = ppo.value_loss(new, old, returns, mask, 0.2)
    # V_clip = [.1, .2, -.2, 1]; per token max((V-R)^2, (V_clip-R)^2):
    #   .01 | max(.25, .64) = .64 (clipped) | max(.25, .04) = .25 | 4
    per_token = torch.tensor([0.01, 0.64, 0.25, 4.0])
    torch.testing.assert_close(loss, 0.5 * per_token.mean())
    torch.testing.assert_close(clipfrac, torch.tensor(0.25))


def test_adaptive_kl_controller():
    assert ppo.adaptive_kl_coef(0.1, 6.0, 6.0, 10000, 64) == pytest.approx(0.1)
    assert ppo.adaptive_kl_coef(0.1, 60.0, 6.0, 10000, 100) == pytest.approx(0.1 * (1 + 0.2 * 0.01))  # error clipped
    assert ppo.adaptive_kl_coef(0.1, 3.0, 6.0, 10000, 100) == pytest.approx(0.1 * (1 - 0.2 * 0.01))


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
    torch.testing.assert_close(ppo.ensemble_scores(members, "uwo", 0.5),
                               torch.tensor([2.0 - 0.5 * 2 / 3, 1.0 - 0.5 * 2]))
    torch.testing.assert_close(ppo.ensemble_scores(members, "uwo", 0.0), torch.tensor([2.0, 1.0]))


def test_clip_reward_hand_values():
    scores = torch.tensor([-3.0, 0.5, 2.0])
    assert ppo.clip_reward(scores, 1.0).tolist() == [-1.0, 0.5, 1.0]
    assert ppo.clip_reward(scores, None) is scores


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
# Logged statistics and the learning-rate annealing
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
# Models
# ----------------------------------------------------------------------------------------------
def test_left_padding_changes_nothing(toy_dir):
    """Position ids count from the first real token: a left-padded sequence scores as the unpadded one."""
    from common import load_causal_lm, load_reward_model, load_tokenizer

    base = os.path.join(toy_dir, "base_model")
    tok = load_tokenizer(base, "left")
    policy = load_causal_lm(base, tok)
    seq = torch.tensor([[10, 11, 12, 13, 14, 15]])
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), seq], 1)
    mask, padded_mask = torch.ones_like(seq), (padded != 0).long()
    with torch.no_grad():
        a, _ = ppo.policy_forward(policy, seq, mask, 2, 0.7)
        b, _ = ppo.policy_forward(policy, padded, padded_mask, 2, 0.7)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        classifier = load_reward_model(base, tok)
        scalar = ppo.ScalarModel(classifier, mean=0.5, std=2.0)
        # the wrapper's output at the last token is the classifier's pooled score, normalised
        pooled = classifier(input_ids=seq, attention_mask=mask).logits.squeeze(-1)
        torch.testing.assert_close(scalar(seq, mask)[:, -1], (pooled - 0.5) / 2.0)
        torch.testing.assert_close(scalar(padded, padded_mask)[:, -1], scalar(seq, mask)[:, -1], atol=1e-5, rtol=1e-5)


def test_rm_with_its_own_tokenizer_is_fed_retokenised_text(toy_dir, standin_rm, tmp_path):
    """An RM whose tokenizer numbers the words differently (and its embeddings permuted to match) must give
    the same scores as the original RM: ppo.py decodes the text and re-tokenises it for the RM."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    import toy_task
    from common import load_reward_model, load_tokenizer

    tok = load_tokenizer(standin_rm, "left")
    words = toy_task.vocabulary()
    shuffled = [*words[:3], *reversed(words[3:])]  # keep <pad> <eos> <unk> first, reverse the rest
    other = Tokenizer(models.WordLevel({w: i for i, w in enumerate(shuffled)}, unk_token="<unk>"))
    other.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    rm_tok = PreTrainedTokenizerFast(tokenizer_object=other, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    rm_tok.padding_side = "right"
    original = load_reward_model(standin_rm, tok)
    permuted = load_reward_model(standin_rm, tok)
    old_ids = torch.tensor(tok.convert_tokens_to_ids(shuffled))
    with torch.no_grad():
        permuted.get_input_embeddings().weight.copy_(original.get_input_embeddings().weight[old_ids])
    assert rm_tok.get_vocab() != tok.get_vocab()

    queries, query_mask = ppo.left_pad([tok("the plot was")["input_ids"], tok("i")["input_ids"]], tok.pad_token_id,
                                       "cpu")
    responses = torch.tensor([tok("good . <eos> film")["input_ids"], tok("loved the film and")["input_ids"]])
    responses, response_mask, has_eos = ppo.truncate_after_eos(responses, tok.eos_token_id, tok.pad_token_id)
    qr = torch.cat([queries, responses], 1)
    am = torch.cat([query_mask, torch.ones_like(responses)], 1)
    with torch.no_grad():
        same = ppo.rm_scores(ppo.ScalarModel(original), qr, am, response_mask, queries.shape[1], tok, None, has_eos, 8)
        other_scores = ppo.rm_scores(ppo.ScalarModel(permuted), qr, am, response_mask, queries.shape[1], tok,
                                     (rm_tok, rm_tok.eos_token_id), has_eos, 8)
    torch.testing.assert_close(other_scores, same, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(same[0], same[1])


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
    metrics, _, _ = ppo.evaluate(args, policy, ref_policy, ppo.Reward([reward_model], None, None), tokenizer, prompts,
                                 prompt_ids, None, torch.device("cpu"), stop_ids)
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
    same, _, _ = ppo.evaluate(args, policy, policy, ppo.Reward([reward_model], None, None), tokenizer, prompts,
                              prompt_ids, None, torch.device("cpu"), stop_ids)
    assert same["kl"] == 0.0
