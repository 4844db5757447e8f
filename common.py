"""Model, tokenizer and dataset loading, FSDP2 setup and FSDP2-aware checkpoints, shared by sft.py,
train_rm.py and ppo.py; with them, the checks that keep a run from losing anyone's files (output dirs,
locks, atomic saves) and from failing after training for a reason knowable at the start (flags, model dirs,
dataset rows), and the entry point that turns the faults no check can foresee into one line. At the end: the
data formats (every dataset's rows -> token ids, for SFT data and for preference pairs), batches of similar
length, and the TensorBoard writer.

Nothing else lives here: each stage's algorithm is written out in its own script.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import glob
import importlib
import json
import logging
import math
import os
import random
import shutil
import signal
import socket
import sys
import tempfile
import time
import uuid
import warnings
from dataclasses import asdict, dataclass
from typing import Callable, Literal, NoReturn

import numpy as np
import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

# torchao (ppo.py --frozen_dtype int8; peft imports it too) logs on import that its CUDA kernels cannot load into a
# CPU-only torch, and torch logs that torchao's enum registrations are deprecated: harmless, and not the user's to fix
for _name in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_name).setLevel(logging.ERROR)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ----------------------------------------------------------------------------------------------
# Flags that several stages share, as dataclasses a stage's Args inherits (their flags keep their plain names)
# ----------------------------------------------------------------------------------------------
@dataclass
class ResumeFlags:
    checkpoint_dir: str | None = None
    """where checkpoints go, the latest one kept (None: {output_dir}_checkpoints)"""
    resume: bool = False
    """continue from the latest checkpoint, with the same flags: on CPU the result is bit-identical to an
    uninterrupted run"""
    overwrite: bool = False
    """replace a finished run in output_dir, or start over where an unfinished run left checkpoints"""


@dataclass
class PromptFlags:
    """The prompts of an RL stage (ppo.py, grpo.py): where they come from and how they are read."""
    dataset: str = "toy_data/prompts"
    """prompts: a hub name or a local dir of {split}.jsonl files that `datasets.load_dataset` reads"""
    prompt_column: str = "prompt"
    """the column holding the prompt: a text, or a list of {role, content} messages"""
    prompt_format: Literal["auto", "text", "chat"] = "auto"
    """chat: render with the tokenizer's chat template and add_generation_prompt (a text becomes one user
    message; a final assistant message is dropped); text: as is; auto: chat for message lists, text for texts"""
    implicit_prompt_marker: str | None = None
    """cut each prompt text just after the last occurrence of this (Anthropic HH: --prompt_column chosen
    --implicit_prompt_marker '\n\nAssistant:' takes the dialogue up to the final assistant turn)"""
    stop_tokens: list[str] | None = None
    """tokens that end a response besides EOS (None: the chat template's end-of-turn token, e.g. <|im_end|>,
    when prompts are rendered as chat)"""
    train_split: str = "train"
    """the split whose prompts the policy trains on"""
    eval_split: str = "validation"
    """the split of held-out prompts for evaluation"""
    max_prompt_length: int = 32
    """prompts longer than this many tokens are rejected (or left-truncated with --truncate_long_prompts)"""
    truncate_long_prompts: bool = False
    """keep the last tokens of a too-long prompt, behind its BOS or chat template header (with a warning),
    instead of failing"""
    max_dropped_fraction: float = 0.01
    """prompts that cannot be used (empty, no --implicit_prompt_marker) are dropped with a count; more than this
    fraction of a split stops the run (a wrong column or format)"""


@dataclass
class MemoryFlags:
    """How an RL stage holds its models: dtypes, compilation, recomputation, LoRA."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """dtype the models are loaded in: the trained weights and their AdamW state (see --mixed_precision)"""
    mixed_precision: Literal["auto", "bf16", "none"] = "auto"
    """bf16: forwards, backwards and generation in bfloat16 over --dtype weights, gradients reduced in float32
    (FSDP2's mixed precision, on one process too: one GPU computes as N do); none: all in --dtype; auto: bf16 on
    CUDA, none on CPU"""
    generation_batch_size: int | None = None
    """prompts per generate call of the rollout, per rank: the KV cache holds one chunk's (Huang et al. 2024
    generate in chunks of their rollout forward batch). None: the rank's whole batch in one call"""
    compile: bool = False
    """torch.compile the trained models' training forwards"""
    frozen_dtype: Literal["same", "bfloat16", "float16", "int8"] = "same"
    """dtype of the frozen reference and reward model (same: --dtype). bf16 halves their weights; int8 (torchao's
    weight-only int8 of their linear layers: `pip install torchao`) quarters them; under torchrun FSDP2 shards
    int8 too, and gathers it as int8"""
    gradient_checkpointing: bool = False
    """recompute the trained models' activations in the backward pass instead of keeping them"""
    lora_r: int = 0
    """LoRA rank of the policy (0: full fine-tuning). The reference is then the policy's own weights with the
    adapter switched off, so no second copy exists (needs `pip install peft`)"""
    lora_alpha: float = 16.0
    """LoRA scale alpha (the update is alpha / r * B A)"""
    lora_target_modules: str = "all-linear"
    """modules that get an adapter (peft's names; all-linear: every linear layer but the LM head)"""
    plan_memory: bool = False
    """print the planned peak GPU memory of each phase for these flags, and the memory options that fit --gpu_gb,
    then exit without training (results/memory_plan.py: no weights downloaded, no GPU used)"""
    plan_gpus: int = 1
    """--plan_memory: GPUs (processes) to plan for"""
    gpu_gb: float = 80.0
    """--plan_memory: memory of one GPU, GB (1e9 bytes) of tensors"""


@dataclass
class EvalFlags:
    """How an RL stage evaluates on held-out prompts and logs samples."""
    gold_reward_fn: str | None = "toy_task:gold_score"
    """`module:function` f(prompts, completions) -> list[float], the true reward (a verifier) logged at evaluation;
    None skips it"""
    eval_every: int = 25
    """updates between evaluations on held-out prompts (0: only before and after training)"""
    eval_samples: int = 512
    """held-out prompts per evaluation (first N of eval_split)"""
    eval_batch_size: int = 512
    """prompts per generate call during evaluation, per rank"""
    eval_temperature: float = 0.7
    """sampling temperature for evaluation (0: greedy)"""
    sample_every: int = 25
    """updates between TensorBoard tables of sampled prompt/response/score (0: never)"""
    num_sample_rows: int = 8
    """rows in each sample table"""


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------
def check_path(name_or_path: str, what: str) -> None:
    """Fail in one line on a local path that does not exist; a bare `org/name` is left to the hub."""
    if os.path.exists(name_or_path):
        return
    toy = name_or_path.split("/")[0] == "toy_data"  # the defaults, before the toy task is built: not a hub id
    hub_id = name_or_path.count("/") == 1 and not name_or_path.startswith((".", "/", "~")) and not toy
    if not hub_id or os.path.isdir(name_or_path.split("/")[0]):
        hint = " (build the toy task first: python toy_task.py)" if "toy_data" in name_or_path else ""
        raise SystemExit(f"{what} path '{name_or_path}' does not exist{hint}")


def first_line(error: Exception) -> str:
    """The libraries' offline / unknown-name errors run to many lines; the first says what happened."""
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def load_dataset(name_or_path: str, what: str = "dataset"):
    """`datasets.load_dataset` on a hub name or a local dir (the same code path), or a one-line error.

    When a local dir fails to load, its files are read line by line to name the broken one: datasets'
    own error says neither the file nor the line. A local dir's Arrow cache is keyed by its files' bytes
    (local_files_key), so it always loads its current files.
    """
    import datasets

    check_path(name_or_path, what)
    problem = find_bad_line(name_or_path) if os.path.isdir(name_or_path) and not all_utf8(name_or_path) else None
    if problem:  # datasets reads such bytes without complaint, and fails only when the column is used
        raise SystemExit(f"cannot load {what} '{name_or_path}': {problem}")
    try:
        # config_id names the cache dir: datasets' own key misses edits and same-named dirs
        cache_key = {"config_id": local_files_key(name_or_path)} if os.path.isdir(name_or_path) else {}
        splits = datasets.load_dataset(name_or_path, **cache_key)
    except Exception as e:  # offline, unknown hub name, unreadable files
        problem = find_bad_line(name_or_path) if os.path.isdir(name_or_path) else None
        raise SystemExit(f"cannot load {what} '{name_or_path}': {problem or first_line(e)}") from None
    for split, rows in splits.items():
        if len(rows) == 0:
            raise SystemExit(f"{what} '{name_or_path}': split '{split}' has no rows; fill it or remove its file")
    return splits


def local_files_key(path: str) -> str:
    """A hash of the name and bytes of every file in a local dataset dir (hidden ones aside, as datasets skips them).

    datasets 5.2 keys the cache of a dir with a README `configs:` block by the dir's name and that block only,
    so a second dir of the same name got the first one's rows and edited files were not seen; without the block
    it keys by paths and mtimes, which miss an edit that keeps the mtime (cp -p, tar). Hashing 60 MB takes ~0.07 s.
    """
    import hashlib

    digest = hashlib.sha256()
    for root, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))  # sorted: os.walk's order is the disk's
        for file in sorted(os.path.join(root, f) for f in files if not f.startswith(".")):
            if not os.path.isfile(file):  # a FIFO would block the read
                continue
            with open(file, "rb") as f:
                file_hash = hashlib.file_digest(f, "sha256").hexdigest()
                digest.update(f"{os.path.relpath(file, path)}\0{file_hash}\0".encode())
    return "files-" + digest.hexdigest()[:16]


def json_files(path: str) -> list[str]:
    return sorted(f for f in glob.glob(os.path.join(path, "**", "*.json*"), recursive=True)
                  if f.endswith((".jsonl", ".json")))


def all_utf8(path: str) -> bool:
    """Every JSON file of a local dataset dir decodes as UTF-8 (a whole-file decode: fast)."""
    for file in json_files(path):
        with open(file, "rb") as f:
            try:
                f.read().decode("utf-8")
            except UnicodeDecodeError:
                return False
    return True


def find_bad_line(path: str) -> str | None:
    """The first file:line of a local JSON-lines dataset that is not UTF-8 JSON, or an empty file."""
    for file in json_files(path):
        with open(file, "rb") as f:
            lines = f.read().splitlines()
        if not any(line.strip() for line in lines):
            return f"'{file}' is empty; fill it or remove it"
        if file.endswith(".json") and not file.endswith(".jsonl"):
            continue  # one JSON document, not lines
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                json.loads(line.decode("utf-8"))
            except UnicodeDecodeError as e:
                return (f"{file}, line {number}: not UTF-8 (byte {line[e.start]:#x} at column {e.start + 1}); "
                        "re-encode the file as UTF-8")
            except ValueError as e:
                return f"{file}, line {number}: not valid JSON ({e}); fix or remove that line"
    return None


