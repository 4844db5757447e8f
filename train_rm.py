"""Stage 2 of RLHF: a scalar reward model trained on pairwise preferences (Bradley-Terry).

    python train_rm.py                          # toy task: models/sft -> models/rm, ~1.5 minutes on 2 CPU cores
    torchrun --nproc_per_node=2 train_rm.py     # the same with FSDP2 on 2 processes
    python train_rm.py pythia-tldr              # Huang et al. 2024's TL;DR reward model (GPUs)
    python train_rm.py --help                   # every flag

The model is the SFT checkpoint with its LM head swapped for a fresh scalar head
(`AutoModelForSequenceClassification`, `num_labels=1`). It reads `prompt + completion + EOS` and its
reward is the head's output at the last real token (the EOS). The loss is Bradley-Terry:
`-log sigmoid(r(x, y_chosen) - r(x, y_rejected))` (Christiano et al. 2017; Ouyang et al. 2022).

After training, the reward is normalised on samples of the SFT policy, as Ziegler et al. 2019 normalise on
samples of the initial policy (Huang et al. 2024 instead shift it on the dataset's reference summaries), and
the statistics are stored in the saved config; see "THE NORMALISATION CONTRACT" below.

The file reads top to bottom: `Args`; the equations (ALGO LOGIC: one small function each); the model and data
helpers they use; `main()`, the method itself; then, under TRY NOT TO MODIFY, the plumbing that main() calls in
one line each (checks, model building, resume and checkpoints, logging, evaluation, the report) and the command
line. Reading the preference data (prompt/chosen/rejected columns, whole dialogues, chat messages) into token ids
is common.py's (load_preference_split, which a DPO script calls the same way), as are the presets' (presets.py).

Implementation details, each marked by a comment where it happens:
- `pad_token_id` in the model config, a pad token distinct from EOS (common.load_reward_model);
- EOS appended to every text, the reward read at the last non-pad token, for left and right padding;
- position ids counted from the first real token, so padding never shifts a sequence;
- chosen and rejected scored in one concatenated forward;
- the pairs that share a prompt kept in one batch, each distinct completion scored once (Ouyang et al. 2022);
- the scalar head initialised with std 1/sqrt(d_model + 1) (Ziegler et al. 2019's lm-human-preferences code,
  which Huang et al. 2024 follow);
- no dropout (common.disable_dropout);
- the reward bias (and optional gain) computed after training and stored in the config, not in a head bias,
  which loading drops (TRL #1783).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import presets
from common import (
    Dist,
    ResumeFlags,
    args_json,
    catch_signals,
    check_flags,
    check_model_dir,
    check_same_tokenizer,
    end_of_turn_tokens,
    exit_preempted,
    fit_prompts,
    fsdp_wrap,
    group_by_length,
    latest_checkpoint,
    load_bayes_ceiling,
    load_causal_lm,
    load_checkpoint,
    load_dataset,
    load_normalisation_prompts,
    load_preference_split,
    load_reward_model,
    load_tokenizer,
    prepare_output,
    parse_args_with_presets,
    print0,
    prompt_head,
    run,
    save_checkpoint,
    save_model,
    seed_everything,
    setup_distributed,
    teardown_distributed,
    tensorboard_writer,
)


# ----------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------
@dataclass
class Args(ResumeFlags):  # + --checkpoint_dir, --resume, --overwrite
    # data
    dataset: str = "toy_data/prefs"
    """preference dataset: a hub name or a local dir that `datasets.load_dataset` reads"""
    dataset_format: Literal["standard", "implicit_prompt", "conversational"] = "standard"
    """standard: prompt/chosen/rejected texts; implicit_prompt: whole dialogues sharing a prompt (Anthropic HH);
    conversational: lists of {role, content} messages, rendered with the chat template"""
    train_split: str = "train"
    """split to train on"""
    eval_split: str | None = "validation"
    """split to report accuracy on (None: no evaluation)"""
    prompt_column: str = "prompt"
    """column with the prompt (standard; conversational with an explicit prompt)"""
    chosen_column: str = "chosen"
    """column with the preferred completion"""
    rejected_column: str = "rejected"
    """column with the other completion"""
    margin_column: str | None = None
    """optional column with a per-pair margin m: loss -log sigmoid(r_c - r_r - m) (Touvron et al. 2023)"""
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
    """evaluate on this many pairs (None: all)"""
    bootstrap: bool = False
    """train on a bootstrap resample of the training pairs: as many pairs, drawn with replacement, seeded by --seed.
    With different seeds, members of an RM ensemble (ppo.py --reward_model A B C) that differ in data and in init"""
    bayes_ceiling_file: str | None = None
    """JSON with "bayes_accuracy" to compare with (None: {dataset}/bayes_ceiling.json if it exists)"""

    # model
    model_name_or_path: str = "models/sft"
    """the SFT checkpoint the reward model starts from (its LM head is replaced by a fresh scalar head)"""
    add_pad_token: bool = False
    """add a distinct '[PAD]' token when the tokenizer has none or pads with EOS (a base model, not an SFT output)"""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """parameter dtype (FSDP2 computes in bf16 on GPU anyway; keep float32 master weights)"""
    output_dir: str = "models/rm"
    """where the reward model is saved (HF dir, with reward_mean / reward_std in its config)"""

    # optimisation
    learning_rate: float = 1e-3
    """AdamW learning rate (high for the tiny toy model: 3e-4 and 3e-3 both learned slower)"""
    adam_eps: float = 1e-5
    """AdamW epsilon (Huang et al. 2024)"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """learning-rate decay to 0 over training (Huang et al. 2024: cosine)"""
    warmup_steps: int = 0
    """linear warm-up steps"""
    num_train_epochs: int = 1
    """passes over the training pairs (Huang et al. 2024 and Ouyang et al. 2022: 1; the RM overfits fast)"""
    batch_size: int = 128
    """pairs per optimiser step, over all processes (toy: ~21 prompts' 6 pairs each)"""
    micro_batch_size: int = 128
    """pairs per forward on one process (a forward holds up to twice as many sequences); the gradient accumulation
    follows: batch_size / (processes x micro_batch_size) forwards per optimiser step"""
    eval_batch_size: int = 128
    """pairs per evaluation forward on one process"""
    max_grad_norm: float = 1.0
    """gradient clipping"""
    group_by_length: bool = True
    """batch pairs of similar length together, so that batches carry less padding (faster)"""
    group_by_prompt: bool = True
    """keep the pairs that share a prompt in one batch, where each distinct completion is scored once
    (Ouyang et al. 2022); off: every pair shuffled on its own"""
    eval_every: int = 0
    """optimiser steps between validation evaluations (0: at the end of each epoch; there is always one at the end)"""
    log_every: int = 10
    """optimiser steps between TensorBoard points"""

    # reward normalisation
    normalize: bool = True
    """after training, store reward_mean so that SFT-policy samples score 0 on average (Ziegler et al. 2019)"""
    normalize_std: bool = False
    """also store reward_std so that SFT-policy samples have std 1 (Ziegler et al. 2019)"""
    sft_model_for_normalisation: str | None = None
    """the policy that samples the normalisation responses (None: model_name_or_path)"""
    prompt_dataset: str | None = None
    """prompts for normalisation (None: the prompts of the preference train split)"""
    prompt_dataset_split: str = "train"
    """split of prompt_dataset"""
    prompt_dataset_column: str = "prompt"
    """prompt column of prompt_dataset"""
    num_normalisation_prompts: int = 512
    """how many prompts to sample one response each for"""
    max_prompt_length: int = 32
    """normalisation prompts longer than this many tokens are an error, or cut with --truncate_long_prompts: set
    both as for ppo.py, so that the statistics come from the prompts PPO will see"""
    truncate_long_prompts: bool = False
    """keep the last tokens of a too-long normalisation prompt, behind its BOS or chat template header"""
    response_length: int = 32
    """max new tokens per normalisation sample (match ppo.py)"""
    temperature: float = 0.7
    """sampling temperature of the normalisation samples (match ppo.py; Huang et al. 2024: 0.7)"""
    generation_batch_size: int = 128
    """prompts per generate call on one process"""

    # bookkeeping
    seed: int = 1
    """random seed (rank r uses seed + r for sampling; data order and head init use seed)"""
    run_name: str | None = None
    """TensorBoard run dir under runs/ (None: rm__{seed}__{unix time})"""

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


def position_ids_from(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted from the first real token, so left padding never shifts a sequence. TRL and OpenRLHF
    pass them; Huang et al. 2024's released code passes none, which a rotary model such as Pythia barely feels
    but a model with learned absolute positions (GPT-2) does (tests/test_ppo_equations.py)."""
    return (attention_mask.long().cumsum(1) - 1).clamp(min=0)


def get_reward(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """r(x, y) = score_head(h_T), h_T the last hidden state at the last real token (the EOS). (B, T) -> (B,)

    HF's *ForSequenceClassification reads the rightmost token != config.pad_token_id, which is the last
    real token for left padding, right padding, and both at once (PPO's left-padded query + right-padded
    response); tests/test_rm.py checks this. Positions are counted from the first real token.
    """
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids_from(attention_mask))
    return out.logits.squeeze(-1).float()


# THE NORMALISATION CONTRACT (ppo.py relies on it):
#   the saved config holds `reward_mean` and `reward_std`, and every consumer of the RM uses
#       normalised reward = (raw - config.reward_mean) / config.reward_std
#   where raw = get_reward(...) on prompt tokens + response tokens up to and including the first EOS,
#   padded with pad_token_id (left padding before the prompt, right padding after the response allowed).
#   reward_mean is the mean raw reward of SFT-policy samples on training prompts, so the SFT policy scores
#   0 on average; reward_std is their std with --normalize_std, else 1.0. Ziegler et al. 2019 set both on
#   samples of the initial policy (lm-human-preferences' normalize_after: mean 0, std 1); Huang et al. 2024
#   set only the mean, on the dataset's reference summaries (after Stiennon et al. 2020). HF's score head
#   has no bias, so the shift cannot live in the weights (a trained head bias was dropped on loading: TRL #1783).
def reward_normalisation(reward_sum: float, reward_sq_sum: float, count: float,
                         normalize_std: bool) -> tuple[float, float, float]:
    """reward_mean = E[r],  reward_std = sqrt((E[r^2] - E[r]^2) * n / (n - 1)) if normalize_std else 1

    over the n SFT-policy samples. Returns (reward_mean, reward_std, raw std). Sums, not lists, so ranks add
    their shares (global statistics).
    """
    mean = reward_sum / count
    std = math.sqrt(max(reward_sq_sum / count - mean**2, 0.0) * count / max(count - 1, 1))
    return mean, (max(std, 1e-8) if normalize_std else 1.0), std


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


# ----------------------------------------------------------------------------------------------
# The model and data helpers the algorithm uses
# ----------------------------------------------------------------------------------------------
def init_reward_head(model) -> None:
    """score head: weight ~ N(0, std^2) with std = 1 / sqrt(d_model + 1); bias (if any) = 0

    The init of Ziegler et al. 2019's lm-human-preferences code, which Huang et al. 2024 follow.
    """
    head = getattr(model, "score", None)
    if isinstance(head, torch.nn.Linear):
        torch.nn.init.normal_(head.weight, std=1.0 / math.sqrt(head.in_features + 1))
        if head.bias is not None:
            torch.nn.init.zeros_(head.bias)


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks (a no-op on one process)."""
    if dist.is_initialized():
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def right_pad(sequences: list[list[int]], pad_token_id: int, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Right padding, for the RM's own batches: every sequence starts in column 0. -> (B, T) ids, mask

    The mask keeps every token that is not pad_token_id, the tokens get_reward reads as real.
    """
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    for i, s in enumerate(sequences):
        input_ids[i, : len(s)] = torch.tensor(s)
    return input_ids.to(device), (input_ids != pad_token_id).long().to(device)


def left_pad(sequences: list[list[int]], pad_token_id: int, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Left padding, so every prompt ends where the response starts (Huang et al. 2024). -> (B, P) ids, mask"""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s):] = 1
    return ids.to(device), mask.to(device)


def pair_batch(pairs: dict, indices: list[int], pad_id: int, device):
    """The distinct sequences of a batch of pairs, padded into one (N, T) batch, and where each pair's chosen and
    rejected sit in it: rewards[index[:B]] are r_chosen, rewards[index[B:]] r_rejected. One forward scores both
    sides with the same padding width and weights (Huang et al. 2024). A completion that several pairs of the
    batch share (the k choose 2 pairs of k ranked completions) is scored once (Ouyang et al. 2022, Sec. 3.5)."""
    seqs = [pairs["chosen_ids"][i] for i in indices] + [pairs["rejected_ids"][i] for i in indices]
    row = {}  # token ids -> row of the batch
    index = torch.tensor([row.setdefault(tuple(s), len(row)) for s in seqs], device=device)  # (2B,)
    input_ids, attention_mask = right_pad([list(s) for s in row], pad_id, device)  # dicts keep insertion order
    margin = None
    if pairs["margin"] is not None:
        margin = torch.tensor([pairs["margin"][i] for i in indices], dtype=torch.float32, device=device)
    return input_ids, attention_mask, index, margin


def pairs_by_prompt(prompts: list[str]) -> list[list[int]]:
    """The indices of the pairs that share each prompt, one list per prompt, in order of first appearance."""
    by_prompt: dict[str, list[int]] = {}
    for i, prompt in enumerate(prompts):
        by_prompt.setdefault(prompt, []).append(i)
    return list(by_prompt.values())


def pair_batches(prompt_groups: list[list[int]], pairs: dict, steps_per_epoch: int, args: Args):
    """Global batches of args.batch_size pair indices, epoch after epoch (a generator).

    Each epoch: the prompt groups in a random order, each group's pairs next to each other; with
    --group_by_length, batches of similar length (common.group_by_length); the last partial batch dropped, so that
    every rank gets an equal share. Every rank draws the same order (one generator seeded with args.seed), so a
    resumed run finds its place by replaying the batches before its checkpoint.
    """
    lengths = [0] * len(pairs["chosen_ids"])  # a group's longest sequence, for all its pairs: sorting keeps it whole
    for group in prompt_groups:
        longest = max(max(len(pairs["chosen_ids"][i]), len(pairs["rejected_ids"][i])) for i in group)
        for i in group:
            lengths[i] = longest
    order_rng = torch.Generator().manual_seed(args.seed)
    for _epoch in range(args.num_train_epochs):
        order = [i for g in torch.randperm(len(prompt_groups), generator=order_rng).tolist() for i in prompt_groups[g]]
        if args.group_by_length:
            order = group_by_length(order, lengths, args.batch_size, order_rng)
        for batch_start in range(0, steps_per_epoch * args.batch_size, args.batch_size):
            yield order[batch_start : batch_start + args.batch_size]


def shard(n: int, rank: int, world_size: int) -> tuple[list[int], list[bool]]:
    """Rank's share of range(n), wrapped around so every rank gets ceil(n / world_size) items: FSDP needs the
    same number of forwards on every rank. `is_real` is False for the wrapped-around repeats."""
    per_rank = math.ceil(n / world_size)
    positions = [rank + world_size * k for k in range(per_rank)]
    return [p % n for p in positions], [p < n for p in positions]


@torch.no_grad()
def sample_responses(policy, input_ids, attention_mask, response_length: int, temperature: float,
                     stop_token_ids: int | list[int], pad_token_id: int) -> torch.Tensor:
    """Sample one response per left-padded prompt, cut after its first EOS (truncate_after_eos).
    (B, T_prompt) -> (B, T_response)

    Only the temperature applies: the policy's generation_config holds only the token ids (common.token_ids_only).
    """
    from transformers import GenerationConfig

    config = GenerationConfig(
        max_new_tokens=response_length, do_sample=True, temperature=temperature,
        top_k=0, top_p=1.0,  # the policy's full distribution, as in PPO (Huang et al. 2024); HF defaults top_k=50
        eos_token_id=stop_token_ids, pad_token_id=pad_token_id,
    )
    out = policy.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)
    responses, _, _ = truncate_after_eos(out[:, input_ids.shape[1]:], stop_token_ids, pad_token_id)
    return responses


