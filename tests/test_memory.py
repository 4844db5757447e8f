"""Memory at real scale: the rollout generated in chunks, one process computing in bf16 as N processes do, and
`--plan_memory`, the planner's answer before a run (results/memory_plan.py; its own checks: test_memory_plan.py)."""

import contextlib
import importlib.util
import io
import json
import os
import sys

import pytest
import torch
import torch.distributed as dist

from conftest import ROOT, one_thread

sys.path.insert(0, os.path.join(ROOT, "results"))

import common  # noqa: E402
import grpo  # noqa: E402
import memory_plan  # noqa: E402
import ppo  # noqa: E402
import test_ppo_runs  # noqa: E402  (its same-rollouts driver)

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
BF16_TOLERANCE = 0.02  # relative: on the logged statistics, and on the weights' update in norm


def bf16_flags(toy_dir, rm) -> list[str]:
    """One update of 32 episodes, one micro-batch per rank, in bf16."""
    return ["--sft_model", os.path.join(toy_dir, "base_model"), "--reward_model", rm,
            "--dataset", os.path.join(toy_dir, "prompts"), "--total_episodes", "32", "--batch_size", "32",
            "--response_length", "8", "--learning_rate", "3e-3", "--eval_samples", "16", "--eval_every", "0",
            "--eval_temperature", "0", "--missing_eos_penalty", "None", "--mixed_precision", "bf16"]


def two_process_runs(toy_dir, standin_rm, tmp) -> list:
    rm = standin_rm
    """This module's 2-process run (conftest's two_process_runs launches it with the other stages'):
    test_ppo_runs.SAME_ROLLOUTS in bf16, its output in tmp / "bf16" / "two"."""
    driver = tmp / "bf16_same_rollouts.py"
    driver.write_text(test_ppo_runs.SAME_ROLLOUTS.format(root=ROOT))
    return [(str(driver), [*bf16_flags(toy_dir, rm), "--output_dir", str(tmp / "bf16" / "two"),
                           "--run_name", str(tmp / "bf16" / "tb")])]


def test_one_process_in_bf16_trains_as_two(toy_dir, standin_rm, two_process_runs, tmp_path, monkeypatch):
    """--mixed_precision bf16 on one process is FSDP2's mixed precision over a group of one: the arithmetic of N
    processes (bf16 forwards and backwards over fp32 weights, fp32 gradient reduction and AdamW). One process and two
    (torchrun, gloo), one update on the same greedy full-length rollouts, one micro-batch per rank, agree to 2%
    relative on every logged value and on the weights' update in norm (measured: 0.4% and 0.9%; bf16 sums over
    other splits of the batch), where the same runs in fp32 agree to 1e-4 (test_ppo_runs). A second update would
    start from greedy rollouts of slightly different weights, where one flipped token changes more."""
    two_dir = two_process_runs["dir"] / "bf16" / "two"
    (two,) = [json.loads(line.split(" ", 2)[2]) for line in two_process_runs["stdout"].splitlines()
              if line.startswith(f"RESULTS {two_dir} ")]
    spec = importlib.util.spec_from_file_location("same_rollouts", two_process_runs["dir"] / "bf16_same_rollouts.py")
    same = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(same)
    monkeypatch.setattr(ppo, "generation_config", same.greedy_full_length)
    monkeypatch.setattr(ppo, "prompt_batches", same.in_order)
    monkeypatch.chdir(tmp_path)
    flags = bf16_flags(toy_dir, standin_rm)
    one = ppo.main(ppo.parse_args([*flags, "--output_dir", str(tmp_path / "one"), "--run_name", str(tmp_path / "tb")]))
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
                         for path in (os.path.join(toy_dir, "base_model"), tmp_path / "one", two_dir))
    difference = sum(((one_w[n] - two_w[n]) ** 2).sum() for n in sft) ** 0.5
    update = sum(((one_w[n] - sft[n]) ** 2).sum() for n in sft) ** 0.5
    assert difference / update <= BF16_TOLERANCE
    print(f"largest relative difference: logged {worst:.1e}, the update {difference / update:.1e}")


# ----------------------------------------------------------------------------------------------
# --plan_memory
# ----------------------------------------------------------------------------------------------
def plan_output(script, argv: list[str]) -> list[str]:
    """The lines `python script.py ARGV --plan_memory` prints, run in this process."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        common.run(script.main, lambda: script.parse_args([*argv, "--plan_memory"]))
    return out.getvalue().strip().splitlines()


@pytest.mark.parametrize("script", [ppo, grpo], ids=["ppo", "grpo"])
def test_plan_memory_prints_each_phase_and_the_peak(toy_dir, standin_rm, script):
    """`--plan_memory` plans the flags and exits without training: local model dirs from their config.json, on N
    GPUs; each phase's peak, and last `planned peak: X.X GB per GPU`."""
    lines = plan_output(script, ["--sft_model", os.path.join(toy_dir, "base_model"), "--reward_model", standin_rm,
                                 "--plan_gpus", "2"])
    assert lines[0].startswith(f"{script.METHOD}.py on 2 GPUs of 80 GB") and "fits one 80 GB GPU" in lines
    assert [ln.split()[0] for ln in lines[2:5]] == list(memory_plan.PHASES)
    assert lines[-1].startswith("planned peak: ") and lines[-1].endswith(" GB per GPU")
    float(lines[-1].split()[2])


def test_a_published_model_is_planned_from_its_config_and_other_paths_are_refused(toy_dir):
    """A model flag naming a published model that is not on disk (--sft_model and --reward_model alike) is planned
    from that model's published config (memory_plan.MODELS); any other path is refused in one line."""
    args = ppo.parse_args(["--sft_model", "EleutherAI/pythia-6.9b-deduped", "--reward_model", "Qwen/Qwen2.5-7B",
                           "meta-llama/Llama-2-7b-hf"])
    configs = memory_plan.configs_of(args)
    assert (configs.sft.hidden_size, configs.sft.num_hidden_layers, configs.sft.vocab_size) == (4096, 32, 50432)
    assert [(c.model_type, c.num_hidden_layers) for c in configs.rms] == [("qwen2", 28), ("llama", 32)]
    billions = [memory_plan.parameter_count(c) / 1e9 for c in (configs.sft, *configs.rms)]  # without the LM heads
    assert billions == pytest.approx([6.65, 7.07, 6.61], abs=0.01)
    base_model = os.path.join(toy_dir, "base_model")
    local = memory_plan.configs_of(ppo.parse_args(["--sft_model", base_model, "--reward_model", base_model]))
    assert (local.sft.hidden_size, local.rms[0].hidden_size) == (64, 64)  # the dir's own config.json
    with pytest.raises(SystemExit, match="--sft_model 'no/such-model' is neither a local model dir nor a published"):
        plan_output(ppo, ["--sft_model", "no/such-model", "--reward_model", base_model])
    with pytest.raises(SystemExit, match="--reward_model 'no/such-rm' is neither a local model dir nor a published"):
        plan_output(ppo, ["--sft_model", base_model, "--reward_model", "no/such-rm"])
