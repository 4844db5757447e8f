"""Supervised fine-tuning (SFT), the first stage of RLHF.

Fit the base model to reference completions by maximum likelihood (Stiennon et al. 2020;
Ouyang et al. 2022, §3.5):

    L_SFT(θ) = - Σ_(x,y) Σ_t log π_θ(y_t | x, y_<t)  /  (number of target tokens)

x is the prompt and y the completion, followed by EOS. By default only completion tokens are
targets; `--train_on_prompt` makes the prompt tokens targets too, as Huang et al. 2024 did.

    python toy_task.py && python sft.py         # the offline toy task on CPU, under 2 minutes
    torchrun --nproc_per_node=2 sft.py          # the same, with FSDP2 over 2 processes
    python sft.py pythia-tldr                   # Pythia-1B on TL;DR with Huang et al. 2024's settings (GPU)
    python sft.py --help

The model and tokenizer are saved to `--output_dir` (AutoModelForCausalLM.from_pretrained loads them),
with eval_results.json beside them. TensorBoard logs go to runs/{run_name}.

The file reads top to bottom: the arguments, the equations (the loss, the targets, the learning-rate
schedule), the batching helpers, then main(), whose loop is the training. Below main(), under TRY NOT TO
MODIFY, is the plumbing it calls in one line each: checks and setup, data loading, model building, resume
and checkpoints, logging, evaluation and the final report, the presets and the command line.
"""

from __future__ import annotations

import importlib
import math
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable, Literal

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
    check_messages,
    check_model_dir,
    check_texts,
    check_unknown_tokens,
    drop_unusable,
    end_of_turn_tokens,
    exit_preempted,
    fit_prompts,
    fsdp_wrap,
    latest_checkpoint,
    load_causal_lm,
    load_checkpoint,
    load_dataset,
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
)

IGNORE_INDEX = -100  # label of a position that is not a target (F.cross_entropy's default ignore_index)


# ----------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------
@dataclass
class Args(ResumeFlags):  # + --checkpoint_dir, --resume, --overwrite
    # experiment
    seed: int = 1
    """random seed (rank r samples with seed + r; every rank shuffles the data with seed): the same seed on the
    same machine gives the same numbers"""
    run_name: str | None = None
    """TensorBoard logs go to runs/{run_name}; default sft_{seed}_{unix time}"""
    output_dir: str = "models/sft"
    """where the fine-tuned model, its tokenizer and eval_results.json are saved"""

    # model
    model_name_or_path: str = "toy_data/base_model"
    """the base model and tokenizer: a hub id or a local directory"""
    add_pad_token: bool = False
    """add a distinct '[PAD]' token when the tokenizer has none or pads with EOS (Pythia, Qwen2)"""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """dtype the weights are loaded in (under torchrun on GPU, FSDP2 computes in bf16 from fp32 weights)"""

    # data
    dataset: str = "toy_data/sft"
    """a hub dataset name or a local directory of {split}.jsonl files"""
    train_split: str = "train"
    """the split to train on"""
    eval_split: str = "validation"
    """the split for validation loss and sample generations"""
    dataset_format: Literal["auto", "standard", "conversational", "implicit_prompt"] = "auto"
    """standard: prompt/completion columns; conversational: a messages column, rendered with the chat template;
    implicit_prompt: one whole-dialogue text column (--completion_column, e.g. HH-RLHF's chosen), split after its
    last --implicit_prompt_marker; auto: conversational if there is a messages column and no prompt column"""
    implicit_prompt_marker: str = "\n\nAssistant:"
    """implicit_prompt: the prompt ends just after the last occurrence of this (Anthropic HH)"""
    prompt_column: str = "prompt"
    """standard format: the column holding the prompt text"""
    completion_column: str = "completion"
    """standard format: the column holding the completion text (EOS is appended)"""
    messages_column: str = "messages"
    """conversational format, used when the dataset has this column and no prompt column: a list of
    {role, content}; the last assistant turn is the completion, the rest is rendered by the chat template"""
    max_prompt_length: int = 16
    """prompts longer than this many tokens are rejected (or left-truncated with --truncate_long_prompts)"""
    max_completion_length: int = 32
    """completions (EOS included) longer than this are cut to this many tokens, and lose their EOS"""
    truncate_long_prompts: bool = False
    """keep the last tokens of a too-long prompt, behind its BOS or chat template header (with a warning),
    instead of failing"""
    max_dropped_fraction: float = 0.01
    """rows that cannot be used (empty prompt or completion, no prompt marker) are dropped with a count; more
    than this fraction of a split stops the run (it means a wrong column or format)"""
    train_on_prompt: bool = False
    """make prompt tokens targets too (Huang et al. 2024 did); default: loss on completion tokens only"""

    # optimisation
    learning_rate: float = 3e-3
    """peak learning rate of AdamW (high for the tiny random toy model; Pythia uses 3e-6)"""
    adam_eps: float = 1e-5
    """AdamW epsilon (Huang et al. 2024 use 1e-5)"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    warmup_steps: int = 30
    """optimizer steps of linear warmup before the cosine decay"""
    num_train_epochs: int = 3
    """passes over the training split"""
    max_steps: int | None = None
    """stop after this many optimizer steps (overrides num_train_epochs)"""
    batch_size: int = 64
    """sequences per optimizer step, summed over all processes (each process splits its share into
    --gradient_accumulation_steps micro-batches)"""
    gradient_accumulation_steps: int = 1
    """micro-batches per optimizer step on each process"""
    max_grad_norm: float = 1.0
    """clip the global gradient norm to this; 0 disables clipping"""
    group_by_length: bool = True
    """batch sequences of similar length together, so that batches carry less padding (faster)"""

    # evaluation
    eval_every: int = 100
    """optimizer steps between validation losses and logged sample generations"""
    num_eval_pairs: int | None = None
    """the first this many rows of the eval split are evaluated (loss and samples); None: all of it"""
    eval_batch_size: int = 256
    """sequences per forward during evaluation and generation, per process"""
    num_eval_samples: int = 512
    """validation prompts sampled at the end for the final score"""
    num_logged_samples: int = 8
    """sample generations written to TensorBoard at each evaluation"""
    temperature: float = 0.7
    """sampling temperature of the generations (top_k 0, top_p 1: the full distribution)"""
    max_new_tokens: int = 32
    """longest generated completion"""
    eval_fn: str | None = "toy_task:is_grammatical"
    """`module:function` called as f(prompt, completion) -> bool | float on each final sample (the prompt as
    the model saw it, the completion up to EOS); None skips it"""

    # checkpoints
    checkpoint_every: int = 100
    """optimizer steps between checkpoints (model, optimizer, schedule, RNG states, data position); 0: only the
    final one. SIGTERM (preemption) also writes one, then exits with status 143"""


# ----------------------------------------------------------------------------------------------
# ALGO LOGIC: the equations, one function each
# ----------------------------------------------------------------------------------------------
def sft_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed negative log-likelihood of the targets, and how many targets there are.

    nll = - Σ_t log softmax(logits[t])[labels[t+1]]   over t with labels[t+1] != IGNORE_INDEX
    logits: (B, T, V), labels: (B, T). Position t predicts token t+1, hence the shift.
    """
    shift_logits = logits[:, :-1, :].float()  # (B, T-1, V)
    shift_labels = labels[:, 1:]  # (B, T-1)
    nll = F.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1),
                          ignore_index=IGNORE_INDEX, reduction="sum")
    return nll, (shift_labels != IGNORE_INDEX).sum()


