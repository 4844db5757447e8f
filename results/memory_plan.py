"""Per-GPU peak memory of ppo.py's PPO on GPUs, planned on a CPU: ppo.py's own forwards, losses and AdamW step
run on fake tensors (shapes and dtypes, no storage, no arithmetic), and PyTorch's memory trackers (FSDP2's, or on
one GPU the plain one) add up the bytes every tensor would hold, phase by phase.

    python results/memory_plan.py              # writes results/memory_plan.json and its block in results/README.md
    python results/memory_plan.py --validate   # a small model run for real on the CPU, checked against its plan

What runs. The four models are built as ppo.build_models builds them, from published configs at their real sizes
(no weights are downloaded): policy and critic in --dtype (fp32 by default), the reference and the RM in
--frozen_dtype. On N > 1 GPUs (torchrun) each is sharded by FSDP2 as common.fsdp_wrap shards it on GPUs (every
block, then the root; bf16 all-gathers and compute, fp32 reduce-scatters) over N simulated ranks; an int8 model
stays whole on every rank, as ppo.shard_frozen keeps it. On one GPU ppo.py starts no process group
(common.setup_distributed: WORLD_SIZE 1, torchrun --nproc_per_node=1 included), so fsdp_wrap is a no-op: every
model is whole, in its own dtype, and computes in it. Then three phases of one PPO update, each on one rank's share:

- generate: ppo.generate, the policy gathered whole (ppo.unsharded) and HF's generate over the rank's whole batch
  (batch_size // N prompts, as ppo.main passes them). Fake tensors cannot sample, so the prefill and the last
  token's step, with the KV cache grown to prompt + response, stand in for the token loop;
- score: ppo.reference_logprobs, ppo.reward_scores and ppo.old_logprobs_and_values (the no-grad forwards of the
  reference, the RM, the policy and the critic) on local_rollout_forward_batch_size sequences of
  max_prompt_length + response_length tokens. (ppo.py's reuse of PPO's first forward, one forward with gradients
  over the whole local batch, applies only to updates of one micro-batch; no preset has one, and the plan refuses
  them);
- train: the last micro-batch of a minibatch: ppo.train_forward, ppo.policy_loss + vf_coef * ppo.value_loss,
  the backward into the gradients the earlier micro-batches left, the statistics ppo.py logs, the grad-norm
  clip and the AdamW step.
AdamW's moments exist from the first update on, so every phase is planned in that steady state.

Each phase's peak is split into parameters (this rank's resident weights: shards, or on one GPU whole models; an
int8 model always whole), the bf16 copy FSDP2 gathers of the model in use (none on one GPU), gradients,
optimizer state, activations (every temporary included) and KV cache. The numbers are simulated: memory the CUDA caching allocator keeps cached or loses to fragmentation, the CUDA context and
NCCL's buffers are not counted. --validate checks the accounting on a small model run for real (`validate`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
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
from transformers import (AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification, DynamicCache,
                          GPTNeoXConfig, LlamaConfig, Qwen2Config)

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import common  # noqa: E402
import ppo  # noqa: E402

warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")  # peft asks transformers' deprecated name

GB = 1e9  # the README's unit: 40 bytes per parameter x 7e9 = 280 GB


@dataclass
class Args:
    validate: bool = False
    """run a small model for real on the CPU and check the plan against the bytes it really held (exit 1 beyond 10%)"""
    gpu_gb: float = 80.0
    """memory of the GPU in the 'what fits' table, in GB (1e9 bytes) of tensors"""
    workers: int = 2
    """processes planning in parallel (fake tensors use one core each)"""
    write: bool = True
    """write results/memory_plan.json and the block in results/README.md (--no_write: print only)"""


# ----------------------------------------------------------------------------------------------
# The models: published hyperparameters from each model's config.json on the Hugging Face hub (the Pythia
# sizes are also Biderman et al. 2023's table 1), written out so that nothing is downloaded
# ----------------------------------------------------------------------------------------------
def pythia(hidden: int, layers: int, heads: int, vocab: int) -> GPTNeoXConfig:
    """GPT-NeoX as Pythia configures it: MLP 4x wide, rotary on a quarter of each head, parallel residual,
    separate input and output embeddings."""
    return GPTNeoXConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                         intermediate_size=4 * hidden, vocab_size=vocab, rotary_pct=0.25, max_position_embeddings=2048,
                         use_parallel_residual=True, tie_word_embeddings=False)


MODELS = {  # name -> config, by parameter count
    # Qwen/Qwen2.5-0.5B (0.49B), the ultrafeedback preset's model: 14 query / 2 key-value heads, tied embeddings
    "Qwen2.5-0.5B": lambda: Qwen2Config(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                                        intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True),
    "Pythia-1B": lambda: pythia(2048, 16, 8, 50304),  # EleutherAI/pythia-1b (1.01B)
    "Pythia-2.8B": lambda: pythia(2560, 32, 32, 50304),  # EleutherAI/pythia-2.8b (2.78B)
    # meta-llama/Llama-2-7b-hf (6.74B): 32 heads, no grouped keys and values, SwiGLU MLP 11008 wide
    "Llama-2-7B": lambda: LlamaConfig(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                                      intermediate_size=11008, vocab_size=32000, rms_norm_eps=1e-5,
                                      tie_word_embeddings=False),
    "Pythia-6.9B": lambda: pythia(4096, 32, 32, 50432),  # EleutherAI/pythia-6.9b (6.86B; its vocabulary padded to 50432)
    # Qwen/Qwen2.5-7B (7.62B): 28 query / 4 key-value heads, SwiGLU MLP 18944 wide, untied 152064-token embeddings
    "Qwen2.5-7B": lambda: Qwen2Config(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                                      intermediate_size=18944, vocab_size=152064, tie_word_embeddings=False),
}
PRESETS = ("pythia-tldr", "hh-rlhf", "ultrafeedback")
# each preset's model, as its description names it
PRESET_MODELS = {"pythia-tldr": "Pythia-1B", "hh-rlhf": "Pythia-1B", "ultrafeedback": "Qwen2.5-0.5B"}
PRESET_RANKS = 8  # the presets' batch sizes assume 8 processes (README, "Going to real models")
REFERENCE_MODEL = "Pythia-6.9B"  # the 7B of the reference estimate, at the pythia-tldr settings (Huang et al. 2024 ran it)
REFERENCE_7B = {  # the seed's back-of-the-envelope estimate for a 7B PPO, GB
    "policy: weights + gradients + AdamW": "~42", "reference": "~14", "reward model": "~14",
    "critic: weights + gradients + AdamW": "~14", "gathered bf16 copy of the model in use": "",
    "activations + KV cache": "20-40", "total": "~100-120",
}
OPTIONS = {  # ppo.py's memory flags, as Args fields
    "none": {},
    "--frozen_dtype bfloat16": {"frozen_dtype": "bfloat16"},
    "--frozen_dtype int8": {"frozen_dtype": "int8"},
    "--gradient_checkpointing": {"gradient_checkpointing": True},
    "--offload_critic": {"offload_critic": True},
    "--lora_r 8": {"lora_r": 8},
    "all four": {"frozen_dtype": "int8", "offload_critic": True, "lora_r": 8, "gradient_checkpointing": True},
}
COMPONENTS = ("parameters", "gathered", "gradients", "optimizer state", "activations", "KV cache")


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
def start_fake_ranks(world_size: int):
    """N simulated ranks in this one process: a fake process group (collectives return at once, each rank's shard
    has its real size) and a mesh over it. The mesh is built before any fake tensor: building it reads values.
    One rank: no process group and no mesh (None), as common.setup_distributed on one process (WORLD_SIZE 1, also
    under torchrun --nproc_per_node=1): fsdp_wrap and ppo.unsharded are then no-ops."""
    stop_fake_ranks()
    if world_size == 1:
        return None
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    return init_device_mesh("cpu", (world_size,))


def stop_fake_ranks() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------
# The tracker: FSDP2's memory tracker over all four models, with the KV cache as a category of its own
# ----------------------------------------------------------------------------------------------
class KV(_RefType):
    """The tracker's category for the KV cache: torch's files it under activations."""
    CACHE = "KV Cache"


class PeakOnly:
    """What both trackers share: the overall peak, the KV cache category, the peak's components."""

    def _update_peak_stats(self, peak_state) -> None:
        """The overall peak only: the per-module peaks MemTracker also keeps (unused here) cost a quarter of the time."""
        for device, snapshot in self._curr_mem_snap.items():
            if snapshot["Total"] > self._peak_mem.get(device, 0):
                self._peak_mem[device], self._peak_mem_snap[device] = snapshot["Total"], dict(snapshot)

    filing_kv_cache = False  # set while the cache stores keys and values: what is allocated then is KV cache

    def mark_kv_cache(self, tensor: torch.Tensor) -> None:
        self._update_and_maybe_create_winfos(tensor, KV.CACHE)

    def _track(self, reftype, t: torch.Tensor) -> None:
        super()._track(KV.CACHE if self.filing_kv_cache else reftype, t)

    def peak(self) -> dict[str, int]:
        """The peak's bytes by component (one device: the stand-in GPU)."""
        (snapshot,) = self.get_tracker_snapshot("peak").values()
        R, M = _FSDPRefType, _MemRefType
        groups = {"parameters": (R.SHARDED_PARAM, R.BUFFER, M.PARAM, M.BUFFER), "gathered": (R.UNSHARDED_PARAM, R.ALL_GATHER),
                  "gradients": (R.SHARDED_GRAD, R.UNSHARDED_GRAD, R.REDUCE_SCATTER, M.GRAD), "optimizer state": (R.OPT, M.OPT),
                  "activations": (R.ACT, R.TEMP, R.INP, M.ACT, M.TEMP), "KV cache": (KV.CACHE,)}
        out = {name: sum(snapshot.get(c, 0) for c in set(kinds)) for name, kinds in groups.items()}
        return {**out, "peak": snapshot["Total"]}


