"""Stage 3 of RLHF: PPO against the reward model, with a KL leash to the SFT policy.

    python ppo.py                               # toy task: models/sft + models/rm -> models/ppo, minutes on a CPU
    torchrun --nproc_per_node=2 ppo.py          # the same with FSDP2, each rank on its own shard of prompts
    python ppo.py pythia-tldr                   # Huang et al. 2024's TL;DR settings (GPUs; presets.py)
    python ppo.py --help                        # every flag

The objective (Ziegler et al. 2019; Stiennon et al. 2020; Ouyang et al. 2022) is to maximise the reward
model's score r(x, y) of responses y sampled from the policy pi, while staying close to the SFT policy
pi_ref. The KL appears in one of two places:

    in the reward (default):  r~_t = r(x, y)*[t = last] - beta * log(pi(y_t | x, y<t) / pi_ref(y_t | x, y<t))
    as a loss term instead:   L = L_CLIP + c_v * L_critic + beta * KL(pi || pi_ref)

One update: (1) rollout: sample a batch of responses and score them, without gradients; (2) per-token
rewards, GAE advantages and returns from a learned critic; (3) a few epochs of PPO over shuffled minibatches.
The score can come from one RM, an ensemble of RMs (Coste et al. 2023), or a verifier function (--reward_fn).
grpo.py is this file without the critic: `diff ppo.py grpo.py` shows what GRPO, RLOO and REINFORCE++ change.

Each equation is one small function below, and each implementation detail has a comment naming its
source. "Huang et al. 2024" is "The N+ Implementation Details of RLHF with PPO: A Case Study on TL;DR
Summarization"; "Ziegler et al. 2019" is "Fine-Tuning Language Models from Human Preferences".

The file reads top to bottom: arguments, the equations, the models and the rollout's forwards, main(). Below
main(), under TRY NOT TO MODIFY, the plumbing it calls in one line each: setup, model building, resume and
checkpoints, logging (TRL's names: objective/*, policy/*, loss/*, val/*, time/*), evaluation.

Implementation details, each marked by a comment where it happens:
- policy and frozen reference both loaded from the SFT checkpoint; frozen RM; a separate critic
  initialised from the RM (Huang et al. 2024), or a value head on the policy (Ziegler et al. 2019);
  dropout off in all of them (common.disable_dropout);
- prompts left-padded, position ids counted from the first real token;
- sampling with temperature only (top_k 0, top_p 1); logprobs recomputed with logits / temperature
  (with one micro-batch per update, by PPO's first forward itself: same weights, same inputs);
- a response ends at its first EOS; everything after it is masked out of the RM input, KL, values, losses;
- missing-EOS penalty: a fixed score for responses that never end (Huang et al. 2024);
- the RM score read at the last real token and normalised by the RM's stored mean/std;
- per-token KL penalty (k1 or k3) with the score on the last token, or the KL as a loss term;
  fixed or adaptive beta (Ziegler et al. 2019);
- GAE (gamma 1, lambda 0.95), masked advantage whitening; optional reward whitening (off);
- optional loss details, each off by default: dual clip (Ye et al. 2020), an entropy bonus, reward clipping,
  value-only critic warm-up updates;
- 4 PPO epochs over shuffled minibatches with gradient accumulation; clipped surrogate; clipped value
  loss with c_v 0.1; AdamW eps 1e-5 with a linearly annealed learning rate; optional grad-norm clipping;
- FSDP2: every rank samples its own rollouts; whitening and logged statistics are all-reduced; each model
  is all-gathered once per phase (a whole generation included), not once per forward.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm.auto import tqdm

import presets
from common import (Dist, EvalFlags, MemoryFlags, PromptFlags, ResumeFlags, all_reduce_mean, args_json, bf16_compute,
                    call_fn, catch_signals, check_finite, check_flags, check_model_dir, end_of_turn_tokens, flags_given,
                    fsdp_wrap, latest_checkpoint, load_causal_lm, load_checkpoint, load_fn, load_frozen, load_prompts,
                    load_reward_model, load_tokenizer, markdown_table, mean_of, parse_args_with_presets, prepare_output,
                    print0, retokenized, rl_clip_grad_norm_or_stop, rl_final_report, rl_save_or_stop, run,
                    same_draws_on_every_rank, seed_everything, setup_distributed, shard_frozen, stop_if_not_finite,
                    stop_token_ids, timing_metrics, unsharded, with_lora, write_update)


METHOD = "ppo"  # the name of this script's runs: output markers, checkpoints, logs, the summary table


# ----------------------------------------------------------------------------------------------
# Arguments: PPO's own; the prompts', memory's, evaluation's and resume's are inherited from common.py under
# their plain names (PromptFlags, MemoryFlags, EvalFlags, ResumeFlags; `python ppo.py --help` lists them all)
# ----------------------------------------------------------------------------------------------
@dataclass
class Args(PromptFlags, MemoryFlags, EvalFlags, ResumeFlags):
    # models
    sft_model: str = "models/sft"
    """the SFT checkpoint: the initial policy and the frozen reference policy"""
    reward_model: list[str] | None = field(default_factory=lambda: ["models/rm"])
    """the reward model (a sequence classifier, one label); its config's reward_mean/reward_std normalise every
    score. Several paths: an ensemble (--ensemble), each normalised with its own statistics. None: --reward_fn"""
    ensemble: Literal["mean", "min", "uwo"] = "mean"
    """how an ensemble's normalised scores combine (Coste et al. 2023): their mean; their min (the worst case); uwo,
    the mean minus --uwo_coef times the members' variance"""
    uwo_coef: float = 1.0
    """lambda of --ensemble uwo (uncertainty-weighted optimisation)"""
    reward_fn: str | None = None
    """`module:function` f(prompts, completions) -> list[float] to train against instead of an RM (a verifier; needs
    --reward_model None). toy_task:gold_score is the toy task's perfect RM: the upper bound of a learned one"""
    output_dir: str = "models/ppo"
    """where the trained policy, its tokenizer and eval_results.json are saved"""
    save: bool = True
    """save the policy at the end, and checkpoints on the way (--no_save for benchmarks: neither)"""
    add_pad_token: bool = False
    """add a distinct '[PAD]' token when the SFT tokenizer has none or pads with EOS (not needed after sft.py)"""
    rm_retokenize: bool = True
    """score an RM whose tokenizer differs from the policy's on decoded, re-tokenised text; off: the RM must
    share the policy's vocabulary"""
    run_name: str | None = None
    """TensorBoard logs go to runs/{run_name}; default ppo__{seed}__{unix time}"""
    seed: int = 1
    """random seed (rank r samples with seed + r)"""
    offload_critic: bool = False
    """the critic's weights and AdamW state (its shards under torchrun) wait on the CPU while the policy generates"""

    # rollout
    total_episodes: int = 6400
    """episodes (prompt + sampled response) to train on, summed over ranks"""
    batch_size: int = 64
    """episodes per update, summed over ranks"""
    response_length: int = 32
    """maximum new tokens per response"""
    temperature: float = 0.7
    """sampling temperature of rollouts (top_k 0, top_p 1); logprobs use the same temperature (Huang et al. 2024)"""
    missing_eos_penalty: float | None = -1.0
    """score given to a response without EOS within response_length (Huang et al. 2024); None: no penalty"""
    reward_clip: float | None = None
    """clip every score to [-c, c] before the missing-EOS penalty (None: off)"""
    local_rollout_forward_batch_size: int = 64
    """sequences per no-grad forward (policy, reference, RM, critic) during the rollout, per rank"""

    # reward and KL
    kl_coef: float = 0.05
    """beta, the weight of the KL to the reference policy (Huang et al. 2024: 0.05)"""
    kl_estimator: Literal["k1", "k3"] = "k1"
    """per-token estimator of KL(pi || pi_ref) in the reward and in objective/kl (k1 = log ratio; k3 = r - 1 - log r)"""
    kl_in_reward: bool = True
    """True: -beta*KL per token in the reward (Ziegler et al. 2019); False: beta*KL as a loss term instead"""
    kl_loss_estimator: Literal["k1", "k2", "k3"] = "k2"
    """with --no_kl_in_reward: the estimator differentiated in the loss (k2's gradient is that of KL(pi||pi_ref))"""
    adaptive_kl: bool = False
    """adapt beta towards kl_target (Ziegler et al. 2019); default: fixed beta"""
    kl_target: float = 6.0
    """adaptive KL: target sequence KL in nats (Ziegler et al. 2019)"""
    kl_horizon: int = 10000
    """adaptive KL: horizon in episodes (Ziegler et al. 2019)"""
    whiten_rewards: bool = False
    """whiten the per-token rewards (scale only) before GAE; off: Huang et al. 2024 found it harmful"""

    # advantages
    gamma: float = 1.0
    """discount factor"""
    lam: float = 0.95
    """GAE lambda"""
    whiten_advantages: bool = True
    """whiten GAE's advantages over the response tokens of the whole batch"""

    # PPO update
    num_ppo_epochs: int = 4
    """passes over each batch (Huang et al. 2024: 4)"""
    num_minibatches: int = 1
    """optimizer steps per epoch; each takes a shuffled 1/num_minibatches of the batch"""
    micro_batch_size: int | None = None
    """sequences per forward/backward on one rank, gradients accumulated over a minibatch (None: the minibatch)"""
    cliprange: float = 0.2
    """epsilon of the clipped surrogate"""
    dual_clip: float | None = None
    """c > 1: with a negative advantage the per-token loss is at most -c * A (Ye et al. 2020; e.g. 3); None: off"""
    entropy_coef: float = 0.0
    """c_H, the weight of an entropy bonus -c_H * H in the loss (0: none)"""
    critic_warmup_updates: int = 0
    """the first n updates train only the critic (value loss); the policy moves from update n + 1"""
    cliprange_value: float = 0.2
    """value clipping around the rollout's values"""
    vf_coef: float = 0.1
    """c_v, the weight of the value loss (Huang et al. 2024: 0.1)"""
    learning_rate: float = 2e-4
    """AdamW learning rate (policy and critic)"""
    anneal_lr: bool = True
    """decay the learning rate linearly to 0 over the updates"""
    adam_eps: float = 1e-5
    """AdamW epsilon (Huang et al. 2024)"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    max_grad_norm: float | None = None
    """clip the gradient norm of policy + critic to this; None: no clipping"""
    reuse_first_forward: bool = True
    """with one micro-batch per update, take pi_old and V_old from PPO's first forward (same weights and inputs)"""
    critic_init: Literal["rm", "sft"] = "rm"
    """the separate critic starts from the reward model (Huang et al. 2024) or from the SFT model with a fresh head"""
    value_head_on_policy: bool = False
    """no separate critic: a value head on the policy's last hidden state, sharing its backbone (Ziegler et al. 2019)"""
    checkpoint_every: int = 20
    """updates between checkpoints (policy, critic, optimizer, RNG states, adaptive beta, data position); 0: only
    the final one. SIGTERM (preemption) also writes one, then exits with status 143"""


