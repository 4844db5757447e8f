"""Per-GPU peak memory of ppo.py's and grpo.py's updates on GPUs, planned on a CPU: the scripts' own rollout,
forwards, losses and AdamW step run on fake tensors (shapes and dtypes, no storage, no arithmetic), and PyTorch's
memory trackers (FSDP2's, or without FSDP2 the plain one) add up the bytes every tensor would hold, phase by phase.

    python ppo.py pythia-tldr --sft_model EleutherAI/pythia-1b-deduped --reward_model EleutherAI/pythia-1b-deduped \\
        --plan_memory --plan_gpus 1 --gpu_gb 24   # one run's flags: each phase's peak, the options that fit 24 GB
    python results/memory_plan.py              # the presets' plans -> results/memory_plan.json + results/README.md
    python results/memory_plan.py --validate   # small models run for real on the CPU, checked against their plans

What runs. The models are built as the script's build_models builds them, from configs instead of checkpoints: a
local model dir's config.json, or a published model's config written out in MODELS (nothing is downloaded). The
policy and critic hold --dtype weights (fp32 by default), the reference and the RM --frozen_dtype. On GPUs
--mixed_precision auto means bf16: every model is sharded by FSDP2 as common.fsdp_wrap shards it (every block, then
the root; bf16 all-gathers and compute, fp32 reduce-scatters), over N simulated ranks, and on one GPU over a process
group of one (common.setup_distributed(group_of_one=True)). --mixed_precision none on one GPU: no FSDP2, every
model whole in its own dtype. An int8 model is sharded too (FSDP2 gathers its int8 rows), except on one GPU, where
it stays whole (common.shard_frozen). Then three phases of one update, each on one rank's share, each calling the
script's own functions:

- generate: script.generate over the rank's whole batch (batch_size // N sequences) in chunks of
  --generation_batch_size, the policy gathered whole (common.unsharded). Fake tensors cannot sample, so the model's
  own `generate` is played by its two largest steps (StandInGenerate): the prefill, which fills the KV cache, and
  the last token's step, with the cache grown to prompt + response. Every chunk has the same shapes, so the first
  chunk plays them and the others return their token ids at once;
- score: script.reference_logprobs, script.reward_scores and script.old_logprobs_and_values (grpo.py:
  old_logprobs), the no-grad forwards of the reference, the RM, the policy and the critic, on one chunk of
  local_rollout_forward_batch_size sequences of max_prompt_length + response_length tokens (their outputs, a few
  floats per token, are what the other chunks add). With one micro-batch per update, the scripts' reuse of the first
  training forward (with gradients, over the whole local batch) is planned as they run it;
- train: the last micro-batch of a minibatch: script.micro_batch_backward itself (the training forward, the loss,
  the backward into the gradients the earlier micro-batches left, the logged statistics), the grad-norm clip and
  the AdamW step.
AdamW's moments exist from the first update on, so every phase is planned in that steady state.

Layers. A transformer's bytes grow linearly with its number of layers: each block adds the same weights,
gradients, optimizer state, activations and KV cache, and the peak falls at the same step. So a model of L > 3
layers is planned with 3 and with 4 layers, and the peak of each segment of a phase (between the starts and ends
of the models' forwards, the backward's start and the optimizer step: as many at any depth) is extrapolated linearly
to L (models of different depths: one plan more per depth); tests/test_memory.py checks the extrapolation against a
whole plan.

Each phase's peak is split into parameters (this rank's resident weights: shards, or whole models), the bf16 copy
FSDP2 gathers of the model in use, gradients, optimizer state, activations (every temporary included) and KV
cache. The numbers are simulated: memory the CUDA caching allocator keeps cached or loses to fragmentation, the CUDA
context and NCCL's buffers are not counted. --validate checks the accounting on small models run for real, with
the models' real generate (sampling) in place of the stand-in (`validate`).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import gc
import inspect
import json
import os
import re
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context

import torch
import torch.distributed as dist
import torch.nn as nn
import tyro
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.common_utils import get_untyped_storages
from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker, _FSDPRefType
from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType, _RefType
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.profiler import ProfilerActivity, profile, record_function
from torch.testing._internal.distributed.fake_pg import FakeStore  # importing it registers the "fake" backend
from transformers import (AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification,
                          DynamicCache, GenerationConfig, GPTNeoXConfig, LlamaConfig, Qwen2Config)

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import common  # noqa: E402
import grpo  # noqa: E402
import ppo  # noqa: E402

warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")  # peft asks transformers' deprecated name
warnings.filterwarnings("ignore", message=".*returned a view tensor.*")  # FSDP2: logits and values, used out of place

GB = 1e9  # the README's unit: 40 bytes per parameter x 7e9 = 280 GB


@dataclass
class Args:
    validate: bool = False
    """run small models for real on the CPU and check the plans against the bytes they really held (exit 1 beyond
    5%)"""
    workers: int = 1
    """processes planning in parallel (fake tensors use one core each)"""
    write: bool = True
    """write results/memory_plan.json and the block in results/README.md (--no_write: print only)"""


# ----------------------------------------------------------------------------------------------
# The models: published hyperparameters from each model's config.json on the Hugging Face hub (the Pythia
# sizes are also Biderman et al. 2023's table 1), written out so that nothing is downloaded. A model flag
# that names one of these hub ids, and is not a local dir, is planned from it.
# ----------------------------------------------------------------------------------------------
def pythia(hidden: int, layers: int, heads: int, vocab: int) -> GPTNeoXConfig:
    """GPT-NeoX as Pythia configures it: MLP 4x wide, rotary on a quarter of each head, parallel residual,
    separate input and output embeddings."""
    return GPTNeoXConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                         intermediate_size=4 * hidden, vocab_size=vocab, rotary_pct=0.25, max_position_embeddings=2048,
                         use_parallel_residual=True, tie_word_embeddings=False)


def qwen25(hidden: int, layers: int, heads: int, kv_heads: int, mlp: int, vocab: int, tied: bool) -> Qwen2Config:
    """Qwen2.5: grouped keys and values, SwiGLU MLP, RMSNorm."""
    return Qwen2Config(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                       num_key_value_heads=kv_heads, intermediate_size=mlp, vocab_size=vocab, tie_word_embeddings=tied)


def llama2_7b() -> LlamaConfig:
    """meta-llama/Llama-2-7b-hf (6.74B): 32 heads, no grouped keys and values, SwiGLU MLP 11008 wide."""
    return LlamaConfig(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                       intermediate_size=11008, vocab_size=32000, rms_norm_eps=1e-5, tie_word_embeddings=False)


MODELS = {  # hub id -> (short name, config), by parameter count; -deduped and plain Pythia share a config
    "Qwen/Qwen2.5-0.5B": ("Qwen2.5-0.5B", lambda: qwen25(896, 24, 14, 2, 4864, 151936, True)),  # 0.49B
    "Qwen/Qwen2.5-0.5B-Instruct": ("Qwen2.5-0.5B", lambda: qwen25(896, 24, 14, 2, 4864, 151936, True)),
    "EleutherAI/pythia-1b-deduped": ("Pythia-1B", lambda: pythia(2048, 16, 8, 50304)),  # 1.01B
    "EleutherAI/pythia-1b": ("Pythia-1B", lambda: pythia(2048, 16, 8, 50304)),
    "EleutherAI/pythia-2.8b-deduped": ("Pythia-2.8B", lambda: pythia(2560, 32, 32, 50304)),  # 2.78B
    "EleutherAI/pythia-2.8b": ("Pythia-2.8B", lambda: pythia(2560, 32, 32, 50304)),
    "meta-llama/Llama-2-7b-hf": ("Llama-2-7B", llama2_7b),  # 6.74B
    # 6.86B; its vocabulary padded to 50432
    "EleutherAI/pythia-6.9b-deduped": ("Pythia-6.9B", lambda: pythia(4096, 32, 32, 50432)),
    "EleutherAI/pythia-6.9b": ("Pythia-6.9B", lambda: pythia(4096, 32, 32, 50432)),
    # 7.62B: 28 query / 4 key-value heads, SwiGLU MLP 18944 wide, untied 152064-token embeddings
    "Qwen/Qwen2.5-7B": ("Qwen2.5-7B", lambda: qwen25(3584, 28, 28, 4, 18944, 152064, False)),
    "Qwen/Qwen2.5-7B-Instruct": ("Qwen2.5-7B", lambda: qwen25(3584, 28, 28, 4, 18944, 152064, False)),
}
PRESET_MODELS = {  # each preset's published base model (its SFT and RM are trained from it)
    "pythia-tldr": "EleutherAI/pythia-1b-deduped", "hh-rlhf": "EleutherAI/pythia-1b-deduped",
    "ultrafeedback": "Qwen/Qwen2.5-0.5B-Instruct", "pythia-tldr-6.9b": "EleutherAI/pythia-6.9b-deduped",
}
PRESETS = ("pythia-tldr", "hh-rlhf", "ultrafeedback")
SEVEN_B = "EleutherAI/pythia-6.9b-deduped"  # the 7B of the seed's estimate: Huang et al. 2024 ran it on TL;DR
REFERENCE_7B = {  # the seed's back-of-the-envelope estimate for a 7B PPO, GB
    "policy: weights + gradients + AdamW": "~42", "reference": "~14", "reward model": "~14",
    "critic: weights + gradients + AdamW": "~14", "gathered bf16 copy of the model in use": "",
    "activations + KV cache": "20-40", "total": "~100-120",
}
# the 7B on one GPU: a 7B policy against a 7B RM at pythia-tldr-6.9b's settings (README "the 7B on one GPU")
RECIPE_7B = {"frozen_dtype": "int8", "lora_r": 8, "gradient_checkpointing": True}  # both scripts
RECIPE_7B_PPO = {"value_head_on_policy": True}  # ppo.py's critic choice that fits (see recipe_7b)
COMPONENTS = ("parameters", "gathered", "gradients", "optimizer state", "activations", "KV cache")


@dataclass
class Configs:
    """The configs of a run's models: the SFT model's (policy, reference, and a critic started from it) and each
    reward model's (and a critic started from the first)."""
    sft: object
    rms: list

    def depths(self) -> set[int]:
        return {c.num_hidden_layers for c in (self.sft, *self.rms)}

    def with_depths(self, depth) -> Configs:
        """The same models with depth(L) layers instead of L."""
        return Configs(with_layers(self.sft, depth(self.sft.num_hidden_layers)),
                       [with_layers(c, depth(c.num_hidden_layers)) for c in self.rms])