# ----------------------------------------------------------------------------------------------
# main: train the RM on the preference pairs, then normalise its reward on SFT-policy samples
# ----------------------------------------------------------------------------------------------
def main(args: Args) -> dict:
    """Train the RM on the preference pairs (Bradley-Terry), then normalise its reward on SFT-policy samples."""
    # TRY NOT TO MODIFY: checks, processes, sizes, output dirs, tokenizers and data; the model; resume; logging
    start_time = time.time()
    setup = set_up(args)
    models = build_models(args, setup)
    progress, writer = start_or_resume(args, setup, models)
    model, optimizer = models.model, models.optimizer
    d, train, pad_id = setup.d, setup.train, setup.tokenizer.pad_token_id

    # ALGO LOGIC: the order of the pairs. Pairs that share a prompt (the k choose 2 pairs of k ranked completions)
    # go through training together, in one batch: each completion is scored once, and an epoch visits each
    # ranking once. InstructGPT did this because shuffling these correlated pairs apart made the RM overfit in
    # one epoch (Ouyang et al. 2022, Sec. 3.5).
    n_train = len(train["chosen_ids"])
    prompt_groups = pairs_by_prompt(train["prompt"]) if args.group_by_prompt else [[i] for i in range(n_train)]
    batches = pair_batches(prompt_groups, train, setup.steps_per_epoch, args)  # every rank: the same global batches
    for _ in range(progress.start_step):  # the data position: replay the shuffles up to the checkpoint
        next(batches)

    # ALGO LOGIC: training, one optimiser step per global batch
    signals = catch_signals()
    bar = tqdm(total=setup.total_steps, initial=progress.start_step, desc="reward model", disable=not d.is_main)
    t_train = time.time()
    for step in range(progress.start_step + 1, setup.total_steps + 1):
        lr = learning_rate_at(step - 1, setup.total_steps, args)  # the rate after step - 1 completed steps
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = next(batches)
        local = batch[d.rank * setup.pairs_per_rank : (d.rank + 1) * setup.pairs_per_rank]  # this rank's share
        sums = [0.0] * 5  # this rank's loss * n, correct, sum r_chosen, sum r_rejected, n
        for micro_start in range(0, setup.pairs_per_rank, setup.micro_batch_size):  # gradient accumulation
            idx = local[micro_start : micro_start + setup.micro_batch_size]
            input_ids, attention_mask, index, margin = pair_batch(train, idx, pad_id, d.device)  # (N <= 2b, T)
            rewards = get_reward(model, input_ids, attention_mask)[index]  # (2b,): one forward for both
            r_chosen, r_rejected = rewards[: len(idx)], rewards[len(idx):]  # (b,) each
            loss = bradley_terry_loss(r_chosen, r_rejected, margin)
            (loss / setup.gradient_accumulation_steps).backward()  # the gradient of the mean over the rank's share
            sums[0] += loss.item() * len(idx)
            sums[1] += (r_chosen > r_rejected).sum().item()
            sums[2] += r_chosen.sum().item()
            sums[3] += r_rejected.sum().item()
            sums[4] += len(idx)
        # the sums over all ranks; the signal flag rides along: if any rank was signalled, every rank checkpoints here
        loss_sum, correct, chosen_sum, rejected_sum, count, stop = all_reduce_sum(
            torch.tensor(sums + [float(signals["stop"])], dtype=torch.float64, device=d.device)).tolist()
        grad_norm = clip_grad_norm_or_stop(models, args, setup, step, {"loss": loss_sum / count})
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        # TRY NOT TO MODIFY: logging, evaluation and checkpoints
        metrics = {
            "train/loss": loss_sum / count,
            "train/accuracy": correct / count,
            "train/reward_chosen": chosen_sum / count,
            "train/reward_rejected": rejected_sum / count,
            "train/margin": (chosen_sum - rejected_sum) / count,  # mean r_chosen - r_rejected
        }
        log_step(metrics, lr, grad_norm, step, args, setup, writer, bar, t_train)
        eval_every = args.eval_every or setup.steps_per_epoch  # 0: at the end of each epoch
        if setup.val is not None and (step % eval_every == 0 or step == setup.total_steps):
            run_eval(step, args, setup, models, progress, writer)
        save_or_stop(step, stop, signals, args, setup, models, progress)
    bar.close()
    progress.train_time = time.time() - t_train
    del optimizer
    models.optimizer = None  # frees AdamW's state: the normalisation does not need it
    model.eval()

    # ALGO LOGIC: reward normalisation on SFT-policy samples (see THE NORMALISATION CONTRACT above)
    if args.normalize:
        t_norm = time.time()
        # Each rank holds a full, unsharded copy of the policy: it only generates, and generate() under FSDP
        # would need every rank to take the same number of decoding steps.
        policy = load_causal_lm(setup.sft_path, setup.policy_tokenizer, args.dtype).to(d.device).eval()
        indices, is_real = shard(len(setup.normalisation_ids), d.rank, d.world_size)  # is_real: False for a repeat
        sums = [0.0, 0.0, 0.0, 0.0]  # this rank's sum r, sum r^2, count, count with EOS
        for start in tqdm(range(0, len(indices), args.generation_batch_size), desc="normalisation",
                          disable=not d.is_main):
            idx = indices[start : start + args.generation_batch_size]
            real = torch.tensor(is_real[start : start + args.generation_batch_size], device=d.device)  # (B,)
            queries, query_mask = left_pad([setup.normalisation_ids[i] for i in idx], pad_id, d.device)  # (B, P)
            responses = sample_responses(policy, queries, query_mask, args.response_length,
                                         args.temperature, setup.stop_ids, pad_id)  # (B, T_response)
            query_responses = torch.cat([queries, responses], dim=1)  # left pad | prompt | response | pad
            rewards = get_reward(model, query_responses, (query_responses != pad_id).long())  # (B,) raw
            has_eos = torch.isin(responses, torch.tensor(setup.stop_ids, device=d.device)).any(-1)  # (B,)
            sums[0] += (rewards * real).sum().item()
            sums[1] += (rewards**2 * real).sum().item()
            sums[2] += real.sum().item()
            sums[3] += (has_eos & real).sum().item()
        reward_sum, reward_sq_sum, count, with_eos = all_reduce_sum(
            torch.tensor(sums, dtype=torch.float64, device=d.device)).tolist()
        reward_mean, reward_std, raw_std = reward_normalisation(reward_sum, reward_sq_sum, count, args.normalize_std)
        progress.reward_mean, progress.reward_std = reward_mean, reward_std
        progress.normalisation = {"num_samples": int(count), "raw_mean": reward_mean, "raw_std": raw_std,
                                  "eos_fraction": with_eos / count, "time_s": time.time() - t_norm}
        del policy

    # TRY NOT TO MODIFY: save (atomic; a failed run has raised before this point) and report
    return final_report(args, setup, models, progress, writer, start_time)