def build_labels(prompt_ids: list[int], completion_ids: list[int], train_on_prompt: bool = False) -> list[int]:
    """Targets for input_ids = prompt_ids + completion_ids.

    labels[t] = input_ids[t]   where token t is trained on (completion; also prompt with train_on_prompt)
    labels[t] = IGNORE_INDEX   elsewhere (prompt tokens by default)
    The shift (position t predicts token t+1) happens in `sft_loss`.
    """
    prompt_labels = list(prompt_ids) if train_on_prompt else [IGNORE_INDEX] * len(prompt_ids)
    return prompt_labels + list(completion_ids)


def cosine_with_warmup(step: int, warmup_steps: int, total_steps: int) -> float:
    """Learning-rate multiplier of step s = 0, 1, ...: linear warmup up to 1, then cosine decay to 0.

    m(s) = (s + 1) / warmup                                        for s < warmup
    m(s) = 0.5 * (1 + cos(pi * (s - warmup) / (total - warmup)))   afterwards
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


# ----------------------------------------------------------------------------------------------
# The batches the loop trains on, the schedule, the sum over processes
# ----------------------------------------------------------------------------------------------
def collate(pairs, pad_token_id: int, train_on_prompt: bool) -> dict[str, torch.Tensor]:
    """Right-pad a list of (prompt_ids, completion_ids) into (B, T) tensors for training."""
    length = max(len(p) + len(c) for p, c in pairs)
    input_ids = torch.full((len(pairs), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(pairs), length), IGNORE_INDEX, dtype=torch.long)  # pads are never targets
    attention_mask = torch.zeros((len(pairs), length), dtype=torch.long)
    for i, (p, c) in enumerate(pairs):
        n = len(p) + len(c)
        input_ids[i, :n] = torch.tensor(p + c)
        labels[i, :n] = torch.tensor(build_labels(p, c, train_on_prompt))
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def group_by_length(order: list[int], lengths: list[int], batch_size: int, generator: torch.Generator,
                    batches_per_group: int = 50) -> list[int]:
    """Reorder a shuffled index list so that each batch holds sequences of similar length.

    Cut `order` into groups of batches_per_group batches, sort each group by length, cut it into
    batches and shuffle the batches. Batches stay random, but pad far less: a batch costs as much
    as its longest sequence. HF Trainer's group_by_length (LengthGroupedSampler) sorts groups of up
    to 50 batches the same way, but keeps the batches in sorted order, longest first, unshuffled.
    """
    chunk = batch_size * batches_per_group
    batches = []
    for start in range(0, len(order), chunk):
        group = sorted(order[start : start + chunk], key=lambda i: lengths[i])
        batches += [group[j : j + batch_size] for j in range(0, len(group), batch_size)]
    full = [b for b in batches if len(b) == batch_size]  # the ragged tail batches go last, to be dropped
    ragged = [b for b in batches if len(b) < batch_size]
    shuffled = [full[i] for i in torch.randperm(len(full), generator=generator).tolist()]
    return [i for b in shuffled + ragged for i in b]


def train_batches(pairs: list, batch_size: int, steps_per_epoch: int, seed: int, by_length: bool):
    """Global batches of train pair indices, reshuffled each epoch: yields (epoch, indices).

    Every rank draws the same permutation (a generator seeded with `seed`, not seed + rank) and
    takes its own slice of each batch, so the ranks together cover each batch exactly once.
    The last incomplete batch of an epoch is dropped; `by_length`: group_by_length.
    """
    generator = torch.Generator().manual_seed(seed)
    epoch = 0
    while True:
        order = torch.randperm(len(pairs), generator=generator).tolist()
        if by_length:
            order = group_by_length(order, [len(p) + len(c) for p, c in pairs], batch_size, generator)
        for s in range(steps_per_epoch):
            yield epoch, order[s * batch_size : (s + 1) * batch_size]
        epoch += 1


def cosine_schedule(optimizer, warmup_steps: int, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The learning rate of step s: the optimizer's rate times cosine_with_warmup(s)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: cosine_with_warmup(step, warmup_steps, total_steps))


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks (a no-op on one process)."""
    if dist.is_initialized():
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


