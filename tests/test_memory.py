"""Memory at real scale (issue 25): the rollout generated in chunks, one process computing in bf16 as N processes do,
and `--plan_memory`, the planner's answer before a run (results/memory_plan.py)."""

import contextlib
import dataclasses
import importlib.util
import io
import json
import os
import sys

import pytest
import torch
import torch.distributed as dist

from conftest import ROOT, one_thread, run_script

sys.path.insert(0, os.path.join(ROOT, "results"))

import common  # noqa: E402
import grpo  # noqa: E402
import memory_plan  # noqa: E402
import ppo  # noqa: E402

os.environ.update({"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
pytestmark = [pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing"),  # peft asks a deprecated name
              pytest.mark.filterwarnings("ignore:.*returned a view tensor")]  # FSDP2 on logits, used out of place


@pytest.fixture(autouse=True)
def _one_thread_and_no_process_group():
    """One torch thread; and no process group left behind for the next test (a group of one, a fake one)."""
    with one_thread():
        yield
    if dist.is_initialized():
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------
# Generation in chunks
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def policy_and_prompts(toy_dir):
    tokenizer = common.load_tokenizer(os.path.join(toy_dir, "base_model"), padding_side="left")
    policy = common.load_causal_lm(os.path.join(toy_dir, "base_model"), tokenizer)
    prompts = [tokenizer(p)["input_ids"] for p in ("the cat", "a very good day for a walk", "no", "we like it a lot",
                                                   "bad", "fine weather today")]
    queries, query_mask = ppo.left_pad(prompts, tokenizer.pad_token_id)
    return policy, tokenizer, queries, query_mask


@pytest.mark.parametrize("script", [ppo, grpo], ids=["ppo", "grpo"])
def test_chunks_generate_what_one_call_generates_when_greedy(policy_and_prompts, script):
    """Greedy decoding does not depend on the other sequences of a batch: the responses of chunks of 4 and of 1 are
    those of one call, token for token, with a chunk that ended early padded to the batch's length."""
    policy, tokenizer, queries, query_mask = policy_and_prompts
    config = ppo.generation_config(tokenizer, 12, 0.0, [tokenizer.eos_token_id])
    whole = script.generate(policy, queries, query_mask, config)
    for chunk in (4, 1):
        assert torch.equal(script.generate(policy, queries, query_mask, config, chunk), whole), chunk


def test_default_is_one_generate_call(policy_and_prompts):
    """Without --generation_batch_size (the toy default) the rollout is sampled as before: one generate call over the
    batch, the same random draws, the same tokens (python pipeline.py's numbers bit for bit). A chunk as large as
    the batch is the same call."""
    policy, tokenizer, queries, query_mask = policy_and_prompts
    config = ppo.generation_config(tokenizer, 12, 0.7, [tokenizer.eos_token_id])
    torch.manual_seed(0)
    direct = policy.generate(input_ids=queries, attention_mask=query_mask, generation_config=config)
    for chunk in (None, len(queries)):
        torch.manual_seed(0)
        assert torch.equal(ppo.generate(policy, queries, query_mask, config, chunk), direct[:, queries.shape[1]:])


# ----------------------------------------------------------------------------------------------
# One process in bf16, as N processes
# ----------------------------------------------------------------------------------------------
SAME_ROLLOUTS = """
import json, os, sys
sys.path.insert(0, {root!r})
import ppo
from transformers import GenerationConfig


def greedy_full_length(tokenizer, max_new_tokens, temperature, stop_token_ids):
    # greedy, and no stop before max_new_tokens: the same responses on any number of processes, all of one length
    return GenerationConfig(max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False,
                            eos_token_id=stop_token_ids, pad_token_id=tokenizer.pad_token_id)


def in_order(prompt_ids, batch_size, skip, generator):
    # batch k of every rank together is prompts kB .. kB + B - 1, as on one process
    for i in range(0, len(prompt_ids) - batch_size + 1, batch_size):
        yield prompt_ids[i:i + batch_size]


if __name__ == "__main__":
    ppo.generation_config, ppo.prompt_batches = greedy_full_length, in_order
    out = ppo.main(ppo.parse_args())
    if os.environ.get("RANK", "0") == "0":
        print("RESULTS " + json.dumps({{k: out[k] for k in ("history", "sft", "ppo")}}))
"""
BF16_TOLERANCE = 0.02  # relative: on the logged statistics, and on the weights' update in norm


def test_one_process_in_bf16_trains_as_two(toy_dir, standin_rm, tmp_path, monkeypatch):
    """--mixed_precision bf16 on one process is FSDP2's mixed precision over a group of one: the arithmetic of N
    processes (bf16 forwards and backwards over fp32 weights, fp32 gradient reduction and AdamW). One process and two
    (torchrun, gloo), one update on the same greedy full-length rollouts, one micro-batch per rank, agree to 2%
    relative on every logged value and on the weights' update in norm (measured: 0.4% and 0.9%; bf16 sums over
    other splits of the batch), where the same runs in fp32 agree to 1e-4 (the torchrun tests of ppo.py). A second
    update would start from greedy rollouts of slightly different weights, where one flipped token changes more."""
    driver = tmp_path / "same_rollouts.py"
    driver.write_text(SAME_ROLLOUTS.format(root=ROOT))
    flags = ["--sft_model", os.path.join(toy_dir, "base_model"), "--reward_model", standin_rm,
             "--dataset", os.path.join(toy_dir, "prompts"), "--total_episodes", "32", "--batch_size", "32",
             "--response_length", "8", "--learning_rate", "3e-3", "--eval_samples", "16", "--eval_every", "0",
             "--eval_temperature", "0", "--missing_eos_penalty", "None", "--mixed_precision", "bf16"]
    proc = run_script(str(driver), *flags, "--output_dir", str(tmp_path / "two"), "--run_name", str(tmp_path / "tb"),
                      nproc=2)
    two = json.loads(proc.stdout.split("RESULTS ")[1].splitlines()[0])
    spec = importlib.util.spec_from_file_location("same_rollouts", driver)
    same = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(same)
    monkeypatch.setattr(ppo, "generation_config", same.greedy_full_length)
    monkeypatch.setattr(ppo, "prompt_batches", same.in_order)
    monkeypatch.chdir(tmp_path)
    one = ppo.main(ppo.parse_args([*flags, "--output_dir", str(tmp_path / "one"), "--run_name", str(tmp_path / "tb1")]))
    assert not dist.is_initialized()  # the group of one is gone with the run
    worst = 0.0
    for a, b in zip(one["history"], two["history"], strict=True):
        # not compared: timings, counts at a clip boundary, and a variance within each rank's micro-batch
        keys = [k for k in a if not k.startswith(("time/", "eps", "val/ratio_var")) and not k.endswith("clipfrac_avg")]
        for k in keys:
            assert a[k] == pytest.approx(b[k], rel=BF16_TOLERANCE, abs=1e-3), k
            worst = max(worst, abs(a[k] - b[k]) / max(abs(b[k]), 1e-3))
    assert one["history"][-1]["objective/kl"] > 1e-3  # the policy moved
    from safetensors.torch import load_file

    # the first AdamW step moves every weight by about the learning rate times the sign of its gradient, so a weight
    # whose gradient is near 0 may move either way: compared is the update as a whole, W - W_sft, in norm
    sft, one_w, two_w = (load_file(os.path.join(path, "model.safetensors"))
                         for path in (os.path.join(toy_dir, "base_model"), tmp_path / "one", tmp_path / "two"))
    difference = sum(((one_w[n] - two_w[n]) ** 2).sum() for n in sft) ** 0.5
    update = sum(((one_w[n] - sft[n]) ** 2).sum() for n in sft) ** 0.5
    assert difference / update <= BF16_TOLERANCE
    worst = max(worst, (difference / update).item())
    print(f"largest relative difference: {worst:.1e}")


# ----------------------------------------------------------------------------------------------
# --plan_memory
# ----------------------------------------------------------------------------------------------
def plan_output(script, argv: list[str]) -> list[str]:
    """The lines `python script.py ARGV --plan_memory` prints, run in this process."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        common.run(script.main, lambda: script.parse_args([*argv, "--plan_memory"]))
    return out.getvalue().strip().splitlines()


def test_plan_memory_plans_local_and_published_models_and_refuses_others(toy_dir, standin_rm):
    """`--plan_memory` plans the flags without training: a local model dir from its config.json, a published model
    by hub id from the planner's table (--reward_model too), on N GPUs; each phase's peak, and last
    `planned peak: X.X GB per GPU`. Any other path is refused in one line."""
    local = ["--sft_model", os.path.join(toy_dir, "base_model"), "--reward_model", standin_rm]
    lines = plan_output(ppo, [*local, "--plan_gpus", "2"])
    assert lines[0].startswith("ppo.py on 2 GPUs of 80 GB") and "fits one 80 GB GPU" in lines
    assert [ln.split()[0] for ln in lines[2:5]] == list(memory_plan.PHASES)
    assert lines[-1].startswith("planned peak: ") and lines[-1].endswith(" GB per GPU")
    hub = "EleutherAI/pythia-1b-deduped"
    lines = plan_output(grpo, ["--sft_model", hub, "--reward_model", hub, "--batch_size", "16", "--max_prompt_length",
                               "64", "--response_length", "16", "--local_rollout_forward_batch_size", "8"])
    assert lines[0].startswith("grpo.py on 1 GPU of 80 GB: policy Pythia-1B, reward model Pythia-1B")
    gb = float(lines[-1].split()[2])
    assert 20 < gb < 30, lines  # a 1B policy's fp32 weights, gradients and AdamW (16 GB) and the frozen models
    with pytest.raises(SystemExit, match="'no/such-model' is neither a local model dir nor a published model"):
        plan_output(ppo, [*local[:2], "--reward_model", "no/such-model"])


def test_plan_memory_names_the_options_that_fit():
    """A run that does not fit gets the memory options, added one after another until it fits (a step whose weights,
    gradients and AdamW state alone exceed the GPU is not planned)."""
    hub = "EleutherAI/pythia-1b-deduped"
    args = dataclasses.replace(ppo.parse_args(["--sft_model", hub, "--reward_model", hub]), batch_size=8,
                               max_prompt_length=64, response_length=16)
    found, lines = memory_plan.fitting_options(ppo, memory_plan.configs_of(args), args, 1, 12e9)
    assert found is not None and found["plan"]["peak"] <= 12e9, lines
    assert "--lora_r 8" in found["flags"] and lines[-1].startswith("fits one 12 GB GPU with: ")
    assert any("alone hold over" in ln for ln in lines)  # ruled out without a plan


# ----------------------------------------------------------------------------------------------
# The planner's own checks
# ----------------------------------------------------------------------------------------------
def small(layers: int):
    return memory_plan.Configs(memory_plan.pythia(64, layers, 4, 256), [memory_plan.pythia(64, layers, 4, 256)])


@pytest.mark.parametrize("ranks, flags", [(8, {}), (1, {"mixed_precision": "none", "micro_batch_size": 8}),
                                          (1, {"frozen_dtype": "int8", "lora_r": 8, "value_head_on_policy": True})],
                         ids=["8 GPUs", "1 GPU, fp32", "1 GPU, recipe"])
def test_extrapolated_plan_equals_the_whole_plan(ranks, flags):
    """A deep model is planned with 3 and 4 layers and each step extrapolated: for 7 layers it equals the plan of all
    7 (results/README.md: the same for Pythia-1B and Pythia-6.9B at full depth)."""
    args = dataclasses.replace(ppo.Args(), batch_size=64, max_prompt_length=24, response_length=8, micro_batch_size=4,
                               local_rollout_forward_batch_size=8, generation_batch_size=16, **flags)
    whole = memory_plan.settled(memory_plan.plan_runs(ppo, small(7), [args], ranks)[0])
    extrapolated = memory_plan.plan(ppo, small(7), args, ranks)
    for phase in memory_plan.PHASES:
        assert extrapolated["phases"][phase]["peak"] == pytest.approx(whole["phases"][phase]["peak"], rel=1e-3), phase


def test_int8_frozen_models_are_sharded_and_no_larger_than_bf16_shards():
    """Under FSDP2 an int8 reference and RM are sharded like the other models (4 ranks: a quarter of one GPU's
    bytes each) and gathered as int8, so every phase holds no more than with bf16 shards."""
    args = dataclasses.replace(ppo.Args(), batch_size=32, max_prompt_length=24, response_length=8,
                               local_rollout_forward_batch_size=8, micro_batch_size=4)
    int8 = dataclasses.replace(args, frozen_dtype="int8")
    one, four = (memory_plan.plan_runs(ppo, small(2), [int8], n)[0] for n in (1, 4))
    for model in ("reference", "reward model"):
        assert four["models"][model]["parameters"] == pytest.approx(one["models"][model]["parameters"] / 4, rel=0.05)
    bf16 = memory_plan.plan_runs(ppo, small(2), [dataclasses.replace(args, frozen_dtype="bfloat16")], 4)[0]
    for phase in memory_plan.PHASES:
        assert four["phases"][phase]["peak"] <= bf16["phases"][phase]["peak"], phase
