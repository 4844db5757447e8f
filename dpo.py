"""Direct Preference Optimization: the reward model and the RL loop replaced by one loss on the preference pairs.

    python dpo.py                               # toy task: models/sft -> models/dpo, scored by models/rm as PPO is
    torchrun --nproc_per_node=2 dpo.py          # the same with FSDP2 on 2 processes
    python dpo.py pythia-tldr                   # Huang et al. 2024's DPO on TL;DR (GPUs; presets.py)
    python dpo.py --loss_type ipo               # IPO (Azar et al. 2023) instead of DPO's loss

This is train_rm.py with the reward model replaced by the policy itself (Rafailov et al. 2023). The KL-regularised
objective max_pi E[r(x, y)] - beta * KL(pi || pi_ref) is maximised by pi(y|x) = pi_ref(y|x) exp(r(x, y) / beta) / Z(x),
so every policy defines a reward, its implicit reward (up to beta log Z(x), which a pair with one prompt cancels),

    r(x, y) = beta * (log pi(y|x) - log pi_ref(y|x)),

and train_rm.py's Bradley-Terry loss on it trains the policy directly, with no RM and no sampling:

    DPO: L = -log sigmoid(r(x, y_w) - r(x, y_l))
    IPO: L = (h - 1/(2 beta))^2,   h = log [pi(y_w) pi_ref(y_l) / (pi(y_l) pi_ref(y_w))]     (--loss_type ipo)

`diff train_rm.py dpo.py` reads as the delta: get_reward (a scalar head) becomes sequence_logprobs and implicit_reward,
a frozen reference sits beside the trained model, and the RM's normalisation after training becomes ppo.py's
evaluation (gold score, RM score, exact KL to the SFT policy, gold win rate; ppo.py's prompts, samples and code). The
pairs are train_rm.py's: read by common.load_preference_split (same formats, prompt/completion split, length rule),
batched by train_rm.py's own functions (imported, so that DPO trains on the RM's batches by construction).
The file reads as train_rm.py does: Args, the equations (ALGO LOGIC), their helpers, main(), then under TRY NOT TO
MODIFY the plumbing main() calls in one line each.

Implementation details, each marked by a comment where it happens:
- the policy and the frozen reference both loaded from the SFT checkpoint, dropout off (common.load_causal_lm);
- log pi(y|x) summed over the completion's tokens, EOS included, the prompt's masked out (Rafailov et al. 2023;
  Huang et al. 2024's dpo.py); the policy is softmax(logits / --temperature), the distribution evaluation samples;
- chosen and rejected in one concatenated forward, each distinct completion once; position ids from the first real
  token; the pairs that share a prompt in one batch (train_rm.py's pair_batch and order);
- the reference's log-probabilities on the fly, or once before training (--precompute_ref_log_probs);
- logs under TRL's DPO names: rewards/{chosen,rejected,accuracies,margins}, logps/{chosen,rejected}, loss.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import ppo
import presets
from common import (Dist, ResumeFlags, args_json, catch_signals, check_flags, check_model_dir, check_path,
                    end_of_turn_tokens, exit_preempted, fsdp_wrap, gold_wins, latest_checkpoint, load_bayes_ceiling,
                    load_causal_lm, load_checkpoint, load_dataset, load_fn, load_frozen, load_preference_split,
                    load_prompts, load_tokenizer, markdown_table, parse_args_with_presets, prepare_output, print0, run,
                    save_checkpoint, save_model, setup_distributed, shard_frozen, stop_token_ids, teardown_distributed,
                    tensorboard_writer, unsharded)
from train_rm import clip_grad_norm_or_stop, pair_batch, pair_batches, pairs_by_prompt, shard  # the RM's batches


# ----------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------
@dataclass
class Args(ResumeFlags):  # + --checkpoint_dir, --resume, --overwrite
    # data: train_rm.py's flags, read by common.load_preference_split
    dataset: str = "toy_data/prefs"
    """preference dataset: a hub name or a local dir that `datasets.load_dataset` reads"""
    dataset_format: Literal["standard", "implicit_prompt", "conversational"] = "standard"
    """standard: prompt/chosen/rejected texts; implicit_prompt: whole dialogues sharing a prompt (Anthropic HH);
    conversational: lists of {role, content} messages, rendered with the chat template"""
    train_split: str = "train"
    """split to train on"""
    eval_split: str | None = "validation"
    """split to report the implicit reward's preference accuracy on (None: none)"""
    prompt_column: str = "prompt"
    """column with the prompt (standard; conversational with an explicit prompt)"""
    chosen_column: str = "chosen"
    """column with the preferred completion"""
    rejected_column: str = "rejected"
    """column with the other completion"""
    margin_column: str | None = None
    """optional column with a per-pair margin m: loss -log sigmoid(r_w - r_l - m) (train_rm.py's; Amini et al. 2024)"""
    separator: str = " "
    """text put between prompt and completion (standard format): toy words are space-separated"""
    implicit_prompt_marker: str = "\n\nAssistant:"
    """implicit_prompt: the prompt ends just after the last occurrence of this in the shared prefix"""
    max_length: int = 128
    """pairs whose prompt + completion + EOS is longer than this many tokens are dropped"""
    max_dropped_fraction: float = 0.01
    """pairs that cannot be used (an empty prompt, chosen or rejected, no prompt marker, chosen == rejected) are
    dropped with a count; more than this fraction of a split stops the run (a wrong column or format)"""
    num_train_pairs: int | None = None
    """train on this many pairs drawn at random (None: all)"""
    num_eval_pairs: int | None = None
    """evaluate the preference accuracy on this many pairs (None: all)"""
    bayes_ceiling_file: str | None = None
    """JSON with "bayes_accuracy" to compare with (None: {dataset}/bayes_ceiling.json if it exists)"""

    # model
    model_name_or_path: str = "models/sft"
    """the SFT checkpoint: the initial policy and the frozen reference"""
    add_pad_token: bool = False
    """add a distinct '[PAD]' token when the tokenizer has none or pads with EOS (a base model, not an SFT output)"""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """parameter dtype (FSDP2 computes in bf16 on GPU anyway; keep float32 master weights)"""
    output_dir: str = "models/dpo"
    """where the policy is saved (HF dir, with eval_results.json in ppo.py's layout)"""

    # DPO
    beta: float = 0.1
    """beta, the KL coefficient the implicit reward is measured in (Rafailov et al. 2023: 0.1)"""
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid"
    """sigmoid: DPO's -log sigmoid(r_w - r_l) (TRL's name); ipo: (h - 1/(2 beta))^2 (Azar et al. 2023)"""
    temperature: float = 0.7
    """the policy is softmax(logits / temperature): ppo.py's 0.7 on the toy task, the distribution that evaluation
    samples and measures KL on, as PPO trains it; 1.0 in the presets: the raw model, as TRL and Huang et al. 2024"""
    precompute_ref_log_probs: bool = False
    """compute log pi_ref of every training pair once before training, instead of one reference forward per step. Off
    by default: in one epoch both make the same reference forwards (toy task, results/ section 6: 392 s of CPU on the
    fly, 434 s precomputed, the same model up to rounding); from a second epoch on the table saves them"""

    # optimisation
    learning_rate: float = 3e-4
    """AdamW learning rate (the tiny toy model; the presets take the published rates, 1e-6 and below)"""
    adam_eps: float = 1e-5
    """AdamW epsilon (Huang et al. 2024)"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """learning-rate decay to 0 over training (Huang et al. 2024: cosine)"""
    warmup_steps: int = 0
    """linear warm-up steps"""
    num_train_epochs: int = 1
    """passes over the training pairs (Huang et al. 2024 and Zephyr: 1)"""
    batch_size: int = 128
    """pairs per optimiser step, over all processes (train_rm.py's: the RM's batches)"""
    micro_batch_size: int = 128
    """pairs per forward on one process (a forward holds up to twice as many sequences); the gradient accumulation
    follows: batch_size / (processes x micro_batch_size) forwards per optimiser step"""
    eval_batch_size: int = 128
    """pairs per forward of the preference evaluation and of --precompute_ref_log_probs, on one process"""
    max_grad_norm: float = 1.0
    """gradient clipping"""
    group_by_length: bool = True
    """batch pairs of similar length together, so that batches carry less padding (faster)"""
    group_by_prompt: bool = True
    """keep the pairs that share a prompt in one batch, where each distinct completion is scored once
    (Ouyang et al. 2022); off: every pair shuffled on its own"""
    eval_every: int = 0
    """optimiser steps between evaluations (0: at the end of each epoch; there is always one at the end)"""
    log_every: int = 10
    """optimiser steps between TensorBoard points"""

    # evaluation on held-out prompts, ppo.py's (in place of train_rm.py's normalisation)
    reward_model: str = "models/rm"
    """the trained RM that scores the evaluation samples, with its stored reward_mean/reward_std (as in ppo.py)"""
    prompt_dataset: str = "toy_data/prompts"
    """the held-out prompts: ppo.py's --dataset"""
    prompt_dataset_split: str = "validation"
    """their split: ppo.py's --eval_split"""
    prompt_dataset_column: str = "prompt"
    """their column: ppo.py's --prompt_column"""
    eval_samples: int = 512
    """held-out prompts per evaluation, the first N (ppo.py's; 0: no evaluation on prompts)"""
    max_prompt_length: int = 32
    """held-out prompts longer than this many tokens are an error, or cut with --truncate_long_prompts (ppo.py's)"""
    truncate_long_prompts: bool = False
    """keep the last tokens of a too-long prompt, behind its BOS or chat template header"""
    response_length: int = 32
    """max new tokens per evaluation sample (ppo.py's)"""
    eval_temperature: float = 0.7
    """sampling temperature of the evaluation (ppo.py's; 0: greedy)"""
    generation_batch_size: int = 512
    """prompts per generate call on one process (ppo.py's --eval_batch_size: the same random draws)"""
    gold_reward_fn: str | None = "toy_task:gold_score"
    """`module:function` f(prompts, completions) -> list[float], the true reward of the evaluation (None: skip it)"""

    # bookkeeping
    seed: int = 1
    """random seed (data order; rank r samples the evaluation with its own seed, as ppo.py)"""
    run_name: str | None = None
    """TensorBoard run dir under runs/ (None: dpo__{seed}__{unix time})"""

    # checkpoints
    checkpoint_every: int = 200
    """optimiser steps between checkpoints (model, optimiser, step, RNG states; the data position follows from
    the step); 0: only the final one. SIGTERM (preemption) also writes one, then exits with status 143"""