def with_layers(config, layers: int):
    config = copy.deepcopy(config)
    config.num_hidden_layers = layers
    if getattr(config, "layer_types", None) is not None:  # Qwen2: one attention kind per layer
        config.layer_types = config.layer_types[:layers] + config.layer_types[-1:] * (layers - len(config.layer_types))
    return config


def config_of(name_or_path: str, flag: str):
    """A model flag's config: a local model dir's config.json (no weights read), or a published model's (MODELS);
    anything else is refused in one line."""
    if os.path.isfile(os.path.join(name_or_path, "config.json")):
        return AutoConfig.from_pretrained(name_or_path)
    if name_or_path in MODELS:
        return MODELS[name_or_path][1]()
    raise SystemExit(f"--plan_memory: {flag} '{name_or_path}' is neither a local model dir nor a published model the "
                     f"planner knows ({', '.join(MODELS)}; results/memory_plan.py MODELS)")


def configs_of(args) -> Configs:
    return Configs(config_of(args.sft_model, "--sft_model"),
                   [config_of(path, "--reward_model") for path in args.reward_model or []])


def name_of(name_or_path: str) -> str:
    return MODELS[name_or_path][0] if name_or_path in MODELS else name_or_path


# ----------------------------------------------------------------------------------------------
# Fake GPUs. On this CPU-only torch build, fake tensors can claim to be on "cuda" (torch.empty(device="cuda")
# works under FakeTensorMode), but little else does: `.to("cuda")` and `with torch.device("cuda")` raise "not
# linked with support for cuda devices", FSDP2 on a cuda mesh needs torch.cuda's streams, events and set_device,
# and scaled_dot_product_attention on fake cuda tensors falls back to its math kernel, which materialises the
# (B, heads, S, S) scores that a GPU's flash and memory-efficient kernels never allocate. So the fake tensors
# live on the CPU device, where SDPA takes the flash kernel for CPU (the GPU kernels' outputs: the attention
# output and an fp32 logsumexp), and FSDP2 gets the mixed-precision policy common.fsdp_wrap gives it on GPUs.
# The one CUDA detail lost is the allocator's rounding of blocks up to 512 bytes: under 0.1% of these totals.
# ----------------------------------------------------------------------------------------------
def start_fake_ranks(world_size: int, bf16: bool = False):
    """N simulated ranks in this one process: a fake process group (collectives return at once, each rank's shard
    has its real size) and a mesh over it. The mesh is built before any fake tensor: building it reads values.
    One rank: a group of one with --mixed_precision bf16, as common.setup_distributed(group_of_one=True) starts it;
    without, no process group and no mesh (None): fsdp_wrap and common.unsharded are then no-ops."""
    stop_fake_ranks()
    if world_size == 1 and not bf16:
        return None
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    return init_device_mesh("cpu", (world_size,))


def stop_fake_ranks() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def on_gpus(args) -> bool:
    """--mixed_precision on the planned GPUs (auto: bf16, as common.bf16_compute says on CUDA)."""
    return args.mixed_precision != "none"


# ----------------------------------------------------------------------------------------------
# The tracker: FSDP2's memory tracker over all the models, with the KV cache as a category of its own
# ----------------------------------------------------------------------------------------------
class KV(_RefType):
    """The tracker's category for the KV cache: torch's files it under activations."""
    CACHE = "KV Cache"


class PeakOnly:
    """What both trackers share: the overall peak, the KV cache category, the peak's components, and the peaks at
    the steps of a phase that extrapolate in the layers (`plan`). A phase is cut into segments where a model's
    forward starts or ends, where the backward starts and where the optimizer steps: as many at any depth. Within
    a segment the tracker keeps the peak before any block runs, and the peak while each block of each model runs
    (StepHooks): the blocks are alike, so the bytes at block j grow or shrink linearly in j, and a segment's peak is
    before the blocks, at the first two or at the last two of a model's blocks. Each of those steps holds the same
    tensors at any depth, so its bytes are linear in the layers."""

    def _update_peak_stats(self, peak_state) -> None:
        """The overall peak and the step's: the per-module peaks MemTracker also keeps (unused here) cost a quarter
        of the time."""
        for device, snapshot in self._curr_mem_snap.items():
            if snapshot["Total"] > self._peak_mem.get(device, 0):
                self._peak_mem[device], self._peak_mem_snap[device] = snapshot["Total"], dict(snapshot)
            key = (self.segment, self.block)
            if snapshot["Total"] > self.step_peaks.get(key, {"Total": -1})["Total"]:
                self.step_peaks[key] = dict(snapshot)

    step_peaks: dict  # (segment, block) -> the highest snapshot there
    segment = 0
    block: tuple | None = None  # (model, block index) of the block running; None before any in the segment
    in_backward = False

    def new_segment(self, *_) -> None:
        """A segment ends (a hook of forwards and of the optimizer step: it returns nothing)."""
        self.segment, self.block = self.segment + 1, None

    def enter_block(self, block: tuple) -> None:
        self.block = block

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.in_backward and self._mod_tracker.is_bw:  # the backward's first op
            self.in_backward = True
            self.new_segment()
        return super().__torch_dispatch__(func, types, args, kwargs)

    filing_kv_cache = False  # set while the cache stores keys and values: what is allocated then is KV cache

    def mark_kv_cache(self, tensor: torch.Tensor) -> None:
        self._update_and_maybe_create_winfos(tensor, KV.CACHE)

    def _track(self, reftype, t: torch.Tensor) -> None:
        super()._track(KV.CACHE if self.filing_kv_cache else reftype, t)

    def peak(self, depths: list[int]) -> dict:
        """The peak's bytes by component (one device: the stand-in GPU), and those of each step that extrapolates:
        {"segment/before blocks" or "segment/model/first|second|second last|last block": components}. `depths`:
        the number of blocks of each model."""
        (snapshot,) = self.get_tracker_snapshot("peak").values()
        steps = {}
        for (segment, block), step in self.step_peaks.items():
            if block is None:
                steps[f"{segment}/before blocks"] = components(step)
                continue
            model, j = block
            for role, at in (("first", 0), ("second", 1), ("second last", depths[model] - 2),
                             ("last", depths[model] - 1)):
                if j == at:
                    steps[f"{segment}/{model}/{role} block"] = components(step)
        return {**components(snapshot), "steps": steps}


def components(snapshot: dict) -> dict[str, int]:
    """A tracker snapshot's bytes by component, and its total ("peak")."""
    R, M = _FSDPRefType, _MemRefType
    groups = {"parameters": (R.SHARDED_PARAM, R.BUFFER, M.PARAM, M.BUFFER),
              "gathered": (R.UNSHARDED_PARAM, R.ALL_GATHER),
              "gradients": (R.SHARDED_GRAD, R.UNSHARDED_GRAD, R.REDUCE_SCATTER, M.GRAD),
              "optimizer state": (R.OPT, M.OPT),
              "activations": (R.ACT, R.TEMP, R.INP, M.ACT, M.TEMP), "KV cache": (KV.CACHE,)}
    out = {name: sum(snapshot.get(c, 0) for c in set(kinds)) for name, kinds in groups.items()}
    return {**out, "peak": snapshot["Total"]}


def all_models(models) -> list[nn.Module]:
    """Policy, reference, RM(s), critic and value head: those the script has."""
    return [m for m in (models.policy, models.ref_policy, *models.reward.models, getattr(models, "critic", None),
                        getattr(models, "value_head", None)) if m is not None]


