"""results/memory_plan.py's own checks: its plan agrees with the bytes a real run of a small model holds
(--validate); the fake-tensor accounting has the structure FSDP2, int8 shards and the KV cache give it; a deep model
planned from shallow ones equals its whole plan; and the search for the options that fit. Fake tensors cost Python
per op, so the larger plans are made in conftest's worker process, in the background, while the other tests run;
the tests here check what they return."""

import dataclasses
import os
import sys

import pytest
from torch._subclasses.fake_tensor import FakeTensorMode

from conftest import ROOT, in_the_worker, one_thread

sys.path.insert(0, os.path.join(ROOT, "results"))

import memory_plan  # noqa: E402
import ppo  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing"),  # peft asks a deprecated name
              pytest.mark.filterwarnings("ignore:.*returned a view tensor")]  # FSDP2 on logits, used out of place


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():  # the other core is the background's
        yield


def background_runs() -> dict:
    """The larger plans and measurements this module checks, made by the functions below in conftest's worker
    process (the two smallest are made in the test process, which the background work would otherwise outlast)."""
    return {name: in_the_worker(function) for name, function in (
        ("validation", validated_cases), ("extrapolation", whole_and_extrapolated_plans),
        ("shards_and_kv_cache", shard_and_kv_cache_plans))}


# ----------------------------------------------------------------------------------------------
# --validate: the plan against a real run
# ----------------------------------------------------------------------------------------------
VALIDATED = {("ppo", 1, "bf16, chunks"), ("ppo", 2, "int8, LoRA, ckpt")}


def validated_cases() -> list[dict]:
    try:
        return memory_plan.validation([c for c in memory_plan.VALIDATE_CASES if (c[0], c[1], c[2]) in VALIDATED])
    finally:
        memory_plan.stop_fake_ranks()


def test_validate_agrees_with_a_real_run(background_runs):
    """What `--validate` checks, on two of its cases (all seven: `python results/memory_plan.py --validate`): every
    phase's planned peak within 5% of the bytes the CPU allocator held in a real run of a small model, with the
    model's own generate: one GPU in bf16 (FSDP2 over a group of one) with the rollout generated in chunks, and two
    ranks with int8 frozen models sharded, LoRA and gradient checkpointing."""
    rows = background_runs["validation"].result()
    assert len(rows) == len(memory_plan.PHASES) * len(VALIDATED)
    assert all(abs(r["ratio"] - 1) <= memory_plan.VALIDATE_TOLERANCE for r in rows), rows


# ----------------------------------------------------------------------------------------------
# Depth: a deep model's plan from 3 and 4 layers
# ----------------------------------------------------------------------------------------------
def small(layers: int):
    return memory_plan.Configs(memory_plan.pythia(64, layers, 4, 256), [memory_plan.pythia(64, layers, 4, 256)])


def whole_and_extrapolated_plans() -> tuple[dict, dict]:
    args = dataclasses.replace(ppo.Args(), batch_size=64, max_prompt_length=24, response_length=8, micro_batch_size=4,
                               local_rollout_forward_batch_size=8, generation_batch_size=8)
    return memory_plan.settled(memory_plan.plan_runs(ppo, small(5), [args], 8)[0]), memory_plan.plan(ppo, small(5),
                                                                                                     args, 8)


def test_extrapolated_plan_equals_the_whole_plan(background_runs):
    """A deep model is planned with 3 and 4 layers and each step extrapolated: for 5 layers on 8 GPUs it equals the
    plan of all 5 (results/README.md: the same for Pythia-1B and Pythia-6.9B at full depth, on 1 and 8 GPUs)."""
    whole, extrapolated = background_runs["extrapolation"].result()
    for phase in memory_plan.PHASES:
        assert extrapolated["phases"][phase]["peak"] == pytest.approx(whole["phases"][phase]["peak"], rel=1e-3), phase


# ----------------------------------------------------------------------------------------------
# Shards, int8 and the KV cache
# ----------------------------------------------------------------------------------------------
LAYERS, HIDDEN, HEADS, KV_HEADS = 2, 256, 8, 2


def small_qwen2():
    """A small model with grouped keys and values, whose KV cache is smaller than its query heads would make it."""
    config = memory_plan.Qwen2Config(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                     num_key_value_heads=KV_HEADS, intermediate_size=512, vocab_size=1024)
    return memory_plan.Configs(config, [config])


def shard_and_kv_cache_plans() -> dict:
    """Plans of 512 sequences of 4 + 60 tokens: one rank in fp32, one in bf16, 8 ranks whole and in chunks of 16
    (one build: the chunks change no model flag)."""
    args = dataclasses.replace(ppo.Args(), batch_size=512, max_prompt_length=4, response_length=60,
                               local_rollout_forward_batch_size=8, micro_batch_size=4)
    try:
        (one,) = memory_plan.plan_runs(ppo, small_qwen2(), [dataclasses.replace(args, mixed_precision="none")], 1)
        (one_bf16,) = memory_plan.plan_runs(ppo, small_qwen2(), [args], 1)
        eight, chunks = memory_plan.plan_runs(ppo, small_qwen2(),
                                              [args, dataclasses.replace(args, generation_batch_size=16)], 8)
    finally:
        memory_plan.stop_fake_ranks()
    return {"one": one, "one_bf16": one_bf16, "eight": eight, "chunks": chunks}