def check_texts(texts: list, column: str, where: str) -> None:
    """Every row of a text column holds a string: a null or a number names its row."""
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            held = "null" if text is None else f"a {type(text).__name__}, not text"
            raise SystemExit(f"{where}: row {i}: column '{column}' is {held}; fix or remove the row")


def check_messages(messages, where: str) -> None:
    """A conversation is a list of {role, content} dicts with text in both."""
    if not isinstance(messages, list) or not messages:
        raise SystemExit(f"{where}: not a list of messages; fix or remove the row")
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            missing = "not a {role, content} dict" if not isinstance(m, dict) else \
                "no text 'content'" if not isinstance(m.get("content"), str) else "no text 'role'"
            raise SystemExit(f"{where}: message {j} has {missing}; fix or remove the row")


def check_unknown_tokens(token_ids: list[list[int]], tokenizer, where: str) -> None:
    """Text the tokenizer cannot read becomes <unk>: an error when most of it does, a warning with numbers
    when some rows are mostly <unk>. (Byte-level BPE tokenizers have no <unk> and pass.)"""
    unk = tokenizer.unk_token_id
    if unk is None or unk in (tokenizer.eos_token_id, tokenizer.bos_token_id, tokenizer.pad_token_id):
        return  # Pythia's <unk> is its EOS: counting it would count every EOS
    total = sum(len(ids) for ids in token_ids)
    unknown = [sum(t == unk for t in ids) for ids in token_ids]
    if total and sum(unknown) / total > 0.5:
        raise SystemExit(f"{where}: {sum(unknown) / total:.0%} of the tokens are '{tokenizer.unk_token}': "
                         "the tokenizer does not cover this text; check the tokenizer and the file's encoding")
    mostly = [i for i, (n, ids) in enumerate(zip(unknown, token_ids)) if ids and n / len(ids) > 0.5]
    if mostly:
        print0(f"warning: {where}: {len(mostly)} of {len(token_ids)} rows are mostly '{tokenizer.unk_token}' "
               f"({sum(unknown) / total:.1%} of all tokens; first: row {mostly[0]})")


def drop_unusable(reasons: list[str | None], where: str, max_fraction: float) -> list[int]:
    """The one policy, in every stage, for rows that cannot be used (an empty prompt or completion, a dialogue
    without the prompt marker, chosen == rejected): drop them with a printed count, and stop when they are
    more than max_fraction of the split, which means a wrong column or format rather than a few bad rows.
    Real HH-RLHF has 4 dialogues in 2,000 whose final chosen reply is empty. -> the indices kept
    """
    bad = [i for i, reason in enumerate(reasons) if reason]
    if not bad:
        return list(range(len(reasons)))
    counts: dict[str, int] = {}
    for i in bad:
        counts[reasons[i]] = counts.get(reasons[i], 0) + 1
    summary = f"{', '.join(f'{n} {why}' for why, n in counts.items())}; first: row {bad[0]}"
    if len(bad) > max_fraction * len(reasons):
        raise SystemExit(f"{where}: {len(bad)} of {len(reasons)} rows ({len(bad) / len(reasons):.1%}) cannot be used "
                         f"({summary}), more than --max_dropped_fraction {max_fraction}; check the data and the column "
                         "and format flags, or raise --max_dropped_fraction")
    print0(f"{where}: dropped {len(bad)} of {len(reasons)} rows that cannot be used ({summary})")
    return [i for i, reason in enumerate(reasons) if not reason]


def prompt_head(tokenizer, chat: bool) -> list[int]:
    """The tokens a prompt must keep at its front when it is cut to length: the BOS a tokenizer puts before
    every text (Llama 3's <|begin_of_text|>), or for chat prompts everything the template renders before the
    first user message (BOS, the default system turn of Qwen's template, the user header)."""
    sentinel = "SENTINEL_7f3a"
    if chat:
        text = tokenizer.apply_chat_template([{"role": "user", "content": sentinel}], tokenize=False,
                                             add_generation_prompt=True)
        return tokenizer(text.split(sentinel, 1)[0], add_special_tokens=False)["input_ids"]
    with_specials = tokenizer(sentinel)["input_ids"]
    plain = tokenizer(sentinel, add_special_tokens=False)["input_ids"]
    return with_specials[: len(with_specials) - len(plain)] if with_specials[-len(plain):] == plain else []


def fit_prompts(ids: list[list[int]], max_length: int, truncate: bool, head: list[int], where: str) -> list[list[int]]:
    """Prompts longer than max_length tokens: an error, or (truncate) cut from the left, keeping `head` (see
    prompt_head) in front and the end, the text a response continues. Every stage cuts prompts this way."""
    too_long = [i for i, x in enumerate(ids) if len(x) > max_length]
    if not too_long:
        return ids
    if not truncate:
        raise SystemExit(f"{where}: {len(too_long)} of {len(ids)} prompts are longer than "
                         f"max_prompt_length={max_length} tokens (longest: {max(len(ids[i]) for i in too_long)}); "
                         "raise --max_prompt_length, or pass "
                         "--truncate_long_prompts")
    if len(head) >= max_length:
        raise SystemExit(f"--max_prompt_length {max_length} leaves no room after the {len(head)} tokens every prompt "
                         "starts with (BOS, chat template header); raise it")
    after_head = f" after the {len(head)} they start with" if head else ""
    print0(f"warning: {where}: {len(too_long)} of {len(ids)} prompts are longer than max_prompt_length={max_length} "
           f"tokens; keeping their last tokens{after_head} (--truncate_long_prompts)")
    cut = []
    for x in ids:
        keep = kept_head(x, head) if len(x) > max_length else []
        keep = keep if len(keep) < max_length else []  # a header longer than the limit: a plain cut
        cut.append(x if len(x) <= max_length else keep + x[len(x) - (max_length - len(keep)):])
    return cut


def kept_head(x: list[int], head: list[int]) -> list[int]:
    """The front of prompt x that a cut keeps: `head` itself, or, for a chat prompt with a system turn of its own,
    x up to the end of the longest piece of head's end (its user header, 2 tokens or more) found in x."""
    if x[: len(head)] == head:
        return head
    for k in range(len(head) - 1, 1, -1):
        for j in range(len(x) - k + 1):
            if x[j : j + k] == head[-k:]:
                return x[: j + k]
    return []


def check_flags(args, at_least_1=(), positive=(), non_negative=()) -> None:
    """Numeric flags in range before anything runs; None means 'off' and passes."""
    rules = ((at_least_1, lambda v: v >= 1, ">= 1"), (positive, lambda v: v > 0, "> 0"),
             (non_negative, lambda v: v >= 0, ">= 0"))
    for names, ok, rule in rules:
        for name in names:
            value = getattr(args, name)
            if value is not None and not (math.isfinite(value) and ok(value)):
                raise SystemExit(f"--{name} {value}: must be {rule}")
    if not 0 <= args.seed < 2**31:
        raise SystemExit(f"--seed {args.seed}: must be in [0, 2^31)")


def check_model_dir(path: str, what: str, tokenizer: bool = True, reward_model: bool = False) -> None:
    """A local model dir, checked before anything loads: a config, complete weights, tokenizer files; a reward
    model is a sequence classifier with one output. A hub name is left to from_pretrained."""
    check_path(path, what)
    if not os.path.isdir(path):
        if os.path.exists(path):
            raise SystemExit(f"{what} '{path}' is a file, not a model dir")
        return
    try:
        with open(os.path.join(path, "config.json")) as f:
            config = json.load(f)
    except FileNotFoundError:
        raise SystemExit(f"{what} '{path}' has no config.json, so it is not a saved model; give the dir that "
                         "save_pretrained wrote") from None
    except ValueError as e:
        raise SystemExit(f"{what} '{path}': config.json is not valid JSON ({e}); restore it") from None
    weights = [f for f in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                           "pytorch_model.bin.index.json") if os.path.isfile(os.path.join(path, f))]
    if not weights:
        raise SystemExit(f"{what} '{path}' has no weights (model.safetensors); give the dir that save_pretrained wrote")
    for file in glob.glob(os.path.join(path, "*.safetensors")):
        check_safetensors(file, what)
    tokenizer_files = ("tokenizer.json", "tokenizer_config.json")
    if tokenizer and not any(os.path.isfile(os.path.join(path, f)) for f in tokenizer_files):
        raise SystemExit(f"{what} '{path}' has no tokenizer files (tokenizer.json, tokenizer_config.json); save the "
                         "tokenizer into it with tokenizer.save_pretrained")
    if reward_model:
        architectures = config.get("architectures") or ["(no architectures)"]
        if not any(a.endswith("ForSequenceClassification") for a in architectures):
            raise SystemExit(f"{what} '{path}' is a {architectures[0]}, not a reward model (a sequence classifier "
                             "with one output); give the dir train_rm.py wrote")
        num_labels = len(config.get("id2label") or {}) or config.get("num_labels", 1)
        if num_labels != 1:
            raise SystemExit(f"{what} '{path}' has {num_labels} outputs (num_labels), not the 1 a reward model has")


def check_safetensors(file: str, what: str) -> None:
    """A safetensors file is complete: 8 bytes of header length, the JSON header, then exactly the data it lists."""
    size = os.path.getsize(file)
    try:
        with open(file, "rb") as f:
            header_length = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(header_length)) if 8 + header_length <= size else None
        data = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
        complete = 8 + header_length + data == size
    except (ValueError, TypeError, KeyError, AttributeError):
        complete = False
    if not complete:
        raise SystemExit(f"{what}: '{file}' is truncated or corrupt ({size} bytes); save or copy the model again")


def from_pretrained(auto_class, name_or_path: str, what: str, **kwargs):
    """`auto_class.from_pretrained`, with the library's long offline / unknown-name error cut to one line."""
    try:
        return auto_class.from_pretrained(name_or_path, **kwargs)
    except Exception as e:  # offline, unknown name, unreadable files: transformers raises many kinds
        raise SystemExit(f"cannot load {what} '{name_or_path}': {first_line(e)[:300]}") from None