def all_four(models: ppo.Models) -> list[nn.Module]:
    return [m for m in (models.policy, models.ref_policy, *models.reward.models, models.critic) if m is not None]


def new_tracker(models: ppo.Models):
    """FSDP2's tracker over sharded models; on one rank (no FSDP2) torch's plain one."""
    return PPOMemTracker(models) if fsdp_root(models.policy) is not None else WholeMemTracker(models)


class WholeMemTracker(PeakOnly, MemTracker):
    """torch's MemTracker for one process without FSDP2: the four models' whole weights, their gradients, AdamW's
    state, activations (and temporaries of the backward), and the KV cache."""

    def __init__(self, models: ppo.Models):
        super().__init__()
        self._ref_class = [*_MemRefType, KV.CACHE]
        self.track_external(*all_four(models), models.optimizer)

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
                self._param_to_grad_hook_handles[p] = (p.register_hook(self._file_gradient),
                                                       p.register_post_accumulate_grad_hook(lambda q: self._file_gradient(q.grad)))
        return out

    def _file_gradient(self, grad: torch.Tensor) -> None:  # a hook that returns nothing: the gradient unchanged
        self._update_and_maybe_create_winfos(grad, _MemRefType.GRAD)


class PPOMemTracker(PeakOnly, FSDPMemTracker):
    """torch's FSDPMemTracker, which files every tensor of an FSDP2 model and its optimizer under a category (shard,
    gathered weight, gradient, optimizer state, activation, ...) as it is made or freed, and keeps the snapshot of
    the peak. It takes one FSDP root; PPO has four models, so the root it walks becomes a list of them."""

    def __init__(self, models: ppo.Models):
        models_ = all_four(models)
        self._fsdp_roots = [fsdp_root(m) for m in models_ if fsdp_root(m) is not None]
        super().__init__(self._fsdp_roots[0], models.optimizer)
        self._root_mod = nn.ModuleList(models_)
        self._ref_class = [*_FSDPRefType, KV.CACHE]

    def _instrument_fsdp_module(self) -> None:
        super()._instrument_fsdp_module()
        for model in self._root_mod:  # an int8 model is not sharded: its whole weights are this rank's own
            if not isinstance(model, FSDPModule):
                for p in model.parameters():
                    self._update_and_maybe_create_winfos(p, _FSDPRefType.SHARDED_PARAM)
        # torch's tracker files a block's gathered weights as such when the block's forward starts; ppo.unsharded
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
# The models, as ppo.build_models builds them under torchrun on GPUs, from a config instead of a checkpoint
# ----------------------------------------------------------------------------------------------
def new_model(kind: str, config, dtype: str):
    """A model on the meta device (shapes only); `materialize` gives it storage, fake or real."""
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