def new_tracker(models):
    """FSDP2's tracker over sharded models; on one rank (no FSDP2) torch's plain one."""
    return PPOMemTracker(models) if fsdp_root(models.policy) is not None else WholeMemTracker(models)


class WholeMemTracker(PeakOnly, MemTracker):
    """torch's MemTracker for one process without FSDP2: the models' whole weights, their gradients, AdamW's
    state, activations (and temporaries of the backward), and the KV cache."""

    def __init__(self, models):
        super().__init__()
        self.step_peaks = {}
        self._ref_class = [*_MemRefType, KV.CACHE]
        self.track_external(*all_models(models), models.optimizer)

    def _pre_fw_hook(self, module, inputs) -> None:
        """A model's second forward in a phase starts its statistics afresh (see PPOMemTracker)."""
        name = self._mod_tracker.get_known_fqn(module)
        if (module in self.memory_tracking and not self._mod_tracker.is_bw
                and set(self._mod_tracker.parents) - {name} == {"Global"}):
            for m in module.modules():
                self.memory_tracking.pop(m, None)
        super()._pre_fw_hook(module, inputs)

    def _track_module_params_and_buffers(self, module, install_grad_hooks: bool = True) -> tuple[int, int]:
        """torch's, with its gradient hooks on the trained parameters only (a frozen one refuses hooks)."""
        out = super()._track_module_params_and_buffers(module, install_grad_hooks=False)
        for p in module.parameters():
            if install_grad_hooks and p.requires_grad and p not in self._param_to_grad_hook_handles:
                self._param_to_grad_hook_handles[p] = (
                    p.register_hook(self._file_gradient),
                    p.register_post_accumulate_grad_hook(lambda q: self._file_gradient(q.grad)))
        return out

    def _file_gradient(self, grad: torch.Tensor) -> None:  # a hook that returns nothing: the gradient unchanged
        self._update_and_maybe_create_winfos(grad, _MemRefType.GRAD)


class PPOMemTracker(PeakOnly, FSDPMemTracker):
    """torch's FSDPMemTracker, which files every tensor of an FSDP2 model and its optimizer under a category (shard,
    gathered weight, gradient, optimizer state, activation, ...) as it is made or freed, and keeps the snapshot of
    the peak. It takes one FSDP root; PPO has four models, so the root it walks becomes a list of them."""

    def __init__(self, models):
        models_ = all_models(models)
        self._fsdp_roots = [fsdp_root(m) for m in models_ if fsdp_root(m) is not None]
        super().__init__(self._fsdp_roots[0], models.optimizer)
        self.step_peaks = {}
        self._root_mod = nn.ModuleList(models_)
        self._ref_class = [*_FSDPRefType, KV.CACHE]

    def _instrument_fsdp_module(self) -> None:
        super()._instrument_fsdp_module()
        for model in self._root_mod:  # an unsharded model (int8 on one GPU): its whole weights are its own
            if not isinstance(model, FSDPModule):
                for p in model.parameters():
                    self._update_and_maybe_create_winfos(p, _FSDPRefType.SHARDED_PARAM)
        # torch's tracker files a block's gathered weights as such when the block's forward starts; common.unsharded
        # gathers every block before the forward, so they are filed as soon as each gather completes instead
        self._gathering_groups = [m._get_fsdp_state()._fsdp_param_group for m in self._root_mod.modules()
                                  if isinstance(m, FSDPModule) and m._get_fsdp_state()._fsdp_param_group]
        for group in self._gathering_groups:
            group.wait_for_unshard = self._filing_gathered(group, group.wait_for_unshard)

    def _filing_gathered(self, group, wait_for_unshard):
        def wait(*args, **kwargs):
            wait_for_unshard(*args, **kwargs)
            for fsdp_param in group.fsdp_params:
                self._update_and_maybe_create_winfos(fsdp_param.unsharded_param, _FSDPRefType.UNSHARDED_PARAM)

        return wait

    def _deregister_module_and_optimizer_hooks(self) -> None:
        super()._deregister_module_and_optimizer_hooks()
        for group in self._gathering_groups:
            del group.wait_for_unshard  # back to FSDPParamGroup's own method

    def _fsdp_state_pre_forward(self, fsdp_mod, orig_fsdp_state_pre_fw):
        """A model's second forward in a phase (LoRA's policy: once as the reference, its adapter off, once as
        itself) starts its modules' statistics afresh. torch's tracker refuses it, to keep per-module statistics of
        one iteration; this report uses only the overall peak."""
        pre_forward = super()._fsdp_state_pre_forward(fsdp_mod, orig_fsdp_state_pre_fw)

        def again(*args, **kwargs):
            is_root = any(fsdp_mod is r for r in self._fsdp_roots)
            if is_root and not self._mod_tracker.is_bw and fsdp_mod in self.memory_tracking:
                for m in fsdp_mod.modules():
                    self.memory_tracking.pop(m, None)
            return pre_forward(*args, **kwargs)

        return again


def fsdp_root(model) -> FSDPModule | None:
    """A model's outermost FSDP2 module (with LoRA: the HF model inside peft's wrapper), None for an unsharded one."""
    return next((m for m in model.modules() if isinstance(m, FSDPModule)), None)