# ----------------------------------------------------------------------------------------------
# ALGO LOGIC: the equations, one function each
# ----------------------------------------------------------------------------------------------
def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: torch.Tensor | None = None):
    """loss = mean( -log sigmoid(r_chosen - r_rejected - margin) )

    Bradley-Terry: P(chosen > rejected) = sigmoid(r_chosen - r_rejected) (Christiano et al. 2017, Ouyang
    et al. 2022); this is its negative log-likelihood. The optional margin asks for a larger gap on pairs
    the labellers found clearly different (Llama 2, Touvron et al. 2023). Shapes: (B,).
    """
    logits = r_chosen - r_rejected
    if margin is not None:
        logits = logits - margin
    return -F.logsigmoid(logits).mean()


def implicit_reward(logps: torch.Tensor, ref_logps: torch.Tensor, beta: float) -> torch.Tensor:
    """r(x, y) = beta * (log pi(y|x) - log pi_ref(y|x)), the reward under which pi is the optimum of max E[r] - beta
    KL(pi || pi_ref), up to beta log Z(x), which a pair with one prompt cancels (Rafailov et al. 2023, Eq. 5). DPO is
    bradley_terry_loss on it (Eq. 7). Shapes: (B,)"""
    return beta * (logps - ref_logps)


def ipo_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, beta: float) -> torch.Tensor:
    """loss = mean( (h - 1/(2 beta))^2 ),  h = (r_chosen - r_rejected) / beta
                                            = log [pi(y_w) pi_ref(y_l) / (pi(y_l) pi_ref(y_w))]

    IPO (Azar et al. 2023, Eq. 17) pulls the log-ratio gap to 1/(2 beta), where DPO pushes it on to infinity when
    the preferences are deterministic. On summed log-probabilities, as Huang et al. 2024's dpo.py. Shapes: (B,).
    """
    h = (r_chosen - r_rejected) / beta
    return ((h - 1.0 / (2.0 * beta)) ** 2).mean()