def frozen(model, args: ppo.Args):
    """A frozen model in --frozen_dtype, as ppo.load_frozen makes it (its dtype chosen at new_model): int8 weights
    with --frozen_dtype int8, by ppo.quantize_int8 (torchao's weight-only int8, which quantises fake tensors too)."""
    if args.frozen_dtype == "int8":
        model = common.quantize_int8(model)
    return model.eval().requires_grad_(False)


def frozen_dtype(args: ppo.Args) -> str:
    return args.dtype if args.frozen_dtype in ("same", "int8") else args.frozen_dtype


def shard(model, mesh):
    """common.fsdp_wrap as it runs on GPUs: each transformer block, then the root, with bf16 all-gathers and fp32
    reduce-scatters. (fsdp_wrap picks that policy by device type, and here the device is the CPU stand-in.) One
    rank (no mesh): a no-op, the model whole in its own dtype."""
    if mesh is None:
        return model
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for block in common.transformer_blocks(model):
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


def shard_frozen(model, args: ppo.Args, mesh):
    """As ppo.shard_frozen: sharded, except an int8 model, which FSDP2 cannot split and every rank holds whole."""
    return model if model is None or args.frozen_dtype == "int8" else shard(model, mesh)


def build_models(make_config, args: ppo.Args, mesh, mode) -> ppo.Models:
    """Policy and reference from the SFT model, RM and critic from the RM (here: the same config), LoRA and gradient
    checkpointing as ppo.build_models applies them, every model sharded over `mesh` (None, one process: none is),
    one fused AdamW over what trains. `mode`: the FakeTensorMode the tensors are made under (a null context for
    real ones)."""
    if args.value_head_on_policy or args.reward_fn is not None or len(args.reward_model) > 1:
        raise SystemExit("the plan covers a separate critic and one reward model")
    policy = new_model("causal", make_config(), args.dtype)
    # with LoRA there is no reference: it is the policy with its adapter off
    ref_policy = None if args.lora_r else new_model("causal", make_config(), frozen_dtype(args))
    rm_classifier = new_model("classifier", make_config(), frozen_dtype(args))
    critic_classifier = new_model("classifier", make_config(), args.dtype)
    if args.lora_r:
        policy = common.with_lora(policy, args)
    if args.gradient_checkpointing:
        for m in (policy, critic_classifier):
            m.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    with mode:
        policy = materialize(policy)
        critic = ppo.ScalarModel(materialize(critic_classifier))
        ref_policy = frozen(materialize(ref_policy), args) if ref_policy is not None else None
        reward_model = ppo.ScalarModel(frozen(materialize(rm_classifier), args)).eval().requires_grad_(False)
        shard(policy.get_base_model() if args.lora_r else policy, mesh)  # LoRA: FSDP2's root is the HF model inside peft's
        critic = shard(critic, mesh)
        ref_policy, reward_model = shard_frozen(ref_policy, args, mesh), shard_frozen(reward_model, args, mesh)
        trainables = nn.ModuleDict({"policy": policy, "critic": critic})
        params = [p for p in trainables.parameters() if p.requires_grad]  # LoRA: the adapters only
        optimizer = torch.optim.AdamW(params, lr=args.learning_rate, eps=args.adam_eps, weight_decay=args.weight_decay,
                                      fused=True)
    reward = ppo.Reward(models=[reward_model], fn=None, retokenize=None)
    return ppo.Models(policy=policy, ref_policy=ref_policy, reward=reward, critic=critic, value_head=None,
                      trainables=trainables, optimizer=optimizer, policy_train=policy, critic_train=critic)