def test_shards_and_kv_cache(background_runs):
    """On fake tensors: 8 ranks hold an eighth of one rank's weights, gradients and AdamW state; one rank without
    mixed precision runs without FSDP2 (no gathered copy), and with it FSDP2 over a group of one gathers a bf16 copy;
    the generate phase's KV cache is keys and values of every layer, for prompt + response of every sequence the
    rank generates at once (--generation_batch_size, else batch_size // N), in the compute dtype: fp32 (--dtype) on
    one rank without mixed precision, bf16 with it."""
    plans = background_runs["shards_and_kv_cache"].result()
    one, one_bf16, eight, chunks = (plans[k] for k in ("one", "one_bf16", "eight", "chunks"))
    for model in ("policy", "critic", "reference", "reward model"):
        for part, n in one["models"][model].items():
            assert eight["models"][model][part] == pytest.approx(n / 8, rel=0.02), (model, part)
    policy = one["models"]["policy"]
    assert policy["optimizer state"] == pytest.approx(2 * policy["gradients"], rel=1e-3)  # AdamW's two fp32 moments
    assert all(p["gathered"] == 0 for p in one["phases"].values())
    assert all(p["gathered"] > 0 for p in (*one_bf16["phases"].values(), *eight["phases"].values()))
    # at its largest (the last token's step) the cache is whole, and the one layer's keys or values that HF's
    # DynamicCache is growing by concatenation are there twice: the old tensor and the new
    per_token = 2 * LAYERS * KV_HEADS * (HIDDEN // HEADS)  # keys and values of every layer
    for plan, sequences, size in ((one, 512, 4), (one_bf16, 512, 2), (eight, 64, 2), (chunks, 16, 2)):
        full = per_token * sequences * (4 + 60) * size
        cache = max(step["KV cache"] for step in plan["phases"]["generate"]["steps"].values())
        assert full <= cache <= full * (1 + 1 / (2 * LAYERS))
    for plan in (one, eight):
        assert all(p["KV cache"] == 0 for name, p in plan["phases"].items() if name != "generate")


def int8_and_bf16_plans() -> dict:
    """The int8 frozen models' bytes on 1 and 4 ranks, and the plans on 4 ranks with int8 and with bf16 frozen
    models."""
    args = dataclasses.replace(ppo.Args(), batch_size=32, max_prompt_length=24, response_length=8,
                               local_rollout_forward_batch_size=8, micro_batch_size=4)
    int8 = dataclasses.replace(args, frozen_dtype="int8")
    try:
        one, four = (memory_plan.model_bytes(memory_plan.build_models(ppo, small(2), int8,
                                                                      memory_plan.start_fake_ranks(n),
                                                                      FakeTensorMode(allow_non_fake_inputs=True)))
                     for n in (1, 4))
        memory_plan.stop_fake_ranks()
        plans = {d: memory_plan.plan_runs(ppo, small(2), [dataclasses.replace(args, frozen_dtype=d)], 4)[0]
                 for d in ("int8", "bfloat16")}
    finally:
        memory_plan.stop_fake_ranks()
    return {"bytes on 1": one, "bytes on 4": four, **plans}


def test_int8_frozen_models_are_sharded_and_no_larger_than_bf16_shards():
    """Under FSDP2 an int8 reference and RM are sharded like the other models (4 ranks: a quarter of one GPU's
    bytes each) and gathered as int8, so every phase holds no more than with bf16 shards."""
    plans = int8_and_bf16_plans()
    for model in ("reference", "reward model"):
        assert plans["bytes on 4"][model]["parameters"] == pytest.approx(plans["bytes on 1"][model]["parameters"] / 4,
                                                                         rel=0.05)
    for phase in memory_plan.PHASES:
        assert plans["int8"]["phases"][phase]["peak"] <= plans["bfloat16"]["phases"][phase]["peak"], phase


# ----------------------------------------------------------------------------------------------
# The options that fit
# ----------------------------------------------------------------------------------------------
BUDGET = 75e6  # planned: 257 MB as it is, 134 MB with LoRA, 71 MB with the value head in place of the critic


def options_for_a_small_gpu() -> tuple[dict | None, list[str]]:
    """fitting_options for a model whose 50k-token embeddings hold most of its weights, on a GPU of BUDGET bytes."""
    args = dataclasses.replace(ppo.Args(), batch_size=32, max_prompt_length=24, response_length=8,
                               local_rollout_forward_batch_size=8, micro_batch_size=4)
    configs = memory_plan.Configs(memory_plan.pythia(64, 2, 4, 50000), [memory_plan.pythia(64, 2, 4, 50000)])
    try:
        return memory_plan.fitting_options(ppo, configs, args, 1, BUDGET)
    finally:
        memory_plan.stop_fake_ranks()


def test_plan_memory_names_the_options_that_fit():
    """A run that does not fit gets the memory options, added one after another until it fits; a step whose
    weights, gradients and AdamW state alone exceed the GPU is ruled out without a plan (here: every step before
    LoRA, on a model whose 50k-token embeddings hold most of its weights)."""
    found, lines = options_for_a_small_gpu()
    assert found is not None and found["plan"]["peak"] <= BUDGET, lines
    steps = ["--generation_batch_size", "--frozen_dtype", "--gradient_checkpointing", "--offload_critic", "--lora_r",
             "--value_head_on_policy"]
    assert [ln.split()[1] for ln in lines[:-1]] == steps, lines
    assert all("alone hold over" in ln for ln in lines[:4]) and "alone hold over" not in lines[4]
    assert lines[-1] == f"fits one {BUDGET / 1e9:g} GB GPU with: " + " ".join(found["flags"])
    assert "--offload_critic" not in found["flags"]  # no critic left to move