# ----------------------------------------------------------------------------------------------
# main: one optimizer step after another
# ----------------------------------------------------------------------------------------------
def main(args: Args) -> dict:
    # TRY NOT TO MODIFY: checks, processes, sizes, output dirs, data; the model; resume; logging
    start_time = time.time()
    setup = set_up(args)
    models = build_models(args, setup)
    progress, writer = start_or_resume(args, setup, models)
    model, optimizer, scheduler = models.model, models.optimizer, models.scheduler
    rank, world_size, device = setup.d.rank, setup.d.world_size, setup.d.device
    local_batch_size, micro_batch_size = setup.local_batch_size, setup.micro_batch_size

    # ALGO LOGIC: the training loop
    train_start = time.time()
    batches = train_batches(setup.train_pairs, args.batch_size, setup.steps_per_epoch, args.seed, args.group_by_length)
    for _ in range(progress.start_step):  # the data position: replay the shuffles up to the checkpoint
        next(batches)
    signals = catch_signals()
    bar = tqdm(range(progress.start_step + 1, setup.total_steps + 1), initial=progress.start_step,
               total=setup.total_steps, desc="sft", disable=not setup.d.is_main, dynamic_ncols=True)
    for step in bar:
        epoch, indices = next(batches)
        # this rank's slice of the global batch, cut into micro-batches of (B, T) right-padded tensors
        local = [setup.train_pairs[i] for i in indices[rank * local_batch_size : (rank + 1) * local_batch_size]]
        micro_batches = [collate(local[j : j + micro_batch_size], setup.tokenizer.pad_token_id, args.train_on_prompt)
                         for j in range(0, local_batch_size, micro_batch_size)]
        micro_batches = [{key: value.to(device) for key, value in mb.items()} for mb in micro_batches]
        # Token-level mean over the whole optimizer batch: each micro-batch's summed NLL is divided by the
        # number of targets in the global batch, so the gradient is the same however the batch is split
        # over processes and accumulation steps (the gradient-accumulation loss bug fixed in transformers
        # 4.46 came from averaging per micro-batch instead). x world_size undoes FSDP's gradient averaging.
        local_targets = sum((mb["labels"][:, 1:] != IGNORE_INDEX).sum() for mb in micro_batches)
        (num_targets,) = all_reduce_sum(torch.tensor([float(local_targets)], dtype=torch.float64, device=device)).tolist()
        step_nll = 0.0
        for j, mb in enumerate(micro_batches):
            if world_size > 1:  # reduce-scatter gradients once per optimizer step, on the last micro-batch
                model.set_requires_gradient_sync(j == len(micro_batches) - 1)
            logits = model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"]).logits  # (B, T, V)
            nll, _ = sft_loss(logits, mb["labels"])
            (nll / num_targets * world_size).backward()
            step_nll += nll.item()
        step_tokens = sum(int(mb["attention_mask"].sum()) for mb in micro_batches)
        # the SIGTERM flag rides along: if any rank was signalled, every rank checkpoints at this step
        totals = torch.tensor([float(v) for v in (step_nll, step_tokens, signals["stop"])], dtype=torch.float64, device=device)
        step_nll, step_tokens, stop = all_reduce_sum(totals).tolist()
        train_loss = step_nll / num_targets
        # gradient clipping on the global norm (a DTensor under FSDP2); with no clipping, just measure it
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm or float("inf"))
        grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        stop_if_diverged({"training loss": train_loss, "gradient norm": grad_norm}, step, setup.checkpoint_dir)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        lr = scheduler.get_last_lr()[0]  # the rate this step used
        scheduler.step()

        # TRY NOT TO MODIFY: logging, evaluation and checkpoints
        progress.train_loss, progress.tokens_seen = train_loss, progress.tokens_seen + step_tokens
        log(writer, {"train/loss": train_loss, "train/lr": lr, "train/grad_norm": grad_norm, "charts/epoch": epoch,
                     "charts/tokens_per_sec": progress.tokens_seen / (time.time() - train_start)}, step)
        bar.set_postfix(loss=f"{train_loss:.3f}", val=f"{progress.val_loss:.3f}", epoch=epoch)
        if step % args.eval_every == 0 or step == setup.total_steps:
            run_eval(step, args, setup, models, progress, writer)
        save_or_stop(step, stop, signals, args, setup, models, progress)
    bar.close()

    return final_report(args, setup, models, progress, writer, start_time)