def load_tokenizer(name_or_path: str, padding_side: str = "right", add_pad_token: bool = False):
    """AutoTokenizer with a pad token that is *not* EOS.

    Padding with EOS would make every pad position look like a real end of text, so loss masks built
    from `input_ids != pad_token_id` would drop the real EOS too. Qwen2 pads with its EOS, and GPT-2 has no
    pad token (Pythia's pads with '<|padding|>' under transformers 5; older copies had none):
    `add_pad_token` adds a distinct '[PAD]' (the model's embeddings grow by one
    row in load_causal_lm / load_reward_model). It is an explicit choice, because it changes the model.
    """
    check_path(name_or_path, "tokenizer")
    tokenizer = from_pretrained(AutoTokenizer, name_or_path, "tokenizer", padding_side=padding_side)
    if tokenizer.eos_token is None:
        raise SystemExit(f"tokenizer of '{name_or_path}' has no EOS token: set tokenizer.eos_token and save it")
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        problem = "has no pad token" if tokenizer.pad_token is None else "pads with its EOS token"
        if not add_pad_token:
            raise SystemExit(f"tokenizer of '{name_or_path}' {problem}, which would mask the real EOS out of the "
                             "loss; pass --add_pad_token to add a distinct '[PAD]', or save the tokenizer with one")
        tokenizer.add_special_tokens({"pad_token": "[PAD]"})
        print0(f"tokenizer of '{name_or_path}' {problem}; added '[PAD]' (id {tokenizer.pad_token_id})")
    return tokenizer


def end_of_turn_tokens(tokenizer) -> list[int]:
    """The special token a chat template puts after an assistant turn (<|im_end|>, <|eot_id|>), if any.

    Found by rendering one turn: the first special token after the assistant's text. sft.py ends chat
    completions with it, train_rm.py reads the reward there, and ppo.py ends responses there (TRL's PPO
    stopped at EOS only, so a chat model's response ran on past its turn).
    """
    sentinel = "SENTINEL_7f3a"
    conversation = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": sentinel}]
    text = tokenizer.apply_chat_template(conversation, tokenize=False)
    after = text.split(sentinel, 1)[1] if sentinel in text else ""
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    return [i for i in tokenizer(after, add_special_tokens=False)["input_ids"] if i in special][:1]


def disable_dropout(model: torch.nn.Module) -> None:
    """No dropout anywhere: PPO's ratio and the KL must compare deterministic forwards (Huang et al. 2024)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    for key in ("attention_dropout", "hidden_dropout", "classifier_dropout", "dropout", "attn_pdrop",
                "resid_pdrop", "embd_pdrop", "summary_first_dropout"):
        if hasattr(model.config, key) and isinstance(getattr(model.config, key), float):
            setattr(model.config, key, 0.0)


def _prepare(model, tokenizer, name_or_path: str):
    eos = [getattr(c, "eos_token_id", None) for c in (model.config, getattr(model, "generation_config", None))]
    if all(e is None for e in eos):
        raise SystemExit(f"the config of model '{name_or_path}' has no eos_token_id, so nothing tells generation "
                         f"where a response ends; set config.eos_token_id = {tokenizer.eos_token_id} "
                         f"(the tokenizer's '{tokenizer.eos_token}') and save it")
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        if len(tokenizer) - rows != 1 or tokenizer.pad_token_id != rows:  # more than the pad we added
            raise SystemExit(f"model '{name_or_path}' has {rows} embedding rows, but its tokenizer has "
                             f"{len(tokenizer)} tokens: the tokenizer does not belong to this model; pair them as they "
                             "were trained")
        print0(f"note: grew the embeddings of '{name_or_path}' from {rows} to {len(tokenizer)} rows, "
               "for the added pad token")
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config = token_ids_only(model.generation_config, tokenizer)
    disable_dropout(model)
    return model


def token_ids_only(shipped, tokenizer):
    """The model's generation config cut down to its token ids, so that generate() samples as the call says.

    generate() fills every field a call leaves unset (None) from model.generation_config (transformers 5.23,
    GenerationMixin._prepare_generation_config). A shipped repetition_penalty (Qwen2.5-Instruct: 1.05 to 1.1),
    no_repeat_ngram_size, min_new_tokens, ... would reshape every rollout, while PPO's logprobs model plain
    softmax(logits / T); and a field that is off when None (bad_words_ids, suppress_tokens, min_p, forced_eos_token_id,
    ...) a GenerationConfig passed to generate() cannot switch off. Unset fields now fall to the library defaults,
    neutral but for do_sample False and top_k 50, which every sampling call sets. The saved SFT and PPO dirs carry
    nothing on.
    """
    from transformers import GenerationConfig

    return GenerationConfig(bos_token_id=shipped.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id)


def load_causal_lm(name_or_path: str, tokenizer, dtype: str = "float32"):
    """A causal LM, its embeddings grown to the tokenizer, dropout off."""
    check_path(name_or_path, "model")
    model = from_pretrained(AutoModelForCausalLM, name_or_path, "model", dtype=DTYPES[dtype])
    return _prepare(model, tokenizer, name_or_path)


def load_reward_model(name_or_path: str, tokenizer, dtype: str = "float32"):
    """A sequence classifier with one output: the scalar reward (or value) head.

    `pad_token_id` must be in its config: the head reads the last non-pad token, and without it the
    reward is read at the wrong position (TRL's "RM stuck near 60%" bug).
    """
    check_path(name_or_path, "model")
    model = from_pretrained(AutoModelForSequenceClassification, name_or_path, "model", num_labels=1,
                            dtype=DTYPES[dtype])
    return _prepare(model, tokenizer, name_or_path)


def save_model(model, tokenizer, output_dir: str, stage: str, results: dict | None = None,
               extra_config: dict | None = None, state_dict: dict | None = None) -> None:
    """save_pretrained on rank 0, gathering FSDP2 shards first (unless `state_dict` comes gathered already: rank
    0's full one, {} elsewhere); `results` go to eval_results.json inside.

    Atomic: everything is written to `{output_dir}.tmp` (marked as this stage's, so a crash leaves nothing
    that a later run cannot recognise and clean up), which then swaps places with the old run in one
    rename (`exchange`). At every instant `output_dir` holds the complete old run or the complete new one.
    Every rank must call this (the gather is collective).
    """
    if state_dict is None and dist.is_initialized():
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state_dict = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if get_rank() == 0:
        tmp = output_dir.rstrip("/") + ".tmp"
        with write_errors(tmp, f"'{output_dir}' is unchanged"):
            remove_own_dir(tmp)
            os.makedirs(tmp)
            # first: from here on the dir is recognisably this project's; a finished run's names its last checkpoint
            write_marker(tmp, stage, **(final_checkpoint(output_dir) if results is not None else {}))
            for key, value in (extra_config or {}).items():
                setattr(model.config, key, value)
            model.save_pretrained(tmp, state_dict=state_dict)
            tokenizer.save_pretrained(tmp)
            if results is not None:  # last: a finished run is one with eval_results.json
                write_json(os.path.join(tmp, "eval_results.json"), results)
        replace_dir(tmp, output_dir)
    if dist.is_initialized():
        dist.barrier()


# ----------------------------------------------------------------------------------------------
# Output dirs: a run changes only what it created. Every dir a stage writes (its output dir, its
# checkpoint dir, the `.tmp` dir of an atomic save) carries a marker file naming the stage; only a
# marked dir of the same stage is ever replaced, and only with --overwrite. A `.lock` file beside the
# output dir, holding the pid of its run, keeps a second run out.
# ----------------------------------------------------------------------------------------------
MARKER = "rlhf_run.json"
PROJECT_ROOT = os.path.dirname(os.path.abspath(__file__))


def write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)


def write_marker(path: str, stage: str, kind: str = "run", **record) -> None:
    write_json(os.path.join(path, MARKER), {"stage": stage, "kind": kind, **record})


def read_marker(path: str) -> dict | None:
    """The marker of a dir this project wrote, or None (no marker, or not one of ours)."""
    try:
        with open(os.path.join(path, MARKER)) as f:
            marker = json.load(f)
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and "stage" in marker else None


def ours_to_remove(path: str) -> bool:
    """A real dir (not a link) that carries this project's marker, or is empty: deleting it loses nothing of
    anyone's (an empty one is what a crash between a save's mkdir and its marker leaves)."""
    return os.path.isdir(path) and not os.path.islink(path) and (not os.listdir(path) or read_marker(path) is not None)


def remove_own_dir(path: str) -> None:
    """Delete a dir this project wrote (ours_to_remove); refuse anything else."""
    if not os.path.lexists(path):
        return
    if not ours_to_remove(path):
        raise SystemExit(f"'{path}' is in the way and was not written by this project; move it away and run again")
    shutil.rmtree(path)


def exchange(a: str, b: str) -> bool:
    """Swap two paths in one atomic rename (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    import ctypes

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def replace_dir(new: str, path: str) -> None:
    """Put the complete dir `new` at `path`, then delete what was there.

    Where the kernel swaps two dirs atomically, `path` never lacks a complete run. Elsewhere the old run
    is moved aside to `{path}.old` first; a crash between the two renames is undone by recover_output.
    """
    if not os.path.exists(path):
        os.replace(new, path)
    elif exchange(new, path):  # `new` now holds the old run
        shutil.rmtree(new)
    else:
        old = path.rstrip("/") + ".old"
        os.replace(path, old)
        os.replace(new, path)
        shutil.rmtree(old)


def recover_output(path: str) -> None:
    """Finish or undo a save that a crash interrupted: restore `{path}.old` if `path` is gone, drop the rest."""
    old, tmp = path.rstrip("/") + ".old", path.rstrip("/") + ".tmp"
    if read_marker(old) is not None:
        if not os.path.exists(path):
            os.replace(old, path)
            print0(f"note: restored '{path}' from '{old}', which an interrupted save left")
        else:
            shutil.rmtree(old)
            print0(f"note: removed '{old}', the previous run an interrupted save left")
    if ours_to_remove(tmp):
        shutil.rmtree(tmp)
        print0(f"note: removed '{tmp}', the leftover of an interrupted save")


@contextlib.contextmanager
def write_errors(path: str, intact: str):
    """A failed write (disk full, permissions) stops the run with one line; our partial `path` is removed."""
    from safetensors import SafetensorError
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        yield
    except (OSError, CheckpointException, SafetensorError) as error:
        e = os_error(error)
        if e is None:
            raise
        if read_marker(path) is not None or path.endswith(".tmp"):
            shutil.rmtree(path, ignore_errors=True)
        problem = "the disk is full" if e.errno in (errno.ENOSPC, errno.EDQUOT) else e.strerror or type(e).__name__
        where = e.filename if isinstance(e.filename, str) else path
        raise SystemExit(f"cannot write '{where}': {problem}; {intact}; the "
                         f"partial write ({path}) was removed. Free space (or fix the permissions) and run again, with "
                         "--resume where a checkpoint exists") from None


def os_error(error: Exception) -> OSError | None:
    """The OSError behind a failed write, or None when it was no I/O error. DCP wraps each rank's error in a
    CheckpointException; safetensors (the model weights) raises a SafetensorError that carries the OS error in its
    text only: 'Error while serializing: I/O error: No space left on device (os error 28)'."""
    import re

    from torch.distributed.checkpoint.api import CheckpointException

    if isinstance(error, OSError):
        return error
    if isinstance(error, CheckpointException):
        inner = [f[0] if isinstance(f, tuple) else f for f in error.failures.values()]
        return next((x for x in inner if isinstance(x, OSError)), None)
    code = re.search(r"I/O error: .*\(os error (\d+)\)", str(error))
    return OSError(int(code[1]), os.strerror(int(code[1]))) if code else None


def check_output_path(path: str, flag: str, inputs: dict[str, str]) -> None:
    """Refuse an output path that is a protected dir, overlaps an input or another run, or cannot be written."""
    real = os.path.realpath(path)
    home = os.path.realpath(os.path.expanduser("~"))
    protected = {"/": "the filesystem root", home: "your home directory",
                 os.path.realpath(os.getcwd()): "the current directory",
                 os.path.realpath(PROJECT_ROOT): "this project's own directory"}
    for place, name in protected.items():
        if real == place or place.startswith(real.rstrip(os.sep) + os.sep):
            raise SystemExit(f"{flag} '{path}' is or contains {name}; give the run a dir of its own, e.g. models/name")
    for what, given in inputs.items():
        if given is None or not os.path.exists(given) and what != "output dir":  # hub names are not paths
            continue
        other = os.path.realpath(given)
        if real == other or other.startswith(real + os.sep) or real.startswith(other + os.sep):
            relation = "is" if real == other else "contains" if other.startswith(real + os.sep) else "lies inside"
            raise SystemExit(f"{flag} '{path}' {relation} the {what} '{given}', which this run reads; "
                             f"pick another {flag}")
    parent = os.path.dirname(real)
    while parent != os.path.dirname(parent):  # inside another run (its marker is in an ancestor)?
        marker = read_marker(parent)
        if marker is not None:
            raise SystemExit(f"{flag} '{path}' lies inside the {marker['stage']} {marker.get('kind', 'run')} dir "
                             f"'{parent}'; pick a dir outside it")
        parent = os.path.dirname(parent)
    if os.path.lexists(real) and not os.path.isdir(real):
        raise SystemExit(f"{flag} '{path}' is a file, not a dir; pick another {flag}")
    existing = real
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise SystemExit(f"{flag} '{path}': '{existing}' is a file, so the dir cannot be made; pick another {flag}")
    try:  # the only sure test of writability (root passes os.access checks on read-only mounts, /proc too)
        os.rmdir(tempfile.mkdtemp(dir=existing, prefix=".write_test_"))
    except OSError as e:
        raise SystemExit(f"{flag} '{path}': cannot write in '{existing}' ({e.strerror}); pick another {flag}") from None


def check_own_dir(path: str, flag: str, stage: str, kind: str) -> dict | None:
    """An existing `path` must be empty or this stage's marked dir of this kind; returns its marker."""
    if not os.path.isdir(path) or not os.listdir(path):
        return None
    marker = read_marker(path)
    if marker is None:
        raise SystemExit(f"{flag} '{path}' is not empty and was not written by {stage} (it has no {MARKER}); "
                         f"pick a new or empty dir, or empty it yourself")
    if (marker["stage"], marker.get("kind", "run")) != (stage, kind):
        raise SystemExit(f"{flag} '{path}' holds the {marker.get('kind', 'run')} of {marker['stage']}, not of {stage}; "
                         f"pick another {flag}")
    return marker


class OutputLock:
    """`{output_dir}.lock`, holding the pid of the run that writes output_dir: one run per output dir."""

    def __init__(self, output_dir: str, flag: str = "--output_dir"):
        self.path = output_dir.rstrip("/") + ".lock"
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv)}
        while True:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                holder = self.holder()
                if holder.get("pid") == os.getpid() and holder.get("host") == me["host"]:
                    break  # this process holds it already (an earlier run in the same process)
                if holder.get("host") == me["host"] and not pid_alive(holder.get("pid")):
                    os.remove(self.path)
                    print0(f"note: took over '{self.path}' from process {holder.get('pid')}, which is gone")
                    continue
                raise SystemExit(f"{flag} '{output_dir}' is in use by process {holder.get('pid')} on "
                                 f"{holder.get('host')} ({holder.get('command')}); wait for it to finish, or pick "
                                 f"another {flag} (delete '{self.path}' if that run is gone)") from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            break
        atexit.register(self.release)

    def holder(self) -> dict:
        try:
            with open(self.path) as f:
                holder = json.load(f)
            return holder if isinstance(holder, dict) else {}
        except (OSError, ValueError):
            return {}  # unreadable: a crash mid-write; its pid is gone

    def release(self) -> None:
        if self.holder().get("pid") == os.getpid():
            try:
                os.remove(self.path)
            except OSError:
                pass