def model_bytes(models: ppo.Models) -> dict[str, dict[str, int]]:
    """One rank's resident bytes of each model: its weights (shards, or a whole int8 model), and for the trained ones
    the fp32 gradient shards (held from a minibatch's first backward to its optimizer step) and AdamW's state."""
    out = {}
    for name, model in (("policy", models.policy), ("reference", models.ref_policy),
                        ("reward model", models.reward.models[0]), ("critic", models.critic)):
        if model is None:
            continue
        trained = [p for p in model.parameters() if p.requires_grad]
        state = [v for p in trained for v in models.optimizer.state.get(p, {}).values() if torch.is_tensor(v)]
        out[name] = {"parameters": storage_bytes([*model.parameters(), *model.buffers()]),
                     "gradients": storage_bytes(trained),  # same shards, same fp32
                     "optimizer state": storage_bytes(state)}
    return out


# ----------------------------------------------------------------------------------------------
# The phases of one PPO update on one rank, each as ppo.main runs it
# ----------------------------------------------------------------------------------------------
@dataclass
class Sizes:
    """One rank's batch shapes, derived from the flags as ppo.set_up derives them."""
    prompt: int  # max_prompt_length: the longest prompt sets the padded width
    response: int  # response_length: a batch generates until its longest response ends
    local: int  # batch_size // N: the prompts (times samples_per_prompt) ppo.generate samples at once
    rollout: int  # sequences scored per no-grad forward (local_rollout_forward_batch_size)
    micro: int  # sequences per training forward/backward
    accumulation: int  # micro-batches per optimizer step


def sizes_of(args: ppo.Args, ranks: int) -> Sizes:
    local_batch = args.batch_size // ranks
    minibatch = local_batch // args.num_minibatches
    micro = args.micro_batch_size or minibatch
    return Sizes(args.max_prompt_length, args.response_length, local_batch,
                 min(args.local_rollout_forward_batch_size, local_batch), micro, minibatch // micro)


def sequences(batch: int, length: int, vocab: int):
    """(B, S) token ids and an attention mask: only their shapes matter."""
    return torch.randint(0, vocab, (batch, length)), torch.ones(batch, length, dtype=torch.long)


def generate_phase(models: ppo.Models, args: ppo.Args, sizes: Sizes, tracker: PeakOnly | None) -> None:
    """ppo.generate: the policy gathered whole, and HF's generate over the rank's whole batch at once (ppo.main
    samples all batch_size // N prompts in one call). Fake tensors cannot sample, so its loop is played by its two
    largest steps: the prefill (one forward over the prompts, filling the KV cache, the logits of the last position
    and the distribution the first token is drawn from), and the last token's step, with the cache grown to
    prompt + response (HF's DynamicCache grows by concatenation, one step at a time; here in one)."""
    policy = models.policy
    policy.eval()  # as ppo.generate: with gradient checkpointing, training mode would switch the cache off
    vocab, (B, P, T) = policy.config.vocab_size, (sizes.local, sizes.prompt, sizes.response)
    ids, mask = sequences(B, P + T, vocab)
    cache = TrackedCache(tracker, policy.config)
    with torch.no_grad(), common.unsharded(policy):
        out = policy(input_ids=ids[:, :P], attention_mask=mask[:, :P], position_ids=ppo.position_ids_from(mask[:, :P]),
                     past_key_values=cache, use_cache=True, logits_to_keep=1)  # the prefill
        torch.softmax(out.logits[:, -1].float() / args.temperature, -1)  # (B, V)
        del out
        for i, layer in enumerate(cache.layers):  # the cache after T - 1 more tokens
            grown = layer.keys.new_zeros(B, layer.keys.shape[1], T - 1, layer.keys.shape[3])
            cache.update(grown, grown, i)
            del grown
        out = policy(input_ids=ids[:, -1:], attention_mask=mask, position_ids=torch.full((B, 1), P + T - 1),
                     past_key_values=cache, use_cache=True, logits_to_keep=1)  # the last token's step
        torch.softmax(out.logits[:, -1].float() / args.temperature, -1)


def score_phase(models: ppo.Models, args: ppo.Args, sizes: Sizes, tracker: PeakOnly | None) -> None:
    """ppo.main's scoring: the reference's logprobs, the RM's scores, the rollout's own logprobs and values."""
    query_responses, mask = sequences(sizes.rollout, sizes.prompt + sizes.response, models.policy.config.vocab_size)
    responses = query_responses[:, sizes.prompt:]
    response_mask = torch.ones_like(responses, dtype=torch.bool)
    with torch.no_grad():
        ppo.reference_logprobs(models, args, query_responses, mask, responses)
        ppo.reward_scores(models.reward, None, query_responses, mask, response_mask, context_length=sizes.prompt,
                          has_eos=response_mask[:, -1], batch_size=args.local_rollout_forward_batch_size)
        ppo.old_logprobs_and_values(models, args, query_responses, mask, responses, reuse=False)


def train_phase(models: ppo.Models, args: ppo.Args, sizes: Sizes, tracker: PeakOnly | None) -> None:
    """ppo.main's PPO step on the last micro-batch of a minibatch (after the critic warm-up): ppo.micro_batch_backward
    itself, the forward, loss, backward and logged statistics of ppo.py, then the optimizer step."""
    query_responses, mask = sequences(sizes.micro, sizes.prompt + sizes.response, models.policy.config.vocab_size)
    responses = query_responses[:, sizes.prompt:]
    zeros = [torch.zeros(sizes.micro, sizes.response) for _ in range(5)]
    rollout = ppo.Rollout(query_responses, mask, responses, torch.ones_like(responses, dtype=torch.bool), *zeros)
    ppo.micro_batch_backward(models, args, rollout, torch.arange(sizes.micro), args.kl_coef, policy_moves=True,
                             accumulation_steps=sizes.accumulation)
    optimizer_step(models, args)


def optimizer_step(models: ppo.Models, args: ppo.Args) -> None:
    """As ppo.main ends a minibatch: ppo.clip_grad_norm_or_stop's clip, AdamW, gradients freed."""
    params = models.optimizer.param_groups[0]["params"]
    torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm or float("inf"))
    models.optimizer.step()
    models.optimizer.zero_grad(set_to_none=True)


