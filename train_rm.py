"""Stage 2 of RLHF: a scalar reward model trained on pairwise preferences (Bradley-Terry).

    python train_rm.py                          # toy task: models/sft -> models/rm, ~1.5 minutes on 2 CPU cores
    torchrun --nproc_per_node=2 train_rm.py     # the same with FSDP2 on 2 processes
    python train_rm.py pythia-tldr              # Huang et al. 2024's TL;DR reward model (GPUs)
    python train_rm.py --help                   # every flag

The model is the SFT checkpoint with its LM head swapped for a fresh scalar head
(`AutoModelForSequenceClassification`, `num_labels=1`). It reads `prompt + completion + EOS` and its
reward is the head's output at the last real token (the EOS). The loss is Bradley-Terry:
`-log sigmoid(r(x, y_chosen) - r(x, y_rejected))` (Christiano et al. 2017; Ouyang et al. 2022).

After training, the reward is normalised on samples of the SFT policy (Huang et al. 2024; Ziegler et al.
2019) and the statistics are stored in the saved config; see "THE NORMALISATION CONTRACT" below.

Implementation details, each marked by a comment where it happens:
- `pad_token_id` in the model config, a pad token distinct from EOS (common.load_reward_model);
- EOS appended to every text, the reward read at the last non-pad token, for left and right padding;
- position ids counted from the first real token, so padding never shifts a sequence;
- chosen and rejected scored in one concatenated forward;
- the scalar head initialised with std 1/sqrt(d_model + 1) (Ziegler et al. 2019, Huang et al. 2024);
- no dropout (common.disable_dropout);
- the reward bias (and optional gain) computed after training and stored in the config (TRL #1783).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
import tyro
from tqdm import tqdm

from common import (
    args_json,
    catch_signals,
    check_flags,
    check_messages,
    check_model_dir,
    check_texts,
    check_unknown_tokens,
    drop_unusable,
    end_of_turn_tokens,
    fit_prompts,
    exit_preempted,
    latest_checkpoint,
    load_checkpoint,
    load_dataset,
    save_checkpoint,
    fsdp_wrap,
    load_causal_lm,
    load_reward_model,
    load_tokenizer,
    prepare_output,
    print0,
    prompt_head,
    run,
    save_model,
    seed_everything,
    setup_distributed,
    teardown_distributed,
)


@dataclass
class Args:
    # data
    dataset: str = "toy_data/prefs"
    """preference dataset: a hub name or a local dir that `datasets.load_dataset` reads"""
    dataset_format: Literal["standard", "implicit_prompt", "conversational"] = "standard"
    """standard: prompt/chosen/rejected texts; implicit_prompt: whole dialogues sharing a prompt (Anthropic HH); conversational: lists of {role, content} messages, rendered with the chat template"""
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
    num_epochs: int = 1
    """passes over the training pairs (Huang et al. 2024 and Ouyang et al. 2022: 1; the RM overfits fast)"""
    batch_size: int = 128
    """pairs per optimiser step, over all processes (toy: ~21 prompts' 6 pairs each)"""
    per_device_batch_size: int = 128
    """pairs per forward on one process (a forward holds up to twice as many sequences)"""
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
    """after training, set the reward bias so SFT-policy samples score 0 on average (Huang et al. 2024)"""
    normalize_std: bool = False
    """also scale rewards so SFT-policy samples have std 1 (Ziegler et al. 2019)"""
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
    checkpoint_dir: str | None = None
    """where checkpoints go, the latest one kept (None: {output_dir}_checkpoints)"""
    resume: bool = False
    """continue from the latest checkpoint, with the same flags: on CPU the result is bit-identical to an
    uninterrupted run"""
    overwrite: bool = False
    """replace a finished run in output_dir, or start over where an unfinished run left checkpoints"""


PRESETS = {
    "toy": ("offline toy task (default)", Args()),
    "pythia-tldr": (
        "Pythia-1B RM on TL;DR preferences, Huang et al. 2024 (GPU)",
        # Huang et al. 2024, summarize_from_feedback_details/reward.py: AdamW lr 3e-6 eps 1e-5, cosine, 1 epoch,
        # batch 64 (8 GPUs x grad-accum 8), 92,832 pairs, queries <= 512 tokens, query+response <= 638 tokens.
        # Text columns: "query" is the formatted post ending in "TL;DR:", "chosen"/"rejected" start with a
        # space and end in "<|endoftext|>" (so no separator, and no second EOS). They normalised on the SFT
        # dataset's reference summaries; we use SFT-policy samples (temperature 0.7, 53 tokens, as their PPO).
        Args(
            model_name_or_path="models/sft",
            dataset="vwxyzjn/summarize_from_feedback_oai_preprocessing_1706381144",
            prompt_column="query",
            separator="",
            max_length=640,
            learning_rate=3e-6,
            weight_decay=0.01,  # torch's AdamW default, which Huang et al. keep
            num_epochs=1,
            lr_schedule="cosine",
            batch_size=64,
            per_device_batch_size=8,
            eval_batch_size=16,
            eval_every=500,
            group_by_length=False,  # plain shuffled batches, as theirs
            group_by_prompt=False,
            prompt_dataset="vwxyzjn/summarize_from_feedback_tldr_3_filtered_oai_preprocessing_1706381144",
            prompt_dataset_column="query",
            num_normalisation_prompts=2048,
            response_length=53,
            max_prompt_length=512,  # as ppo.py pythia-tldr
            truncate_long_prompts=True,
            generation_batch_size=64,
        ),
    ),
    "hh-rlhf": (
        "Pythia-1B RM on Anthropic HH-RLHF (GPU)",
        # chosen/rejected are whole dialogues; the prompt is their shared prefix up to the last
        # "\n\nAssistant:" (--dataset_format implicit_prompt). Settings past the data are the TL;DR preset's.
        Args(
            model_name_or_path="models/sft",
            dataset="Anthropic/hh-rlhf",
            dataset_format="implicit_prompt",
            eval_split="test",
            max_length=768,
            learning_rate=3e-6,
            weight_decay=0.01,
            num_epochs=1,
            batch_size=64,
            per_device_batch_size=8,
            eval_batch_size=16,
            eval_every=500,
            group_by_length=False,
            num_normalisation_prompts=2048,
            response_length=128,
            max_prompt_length=512,  # as ppo.py hh-rlhf
            truncate_long_prompts=True,
            generation_batch_size=32,
        ),
    ),
    "ultrafeedback": (
        "Qwen2.5-0.5B RM on UltraFeedback binarized, chat template (GPU)",
        # chosen/rejected are [user, assistant] conversations that share the user turn; each is rendered
        # with the chat template and the reward is read at the assistant's end-of-turn token.
        Args(
            model_name_or_path="models/sft",
            dataset="HuggingFaceH4/ultrafeedback_binarized",
            dataset_format="conversational",
            train_split="train_prefs",
            eval_split="test_prefs",
            max_length=2048,
            learning_rate=3e-6,
            weight_decay=0.01,
            num_epochs=1,
            batch_size=64,
            per_device_batch_size=4,
            eval_batch_size=8,
            eval_every=500,
            group_by_length=False,
            num_normalisation_prompts=1024,
            response_length=256,
            max_prompt_length=1024,  # as ppo.py ultrafeedback
            truncate_long_prompts=True,
            generation_batch_size=16,
        ),
    ),
}


def parse_args(argv=None) -> Args:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and not argv[0].startswith("-") and argv[0] not in PRESETS:
        raise SystemExit(f"unknown preset '{argv[0]}'; the presets are {', '.join(PRESETS)} (flags start with --)")
    if not argv or argv[0] not in (*PRESETS, "-h", "--help"):
        argv = ["toy", *argv]  # no preset named: the toy default
    return tyro.extras.overridable_config_cli(PRESETS, args=argv, use_underscores=True)


def check_args(args: Args) -> None:
    """Every numeric flag in range, before anything loads (None leaves a flag off)."""
    check_flags(args, at_least_1=("max_length", "num_train_pairs", "num_eval_pairs", "num_epochs", "batch_size",
                                  "per_device_batch_size", "eval_batch_size", "log_every", "num_normalisation_prompts", "max_prompt_length",
                                  "response_length", "generation_batch_size"),
                positive=("learning_rate", "adam_eps", "temperature"),
                non_negative=("weight_decay", "warmup_steps", "max_grad_norm", "eval_every", "checkpoint_every",
                              "max_dropped_fraction"))


# ----------------------------------------------------------------------------------------------
# ALGO LOGIC: the loss and the reward
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
    """position = number of real tokens before this one, so left padding shifts nothing. (B, T)"""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def get_reward(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """r(x, y) = score_head(h_T), h_T the last hidden state at the last real token (the EOS). (B, T) -> (B,)

    HF's *ForSequenceClassification reads the rightmost token != config.pad_token_id, which is the last
    real token for left padding, right padding, and both at once (PPO's left-padded query + right-padded
    response); tests/test_rm.py checks this. Positions are counted from the first real token.
    """
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids_from(attention_mask))
    return out.logits.squeeze(-1).float()


# ----------------------------------------------------------------------------------------------
# Data: every format becomes (prompt, chosen completion, rejected completion) texts
# ----------------------------------------------------------------------------------------------
def split_implicit_prompt(chosen: str, rejected: str, marker: str = "\n\nAssistant:") -> tuple[str, str, str]:
    """prompt = the longest common prefix of chosen and rejected, cut just after its last `marker`.

    Anthropic HH stores whole dialogues: "\\n\\nHuman: ... \\n\\nAssistant: ...". Returns
    (prompt, chosen_completion, rejected_completion) with prompt + completion == the original text.
    Raises ValueError when the shared prefix holds no marker.
    """
    common = os.path.commonprefix([chosen, rejected])
    cut = common.rfind(marker)
    if cut < 0:
        raise ValueError(f"chosen and rejected share no {marker!r}: cannot tell where the prompt ends")
    end = cut + len(marker)
    return chosen[:end], chosen[end:], rejected[end:]


def render_conversation(tokenizer, prompt_messages: list[dict], completion_messages: list[dict]) -> tuple[str, str]:
    """(prompt text ending in the generation prompt, completion text) from the chat template."""
    prompt = tokenizer.apply_chat_template(prompt_messages, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(prompt_messages + completion_messages, tokenize=False)
    if not full.startswith(prompt):
        raise SystemExit("the chat template renders the prompt differently with and without the completion; "
                         "use --dataset_format standard with pre-rendered texts")
    return prompt, full[len(prompt):].rstrip()  # ends at the end-of-turn token, where ppo.py's responses stop


def load_split(args: Args, dataset, split: str, tokenizer, max_pairs: int | None) -> dict:
    """Check the columns, convert to prompt/completion texts, tokenize. Returns a dict of lists:
    chosen_ids / rejected_ids (prompt + completion + EOS, token ids), prompt (texts), margin (floats or None).
    """
    if split not in dataset:
        raise SystemExit(f"dataset '{args.dataset}' has no split '{split}' (it has: {', '.join(dataset)}); "
                         f"pass --{'train' if split == args.train_split else 'eval'}_split NAME")
    data = dataset[split]
    needed = {"chosen_column": args.chosen_column, "rejected_column": args.rejected_column}
    if args.dataset_format == "standard":
        needed["prompt_column"] = args.prompt_column
    if args.margin_column is not None:
        needed["margin_column"] = args.margin_column
    for flag, column in needed.items():
        if column not in data.column_names:
            hint = ""
            if flag == "prompt_column" and isinstance(data[0][args.chosen_column], str) \
                    and args.implicit_prompt_marker in data[0][args.chosen_column]:
                hint = " (whole dialogues in chosen/rejected? use --dataset_format implicit_prompt)"
            raise SystemExit(f"dataset '{args.dataset}' split '{split}' has no column '{column}' "
                             f"(it has: {', '.join(data.column_names)}); pass --{flag} NAME{hint}")
    if max_pairs is not None and max_pairs < len(data):
        data = data.shuffle(seed=args.seed).select(range(max_pairs))  # a random subset, the same on every rank

    # list(): indexing a datasets Column one row at a time costs ~30 us a row (25 s for 90k pairs)
    chosen_raw, rejected_raw = list(data[args.chosen_column]), list(data[args.rejected_column])
    where = f"dataset '{args.dataset}' split '{split}'"
    margins = None
    if args.margin_column is not None:
        margins = list(data[args.margin_column])
        bad = [i for i, m in enumerate(margins) if isinstance(m, bool) or not isinstance(m, (int, float)) or not math.isfinite(m)]
        if bad:
            raise SystemExit(f"{where}: row {bad[0]}: column '{args.margin_column}' is {margins[bad[0]]!r}, not a "
                             f"finite number ({len(bad)} rows); fix or remove them")
        margins = [float(m) for m in margins]
    if args.dataset_format == "standard":
        if isinstance(chosen_raw[0], list):
            raise SystemExit(f"column '{args.chosen_column}' holds lists of messages, not text; "
                             "they need --dataset_format conversational")
        prompts = list(data[args.prompt_column])
        for column, texts in ((args.prompt_column, prompts), (args.chosen_column, chosen_raw), (args.rejected_column, rejected_raw)):
            check_texts(texts, column, where)
        chosen = [args.separator + c for c in chosen_raw]
        rejected = [args.separator + r for r in rejected_raw]
    elif args.dataset_format == "implicit_prompt":
        check_texts(chosen_raw, args.chosen_column, where)
        check_texts(rejected_raw, args.rejected_column, where)
        prompts, chosen, rejected = [], [], []
        for c, r in zip(chosen_raw, rejected_raw):
            try:
                p, c, r = split_implicit_prompt(c, r, args.implicit_prompt_marker)
            except ValueError:
                p = None  # dropped below
            prompts.append(p), chosen.append(c), rejected.append(r)
    else:  # conversational
        if tokenizer.chat_template is None:
            raise SystemExit(f"the tokenizer of '{args.model_name_or_path}' has no chat template, "
                             "which --dataset_format conversational needs")
        # an explicit prompt of messages; a text prompt (UltraFeedback's) repeats the first turn of chosen
        explicit_prompt = args.prompt_column in data.column_names and isinstance(data[0][args.prompt_column], list)
        prompt_raw = list(data[args.prompt_column]) if explicit_prompt else None
        prompts, chosen, rejected = [], [], []
        for i, (c, r) in enumerate(zip(chosen_raw, rejected_raw)):
            for column, messages in ((args.chosen_column, c), (args.rejected_column, r),
                                     *([(args.prompt_column, prompt_raw[i])] if explicit_prompt else [])):
                check_messages(messages, f"{where}: row {i}: '{column}'")
            if explicit_prompt:  # prompt: [user, ...], chosen/rejected: [assistant]
                prompt_messages = prompt_raw[i]
            else:  # whole conversations that differ in their last (assistant) message
                if c[:-1] != r[:-1]:
                    raise SystemExit(f"row {i} of split '{split}': chosen and rejected differ before their last "
                                     "message; pass the shared turns in --prompt_column")
                prompt_messages, c, r = c[:-1], c[-1:], r[-1:]
            p, c_text = render_conversation(tokenizer, prompt_messages, c)
            _, r_text = render_conversation(tokenizer, prompt_messages, r)
            prompts.append(p), chosen.append(c_text), rejected.append(r_text)

    # Drop the pairs that cannot be used or carry no preference (common.drop_unusable: the same policy in
    # every stage); many of them means wrong columns or format.
    reasons = ["without the prompt marker" if p is None else "with an empty prompt" if not p.strip() else
               "with an empty chosen" if not c.strip() else "with an empty rejected" if not r.strip() else
               "with chosen == rejected" if c == r else None for p, c, r in zip(prompts, chosen, rejected)]
    keep = drop_unusable(reasons, where, args.max_dropped_fraction)

    # Tokenize prompt + completion, then EOS (Huang et al. 2024: the reward is read at the EOS token).
    # A text that already ends in EOS (TL;DR's "<|endoftext|>") or in the chat template's end-of-turn
    # token gets no EOS after it: the reward is read there, where ppo.py's responses end.
    special = args.dataset_format != "conversational"  # chat templates add their own BOS
    eos = tokenizer.eos_token_id
    stops = {eos, *(end_of_turn_tokens(tokenizer) if args.dataset_format == "conversational" else [])}

    def encode(texts):
        ids = tokenizer(texts, add_special_tokens=special)["input_ids"]
        return [x if x and x[-1] in stops else x + [eos] for x in ids]

    chosen_texts = [prompts[i] + chosen[i] for i in keep]
    rejected_texts = [prompts[i] + rejected[i] for i in keep]
    distinct = list(dict.fromkeys(chosen_texts + rejected_texts))  # a completion ranked with k others: once
    ids = dict(zip(distinct, encode(distinct)))
    chosen_ids, rejected_ids = [ids[t] for t in chosen_texts], [ids[t] for t in rejected_texts]
    check_unknown_tokens(list(ids.values()), tokenizer, where)
    fits = [j for j in range(len(keep)) if max(len(chosen_ids[j]), len(rejected_ids[j])) <= args.max_length]
    if not fits:
        raise SystemExit(f"split '{split}': every pair is longer than --max_length {args.max_length} tokens")
    if len(fits) < len(keep):
        print0(f"{split}: dropped {len(keep) - len(fits)} pairs longer than {args.max_length} tokens")
    return {
        "chosen_ids": [chosen_ids[j] for j in fits],
        "rejected_ids": [rejected_ids[j] for j in fits],
        "prompt": [prompts[keep[j]] for j in fits],
        "margin": [margins[keep[j]] for j in fits] if margins is not None else None,
    }


def pad(sequences: list[list[int]], pad_id: int, side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id lists -> (input_ids, attention_mask), both (B, T_max), padded on `side`."""
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    for i, s in enumerate(sequences):
        if side == "right":
            input_ids[i, : len(s)] = torch.tensor(s)
        else:
            input_ids[i, width - len(s):] = torch.tensor(s)
    return input_ids, (input_ids != pad_id).long()


def pair_batch(pairs: dict, indices: list[int], pad_id: int, device):
    """The distinct sequences of a batch of pairs, padded into one (N, T) batch, and where each pair's chosen and
    rejected sit in it: rewards[index[:B]] are r_chosen, rewards[index[B:]] r_rejected. One forward scores both
    sides with the same padding width and weights (Huang et al. 2024). A completion that several pairs of the
    batch share (the k choose 2 pairs of k ranked completions) is scored once (Ouyang et al. 2022, Sec. 3.5)."""
    seqs = [pairs["chosen_ids"][i] for i in indices] + [pairs["rejected_ids"][i] for i in indices]
    row = {}  # token ids -> row of the batch
    index = torch.tensor([row.setdefault(tuple(s), len(row)) for s in seqs], device=device)  # (2B,)
    input_ids, attention_mask = pad([list(s) for s in row], pad_id)  # dicts keep insertion order
    margin = None
    if pairs["margin"] is not None:
        margin = torch.tensor([pairs["margin"][i] for i in indices], dtype=torch.float32, device=device)
    return input_ids.to(device), attention_mask.to(device), index, margin


def shard(n: int, rank: int, world_size: int) -> tuple[list[int], list[bool]]:
    """Rank's share of range(n), wrapped around so every rank gets ceil(n / world_size) items: FSDP needs the
    same number of forwards on every rank. `is_real` is False for the wrapped-around repeats."""
    per_rank = math.ceil(n / world_size)
    positions = [rank + world_size * k for k in range(per_rank)]
    return [p % n for p in positions], [p < n for p in positions]


def group_by_length(order: list[int], lengths: list[int], batch_size: int, generator: torch.Generator,
                    batches_per_group: int = 50) -> list[int]:
    """Reorder a shuffled index list so that each batch holds pairs of similar length (as sft.py does).

    Cut `order` into groups of batches_per_group batches, sort each group by length, cut it into batches
    and shuffle the batches. Batches stay random but pad far less: a batch costs as much as its longest pair.
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


def all_reduce_sum(values: list[float], device) -> list[float]:
    """Sum a few scalars over ranks (a no-op on one process)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


@torch.no_grad()
def evaluate(model, pairs: dict, batch_size: int, pad_id: int, rank: int, world_size: int, device) -> dict:
    """Accuracy (r_chosen > r_rejected) and loss over all pairs, summed over ranks."""
    indices, is_real = shard(len(pairs["chosen_ids"]), rank, world_size)
    # shortest pairs first, so that each batch pads little (the order does not change the sums)
    length = lambda i: max(len(pairs["chosen_ids"][i]), len(pairs["rejected_ids"][i]))  # noqa: E731
    by_length = sorted(range(len(indices)), key=lambda k: length(indices[k]))
    indices, is_real = [indices[k] for k in by_length], [is_real[k] for k in by_length]
    sums = [0.0, 0.0, 0.0]  # correct, loss, count
    for start in range(0, len(indices), batch_size):
        idx, real = indices[start : start + batch_size], torch.tensor(is_real[start : start + batch_size], device=device)
        input_ids, attention_mask, index, margin = pair_batch(pairs, idx, pad_id, device)
        rewards = get_reward(model, input_ids, attention_mask)[index]  # (2B,)
        r_chosen, r_rejected = rewards[: len(idx)], rewards[len(idx):]
        m = margin if margin is not None else 0.0
        losses = -F.logsigmoid(r_chosen - r_rejected - m)
        sums[0] += ((r_chosen > r_rejected) & real).sum().item()
        sums[1] += (losses * real).sum().item()
        sums[2] += real.sum().item()
    correct, loss, count = all_reduce_sum(sums, device)
    return {"accuracy": correct / count, "loss": loss / count}


def learning_rate_at(step: int, total_steps: int, args: Args) -> float:
    """Linear warm-up, then cosine / linear decay to 0 (or constant)."""
    if step < args.warmup_steps:
        return args.learning_rate * (step + 1) / args.warmup_steps
    progress = (step - args.warmup_steps) / max(1, total_steps - args.warmup_steps)
    if args.lr_schedule == "cosine":
        return args.learning_rate * 0.5 * (1.0 + math.cos(math.pi * progress))
    if args.lr_schedule == "linear":
        return args.learning_rate * (1.0 - progress)
    return args.learning_rate


# ----------------------------------------------------------------------------------------------
# ALGO LOGIC: reward normalisation on SFT-policy samples
#
# THE NORMALISATION CONTRACT (ppo.py relies on it):
#   the saved config holds `reward_mean` and `reward_std`, and every consumer of the RM uses
#       normalised reward = (raw - config.reward_mean) / config.reward_std
#   where raw = get_reward(...) on prompt tokens + response tokens up to and including the first EOS,
#   padded with pad_token_id (left padding before the prompt, right padding after the response allowed).
#   reward_mean is the mean raw reward of SFT-policy samples on training prompts, so the SFT policy scores
#   0 on average (Huang et al. 2024); reward_std is their std with --normalize_std (Ziegler et al. 2019),
#   else 1.0. The score head has no bias, so the shift cannot live in the weights (TRL #1783 lost it).
# ----------------------------------------------------------------------------------------------
def truncate_after_eos(responses: torch.Tensor, eos_id: int | list[int], pad_id: int) -> torch.Tensor:
    """Keep each response up to and including its first EOS (or other stop token); pad everything after it.
    (B, T) -> (B, T)"""
    is_eos = torch.isin(responses, torch.tensor(eos_id, device=responses.device).reshape(-1)).long()
    after_first_eos = (is_eos.cumsum(-1) - is_eos) > 0
    return responses.masked_fill(after_first_eos, pad_id)


@torch.no_grad()
def sample_responses(policy, input_ids, attention_mask, response_length: int, temperature: float,
                     eos_id: int | list[int], pad_id: int) -> torch.Tensor:
    """Sample one response per left-padded prompt, cut after its first EOS. (B, T_prompt) -> (B, T_response)

    Only the temperature applies: the policy's generation_config holds only the token ids (common.token_ids_only).
    """
    from transformers import GenerationConfig

    config = GenerationConfig(
        max_new_tokens=response_length, do_sample=True, temperature=temperature,
        top_k=0, top_p=1.0,  # the policy's full distribution, as in PPO (Huang et al. 2024); HF defaults top_k=50
        eos_token_id=eos_id, pad_token_id=pad_id,
    )
    out = policy.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)
    return truncate_after_eos(out[:, input_ids.shape[1]:], eos_id, pad_id)


def reward_normalisation(reward_sum: float, reward_sq_sum: float, count: float, normalize_std: bool) -> tuple[float, float, float]:
    """reward_mean = E[r], reward_std = sqrt(E[r^2] - E[r]^2) if normalize_std else 1.

    Returns (reward_mean, reward_std, raw std). Sums, not lists, so ranks add their shares (global stats).
    """
    mean = reward_sum / count
    std = math.sqrt(max(reward_sq_sum / count - mean**2, 0.0) * count / max(count - 1, 1))
    return mean, (max(std, 1e-8) if normalize_std else 1.0), std


def check_same_tokenizer(policy_tokenizer, rm_tokenizer, policy_path: str, rm_path: str) -> None:
    """The policy's token ids go straight into the RM (here and in ppo.py): same vocabulary, same pad/EOS ids.

    Comparing the full token -> id maps (not just the size) catches a different tokenizer of equal size;
    pad and EOS must agree because the RM finds the last real token by pad_token_id and reads its reward at
    the EOS. Only checked when it matters: when normalisation samples from a policy.
    """
    same = (policy_tokenizer.get_vocab() == rm_tokenizer.get_vocab()
            and policy_tokenizer.pad_token_id == rm_tokenizer.pad_token_id
            and policy_tokenizer.eos_token_id == rm_tokenizer.eos_token_id)
    if not same:
        raise SystemExit(f"tokenizer of the SFT policy '{policy_path}' differs from the reward model's "
                         f"('{rm_path}'): the policy's token ids would be fed to the RM; start the RM from the "
                         "SFT checkpoint or pass --sft_model_for_normalisation with the same tokenizer")


def load_prompts(args: Args, pref_prompts: list[str]) -> list[str]:
    """Normalisation prompts: the prompt dataset if given, else the preference train prompts; deduplicated,
    shuffled with the seed, the first num_normalisation_prompts."""
    if args.prompt_dataset is None:
        prompts = pref_prompts
    else:
        data = load_dataset(args.prompt_dataset, "prompt dataset")
        if args.prompt_dataset_split not in data:
            raise SystemExit(f"prompt dataset '{args.prompt_dataset}' has no split '{args.prompt_dataset_split}' "
                             f"(it has: {', '.join(data)}); pass --prompt_dataset_split NAME")
        data = data[args.prompt_dataset_split]
        if args.prompt_dataset_column not in data.column_names:
            raise SystemExit(f"prompt dataset '{args.prompt_dataset}' has no column '{args.prompt_dataset_column}' "
                             f"(it has: {', '.join(data.column_names)}); pass --prompt_dataset_column NAME")
        prompts = list(data[args.prompt_dataset_column])
        check_texts(prompts, args.prompt_dataset_column, f"prompt dataset '{args.prompt_dataset}'")
    prompts = list(dict.fromkeys(prompts))
    order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(args.seed)).tolist()
    return [prompts[i] for i in order[: args.num_normalisation_prompts]]


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------
def main(args: Args) -> dict:
    t_start = time.time()
    # TRY NOT TO MODIFY: setup, checks, data
    check_args(args)
    d = setup_distributed()
    from torch.utils.tensorboard import SummaryWriter

    micro_per_step = args.batch_size // d.world_size  # pairs per optimiser step on this rank
    local_batch = min(args.per_device_batch_size, micro_per_step)  # pairs per forward on this rank
    if args.batch_size % d.world_size or micro_per_step % local_batch:
        raise SystemExit(f"--batch_size {args.batch_size} must be divisible by the {d.world_size} processes x "
                         f"--per_device_batch_size {args.per_device_batch_size}")
    grad_accum = micro_per_step // local_batch  # forwards per optimiser step on this rank
    sft_path = args.sft_model_for_normalisation or args.model_name_or_path
    checkpoint_dir = args.checkpoint_dir or args.output_dir.rstrip("/") + "_checkpoints"
    check_model_dir(args.model_name_or_path, "model")
    if args.normalize:
        check_model_dir(sft_path, "SFT model for normalisation")
    inputs = {"model": args.model_name_or_path, "SFT model": sft_path, "dataset": args.dataset,
              "prompt dataset": args.prompt_dataset, "Bayes ceiling file": args.bayes_ceiling_file}
    prepare_output(args.output_dir, checkpoint_dir, "rm", inputs, args.resume, args.overwrite, args_json(args), d.world_size)
    ceiling_file = args.bayes_ceiling_file
    if ceiling_file is None and os.path.isfile(os.path.join(args.dataset, "bayes_ceiling.json")):
        ceiling_file = os.path.join(args.dataset, "bayes_ceiling.json")
    if ceiling_file is not None and not os.path.isfile(ceiling_file):
        raise SystemExit(f"--bayes_ceiling_file '{ceiling_file}' does not exist")
    bayes_ceiling = None
    if ceiling_file is not None:
        try:
            with open(ceiling_file) as f:
                bayes_ceiling = json.load(f).get("bayes_accuracy")
        except (ValueError, AttributeError, UnicodeDecodeError):
            bayes_ceiling = None
        if not isinstance(bayes_ceiling, float):
            raise SystemExit(f"'{ceiling_file}' has no number \"bayes_accuracy\"; pass --bayes_ceiling_file None")

    tokenizer = load_tokenizer(args.model_name_or_path, padding_side="right", add_pad_token=args.add_pad_token)
    pad_id = tokenizer.pad_token_id
    if args.normalize:  # fail now, not after training
        policy_tokenizer = load_tokenizer(sft_path, padding_side="left", add_pad_token=args.add_pad_token)  # for generation
        check_same_tokenizer(policy_tokenizer, tokenizer, sft_path, args.model_name_or_path)
    dataset = load_dataset(args.dataset)
    train = load_split(args, dataset, args.train_split, tokenizer, args.num_train_pairs)
    val = load_split(args, dataset, args.eval_split, tokenizer, args.num_eval_pairs) if args.eval_split else None
    # the normalisation prompts are read now, so that a bad --prompt_dataset fails before training, not after it
    chat_rendered = args.prompt_dataset is None and args.dataset_format == "conversational"  # has its BOS
    normalisation_ids = None
    if args.normalize:  # tokenized and cut to length as ppo.py does, so that the SFT samples match its prompts
        normalisation_ids = policy_tokenizer(load_prompts(args, train["prompt"]), add_special_tokens=not chat_rendered)["input_ids"]
        normalisation_ids = fit_prompts(normalisation_ids, args.max_prompt_length, args.truncate_long_prompts,
                                        prompt_head(policy_tokenizer, chat_rendered), "normalisation prompts")
    n_train = len(train["chosen_ids"])
    # Pairs that share a prompt (the k choose 2 pairs of k ranked completions) go through training together, in
    # one batch: each completion is scored once, and an epoch visits each ranking once. InstructGPT did this
    # because shuffling these correlated pairs apart made the RM overfit in one epoch (Ouyang et al. 2022, 3.5).
    prompt_groups = [[i] for i in range(n_train)]
    if args.group_by_prompt:
        by_prompt: dict[str, list[int]] = {}
        for i, prompt in enumerate(train["prompt"]):
            by_prompt.setdefault(prompt, []).append(i)
        prompt_groups = list(by_prompt.values())
    pair_lengths = [0] * n_train  # a group's longest sequence, for all its pairs: sorting keeps groups whole
    for group in prompt_groups:
        longest = max(max(len(train["chosen_ids"][i]), len(train["rejected_ids"][i])) for i in group)
        for i in group:
            pair_lengths[i] = longest
    steps_per_epoch = n_train // args.batch_size  # the last partial batch is dropped: equal shards on every rank
    if steps_per_epoch == 0:
        raise SystemExit(f"only {n_train} training pairs, fewer than one --batch_size {args.batch_size}")
    total_steps = steps_per_epoch * args.num_epochs
    print0(f"{n_train} training pairs, {len(val['chosen_ids']) if val else 0} validation pairs; "
           f"{total_steps} steps of {args.batch_size} pairs ({d.world_size} processes x {grad_accum} x {local_batch})")

    run_name = args.run_name or f"rm__{args.seed}__{int(time.time())}"
    # The model: the SFT checkpoint with a fresh scalar head. Seeded identically on every rank, so every
    # rank starts from the same head before FSDP shards it.
    torch.manual_seed(args.seed)
    model = load_reward_model(args.model_name_or_path, tokenizer, args.dtype)
    head = getattr(model, "score", None)
    if isinstance(head, torch.nn.Linear):  # reward head init std 1/sqrt(d_model + 1) (Ziegler et al. 2019)
        torch.nn.init.normal_(head.weight, std=1.0 / math.sqrt(head.in_features + 1))
        if head.bias is not None:
            torch.nn.init.zeros_(head.bias)
    model = fsdp_wrap(model, d.device)
    model.train()
    seed_everything(args.seed, d.rank)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, eps=args.adam_eps,
                                  weight_decay=args.weight_decay)

    # --resume: model, optimiser, counters and RNG states as they were after step `start_step`
    start_step, val_metrics, history, resumed = 0, None, [], None
    if args.resume:
        latest = latest_checkpoint(checkpoint_dir)
        resumed = load_checkpoint(latest, model, optimizer)
        start_step, run_name = resumed["step"], resumed["run_name"]
        val_metrics, history = resumed["val_metrics"], resumed["history"]
        print0(f"resumed from {latest} (step {start_step} of {total_steps})")
    writer = None
    if d.is_main:  # on resume, drop the events a killed run logged after its last checkpoint
        writer = SummaryWriter(f"runs/{run_name}", purge_step=start_step + 1 if resumed else None)
        writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in asdict(args).items()))

    def batches():
        """Global batches of pair indices; every rank draws the same order (a generator seeded with args.seed)."""
        order_rng = torch.Generator().manual_seed(args.seed)
        for _epoch in range(args.num_epochs):
            order = [i for g in torch.randperm(len(prompt_groups), generator=order_rng).tolist() for i in prompt_groups[g]]
            if args.group_by_length:
                order = group_by_length(order, pair_lengths, args.batch_size, order_rng)
            for batch_start in range(0, steps_per_epoch * args.batch_size, args.batch_size):
                yield order[batch_start : batch_start + args.batch_size]

    # ALGO LOGIC: training
    data_iter = batches()
    for _ in range(start_step):  # the data position: replay the shuffles up to the checkpoint
        next(data_iter)
    signals = catch_signals()
    progress = tqdm(total=total_steps, initial=start_step, desc="reward model", disable=not d.is_main)
    t_train = time.time()
    for step in range(start_step + 1, total_steps + 1):
        lr = learning_rate_at(step - 1, total_steps, args)  # the rate after step - 1 completed steps
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = next(data_iter)
        local = batch[d.rank * micro_per_step : (d.rank + 1) * micro_per_step]  # this rank's share
        sums = [0.0] * 5  # loss * n, correct, sum r_chosen, sum r_rejected, n
        for micro_start in range(0, micro_per_step, local_batch):
            idx = local[micro_start : micro_start + local_batch]
            input_ids, attention_mask, index, margin = pair_batch(train, idx, pad_id, d.device)  # (N <= 2b, T)
            rewards = get_reward(model, input_ids, attention_mask)[index]  # (2b,): one forward for both
            r_chosen, r_rejected = rewards[: len(idx)], rewards[len(idx):]
            loss = bradley_terry_loss(r_chosen, r_rejected, margin)
            (loss / grad_accum).backward()
            sums[0] += loss.item() * len(idx)
            sums[1] += (r_chosen > r_rejected).sum().item()
            sums[2] += r_chosen.sum().item()
            sums[3] += r_rejected.sum().item()
            sums[4] += len(idx)
        # the SIGTERM flag rides along: if any rank was signalled, every rank checkpoints at this step
        loss_sum, correct, chosen_sum, rejected_sum, count, stop = all_reduce_sum(sums + [float(signals["stop"])], d.device)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP2 (a collective: every rank calls it)
            grad_norm = grad_norm.full_tensor()
        grad_norm = grad_norm.item()
        for name, value in (("loss", loss_sum / count), ("gradient norm", grad_norm)):
            if not math.isfinite(value):  # global values, the same on every rank: every rank stops
                progress.close()
                raise SystemExit(f"the {name} is {value} at step {step}: stopped before the optimiser step; last good "
                                 f"checkpoint: {latest_checkpoint(checkpoint_dir) or 'none'}. Lower --learning_rate or check the data")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        progress.update(1)
        metrics = {
            "train/loss": loss_sum / count,
            "train/accuracy": correct / count,
            "train/reward_chosen": chosen_sum / count,
            "train/reward_rejected": rejected_sum / count,
            "train/margin": (chosen_sum - rejected_sum) / count,  # mean r_chosen - r_rejected
        }
        progress.set_postfix(loss=f"{metrics['train/loss']:.3f}", acc=f"{metrics['train/accuracy']:.3f}")
        if writer is not None and (step % args.log_every == 0 or step == total_steps):
            for name, value in metrics.items():
                writer.add_scalar(name, value, step)
            writer.add_scalar("train/lr", lr, step)
            writer.add_scalar("train/grad_norm", grad_norm, step)
            writer.add_scalar("charts/pairs_per_second", step * args.batch_size / (time.time() - t_train), step)
        if val is not None and (step % (args.eval_every or steps_per_epoch) == 0 or step == total_steps):
            val_metrics = evaluate(model, val, args.eval_batch_size, pad_id, d.rank, d.world_size, d.device)
            history.append((step, val_metrics["accuracy"]))
            if d.is_main:
                progress.write(f"step {step}: val accuracy {val_metrics['accuracy']:.4f}, loss {val_metrics['loss']:.4f}")
            if writer is not None:
                writer.add_scalar("val/accuracy", val_metrics["accuracy"], step)
                writer.add_scalar("val/loss", val_metrics["loss"], step)
        if (args.checkpoint_every and step % args.checkpoint_every == 0) or step == total_steps or stop:
            state = {"step": step, "args": args_json(args), "run_name": run_name, "val_metrics": val_metrics,
                     "history": history}
            path = save_checkpoint(checkpoint_dir, step, model, optimizer, state, "rm")
            if stop:
                progress.close()
                exit_preempted(path, f"step {step}", signals["signal"])
    progress.close()
    train_time = time.time() - t_train
    del optimizer
    model.eval()

    # ALGO LOGIC: reward normalisation on SFT-policy samples (see THE NORMALISATION CONTRACT above)
    reward_mean, reward_std, norm_stats = 0.0, 1.0, {}
    if args.normalize:
        t_norm = time.time()
        # Each rank holds a full, unsharded copy of the policy: it only generates, and generate() under FSDP
        # would need every rank to take the same number of decoding steps.
        policy = load_causal_lm(sft_path, policy_tokenizer, args.dtype).to(d.device).eval()
        # responses end at EOS or, for chat, at the template's end-of-turn token, as in ppo.py
        stop_ids = [tokenizer.eos_token_id, *(end_of_turn_tokens(tokenizer) if chat_rendered else [])]
        indices, is_real = shard(len(normalisation_ids), d.rank, d.world_size)
        sums = [0.0, 0.0, 0.0, 0.0]  # sum r, sum r^2, count, count with EOS
        for start in tqdm(range(0, len(indices), args.generation_batch_size), desc="normalisation", disable=not d.is_main):
            idx = indices[start : start + args.generation_batch_size]
            real = torch.tensor(is_real[start : start + args.generation_batch_size], device=d.device)
            queries, query_mask = (t.to(d.device) for t in pad([normalisation_ids[i] for i in idx], pad_id, side="left"))
            responses = sample_responses(policy, queries, query_mask, args.response_length,
                                         args.temperature, stop_ids, pad_id)  # (B, T_response)
            query_responses = torch.cat([queries, responses], dim=1)  # left pad | prompt | response | pad
            rewards = get_reward(model, query_responses, (query_responses != pad_id).long())
            sums[0] += (rewards * real).sum().item()
            sums[1] += (rewards**2 * real).sum().item()
            sums[2] += real.sum().item()
            sums[3] += (torch.isin(responses, torch.tensor(stop_ids, device=d.device)).any(-1) & real).sum().item()
        reward_sum, reward_sq_sum, count, with_eos = all_reduce_sum(sums, d.device)
        reward_mean, reward_std, raw_std = reward_normalisation(reward_sum, reward_sq_sum, count, args.normalize_std)
        norm_stats = {"num_samples": int(count), "raw_mean": reward_mean, "raw_std": raw_std,
                      "eos_fraction": with_eos / count, "time_s": time.time() - t_norm}
        del policy
        if writer is not None:
            for name, value in norm_stats.items():
                writer.add_scalar(f"normalisation/{name}", value, step)

    # TRY NOT TO MODIFY: save (atomic; a failed run has raised before this point) and report
    results = {
        "val_accuracy": val_metrics["accuracy"] if val_metrics else None,
        "val_loss": val_metrics["loss"] if val_metrics else None,
        "bayes_ceiling": bayes_ceiling,
        "fraction_of_ceiling": (val_metrics["accuracy"] / bayes_ceiling) if (val_metrics and bayes_ceiling) else None,
        "reward_mean": reward_mean,
        "reward_std": reward_std,
        "normalisation": norm_stats,
        "val_accuracy_history": history,
        "train_pairs": n_train,
        "steps": total_steps,
        "train_time_s": train_time,
        "wall_time_s": time.time() - t_start,
    }
    save_model(model, tokenizer, args.output_dir, "rm", results=results,
               extra_config={"reward_mean": reward_mean, "reward_std": reward_std})
    if d.is_main:
        writer.close()
    print0(f"saved {args.output_dir}: reward_mean {reward_mean:.4f}, reward_std {reward_std:.4f}")
    if val_metrics:
        ceiling = f" vs Bayes ceiling {bayes_ceiling:.4f} ({results['fraction_of_ceiling']:.1%} of it)" if bayes_ceiling else ""
        print0(f"validation accuracy {val_metrics['accuracy']:.4f}{ceiling}")
    teardown_distributed()
    return results


if __name__ == "__main__":
    run(main, parse_args)