def pid_alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def prepare_output(output_dir: str, checkpoint_dir: str, stage: str, inputs: dict[str, str], resume: bool,
                   overwrite: bool, args: dict, world_size: int) -> None:
    """Everything about the output and checkpoint dirs that can fail, checked before any work is done.

    Rank 0 checks the paths, takes the lock, cleans up after an interrupted save and, for --resume, compares
    the flags with the checkpoint's before any tensor is loaded. Every rank learns the outcome.
    """
    def check() -> None:
        check_output_path(output_dir, "--output_dir", inputs)
        check_output_path(checkpoint_dir, "--checkpoint_dir", {**inputs, "output dir": output_dir})
        for leftover in (output_dir.rstrip("/") + ".tmp", output_dir.rstrip("/") + ".old"):
            if os.path.lexists(leftover) and not ours_to_remove(leftover):
                raise SystemExit(f"'{leftover}' is in the way of the atomic save and was not written by this project; "
                                 "move it away and run again")
        OutputLock(output_dir)
        OutputLock(checkpoint_dir, "--checkpoint_dir")  # runs with other output dirs must not share checkpoints
        recover_output(output_dir)
        finished = check_own_dir(output_dir, "--output_dir", stage, "run") \
            and os.path.isfile(os.path.join(output_dir, "eval_results.json"))
        if finished and resume and (message := finished_run(output_dir, checkpoint_dir, stage)):
            raise SystemExit(message)
        if finished and not overwrite and not resume:
            raise SystemExit(f"'{output_dir}' holds a finished run; pass --overwrite to replace it, "
                             "or pick another --output_dir")
        owner = (check_own_dir(checkpoint_dir, "--checkpoint_dir", stage, "checkpoints") or {}).get("output_dir")
        if owner is not None and owner != os.path.realpath(output_dir):
            raise SystemExit(f"--checkpoint_dir '{checkpoint_dir}' holds the checkpoints of the run in '{owner}', "
                             f"not of --output_dir '{output_dir}'; pick another --checkpoint_dir")
        RUNS[os.path.realpath(output_dir)] = checkpoint_dir
        for leftover in glob.glob(os.path.join(checkpoint_dir, "step_*.tmp")):
            shutil.rmtree(leftover)  # an interrupted checkpoint save, in our own marked dir
        if resume:
            check_resume(checkpoint_dir, args, world_size)
        elif checkpoints(checkpoint_dir) and not overwrite:
            raise SystemExit(f"'{checkpoint_dir}' holds checkpoints of an unfinished run; pass --resume to continue "
                             "it, or --overwrite to start over")

    on_rank0(check)


# This process's runs, recorded by prepare_output (rank 0): output dir (real path) -> checkpoint dir. save_model names
# the last checkpoint in a finished run's marker, and save_checkpoint the output dir in a new checkpoint dir's.
RUNS: dict[str, str] = {}


def read_meta(checkpoint: str | None) -> dict:
    """A checkpoint's meta.json, or {} (no checkpoint, or unreadable: check_resume names that)."""
    try:
        with open(os.path.join(checkpoint, "meta.json")) as f:
            meta = json.load(f)
        return meta if isinstance(meta, dict) else {}
    except (OSError, ValueError, TypeError):
        return {}


def final_checkpoint(output_dir: str) -> dict:
    """What the marker of a finished run keeps of the checkpoint it ended at: its step and its id."""
    checkpoint_dir = RUNS.get(os.path.realpath(output_dir))
    meta = read_meta(latest_checkpoint(checkpoint_dir)) if checkpoint_dir else {}
    return {"final_checkpoint": {"step": meta["step"], "id": meta["id"]}} if "id" in meta else {}


def finished_run(output_dir: str, checkpoint_dir: str, stage: str) -> str | None:
    """--resume on a finished run: the line saying so, or None when the latest checkpoint is not the one the run
    ended at: a newer run's (--overwrite over the finished one, stopped before its final save), which --resume
    continues.

    A finished run is a result: re-evaluating it would rewrite its eval_results.json with another wall time."""
    final = read_marker(output_dir).get("final_checkpoint") or {}  # none: saved before this was kept
    latest = latest_checkpoint(checkpoint_dir)
    meta = read_meta(latest)
    if latest and final and meta.get("id") != final.get("id"):
        return None
    step = final.get("step", meta.get("step"))
    unit = "update" if stage in ("ppo", "grpo") else "step"
    return (f"'{output_dir}' holds a run that finished{f' at {unit} {step}' if step is not None else ''}: --resume has "
            "nothing to continue and changed no file; pass --overwrite instead of --resume to run it again, or pick "
            "another --output_dir")