def leave_gradients(models: ppo.Models) -> None:
    """The gradient shards the earlier micro-batches of a minibatch leave for the last one to add to."""
    for p in models.optimizer.param_groups[0]["params"]:
        p.grad = torch.zeros_like(p)


def reach_steady_state(models: ppo.Models, args: ppo.Args) -> None:
    """One optimizer step on zero gradients before anything is measured: it creates AdamW's moments, as the first
    update does, and fills DTensor's cache of sharding rules, whose first use of an op makes full-size fake tensors
    (its shape propagation) that no GPU allocates."""
    leave_gradients(models)
    optimizer_step(models, args)


PHASES = {"generate": generate_phase, "score": score_phase, "train": train_phase}


def run_phases(models: ppo.Models, args: ppo.Args, sizes: Sizes, tracked: bool = True) -> dict:
    """generate, score and train in ppo.main's order. Tracked (on fake tensors): each phase under a tracker of its
    own, -> {phase: its peak's components}. Untracked (a real run): each phase in a profiler range of its name."""
    if args.reuse_first_forward and args.num_minibatches == 1 and sizes.accumulation == 1:
        # ppo.main's reuse condition: old_logprobs_and_values would then run PPO's first forward, with gradients, over
        # the whole local batch, and keep its graph into the update. No preset meets it (4-64 micro-batches per update)
        raise SystemExit("the plan covers updates of several micro-batches, not ppo.py's reuse_first_forward path")
    peaks = {}
    for name, phase in PHASES.items():
        if name == "train" and sizes.accumulation > 1:
            leave_gradients(models)
        gc.collect()
        if tracked:
            tracker = new_tracker(models)
            with tracker:
                phase(models, args, sizes, tracker)
            peaks[name] = tracker.peak()
        else:
            with record_function(f"memory_plan:{name}"):
                phase(models, args, sizes, None)
    return peaks


# ----------------------------------------------------------------------------------------------
# One plan: a model, a preset's settings, a memory option, N ranks
# ----------------------------------------------------------------------------------------------
# the flags build_models reads: runs that share them can share one build
MODEL_FIELDS = ("dtype", "frozen_dtype", "lora_r", "lora_alpha", "lora_target_modules", "gradient_checkpointing")


def preset_args(preset: str, option: str) -> ppo.Args:
    return dataclasses.replace(ppo.parse_args([preset]), **OPTIONS[option])


def plan(model: str, presets: list[str], option: str, ranks: int) -> list[dict]:
    """One rank's per-phase peaks and their components, in bytes, at each preset's settings."""
    runs = [preset_args(p, option) for p in presets]
    return [{"model": model, "preset": p, "option": option, "ranks": ranks, **r}
            for p, r in zip(presets, plan_runs(MODELS[model], runs, ranks))]