# ----------------------------------------------------------------------------------------------
# TRY NOT TO MODIFY: everything below is plumbing that main() calls in one line each: the run's setup and
# checks, the data, the model, resume and checkpoints, logging, evaluation and the final report, the
# presets and the command line.
# ----------------------------------------------------------------------------------------------
@dataclass
class Setup:
    """What main() sets up once: processes, sizes, paths and the tokenized data (set_up)."""
    d: Dist
    local_batch_size: int  # sequences per optimizer step on this rank
    micro_batch_size: int  # sequences per forward on this rank
    steps_per_epoch: int  # the last incomplete batch of an epoch is dropped
    total_steps: int
    run_name: str  # TensorBoard logs go to runs/{run_name}; a resumed run keeps the checkpoint's
    checkpoint_dir: str
    eval_fn: Callable | None  # module:function(prompt, completion) -> bool | float, or None
    tokenizer: object
    stop_ids: list[int]  # a sample ends at any of these (EOS, a chat template's end-of-turn token)
    train_pairs: list[tuple[list[int], list[int]]]  # (prompt_ids, completion_ids), all of them on every rank
    eval_prompts: list[str]  # the eval split's prompt texts, as the model sees them
    eval_pairs: list[tuple[list[int], list[int]]]


@dataclass
class Progress:
    """What a checkpoint carries beyond the weights, the optimizer and the schedule: the step it was taken after,
    the losses so far and the tokens seen."""
    start_step: int
    initial_val_loss: float | None  # None until the first validation
    val_loss: float | None
    train_loss: float | None  # None until a step is taken (--max_steps 0: evaluate only)
    tokens_seen: float


@dataclass
class Models:
    """The model and what trains it (build_models)."""
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR


# Setup, and the checks of the flags and the inputs
def set_up(args: Args) -> Setup:
    """Check every flag, start the processes, derive the sizes, check the model and the output dirs, seed, and
    read and tokenize the data: everything that can fail before the model is loaded."""
    check_args(args)
    d = setup_distributed()
    if args.batch_size % (d.world_size * args.gradient_accumulation_steps) != 0:
        raise SystemExit(f"--batch_size {args.batch_size} must be divisible by the {d.world_size} processes x "
                         f"--gradient_accumulation_steps {args.gradient_accumulation_steps}")
    local_batch_size = args.batch_size // d.world_size  # sequences per optimizer step on this rank
    micro_batch_size = local_batch_size // args.gradient_accumulation_steps  # sequences per forward
    run_name = args.run_name or f"sft_{args.seed}_{int(time.time())}"
    checkpoint_dir = args.checkpoint_dir or args.output_dir.rstrip("/") + "_checkpoints"
    eval_fn = load_eval_fn(args.eval_fn)
    check_model_dir(args.model_name_or_path, "model")
    prepare_output(args.output_dir, checkpoint_dir, "sft", {"model": args.model_name_or_path, "dataset": args.dataset},
                   args.resume, args.overwrite, args_json(args), d.world_size)
    seed_everything(args.seed, d.rank)

    tokenizer = load_tokenizer(args.model_name_or_path, padding_side="right", add_pad_token=args.add_pad_token)
    data, conversational = load_pairs(args, tokenizer)
    train_pairs = data[args.train_split][1]
    eval_prompts, eval_pairs = (rows[: args.num_eval_pairs] for rows in data[args.eval_split])
    # samples end at EOS, or at the chat template's end-of-turn token when the data is conversational
    stop_ids = [tokenizer.eos_token_id, *(end_of_turn_tokens(tokenizer) if conversational else [])]
    steps_per_epoch = len(train_pairs) // args.batch_size  # the last incomplete batch of an epoch is dropped
    if steps_per_epoch == 0:
        raise SystemExit(f"the train split has {len(train_pairs)} rows, fewer than --batch_size {args.batch_size}")
    total_steps = args.max_steps if args.max_steps is not None else steps_per_epoch * args.num_train_epochs
    print0(f"{len(train_pairs)} train / {len(eval_pairs)} validation pairs, {total_steps} steps of "
           f"{args.batch_size} sequences ({d.world_size} processes x {args.gradient_accumulation_steps} "
           f"accumulation x {micro_batch_size})")
    return Setup(d, local_batch_size, micro_batch_size, steps_per_epoch, total_steps, run_name, checkpoint_dir, eval_fn,
                 tokenizer, stop_ids, train_pairs, eval_prompts, eval_pairs)


def check_args(args: Args) -> None:
    """Every numeric flag in range, before anything loads (None leaves a flag off)."""
    check_flags(args, at_least_1=("batch_size", "gradient_accumulation_steps", "num_train_epochs", "eval_every",
                                  "eval_batch_size", "max_prompt_length", "max_completion_length", "max_new_tokens"),
                positive=("learning_rate", "adam_eps", "temperature"),
                non_negative=("warmup_steps", "max_steps", "num_eval_samples", "num_logged_samples", "weight_decay",
                              "num_eval_pairs", "max_dropped_fraction",
                              "max_grad_norm", "checkpoint_every"))