def learning_rate_at(step: int, total_steps: int, args: Args) -> float:
    """The learning rate after `step` completed steps: linear warm-up, then decay to 0 (Huang et al. 2024: cosine).

    lr(s) = lr * (s + 1) / warmup                  for s < warmup
    lr(s) = lr * 0.5 * (1 + cos(pi * p))           cosine,   p = min(1, (s - warmup) / max(1, total_steps - warmup))
    lr(s) = lr * (1 - p)                           linear
    lr(s) = lr                                     constant
    """
    if step < args.warmup_steps:
        return args.learning_rate * (step + 1) / args.warmup_steps
    # capped at 1: a step past total_steps keeps the last rate (0 for cosine and linear), as sft.py's schedule does
    progress = min(1.0, (step - args.warmup_steps) / max(1, total_steps - args.warmup_steps))
    if args.lr_schedule == "cosine":
        return args.learning_rate * 0.5 * (1.0 + math.cos(math.pi * progress))
    if args.lr_schedule == "linear":
        return args.learning_rate * (1.0 - progress)
    return args.learning_rate


# ----------------------------------------------------------------------------------------------
# The model and data helpers the algorithm uses
# ----------------------------------------------------------------------------------------------
def position_ids_from(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted from the first real token, so left padding never shifts a sequence. TRL and OpenRLHF
    pass them; Huang et al. 2024's released code passes none, which a rotary model such as Pythia barely feels
    but a model with learned absolute positions (GPT-2) does (tests/test_ppo_equations.py)."""
    return (attention_mask.long().cumsum(1) - 1).clamp(min=0)


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[token] = logit[token] - logsumexp(logits); (B, T, V), (B, T) -> (B, T)"""
    return logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)