# ----------------------------------------------------------------------------------------------
# TRY NOT TO MODIFY: everything below is plumbing that main() calls in one line each: the run's setup and
# checks (the data: common.load_preference_split), model building, resume and checkpoints, logging, evaluation
# and the final report, the command line.
# ----------------------------------------------------------------------------------------------
@dataclass
class Setup:
    """What main() sets up once (set_up): processes, sizes, paths, tokenizers and the data, all checked before
    any model is loaded."""
    d: Dist
    pairs_per_rank: int  # pairs per optimiser step on this rank
    micro_batch_size: int  # pairs per forward on this rank
    gradient_accumulation_steps: int  # forwards per optimiser step on this rank
    steps_per_epoch: int
    total_steps: int
    sft_path: str  # the policy that samples the normalisation responses
    checkpoint_dir: str
    run_name: str  # TensorBoard: runs/{run_name}
    bayes_ceiling: float | None
    tokenizer: object  # the RM's, padding on the right
    policy_tokenizer: object  # the SFT policy's, padding on the left (None without --normalize)
    train: dict  # load_preference_split's: chosen_ids, rejected_ids, prompt, margin
    val: dict | None
    normalisation_ids: list[list[int]] | None  # the normalisation prompts, as the policy's token ids
    stop_ids: list[int]  # a normalisation response ends at any of these (EOS, a chat template's end-of-turn)