def load_eval_fn(spec: str | None) -> Callable | None:
    """`module:function` -> the function, imported by name (e.g. toy_task:is_grammatical)."""
    if spec is None:
        return None
    module_name, _, fn_name = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), fn_name)
    except (ImportError, AttributeError, ValueError):
        raise SystemExit(f"--eval_fn '{spec}' cannot be imported; give it as module:function") from None
    return fn


def stop_if_diverged(values: dict[str, float], step: int, checkpoint_dir: str) -> None:
    """A non-finite training loss or gradient norm stops the run before the optimizer step can carry it into
    the weights, naming the last good checkpoint."""
    for name, value in values.items():
        if not math.isfinite(value):  # all-reduced values, the same on every rank: all stop together
            raise SystemExit(f"the {name} is {value} at step {step}: stopped before the optimizer step; last good "
                             f"checkpoint: {latest_checkpoint(checkpoint_dir) or 'none'}. Lower --learning_rate or check the data")


# Data: (prompt, completion) text -> token ids
def load_pairs(args: Args, tokenizer) -> tuple[dict, bool]:
    """{split: (prompt texts, [(prompt_ids, completion_ids), ...])} for the train and eval splits, the unusable
    rows dropped; and whether the (last read) split is conversational."""
    data = {}
    for split, ds in load_splits(args).items():
        where = f"dataset '{args.dataset}' split '{split}'"
        prompts, completions, conversational = prompts_and_completions(ds, args, tokenizer, where)
        keep = usable_rows(prompts, completions, args, where)
        prompts, completions = [prompts[i] for i in keep], [completions[i] for i in keep]
        data[split] = (prompts, tokenize_pairs(prompts, completions, tokenizer, args, conversational, where))
    return data, conversational


def load_splits(args: Args) -> dict:
    """The train and eval splits of a hub dataset or a local directory, or a one-line error."""
    splits = load_dataset(args.dataset)
    for split in (args.train_split, args.eval_split):
        if split not in splits:
            raise SystemExit(f"dataset '{args.dataset}' has no split '{split}' (it has: {', '.join(splits)}); "
                             "set --train_split / --eval_split")
    return {split: splits[split] for split in (args.train_split, args.eval_split)}