def plan_runs(make_config, runs: list[ppo.Args], ranks: int, offload: bool = True) -> list[dict]:
    """Plans of settings that differ only in batch and lengths, on one build of the models (their options, the
    first run's, are the same). `offload`: apply --offload_critic (a real CPU run cannot)."""
    if any(getattr(args, f) != getattr(runs[0], f) for args in runs for f in MODEL_FIELDS):
        raise ValueError(f"plan_runs: the runs must share {', '.join(MODEL_FIELDS)}")
    mesh = start_fake_ranks(ranks)
    mode = FakeTensorMode(allow_non_fake_inputs=True)  # the models' meta tensors go in once, to be materialized
    models = build_models(make_config, runs[0], mesh, mode)
    out = []
    with mode:
        reach_steady_state(models, runs[0])
        resident = model_bytes(models)
        for args in runs:
            sizes = sizes_of(args, ranks)
            phases = run_phases(models, args, sizes)
            if offload and args.offload_critic and models.critic is not None:
                offload_critic(phases["generate"], resident["critic"])
            out.append({"sizes": dataclasses.asdict(sizes), "models": resident, "phases": phases,
                        "peak": max(p["peak"] for p in phases.values())})
    stop_fake_ranks()
    return out


def offload_critic(generate: dict, critic: dict) -> None:
    """ppo.place_critic: the critic's shards and AdamW state wait on the CPU while the policy generates."""
    for part in ("parameters", "optimizer state"):
        generate[part] -= critic[part]
        generate["peak"] -= critic[part]


@functools.cache
def parameter_count(model: str) -> int:
    """Parameters of the bare transformer (no LM head, no score head), counted on the meta device."""
    with torch.device("meta"):
        return sum(p.numel() for p in AutoModel.from_config(MODELS[model]()).parameters())


def resident_lower_bound(model: str, preset: str, option: str, ranks: int) -> float:
    """Bytes of weights, gradients and AdamW state one rank holds at least, from the bare transformer's parameters
    (each of the four models has more): for a model trained in full, 4 of them per parameter in --dtype (weights,
    gradients, two moments); for the LoRA policy's frozen base, 1; for a frozen model, 1 in --frozen_dtype. FSDP2
    divides all but an int8 model by the ranks."""
    args = preset_args(preset, option)
    size = torch.finfo(common.DTYPES[args.dtype]).bits // 8
    frozen_size = {"same": size, "float16": 2, "bfloat16": 2, "int8": 1}[args.frozen_dtype]
    sharded = 4 * size + (size if args.lora_r else 4 * size)  # critic, policy
    frozen = frozen_size * (1 if args.lora_r else 2)  # RM, reference (none with LoRA: the policy, adapter off)
    return parameter_count(model) * (sharded / ranks + frozen / (1 if args.frozen_dtype == "int8" else ranks))


def largest_fits(option: str, budget: float) -> list[dict]:
    """For each preset, the largest model whose one-GPU plan at its settings fits in `budget` bytes, trying the
    largest first: each model is built once for the presets still looking. A model whose weights, gradients and
    AdamW state alone exceed the budget is ruled out without a plan."""
    found = {p: {"option": option, "preset": p, "fits": None, "tried": []} for p in PRESETS}
    for model in reversed(list(MODELS)):
        looking = [p for p in PRESETS if found[p]["fits"] is None]
        for p in list(looking):
            bound = resident_lower_bound(model, p, option, 1)
            if bound > budget:
                found[p]["tried"].append({"model": model, "resident_at_least": bound})
                looking.remove(p)
        for result in plan(model, looking, option, 1) if looking else []:
            f = found[result["preset"]]
            f["tried"].append({"model": model, "peak": result["peak"]})
            if result["peak"] <= budget:
                f["fits"], f["plan"] = model, result
    return list(found.values())


def run_task(task: tuple) -> list[dict]:
    """One unit of work for a worker process: ("plan", model, presets, option, ranks) or ("fit", option, budget)."""
    kind, *rest = task
    return plan(*rest) if kind == "plan" else largest_fits(*rest)


# ----------------------------------------------------------------------------------------------
# --validate: the same phases on real tensors, measured by the CPU allocator
# ----------------------------------------------------------------------------------------------
# (ranks, option): one process without FSDP2, and FSDP2 over 2 ranks without and with all four options (torchao
# int8, LoRA, gradient checkpointing; offloading is arithmetic)
VALIDATE_CASES = ((1, "none"), (2, "none"), (2, "all four"))


def validate_config() -> GPTNeoXConfig:
    return pythia(128, 2, 4, 512)


def validate_args(option: str) -> ppo.Args:
    """Small shapes, with several micro-batches per update as in the presets."""
    return dataclasses.replace(ppo.Args(), batch_size=32, max_prompt_length=48, response_length=16,
                               local_rollout_forward_batch_size=8, micro_batch_size=4, **OPTIONS[option])


def measured_peaks(option: str, ranks: int) -> dict[str, int]:
    """The real peak of each phase: the bytes the CPU allocator holds, from its own running count of live bytes,
    which torch.profiler(profile_memory=True) reports with every allocation. It sees every allocation, tensor or
    not, made anywhere below the dispatcher, and shares nothing with the tracker's bookkeeping, so it is an
    independent measurement. It counts only what is allocated while the profiler runs, so the profiler starts
    before the models are built."""
    args = validate_args(option)
    mesh = start_fake_ranks(ranks)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        models = build_models(validate_config, args, mesh, contextlib.nullcontext())
        reach_steady_state(models, args)
        run_phases(models, args, sizes_of(args, ranks), tracked=False)
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