class TrackedCache(DynamicCache):
    """A DynamicCache whose keys and values the tracker files as KV cache the moment they are stored (no tracker,
    in a real run: a plain DynamicCache)."""

    def __init__(self, tracker: PeakOnly | None, config):
        super().__init__(config=config)
        self.tracker = tracker

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if self.tracker is None:
            return super().update(key_states, value_states, layer_idx, *args, **kwargs)
        self.tracker.filing_kv_cache = True  # the grown cache (a concatenation) is KV cache from its allocation on
        try:
            keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        finally:
            self.tracker.filing_kv_cache = False
        self.tracker.mark_kv_cache(keys)  # the first update stores the new keys and values themselves
        self.tracker.mark_kv_cache(values)
        return keys, values


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind these tensors (a DTensor's local shard, an int8 tensor's parts), as
    the tracker counts them."""
    storages = {}
    for t in tensors:
        for s in get_untyped_storages(t):
            storages[s._cdata] = s.nbytes()  # one entry per storage, however many tensors view it
    return sum(storages.values())


# ----------------------------------------------------------------------------------------------
# The models, as the script's build_models builds them on GPUs, from configs instead of checkpoints
# ----------------------------------------------------------------------------------------------
def new_model(kind: str, config, dtype: str):
    """A model on the meta device (shapes only); `materialize` gives it storage, fake or real."""
    config = copy.deepcopy(config)
    with torch.device("meta"):
        if kind == "causal":
            model = AutoModelForCausalLM.from_config(config, dtype=common.DTYPES[dtype])
        else:  # a sequence classifier with one output: the RM, and the critic made from it
            config.num_labels = 1
            model = AutoModelForSequenceClassification.from_config(config, dtype=common.DTYPES[dtype])
    common.disable_dropout(model)
    return model


def materialize(model):
    """Empty CPU tensors for a meta model: fake ones under FakeTensorMode. Models are built on the meta device first
    because nn.Module.to refuses fake parameters (it must swap them, and the fake mode holds weak references to
    them), and peft moves its adapters with it."""
    return model.to_empty(device="cpu")


def frozen(model, args):
    """A frozen model in --frozen_dtype, as common.load_frozen makes it (its dtype chosen at new_model): int8
    weights with --frozen_dtype int8, by common.quantize_int8 (torchao's, which quantises fake tensors too)."""
    if args.frozen_dtype == "int8":
        model = common.quantize_int8(model)
    return model.eval().requires_grad_(False)


def frozen_dtype(args) -> str:
    return args.dtype if args.frozen_dtype in ("same", "int8") else args.frozen_dtype


def shard(model, mesh, bf16: bool):
    """common.fsdp_wrap as it runs on GPUs: each transformer block, then the root (a bare head: the root alone),
    with bf16 all-gathers and compute and fp32 reduce-scatters under --mixed_precision bf16. (fsdp_wrap takes its
    mesh from the process group; here the fake one's is given.) No mesh (one process without mixed precision): a
    no-op, the model whole in its own dtype."""
    if mesh is None:
        return model
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
    mp = mp or MixedPrecisionPolicy()  # none: compute in the weights' dtype
    for block in common.transformer_blocks(model) if hasattr(model, "_no_split_modules") else []:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


def shard_frozen(model, args, mesh, bf16: bool):
    """As common.shard_frozen: sharded, an int8 model too, except on one rank, where an int8 model stays whole."""
    if model is None or mesh is None or (args.frozen_dtype == "int8" and mesh.size() == 1):
        return model
    return shard(model, mesh, bf16)


def has_critic(script, args) -> bool:
    """ppo.py's separate critic (not with --value_head_on_policy); grpo.py has none."""
    return hasattr(args, "critic_init") and not args.value_head_on_policy


def build_models(script, configs: Configs, args, mesh, mode):
    """The script's models, as its build_models makes them: policy and reference from the SFT model, the RM(s),
    ppo.py's critic from the first RM (or the SFT model) or its value head on the policy; LoRA and gradient
    checkpointing as build_models applies them, every model sharded over `mesh` (None: none is), one fused AdamW
    over what trains. `mode`: the FakeTensorMode the tensors are made under (a null context for real ones)."""
    bf16 = on_gpus(args)
    critic_config = (configs.rms[0] if args.critic_init == "rm" else configs.sft) if has_critic(script, args) else None
    policy = new_model("causal", configs.sft, args.dtype)
    # with LoRA there is no reference: it is the policy with its adapter off
    ref_policy = None if args.lora_r else new_model("causal", configs.sft, frozen_dtype(args))
    rm_classifiers = [new_model("classifier", c, frozen_dtype(args)) for c in configs.rms]
    critic_classifier = new_model("classifier", critic_config, args.dtype) if critic_config is not None else None
    if args.lora_r:
        policy = common.with_lora(policy, args)
    if args.gradient_checkpointing:
        for m in (policy, critic_classifier):
            if m is not None:
                m.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    with mode:
        policy = materialize(policy)
        critic = script.ScalarModel(materialize(critic_classifier)) if critic_classifier is not None else None
        value_head = None
        if getattr(args, "value_head_on_policy", False):
            value_head = nn.Linear(configs.sft.hidden_size, 1)  # float32, as ppo.build_models makes it
        ref_policy = frozen(materialize(ref_policy), args) if ref_policy is not None else None
        reward_models = [script.ScalarModel(frozen(materialize(c), args)).eval().requires_grad_(False)
                         for c in rm_classifiers]
        shard(policy.get_base_model() if args.lora_r else policy, mesh, bf16)  # LoRA: FSDP2's root is the HF model
        critic = shard(critic, mesh, bf16) if critic is not None else None
        value_head = shard(value_head, mesh, bf16) if value_head is not None else None
        ref_policy = shard_frozen(ref_policy, args, mesh, bf16)
        reward_models = [shard_frozen(m, args, mesh, bf16) for m in reward_models]
        trainables = nn.ModuleDict({name: m for name, m in (("policy", policy), ("critic", critic),
                                                            ("value_head", value_head)) if m is not None})
        params = [p for p in trainables.parameters() if p.requires_grad]  # LoRA: the adapters only
        optimizer = torch.optim.AdamW(params, lr=args.learning_rate, eps=args.adam_eps, weight_decay=args.weight_decay,
                                      fused=True)
    reward = script.Reward(models=reward_models, fn=args.reward_fn, retokenize=None)
    built = {"policy": policy, "ref_policy": ref_policy, "reward": reward, "critic": critic, "value_head": value_head,
             "trainables": trainables, "optimizer": optimizer, "policy_train": policy, "critic_train": critic}
    return script.Models(**{f.name: built[f.name] for f in dataclasses.fields(script.Models)})


def model_bytes(models) -> dict[str, dict[str, int]]:
    """One rank's resident bytes of each model: its weights (shards, or a whole model), and for the trained ones
    the fp32 gradient shards (held from a minibatch's first backward to its optimizer step) and AdamW's state."""
    out = {}
    for name, model in (("policy", models.policy), ("reference", models.ref_policy),
                        *((f"reward model {i + 1}" if i else "reward model", m)
                          for i, m in enumerate(models.reward.models)),
                        ("critic", getattr(models, "critic", None)),
                        ("value head", getattr(models, "value_head", None))):
        if model is None:
            continue
        trained = [p for p in model.parameters() if p.requires_grad]
        state = [v for p in trained for v in models.optimizer.state.get(p, {}).values() if torch.is_tensor(v)]
        out[name] = {"parameters": storage_bytes([*model.parameters(), *model.buffers()]),
                     "gradients": storage_bytes(trained),  # same shards, same dtype
                     "optimizer state": storage_bytes(state)}
    return out


# ----------------------------------------------------------------------------------------------
# The phases of one update on one rank, each running the script's own functions as its main() does
# ----------------------------------------------------------------------------------------------
@dataclass
class Sizes:
    """One rank's batch shapes, derived from the flags as the script's set_up derives them."""
    prompt: int  # max_prompt_length: the longest prompt sets the padded width
    response: int  # response_length: a batch generates until its longest response ends
    local: int  # batch_size // N: the sequences a rank samples (grpo.py: k per prompt) per update
    generation: int  # sequences per generate call (--generation_batch_size; None: the local batch)
    rollout: int  # sequences scored per no-grad forward (local_rollout_forward_batch_size)
    micro: int  # sequences per training forward/backward
    accumulation: int  # micro-batches per optimizer step
    reuse: bool  # the rollout reuses the first training forward (one micro-batch per update)


def sizes_of(args, ranks: int) -> Sizes:
    """The sizes, refused in one line where the script's set_up would refuse them."""
    if args.batch_size % ranks:
        raise SystemExit(f"batch_size {args.batch_size} is not divisible by the {ranks} processes")
    local_batch = args.batch_size // ranks
    if local_batch % args.num_minibatches or local_batch % getattr(args, "samples_per_prompt", 1):
        raise SystemExit(f"the per-rank batch {local_batch} is not divisible by num_minibatches (or "
                         "samples_per_prompt)")
    minibatch = local_batch // args.num_minibatches
    micro = args.micro_batch_size or minibatch
    if minibatch % micro:
        raise SystemExit(f"the per-rank minibatch {minibatch} is not divisible by micro_batch_size {micro}")
    accumulation = minibatch // micro
    return Sizes(args.max_prompt_length, args.response_length, local_batch,
                 min(args.generation_batch_size or local_batch, local_batch),
                 min(args.local_rollout_forward_batch_size, local_batch), micro, accumulation,
                 args.reuse_first_forward and args.num_minibatches == 1 and accumulation == 1)


def sequences(batch: int, length: int, vocab: int):
    """(B, S) token ids and an attention mask: only their shapes matter."""
    return torch.randint(0, vocab, (batch, length)), torch.ones(batch, length, dtype=torch.long)


class StandInGenerate:
    """The policy's `generate` on fake tensors, which cannot sample, played by its two largest steps: the prefill
    (one forward over the prompts, filling the KV cache, the logits of the last position and the distribution the
    first token is drawn from), and the last token's step, with the cache grown to prompt + response (HF's
    DynamicCache grows by concatenation, one step at a time; here in one). script.generate calls it once per chunk;
    the chunks have the same shapes (the last one fewer), so the first plays the steps and the others return their
    token ids at once. --validate checks it against the real generate on real tensors."""

    def __init__(self, policy, tracker: PeakOnly | None, temperature: float):
        self.policy, self.tracker, self.temperature, self.played = policy, tracker, temperature, False

    def __call__(self, input_ids, attention_mask, generation_config):
        B, T = len(input_ids), generation_config.max_new_tokens
        if not self.played:
            self.play(input_ids, attention_mask, T)
            self.played = True
        return torch.cat([input_ids, input_ids.new_zeros(B, T)], 1)

    def play(self, ids, mask, T: int) -> None:
        policy, (B, P) = self.policy, ids.shape
        cache = TrackedCache(self.tracker, policy.config)
        out = policy(input_ids=ids, attention_mask=mask, position_ids=ppo.position_ids_from(mask),
                     past_key_values=cache, use_cache=True, logits_to_keep=1)  # the prefill
        torch.softmax(out.logits[:, -1].float() / self.temperature, -1)  # (B, V)
        del out
        for i, layer in enumerate(cache.layers):  # the cache after T - 1 more tokens
            grown = layer.keys.new_zeros(B, layer.keys.shape[1], T - 1, layer.keys.shape[3])
            cache.update(grown, grown, i)
            del grown
        out = policy(input_ids=ids[:, -1:], attention_mask=torch.ones(B, P + T, dtype=torch.long),
                     position_ids=torch.full((B, 1), P + T - 1), past_key_values=cache, use_cache=True,
                     logits_to_keep=1)  # the last token's step
        torch.softmax(out.logits[:, -1].float() / self.temperature, -1)


def generate_phase(script, models, args, sizes: Sizes, tracker: PeakOnly | None) -> None:
    """script.generate over the rank's whole batch, --generation_batch_size sequences per call, the policy gathered
    whole. Planned (a tracker): the model's generate played by StandInGenerate; measured (--validate, real tensors):
    the model's own generate, token by token."""
    queries, query_mask = sequences(sizes.local, sizes.prompt, models.policy.config.vocab_size)
    # every response of full length: no stop token before max_new_tokens. Greedy: a measured run of N > 1 fake ranks
    # gathers shards it never received, and sampling refuses the NaN they may hold
    config = GenerationConfig(max_new_tokens=sizes.response, min_new_tokens=sizes.response, do_sample=False,
                              eos_token_id=1, pad_token_id=0)
    if tracker is not None:  # an instance attribute: the model's own generate is back after the phase
        models.policy.generate = StandInGenerate(models.policy, tracker, args.temperature)
    try:
        with torch.no_grad():
            script.generate(models.policy, queries, query_mask, config, args.generation_batch_size)
    finally:
        vars(models.policy).pop("generate", None)


def score_phase(script, models, args, sizes: Sizes, tracker: PeakOnly | None) -> None:
    """The script's scoring: the reference's logprobs, the RM's scores, the rollout's own logprobs (and ppo.py's
    values), on one chunk of local_rollout_forward_batch_size sequences; with `reuse`, the first training forward
    over the whole local batch, whose graph lives on into the update."""
    vocab, P, T = models.policy.config.vocab_size, sizes.prompt, sizes.response
    query_responses, mask = sequences(sizes.rollout, P + T, vocab)
    responses = query_responses[:, P:]
    response_mask = torch.ones_like(responses, dtype=torch.bool)
    with torch.no_grad():
        script.reference_logprobs(models, args, query_responses, mask, responses)
        if models.reward.fn is None:  # --reward_fn scores text on the CPU
            script.reward_scores(models.reward, None, query_responses, mask, response_mask, context_length=P,
                                 has_eos=response_mask[:, -1], batch_size=args.local_rollout_forward_batch_size)
        if sizes.reuse:
            query_responses, mask = sequences(sizes.local, P + T, vocab)
            responses = query_responses[:, P:]
        old = getattr(script, "old_logprobs_and_values", None) or script.old_logprobs  # grpo.py: no values
        reused = old(models, args, query_responses, mask, responses, reuse=sizes.reuse)
    del reused  # the reused forward's graph: the train phase builds it again (its micro-batch is the local batch)


def train_phase(script, models, args, sizes: Sizes, tracker: PeakOnly | None) -> None:
    """The update's step on the last micro-batch of a minibatch (ppo.py: after the critic warm-up):
    script.micro_batch_backward itself, the forward, loss, backward and logged statistics, then the optimizer
    step."""
    query_responses, mask = sequences(sizes.micro, sizes.prompt + sizes.response, models.policy.config.vocab_size)
    responses = query_responses[:, sizes.prompt:]
    given = {"query_responses": query_responses, "attention_mask": mask, "responses": responses,
             "response_mask": torch.ones_like(responses, dtype=torch.bool)}
    rollout = script.Rollout(**{f.name: given.get(f.name, torch.zeros(sizes.micro, sizes.response))
                                for f in dataclasses.fields(script.Rollout)})  # the rest: (B, T) floats
    parameters = inspect.signature(script.micro_batch_backward).parameters
    moves = {"policy_moves": True} if "policy_moves" in parameters else {}  # ppo.py: after the critic warm-up
    script.micro_batch_backward(models, args, rollout, torch.arange(sizes.micro), args.kl_coef,
                                accumulation_steps=sizes.accumulation, **moves)
    optimizer_step(models, args)


def optimizer_step(models, args) -> None:
    """As the scripts' main() ends a minibatch: common.rl_clip_grad_norm_or_stop's clip, AdamW, gradients freed."""
    params = models.optimizer.param_groups[0]["params"]
    torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm or float("inf"))
    models.optimizer.step()
    models.optimizer.zero_grad(set_to_none=True)