def render_conversation(tokenizer, prompt_messages: list[dict], completion_messages: list[dict]) -> tuple[str, str]:
    """(prompt text ending in the generation prompt, completion text) from the chat template.

    prompt = the chat template applied to prompt_messages, ending with the assistant marker
    (add_generation_prompt=True); completion = the rest of the rendered conversation: the completion turns, the
    last one the assistant's, with the template's end-of-turn token, if it has one (<|im_end|>, <|eot_id|>), so
    the model learns to end its turn the way the template does; ppo.py stops at that token.
    Raises ValueError; the caller names the row.
    """
    if not completion_messages or completion_messages[-1].get("role") != "assistant":
        raise ValueError("the last message must have role 'assistant'")
    prompt = tokenizer.apply_chat_template(prompt_messages, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(prompt_messages + completion_messages, tokenize=False)
    if not full.startswith(prompt):
        raise ValueError("the chat template renders the prompt differently with and without the last turn")
    return prompt, full[len(prompt):].rstrip()  # the newline after an end-of-turn token is not the model's to learn


def split_implicit_prompt(text: str, marker: str) -> tuple[str, str]:
    """A whole dialogue -> (prompt up to and including the last `marker`, the final reply)."""
    cut = text.rfind(marker)
    if cut < 0:
        raise ValueError(f"no {marker!r} in the text: cannot tell where the prompt ends")
    return text[: cut + len(marker)], text[cut + len(marker):]


def prompts_and_completions(ds, args: Args, tokenizer, where: str) -> tuple[list[str], list[str], bool]:
    """Read the standard (prompt/completion columns) or conversational (messages) format.

    Returns (prompts, completions, conversational).
    """
    columns = ds.column_names
    if args.dataset_format == "implicit_prompt":
        if args.completion_column not in columns:
            raise SystemExit(f"{where} has no column '{args.completion_column}' (it has: {', '.join(columns)}); "
                             "set --completion_column to the whole-dialogue column")
        prompts, completions = [], []
        texts = list(ds[args.completion_column])
        check_texts(texts, args.completion_column, where)
        for i, text in enumerate(texts):
            try:
                prompt, completion = split_implicit_prompt(text, args.implicit_prompt_marker)
            except ValueError:
                prompt, completion = None, text  # no marker: a row that cannot be used (see usable_rows)
            prompts.append(prompt)
            completions.append(completion)
        return prompts, completions, False
    conversational = args.dataset_format == "conversational" or (
        args.dataset_format == "auto" and args.prompt_column not in columns and args.messages_column in columns)
    if conversational:
        if args.messages_column not in columns:
            raise SystemExit(f"{where} has no column '{args.messages_column}' (it has: {', '.join(columns)}); "
                             "set --messages_column")
        if tokenizer.chat_template is None:
            raise SystemExit(f"{where} is conversational ('{args.messages_column}') but the tokenizer of "
                             f"'{args.model_name_or_path}' has no chat template; set tokenizer.chat_template")
        prompts, completions = [], []
        for i, messages in enumerate(ds[args.messages_column]):
            check_messages(messages, f"{where}: row {i}")
            try:  # the last turn is the completion, the turns before it the prompt
                prompt, completion = render_conversation(tokenizer, messages[:-1], messages[-1:])
            except ValueError as e:
                raise SystemExit(f"{where}: row {i}: {e}") from None
            prompts.append(prompt)
            completions.append(completion)
        return prompts, completions, True
    for column, flag in ((args.prompt_column, "prompt_column"), (args.completion_column, "completion_column")):
        if column not in columns:
            raise SystemExit(f"{where} has no column '{column}' (it has: {', '.join(columns)}); set --{flag}, "
                             f"or give a '{args.messages_column}' column for the conversational format")
    prompts, completions = list(ds[args.prompt_column]), list(ds[args.completion_column])
    if prompts and isinstance(prompts[0], list):  # TRL's conversational prompt/completion: lists of messages
        if tokenizer.chat_template is None:
            raise SystemExit(f"{where} holds messages but the tokenizer of '{args.model_name_or_path}' has no chat "
                             "template; set tokenizer.chat_template")
        rendered = []
        for i, (prompt, completion) in enumerate(zip(prompts, completions)):
            check_messages(prompt, f"{where}: row {i}: '{args.prompt_column}'")
            check_messages(completion, f"{where}: row {i}: '{args.completion_column}'")
            try:
                rendered.append(render_conversation(tokenizer, list(prompt), list(completion)))
            except ValueError as e:
                raise SystemExit(f"{where}: row {i}: {e}") from None
        return [p for p, _ in rendered], [c for _, c in rendered], True
    check_texts(prompts, args.prompt_column, where)
    check_texts(completions, args.completion_column, where)
    return prompts, completions, False


def usable_rows(prompts: list[str | None], completions: list[str], args: Args, where: str) -> list[int]:
    """The rows to train on: one without a prompt (no --implicit_prompt_marker in it), with an empty prompt or
    with an empty completion is dropped and counted (common.drop_unusable, the same policy in every stage)."""
    reasons = ["without the prompt marker" if p is None else "with an empty prompt" if not p.strip() else
               "with an empty completion" if not c.strip() else None for p, c in zip(prompts, completions)]
    return drop_unusable(reasons, where, args.max_dropped_fraction)


def tokenize_pairs(prompts, completions, tokenizer, args: Args, conversational: bool, where: str):
    """Text -> (prompt_ids, completion_ids) per row; EOS appended to each completion; lengths checked."""
    # A rendered chat prompt already holds the template's special tokens (a BOS, if any): add none twice.
    prompt_ids = tokenizer(prompts, add_special_tokens=not conversational)["input_ids"]
    completion_ids = tokenizer(completions, add_special_tokens=False)["input_ids"]
    check_unknown_tokens(prompt_ids + completion_ids, tokenizer, where)
    # EOS after every completion: the model must learn to stop. The EOS trick of Huang et al. 2024
    # (PPO penalises completions without EOS) relies on it. A completion that already ends in EOS
    # (TL;DR's " {summary}<|endoftext|>") or in the chat template's end-of-turn token gets no EOS after it.
    stops = {tokenizer.eos_token_id, *(end_of_turn_tokens(tokenizer) if conversational else [])}
    completion_ids = [ids if ids and ids[-1] in stops else ids + [tokenizer.eos_token_id] for ids in completion_ids]

    # a long prompt keeps its end, the text the completion continues, behind its BOS or chat header
    n = len(prompt_ids)
    prompt_ids = fit_prompts(prompt_ids, args.max_prompt_length, args.truncate_long_prompts,
                             prompt_head(tokenizer, conversational), where)

    m = args.max_completion_length
    too_long = [i for i, ids in enumerate(completion_ids) if len(ids) > m]
    if too_long:
        # Cut completions lose their EOS on purpose: EOS means "the text is finished". Keeping it after a
        # cut would teach the model to stop mid-sentence.
        print0(f"warning: {where}: {len(too_long)} of {n} completions are longer than max_completion_length={m} "
               "tokens (EOS included); cutting them, without EOS")
        completion_ids = [ids[:m] for ids in completion_ids]
    return list(zip(prompt_ids, completion_ids))


# The model
def build_models(args: Args, setup: Setup) -> Models:
    """The base model (embeddings grown to the tokenizer, dropout off), checked against the longest sequence,
    sharded with FSDP2 under torchrun, in training mode; its AdamW and the cosine schedule with warm-up."""
    model = load_causal_lm(args.model_name_or_path, setup.tokenizer, args.dtype)
    max_positions = getattr(model.config, "max_position_embeddings", None)
    longest = args.max_prompt_length + max(args.max_completion_length, args.max_new_tokens)
    if max_positions is not None and longest > max_positions:
        raise SystemExit(f"max_prompt_length + max(max_completion_length, max_new_tokens) = {longest} exceeds "
                         f"the model's {max_positions} positions; lower them")
    model = fsdp_wrap(model, setup.d.device)  # FSDP2 under torchrun; a no-op on a single process
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, eps=args.adam_eps,
                                  weight_decay=args.weight_decay)
    return Models(model, optimizer, cosine_schedule(optimizer, args.warmup_steps, setup.total_steps))