@dataclass
class Progress:
    """What a checkpoint carries beyond the weights, the optimiser and the RNG states; then what the run measured
    after training, for the final report."""
    start_step: int
    run_name: str
    val_metrics: dict | None  # the last validation
    history: list  # (step, validation accuracy) of every validation
    train_time: float = 0.0
    reward_mean: float = 0.0  # the normalisation (none: the raw reward, mean 0 and std 1)
    reward_std: float = 1.0
    normalisation: dict = field(default_factory=dict)


@dataclass
class Models:
    """The reward model and what trains it (build_models)."""
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer | None  # None after training


def check_args(args: Args) -> None:
    """Every numeric flag in range, before anything loads (None leaves a flag off)."""
    check_flags(args, at_least_1=("max_length", "num_train_pairs", "num_eval_pairs", "num_train_epochs", "batch_size",
                                  "micro_batch_size", "eval_batch_size", "log_every", "num_normalisation_prompts",
                                  "max_prompt_length", "response_length", "generation_batch_size"),
                positive=("learning_rate", "adam_eps", "temperature"),
                non_negative=("weight_decay", "warmup_steps", "max_grad_norm", "eval_every", "checkpoint_every",
                              "max_dropped_fraction"))


def set_up(args: Args) -> Setup:
    """Check every flag, start the processes, derive the sizes, check the models and the output dirs, read and
    tokenize the pairs and the normalisation prompts: everything that can fail, before any model is loaded."""
    check_args(args)
    d = setup_distributed()
    pairs_per_rank = args.batch_size // d.world_size  # pairs per optimiser step on this rank
    micro_batch_size = min(args.micro_batch_size, pairs_per_rank)  # pairs per forward on this rank
    if args.batch_size % d.world_size or pairs_per_rank % micro_batch_size:
        raise SystemExit(f"--batch_size {args.batch_size} must be divisible by the {d.world_size} processes x "
                         f"--micro_batch_size {args.micro_batch_size}")
    gradient_accumulation_steps = pairs_per_rank // micro_batch_size  # forwards per optimiser step on this rank
    sft_path = args.sft_model_for_normalisation or args.model_name_or_path
    checkpoint_dir = args.checkpoint_dir or args.output_dir.rstrip("/") + "_checkpoints"
    check_model_dir(args.model_name_or_path, "model")
    if args.normalize:
        check_model_dir(sft_path, "SFT model for normalisation")
    inputs = {"model": args.model_name_or_path, "SFT model": sft_path, "dataset": args.dataset,
              "prompt dataset": args.prompt_dataset, "Bayes ceiling file": args.bayes_ceiling_file}
    prepare_output(args.output_dir, checkpoint_dir, "rm", inputs, args.resume, args.overwrite, args_json(args),
                   d.world_size)
    bayes_ceiling = load_bayes_ceiling(args.bayes_ceiling_file, args.dataset)

    tokenizer = load_tokenizer(args.model_name_or_path, padding_side="right", add_pad_token=args.add_pad_token)
    policy_tokenizer = None
    if args.normalize:  # fail now, not after training; the policy's tokenizer pads on the left, for generation
        policy_tokenizer = load_tokenizer(sft_path, padding_side="left", add_pad_token=args.add_pad_token)
        check_same_tokenizer(policy_tokenizer, tokenizer, sft_path, args.model_name_or_path)
    dataset = load_dataset(args.dataset)
    train = load_preference_split(args, dataset, args.train_split, tokenizer, args.num_train_pairs, args.bootstrap)
    val = (load_preference_split(args, dataset, args.eval_split, tokenizer, args.num_eval_pairs)
           if args.eval_split else None)
    # the normalisation prompts are read now, so that a bad --prompt_dataset fails before training, not after it
    chat_rendered = args.prompt_dataset is None and args.dataset_format == "conversational"  # has its BOS
    normalisation_ids = None
    if args.normalize:  # tokenized and cut to length as ppo.py does, so that the SFT samples match its prompts
        prompts = load_normalisation_prompts(args, train["prompt"])
        normalisation_ids = policy_tokenizer(prompts, add_special_tokens=not chat_rendered)["input_ids"]
        normalisation_ids = fit_prompts(normalisation_ids, args.max_prompt_length, args.truncate_long_prompts,
                                        prompt_head(policy_tokenizer, chat_rendered), "normalisation prompts")
    # responses end at EOS or, for chat, at the template's end-of-turn token, as in ppo.py
    stop_ids = [tokenizer.eos_token_id, *(end_of_turn_tokens(tokenizer) if chat_rendered else [])]

    n_train = len(train["chosen_ids"])
    steps_per_epoch = n_train // args.batch_size  # the last partial batch is dropped: equal shards on every rank
    if steps_per_epoch == 0:
        raise SystemExit(f"only {n_train} training pairs, fewer than one --batch_size {args.batch_size}")
    total_steps = steps_per_epoch * args.num_train_epochs
    print0(f"{n_train} training pairs, {len(val['chosen_ids']) if val else 0} validation pairs; "
           f"{total_steps} steps of {args.batch_size} pairs ({d.world_size} processes x {gradient_accumulation_steps} "
           f"x {micro_batch_size})")
    run_name = args.run_name or f"rm__{args.seed}__{int(time.time())}"
    return Setup(d, pairs_per_rank, micro_batch_size, gradient_accumulation_steps, steps_per_epoch, total_steps,
                 sft_path, checkpoint_dir, run_name, bayes_ceiling, tokenizer, policy_tokenizer, train, val,
                 normalisation_ids, stop_ids)