def sequence_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_mask: torch.Tensor,
                      temperature: float) -> torch.Tensor:
    """log pi(y|x) = sum_t log pi(y_t | x, y<t) over the completion's tokens (completion_mask), the logits divided
    by the temperature. (N, T) -> (N,)

    The last token predicts nothing, so it is not fed; the logits at position t - 1 give token t's probability, and
    `logits_to_keep` computes the LM head only from the batch's first completion token on (long prompts: HH, TL;DR).
    """
    first = int(completion_mask.int().argmax(1).min())  # the batch's first completion token
    out = model(input_ids=input_ids[:, :-1], attention_mask=attention_mask[:, :-1], use_cache=False,
                position_ids=position_ids_from(attention_mask[:, :-1]), logits_to_keep=input_ids.shape[1] - first)
    logprobs = logprobs_from_logits(out.logits.float() / temperature, input_ids[:, first:])  # (N, T - first)
    return (logprobs * completion_mask[:, first:]).sum(1)


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks (a no-op on one process)."""
    if dist.is_initialized():
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def completion_mask(pairs: dict, indices: list[int], index: torch.Tensor, attention_mask: torch.Tensor):
    """True at the completion tokens of each row of pair_batch's batch (EOS included), False at its prompt and its
    padding. Row index[k] holds the k-th of the chosen, then rejected, sequences. -> (N, T) bool"""
    starts = [pairs["chosen_start"][i] for i in indices] + [pairs["rejected_start"][i] for i in indices]
    start = torch.zeros(attention_mask.shape[0], dtype=torch.long, device=attention_mask.device)
    start[index] = torch.tensor(starts, device=attention_mask.device)
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (positions[None, :] >= start[:, None]) & attention_mask.bool()


@torch.no_grad()
def precomputed_reference_logprobs(ref_policy, pairs: dict, batch_size: int, pad_id: int, temperature: float, d: Dist):
    """log pi_ref(y|x) of every pair's chosen and rejected, once: (n, 2) on every rank, each rank's shard gathered by
    one all-reduce of the zero-filled table."""
    table = torch.zeros(len(pairs["chosen_ids"]), 2, device=d.device)
    indices, is_real = shard(len(pairs["chosen_ids"]), d.rank, d.world_size)
    with unsharded(ref_policy):
        for start in tqdm(range(0, len(indices), batch_size), desc="reference log-probs", disable=not d.is_main):
            idx = indices[start : start + batch_size]
            real = torch.tensor(is_real[start : start + batch_size], device=d.device)  # (b,) False for a repeat
            input_ids, attention_mask, index, _ = pair_batch(pairs, idx, pad_id, d.device)
            mask = completion_mask(pairs, idx, index, attention_mask)
            logps = sequence_logprobs(ref_policy, input_ids, attention_mask, mask, temperature)[index]  # (2b,)
            rows = torch.stack([logps[: len(idx)], logps[len(idx):]], 1) * real[:, None]  # (b, 2)
            table.index_add_(0, torch.tensor(idx, device=d.device), rows)
    return all_reduce_sum(table)


# ----------------------------------------------------------------------------------------------
# main: train the policy on the preference pairs, then evaluate it as ppo.py evaluates PPO's
# ----------------------------------------------------------------------------------------------
def main(args: Args) -> dict:
    """Train the policy on the preference pairs with DPO's loss on its implicit reward (or IPO's), then evaluate it on
    held-out prompts as ppo.py does."""
    # TRY NOT TO MODIFY: checks, processes, sizes, output dirs, data; the models; resume or the SFT baseline; logging
    start_time = time.time()
    setup = set_up(args)
    models = build_models(args, setup)
    progress, writer = start_or_resume(args, setup, models)
    policy, ref_policy, optimizer = models.policy, models.ref_policy, models.optimizer
    d, train, pad_id = setup.d, setup.train, setup.tokenizer.pad_token_id

    # ALGO LOGIC: the order of the pairs: train_rm.py's, so that with the same seed DPO sees the RM's batches. Pairs
    # that share a prompt go through training together, in one batch (Ouyang et al. 2022, Sec. 3.5).
    n_train = len(train["chosen_ids"])
    prompt_groups = pairs_by_prompt(train["prompt"]) if args.group_by_prompt else [[i] for i in range(n_train)]
    batches = pair_batches(prompt_groups, train, setup.steps_per_epoch, args)  # every rank: the same global batches
    for _ in range(progress.start_step):  # the data position: replay the shuffles up to the checkpoint
        next(batches)

    # ALGO LOGIC: the reference's log-probabilities. On the fly by default: one no-grad forward of the frozen SFT
    # policy per step, on the batch the policy reads anyway; exact, and nothing to keep or gather. Precomputed: the
    # same forwards once, before training; cheaper from the second epoch on (results/README.md measures both)
    ref_table = None
    if args.precompute_ref_log_probs:
        ref_table = precomputed_reference_logprobs(ref_policy, train, args.eval_batch_size, pad_id, args.temperature, d)

    # ALGO LOGIC: training, one optimiser step per global batch
    signals = catch_signals()
    bar = tqdm(total=setup.total_steps, initial=progress.start_step, desc="dpo", disable=not d.is_main)
    t_train = time.time()
    for step in range(progress.start_step + 1, setup.total_steps + 1):
        lr = learning_rate_at(step - 1, setup.total_steps, args)  # the rate after step - 1 completed steps
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = next(batches)
        local = batch[d.rank * setup.pairs_per_rank : (d.rank + 1) * setup.pairs_per_rank]  # this rank's share
        sums = torch.zeros(6, dtype=torch.float64, device=d.device)  # this rank's sums of the logged statistics
        for micro_start in range(0, setup.pairs_per_rank, setup.micro_batch_size):  # gradient accumulation
            idx = local[micro_start : micro_start + setup.micro_batch_size]
            input_ids, attention_mask, index, margin = pair_batch(train, idx, pad_id, d.device)  # (N <= 2b, T)
            mask = completion_mask(train, idx, index, attention_mask)  # log pi(y|x): the completion's tokens only
            logps = sequence_logprobs(policy, input_ids, attention_mask, mask, args.temperature)[index]  # (2b,)
            if ref_table is None:  # the frozen reference on the same batch
                with torch.no_grad():
                    ref_logps = sequence_logprobs(ref_policy, input_ids, attention_mask, mask, args.temperature)[index]
            else:
                ref_logps = torch.cat([ref_table[idx, 0], ref_table[idx, 1]])  # (2b,)
            r_chosen = implicit_reward(logps[: len(idx)], ref_logps[: len(idx)], args.beta)  # (b,) each
            r_rejected = implicit_reward(logps[len(idx):], ref_logps[len(idx):], args.beta)
            if args.loss_type == "sigmoid":  # DPO: the RM's loss, on the implicit reward (Rafailov et al. 2023, Eq. 7)
                loss = bradley_terry_loss(r_chosen, r_rejected, margin)
            else:
                loss = ipo_loss(r_chosen, r_rejected, args.beta)
            (loss / setup.gradient_accumulation_steps).backward()  # the gradient of the mean over the rank's share
            sums += torch.stack([loss * len(idx), (r_chosen > r_rejected).sum(), r_chosen.sum(), r_rejected.sum(),
                                 logps[: len(idx)].sum(), logps[len(idx):].sum()]).detach().double()
        # the sums over all ranks; the signal flag rides along: if any rank was signalled, every rank checkpoints here
        loss_sum, correct, chosen_sum, rejected_sum, logps_chosen, logps_rejected, stop = all_reduce_sum(
            torch.cat([sums, sums.new_tensor([signals["stop"]])])).tolist()
        count = args.batch_size  # pairs in the step, over all ranks
        grad_norm = clip_grad_norm_or_stop(models, args, setup, step, {"loss": loss_sum / count})
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        # TRY NOT TO MODIFY: logging (TRL's DPO names), evaluation and checkpoints
        metrics = {
            "loss": loss_sum / count,
            "rewards/chosen": chosen_sum / count,  # mean beta * log pi(y_w)/pi_ref(y_w)
            "rewards/rejected": rejected_sum / count,
            "rewards/accuracies": correct / count,  # the fraction of pairs with r_chosen > r_rejected
            "rewards/margins": (chosen_sum - rejected_sum) / count,
            "logps/chosen": logps_chosen / count,  # mean log pi(y_w|x), summed over tokens
            "logps/rejected": logps_rejected / count,
        }
        log_step(metrics, lr, grad_norm, step, args, setup, writer, bar, t_train)
        eval_every = args.eval_every or setup.steps_per_epoch  # 0: at the end of each epoch
        if step % eval_every == 0 or step == setup.total_steps:
            run_eval(step, args, setup, models, progress, writer)
        save_or_stop(step, stop, signals, args, setup, models, progress)
    bar.close()
    progress.train_time = time.time() - t_train

    # TRY NOT TO MODIFY: save (atomic; a failed run has raised before this point) and report
    return final_report(args, setup, models, progress, writer, start_time)


# ----------------------------------------------------------------------------------------------
# TRY NOT TO MODIFY: everything below is plumbing that main() calls in one line each: the run's setup and
# checks (the data: common.load_preference_split; the held-out prompts: common.load_prompts, as ppo.py), model
# building, resume and checkpoints, logging, evaluation (ppo.evaluate) and the final report, the command line.
# ----------------------------------------------------------------------------------------------
@dataclass
class Setup:
    """What main() sets up once (set_up), all checked before any model is loaded."""
    d: Dist
    pairs_per_rank: int  # pairs per optimiser step on this rank
    micro_batch_size: int  # pairs per forward on this rank
    gradient_accumulation_steps: int  # forwards per optimiser step on this rank
    steps_per_epoch: int
    total_steps: int
    checkpoint_dir: str
    run_name: str  # TensorBoard: runs/{run_name}
    bayes_ceiling: float | None
    tokenizer: object
    train: dict  # load_preference_split's chosen_ids, rejected_ids, prompt, margin; + chosen_start, rejected_start
    val: dict | None
    evaluation: ppo.Args  # the evaluation's settings under ppo.py's names (ppo_evaluation)
    gold_fn: object  # module:function(prompts, completions) -> scores, or None
    chat: bool  # the held-out prompts are rendered with the chat template
    stop_ids: list[int]  # an evaluation response ends at any of these (EOS, a chat template's end-of-turn token)
    eval_texts: list[str]  # this rank's share of the held-out prompts
    eval_ids: list[list[int]]


@dataclass
class Progress:
    """What a checkpoint carries beyond the weights, the optimiser and the RNG states."""
    start_step: int
    run_name: str
    val_metrics: dict | None  # the last preference evaluation
    history: list  # every evaluation: its step, preference metrics and held-out metrics
    sft_metrics: dict | None  # the SFT policy's held-out evaluation: the baseline of the win rate
    sft_golds: list | None  # this rank's per-prompt gold scores of it
    eval_metrics: dict | None  # the last held-out evaluation
    eval_golds: list | None
    train_time: float = 0.0


@dataclass
class Models:
    """The policy, its frozen reference, the RM that scores the evaluation and what trains the policy."""
    policy: torch.nn.Module
    ref_policy: torch.nn.Module
    reward: ppo.Reward | None  # None without a held-out evaluation (--eval_samples 0)
    optimizer: torch.optim.Optimizer


def check_args(args: Args) -> None:
    """Every numeric flag in range, and the flags that exclude each other, before anything loads."""
    check_flags(args, at_least_1=("max_length", "num_train_pairs", "num_eval_pairs", "num_train_epochs", "batch_size",
                                  "micro_batch_size", "eval_batch_size", "log_every", "max_prompt_length",
                                  "response_length", "generation_batch_size"),
                positive=("learning_rate", "adam_eps", "beta", "temperature"),
                non_negative=("weight_decay", "warmup_steps", "max_grad_norm", "eval_every", "checkpoint_every",
                              "max_dropped_fraction", "eval_samples", "eval_temperature"))
    if args.loss_type == "ipo" and args.margin_column is not None:
        raise SystemExit("--margin_column shifts DPO's sigmoid loss; IPO has none: drop it, or use --loss_type sigmoid")


def ppo_evaluation(args: Args) -> ppo.Args:
    """The held-out evaluation's settings under ppo.py's flag names: ppo.py's own code reads the prompts, loads the
    RM and evaluates, so that DPO's numbers are measured as PPO's are, on purpose (same prompts, sampling, exact KL).
    ppo.Args's other fields keep their defaults and are not read."""
    marker = args.implicit_prompt_marker if args.dataset_format == "implicit_prompt" else None  # HH: cut as the pairs
    return ppo.Args(sft_model=args.model_name_or_path, reward_model=[args.reward_model], dtype=args.dtype,
                    add_pad_token=args.add_pad_token, dataset=args.prompt_dataset, implicit_prompt_marker=marker,
                    prompt_column=args.prompt_dataset_column,
                    prompt_format="chat" if args.dataset_format == "conversational" else "auto",
                    train_split=args.prompt_dataset_split, eval_split=args.prompt_dataset_split,
                    max_prompt_length=args.max_prompt_length, truncate_long_prompts=args.truncate_long_prompts,
                    max_dropped_fraction=args.max_dropped_fraction, response_length=args.response_length,
                    temperature=args.temperature, eval_temperature=args.eval_temperature,
                    eval_batch_size=args.generation_batch_size, local_rollout_forward_batch_size=args.eval_batch_size,
                    eval_samples=args.eval_samples, gold_reward_fn=args.gold_reward_fn)