# Resume and checkpoints
def start_or_resume(args: Args, setup: Setup, models: Models) -> tuple[Progress, object]:
    """--resume: model, optimizer, schedule, counters and RNG states as they were after the checkpoint's step;
    otherwise the validation loss before training. Then (rank 0) the TensorBoard writer."""
    resumed = None
    if args.resume:
        latest = latest_checkpoint(setup.checkpoint_dir)
        resumed = load_checkpoint(latest, models.model, models.optimizer)
        models.scheduler.load_state_dict(resumed["scheduler"])
        setup.run_name = resumed["run_name"]
        print0(f"resumed from {latest} (step {resumed['step']} of {setup.total_steps})")
    writer = None
    if setup.d.is_main:
        from torch.utils.tensorboard import SummaryWriter

        # on resume, drop the events a killed run logged after its last checkpoint
        writer = SummaryWriter(f"runs/{setup.run_name}", purge_step=resumed["step"] + 1 if resumed else None)
        writer.add_text("hyperparameters", "|param|value|\n|-|-|\n%s" % "\n".join(
            f"|{key}|{value}|" for key, value in {**asdict(args), "world_size": setup.d.world_size}.items()))
    if resumed:
        return Progress(resumed["step"], resumed["initial_val_loss"], resumed["val_loss"], resumed["train_loss"],
                        resumed["tokens_seen"]), writer
    progress = Progress(0, None, None, None, 0)
    run_eval(0, args, setup, models, progress, writer)
    progress.initial_val_loss = progress.val_loss
    print0(f"step 0: val loss {progress.val_loss:.4f}")
    return progress, writer


def save_or_stop(step: int, stop: float, signals: dict, args: Args, setup: Setup, models: Models,
                 progress: Progress) -> None:
    """A checkpoint every --checkpoint_every steps, at the end, and when a signal came; then, for a signal, exit."""
    if (args.checkpoint_every and step % args.checkpoint_every == 0) or step == setup.total_steps or stop:
        state = {"step": step, "args": args_json(args), "run_name": setup.run_name, "scheduler": models.scheduler.state_dict(),
                 "initial_val_loss": progress.initial_val_loss, "val_loss": progress.val_loss,
                 "train_loss": progress.train_loss, "tokens_seen": progress.tokens_seen}
        path = save_checkpoint(setup.checkpoint_dir, step, models.model, models.optimizer, state, "sft")
        if stop:
            exit_preempted(path, f"step {step}", signals["signal"])


# Logging, evaluation and the final report (every process calls them: under FSDP2 each forward is collective)
def log(writer, metrics: dict, step: int) -> None:
    """Scalars to TensorBoard; only rank 0 has a writer."""
    if writer is not None:
        for key, value in metrics.items():
            writer.add_scalar(key, value, step)


def run_eval(step: int, args: Args, setup: Setup, models: Models, progress: Progress, writer) -> None:
    """Validation loss (kept in progress), plus a few sample generations written to TensorBoard."""
    progress.val_loss = validation_loss(models.model, setup.eval_pairs, args, setup.tokenizer.pad_token_id, setup.d)
    log(writer, {"val/loss": progress.val_loss}, step)
    k = args.num_logged_samples
    if k > 0:  # every rank samples the same prompts (generation is collective under FSDP2)
        texts, ended = sample_completions(models.model, setup.tokenizer, [p for p, _ in setup.eval_pairs[:k]], args,
                                          setup.d.device, setup.stop_ids)
        if writer is not None:
            writer.add_text("samples", samples_markdown(setup.eval_prompts[:k], texts, ended), step)


def rank_shard(items: list, rank: int, world_size: int) -> list:
    """This rank's share: items rank, rank + W, ... of the first len - len % W items.

    Equal shares on every rank, so every rank runs the same number of (collective) forwards.
    Up to W - 1 items are left out.
    """
    return items[: len(items) - len(items) % world_size][rank::world_size]