# ----------------------------------------------------------------------------------------------
# The model, resume and checkpoints
# ----------------------------------------------------------------------------------------------
def build_models(args: Args, setup: Setup) -> Models:
    """The SFT checkpoint with a fresh scalar head (init_reward_head; no dropout: common.load_reward_model),
    sharded with FSDP2 under torchrun, and its AdamW (eps 1e-5, Huang et al. 2024).

    The head is drawn from args.seed on every rank, so every rank starts from the same head before FSDP2 shards
    it; after that each rank seeds its own RNG (seed + rank).
    """
    torch.manual_seed(args.seed)
    model = load_reward_model(args.model_name_or_path, setup.tokenizer, args.dtype)
    init_reward_head(model)
    model = fsdp_wrap(model, setup.d.device)
    model.train()
    seed_everything(args.seed, setup.d.rank)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, eps=args.adam_eps,
                                  weight_decay=args.weight_decay)
    return Models(model, optimizer)


def start_or_resume(args: Args, setup: Setup, models: Models) -> tuple[Progress, object]:
    """--resume: model, optimiser, step, history and RNG states as they were after the checkpoint's step. Then the
    TensorBoard writer (rank 0), with the hyperparameters as a table."""
    progress, resumed = Progress(0, setup.run_name, None, []), False
    if args.resume:
        latest = latest_checkpoint(setup.checkpoint_dir)
        state = load_checkpoint(latest, models.model, models.optimizer)
        progress, resumed = Progress(state["step"], state["run_name"], state["val_metrics"], state["history"]), True
        print0(f"resumed from {latest} (step {progress.start_step} of {setup.total_steps})")
    writer = tensorboard_writer(setup.d.is_main, progress.run_name, asdict(args),
                                progress.start_step if resumed else None)  # rank 0's
    return progress, writer


