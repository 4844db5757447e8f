"""results/memory_plan.py: its plan agrees with the bytes a real run of a small model holds (--validate), and the
fake-tensor accounting has the structure FSDP2 and the KV cache give it."""

import dataclasses
import os
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "results"))

import memory_plan  # noqa: E402
import ppo  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing"),  # peft asks a deprecated name
              pytest.mark.filterwarnings("ignore:.*returned a view tensor")]  # FSDP2 on logits, used out of place


def test_validate_agrees_with_a_real_run():
    """What `--validate` checks, on two of its cases (all seven: `python results/memory_plan.py --validate`): every
    phase's planned peak within 5% of the bytes the CPU allocator held in a real run of a small model, with the
    model's own generate: one GPU in bf16 (FSDP2 over a group of one) with the rollout generated in chunks, and two
    ranks with int8 frozen models sharded, LoRA and gradient checkpointing."""
    cases = [c for c in memory_plan.VALIDATE_CASES if (c[0], c[1], c[2]) in
             {("ppo", 1, "bf16, chunks"), ("ppo", 2, "int8, LoRA, ckpt")}]
    try:
        rows = memory_plan.validation(cases)
    finally:
        memory_plan.stop_fake_ranks()
    assert len(rows) == len(memory_plan.PHASES) * 2
    assert all(abs(r["ratio"] - 1) <= memory_plan.VALIDATE_TOLERANCE for r in rows), rows


LAYERS, HIDDEN, HEADS, KV_HEADS = 2, 256, 8, 2


def small_qwen2():
    """A small model with grouped keys and values, whose KV cache is smaller than its query heads would make it."""
    config = memory_plan.Qwen2Config(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                     num_key_value_heads=KV_HEADS, intermediate_size=512, vocab_size=1024)
    return memory_plan.Configs(config, [config])


def test_shards_and_kv_cache():
    """On fake tensors: 8 ranks hold an eighth of one rank's weights, gradients and AdamW state; one rank without
    mixed precision runs without FSDP2 (no gathered copy), and with it FSDP2 over a group of one gathers a bf16 copy;
    the generate phase's KV cache is keys and values of every layer, for prompt + response of every sequence the
    rank generates at once (--generation_batch_size, else batch_size // N), in the compute dtype: fp32 (--dtype) on
    one rank without mixed precision, bf16 with it."""
    args = dataclasses.replace(ppo.Args(), batch_size=512, max_prompt_length=4, response_length=60,
                               local_rollout_forward_batch_size=8, micro_batch_size=4)
    fp32 = dataclasses.replace(args, mixed_precision="none")
    try:
        one, one_bf16, eight = (memory_plan.plan_runs(ppo, small_qwen2(), [a], ranks)[0]
                                for a, ranks in ((fp32, 1), (args, 1), (args, 8)))
        chunks = memory_plan.plan_runs(ppo, small_qwen2(), [dataclasses.replace(args, generation_batch_size=16)], 8)[0]
    finally:
        memory_plan.stop_fake_ranks()
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