def leave_gradients(models) -> None:
    """The gradient shards the earlier micro-batches of a minibatch leave for the last one to add to."""
    for p in models.optimizer.param_groups[0]["params"]:
        p.grad = torch.zeros_like(p)


def reach_steady_state(models, args) -> None:
    """One optimizer step on zero gradients before anything is measured: it creates AdamW's moments, as the first
    update does, and fills DTensor's cache of sharding rules, whose first use of an op makes full-size fake tensors
    (its shape propagation) that no GPU allocates."""
    leave_gradients(models)
    optimizer_step(models, args)


PHASES = {"generate": generate_phase, "score": score_phase, "train": train_phase}


class StepHooks:
    """Hooks that tell a tracker where a phase is (PeakOnly): a segment ends where a model's forward starts or ends
    and where the optimizer steps; a block's forward starts at its forward pre-hook (not again when gradient
    checkpointing recomputes it in the backward), its backward when the gradient of its output arrives."""

    def __init__(self, tracker: PeakOnly, models):
        self.tracker, self.models, self.hooks = tracker, all_models(models), []
        self.optimizer = models.optimizer

    def __enter__(self) -> list[int]:
        """-> the number of blocks of each model."""
        tracker, depths = self.tracker, []
        self.hooks.append(self.optimizer.register_step_pre_hook(tracker.new_segment))
        for i, model in enumerate(self.models):
            self.hooks += [model.register_forward_pre_hook(tracker.new_segment),
                           model.register_forward_hook(tracker.new_segment)]
            names = set(getattr(model, "_no_split_modules", None) or [])  # the blocks' classes, FSDP2's subclassed
            blocks = [m for m in model.modules() if any(c.__name__ in names for c in type(m).__mro__)]
            depths.append(len(blocks))
            for j, block in enumerate(blocks):
                self.hooks += [block.register_forward_pre_hook(functools.partial(self.forward_starts, (i, j))),
                               block.register_forward_hook(functools.partial(self.forward_ends, (i, j)))]
        return depths

    def forward_starts(self, block: tuple, *_) -> None:
        if not self.tracker._mod_tracker.is_bw:
            self.tracker.enter_block(block)

    def forward_ends(self, block: tuple, module, args, output) -> None:
        out = output[0] if isinstance(output, tuple) else output
        if torch.is_tensor(out) and out.requires_grad and not self.tracker._mod_tracker.is_bw:
            out.register_hook(lambda grad: self.tracker.enter_block(block))  # returns None: the gradient as it is

    def __exit__(self, *exc) -> None:
        for hook in self.hooks:
            hook.remove()


def run_phases(script, models, args, sizes: Sizes, tracked: bool = True) -> dict:
    """generate, score and train in main()'s order. Tracked (on fake tensors): each phase under a tracker of its
    own, -> {phase: its peak's components}. Untracked (a real run): each phase in a profiler range of its name."""
    peaks = {}
    for name, phase in PHASES.items():
        if name == "train" and sizes.accumulation > 1:
            leave_gradients(models)
        if tracked:
            tracker = new_tracker(models)
            with StepHooks(tracker, models) as depths, tracker:
                phase(script, models, args, sizes, tracker)
            peaks[name] = tracker.peak(depths)
        else:
            gc.collect()  # the allocator's count is the process's: the last phase's garbage must be gone (the tracker
            # counts what it saw allocated, and collecting costs it a third of its time for the same numbers)
            with record_function(f"memory_plan:{name}"):
                phase(script, models, args, sizes, None)
    return peaks


# ----------------------------------------------------------------------------------------------
# One plan: a script, its flags, its models' configs, N GPUs
# ----------------------------------------------------------------------------------------------
# the flags build_models reads: runs that share them can share one build
MODEL_FIELDS = ("dtype", "frozen_dtype", "lora_r", "lora_alpha", "lora_target_modules", "gradient_checkpointing",
                "mixed_precision", "critic_init", "value_head_on_policy", "reward_fn")


def plan_runs(script, configs: Configs, runs: list, ranks: int, offload: bool = True) -> list[dict]:
    """Plans of flags that differ only in batch and lengths, on one build of the models (their model flags, the
    first run's, are the same). `offload`: apply --offload_critic (a real CPU run cannot)."""
    if any(getattr(args, f, None) != getattr(runs[0], f, None) for args in runs for f in MODEL_FIELDS):
        raise ValueError(f"plan_runs: the runs must share {', '.join(MODEL_FIELDS)}")
    mesh = start_fake_ranks(ranks, on_gpus(runs[0]))
    mode = FakeTensorMode(allow_non_fake_inputs=True)  # the models' meta tensors go in once, to be materialized
    models = build_models(script, configs, runs[0], mesh, mode)
    out = []
    with mode:
        reach_steady_state(models, runs[0])
        resident = model_bytes(models)
        for args in runs:
            sizes = sizes_of(args, ranks)
            phases = run_phases(script, models, args, sizes)
            if offload and getattr(args, "offload_critic", False) and getattr(models, "critic", None) is not None:
                offload_critic(phases["generate"], resident["critic"])
            out.append({"sizes": dataclasses.asdict(sizes), "models": resident, "phases": phases,
                        "peak": max(p["peak"] for p in phases.values())})
    stop_fake_ranks()
    return out


def offload_critic(generate: dict, critic: dict) -> None:
    """ppo.place_critic: the critic's shards and AdamW state wait on the CPU while the policy generates."""
    for snapshot in (generate, *generate["steps"].values()):
        for part in ("parameters", "optimizer state"):
            snapshot[part] -= critic[part]
            snapshot["peak"] -= critic[part]