def on_rank0(fn) -> None:
    """Run a check on rank 0 only; if it fails, every rank stops (the others quietly: rank 0 said why)."""
    error = None
    if get_rank() == 0:
        try:
            fn()
        except SystemExit as e:
            error = e
            if isinstance(e.code, str):
                tell_torchrun(e.code)  # now: torchrun may stop this rank with SIGTERM once another has exited
    if dist.is_initialized():
        failed = torch.tensor([float(error is not None)], device="cuda" if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(failed)
        if failed.item():  # rank 0's line goes to every rank, for torchrun's report of each
            line = [error.code if error is not None and isinstance(error.code, str) else None]
            dist.broadcast_object_list(line, src=0)
            if error is None:
                if line[0]:
                    tell_torchrun(line[0])
                raise SystemExit(1)
    if error is not None:
        raise error


# ----------------------------------------------------------------------------------------------
# Distributed
# ----------------------------------------------------------------------------------------------
@dataclass
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(group_of_one: bool = False) -> Dist:
    """Read torchrun's environment. A plain `python script.py` (no WORLD_SIZE) touches no distributed code, unless
    `group_of_one`: a process group of one process, so that FSDP2's mixed precision runs on one GPU as on N."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if group_of_one:
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                                    world_size=1, device_id=device if device.type == "cuda" else None)
        return Dist(0, 1, 0, device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return Dist(rank, world_size, local_rank, device)


def teardown_distributed() -> None:
    """End of a torchrun run: every rank waits for the others, then destroys the process group. Without the
    barrier, a rank that tears gloo down while another is still writing its outputs can abort at exit."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def get_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def print0(*args, **kwargs) -> None:
    if get_rank() == 0:
        print(*args, **kwargs, flush=True)


def seed_everything(seed: int, rank: int = 0) -> None:
    """Each rank gets seed + rank, so ranks sample different data and rollouts."""
    random.seed(seed + rank)
    np.random.seed(seed + rank)
    torch.manual_seed(seed + rank)


def transformer_blocks(model) -> list[torch.nn.Module]:
    """The repeated decoder blocks, found by the class names HF lists in `_no_split_modules`."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        raise SystemExit(f"cannot find the transformer blocks of {type(model).__name__} to shard")
    return blocks


def fsdp_wrap(model, device: torch.device, bf16: bool | None = None):
    """FSDP2: `fully_shard` each transformer block, then the root (a bare head: the root alone). With `bf16` (None:
    on GPU) the mixed precision: bf16 all-gathers and compute over the stored weights, fp32 gradient reduction.

    A no-op without a process group.
    """
    if not dist.is_initialized():
        return model.to(device)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    model.to(device)
    if bf16 is None:
        bf16 = device.type == "cuda"
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
    kwargs = {"mp_policy": mp} if mp is not None else {}
    for block in transformer_blocks(model) if hasattr(model, "_no_split_modules") else []:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model


def bf16_compute(mixed_precision: str) -> bool:
    """--mixed_precision: whether the models compute in bf16 over their stored weights (auto: on CUDA)."""
    return mixed_precision == "bf16" or (mixed_precision == "auto" and torch.cuda.is_available())



# ----------------------------------------------------------------------------------------------
# What the RL stages (ppo.py, grpo.py) share that is no algorithm: their prompts, frozen and LoRA models, FSDP2
# gathering, reward functions given by name, sample tables
# ----------------------------------------------------------------------------------------------
def load_prompts(args: PromptFlags, tokenizer, model: str) -> tuple[dict[str, tuple[list[str], list[list[int]]]], bool]:
    """({split: (prompt texts, their token ids)} for the train and eval splits, whether they are chat), or a
    one-line error."""
    splits = load_dataset(args.dataset)
    out = {split: prompts_of_split(args, splits, split, tokenizer, model)
           for split in (args.train_split, args.eval_split)}
    return out, is_chat(args, list(splits[args.train_split][args.prompt_column][:1]))


def prompts_of_split(args: PromptFlags, splits, split: str, tokenizer, model: str) -> tuple[list[str], list[list[int]]]:
    if split not in splits:
        raise SystemExit(f"dataset '{args.dataset}' has no split '{split}' (it has: {', '.join(splits)}); "
                         "set --train_split / --eval_split")
    ds = splits[split]
    if args.prompt_column not in ds.column_names:
        raise SystemExit(f"split '{split}' of '{args.dataset}' has no column '{args.prompt_column}' "
                         f"(it has: {', '.join(ds.column_names)}); set --prompt_column")
    texts = list(ds[args.prompt_column])
    where = f"split '{split}' of '{args.dataset}'"
    if isinstance(texts[0], list):  # chat prompts: lists of messages
        for i, messages in enumerate(texts):
            check_messages(messages, f"{where}: row {i}")
    else:
        check_texts(texts, args.prompt_column, where)
    marker = args.implicit_prompt_marker
    if marker is not None:  # whole dialogues: the prompt ends at the last marker
        texts = [t[: t.rfind(marker) + len(marker)] if marker in t else None for t in texts]
    chat = is_chat(args, texts)
    if chat:
        if tokenizer.chat_template is None:
            raise SystemExit(f"chat prompts need a tokenizer with a chat template, and '{model}' has none; "
                             "pass --prompt_format text, or use a tokenizer with one")
        texts = [render_chat_prompt(t, tokenizer) for t in texts]
    # rows that cannot be used are dropped with a count (common.drop_unusable: the same policy in every stage)
    keep = drop_unusable(["without the prompt marker" if t is None
                          else "with an empty prompt" if not t.strip() else None
                          for t in texts], where, args.max_dropped_fraction)
    texts = [texts[i] for i in keep]
    ids = tokenizer(texts, add_special_tokens=not chat)["input_ids"]  # a rendered template has its own BOS
    check_unknown_tokens(ids, tokenizer, where)
    # a long prompt keeps its end, the text the response continues, behind its BOS or chat header
    ids = fit_prompts(ids, args.max_prompt_length, args.truncate_long_prompts, prompt_head(tokenizer, chat), where)
    return texts, ids


def is_chat(args: PromptFlags, prompts: list) -> bool:
    return args.prompt_format == "chat" or (args.prompt_format == "auto" and isinstance(prompts[0], list))


def render_chat_prompt(prompt, tokenizer) -> str:
    """A text (one user message) or a message list, rendered up to the assistant's turn (add_generation_prompt)."""
    if prompt is None:  # no --implicit_prompt_marker in it: dropped later
        return None
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if messages and messages[-1]["role"] == "assistant":  # the response is the policy's to write
        messages = messages[:-1]
    if not messages or any(not str(m["content"]).strip() for m in messages):
        return ""  # reported as an empty prompt
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def stop_token_ids(args: PromptFlags, tokenizer, chat: bool) -> list[int]:
    """EOS, plus --stop_tokens or (for chat prompts) the template's end-of-turn token."""
    ids = [tokenizer.eos_token_id]
    if args.stop_tokens is not None:
        unknown = [t for t in args.stop_tokens if tokenizer.convert_tokens_to_ids(t) in (None, tokenizer.unk_token_id)]
        if unknown:
            raise SystemExit(f"--stop_tokens {unknown} are not single tokens of the tokenizer; pass tokens it has")
        extra = [tokenizer.convert_tokens_to_ids(t) for t in args.stop_tokens]
    else:
        extra = end_of_turn_tokens(tokenizer) if chat else []
    return ids + [i for i in extra if i not in ids]


def retokenized(query_responses, attention_mask, has_eos, tokenizer, rm_tokenizer, rm_end_id: int):
    """Prompts + responses in the policy's vocabulary -> the same texts in an RM's: decoded, re-tokenised and
    right-padded. Decoding drops the special tokens, the policy's EOS or end-of-turn among them, so where a
    response ended (has_eos) the RM's own end token goes back on: its EOS, or for chat its template's end-of-turn
    token. -> ((B, S) ids, (B, S) attention mask)"""
    texts = tokenizer.batch_decode(query_responses.masked_fill(attention_mask == 0, tokenizer.pad_token_id),
                                   skip_special_tokens=True)
    ids = [x + [rm_end_id] * int(e) for x, e in zip(rm_tokenizer(texts)["input_ids"], has_eos.tolist())]
    width, device = max(len(x) for x in ids), query_responses.device
    padded = torch.tensor([x + [rm_tokenizer.pad_token_id] * (width - len(x)) for x in ids], device=device)
    lengths = torch.tensor([len(x) for x in ids], device=device)
    return padded, (torch.arange(width, device=device)[None] < lengths[:, None]).long()


@contextlib.contextmanager
def unsharded(model):
    """Under FSDP2, all-gather the parameters once for many forwards (a whole generation: one forward per
    token), then reshard. Without it FSDP2 would all-gather every block at every token. No-op on 1 process."""
    if not dist.is_initialized() or model is None:
        yield
        return
    from torch.distributed.fsdp import FSDPModule

    fsdp_modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in fsdp_modules:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield
    finally:
        for m in fsdp_modules:
            m.reshard()
            # FSDP2's defaults: blocks reshard after forward; the root does not (backward needs its params first)
            m.set_reshard_after_forward(m is not fsdp_modules[0], recurse=False)


def quantize_int8(model):
    """Weight-only int8 of every linear layer: each weight row stored as int8 with one scale, w = scale * q (absmax /
    127), dequantised in the matmul; activations stay in the model's dtype. CPU and CUDA. torchao's
    Int8QuantizedTrainingLinearWeight (a prototype, used frozen here) rather than its Int8WeightOnlyConfig, because
    FSDP2 can shard it: it splits by rows and all-gathers its int8 rows and scales (FSDP2's all-gather extension).
    A scalar head (one row: nothing to save, and no row for a second rank) stays as it is."""
    from torchao.prototype.quantized_training import int8_weight_only_quantized_training
    from torchao.quantization import quantize_

    quantize_(model, int8_weight_only_quantized_training(),
              filter_fn=lambda m, _: isinstance(m, torch.nn.Linear) and m.out_features > 1)
    return model


def load_frozen(load, path: str, tokenizer, dtype: str, frozen_dtype: str):
    """A frozen model in --frozen_dtype: loaded in that dtype, or quantised to int8 after loading."""
    model = load(path, tokenizer, dtype if frozen_dtype in ("same", "int8") else frozen_dtype)
    if frozen_dtype == "int8":
        model = quantize_int8(model)
    return model.eval().requires_grad_(False)


def shard_frozen(model, frozen_dtype: str, device: torch.device, bf16: bool | None = None):
    """FSDP2 for a frozen model (fsdp_wrap): an int8 one too, its int8 rows sharded and gathered as int8 (1 byte per
    parameter, half of bf16's). Without other processes an int8 model stays whole (FSDP2 2.13's one-rank shortcut
    drops the scales of an all-gather extension) and computes in --dtype."""
    if model is None:
        return None
    if frozen_dtype == "int8" and not (dist.is_initialized() and dist.get_world_size() > 1):
        return model.to(device)
    return fsdp_wrap(model, device, bf16)


@contextlib.contextmanager
def same_draws_on_every_rank(seed: int, d: Dist):
    """Random weights drawn before FSDP2 shards a model must be the same draw on every rank, since each rank keeps
    its shard of its own copy: the ranks draw from `seed`, then return to their own streams (seed + rank). One
    process draws from its stream as before."""
    if d.world_size > 1:
        torch.manual_seed(seed)
    yield
    if d.world_size > 1:
        seed_everything(seed, d.rank)


def with_lora(policy, args: MemoryFlags):
    """The policy with LoRA adapters (peft), B = 0 so that it starts at the SFT weights."""
    from peft import LoraConfig, get_peft_model

    return get_peft_model(policy, LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0.0,
                                             target_modules=args.lora_target_modules))


def merged_lora(policy, args: MemoryFlags, sft_model: str, tokenizer):
    """The LoRA policy as a plain HF model, W + alpha / r * B A. Under FSDP2 every rank gathers the full state dict
    (collective) and rank 0 folds it into a fresh CPU copy. -> (model, its full state dict for save_model, or
    None: take the model's own)"""
    if not dist.is_initialized():
        return policy.merge_and_unload(), None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() != 0:
        return policy, {}  # only rank 0 writes
    copy = with_lora(load_causal_lm(sft_model, tokenizer, args.dtype), args)
    copy.load_state_dict(full)
    merged = copy.merge_and_unload()
    return merged, merged.state_dict()