def validation() -> list[dict]:
    """Planned and measured peak of each phase, for each of VALIDATE_CASES."""
    rows = []
    for ranks, option in VALIDATE_CASES:
        planned = plan_runs(validate_config, [validate_args(option)], ranks, offload=False)[0]["phases"]
        measured = measured_peaks(option, ranks)
        rows += [{"ranks": ranks, "option": option, "phase": name, "planned": planned[name]["peak"], "measured": measured[name],
                  "ratio": planned[name]["peak"] / measured[name]} for name in PHASES]
    return rows


def worst(rows: list[dict]) -> dict:
    return max(rows, key=lambda r: abs(r["ratio"] - 1))


def validate() -> None:
    start = time.time()
    rows = validation()
    config = validate_config()
    print(f"{config.num_hidden_layers} x {config.hidden_size} GPT-NeoX; planned: fake tensors and torch's memory trackers; "
          "measured: real tensors, the CPU allocator's live bytes (torch.profiler)")
    for r in rows:
        print(f"N={r['ranks']} {r['option']:>8} {r['phase']:>8}: planned {r['planned'] / 2**20:6.2f} MiB, measured "
              f"{r['measured'] / 2**20:6.2f} MiB, ratio {r['ratio']:.3f}")
    w = worst(rows)
    print(f"validate: worst planned/measured {w['ratio']:.3f} (N={w['ranks']}, {w['option']}, {w['phase']}); "
          f"{time.time() - start:.0f} s")
    if abs(w["ratio"] - 1) > 0.10:
        raise SystemExit(f"memory_plan --validate: the plan is off by {w['ratio'] - 1:+.0%} (N={w['ranks']}, "
                         f"{w['option']}, {w['phase']} phase), more than 10%")


# ----------------------------------------------------------------------------------------------
# Reports
# ----------------------------------------------------------------------------------------------
def gb(x: float | None) -> str:
    return "" if x is None else f"{x / GB:.1f}"


def reference_rows(r: dict) -> dict[str, float]:
    """A plan in the rows of the reference estimate: each model's resident bytes, then the phases' highest gathered
    copy, activations and KV cache, and peak (the rows' phases differ, so the total is not their sum)."""
    m, phases = r["models"], r["phases"].values()
    return {"policy: weights + gradients + AdamW": sum(m["policy"].values()),
            "reference": m["reference"]["parameters"], "reward model": m["reward model"]["parameters"],
            "critic: weights + gradients + AdamW": sum(m["critic"].values()),
            "gathered bf16 copy of the model in use": max(p["gathered"] for p in phases),
            "activations + KV cache": max(p["activations"] + p["KV cache"] for p in phases),
            "total": r["peak"]}


def reference_table(plans: dict[str, dict]) -> str:
    """The seed's 7B estimate next to the plans, component by component."""
    ours = {label: reference_rows(r) for label, r in plans.items()}
    lines = [f"| {REFERENCE_MODEL}, pythia-tldr settings, GB per GPU | reference estimate | " + " | ".join(ours) + " |",
             "|---" * (len(ours) + 2) + "|"]
    lines += [f"| {name} | {ref or '-'} | " + " | ".join(gb(rows[name]) for rows in ours.values()) + " |"
              for name, ref in REFERENCE_7B.items()]
    return "\n".join(lines)


def phases_table(results: list[dict]) -> str:
    lines = ["| preset | model | phase | " + " | ".join(COMPONENTS) + " | peak |", "|---" * (len(COMPONENTS) + 4) + "|"]
    for r in results:
        for name, p in r["phases"].items():
            cells = " | ".join(gb(p[c]) for c in COMPONENTS)
            peak = f"**{gb(p['peak'])}**" if p["peak"] == r["peak"] else gb(p["peak"])
            lines.append(f"| {r['preset']} | {r['model']} | {name} | {cells} | {peak} |")
    return "\n".join(lines)