def completion_starts(pairs: dict, tokenizer, add_special_tokens: bool) -> None:
    """Where each chosen and rejected completion starts: after the tokens its sequence shares with its prompt tokenized
    alone (a token merged across the boundary belongs to the completion). Adds chosen_start and rejected_start."""
    prompts = list(dict.fromkeys(pairs["prompt"]))
    prompt_ids = dict(zip(prompts, tokenizer(prompts, add_special_tokens=add_special_tokens)["input_ids"]))
    for side in ("chosen", "rejected"):  # commonprefix: the longest shared head of two lists of token ids
        sequences = pairs[f"{side}_ids"]
        shared = [len(os.path.commonprefix([prompt_ids[p], ids])) for p, ids in zip(pairs["prompt"], sequences)]
        # at least 1 (the first token predicts nothing) and at most len - 1 (the EOS is always the completion's)
        pairs[f"{side}_start"] = [min(max(k, 1), len(ids) - 1) for k, ids in zip(shared, sequences)]


def set_up(args: Args) -> Setup:
    """Check every flag, start the processes, derive the sizes, check the models and the output dirs, read and
    tokenize the pairs and the held-out prompts: everything that can fail, before any model is loaded."""
    check_args(args)
    d = setup_distributed()
    pairs_per_rank = args.batch_size // d.world_size  # pairs per optimiser step on this rank
    micro_batch_size = min(args.micro_batch_size, pairs_per_rank)  # pairs per forward on this rank
    if args.batch_size % d.world_size or pairs_per_rank % micro_batch_size:
        raise SystemExit(f"--batch_size {args.batch_size} must be divisible by the {d.world_size} processes x "
                         f"--micro_batch_size {args.micro_batch_size}")
    gradient_accumulation_steps = pairs_per_rank // micro_batch_size  # forwards per optimiser step on this rank
    checkpoint_dir = args.checkpoint_dir or args.output_dir.rstrip("/") + "_checkpoints"
    check_model_dir(args.model_name_or_path, "model")
    evaluation, gold_fn = ppo_evaluation(args), None
    if args.eval_samples:
        check_path(args.prompt_dataset, "--prompt_dataset")
        check_model_dir(args.reward_model, "reward model", tokenizer=False, reward_model=True)
        gold_fn = load_fn(args.gold_reward_fn, "--gold_reward_fn")
    inputs = {"model": args.model_name_or_path, "reward model": args.reward_model, "dataset": args.dataset,
              "prompt dataset": args.prompt_dataset, "Bayes ceiling file": args.bayes_ceiling_file}
    prepare_output(args.output_dir, checkpoint_dir, "dpo", inputs, args.resume, args.overwrite, args_json(args),
                   d.world_size)
    bayes_ceiling = load_bayes_ceiling(args.bayes_ceiling_file, args.dataset)

    tokenizer = load_tokenizer(args.model_name_or_path, padding_side="right", add_pad_token=args.add_pad_token)
    dataset = load_dataset(args.dataset)
    train = load_preference_split(args, dataset, args.train_split, tokenizer, args.num_train_pairs)
    val = (load_preference_split(args, dataset, args.eval_split, tokenizer, args.num_eval_pairs)
           if args.eval_split else None)
    for pairs in (train, val) if val else (train,):  # log pi(y|x) counts the completion's tokens only
        completion_starts(pairs, tokenizer, add_special_tokens=args.dataset_format != "conversational")
    # the held-out prompts, read and cut to length by ppo.py's rules; each rank takes its share, as ppo.py
    chat, stop_ids, eval_texts, eval_ids = False, [tokenizer.eos_token_id], [], []
    if args.eval_samples:
        prompts, chat = load_prompts(evaluation, tokenizer, args.model_name_or_path)
        texts, ids = (x[: args.eval_samples] for x in prompts[args.prompt_dataset_split])
        eval_texts, eval_ids = texts[d.rank :: d.world_size], ids[d.rank :: d.world_size]
        stop_ids = stop_token_ids(evaluation, tokenizer, chat)

    n_train = len(train["chosen_ids"])
    steps_per_epoch = n_train // args.batch_size  # the last partial batch is dropped: equal shards on every rank
    if steps_per_epoch == 0:
        raise SystemExit(f"only {n_train} training pairs, fewer than one --batch_size {args.batch_size}")
    total_steps = steps_per_epoch * args.num_train_epochs
    print0(f"{n_train} training pairs, {len(val['chosen_ids']) if val else 0} validation pairs; "
           f"{total_steps} steps of {args.batch_size} pairs ({d.world_size} processes x {gradient_accumulation_steps} "
           f"x {micro_batch_size}); {args.loss_type} loss, beta {args.beta}")
    run_name = args.run_name or f"dpo__{args.seed}__{int(time.time())}"
    return Setup(d, pairs_per_rank, micro_batch_size, gradient_accumulation_steps, steps_per_epoch, total_steps,
                 checkpoint_dir, run_name, bayes_ceiling, tokenizer, train, val, evaluation, gold_fn, chat, stop_ids,
                 eval_texts, eval_ids)