# ----------------------------------------------------------------------------------------------
# ALGO LOGIC: the equations, one function each. Tensors are (B, T) over response tokens; `mask`
# (bool or 0/1) keeps the real tokens of each response.
# ----------------------------------------------------------------------------------------------
def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sum(x * mask) / sum(mask)"""
    return (x * mask).sum() / mask.sum()


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks (a no-op on one process)."""
    if dist.is_initialized():
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) / sqrt(var + 1e-8) over the kept positions of the whole batch, all ranks together.

    mean and the (Bessel-corrected) variance ignore padded positions, which stay 0. With
    shift_mean=False the mean is added back (reward whitening scales but does not shift, Huang et al. 2024).
    """
    total = all_reduce_sum(torch.stack([(x * mask).sum(), mask.sum().to(x.dtype)]))
    mean = total[0] / total[1]
    sq_dev = all_reduce_sum(((x - mean) ** 2 * mask).sum())
    var = sq_dev / (total[1] - 1).clamp(min=1)
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token estimators of KL(pi || pi_ref) from tokens sampled from pi (Schulman 2020, "Approximating KL").

    With log r = log pi(y_t) - log pi_ref(y_t):
        k1 = log r                       unbiased, high variance, can be negative
        k2 = (log r)^2 / 2               biased; as a loss its gradient is exactly that of KL(pi || pi_ref)
        k3 = (1/r - 1) + log r           unbiased, lower variance, never negative
    """
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {estimator}")


def truncate_after_eos(responses: torch.Tensor, stop_token_ids: int | list[int], pad_token_id: int):
    """A response ends at its first EOS (or other stop token, e.g. a chat end-of-turn), which it keeps;
    every token after it becomes padding.

    Returns (responses, response_mask, has_eos): (B, T) tokens, (B, T) True up to and including the
    first EOS (all True without one), and (B,) whether an EOS was generated at all.
    """
    is_eos = torch.isin(responses, torch.tensor(stop_token_ids, device=responses.device).reshape(-1))
    has_eos = is_eos.any(1)
    last = torch.where(has_eos, is_eos.int().argmax(1), responses.shape[1] - 1)  # (B,) last real index
    response_mask = torch.arange(responses.shape[1], device=responses.device)[None, :] <= last[:, None]
    return responses.masked_fill(~response_mask, pad_token_id), response_mask, has_eos


def clip_reward(scores: torch.Tensor, reward_clip: float | None) -> torch.Tensor:
    """score = clip(score, -c, c): no single outlier score can dominate a batch (None: unchanged)."""
    if reward_clip is None:
        return scores
    return scores.clamp(-reward_clip, reward_clip)


def apply_missing_eos_penalty(scores: torch.Tensor, has_eos: torch.Tensor, penalty: float | None) -> torch.Tensor:
    """score = penalty if the response has no EOS else score (Huang et al. 2024: -1 for unfinished text)."""
    if penalty is None:
        return scores
    return torch.where(has_eos, scores, torch.full_like(scores, penalty))


def kl_penalized_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """r~_t = -beta * kl_t  +  score * [t = last real token]   (Ziegler et al. 2019)

    The sequence-level RM score lands on the final real token (the EOS, or the last token of a response
    without one); every real token pays the KL penalty; padding after EOS gets nothing.
    """
    rewards = -kl_coef * kl * mask
    last = mask.long().sum(1) - 1  # (B,)
    rewards[torch.arange(rewards.shape[0], device=rewards.device), last] += scores
    return rewards


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """Generalised advantage estimation (Schulman et al. 2016) over the response tokens:

        delta_t = r_t + gamma * V_{t+1} - V_t         (V = 0 after the last real token)
        A_t     = delta_t + gamma * lam * A_{t+1}
        returns = A + V
    Returns (advantages, returns), both 0 at padding.
    """
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(rewards)
    last_gae = torch.zeros_like(rewards[:, 0])
    length = rewards.shape[1]
    for t in reversed(range(length)):
        next_values = values[:, t + 1] if t < length - 1 else torch.zeros_like(values[:, 0])
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        last_gae = delta + gamma * lam * last_gae
        advantages[:, t] = last_gae
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def ensemble_scores(member_scores: torch.Tensor, how: str, uwo_coef: float) -> torch.Tensor:
    """One score from M reward models' normalised scores r_m (Coste et al. 2023), (M, B) -> (B,):

        mean:  1/M sum_m r_m
        min:   min_m r_m                                   worst-case optimisation
        uwo:   1/M sum_m r_m - lambda * 1/M sum_m (r_m - mean)^2    uncertainty-weighted optimisation
    """
    mean = member_scores.mean(0)
    if how == "mean":
        return mean
    if how == "min":
        return member_scores.min(0).values
    if how == "uwo":
        return mean - uwo_coef * ((member_scores - mean) ** 2).mean(0)
    raise ValueError(f"unknown ensemble {how}")


def policy_loss(logprobs, old_logprobs, advantages, mask, cliprange: float, dual_clip: float | None = None):
    """PPO's clipped surrogate (Schulman et al. 2017), averaged over real response tokens:

        ratio_t = exp(log pi(y_t) - log pi_old(y_t))
        L_t     = max(-A_t * ratio_t, -A_t * clip(ratio_t, 1 - eps, 1 + eps))
        L_t     = min(L_t, -c * A_t)  where A_t < 0                                      --dual_clip c only
    The dual clip (Ye et al. 2020) bounds the loss of a token with A < 0 whose ratio has grown far above 1.
    Returns (loss, clipfrac, ratio); clipfrac is the fraction of tokens where the clipped branch wins.
    """
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    per_token = torch.max(unclipped, clipped)
    if dual_clip is not None:
        per_token = torch.where(advantages < 0, torch.min(per_token, -dual_clip * advantages), per_token)
    loss = masked_mean(per_token, mask)
    clipfrac = masked_mean((clipped > unclipped).float(), mask)
    return loss, clipfrac, ratio