@torch.no_grad()
def validation_loss(model, pairs, args: Args, pad_token_id: int, ddist) -> float:
    """Mean NLL per target token over the validation pairs (all ranks together)."""
    model.eval()
    shard = rank_shard(pairs, ddist.rank, ddist.world_size)
    nll, count = 0.0, 0
    for i in range(0, len(shard), args.eval_batch_size):
        batch = collate(shard[i : i + args.eval_batch_size], pad_token_id, args.train_on_prompt)
        batch = {key: value.to(ddist.device) for key, value in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        batch_nll, batch_count = sft_loss(logits, batch["labels"])
        nll, count = nll + batch_nll.item(), count + batch_count.item()
    model.train()
    totals = torch.tensor([float(v) for v in (nll, count)], dtype=torch.float64, device=ddist.device)
    nll, count = all_reduce_sum(totals).tolist()
    return nll / max(count, 1)


def left_pad(sequences: list[list[int]], pad_token_id: int, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad prompts for batched generation, so that every row's next token goes in the same column.
    -> (B, P) input_ids, attention_mask on `device`"""
    length = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for i, s in enumerate(sequences):
        input_ids[i, length - len(s):] = torch.tensor(s)
        attention_mask[i, length - len(s):] = 1
    return input_ids.to(device), attention_mask.to(device)


@torch.no_grad()
def sample_completions(model, tokenizer, prompt_ids: list[list[int]], args: Args, device,
                       stop_ids: list[int]) -> tuple[list[str], list[bool]]:
    """Sample a completion per prompt; return its text up to the first EOS (or other stop token, e.g. a chat
    end-of-turn), and whether one came.

    Batched and left-padded. Sampling uses the full distribution (top_k 0, top_p 1), as Huang et al. 2024; nothing
    else applies, since the model's generation_config holds only the token ids (common.token_ids_only).
    """
    model.eval()
    pad = tokenizer.pad_token_id
    texts, ended = [], []
    for i in range(0, len(prompt_ids), args.eval_batch_size):
        input_ids, attention_mask = left_pad(prompt_ids[i : i + args.eval_batch_size], pad, device)
        output = model.generate(
            input_ids=input_ids, attention_mask=attention_mask, do_sample=True, temperature=args.temperature,
            top_k=0, top_p=1.0, max_new_tokens=args.max_new_tokens, eos_token_id=stop_ids, pad_token_id=pad,
            # FSDP2: a rank that finished early must keep joining the others' collective forwards
            synced_gpus=dist.is_initialized(),
        )
        for response in output[:, input_ids.shape[1]:].tolist():  # (B, new tokens)
            stop = min([response.index(e) for e in stop_ids if e in response], default=len(response))
            texts.append(tokenizer.decode(response[:stop], skip_special_tokens=False))
            ended.append(stop < len(response))
    model.train()
    return texts, ended


def samples_markdown(prompts: list[str], completions: list[str], ended: list[bool]) -> str:
    rows = [f"| {p} | {c} | {'yes' if e else 'no'} |" for p, c, e in zip(prompts, completions, ended)]
    return "| prompt | completion | EOS |\n|-|-|-|\n" + "\n".join(r.replace("\n", " ") for r in rows)


def final_report(args: Args, setup: Setup, models: Models, progress: Progress, writer, start_time: float) -> dict:
    """The final score: the validation prompts sampled at the sampling temperature (every rank its share), scored by
    --eval_fn; then the model saved (collective; atomic, so a crash earlier leaves any old output_dir intact) with
    eval_results.json, and a summary line."""
    rank, world_size, device, eval_fn = setup.d.rank, setup.d.world_size, setup.d.device, setup.eval_fn
    prompts = rank_shard(setup.eval_prompts[: args.num_eval_samples], rank, world_size)
    prompt_ids = rank_shard([p for p, _ in setup.eval_pairs[: args.num_eval_samples]], rank, world_size)
    texts, ended = sample_completions(models.model, setup.tokenizer, prompt_ids, args, device, setup.stop_ids)
    scores = [float(eval_fn(p, c)) for p, c in zip(prompts, texts)] if eval_fn else [0.0] * len(texts)
    totals = torch.tensor([float(v) for v in (len(texts), sum(ended), sum(scores),
                                              sum(s for s, e in zip(scores, ended) if e))],
                          dtype=torch.float64, device=device)
    n, n_eos, score_sum, score_and_eos_sum = all_reduce_sum(totals).tolist()
    metrics = {
        "val_loss": progress.val_loss,
        "initial_val_loss": progress.initial_val_loss,
        "train_loss": progress.train_loss,
        "eos_rate": n_eos / n if n else None,
        "eval_fn": args.eval_fn,
        "eval_fn_mean": score_sum / n if eval_fn and n else None,
        # the acceptance figure: the eval_fn score counted only for samples that ended with EOS
        "eval_fn_and_eos": score_and_eos_sum / n if eval_fn and n else None,
        "num_eval_samples": int(n),
        "temperature": args.temperature,
        "steps": setup.total_steps,
        "world_size": world_size,
        "run_name": setup.run_name,
    }
    log(writer, {f"eval/{k}": metrics[k] for k in ("eos_rate", "eval_fn_mean", "eval_fn_and_eos") if metrics[k] is not None},
        setup.total_steps)
    if writer is not None:
        writer.add_text("final_samples", samples_markdown(prompts[:16], texts[:16], ended[:16]), setup.total_steps)

    metrics["wall_time_s"] = round(time.time() - start_time, 1)
    save_model(models.model, setup.tokenizer, args.output_dir, "sft", results=metrics)
    if setup.d.is_main:
        writer.close()
    samples = ""
    if n:
        samples = f", {int(n)} samples at T={args.temperature}: EOS {metrics['eos_rate']:.1%}"
        samples += f", {args.eval_fn} and EOS {metrics['eval_fn_and_eos']:.1%}" if eval_fn else ""
    print0(f"sft done: val loss {progress.initial_val_loss:.3f} -> {progress.val_loss:.3f}{samples}; "
           f"{setup.total_steps} steps, {metrics['wall_time_s']:.0f}s -> {args.output_dir}")
    teardown_distributed()
    return metrics


def parse_args(argv=None) -> Args:
    """Args from the command line: a preset's name (presets.py; none: the toy task), then flags over it."""
    return parse_args_with_presets(Args, presets.SFT, argv)


if __name__ == "__main__":
    run(main, parse_args)