def plan(script, configs: Configs, args, ranks: int) -> dict:
    """One rank's per-phase peaks and their components, in bytes, for these flags on `ranks` GPUs. Models deeper
    than 4 layers are planned with 3 layers, and with 4 layers for each depth in turn, and the bytes at each step of
    a phase that extrapolates (PeakOnly) extrapolated linearly to the real depths; a phase's peak is its highest
    step's (module docstring, "Layers")."""
    if min(configs.depths()) <= SAMPLED_DEPTH + 1:
        return settled(plan_runs(script, configs, [args], ranks)[0])
    base = plan_runs(script, configs.with_depths(lambda layers: SAMPLED_DEPTH), [args], ranks)[0]
    out = copy.deepcopy(base)
    for depth in sorted(configs.depths()):
        deeper = plan_runs(script, configs.with_depths(lambda layers, d=depth: SAMPLED_DEPTH + (layers == d)), [args],
                           ranks)[0]
        if any(base["phases"][p]["steps"].keys() != deeper["phases"][p]["steps"].keys() for p in PHASES):
            raise RuntimeError("memory_plan: a phase has other steps at one layer more; plan_runs at full depth")
        for key in ("phases", "models"):
            out[key] = extrapolated(out[key], base[key], deeper[key], depth - SAMPLED_DEPTH)
    return settled(out)


SAMPLED_DEPTH = 3  # the layers a deep model is planned with, and with one more


def extrapolated(acc, base, deeper, layers_more: int):
    """acc + layers_more * (deeper - base), number by number in nested dicts and lists."""
    if isinstance(acc, dict):
        return {k: extrapolated(acc[k], base[k], deeper[k], layers_more) for k in acc}
    if isinstance(acc, list):
        return [extrapolated(a, b, d, layers_more) for a, b, d in zip(acc, base, deeper)]
    return acc + layers_more * (deeper - base)


def settled(result: dict) -> dict:
    """Each phase's components at its highest step (without the steps), and the run's peak."""
    for name, phase in result["phases"].items():
        result["phases"][name] = max(phase["steps"].values(), key=lambda s: s["peak"])
    result["peak"] = max(p["peak"] for p in result["phases"].values())
    return result


PARAMETERS = {}  # a config's JSON -> its parameter count


def parameter_count(config) -> int:
    """Parameters of the bare transformer (no LM head, no score head), counted on the meta device."""
    key = config.to_json_string()
    if key not in PARAMETERS:
        with torch.device("meta"):
            PARAMETERS[key] = sum(p.numel() for p in AutoModel.from_config(copy.deepcopy(config)).parameters())
    return PARAMETERS[key]


def resident_lower_bound(script, configs: Configs, args, ranks: int) -> float:
    """Bytes of weights, gradients and AdamW state one rank holds at least, from the bare transformers' parameters
    (the models have more): a model trained in full holds 4 of them per parameter in --dtype (weights, gradients,
    two moments); the LoRA policy's frozen base 1 in --dtype; a frozen model 1 in --frozen_dtype. FSDP2 divides all
    by the ranks, but an int8 model on one GPU."""
    size = torch.finfo(common.DTYPES[args.dtype]).bits // 8
    frozen_size = {"same": size, "float16": 2, "bfloat16": 2, "int8": 1}[args.frozen_dtype]
    sft = parameter_count(configs.sft)
    rms = [parameter_count(c) for c in configs.rms]
    trained = sft * (size if args.lora_r else 4 * size)
    if has_critic(script, args):
        trained += 4 * size * (rms[0] if args.critic_init == "rm" else sft)
    frozen_bytes = frozen_size * (sum(rms) + (0 if args.lora_r else sft))
    sharded = ranks > 1 or on_gpus(args)
    return (trained + frozen_bytes) / (ranks if sharded else 1)


# ----------------------------------------------------------------------------------------------
# --plan_memory: one run's flags, planned before it is launched
# ----------------------------------------------------------------------------------------------
def plan_command(script, args) -> None:
    """`python ppo.py [preset] [flags] --plan_memory --plan_gpus N --gpu_gb G` (grpo.py alike): each phase's
    planned peak per GPU for exactly these flags on N GPUs, and if they do not fit G GB, the memory options that
    make them fit, added one after another; last, `planned peak: X.X GB per GPU`. Nothing is trained."""
    start = time.time()
    script.check_args(args)
    configs, ranks, budget = configs_of(args), args.plan_gpus, args.gpu_gb * GB
    sizes = sizes_of(args, ranks)
    result = plan(script, configs, args, ranks)
    rms = ", ".join(name_of(p) for p in args.reward_model or []) or f"none (--reward_fn {args.reward_fn})"
    print(f"{script.METHOD}.py on {ranks} GPU{'s' if ranks > 1 else ''} of {args.gpu_gb:g} GB: policy "
          f"{name_of(args.sft_model)}, reward model {rms}; {'bf16 compute' if on_gpus(args) else 'no mixed precision'}"
          f"; per rank: {sizes.local} sequences per update, generated {sizes.generation} at a time, scored "
          f"{sizes.rollout} at a time, trained {sizes.micro} at a time")
    print(phases_text(result))
    if result["peak"] <= budget:
        print(f"fits one {args.gpu_gb:g} GB GPU")
    else:
        print(f"does not fit {args.gpu_gb:g} GB; the memory options, added one after another (cheapest first):")
        for line in fitting_options(script, configs, args, ranks, budget)[1]:
            print(line)
    print(f"(planned in {time.time() - start:.0f} s; simulated bytes of tensors, not measured: the CUDA allocator's "
          "cache and fragmentation, the CUDA context and NCCL's buffers come on top)")
    print(f"planned peak: {result['peak'] / GB:.1f} GB per GPU")


def phases_text(result: dict) -> str:
    lines = [f"{'phase':<9}" + "".join(f"{c:>17}" for c in (*COMPONENTS, "peak"))]
    for name, p in result["phases"].items():
        lines.append(f"{name:<9}" + "".join(f"{p[c] / GB:>14.2f} GB" for c in (*COMPONENTS, "peak")))
    return "\n".join(lines)


def option_steps(script, args, sizes: Sizes) -> list[tuple[str, dict]]:
    """The memory options to add, one after another, those that cost the least speed and change the least first;
    those already on are left out. Generation and training in smaller chunks change nothing but the speed."""
    steps = []
    if sizes.generation > args.local_rollout_forward_batch_size:
        steps.append((f"--generation_batch_size {args.local_rollout_forward_batch_size}",
                      {"generation_batch_size": args.local_rollout_forward_batch_size}))
    if args.frozen_dtype != "int8":
        steps.append(("--frozen_dtype int8", {"frozen_dtype": "int8"}))
    if not args.gradient_checkpointing:
        steps.append(("--gradient_checkpointing", {"gradient_checkpointing": True}))
    if has_critic(script, args) and not args.offload_critic:
        steps.append(("--offload_critic", {"offload_critic": True}))
    if not args.lora_r:
        steps.append(("--lora_r 8", {"lora_r": 8}))
    if has_critic(script, args):
        steps.append(("--value_head_on_policy", {"value_head_on_policy": True}))
    if sizes.micro > 1:
        steps.append(("--micro_batch_size 1", {"micro_batch_size": 1}))
    if sizes.generation > 4:
        steps.append(("--generation_batch_size 4", {"generation_batch_size": 4}))
    return steps


def fitting_options(script, configs: Configs, args, ranks: int, budget: float) -> tuple[dict | None, list[str]]:
    """The options of option_steps added one after another until the plan fits `budget` bytes (a step whose
    resident bytes alone exceed it is not planned). -> ({"flags": the options, "plan": the fitting plan} or None,
    one printed line per step)."""
    lines, flags, changes = [], [], {}
    for flag, change in option_steps(script, args, sizes_of(args, ranks)):
        flags.append(flag)
        changes.update(change)
        trial = dataclasses.replace(args, **changes)
        bound = resident_lower_bound(script, configs, trial, ranks)
        if bound > budget:
            lines.append(f"  + {flag:<34} weights, gradients and AdamW state alone hold over {bound / GB:.1f} GB")
            continue
        result = plan(script, configs, trial, ranks)
        fits = result["peak"] <= budget
        lines.append(f"  + {flag:<34} {result['peak'] / GB:6.1f} GB{'  fits' if fits else ''}")
        if fits:
            if changes.get("value_head_on_policy"):  # no separate critic left to offload
                flags = [f for f in flags if f != "--offload_critic"]
            lines.append(f"fits one {budget / GB:g} GB GPU with: {' '.join(flags)}")
            return {"flags": flags, "plan": result}, lines
    lines.append(f"no combination of these options fits {budget / GB:g} GB: more GPUs (--plan_gpus), a smaller model, "
                 "or shorter sequences")
    return None, lines