def value_loss(values, old_values, returns, mask, cliprange_value: float):
    """Clipped value loss (the OpenAI baselines / Ziegler et al. 2019 critic), averaged over real response tokens:

        V_clip   = V_old + clip(V - V_old, -eps_v, eps_v)
        L_critic = 0.5 * mean_t max((V_t - R_t)^2, (V_clip_t - R_t)^2)
    Returns (loss, clipfrac).
    """
    values_clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    unclipped = (values - returns) ** 2
    clipped = (values_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(unclipped, clipped), mask)
    clipfrac = masked_mean((clipped > unclipped).float(), mask)
    return loss, clipfrac


def adaptive_kl_coef(kl_coef: float, kl: float, target: float, horizon: int, n_episodes: int) -> float:
    """Ziegler et al. 2019's proportional controller:

        e = clip(KL / KL_target - 1, -0.2, 0.2);   beta <- beta * (1 + e * n_episodes / horizon)
    """
    error = min(max(kl / target - 1.0, -0.2), 0.2)
    return kl_coef * (1.0 + error * n_episodes / horizon)


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[token] = logit[token] - logsumexp(logits); (B, T, V), (B, T) -> (B, T)"""
    return logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """H = logsumexp(logits) - sum_v softmax(logits)_v * logits_v; (B, T, V) -> (B, T)

    A token of probability 0 adds 0 (p log p -> 0), also when its logit is -inf (top-k, masking): 0 * -inf is NaN."""
    log_normalizer = logits.logsumexp(-1)  # first: autograd then sums the gradients in the plain formula's order
    probs = torch.softmax(logits, -1)
    return log_normalizer - (probs * logits.masked_fill(probs == 0, 0.0)).sum(-1)


def annealed_learning_rate(update: int, num_updates: int, learning_rate: float) -> float:
    """Linear decay to 0 over the setup, update = 1, 2, ...: (1 - (update - 1) / num_updates) * learning_rate (CleanRL;
    Huang et al. 2024)."""
    return (1.0 - (update - 1.0) / num_updates) * learning_rate


# ----------------------------------------------------------------------------------------------
# Models: the policy (a causal LM) and scalar models (RM and critic: backbone + linear head per token);
# the forwards of the rollout and of training
# ----------------------------------------------------------------------------------------------
def position_ids_from(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted from the first real token, so left padding never shifts a sequence. TRL and OpenRLHF
    pass them; Huang et al. 2024's released code passes none, which a rotary model such as Pythia barely feels
    but a model with learned absolute positions (GPT-2) does (tests/test_ppo_equations.py)."""
    return (attention_mask.long().cumsum(1) - 1).clamp(min=0)


def policy_forward(policy, query_responses, attention_mask, response_length: int, temperature: float, value_head=None):
    """Logits / temperature at the positions that predict the response tokens, and optionally values.

    The last token predicts nothing, so it is not fed; `logits_to_keep` computes the LM head only for
    the response positions. Returns ((B, T, V) logits, (B, T) values or None), T = response_length.
    """
    input_ids, attention_mask = query_responses[:, :-1], attention_mask[:, :-1]
    out = policy(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids_from(attention_mask),
        logits_to_keep=response_length, use_cache=False, output_hidden_states=value_head is not None,
    )
    # logits divided by the sampling temperature, so that training logprobs match the rollout's (Huang et al. 2024)
    logits = out.logits / temperature
    values = None
    if value_head is not None:  # Ziegler et al. 2019: the value head shares the policy's backbone
        values = value_head(out.hidden_states[-1][:, -response_length:]).squeeze(-1)
    return logits, values


class ScalarModel(nn.Module):
    """backbone -> final hidden state -> linear head, at every position: (B, S) -> (B, S).

    Wraps a sequence classifier (the RM, or in ppo.py the critic made from it) but keeps the per-token outputs the
    critic needs, instead of the classifier's single pooled one. Its output is normalised, (head - mean) / std,
    with the RM's stored statistics, so the critic starts on the score's scale.
    """

    def __init__(self, seq_classifier, mean: float = 0.0, std: float = 1.0):
        super().__init__()
        self.backbone = getattr(seq_classifier, seq_classifier.base_model_prefix)
        self.head = getattr(seq_classifier, "score", None)
        if self.head is None:
            raise SystemExit(f"{type(seq_classifier).__name__} has no `score` head: use a decoder-only reward model")
        self._no_split_modules = seq_classifier._no_split_modules  # for common.fsdp_wrap
        self.mean, self.std = mean, std

    def forward(self, input_ids, attention_mask):
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask,
                            position_ids=position_ids_from(attention_mask), use_cache=False)
        return (self.head(out.last_hidden_state).squeeze(-1) - self.mean) / self.std


def reference_logits(policy, ref_policy, query_responses, attention_mask, response_length: int, temperature: float):
    """The frozen reference's logits / temperature (B, T, V), in float32 whatever its dtype. With LoRA there is
    no reference model: the policy's weights with the adapter switched off are the SFT weights."""
    model = policy if ref_policy is None else ref_policy
    with policy.disable_adapter() if ref_policy is None else contextlib.nullcontext():
        return policy_forward(model, query_responses, attention_mask, response_length, temperature)[0].float()


@dataclass
class Reward:
    """What scores a response: one frozen RM, an ensemble of them, or a verifier function (--reward_fn)."""
    models: list  # frozen ScalarModels, each normalised with its own stored mean/std; empty with --reward_fn
    fn: object  # --reward_fn: f(prompts, completions) -> list[float], or None
    retokenize: tuple | None  # (RM tokenizer, its end token) when a single RM reads another vocabulary
    ensemble: str = "mean"
    uwo_coef: float = 1.0


@dataclass
class Models:
    """The four models of PPO and what trains them (built by build_models, in the appendix)."""
    policy: nn.Module  # trained; with --lora_r, its adapters only
    ref_policy: nn.Module | None  # frozen SFT policy; None with --lora_r (the policy with its adapter off)
    reward: Reward  # the frozen RM(s), or --reward_fn
    critic: nn.Module | None  # trained; None with --value_head_on_policy and with a critic-free estimator
    value_head: nn.Module | None  # --value_head_on_policy: a linear head on the policy's last hidden state
    trainables: nn.ModuleDict  # policy, critic, value head: what the optimizer and the checkpoints hold
    optimizer: torch.optim.Optimizer
    policy_train: nn.Module  # the policy, or its torch.compile wrapper (--compile)
    critic_train: nn.Module | None


def train_forward(models: Models, args: Args, query_responses, attention_mask, response_length: int):
    """The training forward: ((B, T, V) logits / temperature of the policy, (B, T) values, or None without a critic)."""
    if args.gradient_checkpointing:  # HF recomputes only in training mode (dropout is off either way)
        models.trainables.train()
    logits, values = policy_forward(models.policy_train, query_responses, attention_mask, response_length,
                                    args.temperature, models.value_head)
    if models.critic is not None:  # V(x, y<t): the critic's output at the token before y_t
        values = models.critic_train(query_responses[:, :-1], attention_mask[:, :-1])[:, -response_length:]
    return logits, values


def old_logprobs_and_values(models: Models, args: Args, query_responses, attention_mask, responses, reuse: bool):
    """pi_old(y_t) and V_old(x, y<t), which PPO's ratio and value clipping compare against: no-grad forwards in
    chunks, logits / temperature as in sampling (Huang et al. 2024). -> ((B, T) logprobs, (B, T) values, the
    reused forward or None). `reuse`, with one micro-batch per update: PPO's first forward (epoch 1, before any
    optimizer step) runs the same weights on the same sequences, so it runs here instead, once, with gradients,
    and the update's first micro-batch takes its logits and values (equal up to float rounding; two forwards fewer).
    """
    T = responses.shape[1]
    if reuse:
        with torch.enable_grad():
            logits, values = train_forward(models, args, query_responses, attention_mask, T)
        return logprobs_from_logits(logits, responses), values.detach(), (logits, values)
    chunks = [slice(i, i + args.local_rollout_forward_batch_size)
              for i in range(0, len(responses), args.local_rollout_forward_batch_size)]
    logprobs, values = [], []
    with unsharded(models.policy):
        for c in chunks:
            logits, v = policy_forward(models.policy, query_responses[c], attention_mask[c], T, args.temperature,
                                       models.value_head)
            logprobs.append(logprobs_from_logits(logits, responses[c]))
            values.append(v)
    if models.critic is not None:
        with unsharded(models.critic):  # V(x, y<t): the critic's output at the token before y_t
            values = [models.critic(query_responses[c, :-1], attention_mask[c, :-1])[:, -T:] for c in chunks]
    return torch.cat(logprobs), torch.cat(values) if values[0] is not None else None, None