def load_fn(spec: str | None, flag: str):
    """`module:function` (--gold_reward_fn, --reward_fn) -> the function, or a one-line error."""
    if spec is None:
        return None
    module_name, _, fn_name = spec.partition(":")
    if not module_name or not fn_name:
        raise SystemExit(f"{flag} '{spec}' must look like module:function")
    try:
        fn = getattr(importlib.import_module(module_name), fn_name)
    except (ImportError, AttributeError) as e:
        raise SystemExit(f"{flag} '{spec}' cannot be imported: {e}") from None
    if not callable(fn):
        raise SystemExit(f"{flag} '{spec}' is not callable")
    return fn


def call_fn(fn, prompts: list[str], completions: list[str], flag: str) -> list[float]:
    """fn(prompts, completions) as floats, one per completion, or a one-line error."""
    scores = [float(g) for g in fn(prompts, completions)]
    if len(scores) != len(completions):
        raise SystemExit(f"{flag} returned {len(scores)} scores for {len(completions)} completions")
    return scores


def markdown_table(rows, header) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = (f"{c:.3f}" if isinstance(c, float) else str(c).replace("|", "\\|") for c in row)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# The RL stages' bookkeeping (ppo.py, grpo.py): stops on non-finite numbers, logging, checkpoints, the final report.
# `args`, `setup`, `models` and `progress` are the stage's own Args, Setup, Models and Progress.
# ----------------------------------------------------------------------------------------------
def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks (a no-op on one process)."""
    if dist.is_initialized():
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def gold_wins(golds: list[float], baseline_golds: list[float]) -> float:
    """Wins of one policy's responses over another's on the same prompts, ties counting 1/2:
    sum_i [g_i > b_i] + 0.5 * [g_i == b_i]. Divided by the count, it is the win rate."""
    return sum(1.0 if g > b else 0.5 if g == b else 0.0 for g, b in zip(golds, baseline_golds))


def last_checkpoint(args, setup) -> str:
    return (latest_checkpoint(setup.checkpoint_dir) if args.save else None) or "none"


def stop_if_not_finite(scores: torch.Tensor, update: int, args, setup) -> None:
    """A NaN or inf score stops the run before the update, on every rank (all see the count)."""
    if all_reduce_sum((~torch.isfinite(scores)).sum()).item():
        raise SystemExit(f"non-finite reward at update {update}: stopped before the update; last good checkpoint: "
                         f"{last_checkpoint(args, setup)}. Check the reward model (and its reward_mean/reward_std)")


def rl_clip_grad_norm_or_stop(models, args, setup, step: int, losses: dict) -> float:
    """The global gradient norm, clipped only with --max_grad_norm; a non-finite one stops the run before the
    optimizer step can carry it into the weights, naming the last micro-batch's losses (`losses`: its stats)."""
    params = models.optimizer.param_groups[0]["params"]  # the trained parameters (LoRA: the adapters only)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm or float("inf"))
    grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
    if not math.isfinite(grad_norm):
        losses = {name: float(v.detach()) for name, v in losses.items() if name.startswith("loss/")}
        raise SystemExit(f"non-finite gradient norm ({grad_norm}) at update {step}, losses {losses}: stopped "
                         f"before the optimizer step; last good checkpoint: {last_checkpoint(args, setup)}")
    return grad_norm


def mean_of(stats: list[dict]) -> dict:
    """Each statistic's mean over the update's micro-batches."""
    return {name: torch.stack([s[name] for s in stats]).mean() for name in stats[0]}


def all_reduce_mean(metrics: dict, processes: Dist) -> dict:
    """Each value's mean over ranks, all of them in one all-reduce -> floats."""
    local = torch.stack([torch.as_tensor(v, dtype=torch.float32, device=processes.device) for v in metrics.values()])
    return dict(zip(metrics, all_reduce_sum(local / processes.world_size).tolist()))


def check_finite(metrics: dict, update: int, args, setup) -> None:
    """A NaN or inf statistic stops the run, naming it and the last good checkpoint."""
    bad = [name for name, value in metrics.items() if not math.isfinite(value)]
    if bad:
        raise SystemExit(f"non-finite training statistics at update {update} ({', '.join(bad)}): stopped; "
                         f"last good checkpoint: {last_checkpoint(args, setup)}")


def timing_metrics(t_start: float, t_generated: float, t_scored: float, t_end: float, batch_size: int,
                   progress) -> dict:
    timing = {"time/generate": t_generated - t_start, "time/score": t_scored - t_generated,
              "time/train": t_end - t_scored, "time/update": t_end - t_start}
    timing["eps"] = batch_size / timing["time/update"]  # episodes per second
    progress.timings.append(timing)
    return timing


