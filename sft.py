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
MODIFY, is the plumbing it calls in one line each: checks and setup, model building, resume and checkpoints,
logging, evaluation and the final report, the command line. Reading the data formats (prompt/completion columns,
chat messages, whole dialogues) into token ids is common.py's (load_sft_pairs), as are the presets' (presets.py).
"""

from __future__ import annotations

import math
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
    check_model_dir,
    end_of_turn_tokens,
    exit_preempted,
    fsdp_wrap,
    group_by_length,
    latest_checkpoint,
    load_causal_lm,
    load_checkpoint,
    load_eval_fn,
    load_sft_pairs,
    load_tokenizer,
    prepare_output,
    parse_args_with_presets,
    print0,
    run,
    save_checkpoint,
    save_model,
    seed_everything,
    setup_distributed,
    teardown_distributed,
    tensorboard_writer,
    write_scalars,
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


def train_batches(pairs: list, batch_size: int, steps_per_epoch: int, seed: int, by_length: bool):
    """Global batches of train pair indices, reshuffled each epoch: yields (epoch, indices).

    Every rank draws the same permutation (a generator seeded with `seed`, not seed + rank) and
    takes its own slice of each batch, so the ranks together cover each batch exactly once.
    The last incomplete batch of an epoch is dropped; `by_length`: common.group_by_length.
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
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: cosine_with_warmup(step, warmup_steps, total_steps))


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
        (num_targets,) = all_reduce_sum(
            torch.tensor([float(local_targets)], dtype=torch.float64, device=device)).tolist()
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
        totals = torch.tensor([float(v) for v in (step_nll, step_tokens, signals["stop"])], dtype=torch.float64,
                              device=device)
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
        tokens_per_sec = progress.tokens_seen / (time.time() - train_start)
        write_scalars(writer, {"train/loss": train_loss, "train/lr": lr, "train/grad_norm": grad_norm,
                               "charts/epoch": epoch, "charts/tokens_per_sec": tokens_per_sec}, step)
        bar.set_postfix(loss=f"{train_loss:.3f}", val=f"{progress.val_loss:.3f}", epoch=epoch)
        if step % args.eval_every == 0 or step == setup.total_steps:
            run_eval(step, args, setup, models, progress, writer)
        save_or_stop(step, stop, signals, args, setup, models, progress)
    bar.close()

    return final_report(args, setup, models, progress, writer, start_time)


# ----------------------------------------------------------------------------------------------
# TRY NOT TO MODIFY: everything below is plumbing that main() calls in one line each: the run's setup and
# checks (the data: common.load_sft_pairs), the model, resume and checkpoints, logging, evaluation and the
# final report, the command line.
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
    data, conversational = load_sft_pairs(args, tokenizer)
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


def stop_if_diverged(values: dict[str, float], step: int, checkpoint_dir: str) -> None:
    """A non-finite training loss or gradient norm stops the run before the optimizer step can carry it into
    the weights, naming the last good checkpoint."""
    for name, value in values.items():
        if not math.isfinite(value):  # all-reduced values, the same on every rank: all stop together
            raise SystemExit(f"the {name} is {value} at step {step}: stopped before the optimizer step; last good "
                             f"checkpoint: {latest_checkpoint(checkpoint_dir) or 'none'}. Lower --learning_rate or "
                             "check the data")


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
    writer = tensorboard_writer(setup.d.is_main, setup.run_name, {**asdict(args), "world_size": setup.d.world_size},
                                resumed["step"] if resumed else None)  # rank 0's
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
        state = {"step": step, "args": args_json(args), "run_name": setup.run_name,
                 "scheduler": models.scheduler.state_dict(),
                 "initial_val_loss": progress.initial_val_loss, "val_loss": progress.val_loss,
                 "train_loss": progress.train_loss, "tokens_seen": progress.tokens_seen}
        path = save_checkpoint(setup.checkpoint_dir, step, models.model, models.optimizer, state, "sft")
        if stop:
            exit_preempted(path, f"step {step}", signals["signal"])


# Logging, evaluation and the final report (every process calls them: under FSDP2 each forward is collective)
def run_eval(step: int, args: Args, setup: Setup, models: Models, progress: Progress, writer) -> None:
    """Validation loss (kept in progress), plus a few sample generations written to TensorBoard."""
    progress.val_loss = validation_loss(models.model, setup.eval_pairs, args, setup.tokenizer.pad_token_id, setup.d)
    write_scalars(writer, {"val/loss": progress.val_loss}, step)
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
    """Left padding, so every prompt ends where the response starts (Huang et al. 2024). -> (B, P) ids, mask"""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s):] = 1
    return ids.to(device), mask.to(device)


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
    final = {f"eval/{k}": metrics[k] for k in ("eos_rate", "eval_fn_mean", "eval_fn_and_eos") if metrics[k] is not None}
    write_scalars(writer, final, setup.total_steps)
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