def build_models(args: Args, setup: Setup) -> Models:
    """The policy and the frozen reference, both the SFT checkpoint (no dropout: common.load_causal_lm), sharded with
    FSDP2 under torchrun; the policy's AdamW (eps 1e-5, Huang et al. 2024); the frozen RM of the evaluation, loaded
    and normalised with its stored statistics by ppo.py's load_reward."""
    device = setup.d.device
    policy = fsdp_wrap(load_causal_lm(args.model_name_or_path, setup.tokenizer, args.dtype), device)
    ref_policy = load_frozen(load_causal_lm, args.model_name_or_path, setup.tokenizer, args.dtype, "same")
    ref_policy = shard_frozen(ref_policy, "same", device)
    reward = None
    if args.eval_samples:
        reward, rm_tokenizer, same_tokenizer = ppo.load_reward(setup.evaluation, setup)
        reward.models = [shard_frozen(m, "same", device) for m in reward.models]
        # an RM with its own vocabulary reads re-tokenised text that ends in its own end token (as in ppo.py)
        rm_end_id = ((end_of_turn_tokens(rm_tokenizer) if setup.chat else []) or [rm_tokenizer.eos_token_id])[0]
        reward.retokenize = None if same_tokenizer else (rm_tokenizer, rm_end_id)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.learning_rate, eps=args.adam_eps,
                                  weight_decay=args.weight_decay)
    return Models(policy, ref_policy, reward, optimizer)