def save_or_stop(step: int, stop: float, signals: dict, args: Args, setup: Setup, models: Models,
                 progress: Progress) -> None:
    """A checkpoint every --checkpoint_every steps, at the end, and when a signal came (model, optimiser, step and
    RNG states; the data position follows from the step); then, for a signal, exit."""
    if (args.checkpoint_every and step % args.checkpoint_every == 0) or step == setup.total_steps or stop:
        state = {"step": step, "args": args_json(args), "run_name": progress.run_name,
                 "val_metrics": progress.val_metrics, "history": progress.history}
        path = save_checkpoint(setup.checkpoint_dir, step, models.model, models.optimizer, state, "rm")
        if stop:
            exit_preempted(path, f"step {step}", signals["signal"])


# ----------------------------------------------------------------------------------------------
# Logging, evaluation and the final report
# ----------------------------------------------------------------------------------------------
def clip_grad_norm_or_stop(models: Models, args: Args, setup: Setup, step: int, losses: dict) -> float:
    """Clip the global gradient norm to --max_grad_norm and return it (before clipping); a non-finite loss (of
    `losses`, the step's all-reduced losses by name) or norm stops the run before the optimiser step can carry it
    into the weights."""
    grad_norm = torch.nn.utils.clip_grad_norm_(models.optimizer.param_groups[0]["params"], args.max_grad_norm)
    if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP2 (a collective: every rank calls it)
        grad_norm = grad_norm.full_tensor()
    grad_norm = grad_norm.item()
    for name, value in (*losses.items(), ("gradient norm", grad_norm)):
        if not math.isfinite(value):  # global values, the same on every rank: every rank stops
            raise SystemExit(f"the {name} is {value} at step {step}: stopped before the optimiser step; last good "
                             f"checkpoint: {latest_checkpoint(setup.checkpoint_dir) or 'none'}. Lower --learning_rate "
                             "or check the data")
    return grad_norm