# ----------------------------------------------------------------------------------------------
# --validate: the same phases on real tensors, measured by the CPU allocator
# ----------------------------------------------------------------------------------------------
# (script, ranks, label, flags): one process without FSDP2; one GPU's bf16 (FSDP2 over a group of one) with the
# generation in chunks; FSDP2 over 2 ranks in fp32, in bf16 with chunks, with int8 frozen models sharded (and
# LoRA, gradient checkpointing; offloading is arithmetic), and in bf16 with int8; grpo.py's update on one GPU
VALIDATE_CASES = (
    ("ppo", 1, "fp32", {"mixed_precision": "none"}),
    ("ppo", 1, "bf16, chunks", {"mixed_precision": "bf16", "generation_batch_size": 8}),
    ("ppo", 2, "fp32", {"mixed_precision": "none"}),
    ("ppo", 2, "bf16, chunks", {"mixed_precision": "bf16", "generation_batch_size": 8}),
    ("ppo", 2, "int8, LoRA, ckpt", {"mixed_precision": "none", "frozen_dtype": "int8", "offload_critic": True,
                                   "lora_r": 8, "gradient_checkpointing": True}),
    ("ppo", 2, "bf16, int8", {"mixed_precision": "bf16", "frozen_dtype": "int8"}),
    ("grpo", 1, "bf16, chunks", {"mixed_precision": "bf16", "generation_batch_size": 8}),
)
SCRIPTS = {"ppo": ppo, "grpo": grpo}
VALIDATE_TOLERANCE = 0.05


def validate_configs() -> Configs:
    return Configs(pythia(128, 2, 4, 512), [pythia(128, 2, 4, 512)])


def validate_args(script, flags: dict):
    """Small shapes, with several micro-batches per update as in the presets."""
    return dataclasses.replace(script.Args(), batch_size=32, max_prompt_length=48, response_length=16,
                               local_rollout_forward_batch_size=8, micro_batch_size=4, **flags)


def measured_peaks(script, args, ranks: int) -> dict[str, int]:
    """The real peak of each phase: the bytes the CPU allocator holds, from its own running count of live bytes,
    which torch.profiler(profile_memory=True) reports with every allocation. It sees every allocation, tensor or
    not, made anywhere below the dispatcher, and shares nothing with the tracker's bookkeeping, so it is an
    independent measurement. It counts only what is allocated while the profiler runs, so the profiler starts
    before the models are built."""
    mesh = start_fake_ranks(ranks, on_gpus(args))
    gc.collect()  # an earlier run's models, freed while this one runs, would lower its count
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        models = build_models(script, validate_configs(), args, mesh, contextlib.nullcontext())
        reach_steady_state(models, args)
        run_phases(script, models, args, sizes_of(args, ranks), tracked=False)
    stop_fake_ranks()
    return phase_peaks_from(prof)


def phase_peaks_from(prof) -> dict[str, int]:
    """The highest live-byte count the allocator reported within each `memory_plan:{phase}` range, counted from the
    profiler's start: the count is the process's, and keeps what an earlier profiled run freed after it stopped."""
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        events.append(event)
        stack.extend(event.children)
    allocations = sorted((e.start_time_ns, e.extra_fields.total_allocated, e.extra_fields.alloc_size) for e in events
                         if hasattr(e.extra_fields, "total_allocated"))
    at_start = allocations[0][1] - allocations[0][2]
    peaks = {}
    for e in events:
        if e.name.startswith("memory_plan:"):
            before = [total for t, total, _ in allocations if t < e.start_time_ns]
            during = [total for t, total, _ in allocations if e.start_time_ns <= t <= e.end_time_ns]
            peaks[e.name.split(":", 1)[1]] = max(before[-1:] + during) - at_start
    return peaks


def validation(cases=VALIDATE_CASES) -> list[dict]:
    """Planned and measured peak of each phase, for each case (script, ranks, label, flags)."""
    rows = []
    for name, ranks, label, flags in cases:
        script = SCRIPTS[name]
        args = validate_args(script, flags)
        planned = plan_runs(script, validate_configs(), [args], ranks, offload=False)[0]["phases"]
        measured = measured_peaks(script, args, ranks)
        rows += [{"script": name, "ranks": ranks, "option": label, "phase": phase, "planned": planned[phase]["peak"],
                  "measured": measured[phase], "ratio": planned[phase]["peak"] / measured[phase]} for phase in PHASES]
    return rows


def worst(rows: list[dict]) -> dict:
    return max(rows, key=lambda r: abs(r["ratio"] - 1))


def validate() -> None:
    start = time.time()
    rows = validation()
    config = validate_configs().sft
    print(f"{config.num_hidden_layers} x {config.hidden_size} GPT-NeoX; planned: fake tensors and torch's memory "
          "trackers; measured: real tensors, the models' own generate, the CPU allocator's live bytes (torch.profiler)")
    for r in rows:
        print(f"{r['script']}.py N={r['ranks']} {r['option']:>16} {r['phase']:>8}: planned "
              f"{r['planned'] / 2**20:6.2f} MiB, measured {r['measured'] / 2**20:6.2f} MiB, ratio {r['ratio']:.3f}")
    w = worst(rows)
    print(f"validate: worst planned/measured {w['ratio']:.3f} ({w['script']}.py N={w['ranks']}, {w['option']}, "
          f"{w['phase']}); {time.time() - start:.0f} s")
    if abs(w["ratio"] - 1) > VALIDATE_TOLERANCE:
        raise SystemExit(f"memory_plan --validate: the plan is off by {w['ratio'] - 1:+.0%} ({w['script']}.py "
                         f"N={w['ranks']}, {w['option']}, {w['phase']} phase), more than {VALIDATE_TOLERANCE:.0%}")


# ----------------------------------------------------------------------------------------------
# Reports: the presets on the GPUs people have, the 7B, and the validation
# ----------------------------------------------------------------------------------------------
def preset_args(script, preset: str, **flags):
    """A preset's flags with its published base model for the policy and the RM (planned from MODELS), `flags` over
    them."""
    model = PRESET_MODELS[preset]
    return dataclasses.replace(script.parse_args([preset]), sft_model=model, reward_model=[model], **flags)


def run_task(task: tuple) -> dict:
    """One unit of work for a worker process: (label, "plan" or "fit", script name, preset, flags, ranks, GB)."""
    label, kind, name, preset, flags, ranks, gpu_gb = task
    script = SCRIPTS[name]
    args = preset_args(script, preset, **flags)
    out = {"label": label, "script": name, "preset": preset, "model": name_of(args.sft_model), "flags": flags,
           "ranks": ranks, "gpu_gb": gpu_gb}
    if kind == "plan":
        return {**out, **plan(script, configs_of(args), args, ranks)}
    found, lines = fitting_options(script, configs_of(args), args, ranks, gpu_gb * GB)
    return {**out, "options": found and found["flags"], "plan": found and found["plan"], "lines": lines}


def report_tasks() -> list[tuple]:
    tasks = []
    for preset in PRESETS:
        for name in SCRIPTS:
            tasks += [(f"{preset} {name} {n}", "plan", name, preset, {}, n, 80) for n in (1, 8)]
            tasks.append((f"{preset} {name} 24", "fit", name, preset, {}, 1, 24))
    tasks += [("7B 8 ppo", "plan", "ppo", "pythia-tldr-6.9b", {}, 8, 80),
              ("7B 8 grpo", "plan", "grpo", "pythia-tldr-6.9b", {}, 8, 80),
              ("7B 8 ppo, the 1B split", "plan", "ppo", "pythia-tldr-6.9b",
               {"micro_batch_size": 16, "local_rollout_forward_batch_size": 64, "generation_batch_size": 64}, 8, 80),
              ("7B 1 ppo", "plan", "ppo", "pythia-tldr-6.9b", {}, 1, 80),
              ("7B 1 ppo options", "fit", "ppo", "pythia-tldr-6.9b", {}, 1, 80),
              ("7B 1 ppo recipe", "plan", "ppo", "pythia-tldr-6.9b", {**RECIPE_7B, **RECIPE_7B_PPO}, 1, 80),
              ("7B 1 grpo recipe", "plan", "grpo", "pythia-tldr-6.9b", RECIPE_7B, 1, 80)]
    return tasks


def gb(x: float | None) -> str:
    return "" if x is None else f"{x / GB:.1f}"


def flags_text(flags: dict) -> str:
    return " ".join(f"--{k}" if v is True else f"--{k} {v}" for k, v in flags.items())


def fits_table(results: dict) -> str:
    """Each preset, each script, at its own settings: one GPU's peak, the options that fit 24 GB, 8 GPUs' peak."""
    lines = ["| preset | model | script | 1 GPU | 1 x 24 GB | 1 x 80 GB | 8 GPUs, per GPU | 8 x 80 GB |",
             "|---" * 8 + "|"]
    for preset in PRESETS:
        for name in SCRIPTS:
            one, eight, fit = (results[f"{preset} {name} {n}"] for n in (1, 8, 24))
            small = ("fits" if one["peak"] <= 24 * GB else
                     f"with `{' '.join(fit['options'])}`: {gb(fit['plan']['peak'])}" if fit["options"] else "no")
            lines.append(f"| `{preset}` | {one['model']} | {name}.py | {gb(one['peak'])} | {small} | "
                         f"{'fits' if one['peak'] <= 80 * GB else 'no'} | {gb(eight['peak'])} | "
                         f"{'fits' if eight['peak'] <= 80 * GB else 'no'} |")
    return "\n".join(lines)


