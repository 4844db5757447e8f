"""Model loading and FSDP2 setup shared by sft.py, train_rm.py and ppo.py. Nothing else lives here."""

from __future__ import annotations

import os
import random
import shutil
from dataclasses import dataclass

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
    hub_id = name_or_path.count("/") == 1 and not name_or_path.startswith((".", "/", "~"))
    if not hub_id or os.path.isdir(name_or_path.split("/")[0]):
        hint = " (build the toy task first: python toy_task.py)" if "toy_data" in name_or_path else ""
        raise SystemExit(f"{what} path '{name_or_path}' does not exist{hint}")


def load_tokenizer(name_or_path: str, padding_side: str = "right"):
    """AutoTokenizer with a pad token that is *not* EOS.

    Padding with EOS would make every pad position look like a real end of text, so loss masks built
    from `input_ids != pad_token_id` would drop the real EOS too. Pythia ships without a pad token.
    """
    check_path(name_or_path, "tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, padding_side=padding_side)
    if tokenizer.eos_token is None:
        raise SystemExit(f"tokenizer of '{name_or_path}' has no EOS token: set tokenizer.eos_token and save it")
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        tokenizer.add_special_tokens({"pad_token": "[PAD]"})
        print0(f"tokenizer of '{name_or_path}' had no distinct pad token; added '[PAD]' (id {tokenizer.pad_token_id})")
    return tokenizer


def disable_dropout(model: torch.nn.Module) -> None:
    """No dropout anywhere: PPO's ratio and the KL must compare deterministic forwards (Huang et al. 2024)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    for key in ("attention_dropout", "hidden_dropout", "classifier_dropout", "dropout", "attn_pdrop",
                "resid_pdrop", "embd_pdrop", "summary_first_dropout"):
        if hasattr(model.config, key) and isinstance(getattr(model.config, key), float):
            setattr(model.config, key, 0.0)


def _prepare(model, tokenizer):
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
    model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=DTYPES[dtype])
    return _prepare(model, tokenizer)


def load_reward_model(name_or_path: str, tokenizer, dtype: str = "float32"):
    """A sequence classifier with one output: the scalar reward (or value) head.

    `pad_token_id` must be in its config: the head reads the last non-pad token, and without it the
    reward is read at the wrong position (TRL's "RM stuck near 60%" bug).
    """
    check_path(name_or_path, "model")
    model = AutoModelForSequenceClassification.from_pretrained(name_or_path, num_labels=1, dtype=DTYPES[dtype])
    return _prepare(model, tokenizer)


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