def log_step(metrics: dict, lr: float, grad_norm: float, step: int, args: Args, setup: Setup, writer, bar,
             t_train: float) -> None:
    """The progress bar every step; TensorBoard every --log_every steps and at the last one."""
    bar.update(1)
    bar.set_postfix(loss=f"{metrics['train/loss']:.3f}", acc=f"{metrics['train/accuracy']:.3f}")
    if writer is not None and (step % args.log_every == 0 or step == setup.total_steps):
        for name, value in metrics.items():
            writer.add_scalar(name, value, step)
        writer.add_scalar("train/lr", lr, step)
        writer.add_scalar("train/grad_norm", grad_norm, step)
        writer.add_scalar("charts/pairs_per_second", step * args.batch_size / (time.time() - t_train), step)


@torch.no_grad()
def preference_accuracy(model, pairs: dict, batch_size: int, pad_id: int, rank: int, world_size: int, device) -> dict:
    """Accuracy (r_chosen > r_rejected) and loss over all pairs, summed over ranks."""
    indices, is_real = shard(len(pairs["chosen_ids"]), rank, world_size)
    # shortest pairs first, so that each batch pads little (the order does not change the sums)
    length = lambda i: max(len(pairs["chosen_ids"][i]), len(pairs["rejected_ids"][i]))  # noqa: E731
    by_length = sorted(range(len(indices)), key=lambda k: length(indices[k]))
    indices, is_real = [indices[k] for k in by_length], [is_real[k] for k in by_length]
    sums = [0.0, 0.0, 0.0]  # correct, loss, count
    for start in range(0, len(indices), batch_size):
        idx = indices[start : start + batch_size]
        real = torch.tensor(is_real[start : start + batch_size], device=device)  # (B,) False for a repeat
        input_ids, attention_mask, index, margin = pair_batch(pairs, idx, pad_id, device)
        rewards = get_reward(model, input_ids, attention_mask)[index]  # (2B,)
        r_chosen, r_rejected = rewards[: len(idx)], rewards[len(idx):]
        m = margin if margin is not None else 0.0
        losses = -F.logsigmoid(r_chosen - r_rejected - m)  # (B,) each pair's Bradley-Terry loss
        sums[0] += ((r_chosen > r_rejected) & real).sum().item()
        sums[1] += (losses * real).sum().item()
        sums[2] += real.sum().item()
    correct, loss, count = all_reduce_sum(torch.tensor(sums, dtype=torch.float64, device=device)).tolist()
    return {"accuracy": correct / count, "loss": loss / count}