def start_or_resume(args: Args, setup: Setup, models: Models) -> tuple[Progress, object]:
    """--resume: policy, optimiser, step, evaluations and RNG states as they were after the checkpoint's step;
    otherwise the SFT policy's held-out evaluation, the win rate's baseline. Then rank 0's TensorBoard writer."""
    progress, resumed = Progress(0, setup.run_name, None, [], None, None, None, None), False
    if args.resume:
        latest = latest_checkpoint(setup.checkpoint_dir)
        state = load_checkpoint(latest, models.policy, models.optimizer)
        progress = Progress(state["step"], *(state[k] for k in ("run_name", "val_metrics", "history", "sft_metrics",
                                                                "sft_golds", "eval_metrics", "eval_golds")))
        resumed = True
        print0(f"resumed from {latest} (step {progress.start_step} of {setup.total_steps})")
    writer = tensorboard_writer(setup.d.is_main, progress.run_name, asdict(args),
                                progress.start_step if resumed else None)  # rank 0's
    if not resumed:  # at step 0 the policy is the reference: the SFT policy's numbers
        run_eval(0, args, setup, models, progress, writer)
        progress.sft_metrics, progress.sft_golds = progress.eval_metrics, progress.eval_golds
    return progress, writer


def save_or_stop(step: int, stop: float, signals: dict, args: Args, setup: Setup, models: Models,
                 progress: Progress) -> None:
    """A checkpoint every --checkpoint_every steps, at the end, and when a signal came (model, optimiser, step and
    RNG states; the data position follows from the step); then, for a signal, exit."""
    if (args.checkpoint_every and step % args.checkpoint_every == 0) or step == setup.total_steps or stop:
        state = {"step": step, "args": args_json(args), **{k: v for k, v in asdict(progress).items() if k not in
                                                          ("start_step", "train_time")}}
        path = save_checkpoint(setup.checkpoint_dir, step, models.policy, models.optimizer, state, "dpo")
        if stop:
            exit_preempted(path, f"step {step}", signals["signal"])


# ----------------------------------------------------------------------------------------------
# Logging, evaluation and the final report
# ----------------------------------------------------------------------------------------------
def log_step(metrics: dict, lr: float, grad_norm: float, step: int, args: Args, setup: Setup, writer, bar,
             t_train: float) -> None:
    """The progress bar every step; TensorBoard every --log_every steps and at the last one (TRL's DPO names)."""
    bar.update(1)
    bar.set_postfix(loss=f"{metrics['loss']:.3f}", acc=f"{metrics['rewards/accuracies']:.3f}",
                    margin=f"{metrics['rewards/margins']:.3f}")
    if writer is not None and (step % args.log_every == 0 or step == setup.total_steps):
        for name, value in metrics.items():
            writer.add_scalar(name, value, step)
        writer.add_scalar("lr", lr, step)
        writer.add_scalar("grad_norm", grad_norm, step)
        writer.add_scalar("charts/pairs_per_second", step * args.batch_size / (time.time() - t_train), step)