def reference_logprobs(models: Models, args: Args, query_responses, attention_mask, responses) -> torch.Tensor:
    """log pi_ref(y_t): the frozen reference at the same temperature (Huang et al. 2024), in chunks. -> (B, T)"""
    ref_logprobs = []
    with unsharded(models.ref_policy):
        for i in range(0, len(responses), args.local_rollout_forward_batch_size):
            c = slice(i, i + args.local_rollout_forward_batch_size)
            logits = reference_logits(models.policy, models.ref_policy, query_responses[c], attention_mask[c],
                                      responses.shape[1], args.temperature)
            ref_logprobs.append(logprobs_from_logits(logits, responses[c]))
    return torch.cat(ref_logprobs)


# ----------------------------------------------------------------------------------------------
# Rollout helpers
# ----------------------------------------------------------------------------------------------
def left_pad(sequences: list[list[int]], pad_token_id: int, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Left padding, so every prompt ends where the response starts (Huang et al. 2024). -> (B, P) ids, mask"""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s):] = 1
    return ids.to(device), mask.to(device)


def generation_config(tokenizer, max_new_tokens: int, temperature: float, stop_token_ids: list[int]):
    """Sampling from the full distribution: top_k 0, top_p 1, only the temperature (Huang et al. 2024), which
    policy_forward models. A field left None here is filled from the model's generation_config, which holds only
    the token ids (common.token_ids_only), then from the library defaults: neutral but for top_k 50."""
    from transformers import GenerationConfig

    sample = temperature > 0
    return GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=sample, temperature=temperature if sample else None,
        top_k=0 if sample else None, top_p=1.0 if sample else None,
        eos_token_id=stop_token_ids, pad_token_id=tokenizer.pad_token_id, use_cache=True,
    )


def generate(policy, queries, query_mask, config, batch_size: int | None = None) -> torch.Tensor:
    """Sample responses for left-padded queries (B, P) -> (B, T<=max_new_tokens), `batch_size` queries per call (None:
    all at once), so that the KV cache holds one chunk's; a chunk stops when all its responses ended, then is padded."""
    policy.eval()  # with gradient checkpointing, training mode would switch off the KV cache
    chunk = batch_size or len(queries)
    with unsharded(policy):  # FSDP2: one all-gather for the whole generation, not one per token
        out = [policy.generate(input_ids=queries[i:i + chunk], attention_mask=query_mask[i:i + chunk],
                               generation_config=config)[:, queries.shape[1]:] for i in range(0, len(queries), chunk)]
    width = max(o.shape[1] for o in out)
    return torch.cat([nn.functional.pad(o, (0, width - o.shape[1]), value=config.pad_token_id) for o in out])


def rm_scores(reward_model, query_responses, attention_mask, response_mask, context_length: int,
              tokenizer, rm_retokenize, has_eos, batch_size: int) -> torch.Tensor:
    """The RM's score at the last real token of prompt + response (the EOS), in chunks. -> (B,)

    If the RM has its own tokenizer (rm_retokenize = (its tokenizer, its end token)), it reads the decoded text,
    re-tokenised, with its own end token where the policy's response ended (common.retokenized), as train_rm.py
    read its rewards. Otherwise the policy's tokens go in as they are.
    """
    if rm_retokenize is not None:
        query_responses, attention_mask = retokenized(query_responses, attention_mask, has_eos, tokenizer,
                                                      *rm_retokenize)
        last = attention_mask.sum(1) - 1
    else:
        last = context_length + response_mask.long().sum(1) - 1  # (B,) index of the EOS (Huang et al. 2024)
    scores = []
    with unsharded(reward_model):
        for i in range(0, query_responses.shape[0], batch_size):
            s = slice(i, i + batch_size)
            per_token = reward_model(query_responses[s], attention_mask[s])  # (b, S)
            scores.append(per_token.gather(1, last[s, None]).squeeze(1).float())
    return torch.cat(scores)


def reward_scores(reward: Reward, tokenizer, query_responses, attention_mask, response_mask, context_length: int,
                  has_eos, batch_size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The scores of a batch of responses -> ((B,) scores, (M, B) an ensemble's member scores or None):
    --reward_fn's on the decoded prompts and responses; else each RM's (rm_scores), an ensemble's combined
    (ensemble_scores)."""
    if reward.fn is not None:
        prompts = tokenizer.batch_decode(query_responses[:, :context_length], skip_special_tokens=True)
        completions = tokenizer.batch_decode(query_responses[:, context_length:], skip_special_tokens=True)
        return torch.tensor(call_fn(reward.fn, prompts, completions, "--reward_fn"), device=response_mask.device), None
    members = [rm_scores(rm, query_responses, attention_mask, response_mask, context_length, tokenizer,
                         reward.retokenize, has_eos, batch_size) for rm in reward.models]
    if len(members) == 1:
        return members[0], None
    member_scores = torch.stack(members)  # (M, B)
    return ensemble_scores(member_scores, reward.ensemble, reward.uwo_coef), member_scores


@dataclass
class Rollout:
    """One update's episodes on this rank, B of them with T response tokens: what PPO's epochs train on."""
    query_responses: torch.Tensor  # (B, P + T) left-padded prompts, then the responses
    attention_mask: torch.Tensor  # (B, P + T) what the policy attended to
    responses: torch.Tensor  # (B, T) padding after each response's EOS
    response_mask: torch.Tensor  # (B, T) True up to and including the EOS
    logprobs: torch.Tensor  # (B, T) log pi_old(y_t)
    ref_logprobs: torch.Tensor  # (B, T) log pi_ref(y_t)
    values: torch.Tensor  # (B, T) V_old(x, y<t)
    advantages: torch.Tensor  # (B, T)
    returns: torch.Tensor  # (B, T)


def micro_batch_backward(models: Models, args: Args, rollout: Rollout, idx: torch.Tensor, kl_coef: float,
                         policy_moves: bool, accumulation_steps: int, first_forward=None) -> dict:
    """PPO's loss on the micro-batch `idx` of the rollout, its backward (the gradients add up over a minibatch's
    micro-batches), and its statistics under TRL's names:

        L = L_CLIP + c_v * L_critic  (+ beta * KL with --no_kl_in_reward)  (- c_H * H with --entropy_coef)
    During the critic warm-up (policy_moves False) only c_v * L_critic trains. first_forward: the rollout's own
    forward of every sequence on the same weights (old_logprobs_and_values), taken instead of a new one.
    """
    T = rollout.responses.shape[1]
    if first_forward is None:
        logits, values = train_forward(models, args, rollout.query_responses[idx], rollout.attention_mask[idx], T)
    else:
        logits, values = first_forward[0][idx], first_forward[1][idx]
    micro_mask = rollout.response_mask[idx]
    old_logprobs = rollout.logprobs[idx]
    new_logprobs = logprobs_from_logits(logits, rollout.responses[idx])
    pg_loss, pg_clipfrac, ratio = policy_loss(new_logprobs, old_logprobs, rollout.advantages[idx], micro_mask,
                                              args.cliprange, args.dual_clip)
    vf_loss, vf_clipfrac = value_loss(values, rollout.values[idx], rollout.returns[idx], micro_mask,
                                      args.cliprange_value)
    loss = args.vf_coef * vf_loss  # c_v * L_critic; the policy's terms join it after the critic warm-up
    if policy_moves:
        loss = pg_loss + loss
    if not args.kl_in_reward:  # the KL as a loss term, beta * KL(pi || pi_ref)
        kl_loss = masked_mean(kl_estimate(new_logprobs, rollout.ref_logprobs[idx], args.kl_loss_estimator), micro_mask)
        if policy_moves:
            loss = loss + kl_coef * kl_loss
    if args.entropy_coef and policy_moves:  # an entropy bonus
        loss = loss - args.entropy_coef * masked_mean(entropy_from_logits(logits), micro_mask)
    (loss / accumulation_steps).backward()
    with torch.no_grad():  # each logged value next to its name (TRL's PPO names)
        return {"loss/policy_avg": pg_loss, "policy/clipfrac_avg": pg_clipfrac,
                "loss/value_avg": vf_loss, "val/clipfrac_avg": vf_clipfrac,
                "policy/approxkl_avg": approx_kl(new_logprobs, old_logprobs, micro_mask),
                "policy/entropy_avg": masked_mean(entropy_from_logits(logits), micro_mask),
                "val/ratio": masked_mean(ratio, micro_mask),
                "val/ratio_var": masked_mean((ratio - masked_mean(ratio, micro_mask)) ** 2, micro_mask),
                **({} if args.kl_in_reward else {"loss/kl_avg": kl_loss})}


# ----------------------------------------------------------------------------------------------
# main: one PPO update after another
# ----------------------------------------------------------------------------------------------
def main(args: Args) -> dict:
    # TRY NOT TO MODIFY: checks, processes, sizes, output dirs, prompts; the four models; resume; logging
    start_time = time.time()
    setup = set_up(args)
    models = build_models(args, setup)
    progress, writer = start_or_resume(args, setup, models)  # progress.kl_coef is beta, moved by --adaptive_kl
    device = setup.dist.device
    pad_token_id = setup.tokenizer.pad_token_id
    batches = prompt_batches(setup.train_ids, setup.local_batch_size, progress.start_update,
                             torch.Generator().manual_seed(args.seed + setup.dist.rank))
    rollout_config = generation_config(setup.tokenizer, args.response_length, args.temperature, setup.stop_ids)
    reuse = args.reuse_first_forward and args.num_minibatches == 1 and setup.gradient_accumulation_steps == 1
    signals = catch_signals()
    for update in tqdm(range(progress.start_update + 1, setup.num_updates + 1), initial=progress.start_update,
                       total=setup.num_updates, disable=not setup.dist.is_main, desc=METHOD):
        if args.anneal_lr:  # linear decay to 0 (CleanRL, Huang et al. 2024)
            models.optimizer.param_groups[0]["lr"] = annealed_learning_rate(update, setup.num_updates,
                                                                            args.learning_rate)
        t_start = time.perf_counter()

        # ALGO LOGIC: rollout. Everything here is data, without gradients (Huang et al. 2024), except PPO's
        # own first forward when it is reused (old_logprobs_and_values).
        with torch.no_grad():
            queries, query_mask = left_pad(next(batches), pad_token_id, device)  # (B, P), left-padded
            place_critic(models, args, "cpu", device)
            # (B, T); --generation_batch_size prompts per generate call, chunks as Huang et al. 2024 (None: all)
            responses = generate(models.policy, queries, query_mask, rollout_config, args.generation_batch_size)
            place_critic(models, args, device, device)
            # a response ends at its first EOS; what follows is padding, masked out of everything below
            responses, response_mask, has_eos = truncate_after_eos(responses, setup.stop_ids, pad_token_id)
            query_responses = torch.cat([queries, responses], 1)  # (B, P + T)
            attention_mask = torch.cat([query_mask, torch.ones_like(responses)], 1)  # what the policy attended to
            sync(device)
            t_generated = time.perf_counter()
            ref_logprobs = reference_logprobs(models, args, query_responses, attention_mask, responses)
            # the RM score at the last real token, normalised by the RM's stored mean/std; an ensemble's members
            # combined (Coste et al. 2023); or --reward_fn's score of the text
            scores, member_scores = reward_scores(models.reward, setup.tokenizer, query_responses, attention_mask,
                                                  response_mask, queries.shape[1], has_eos,
                                                  args.local_rollout_forward_batch_size)
            stop_if_not_finite(scores, update, args, setup)  # before the penalty, which would hide a broken RM's NaN
            scores = clip_reward(scores, args.reward_clip)  # off by default
            # missing-EOS penalty: a response that never ends gets a fixed low score (Huang et al. 2024)
            scores = apply_missing_eos_penalty(scores, has_eos, args.missing_eos_penalty)
            logprobs, values, first_forward = old_logprobs_and_values(models, args, query_responses, attention_mask,
                                                                      responses, reuse)

            # ALGO LOGIC: per-token rewards, advantages, returns
            kl = kl_estimate(logprobs, ref_logprobs, args.kl_estimator) * response_mask  # (B, T)
            # KL in the reward (Ziegler et al. 2019) or, with --no_kl_in_reward, in the loss instead
            rewards = kl_penalized_rewards(scores, kl, response_mask, progress.kl_coef if args.kl_in_reward else 0.0)
            if args.whiten_rewards:  # off by default (Huang et al. 2024)
                rewards = whiten(rewards, response_mask, shift_mean=False)
            values = values * response_mask
            advantages, returns = gae(rewards, values, response_mask, args.gamma, args.lam)
            if args.whiten_advantages:
                advantages = whiten(advantages, response_mask)
            rollout = Rollout(query_responses, attention_mask, responses, response_mask, logprobs, ref_logprobs,
                              values, advantages, returns)
            sync(device)
            t_scored = time.perf_counter()

        # ALGO LOGIC: PPO epochs over shuffled minibatches; the old logprobs and values are the rollout's. During
        # the critic warm-up only the value loss trains; the policy moves from update critic_warmup_updates + 1 on
        stats, policy_moves = [], update > args.critic_warmup_updates
        for _epoch in range(args.num_ppo_epochs):
            order = torch.randperm(setup.local_batch_size, device=device)
            for minibatch_start in range(0, setup.local_batch_size, setup.minibatch_size):
                for micro_start in range(minibatch_start, minibatch_start + setup.minibatch_size,
                                         setup.micro_batch_size):
                    idx = order[micro_start:micro_start + setup.micro_batch_size]
                    stats.append(micro_batch_backward(models, args, rollout, idx, progress.kl_coef, policy_moves,
                                                      setup.gradient_accumulation_steps, first_forward))
                    first_forward = None  # used once: by the first micro-batch, on the weights it was computed with
                # the global norm (clipped only with --max_grad_norm), checked before it can reach the weights
                rl_clip_grad_norm_or_stop(models, args, setup, update, stats[-1])
                models.optimizer.step()
                models.optimizer.zero_grad(set_to_none=True)
        sync(device)
        t_end = time.perf_counter()

        # TRY NOT TO MODIFY: logging, one all-reduce per update (the stop signal rides along)
        with torch.no_grad():
            non_score_reward = (-progress.kl_coef * kl).sum(1)
            rollout_stats = {"objective/scores": scores.mean(), "objective/kl": kl.sum(1).mean(),
                             "objective/entropy": (-logprobs * response_mask).sum(1).mean(),
                             "objective/non_score_reward": non_score_reward.mean(),
                             "objective/rlhf_reward": (scores + non_score_reward).mean(),
                             "val/num_eos_tokens": has_eos.float().mean() * args.batch_size,
                             "val/response_length": response_mask.float().sum(1).mean()}
            if member_scores is not None:  # the ensemble's disagreement: the members' std, averaged over responses
                rollout_stats["objective/ensemble_std"] = member_scores.std(0, unbiased=False).mean()
            explained = explained_variance(values, returns, response_mask)
        metrics = all_reduce_mean({**rollout_stats, **mean_of(stats), "stop": float(signals["stop"])}, setup.dist)
        stop = metrics.pop("stop") > 0
        check_finite(metrics, update, args, setup)
        metrics.update({"val/explained_variance": explained.item(), "lr": models.optimizer.param_groups[0]["lr"],
                        "objective/kl_coef": progress.kl_coef, "episode": update * args.batch_size,
                        **timing_metrics(t_start, t_generated, t_scored, t_end, args.batch_size, progress)})
        write_update(writer, metrics, update, args, setup, queries, responses, scores, progress)

        # ALGO LOGIC: adaptive KL (Ziegler et al. 2019): move beta so that the batch's KL tracks its target
        if args.adaptive_kl:
            batch_kl = all_reduce_sum(kl.sum(1).mean() / setup.dist.world_size).item()
            progress.kl_coef = adaptive_kl_coef(progress.kl_coef, batch_kl, args.kl_target, args.kl_horizon,
                                                args.batch_size)

        # TRY NOT TO MODIFY: evaluation and checkpoints
        if (args.eval_every and update % args.eval_every == 0) or update == setup.num_updates:
            run_eval(update * args.batch_size, args, setup, models, progress, writer)
        rl_save_or_stop(update, stop, signals, args, setup, models, progress, METHOD)

    return rl_final_report(args, setup, models, progress, writer, start_time, METHOD)


# ----------------------------------------------------------------------------------------------
# TRY NOT TO MODIFY: everything below is plumbing that main() calls in one line each: the run's setup and
# checks, the prompts, the models, resume and checkpoints, logging, evaluation and the final report, the
# presets and the command line.
# ----------------------------------------------------------------------------------------------
def prompt_batches(prompt_ids: list[list[int]], batch_size: int, skip: int, generator: torch.Generator):
    """Batches of this rank's prompts, forever: epochs over its shard, reshuffled each time, the last partial
    batch dropped. The first `skip` batches are drawn but not given: on resume, the checkpoint's data position."""
    drawn = 0
    while True:
        order = torch.randperm(len(prompt_ids), generator=generator).tolist()
        for i in range(0, len(order) - batch_size + 1, batch_size):
            drawn += 1
            if drawn > skip:
                yield [prompt_ids[j] for j in order[i:i + batch_size]]


def place_critic(models: Models, args: Args, where, device: torch.device) -> None:
    """--offload_critic: the critic's weights and AdamW state leave the GPU while the policy generates. Under
    FSDP2 these are the rank's shards; Module.to keeps the parameter objects (FSDP2 swaps DTensors in place), so
    the optimizer still holds them. On a CPU setup `where` is where they are already, and nothing moves."""
    if models.critic is None or not args.offload_critic:
        return
    models.critic.to(where)
    for p in models.critic.parameters():
        for key, value in models.optimizer.state.get(p, {}).items():
            if torch.is_tensor(value):
                models.optimizer.state[p][key] = value.to(where)


def sync(device: torch.device) -> None:
    """Wait for the GPU, for honest phase timings; nothing to wait for on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize()


@dataclass
class Setup:
    """What main() sets up once: processes, sizes, paths and the prompts (set_up)."""
    dist: Dist  # rank, world size, device
    local_batch_size: int  # episodes per update on this rank
    minibatch_size: int  # per rank
    micro_batch_size: int  # sequences per training forward on this rank
    gradient_accumulation_steps: int  # micro-batches per minibatch
    num_updates: int
    checkpoint_dir: str
    log_dir: str
    gold_fn: object  # module:function(prompts, completions) -> scores, or None
    reward_fn: object  # --reward_fn, the same kind of function, trained against; or None
    tokenizer: object
    chat: bool  # the prompts are chat conversations, rendered with the template
    stop_ids: list[int]  # a response ends at any of these (EOS, a chat template's end-of-turn token)
    train_ids: list[list[int]]  # this rank's shard of the training prompts
    eval_texts: list[str]  # this rank's shard of the held-out prompts
    eval_ids: list[list[int]]


@dataclass
class Progress:
    """What a checkpoint carries beyond the weights: counters, the adaptive beta, the run's history and the
    evaluations (the SFT policy's is the baseline of the final win rate)."""
    start_update: int
    kl_coef: float  # beta, moved by --adaptive_kl
    history: list
    timings: list
    sft_metrics: dict | None
    sft_golds: list | None
    eval_metrics: dict | None  # the last evaluation
    eval_golds: list | None


def check_args(args: Args) -> None:
    """Every numeric flag in range, before anything loads (None leaves a flag off)."""
    check_flags(args, at_least_1=("total_episodes", "batch_size", "response_length", "local_rollout_forward_batch_size",
                                  "num_ppo_epochs", "num_minibatches", "micro_batch_size", "eval_batch_size",
                                  "max_prompt_length", "kl_horizon", "generation_batch_size", "plan_gpus"),
                positive=("temperature", "learning_rate", "adam_eps", "cliprange", "cliprange_value", "kl_target",
                          "reward_clip", "gpu_gb"),
                non_negative=("kl_coef", "eval_temperature", "vf_coef", "weight_decay", "max_grad_norm", "eval_every",
                              "eval_samples", "sample_every", "num_sample_rows", "checkpoint_every", "lora_r",
                              "lora_alpha", "max_dropped_fraction", "entropy_coef", "critic_warmup_updates",
                              "uwo_coef"))
    for name in ("gamma", "lam"):
        if not 0 <= getattr(args, name) <= 1:
            raise SystemExit(f"--{name} {getattr(args, name)}: must be in [0, 1]")
    check_loss_and_reward_flags(args)


def check_loss_and_reward_flags(args: Args) -> None:
    """The flags of the critic, the loss details and the reward's source, each in one line."""
    if args.dual_clip is not None and not (math.isfinite(args.dual_clip) and args.dual_clip > 1):
        raise SystemExit(f"--dual_clip {args.dual_clip}: must be > 1 (e.g. 3), or None for off")
    if args.critic_warmup_updates and args.value_head_on_policy:
        raise SystemExit("--critic_warmup_updates would move the policy through --value_head_on_policy's shared "
                         "backbone: use a separate critic")
    if (args.reward_fn is None) == (args.reward_model is None):
        raise SystemExit("--reward_fn and --reward_model: give exactly one (--reward_fn needs --reward_model None)"
                         if args.reward_fn else "no reward: give --reward_model PATH or --reward_fn module:function")
    if args.reward_fn and args.critic_init == "rm" and not args.value_head_on_policy:
        raise SystemExit("--critic_init rm needs a reward model, and --reward_fn replaces it: pass --critic_init sft")
    if args.reward_model is not None and len(args.reward_model) != len(set(args.reward_model)):
        raise SystemExit(f"--reward_model lists a model twice ({' '.join(args.reward_model)}): give distinct members")


def set_up(args: Args) -> Setup:
    """Check every flag, start the processes, derive the sizes, check the models and the output dirs, and read
    the prompts: everything that can fail, before any model is loaded."""
    check_args(args)
    if args.value_head_on_policy and args.critic_init != "rm":
        print0("note: --value_head_on_policy has no separate critic; --critic_init is ignored")
    processes = setup_distributed(group_of_one=bf16_compute(args.mixed_precision))  # --mixed_precision bf16
    seed_everything(args.seed, processes.rank)
    if args.batch_size % processes.world_size:
        raise SystemExit(f"batch_size {args.batch_size} is not divisible by the {processes.world_size} processes")
    local_batch_size = args.batch_size // processes.world_size
    if local_batch_size % args.num_minibatches:
        raise SystemExit(f"the per-rank batch {local_batch_size} is not divisible by num_minibatches "
                         f"{args.num_minibatches}")
    minibatch_size = local_batch_size // args.num_minibatches  # per rank
    micro_batch_size = args.micro_batch_size or minibatch_size
    if minibatch_size % micro_batch_size:
        raise SystemExit(f"the per-rank minibatch {minibatch_size} is not divisible by micro_batch_size "
                         f"{micro_batch_size}")
    num_updates = args.total_episodes // args.batch_size
    if num_updates < 1:
        raise SystemExit(f"total_episodes {args.total_episodes} is less than one batch ({args.batch_size})")
    for flag, needed, module in (("--lora_r", args.lora_r, "peft"),
                                 ("--frozen_dtype int8", args.frozen_dtype == "int8", "torchao")):
        if needed and importlib.util.find_spec(module) is None:
            raise SystemExit(f"{flag} needs {module}: pip install {module} (requirements.txt pins it)")
    gold_fn, reward_fn = load_fn(args.gold_reward_fn, "--gold_reward_fn"), load_fn(args.reward_fn, "--reward_fn")
    check_model_dir(args.sft_model, "SFT model")
    reward_models = {"reward model" + (f" {i + 1}" if i else ""): path
                     for i, path in enumerate(args.reward_model or [])}
    for what, path in reward_models.items():
        check_model_dir(path, what, tokenizer=False, reward_model=True)
    checkpoint_dir = args.checkpoint_dir or args.output_dir.rstrip("/") + "_checkpoints"
    if args.save:
        prepare_output(args.output_dir, checkpoint_dir, METHOD, {"SFT model": args.sft_model, **reward_models,
                       "dataset": args.dataset}, args.resume, args.overwrite, args_json(args), processes.world_size)
    elif args.resume:
        raise SystemExit("--resume needs checkpoints, and --no_save writes none")
    log_dir = os.path.join("runs", args.run_name or f"{METHOD}__{args.seed}__{int(time.time())}")

    # each rank takes its own shard of the prompts (and shuffles it with its own generator: prompt_batches)
    tokenizer = load_tokenizer(args.sft_model, padding_side="left", add_pad_token=args.add_pad_token)
    prompts, chat = load_prompts(args, tokenizer, args.sft_model)
    train_ids, (eval_texts, eval_ids) = prompts[args.train_split][1], prompts[args.eval_split]
    rank, world_size = processes.rank, processes.world_size
    train_ids = train_ids[rank::world_size]
    if len(train_ids) < local_batch_size:
        raise SystemExit(f"split '{args.train_split}' has {len(train_ids) * world_size} prompts, fewer than one batch")
    return Setup(processes, local_batch_size, minibatch_size, micro_batch_size, minibatch_size // micro_batch_size,
                 num_updates, checkpoint_dir, log_dir, gold_fn, reward_fn, tokenizer, chat,
                 stop_token_ids(args, tokenizer, chat), train_ids, eval_texts[:args.eval_samples][rank::world_size],
                 eval_ids[:args.eval_samples][rank::world_size])


def build_models(args: Args, setup: Setup) -> Models:
    """The policy and the frozen reference both start from the SFT checkpoint; the frozen RM(s) score; the critic
    is a separate model initialised from the (first) RM (Huang et al. 2024), or from the SFT model, or a value head
    on the policy (Ziegler et al. 2019). Dropout is off in all four (common.disable_dropout). Under torchrun all
    are FSDP2-sharded, and each phase all-gathers a model once (`unsharded`) rather than per forward."""
    device, tokenizer = setup.dist.device, setup.tokenizer
    policy = load_causal_lm(args.sft_model, tokenizer, args.dtype)
    ref_policy = None  # with LoRA, the reference is the policy with its adapter off
    if not args.lora_r:
        ref_policy = load_frozen(load_causal_lm, args.sft_model, tokenizer, args.dtype, args.frozen_dtype)
    reward, rm_tokenizer, same_tokenizer = load_reward(args, setup)
    critic, value_head = None, None  # one of them, the other None
    if args.value_head_on_policy:
        value_head = nn.Linear(policy.config.hidden_size, 1).to(device)
        nn.init.zeros_(value_head.weight), nn.init.zeros_(value_head.bias)  # values start at 0
    elif args.critic_init == "rm":
        if not same_tokenizer:
            raise SystemExit("--critic_init rm needs the reward model to share the policy's tokenizer; "
                             "use --critic_init sft")
        first = reward.models[0]  # the critic starts as a copy of the (first) RM, on the score's scale
        critic = ScalarModel(load_reward_model(args.reward_model[0], tokenizer, args.dtype), first.mean, first.std)
    else:
        with same_draws_on_every_rank(args.seed, setup.dist):
            critic = ScalarModel(load_reward_model(args.sft_model, tokenizer, args.dtype))
            # a fresh value head, std 1/sqrt(d_model + 1) (Ziegler et al. 2019, Huang et al. 2024)
            nn.init.normal_(critic.head.weight, std=1.0 / math.sqrt(policy.config.hidden_size + 1))
    if args.lora_r:  # Hu et al. 2021: train a low-rank update B A of each target weight, the base frozen
        with same_draws_on_every_rank(args.seed, setup.dist):
            policy = with_lora(policy, args)
    if args.gradient_checkpointing:  # non-reentrant: works with frozen embeddings (LoRA) too
        for m in (policy, critic.backbone if critic is not None else None):
            if m is not None:
                m.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    # FSDP2's root is the module every call goes through: with LoRA the HF model inside peft's wrapper, since
    # generate() bypasses the wrapper's forward (a block would otherwise initialise as a root of its own)
    bf16 = bf16_compute(args.mixed_precision)  # FSDP2's mixed precision, on one process too
    fsdp_wrap(policy.get_base_model() if args.lora_r else policy, device, bf16)
    ref_policy = shard_frozen(ref_policy, args.frozen_dtype, device, bf16)
    reward.models = [shard_frozen(m, args.frozen_dtype, device, bf16) for m in reward.models]
    if critic is not None:
        critic = fsdp_wrap(critic, device, bf16)
    if value_head is not None:
        value_head = fsdp_wrap(value_head, device, bf16)
    # the trained models as one module, so that DCP names every parameter the optimizer holds (checkpoints)
    trainables = nn.ModuleDict({name: m for name, m in (("policy", policy), ("critic", critic),
                                                        ("value_head", value_head)) if m is not None})
    params = [p for p in trainables.parameters() if p.requires_grad]  # LoRA: the adapters only
    # one AdamW over policy and critic (their parameters are disjoint), eps 1e-5 (Huang et al. 2024);
    # the fused kernel: one pass over all parameters (on CPU several times faster than the default foreach)
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, eps=args.adam_eps, weight_decay=args.weight_decay,
                                  fused=device.type in ("cpu", "cuda"))
    # re-tokenising for an RM with its own vocabulary: where a response ended, it ends in the RM's own end token
    rm_end_id = ((end_of_turn_tokens(rm_tokenizer) if setup.chat else []) or [rm_tokenizer.eos_token_id])[0]
    reward.retokenize = None if same_tokenizer else (rm_tokenizer, rm_end_id)
    return Models(policy, ref_policy, reward, critic, value_head, trainables, optimizer, policy, critic)


def load_reward(args: Args, setup: Setup) -> tuple[Reward, object, bool]:
    """The frozen RM (or each member of an ensemble) as a ScalarModel normalised with the statistics train_rm.py
    stored in its config (TRL #1783), not yet sharded; or --reward_fn. -> (Reward, the RM's tokenizer, whether it
    is the policy's). An ensemble's members must share the policy's vocabulary."""
    tokenizer = setup.tokenizer
    if args.reward_fn is not None:
        return Reward([], setup.reward_fn, None, args.ensemble, args.uwo_coef), tokenizer, True
    models, rm_tokenizer, same_tokenizer = [], tokenizer, True
    for path in args.reward_model:
        rm_has_tokenizer = not os.path.isdir(path) or any(
            os.path.exists(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer_config.json"))
        rm_tokenizer = tokenizer  # an RM dir without a tokenizer shares the policy's
        if rm_has_tokenizer:
            rm_tokenizer = load_tokenizer(path, padding_side="right", add_pad_token=args.add_pad_token)
        same_tokenizer = rm_tokenizer.get_vocab() == tokenizer.get_vocab()
        if not same_tokenizer and len(args.reward_model) > 1:
            raise SystemExit(f"ensemble member '{path}' has another vocabulary than the policy ('{args.sft_model}'): "
                             "train every member from this SFT model (train_rm.py --seed N)")
        if not same_tokenizer and not args.rm_retokenize:
            raise SystemExit(f"the vocabulary of reward model '{path}' differs from the policy's ('{args.sft_model}'); "
                             "pass --rm_retokenize to score decoded text, or train the RM from this SFT model")
        rm_classifier = load_frozen(load_reward_model, path, rm_tokenizer, args.dtype, args.frozen_dtype)
        if not hasattr(rm_classifier.config, "reward_mean"):
            print0(f"warning: '{path}' has no reward_mean/reward_std in its config: scores are used raw")
        mean, std = (float(getattr(rm_classifier.config, key, default))
                     for key, default in (("reward_mean", 0.0), ("reward_std", 1.0)))
        models.append(ScalarModel(rm_classifier, mean, std).eval().requires_grad_(False))
    return Reward(models, None, None, args.ensemble, args.uwo_coef), rm_tokenizer, same_tokenizer


def start_or_resume(args: Args, setup: Setup, models: Models) -> tuple[Progress, object]:
    """--resume: weights, optimizer, counters, adaptive beta and RNG states as they were after the checkpoint's
    update; otherwise the SFT policy's evaluation, the baseline of the final win rate. Then the TensorBoard
    writer (rank 0), and torch.compile (--compile)."""
    resumed = None
    if args.resume:
        latest = latest_checkpoint(setup.checkpoint_dir)
        during_warmup = int(latest.rsplit("_", 1)[1]) <= args.critic_warmup_updates  # step_N: update N
        with policy_without_optimizer_state(models, during_warmup):
            resumed = load_checkpoint(latest, models.trainables, models.optimizer)
        setup.log_dir = resumed["log_dir"]
        print0(f"resumed from {latest} (update {resumed['update']} of {setup.num_updates})")
    if args.compile:
        models.policy_train = torch.compile(models.policy)
        models.critic_train = torch.compile(models.critic) if models.critic is not None else None
    writer = None
    if setup.dist.is_main:
        from torch.utils.tensorboard import SummaryWriter

        # on resume, drop the events a killed run logged after its last checkpoint
        writer = SummaryWriter(setup.log_dir, purge_step=resumed["update"] * args.batch_size + 1 if resumed else None)
        writer.add_text("hyperparameters",
                        "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in asdict(args).items()))
    print0(f"{METHOD.upper()}: {setup.num_updates} updates of {args.batch_size} episodes "
           f"({setup.dist.world_size} process(es), per rank: {args.num_minibatches} minibatch(es) x "
           f"{setup.gradient_accumulation_steps} micro-batch(es) of {setup.micro_batch_size}); "
           f"TensorBoard: {setup.log_dir}")
    if resumed:
        return Progress(resumed["update"], resumed["kl_coef"], resumed["history"], resumed["timings"],
                        resumed["sft_metrics"], resumed["sft_golds"], resumed["eval_metrics"],
                        resumed["eval_golds"]), writer
    progress = Progress(0, args.kl_coef, [], [], None, None, None, None)
    run_eval(0, args, setup, models, progress, writer)
    progress.sft_metrics, progress.sft_golds = progress.eval_metrics, progress.eval_golds
    return progress, writer


@contextlib.contextmanager
def policy_without_optimizer_state(models: Models, during_warmup: bool):
    """A checkpoint written during the critic warm-up holds AdamW state for the critic only: the policy has had no
    gradient yet. The checkpoint loader (DCP) creates and expects state for every parameter that requires a gradient,
    so while it loads such a checkpoint the policy's parameters do not; the policy's state is then created by its
    first real step, as in the uninterrupted run. Any other checkpoint loads as it is."""
    trained = [p for p in models.policy.parameters() if p.requires_grad] if during_warmup else []
    for p in trained:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in trained:
            p.requires_grad_(True)


def approx_kl(logprobs: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """How far the update moved the policy: 0.5 * mean_t (log pi(y_t) - log pi_old(y_t))^2 over response tokens.

    Schulman's k2 estimator of KL(pi_old || pi), logged as policy/approxkl_avg (Huang et al. 2024).
    """
    return 0.5 * masked_mean((logprobs - old_logprobs) ** 2, mask)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - Var[returns - values] / Var[returns] over the response tokens of all ranks: 1 is a perfect critic,
    0 one that predicts the mean, below 0 one worse than that. Population variances (CleanRL's np.var)."""
    m, returns, values = mask.double(), returns.double(), values.double()  # float64: the one-pass variance cancels
    sums = all_reduce_sum(torch.stack([(returns * m).sum(), (returns**2 * m).sum(), ((returns - values) * m).sum(),
                                       ((returns - values) ** 2 * m).sum(), m.sum()]))
    s_r, s_r2, s_d, s_d2, n = sums.tolist()
    var_returns = s_r2 / n - (s_r / n) ** 2
    return torch.tensor(1.0 - (s_d2 / n - (s_d / n) ** 2) / max(var_returns, 1e-8))


def run_eval(step: int, args: Args, setup: Setup, models: Models, progress: Progress, writer) -> None:
    """Held-out evaluation (`evaluate`, kept in progress) from its own fixed seed, so that (1) every evaluation, the
    SFT baseline included, sees the same random numbers, and (2) --eval_every does not change the training run's
    sampling."""
    device = setup.dist.device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(args.seed + 1_000_003 + setup.dist.rank)
        progress.eval_metrics, progress.eval_golds, rows = evaluate(
            args, models.policy, models.ref_policy, models.reward, setup.tokenizer, setup.eval_texts, setup.eval_ids,
            setup.gold_fn, device, setup.stop_ids)
    if writer is not None:
        for k, v in progress.eval_metrics.items():
            writer.add_scalar(f"eval/{k}", v, step)
        writer.add_text("eval/samples", markdown_table(rows, ["prompt", "response", "rm score", "gold"]), step)


@torch.no_grad()
def evaluate(args, policy, ref_policy, reward: Reward, tokenizer, prompts, prompt_ids, gold_fn, device,
             stop_ids: list[int]):
    """Held-out evaluation of the current policy: RM score, gold score, KL to the reference, length, EOS.

    KL here is exact per position, sum_t KL(pi(.|x,y<t) || pi_ref(.|x,y<t)) at the training temperature,
    summed over the sampled response: it needs no estimator and is exactly 0 for the SFT policy.
    Returns (global means, this rank's per-prompt gold scores or None, sample rows).
    """
    config = generation_config(tokenizer, args.response_length, args.eval_temperature, stop_ids)
    sums = torch.zeros(5, device=device, dtype=torch.float64)  # rm, gold, kl, length, eos
    golds, rows = [], []
    for i in range(0, len(prompt_ids), args.eval_batch_size):
        queries, query_mask = left_pad(prompt_ids[i:i + args.eval_batch_size], tokenizer.pad_token_id, device)
        P = queries.shape[1]
        responses, response_mask, has_eos = truncate_after_eos(
            generate(policy, queries, query_mask, config), stop_ids, tokenizer.pad_token_id)
        T = responses.shape[1]
        query_responses = torch.cat([queries, responses], 1)
        attention_mask = torch.cat([query_mask, torch.ones_like(responses)], 1)
        scores = reward_scores(reward, tokenizer, query_responses, attention_mask, response_mask, P, has_eos,
                               args.local_rollout_forward_batch_size)[0]
        kl = torch.zeros(len(responses), device=device)
        with unsharded(policy), unsharded(ref_policy):
            for j in range(0, len(responses), args.local_rollout_forward_batch_size):
                s = slice(j, j + args.local_rollout_forward_batch_size)
                logp = policy_forward(policy, query_responses[s], attention_mask[s], T,
                                      args.temperature)[0].log_softmax(-1)
                ref_logp = reference_logits(policy, ref_policy, query_responses[s], attention_mask[s], T,
                                            args.temperature).log_softmax(-1)
                kl[s] = ((logp.exp() * (logp - ref_logp)).sum(-1) * response_mask[s]).sum(1)
        completions = tokenizer.batch_decode(responses, skip_special_tokens=True)
        if gold_fn is not None:
            gold = call_fn(gold_fn, prompts[i:i + args.eval_batch_size], completions, "--gold_reward_fn")
            golds += gold
            sums[1] += sum(gold)
        sums[0] += scores.sum()
        sums[2] += kl.sum()
        sums[3] += response_mask.sum()
        sums[4] += has_eos.sum()
        if not rows:
            rows = list(zip(prompts[i:i + args.num_sample_rows], completions, scores.tolist(),
                            golds or [None] * len(completions)))
    count = all_reduce_sum(torch.tensor([float(len(prompt_ids))], device=device, dtype=torch.float64))
    means = (all_reduce_sum(sums) / count).tolist()
    metrics = {"rm_score": means[0], "kl": means[2], "response_length": means[3], "eos_rate": means[4]}
    if gold_fn is not None:
        metrics["gold_score"] = means[1]
    return metrics, (golds if gold_fn is not None else None), rows


# the critic-free family's flags moved to grpo.py with it: a user of the old flags gets one line naming it
MOVED_TO_GRPO = {flag: f"the critic-free estimators and their loss details are in grpo.py now: python grpo.py {flag}"
                 for flag in ("--advantage_estimator", "--samples_per_prompt", "--cliprange_high",
                              "--loss_aggregation")}


def parse_args(argv=None) -> Args:
    """Args from the command line: a preset's name (presets.py; none: the toy task), then flags over it."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args_with_presets(Args, presets.PPO, argv, MOVED_TO_GRPO)
    return reward_fn_instead_of_rm(args, flags_given(argv))


def reward_fn_instead_of_rm(args: Args, given: set[str]) -> Args:
    """--reward_fn alone means "train against this function instead of the RM": the RM, and the critic copied
    from it, make way when the user left --reward_model and --critic_init at their defaults. Either one given
    next to --reward_fn stays an error (check_loss_and_reward_flags)."""
    if args.reward_fn is None:
        return args
    changes = {}
    if "--reward_model" not in given:
        changes["reward_model"] = None
    if "--critic_init" not in given and not args.value_head_on_policy:
        changes["critic_init"] = "sft"
    if changes.get("reward_model", args.reward_model) is None:
        print0(f"--reward_fn {args.reward_fn} replaces the reward model" +
               ("; the critic starts from the SFT model (--critic_init sft)" if "critic_init" in changes else ""))
    return dataclasses.replace(args, **changes)


if __name__ == "__main__":
    run(main, parse_args)