def run_eval(step: int, args: Args, setup: Setup, models: Models, progress: Progress, writer) -> None:
    """Validation accuracy and loss (preference_accuracy), kept in progress and logged."""
    d = setup.d
    progress.val_metrics = preference_accuracy(models.model, setup.val, args.eval_batch_size,
                                               setup.tokenizer.pad_token_id, d.rank, d.world_size, d.device)
    progress.history.append((step, progress.val_metrics["accuracy"]))
    if d.is_main:
        tqdm.write(f"step {step}: val accuracy {progress.val_metrics['accuracy']:.4f}, "
                   f"loss {progress.val_metrics['loss']:.4f}")
    if writer is not None:
        writer.add_scalar("val/accuracy", progress.val_metrics["accuracy"], step)
        writer.add_scalar("val/loss", progress.val_metrics["loss"], step)


def final_report(args: Args, setup: Setup, models: Models, progress: Progress, writer, start_time: float) -> dict:
    """Save the RM (atomically, with reward_mean / reward_std in its config and eval_results.json beside it), log
    the normalisation, print the summary and return the results."""
    val_metrics, bayes_ceiling = progress.val_metrics, setup.bayes_ceiling
    reward_mean, reward_std, norm_stats = progress.reward_mean, progress.reward_std, progress.normalisation
    results = {
        "val_accuracy": val_metrics["accuracy"] if val_metrics else None,
        "val_loss": val_metrics["loss"] if val_metrics else None,
        "bayes_ceiling": bayes_ceiling,
        "fraction_of_ceiling": (val_metrics["accuracy"] / bayes_ceiling) if (val_metrics and bayes_ceiling) else None,
        "reward_mean": reward_mean,
        "reward_std": reward_std,
        "normalisation": norm_stats,
        "val_accuracy_history": progress.history,
        "train_pairs": len(setup.train["chosen_ids"]),
        "steps": setup.total_steps,
        "train_time_s": progress.train_time,
        "wall_time_s": time.time() - start_time,
    }
    if writer is not None:
        for name, value in norm_stats.items():
            writer.add_scalar(f"normalisation/{name}", value, setup.total_steps)
    save_model(models.model, setup.tokenizer, args.output_dir, "rm", results=results,
               extra_config={"reward_mean": reward_mean, "reward_std": reward_std})
    if writer is not None:
        writer.close()
    print0(f"saved {args.output_dir}: reward_mean {reward_mean:.4f}, reward_std {reward_std:.4f}")
    if val_metrics:
        ceiling = ""
        if bayes_ceiling:
            ceiling = f" vs Bayes ceiling {bayes_ceiling:.4f} ({results['fraction_of_ceiling']:.1%} of it)"
        print0(f"validation accuracy {val_metrics['accuracy']:.4f}{ceiling}")
    teardown_distributed()
    return results


def parse_args(argv=None) -> Args:
    """Args from the command line: a preset's name (presets.py; none: the toy task), then flags over it."""
    return parse_args_with_presets(Args, presets.REWARD_MODEL, argv)


if __name__ == "__main__":
    run(main, parse_args)