@torch.no_grad()
def preference_accuracy(models: Models, pairs: dict, args: Args, setup: Setup) -> dict:
    """The implicit reward on the held-out pairs: accuracy (r_chosen > r_rejected), loss, mean rewards, over ranks."""
    d, pad_id = setup.d, setup.tokenizer.pad_token_id
    indices, is_real = shard(len(pairs["chosen_ids"]), d.rank, d.world_size)
    sums = torch.zeros(5, dtype=torch.float64, device=d.device)  # correct, loss, r_chosen, r_rejected, count
    with unsharded(models.policy), unsharded(models.ref_policy):
        for start in range(0, len(indices), args.eval_batch_size):
            idx = indices[start : start + args.eval_batch_size]
            real = torch.tensor(is_real[start : start + args.eval_batch_size], device=d.device)  # (B,)
            input_ids, attention_mask, index, margin = pair_batch(pairs, idx, pad_id, d.device)
            mask = completion_mask(pairs, idx, index, attention_mask)
            logps, ref_logps = (sequence_logprobs(m, input_ids, attention_mask, mask, args.temperature)[index]
                                for m in (models.policy, models.ref_policy))
            r_chosen = implicit_reward(logps[: len(idx)], ref_logps[: len(idx)], args.beta)[real]
            r_rejected = implicit_reward(logps[len(idx):], ref_logps[len(idx):], args.beta)[real]
            loss = (bradley_terry_loss(r_chosen, r_rejected, margin[real] if margin is not None else None)
                    if args.loss_type == "sigmoid" else ipo_loss(r_chosen, r_rejected, args.beta))
            sums += torch.stack([(r_chosen > r_rejected).sum(), loss * len(r_chosen), r_chosen.sum(),
                                 r_rejected.sum(), real.sum()]).double()
    correct, loss, chosen, rejected, count = all_reduce_sum(sums).tolist()
    return {"rewards/accuracies": correct / count, "loss": loss / count, "rewards/chosen": chosen / count,
            "rewards/rejected": rejected / count, "rewards/margins": (chosen - rejected) / count}


def run_eval(step: int, args: Args, setup: Setup, models: Models, progress: Progress, writer) -> None:
    """The implicit reward's preference accuracy on the validation pairs (after step 0, where every implicit reward
    is 0), and ppo.py's held-out evaluation of the policy (ppo.evaluate: gold score, RM score, exact KL to the SFT
    policy, length, EOS rate) from ppo.py's fixed evaluation seed, so that the SFT baseline's samples are PPO's."""
    entry, device = {"step": step}, setup.d.device
    if setup.val is not None and step > 0:
        progress.val_metrics = preference_accuracy(models, setup.val, args, setup)
        entry.update({f"eval/{k}": v for k, v in progress.val_metrics.items()})
    if models.reward is not None:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(args.seed + 1_000_003 + setup.d.rank)  # ppo.py's run_eval: the same draws
            progress.eval_metrics, progress.eval_golds, rows = ppo.evaluate(
                setup.evaluation, models.policy, models.ref_policy, models.reward, setup.tokenizer, setup.eval_texts,
                setup.eval_ids, setup.gold_fn, device, setup.stop_ids)
        entry.update({f"eval/{k}": v for k, v in progress.eval_metrics.items()})
        if writer is not None:
            writer.add_text("eval/samples", markdown_table(rows, ["prompt", "response", "rm score", "gold"]), step)
    progress.history.append(entry)
    if writer is not None:
        for name, value in entry.items():
            if name != "step":
                writer.add_scalar(name, value, step)
    if setup.d.is_main and len(entry) > 1:
        tqdm.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in entry.items() if k != "step"))


def final_report(args: Args, setup: Setup, models: Models, progress: Progress, writer, start_time: float) -> dict:
    """Save the policy (atomically, with eval_results.json beside it in ppo.py's layout: "sft" and "dpo" on the same
    held-out prompts, the gold win rate, the final KL), print the summary and return the results."""
    d, val, sft, final = setup.d, progress.val_metrics, progress.sft_metrics, progress.eval_metrics
    results = {"sft": sft, "dpo": final, "final_kl": final["kl"] if final else None,
               "num_eval_prompts": int(all_reduce_sum(torch.tensor([len(setup.eval_ids)], device=d.device)).item()),
               "val_accuracy": val["rewards/accuracies"] if val else None, "val_loss": val["loss"] if val else None,
               "bayes_ceiling": setup.bayes_ceiling, "history": progress.history, "steps": setup.total_steps,
               "train_pairs": len(setup.train["chosen_ids"]), "train_time_s": progress.train_time}
    if setup.gold_fn is not None and final is not None:  # wins over the SFT policy's responses to the same prompts
        wins, count = all_reduce_sum(torch.tensor([gold_wins(progress.eval_golds, progress.sft_golds),
                                                   len(progress.sft_golds)], dtype=torch.float64, device=d.device))
        results["gold_win_rate"] = (wins / count).item()
    results.update(wall_time_s=time.time() - start_time, args=asdict(args))
    save_model(models.policy, setup.tokenizer, args.output_dir, "dpo", results=results)
    if writer is not None:
        for name, value in results.items():
            if isinstance(value, float):
                writer.add_scalar(f"final/{name}", value, setup.total_steps)
        writer.close()
    if final:
        print0(f"\n{'held-out (' + str(results['num_eval_prompts']) + ' prompts)':<28}{'SFT':>10}{'DPO':>10}")
        for name in [k for k in ("rm_score", "gold_score", "kl", "response_length", "eos_rate") if k in final]:
            print0(f"{name:<28}{sft[name]:>10.3f}{final[name]:>10.3f}")
    win = f"gold win rate vs SFT {results['gold_win_rate']:.3f} | " if "gold_win_rate" in results else ""
    accuracy = f"implicit reward's val accuracy {val['rewards/accuracies']:.4f} | " if val else ""
    print0(f"{win}{accuracy}Bayes ceiling {setup.bayes_ceiling} | {results['wall_time_s']:.0f} s | saved "
           f"{args.output_dir}")
    teardown_distributed()
    return results


def parse_args(argv=None) -> Args:
    """Args from the command line: a preset's name (presets.py; none: the toy task), then flags over it."""
    return parse_args_with_presets(Args, presets.DPO, argv)


if __name__ == "__main__":
    run(main, parse_args)