def phases_table(rows: list[dict]) -> str:
    lines = ["| run | phase | " + " | ".join(COMPONENTS) + " | peak |", "|---" * (len(COMPONENTS) + 3) + "|"]
    for r in rows:
        for name, p in r["phases"].items():
            cells = " | ".join(gb(p[c]) for c in COMPONENTS)
            peak = f"**{gb(p['peak'])}**" if p["peak"] == r["peak"] else gb(p["peak"])
            lines.append(f"| {r['title']} | {name} | {cells} | {peak} |")
    return "\n".join(lines)


def reference_rows(r: dict) -> dict[str, float | None]:
    """A plan in the rows of the seed's estimate: each model's resident bytes, then the phases' highest gathered
    copy, activations and KV cache, and peak (the rows' phases differ, so the total is not their sum)."""
    m, phases = r["models"], r["phases"].values()
    critic = m.get("critic", m.get("value head"))
    return {"policy: weights + gradients + AdamW": sum(m["policy"].values()),
            "reference": m["reference"]["parameters"] if "reference" in m else None,  # LoRA: the policy, adapter off
            "reward model": m["reward model"]["parameters"],
            "critic: weights + gradients + AdamW": sum(critic.values()) if critic else None,
            "gathered bf16 copy of the model in use": max(p["gathered"] for p in phases),
            "activations + KV cache": max(p["activations"] + p["KV cache"] for p in phases),
            "total": r["peak"]}


def reference_table(plans: dict[str, dict]) -> str:
    """The seed's 7B estimate next to the plans, component by component."""
    ours = {label: reference_rows(r) for label, r in plans.items()}
    lines = ["| Pythia-6.9B policy and RM, TL;DR settings, GB per GPU | seed's estimate | " + " | ".join(ours) + " |",
             "|---" * (len(ours) + 2) + "|"]
    lines += [f"| {name} | {ref or '-'} | " + " | ".join(gb(rows[name]) or "-" for rows in ours.values()) + " |"
              for name, ref in REFERENCE_7B.items()]
    return "\n".join(lines)


def validation_table(rows: list[dict]) -> str:
    cases = list(dict.fromkeys((r["script"], r["ranks"], r["option"]) for r in rows))
    ratios = {(r["script"], r["ranks"], r["option"], r["phase"]): r["ratio"] for r in rows}
    lines = ["| planned / measured | " + " | ".join(f"{s}.py, N = {n}, {o}" for s, n, o in cases) + " |",
             "|---" * (len(cases) + 1) + "|"]
    lines += [f"| {phase} | " + " | ".join(f"{ratios[(s, n, o, phase)]:.3f}" for s, n, o in cases) + " |"
              for phase in PHASES]
    return "\n".join(lines)


def markdown(report: dict) -> str:
    r = report["results"]
    seven = [("`ppo.py pythia-tldr-6.9b`, 8 GPUs", r["7B 8 ppo"]),
             ("`grpo.py pythia-tldr-6.9b`, 8 GPUs", r["7B 8 grpo"]),
             ("`ppo.py`, 8 GPUs, pythia-tldr's 1B split", r["7B 8 ppo, the 1B split"]),
             ("`ppo.py`, 1 GPU, the 7B recipe", r["7B 1 ppo recipe"]),
             ("`grpo.py`, 1 GPU, the 7B recipe", r["7B 1 grpo recipe"])]
    presets = [(f"`{p}`, {n} GPU{'s' if n > 1 else ''}", r[f"{p} ppo {n}"]) for p in PRESETS for n in (1, 8)]
    options = r["7B 1 ppo options"]
    config = validate_configs().sft
    return "\n\n".join([
        f"`python results/memory_plan.py` (this run: {report['wall_time_s'] / 60:.0f} minutes with --workers "
        f"{report['workers']} on 2 shared cores; `--validate` alone: about a minute). Simulated, not measured: the "
        "scripts' phases run on fake tensors and PyTorch's memory trackers add up every tensor's bytes. Not counted: "
        "memory the CUDA caching allocator keeps cached or loses to fragmentation, the CUDA context, NCCL's buffers. "
        "GB = 1e9 bytes, per GPU. Every plan: the presets' flags on GPUs (--mixed_precision auto: bf16 compute over "
        "fp32 weights and AdamW state, FSDP2 on one GPU too), the policy and RM from the preset's base model.",
        "Which presets fit which GPUs, at their own settings (peaks in GB; 24 GB: the memory options, added cheapest "
        "first, that make the run fit):",
        fits_table(r),
        "Each preset's phases (ppo.py; the peak phase in bold; parameters: the rank's resident weights; gathered: the "
        "bf16 copy FSDP2 all-gathers of the model in use):",
        phases_table([{"title": t, **p} for t, p in presets]),
        f"Pythia-6.9B at the TL;DR settings: `pythia-tldr-6.9b` is `pythia-tldr` with Huang et al. 2024's split for "
        f"6.9B (micro-batches of 1, rollout forwards and generation chunks of 4); the 7B recipe is "
        f"`{flags_text({**RECIPE_7B, **RECIPE_7B_PPO})}` (grpo.py: without the value head, it has no critic):",
        phases_table([{"title": t, **p} for t, p in seven]),
        "`ppo.py pythia-tldr-6.9b` on one 80 GB GPU with default flags plans " + gb(r["7B 1 ppo"]["peak"]) +
        " GB; `--plan_memory --gpu_gb 80` adds the memory options one after another:\n\n```\n"
        + "\n".join(options["lines"]) + "\n```",
        reference_table({"8 GPUs, `pythia-tldr-6.9b`": r["7B 8 ppo"],
                         "1 GPU, the 7B recipe (ppo.py)": r["7B 1 ppo recipe"],
                         "1 GPU, the 7B recipe (grpo.py)": r["7B 1 grpo recipe"]}),
        f"Validation (`--validate`): a {config.num_hidden_layers} x {config.hidden_size} GPT-NeoX run for real on the "
        "CPU, with the model's own generate, its plan against the bytes the CPU allocator held (torch.profiler), "
        "each phase's peak:",
        validation_table(report["validate"]),
        "Notes:\n"
        "- one GPU: --mixed_precision auto (bf16 on CUDA) starts a process group of one, so that FSDP2's mixed "
        "precision runs as on N GPUs: fp32 weights and AdamW state, a bf16 copy of the model in use, bf16 "
        "activations and KV cache. --mixed_precision none: no FSDP2, every model whole in --dtype.\n"
        "- generation: script.generate samples --generation_batch_size sequences per call (the presets: Huang et "
        "al.'s rollout forward batch), so the KV cache and the prefill's activations are one chunk's; without it, the "
        "rank's whole batch at once. The evaluation is not planned: it samples --eval_batch_size prompts per call (no "
        "more than a generation chunk in every preset) and scores them in rollout-forward chunks, without "
        "gradients.\n"
        "- --frozen_dtype int8 models are sharded by FSDP2 like the others, and gathered as int8 (one byte per "
        "parameter, half of bf16's); on one GPU they stay whole.\n"
        "- --offload_critic frees the critic's weights and AdamW state during generation only, so it lowers the "
        "peak only where generation peaks; with --value_head_on_policy there is no critic to move.\n"
        "- deep models are planned with 3 and 4 layers and extrapolated step by step (module docstring); the "
        "extrapolation equals whole plans of Pythia-6.9B and Pythia-1B (tests/test_memory.py checks a small model).",
    ])


def write_block(body: str) -> None:
    """Replace the memory_plan block of results/README.md, where it has one."""
    path = os.path.join(HERE, "README.md")
    text = open(path).read()
    pattern = re.compile(r"(<!-- generated:memory_plan -->\n).*?(<!-- /generated:memory_plan -->)", re.S)
    if not pattern.search(text):
        print("results/README.md has no <!-- generated:memory_plan --> block: printed only")
        return
    with open(path, "w") as f:
        f.write(pattern.sub(lambda m: m.group(1) + body.rstrip() + "\n" + m.group(2), text))


def main(args: Args) -> None:
    if args.validate:
        return validate()
    start = time.time()
    with ProcessPoolExecutor(args.workers, mp_context=get_context("spawn")) as pool:
        results = {r["label"]: r for r in pool.map(run_task, report_tasks())}
    checked = validation()
    report = {"about": "simulated per-GPU bytes (python results/memory_plan.py); not counted: the CUDA caching "
                       "allocator's cached and fragmented memory, the CUDA context, NCCL buffers",
              "results": results, "validate": checked, "workers": args.workers, "wall_time_s": time.time() - start}
    body = markdown(report)
    print(body)
    if args.write:
        with open(os.path.join(HERE, "memory_plan.json"), "w") as f:
            json.dump(report, f, indent=1)
        write_block(body)
    print(f"{time.time() - start:.0f} s")


if __name__ == "__main__":
    main(tyro.cli(Args, use_underscores=True))