def fits_table(fits: list[dict], budget: float) -> str:
    cells = {(f["option"], f["preset"]): f for f in fits}
    lines = ["| option | " + " | ".join(PRESETS) + " |", "|---" * (len(PRESETS) + 1) + "|"]
    for option in OPTIONS:
        row = []
        for preset in PRESETS:
            f = cells[(option, preset)]
            row.append(f"{f['fits']} ({gb(f['plan']['peak'])})" if f["fits"] else f"none under {gb(budget)} GB")
        lines.append(f"| {option} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def validation_table(rows: list[dict]) -> str:
    cases = list(dict.fromkeys((r["ranks"], r["option"]) for r in rows))
    ratios = {(r["ranks"], r["option"], r["phase"]): r["ratio"] for r in rows}
    lines = ["| planned / measured | " + " | ".join(f"N = {n}, {o}" for n, o in cases) + " |", "|---" * (len(cases) + 1) + "|"]
    lines += [f"| {phase} | " + " | ".join(f"{ratios[(n, o, phase)]:.3f}" for n, o in cases) + " |" for phase in PHASES]
    return "\n".join(lines)


def markdown(report: dict) -> str:
    budget = report["gpu_gb"] * GB
    sizes = {p: sizes_of(ppo.parse_args([p]), 1) for p in PRESETS}
    config = validate_config()
    return "\n\n".join([
        f"`python results/memory_plan.py` (this run: {report['wall_time_s'] / 60:.0f} minutes with --workers "
        f"{report['workers']} on 2 shared cores; `--validate` alone: 20 s). Simulated, not "
        "measured: ppo.py's phases run on fake tensors and PyTorch's memory trackers add up every tensor's bytes. "
        "Not counted: memory the CUDA caching allocator keeps cached or loses to fragmentation, the CUDA context, "
        "NCCL's buffers. GB = 1e9 bytes, per GPU. N > 1: FSDP2, fp32 weights, bf16 compute; N = 1: no FSDP2, "
        "everything in --dtype (fp32).",
        reference_table(report["reference_7b"]),
        f"Each preset at its own settings on {PRESET_RANKS} GPUs (parameters: the rank's resident weights; gathered: "
        "the bf16 copy FSDP2 all-gathers of the model in use; the peak phase in bold):",
        phases_table(report["presets"]),
        f"The largest model whose plan fits one {report['gpu_gb']:.0f} GB GPU ({report['gpu_gb']:.0f}e9 bytes of tensors; "
        "an 80 GiB card keeps 5.9 GB more for what is not counted), at each preset's settings on one GPU (prompt + "
        "response, prompts generated at once, rollout forward batch, micro-batch: "
        + "; ".join(f"{p} {s.prompt} + {s.response}, {s.local}, {s.rollout}, {s.micro}" for p, s in sizes.items())
        + "), with its peak in GB:",
        fits_table(report["fits"], budget),
        f"Validation (`--validate`): a {config.num_hidden_layers} x {config.hidden_size} GPT-NeoX run for real on the "
        "CPU, its plan against the bytes the CPU allocator held (torch.profiler), each phase's peak:",
        validation_table(report["validate"]),
        "Notes:\n"
        "- one GPU: ppo.py runs without FSDP2, in --dtype (common.setup_distributed starts no process group with "
        "WORLD_SIZE 1, torchrun --nproc_per_node=1 included): all four models whole, fp32 by default, no gathered "
        "copy, fp32 activations and KV cache.\n"
        "- generation: ppo.generate samples the rank's whole batch (batch_size // N) in one call, so the KV cache and "
        "the prefill's activations grow with it; on one GPU that is the whole batch. Scoring runs in chunks of "
        "local_rollout_forward_batch_size, without gradients: ppo.py reuses PPO's first forward (with gradients, over "
        "the whole local batch) only when an update is one micro-batch, and every preset accumulates 4-64.\n"
        "- --frozen_dtype int8 keeps the reference and the RM whole on every rank (ppo.shard_frozen: FSDP2 cannot "
        "split torchao's int8 tensors), computing in --dtype (fp32): on 8 GPUs bf16 shards are smaller.\n"
        "- --offload_critic frees the critic's weights and AdamW state during generation only, so it lowers the "
        "peak only where generation peaks.\n"
        "- the reference estimate's policy and critic are smaller because ppo.py trains both in full with fp32 "
        "weights, gradients and AdamW moments (16 bytes per parameter), and its frozen models stay fp32 unless "
        "--frozen_dtype says otherwise.",
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
    start, budget = time.time(), args.gpu_gb * GB
    reference = {"plan, 1 GPU": ("none", 1), "plan, 8 GPUs": ("none", 8),
                 "plan, 8 GPUs, --gradient_checkpointing": ("--gradient_checkpointing", 8)}
    tasks = [("plan", REFERENCE_MODEL, ["pythia-tldr"], option, ranks) for option, ranks in reference.values()]
    tasks += [("fit", option, budget) for option in OPTIONS]
    tasks += [("plan", model, [p for p in PRESETS if PRESET_MODELS[p] == model], "none", PRESET_RANKS)
              for model in dict.fromkeys(PRESET_MODELS.values())]
    with ProcessPoolExecutor(args.workers, mp_context=get_context("spawn")) as pool:
        results = [r for rs in pool.map(run_task, tasks) for r in rs]
    checked = validation()
    n_ref, n_fits = len(reference), len(OPTIONS) * len(PRESETS)
    report = {"about": "simulated per-GPU bytes (python results/memory_plan.py); not counted: the CUDA caching "
                       "allocator's cached and fragmented memory, the CUDA context, NCCL buffers",
              "gpu_gb": args.gpu_gb, "reference_7b": dict(zip(reference, results[:n_ref])),
              "fits": results[n_ref:n_ref + n_fits], "presets": results[n_ref + n_fits:],
              "validate": checked, "workers": args.workers, "wall_time_s": time.time() - start}
    body = markdown(report)
    print(body)
    if args.write:
        with open(os.path.join(HERE, "memory_plan.json"), "w") as f:
            json.dump(report, f, indent=1)
        write_block(body)
    print(f"{time.time() - start:.0f} s")


if __name__ == "__main__":
    main(tyro.cli(Args, use_underscores=True))
