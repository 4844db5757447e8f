"""Model, tokenizer and dataset loading, FSDP2 setup and FSDP2-aware checkpoints, shared by sft.py,
train_rm.py and ppo.py.

Nothing else lives here: each stage's algorithm is written out in its own script.
"""

from __future__ import annotations

import glob
import json
import os
import random
import shutil
import signal
import warnings
from dataclasses import dataclass
from typing import NoReturn

import numpy as np
import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
    """`datasets.load_dataset` on a hub name or a local dir (the same code path), or a one-line error."""
    import datasets

    check_path(name_or_path, what)
    try:
        return datasets.load_dataset(name_or_path)
    except Exception as e:  # offline, unknown hub name, unreadable files
        raise SystemExit(f"cannot load {what} '{name_or_path}': {first_line(e)}") from None


def from_pretrained(auto_class, name_or_path: str, what: str, **kwargs):
    """`auto_class.from_pretrained`, with the library's long offline / unknown-name error cut to one line."""
    try:
        return auto_class.from_pretrained(name_or_path, **kwargs)
    except OSError as e:
        raise SystemExit(f"cannot load {what} '{name_or_path}': {first_line(e)}") from None


def load_tokenizer(name_or_path: str, padding_side: str = "right", add_pad_token: bool = False):
    """AutoTokenizer with a pad token that is *not* EOS.

    Padding with EOS would make every pad position look like a real end of text, so loss masks built
    from `input_ids != pad_token_id` would drop the real EOS too. Pythia ships without a pad token and
    Qwen2 pads with its EOS: `add_pad_token` adds a distinct '[PAD]' (the model's embeddings grow by one
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
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": sentinel}],
                                         tokenize=False)
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
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:  # a pad token was added
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id
    disable_dropout(model)
    return model


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
    model = from_pretrained(AutoModelForSequenceClassification, name_or_path, "model", num_labels=1, dtype=DTYPES[dtype])
    return _prepare(model, tokenizer, name_or_path)


def save_model(model, tokenizer, output_dir: str, extra_config: dict | None = None) -> None:
    """save_pretrained on rank 0, gathering FSDP2 shards first; atomic, so a crash leaves no half dir.

    Every rank must call this (the gather is collective).
    """
    state_dict = None
    if dist.is_initialized():
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state_dict = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if get_rank() == 0:
        tmp = output_dir.rstrip("/") + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        for key, value in (extra_config or {}).items():
            setattr(model.config, key, value)
        model.save_pretrained(tmp, state_dict=state_dict)
        tokenizer.save_pretrained(tmp)
        if os.path.exists(output_dir):
            shutil.rmtree(output_dir)
        os.replace(tmp, output_dir)
    if dist.is_initialized():
        dist.barrier()


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


def setup_distributed() -> Dist:
    """Read torchrun's environment. A plain `python script.py` (no WORLD_SIZE) touches no distributed code."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
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


def fsdp_wrap(model, device: torch.device):
    """FSDP2: `fully_shard` each transformer block, then the root. bf16 compute on GPU, fp32 reduce.

    A no-op on a single process.
    """
    if not dist.is_initialized():
        return model.to(device)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    model.to(device)
    mp = None
    if device.type == "cuda":
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    kwargs = {"mp_policy": mp} if mp is not None else {}
    for block in transformer_blocks(model):
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model


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


def check_output_dirs(output_dir: str, checkpoint_dir: str, resume: bool, overwrite: bool) -> None:
    """Refuse to clobber a finished run or another run's checkpoints, before any work is done."""
    if resume:
        if not checkpoints(checkpoint_dir):
            raise SystemExit(f"--resume: no checkpoint in '{checkpoint_dir}'; run without --resume to start afresh")
        return
    if overwrite:
        return
    if os.path.isfile(os.path.join(output_dir, "eval_results.json")):
        raise SystemExit(f"'{output_dir}' holds a finished run; pass --overwrite to replace it, or pick another --output_dir")
    if checkpoints(checkpoint_dir):
        raise SystemExit(f"'{checkpoint_dir}' holds checkpoints of an unfinished run; pass --resume to continue it, "
                         "or --overwrite to start over")


def save_checkpoint(checkpoint_dir: str, step: int, model: torch.nn.Module, optimizer, state: dict) -> str:
    """Save model + optimiser (DCP) and this rank's `state` as checkpoint_dir/step_{step}. Collective."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    final, tmp = os.path.join(checkpoint_dir, f"step_{step}"), os.path.join(checkpoint_dir, f"step_{step}.tmp")
    if get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    if dist.is_initialized():
        dist.barrier()
    model_state, optim_state = get_state_dict(model, optimizer)
    with warnings.catch_warnings():  # one process: DCP warns that it is not distributed, which is the point
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=tmp, no_dist=not dist.is_initialized())
    torch.save({**state, "rng": rng_state()}, os.path.join(tmp, f"rank{get_rank()}.pt"))
    if dist.is_initialized():
        dist.barrier()
    if get_rank() == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)  # the commit point: before it the previous checkpoint is the latest
        for old in checkpoints(checkpoint_dir):
            if old != final:
                shutil.rmtree(old)
    if dist.is_initialized():
        dist.barrier()
    return final


def load_checkpoint(path: str, model: torch.nn.Module, optimizer, world_size: int) -> dict:
    """Load model + optimiser in place from a save_checkpoint dir; return this rank's state (RNG restored)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    saved_ranks = len(glob.glob(os.path.join(path, "rank*.pt")))
    if saved_ranks != world_size:
        raise SystemExit(f"checkpoint '{path}' was written by {saved_ranks} processes, not {world_size}: "
                         "resume with the same --nproc_per_node")
    model_state, optim_state = get_state_dict(model, optimizer)
    loaded = {"model": model_state, "optim": optim_state}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(loaded, checkpoint_id=path, no_dist=not dist.is_initialized())
    set_state_dict(model, optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"])
    state = torch.load(os.path.join(path, f"rank{get_rank()}.pt"), weights_only=False)  # our own file
    set_rng_state(state.pop("rng"))
    return state


def check_same_args(saved: dict, args: dict, ignore: tuple[str, ...] = ("resume", "overwrite", "checkpoint_every")) -> None:
    """A resumed run must be the run that was checkpointed: same flags, or the numbers silently change
    (how often checkpoints are written changes none)."""
    for key, value in args.items():
        if key not in ignore and saved.get(key) != value:
            raise SystemExit(f"--resume: the checkpoint was made with --{key} {saved.get(key)!r}, not {value!r}; "
                             "pass the same flags, or start a new run")


def catch_sigterm() -> dict:
    """SIGTERM (preemption) sets a flag instead of killing: the loop checkpoints at the end of the step and exits."""
    flag = {"stop": False}

    def handler(signum, frame):
        flag["stop"] = True

    signal.signal(signal.SIGTERM, handler)
    return flag


def exit_preempted(path: str, where: str) -> NoReturn:
    """After the SIGTERM checkpoint: leave cleanly, with a non-zero status so a pipeline does not take the stage as done."""
    print0(f"SIGTERM: checkpoint {path} written at {where}; continue with --resume")
    teardown_distributed()
    raise SystemExit(143)  # 128 + SIGTERM


def args_json(args) -> dict:
    """The args as JSON-safe values, for the comparison on --resume."""
    from dataclasses import asdict

    return json.loads(json.dumps(asdict(args), default=str))