def write_update(writer, metrics: dict, update: int, args, setup, queries, responses, scores,
                 progress) -> None:
    """The update's metrics to the history and TensorBoard, a table of samples now and then, a progress line."""
    progress.history.append(metrics)
    step = update * args.batch_size
    if writer is not None:
        for key, value in metrics.items():
            if key != "episode":
                writer.add_scalar(key, value, step)
        if args.sample_every and (update % args.sample_every == 0 or update == 1):
            n_rows = min(args.num_sample_rows, setup.local_batch_size)
            table = list(zip(setup.tokenizer.batch_decode(queries[:n_rows], skip_special_tokens=True),
                             setup.tokenizer.batch_decode(responses[:n_rows], skip_special_tokens=True),
                             scores[:n_rows].tolist()))
            writer.add_text("samples", markdown_table(table, ["prompt", "response", "score"]), step)
    if setup.dist.is_main and update % max(1, setup.num_updates // 10) == 0:
        from tqdm.auto import tqdm

        tqdm.write(f"update {update}/{setup.num_updates}: score {metrics['objective/scores']:+.3f} "
                   f"kl {metrics['objective/kl']:.2f} eos {metrics['val/num_eos_tokens'] / args.batch_size:.2f} "
                   f"{metrics['eps']:.1f} eps")


def rl_save_or_stop(step: int, stop: float, signals: dict, args, setup, models, progress, method: str) -> None:
    """After update `step`: a checkpoint every --checkpoint_every updates, at the end, and when a signal came;
    then, for a signal, exit."""
    due = (args.checkpoint_every and step % args.checkpoint_every == 0) or step == setup.num_updates
    if args.save and (due or stop):
        state = {"update": step, "args": args_json(args), "log_dir": setup.log_dir, "kl_coef": progress.kl_coef,
                 "history": progress.history, "timings": progress.timings, "sft_metrics": progress.sft_metrics,
                 "sft_golds": progress.sft_golds, "eval_metrics": progress.eval_metrics,
                 "eval_golds": progress.eval_golds}
        path = save_checkpoint(setup.checkpoint_dir, step, models.trainables, models.optimizer, state, method)
        if stop:
            exit_preempted(path, f"update {step}", signals["signal"])
    elif stop:  # --no_save: nothing to keep
        raise SystemExit(128 + (signals["signal"] or 15))


def rl_final_report(args, setup, models, progress, writer, start_time: float, method: str) -> dict:
    """The final evaluation (the last one, of the final policy, on the same prompts as the SFT one), the gold win
    rate, the saved policy (atomically, with eval_results.json) and the summary table."""
    device, sft_metrics, eval_metrics = setup.dist.device, progress.sft_metrics, progress.eval_metrics
    num_eval_prompts = int(all_reduce_sum(torch.tensor([len(setup.eval_ids)], device=device)).item())
    # the trained policy under "ppo", grpo.py's too
    final = {"sft": sft_metrics, "ppo": eval_metrics, "num_eval_prompts": num_eval_prompts}
    if setup.gold_fn is not None:
        wins = gold_wins(progress.eval_golds, progress.sft_golds)
        totals = all_reduce_sum(torch.tensor([wins, float(len(progress.sft_golds))], dtype=torch.float64,
                                             device=device)).tolist()
        final["gold_win_rate"] = totals[0] / totals[1]
    final["final_kl"] = eval_metrics["kl"]
    final["train_kl"] = progress.history[-1]["objective/kl"]
    final["episodes"] = setup.num_updates * args.batch_size
    final["wall_time_s"] = time.time() - start_time
    if args.save:
        policy, state_dict = models.policy, None
        if args.lora_r:  # a plain HF model: the adapter folded into the weights, W + alpha / r * B A
            policy, state_dict = merged_lora(models.policy, args, args.sft_model, setup.tokenizer)
        save_model(policy, setup.tokenizer, args.output_dir, method, results={**final, "args": asdict(args)},
                   state_dict=state_dict)
    if writer is not None:
        for k, v in final.items():
            if isinstance(v, float):
                writer.add_scalar(f"final/{k}", v, setup.num_updates * args.batch_size)
        writer.close()
    print0(f"\n{'held-out (' + str(final['num_eval_prompts']) + ' prompts)':<28}{'SFT':>10}{method.upper():>10}")
    for name in ["rm_score", "gold_score", "kl", "response_length", "eos_rate"]:
        if name in sft_metrics:
            print0(f"{name:<28}{sft_metrics[name]:>10.3f}{eval_metrics[name]:>10.3f}")
    win = (f"gold win rate of {method.upper()} vs SFT {final['gold_win_rate']:.3f} | "
           if "gold_win_rate" in final else "")
    print0(f"{win}final KL to reference {final['final_kl']:.3f} nats | {final['wall_time_s']:.0f} s"
           + (f" | saved {args.output_dir}" if args.save else ""))
    teardown_distributed()
    return {**final, "history": progress.history, "timings": progress.timings}


# ----------------------------------------------------------------------------------------------
# Checkpoints and resume. Model and optimiser state go through torch.distributed.checkpoint (DCP):
# under FSDP2 every rank writes its own shards, and a checkpoint loads back onto the same sharding.
# The rest (counters, RNG states, data position) is one small file per rank. Writes are atomic:
# step_N.tmp is renamed to step_N only once complete, and older checkpoints are deleted after that.
# ----------------------------------------------------------------------------------------------
def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def checkpoints(checkpoint_dir: str) -> list[str]:
    """Complete checkpoints in checkpoint_dir, oldest first (a step_N.tmp left by a crash is not one)."""
    found = [p for p in glob.glob(os.path.join(checkpoint_dir, "step_*")) if p.rsplit("_", 1)[1].isdigit()]
    return sorted(found, key=lambda p: int(p.rsplit("_", 1)[1]))


def latest_checkpoint(checkpoint_dir: str) -> str | None:
    kept = checkpoints(checkpoint_dir)
    return kept[-1] if kept else None


def check_resume(checkpoint_dir: str, args: dict, world_size: int) -> None:
    """--resume must continue the run that was checkpointed: same flags, same processes, all files there.
    Read from the checkpoint's small meta.json, before any tensor is loaded."""
    latest = latest_checkpoint(checkpoint_dir)
    if latest is None:
        raise SystemExit(f"--resume: no checkpoint in '{checkpoint_dir}'; run without --resume to start afresh")
    meta_path = os.path.join(latest, "meta.json")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise SystemExit(f"checkpoint '{latest}' is unreadable ({meta_path}: {first_line(e)}); delete '{latest}' to "
                         "resume from an earlier one, or start over with --overwrite") from None
    if meta["world_size"] != world_size:
        raise SystemExit(f"checkpoint '{latest}' was written by {meta['world_size']} processes, not {world_size}: "
                         "resume with the same --nproc_per_node")
    check_same_args(meta["args"], args)
    missing = [f"rank{r}.pt" for r in range(world_size) if not os.path.isfile(os.path.join(latest, f"rank{r}.pt"))]
    if missing or not os.path.isfile(os.path.join(latest, ".metadata")):
        raise SystemExit(f"checkpoint '{latest}' is incomplete (no {', '.join(missing) or '.metadata'}); delete it to "
                         "resume from an earlier one, or start over with --overwrite")


def save_checkpoint(checkpoint_dir: str, step: int, model: torch.nn.Module, optimizer, state: dict, stage: str) -> str:
    """Save model + optimiser (DCP) and this rank's `state` as checkpoint_dir/step_{step}. Collective.

    `state["args"]` also goes to meta.json, so that --resume compares the flags before loading a tensor.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    final, tmp = os.path.join(checkpoint_dir, f"step_{step}"), os.path.join(checkpoint_dir, f"step_{step}.tmp")
    intact = f"the previous checkpoint ({latest_checkpoint(checkpoint_dir) or 'none'}) is intact"
    if get_rank() == 0:
        with write_errors(tmp, intact):
            if not os.path.isdir(checkpoint_dir):
                os.makedirs(checkpoint_dir)
                owner = [output_dir for output_dir, c in RUNS.items() if c == checkpoint_dir]
                write_marker(checkpoint_dir, stage, "checkpoints", **({"output_dir": owner[0]} if owner else {}))
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
            world_size = dist.get_world_size() if dist.is_initialized() else 1
            write_json(os.path.join(tmp, "meta.json"), {"step": step, "world_size": world_size,
                                                        "args": state.get("args"), "id": uuid.uuid4().hex})
    if dist.is_initialized():
        dist.barrier()
    model_state, optim_state = get_state_dict(model, optimizer)
    with write_errors(tmp, intact), warnings.catch_warnings():  # one process: DCP warns that it is not distributed
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=tmp, no_dist=not dist.is_initialized())
        torch.save({**state, "rng": rng_state()}, os.path.join(tmp, f"rank{get_rank()}.pt"))
    if dist.is_initialized():
        dist.barrier()
    if get_rank() == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)  # the commit point: before it the previous checkpoint is the latest
        for old in checkpoints(checkpoint_dir) + glob.glob(os.path.join(checkpoint_dir, "step_*.tmp")):
            if old != final:  # older checkpoints, and what an interrupted save left
                shutil.rmtree(old)
    if dist.is_initialized():
        dist.barrier()
    return final


def load_checkpoint(path: str, model: torch.nn.Module, optimizer) -> dict:
    """Load model + optimiser in place from a save_checkpoint dir; return this rank's state (RNG restored).

    prepare_output's check_resume has compared the flags and the process count already.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    loaded = {"model": model_state, "optim": optim_state}
    rank_file = os.path.join(path, f"rank{get_rank()}.pt")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(loaded, checkpoint_id=path, no_dist=not dist.is_initialized())
        state = torch.load(rank_file, weights_only=False)  # our own file
    except (Exception, dcp.api.CheckpointException) as e:  # a truncated or edited file: many kinds of error
        where = short_file(path) or (rank_file if isinstance(e, (EOFError, RuntimeError)) else None) or path
        raise SystemExit(f"checkpoint '{path}' is corrupt: '{where}' cannot be read ({first_line(e)[:160]}); delete "
                         f"'{path}' to resume from an earlier checkpoint, or start over with --overwrite") from None
    set_state_dict(model, optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"])
    set_rng_state(state.pop("rng"))
    return state


def short_file(path: str) -> str | None:
    """The shard file of a DCP checkpoint that is shorter than its metadata says (a truncated copy or write)."""
    import torch.distributed.checkpoint as dcp

    try:
        needed: dict[str, int] = {}
        for info in dcp.FileSystemReader(path).read_metadata().storage_data.values():
            needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
        return next((os.path.join(path, f) for f, n in needed.items()
                     if os.path.getsize(os.path.join(path, f)) < n), None)
    except Exception:  # no readable metadata: the caller names the dir
        return None


def check_same_args(saved: dict, args: dict,
                    ignore: tuple[str, ...] = ("resume", "overwrite", "checkpoint_every")) -> None:
    """A resumed run must be the run that was checkpointed: same flags, or the numbers silently change
    (how often checkpoints are written changes none)."""
    for key in sorted(set(args) | set(saved)):
        if key not in ignore and saved.get(key) != args.get(key):
            raise SystemExit(f"--resume: the checkpoint was made with --{key} {saved.get(key)!r}, "
                             f"not {args.get(key)!r}; "
                             "pass the same flags, or start a new run")


def catch_signals() -> dict:
    """SIGTERM (preemption) and Ctrl-C (SIGINT) set a flag instead of killing: the loop checkpoints at the end
    of the step and exits. A second Ctrl-C stops at once (KeyboardInterrupt, which `run` turns into one line)."""
    flag = {"stop": False, "signal": None}

    def handler(signum, frame):
        if signum == signal.SIGINT and flag["stop"]:
            raise KeyboardInterrupt
        flag["stop"], flag["signal"] = True, signum
        if signum == signal.SIGINT:
            print0("\nCtrl-C: stopping after this step with a checkpoint (press it again to stop at once)",
                   file=sys.stderr)

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return flag


def exit_preempted(path: str, where: str, signum: int | None = None) -> NoReturn:
    """After the signal's checkpoint: leave cleanly, with a non-zero status (128 + the signal: 143 for SIGTERM,
    130 for Ctrl-C), so that a pipeline does not take the stage as done."""
    signum = signum or signal.SIGTERM  # a rank that only learnt of the stop from the all-reduce: the scheduler's
    print0(f"{signal.Signals(signum).name}: checkpoint {path} written at {where}; continue with --resume")
    teardown_distributed()
    raise SystemExit(128 + signum)


def flags_given(argv: list[str]) -> set[str]:
    """The flags written on a command line (--name or --name=value), whatever their values."""
    return {arg.split("=", 1)[0] for arg in argv if arg.startswith("--")}


def parse_args_with_presets(Args, presets: dict, argv=None, moved_flags: dict | None = None):
    """A stage's command line: an optional preset name first (presets.py; none: the toy task, the stage's defaults),
    then flags over it. A flag in moved_flags gets one line naming the script it moved to, not tyro's usage box."""
    import tyro

    argv = sys.argv[1:] if argv is None else list(argv)
    for arg in argv:
        flag = arg.split("=", 1)[0]
        if flag in (moved_flags or {}):
            raise SystemExit(f"{flag}: {moved_flags[flag]}")
    configs = {"toy": ("offline toy task (default)", Args()),
               **{name: (about, Args(**flags)) for name, (about, flags) in presets.items()}}
    if argv and not argv[0].startswith("-") and argv[0] not in configs:
        raise SystemExit(f"unknown preset '{argv[0]}'; the presets are {', '.join(configs)} (flags start with --)")
    if not argv or argv[0] not in (*configs, "-h", "--help"):
        argv = ["toy", *argv]  # no preset named: the toy default
    return tyro.extras.overridable_config_cli(configs, args=argv, use_underscores=True)


def run(main, parse_args) -> None:
    """A stage's entry point: main(parse_args()), with the faults no check can foresee turned into one line each.
    Bad input is caught earlier, by the checks before the first step, each with its own message."""
    try:
        try:
            args = parse_args()
            if getattr(args, "plan_memory", False):  # the planned GPU memory of these flags, instead of the run
                return plan_memory(main, args)
            main(args)
        except KeyboardInterrupt:  # Ctrl-C before the training loop, or a second one inside it
            print("interrupted: stopped at once; the last checkpoint (if any) is intact", file=sys.stderr)
            raise SystemExit(130) from None
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            raise SystemExit(f"cannot write '{e.filename}': the disk is full; free space and run again") from None
        except RuntimeError as e:  # a collective failed: another process of this run died (gloo, nccl)
            lost = isinstance(e, dist.DistError) or any(s in str(e) for s in ("gloo", "Connection", "NCCL"))
            if not (lost and dist.is_initialized() and dist.get_world_size() > 1):
                raise
            others = [r for r in range(dist.get_world_size()) if r != dist.get_rank()]
            raise SystemExit(f"rank {dist.get_rank()}: lost contact with rank{'s' if len(others) > 1 else ''} "
                             f"{', '.join(map(str, others))} of this run ({first_line(e)[:160]}); the process that "
                             "stopped first printed why above") from None
    except SystemExit as e:  # the one-line message goes on a line of its own, not after an open progress bar
        from tqdm import tqdm

        for bar in list(tqdm._instances):
            bar.close()
        if isinstance(e.code, str):
            tell_torchrun(e.code)
        raise


def tell_torchrun(message: str) -> None:
    """Under torchrun, hand our one line to its failure report, which then shows it as this rank's `traceback`
    instead of a link to its docs. The channel is torch.distributed.elastic's error file (TORCHELASTIC_ERROR_FILE, in
    the format of its ErrorHandler, without a call stack), written once: the first line, with its time, stays.
    torchrun's own traceback still prints, below our line."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path or os.path.exists(path):
        return
    try:
        write_json(path, {"message": {"message": message, "extraInfo": {"timestamp": str(int(time.time()))}}})
    except OSError:
        pass  # the report then shows its link instead: nothing is lost


def plan_memory(main, args) -> None:
    """--plan_memory: results/memory_plan.py plans these flags on --plan_gpus GPUs of --gpu_gb, without weights or a
    GPU, and prints each phase's peak, the memory options that fit, and last `planned peak: X.X GB per GPU`."""
    sys.path.insert(0, os.path.join(PROJECT_ROOT, "results"))
    import memory_plan

    script = os.path.splitext(os.path.basename(sys.modules[main.__module__].__file__))[0]  # ppo, grpo
    memory_plan.plan_command(importlib.import_module(script), args)


def args_json(args) -> dict:
    """The args as JSON-safe values, for the comparison on --resume."""
    from dataclasses import asdict

    return json.loads(json.dumps(asdict(args), default=str))


# ----------------------------------------------------------------------------------------------
# Data formats: every dataset becomes texts, then token ids. SFT data (sft.py): (prompt, completion) rows.
# Preference data (train_rm.py; dpo.py reads the same): (prompt, chosen, rejected) rows. Each loader reads the
# flags it needs from `args`, the stage's Args (a DPO script's Args holds the same data flags, by the same names).
# ----------------------------------------------------------------------------------------------
def render_conversation(tokenizer, prompt_messages: list[dict], completion_messages: list[dict]) -> tuple[str, str]:
    """(prompt text ending in the generation prompt, completion text) from the chat template.

    prompt = the chat template applied to prompt_messages, ending with the assistant marker
    (add_generation_prompt=True); completion = the rest of the rendered conversation: the completion turns, with
    the template's end-of-turn token, if it has one (<|im_end|>, <|eot_id|>), so that SFT teaches the model to end
    its turn the way the template does, and the RM reads its reward there; ppo.py stops at that token.
    Raises ValueError; the caller names the row.
    """
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


def split_implicit_prompt_pair(chosen: str, rejected: str, marker: str = "\n\nAssistant:") -> tuple[str, str, str]:
    """prompt = the longest common prefix of chosen and rejected, cut just after its last `marker`.

    Anthropic HH stores whole dialogues: "\\n\\nHuman: ... \\n\\nAssistant: ...". Returns
    (prompt, chosen_completion, rejected_completion) with prompt + completion == the original text.
    Raises ValueError when the shared prefix holds no marker.
    """
    shared = os.path.commonprefix([chosen, rejected])
    cut = shared.rfind(marker)
    if cut < 0:
        raise ValueError(f"chosen and rejected share no {marker!r}: cannot tell where the prompt ends")
    end = cut + len(marker)
    return chosen[:end], chosen[end:], rejected[end:]


# SFT data: (prompt, completion) text -> token ids
def load_sft_pairs(args, tokenizer) -> tuple[dict, bool]:
    """{split: (prompt texts, [(prompt_ids, completion_ids), ...])} for the train and eval splits, the unusable
    rows dropped; and whether the (last read) split is conversational. `args`: sft.Args."""
    data = {}
    for split, ds in load_sft_splits(args).items():
        where = f"dataset '{args.dataset}' split '{split}'"
        prompts, completions, conversational = prompts_and_completions(ds, args, tokenizer, where)
        keep = usable_rows(prompts, completions, args, where)
        prompts, completions = [prompts[i] for i in keep], [completions[i] for i in keep]
        data[split] = (prompts, tokenize_pairs(prompts, completions, tokenizer, args, conversational, where))
    return data, conversational


def load_sft_splits(args) -> dict:
    """The train and eval splits of a hub dataset or a local directory, or a one-line error."""
    splits = load_dataset(args.dataset)
    for split in (args.train_split, args.eval_split):
        if split not in splits:
            raise SystemExit(f"dataset '{args.dataset}' has no split '{split}' (it has: {', '.join(splits)}); "
                             "set --train_split / --eval_split")
    return {split: splits[split] for split in (args.train_split, args.eval_split)}


def render_sft_row(tokenizer, prompt_messages: list[dict], completion_messages: list[dict], where: str):
    """render_conversation for a row of SFT data, whose last message must be the assistant's: the turn the model
    learns. A problem stops the run, naming the row (`where`)."""
    try:
        if not completion_messages or completion_messages[-1].get("role") != "assistant":
            raise ValueError("the last message must have role 'assistant'")
        return render_conversation(tokenizer, prompt_messages, completion_messages)
    except ValueError as e:
        raise SystemExit(f"{where}: {e}") from None


def prompts_and_completions(ds, args, tokenizer, where: str) -> tuple[list[str], list[str], bool]:
    """Read the standard (prompt/completion columns), conversational (messages) or implicit_prompt (whole
    dialogues) format.

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
        for text in texts:
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
            # the last turn is the completion, the turns before it the prompt
            prompt, completion = render_sft_row(tokenizer, messages[:-1], messages[-1:], f"{where}: row {i}")
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
            rendered.append(render_sft_row(tokenizer, list(prompt), list(completion), f"{where}: row {i}"))
        return [p for p, _ in rendered], [c for _, c in rendered], True
    check_texts(prompts, args.prompt_column, where)
    check_texts(completions, args.completion_column, where)
    return prompts, completions, False


def usable_rows(prompts: list[str | None], completions: list[str], args, where: str) -> list[int]:
    """The rows to train on: one without a prompt (no --implicit_prompt_marker in it), with an empty prompt or
    with an empty completion is dropped and counted (drop_unusable, the same policy in every stage)."""
    reasons = ["without the prompt marker" if p is None else "with an empty prompt" if not p.strip() else
               "with an empty completion" if not c.strip() else None for p, c in zip(prompts, completions)]
    return drop_unusable(reasons, where, args.max_dropped_fraction)


def tokenize_pairs(prompts, completions, tokenizer, args, conversational: bool, where: str):
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


# Preference data: (prompt, chosen, rejected) text -> token ids
def load_preference_split(args, dataset, split: str, tokenizer, max_pairs: int | None, bootstrap: bool = False) -> dict:
    """Check the columns, convert to prompt/completion texts, tokenize; `bootstrap`: resample the rows with
    replacement (bagging, Breiman 1996), the same draw on every rank. Returns a dict of lists:
    chosen_ids / rejected_ids (prompt + completion + EOS, token ids), prompt (texts), margin (floats or None).

    `dataset`: load_dataset(args.dataset). `args`: train_rm.Args, or any Args with its data flags (dataset,
    dataset_format, train_split, prompt_column, chosen_column, rejected_column, margin_column, separator,
    implicit_prompt_marker, max_length, max_dropped_fraction), seed and model_name_or_path.
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
    if bootstrap:  # n rows drawn with replacement from the n rows
        draw = torch.randint(len(data), (len(data),), generator=torch.Generator().manual_seed(args.seed))
        data = data.select(draw.tolist())

    # list(): indexing a datasets Column one row at a time costs ~30 us a row (25 s for 90k pairs)
    chosen_raw, rejected_raw = list(data[args.chosen_column]), list(data[args.rejected_column])
    where = f"dataset '{args.dataset}' split '{split}'"
    margins = None
    if args.margin_column is not None:
        margins = list(data[args.margin_column])
        bad = [i for i, m in enumerate(margins)
               if isinstance(m, bool) or not isinstance(m, (int, float)) or not math.isfinite(m)]
        if bad:
            raise SystemExit(f"{where}: row {bad[0]}: column '{args.margin_column}' is {margins[bad[0]]!r}, not a "
                             f"finite number ({len(bad)} rows); fix or remove them")
        margins = [float(m) for m in margins]
    if args.dataset_format == "standard":
        if isinstance(chosen_raw[0], list):
            raise SystemExit(f"column '{args.chosen_column}' holds lists of messages, not text; "
                             "they need --dataset_format conversational")
        prompts = list(data[args.prompt_column])
        for column, texts in ((args.prompt_column, prompts), (args.chosen_column, chosen_raw),
                              (args.rejected_column, rejected_raw)):
            check_texts(texts, column, where)
        chosen = [args.separator + c for c in chosen_raw]
        rejected = [args.separator + r for r in rejected_raw]
    elif args.dataset_format == "implicit_prompt":
        check_texts(chosen_raw, args.chosen_column, where)
        check_texts(rejected_raw, args.rejected_column, where)
        prompts, chosen, rejected = [], [], []
        for c, r in zip(chosen_raw, rejected_raw):
            try:
                p, c, r = split_implicit_prompt_pair(c, r, args.implicit_prompt_marker)
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
            try:
                p, c_text = render_conversation(tokenizer, prompt_messages, c)
                _, r_text = render_conversation(tokenizer, prompt_messages, r)
            except ValueError as e:
                raise SystemExit(f"{where}: row {i}: {e}; use --dataset_format standard with pre-rendered "
                                 "texts") from None
            prompts.append(p), chosen.append(c_text), rejected.append(r_text)

    # Drop the pairs that cannot be used or carry no preference (drop_unusable: the same policy in
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


def load_normalisation_prompts(args, pref_prompts: list[str]) -> list[str]:
    """The prompts train_rm.py normalises its reward on: the prompt dataset if given, else the preference train
    prompts; deduplicated, shuffled with the seed, the first num_normalisation_prompts. `args`: train_rm.Args."""
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


def load_bayes_ceiling(ceiling_file: str | None, dataset: str) -> float | None:
    """The best accuracy any RM can reach on the data (the toy task writes it), to compare with: from
    --bayes_ceiling_file, else {dataset}/bayes_ceiling.json if it exists, else None."""
    if ceiling_file is None and os.path.isfile(os.path.join(dataset, "bayes_ceiling.json")):
        ceiling_file = os.path.join(dataset, "bayes_ceiling.json")
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
    return bayes_ceiling


def check_same_tokenizer(policy_tokenizer, rm_tokenizer, policy_path: str, rm_path: str) -> None:
    """The policy's token ids go straight into the RM (train_rm.py's normalisation, ppo.py): same vocabulary, same
    pad/EOS ids.

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


# ----------------------------------------------------------------------------------------------
# Batches of similar length (sft.py, train_rm.py --group_by_length)
# ----------------------------------------------------------------------------------------------
def group_by_length(order: list[int], lengths: list[int], batch_size: int, generator: torch.Generator,
                    batches_per_group: int = 50) -> list[int]:
    """Reorder a shuffled index list so that each batch holds sequences (or pairs) of similar length.

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


# ----------------------------------------------------------------------------------------------
# Logging and evaluation: the TensorBoard writer, and an evaluation function named on the command line
# ----------------------------------------------------------------------------------------------
def tensorboard_writer(is_main: bool, run_name: str, hyperparameters: dict, resumed_step: int | None = None):
    """Rank 0's TensorBoard writer for runs/{run_name}, the hyperparameters first, as a markdown table (as
    CleanRL); None on the other ranks. On resume, the events a killed run logged after its last checkpoint (at
    `resumed_step`) are dropped."""
    if not is_main:
        return None
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(f"runs/{run_name}", purge_step=resumed_step + 1 if resumed_step is not None else None)
    table = "\n".join(f"|{key}|{value}|" for key, value in hyperparameters.items())
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + table)
    return writer


def write_scalars(writer, metrics: dict, step: int) -> None:
    """Scalars to TensorBoard; only rank 0 has a writer."""
    if writer is not None:
        for key, value in metrics.items():
            writer.add_scalar(key, value, step)


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
