"""ppo.py end to end, on the toy task at test scale: one run's results, saved model and logs; the same numbers
from the same seed, whatever the evaluation schedule, with or without reusing PPO's first forward; torchrun with 2
processes against one; every option the ablations use, reward ensembles and functions, the critic warm-up, resume,
the memory options; and the command line (presets, flags moved to grpo.py, one-line errors on bad input).
ppo.py's equations are tested one by one in test_ppo_equations.py."""

import importlib.util
import json
import math
import os
import sys

import pytest
import torch

from conftest import ROOT, one_thread

import common
import ppo

os.environ.update({"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})


@pytest.fixture(autouse=True, scope="module")
def _one_thread_for_this_module():
    with one_thread():
        yield


# ----------------------------------------------------------------------------------------------
# End to end
# ----------------------------------------------------------------------------------------------
def tiny_args(toy_dir, rm, output_dir, *extra):
    return ppo.parse_args([
        "--sft_model", os.path.join(toy_dir, "base_model"), "--reward_model", rm,
        "--dataset", os.path.join(toy_dir, "prompts"), "--output_dir", str(output_dir),
        "--total_episodes", "320", "--batch_size", "32", "--response_length", "8",
        "--learning_rate", "3e-3", "--kl_coef", "0.01", "--missing_eos_penalty", "None",
        "--eval_samples", "64", "--eval_every", "5", "--sample_every", "5", *extra,
    ])


GOLD_MODULE = '''
import os
def gold(prompts, completions):
    with open(os.path.join(os.path.dirname(__file__), "gold_called.txt"), "a") as f:
        f.write(f"{len(completions)}\\n")
    return [float(len(c.split())) for c in completions]
'''


@pytest.fixture(scope="module")
def e2e(toy_dir, standin_rm, tmp_path_factory):
    """One in-process run of main(): 2 minibatches x 2 micro-batches, a gold function from a tmp module,
    and policy_loss spied on to catch the first minibatch of the first epoch."""
    tmp = tmp_path_factory.mktemp("e2e")
    (tmp / "gold_mod_ppo_test.py").write_text(GOLD_MODULE)
    sys.path.insert(0, str(tmp))
    calls = []
    real_policy_loss = ppo.policy_loss

    def spy(logprobs, old_logprobs, advantages, mask, *loss_flags):
        if not calls:
            calls.append((logprobs.detach().clone(), old_logprobs.clone(), mask.clone()))
        return real_policy_loss(logprobs, old_logprobs, advantages, mask, *loss_flags)

    cwd = os.getcwd()
    os.chdir(tmp)  # TensorBoard logs go to tmp/runs
    ppo.policy_loss = spy
    try:
        args = tiny_args(toy_dir, standin_rm, tmp / "ppo", "--num_minibatches", "2", "--micro_batch_size", "8",
                         "--gold_reward_fn", "gold_mod_ppo_test:gold", "--run_name", "e2e")
        out = ppo.main(args)
    finally:
        ppo.policy_loss = real_policy_loss
        os.chdir(cwd)
        sys.path.remove(str(tmp))
    return {"out": out, "dir": tmp, "first_call": calls[0]}


def test_first_minibatch_ratio_is_exactly_one(e2e):
    logprobs, old_logprobs, mask = e2e["first_call"]
    ratio = torch.exp(logprobs - old_logprobs)
    # the training forward recomputes the rollout's logprobs bit for bit (same temperature, same inputs)
    assert torch.equal(ratio[mask], torch.ones_like(ratio[mask]))
    assert (0.5 * ((logprobs - old_logprobs)[mask] ** 2).mean()).item() == 0.0


def test_end_to_end_raises_rm_score_and_saves(e2e):
    out = e2e["out"]
    assert out["ppo"]["rm_score"] > out["sft"]["rm_score"] + 0.3, (out["sft"], out["ppo"])
    history = out["history"]
    assert len(history) == 10 and all(len(t) == 5 for t in out["timings"])
    assert history[-1]["objective/scores"] > history[0]["objective/scores"]
    assert out["sft"]["kl"] == 0.0 and out["ppo"]["kl"] > 0
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = e2e["dir"] / "ppo"
    results = json.loads((path / "eval_results.json").read_text())
    assert {"sft", "ppo", "gold_win_rate", "final_kl"} <= set(results)
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    sample = model.generate(**tok(["the plot was"], return_tensors="pt"), max_new_tokens=4, do_sample=False)
    assert sample.shape == (1, 7)


def test_gold_reward_fn_is_called_and_logged(e2e):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    calls = (e2e["dir"] / "gold_called.txt").read_text().split()
    assert len(calls) == 3 and all(int(n) == 64 for n in calls)  # before training, updates 5 and 10 (final)
    out = e2e["out"]
    # the tmp gold function scores the number of words: the mean matches the logged response length
    assert out["ppo"]["gold_score"] >= 0 and 0 <= out["gold_win_rate"] <= 1
    acc = EventAccumulator(str(e2e["dir"] / "runs" / "e2e"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert "eval/gold_score" in tags and "objective/kl" in tags and "time/generate" in tags
    assert [e.step for e in acc.Scalars("eval/gold_score")] == [0, 160, 320]


SHORT_RUN = ("--no_save", "--eval_samples", "16", "--gold_reward_fn", "None")


@pytest.fixture(scope="module")
def short_runs(toy_dir, standin_rm, tmp_path_factory):
    """The plain short runs that several tests compare with, run once: 2 updates (64 episodes), and 3 updates
    (96 episodes) evaluated only at the end; neither saved nor scored by a gold function."""
    tmp = tmp_path_factory.mktemp("short_runs")
    cwd = os.getcwd()
    os.chdir(tmp)  # TensorBoard logs go to tmp/runs
    try:
        return {
            64: ppo.main(tiny_args(toy_dir, standin_rm, tmp / "o64", "--total_episodes", "64", *SHORT_RUN)),
            96: ppo.main(tiny_args(toy_dir, standin_rm, tmp / "o96", "--total_episodes", "96", *SHORT_RUN,
                                   "--eval_every", "0")),
        }
    finally:
        os.chdir(cwd)


def test_same_seed_same_numbers(toy_dir, standin_rm, short_runs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    again = ppo.main(tiny_args(toy_dir, standin_rm, tmp_path / "o", "--total_episodes", "64", *SHORT_RUN,
                               "--run_name", "again"))
    runs = [short_runs[64], again]
    strip = [[{k: v for k, v in h.items() if not k.startswith(("time/", "eps"))} for h in r["history"]] for r in runs]
    assert strip[0] == strip[1]
    assert runs[0]["ppo"] == runs[1]["ppo"]


def test_eval_every_changes_no_training_number(toy_dir, standin_rm, short_runs, tmp_path, monkeypatch):
    """Evaluation samples from its own forked RNG: evaluating after every update instead of only at the end
    leaves the training run bit-identical (results/sweep.py relies on this for its extra eval points)."""
    monkeypatch.chdir(tmp_path)
    every_update = ppo.main(tiny_args(toy_dir, standin_rm, tmp_path / "o", "--total_episodes", "96", *SHORT_RUN,
                                      "--eval_every", "1", "--run_name", "e1"))
    runs = [every_update, short_runs[96]]  # the second: --eval_every 0
    strip = [[{k: v for k, v in h.items() if not k.startswith(("time/", "eps"))} for h in r["history"]] for r in runs]
    assert len(strip[0]) == 3 and strip[0] == strip[1]
    assert runs[0]["ppo"] == runs[1]["ppo"] and runs[0]["sft"] == runs[1]["sft"]


def test_reusing_the_first_forward_changes_no_number(toy_dir, standin_rm, short_runs, tmp_path, monkeypatch):
    """pi_old and V_old taken from PPO's first forward (one micro-batch per update) equal the separate
    no-grad recompute: the whole run is the same up to float rounding, only the speed differs."""
    monkeypatch.chdir(tmp_path)
    recompute = ppo.main(tiny_args(toy_dir, standin_rm, tmp_path / "o", "--total_episodes", "96", *SHORT_RUN,
                                   "--eval_every", "0", "--no_reuse_first_forward"))
    runs = [short_runs[96], recompute]  # the first reuses it (the default)
    strip = [[{k: v for k, v in h.items() if not k.startswith(("time/", "eps"))} for h in r["history"]] for r in runs]
    for a, b in zip(*strip):
        # the critic's recompute can differ in the last bit, which flips a few value-clipping comparisons
        assert a.pop("val/clipfrac_avg") == pytest.approx(b.pop("val/clipfrac_avg"), abs=0.01)
        assert a == pytest.approx(b, rel=1e-4, abs=1e-5)
    assert strip[0][0]["policy/approxkl_avg"] > 0  # later epochs did move the policy


def test_nan_loss_stops_and_saves_nothing(toy_dir, standin_rm, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out_dir = tmp_path / "existing"
    out_dir.mkdir()
    common.write_marker(str(out_dir), "ppo")  # an earlier ppo.py run's dir, which this run may replace
    (out_dir / "keep.txt").write_text("an earlier run")
    real = ppo.policy_loss
    monkeypatch.setattr(ppo, "policy_loss", lambda *a: (real(*a)[0] * float("nan"), *real(*a)[1:]))
    with pytest.raises(SystemExit, match="non-finite"):
        ppo.main(tiny_args(toy_dir, standin_rm, out_dir, "--total_episodes", "64", "--eval_samples", "16"))
    assert sorted(os.listdir(out_dir)) == ["keep.txt", common.MARKER]


SAME_ROLLOUTS = """
import json, os, sys
sys.path.insert(0, {root!r})
import ppo
from transformers import GenerationConfig


def greedy_full_length(tokenizer, max_new_tokens, temperature, stop_token_ids):
    # greedy, and no stop token before max_new_tokens: the same responses on any number of processes, all of
    # one length, so that each rank's token mean weighs as the one process's
    return GenerationConfig(max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False,
                            eos_token_id=stop_token_ids, pad_token_id=tokenizer.pad_token_id)


def in_order(prompt_ids, batch_size, skip, generator):
    # rank r holds prompts r, r + W, ...: batch k of every rank together is prompts kB .. kB + B - 1, as on one process
    for i in range(0, len(prompt_ids) - batch_size + 1, batch_size):
        yield prompt_ids[i:i + batch_size]


if __name__ == "__main__":
    ppo.generation_config, ppo.prompt_batches = greedy_full_length, in_order
    args = ppo.parse_args()
    out = ppo.main(args)
    if os.environ["RANK"] == "0":
        results = {{k: out[k] for k in ("history", "sft", "ppo")}}
        print(f"RESULTS {{args.output_dir}} {{json.dumps(results)}}", flush=True)
"""

SAME_ROLLOUTS_RUNS = {
    "plain": [],
    # the 7B memory recipe: int8 frozen models (sharded as int8), the critic offloaded (nothing moves on CPU), LoRA
    # adapters sharded with the frozen base, activations recomputed
    "memory_recipe": ["--frozen_dtype", "int8", "--offload_critic", "--lora_r", "8", "--gradient_checkpointing"],
}
SAMPLED_ROLLOUTS_RUNS = {
    # separate recompute, gradient accumulation; bf16 frozen models sharded by FSDP2
    "extra0": ["--micro_batch_size", "8", "--num_ppo_epochs", "2", "--frozen_dtype", "bfloat16"],
}


def same_rollouts_flags(toy_dir, rm, extra):
    return ["--sft_model", os.path.join(toy_dir, "base_model"), "--reward_model", rm,
            "--dataset", os.path.join(toy_dir, "prompts"), "--total_episodes", "96", "--batch_size", "32",
            "--response_length", "8", "--learning_rate", "3e-3", "--eval_samples", "32", "--eval_every", "0",
            "--eval_temperature", "0", "--missing_eos_penalty", "None", *extra]


def sampled_rollouts_flags(toy_dir, rm, extra):
    return ["--sft_model", os.path.join(toy_dir, "base_model"), "--reward_model", rm,
            "--dataset", os.path.join(toy_dir, "prompts"), "--total_episodes", "96", "--batch_size", "32",
            "--response_length", "8", "--learning_rate", "3e-3", "--eval_samples", "32", "--eval_every", "0",
            "--eval_temperature", "0", *extra]


def two_process_runs(toy_dir, rm, tmp) -> list:
    """ppo.py's 2-process runs (conftest's two_process_runs launches them with the other stages'): SAME_ROLLOUTS
    with each of SAME_ROLLOUTS_RUNS, its output in tmp / name / "two" (rank 0 prints the results), then ppo.py as
    its command line runs it with each of SAMPLED_ROLLOUTS_RUNS, its output in tmp / name / "ppo"."""
    driver = tmp / "same_rollouts.py"
    driver.write_text(SAME_ROLLOUTS.format(root=ROOT))
    runs = [(str(driver), [*same_rollouts_flags(toy_dir, rm, extra), "--output_dir", str(tmp / name / "two"),
                           "--run_name", str(tmp / name / "tb")]) for name, extra in SAME_ROLLOUTS_RUNS.items()]
    runs += [(os.path.join(ROOT, "ppo.py"), [*sampled_rollouts_flags(toy_dir, rm, extra), "--output_dir",
                                             str(tmp / name / "ppo"), "--run_name", str(tmp / name / "tb")])
             for name, extra in SAMPLED_ROLLOUTS_RUNS.items()]
    return runs


@pytest.mark.parametrize("run", list(SAME_ROLLOUTS_RUNS))
def test_torchrun_trains_as_one_process(toy_dir, standin_rm, two_process_runs, tmp_path, monkeypatch, run):
    """Two processes with FSDP2 train as one does, to float rounding, when they see the same data: greedy
    rollouts of full length (so that each rank's token mean weighs as one process's), the same prompts per
    update, and one micro-batch per rank (so the minibatch order cannot matter). Then every sum PPO takes
    (whitening, the losses' means via FSDP's gradient average, the grad norm, the logged statistics) must match,
    and so must the saved weights (with LoRA: merged from the gathered shards).
    Tolerance: 1e-4 relative on every logged value over 3 updates and on the final evaluation; measured
    differences are about 1e-6 (float32 sums in another order)."""
    extra = SAME_ROLLOUTS_RUNS[run]
    flags = same_rollouts_flags(toy_dir, standin_rm, extra)
    two_dir = two_process_runs["dir"] / run / "two"
    (two,) = [json.loads(line.split(" ", 2)[2]) for line in two_process_runs["stdout"].splitlines()
              if line.startswith(f"RESULTS {two_dir} ")]
    spec = importlib.util.spec_from_file_location("same_rollouts", two_process_runs["dir"] / "same_rollouts.py")
    same = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(same)
    monkeypatch.setattr(ppo, "generation_config", same.greedy_full_length)
    monkeypatch.setattr(ppo, "prompt_batches", same.in_order)
    monkeypatch.chdir(tmp_path)
    with one_thread():
        one = ppo.main(ppo.parse_args([*flags, "--output_dir", str(tmp_path / "one"),
                                       "--run_name", str(tmp_path / "tb1")]))
    # not compared: timings, and val/ratio_var, a variance within each micro-batch (one process's 32 sequences,
    # each rank's 16), which by its definition differs by the variance between the ranks' means
    drop = ("time/", "eps", "val/ratio_var")
    worst = 0.0
    for a, b in zip(one["history"], two["history"], strict=True):
        a = {k: v for k, v in a.items() if not k.startswith(drop)}
        b = {k: v for k, v in b.items() if not k.startswith(drop)}
        for k in [k for k in a if k.endswith("clipfrac_avg")]:  # counts: a token at the clip boundary may flip
            assert a.pop(k) == pytest.approx(b.pop(k), abs=0.01), k
        assert a == pytest.approx(b, rel=1e-4, abs=1e-6)
        worst = max(worst, *(abs(a[k] - b[k]) / max(abs(b[k]), 1e-6) for k in a))
    print(f"largest relative difference of a logged value: {worst:.1e}")
    assert one["history"][-1]["val/num_eos_tokens"] == 0  # full length, as the test needs
    # the first rollout is the SFT policy's, at KL 0 to the reference (int8: the reference's rounding, stated bound)
    assert one["history"][0]["objective/kl"] == pytest.approx(0, abs=0.05 if "int8" in extra else 1e-6)
    assert one["history"][-1]["objective/kl"] > 1e-3  # ... and the policy moved
    assert one["ppo"] == pytest.approx(two["ppo"], rel=1e-4, abs=1e-6)
    assert one["sft"] == pytest.approx(two["sft"], rel=1e-5, abs=1e-6)
    from safetensors.torch import load_file

    weights = [load_file(path / "model.safetensors") for path in (tmp_path / "one", two_dir)]
    assert weights[0].keys() == weights[1].keys() and not any("lora" in k for k in weights[0])
    for name, w in weights[0].items():
        assert torch.allclose(w, weights[1][name], rtol=1e-4, atol=1e-6), name


@pytest.mark.parametrize("run", list(SAMPLED_ROLLOUTS_RUNS))
def test_torchrun_two_processes(two_process_runs, run):
    """Two processes with FSDP2 train on rollouts sampled on each rank (other ones than one process would
    sample: their statistics are compared in test_torchrun_trains_as_one_process), save, and the saved policy
    loads as a plain HF model."""
    out = two_process_runs["dir"] / run / "ppo"
    results = json.loads((out / "eval_results.json").read_text())
    assert results["num_eval_prompts"] == 32 and math.isfinite(results["final_kl"])
    assert "gold_win_rate" in results
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out)


@pytest.mark.parametrize("extra", [
    ["--value_head_on_policy"],
    ["--no_kl_in_reward", "--kl_loss_estimator", "k3"],
    ["--kl_estimator", "k3", "--adaptive_kl", "--kl_target", "1.0", "--kl_horizon", "100"],
    ["--whiten_rewards", "--no_whiten_advantages", "--critic_init", "sft", "--max_grad_norm", "0.5"],
    ["--missing_eos_penalty", "-1.0", "--no_anneal_lr", "--eval_temperature", "0",
     "--local_rollout_forward_batch_size", "5"],
])
def test_options_run(toy_dir, standin_rm, tmp_path, monkeypatch, extra):
    """Every switch the ablations use runs and gives finite numbers (two updates each)."""
    monkeypatch.chdir(tmp_path)
    out = ppo.main(tiny_args(toy_dir, standin_rm, tmp_path / "o", "--total_episodes", "64", "--no_save",
                             "--eval_samples", "16", "--gold_reward_fn", "None", *extra))
    assert all(math.isfinite(v) for h in out["history"] for v in h.values())
    if "--adaptive_kl" in extra:  # KL far below its target: beta shrinks
        assert out["history"][-1]["objective/kl_coef"] < 0.01


@pytest.fixture(scope="module")
def second_rm(standin_rm, tmp_path_factory):
    """A second ensemble member: the stand-in RM with other stored statistics, so its normalised scores differ."""
    import shutil

    path = tmp_path_factory.mktemp("member") / "rm2"
    shutil.copytree(standin_rm, path)
    config = json.loads((path / "config.json").read_text())
    config.update(reward_mean=config["reward_mean"] + 0.5, reward_std=2.0 * config["reward_std"])
    (path / "config.json").write_text(json.dumps(config))
    return str(path)


def test_ensemble_and_loss_details_run(toy_dir, standin_rm, second_rm, tmp_path, monkeypatch):
    """An ensemble of two RMs with PPO's optional loss details on (dual clip, entropy bonus, reward clipping) trains
    two updates to finite numbers, with its critic (a value loss logged) and its members' disagreement logged."""
    monkeypatch.chdir(tmp_path)
    built = []
    real_build = ppo.build_models
    monkeypatch.setattr(ppo, "build_models", lambda *a: built.append(real_build(*a)) or built[-1])
    out = ppo.main(tiny_args(toy_dir, standin_rm, tmp_path / "o", "--total_episodes", "64", "--no_save",
                             "--eval_samples", "16", "--gold_reward_fn", "None",
                             "--reward_model", standin_rm, second_rm,
                             "--dual_clip", "3", "--entropy_coef", "0.01", "--reward_clip", "1.0"))
    history = out["history"]
    assert len(history) == 2 and all(math.isfinite(v) for h in history for v in h.values())
    assert built[0].critic is not None and "loss/value_avg" in history[0]
    assert history[0]["objective/ensemble_std"] > 0.01  # the members' normalisations differ, and so do their scores


def test_reward_fn_and_critic_warmup(toy_dir, tmp_path, monkeypatch):
    """--reward_fn toy_task:gold_score trains against the gold score itself: the evaluation's reward is its gold
    score. --critic_warmup_updates 2 over 2 updates: only the critic moves, so the second rollout is still at KL 0
    and the saved policy is the SFT model bit for bit, while the critic's weights changed."""
    from safetensors.torch import load_file

    monkeypatch.chdir(tmp_path)
    built, initial_critic = [], {}
    real_build = ppo.build_models

    def build(*a):
        built.append(real_build(*a))
        initial_critic.update({k: v.clone() for k, v in built[0].critic.state_dict().items()})
        return built[0]

    monkeypatch.setattr(ppo, "build_models", build)
    out = ppo.main(tiny_args(toy_dir, "None", tmp_path / "o", "--total_episodes", "64", "--eval_samples", "16",
                             "--reward_fn", "toy_task:gold_score", "--gold_reward_fn", "toy_task:gold_score",
                             "--critic_init", "sft", "--critic_warmup_updates", "2"))
    assert out["ppo"]["rm_score"] == pytest.approx(out["ppo"]["gold_score"])
    assert out["history"][1]["objective/kl"] == pytest.approx(0.0, abs=1e-6)
    saved = load_file(tmp_path / "o" / "model.safetensors")
    sft = load_file(os.path.join(toy_dir, "base_model", "model.safetensors"))
    assert saved.keys() == sft.keys() and all(torch.equal(saved[k], sft[k]) for k in saved)
    assert any(not torch.equal(v, initial_critic[k]) for k, v in built[0].critic.state_dict().items())


def test_resume_inside_the_critic_warmup_is_exact(toy_dir, standin_rm, tmp_path, monkeypatch):
    """A checkpoint written during the critic warm-up holds no AdamW state for the policy (it had no gradient
    yet); resuming from it must load, and finish exactly as the uninterrupted run (3 updates, warm-up 2, stopped
    after update 1)."""
    monkeypatch.chdir(tmp_path)

    def run(out, *flags):
        return ppo.main(tiny_args(toy_dir, standin_rm, tmp_path / out, "--total_episodes", "96", "--eval_samples", "16",
                                  "--eval_every", "0", "--gold_reward_fn", "None", "--checkpoint_every", "1",
                                  "--critic_warmup_updates", "2", "--run_name", out, *flags))

    class Stop(Exception):
        pass

    full = run("full")
    real_save = ppo.rl_save_or_stop

    def stop_after_the_first(step, *a):
        real_save(step, *a)
        if step == 1:
            raise Stop

    monkeypatch.setattr(ppo, "rl_save_or_stop", stop_after_the_first)
    with pytest.raises(Stop):
        run("cut")
    monkeypatch.setattr(ppo, "rl_save_or_stop", real_save)
    resumed = run("cut", "--resume")
    strip = [[{k: v for k, v in h.items() if not k.startswith(("time/", "eps"))} for h in r["history"]]
             for r in (full, resumed)]
    assert len(strip[1]) == 3 and strip[0] == strip[1]
    assert full["ppo"] == resumed["ppo"]


def test_memory_options_keep_the_algorithm(toy_dir, standin_rm, short_runs, tmp_path, monkeypatch):
    """Gradient checkpointing changes memory, not numbers; bf16 / int8 frozen models change them only by
    rounding; LoRA starts exactly at the reference (B = 0), so the first KL is 0. --offload_critic runs its moves
    (to where the critic already is, on CPU) and must change nothing; what it frees needs a GPU to be seen."""
    monkeypatch.chdir(tmp_path)

    def run(*flags):
        return ppo.main(tiny_args(toy_dir, standin_rm, tmp_path / "o", "--total_episodes", "64", "--no_save",
                                  "--eval_samples", "16", "--gold_reward_fn", "None", *flags))

    def strip(out):
        return [{k: v for k, v in h.items() if not k.startswith(("time/", "eps"))} for h in out["history"]]
    base = strip(short_runs[64])  # run() without flags
    # offloading moves the critic and its AdamW state (nowhere, on CPU: the path runs, nothing may change)
    assert strip(run("--offload_critic")) == base
    for flags in (["--gradient_checkpointing"],):
        for a, b in zip(base, strip(run(*flags))):
            a, b = dict(a), dict(b)
            assert a.pop("val/clipfrac_avg") == pytest.approx(b.pop("val/clipfrac_avg"), abs=0.02)  # last-bit flips
            assert a == pytest.approx(b, rel=1e-4, abs=1e-5), flags
    for dtype in ("bfloat16", "int8"):
        low = strip(run("--frozen_dtype", dtype))
        assert low[0]["objective/scores"] == pytest.approx(base[0]["objective/scores"], abs=0.1)  # rounding only
    lora = ppo.main(tiny_args(toy_dir, standin_rm, tmp_path / "lora", "--total_episodes", "64", "--lora_r", "4",
                              "--eval_samples", "16", "--gold_reward_fn", "None", "--learning_rate", "3e-2"))
    assert lora["history"][0]["objective/kl"] == 0.0 and lora["history"][1]["objective/kl"] != 0.0
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "lora")  # a plain model, the adapter folded in
    assert not any("lora" in name for name, _ in merged.named_parameters())


# ----------------------------------------------------------------------------------------------
# CLI and bad input
# ----------------------------------------------------------------------------------------------
def test_presets():
    toy = ppo.parse_args([])
    assert toy.dataset == "toy_data/prompts" and toy.gold_reward_fn == "toy_task:gold_score"
    assert ppo.parse_args(["--learning_rate", "1e-4"]).learning_rate == 1e-4
    pythia = ppo.parse_args(["pythia-tldr", "--seed", "3"])
    assert pythia.learning_rate == 3e-6 and pythia.kl_coef == 0.05 and pythia.response_length == 53 and pythia.seed == 3
    assert pythia.gold_reward_fn is None and pythia.missing_eos_penalty == -1.0


@pytest.mark.parametrize("extra, message", [
    (["--prompt_column", "nope"], "has no column 'nope'"),
    (["--dataset", "/nonexistent/prompts"], "does not exist"),
    (["--num_minibatches", "3"], "not divisible by num_minibatches"),
    (["--total_episodes", "8"], "less than one batch"),
    (["--gold_reward_fn", "toy_task"], "module:function"),
    (["--gold_reward_fn", "no_such_module_xyz:f"], "cannot be imported"),
    (["--max_prompt_length", "2"], "longer than max_prompt_length"),
])
def test_bad_input_one_line_error(toy_dir, standin_rm, tmp_path, monkeypatch, extra, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        ppo.main(tiny_args(toy_dir, standin_rm, tmp_path / "o", *extra))
    assert message in str(exc.value) and "\n" not in str(exc.value)
    assert not (tmp_path / "o").exists()


# every flag of ppo.py before the critic-free family moved to grpo.py
FLAGS_BEFORE_THE_SPLIT = """sft_model reward_model ensemble uwo_coef reward_fn dataset prompt_column prompt_format
implicit_prompt_marker stop_tokens train_split eval_split max_prompt_length truncate_long_prompts max_dropped_fraction
output_dir save add_pad_token rm_retokenize run_name seed dtype compile frozen_dtype gradient_checkpointing
offload_critic lora_r lora_alpha lora_target_modules gold_reward_fn total_episodes batch_size response_length
temperature missing_eos_penalty reward_clip samples_per_prompt local_rollout_forward_batch_size kl_coef kl_estimator
kl_in_reward kl_loss_estimator adaptive_kl kl_target kl_horizon whiten_rewards gamma lam whiten_advantages
advantage_estimator num_ppo_epochs num_minibatches micro_batch_size cliprange cliprange_high dual_clip entropy_coef
loss_aggregation critic_warmup_updates cliprange_value vf_coef learning_rate anneal_lr adam_eps weight_decay
max_grad_norm reuse_first_forward critic_init value_head_on_policy eval_every eval_samples eval_batch_size
eval_temperature sample_every num_sample_rows checkpoint_every checkpoint_dir resume overwrite""".split()


def test_flags_kept_or_moved_to_grpo():
    """ppo.py keeps every flag name it had, but for the critic-free family's, which grpo.py has now; a user of one
    of those gets one line naming grpo.py, in place of tyro's usage box."""
    import dataclasses

    import grpo

    ppo_flags = {f.name for f in dataclasses.fields(ppo.Args)}
    moved = {flag.removeprefix("--") for flag in ppo.MOVED_TO_GRPO}
    assert ppo_flags | moved >= set(FLAGS_BEFORE_THE_SPLIT) and not ppo_flags & moved  # flags added since: fine
    assert moved <= {f.name for f in dataclasses.fields(grpo.Args)}
    for flag in ppo.MOVED_TO_GRPO:
        with pytest.raises(SystemExit, match=f"{flag}: .* in grpo.py now: python grpo.py {flag}"):
            ppo.parse_args([flag, "1"])


def test_reward_fn_alone_replaces_the_rm(capsys):
    """--reward_fn with --reward_model and --critic_init left at their defaults: the function replaces the RM and the
    critic starts from the SFT model, said in one line. Either one given explicitly next to it is still an error."""
    import grpo

    args = ppo.parse_args(["--reward_fn", "toy_task:gold_score"])
    assert args.reward_model is None and args.critic_init == "sft"
    assert "replaces the reward model; the critic starts from the SFT model" in capsys.readouterr().out
    ppo.check_args(args)
    with pytest.raises(SystemExit, match="pass --critic_init sft"):
        ppo.check_args(ppo.parse_args(["--reward_fn", "toy_task:gold_score", "--critic_init", "rm"]))
    with pytest.raises(SystemExit, match="give exactly one"):
        ppo.check_args(ppo.parse_args(["--reward_fn", "toy_task:gold_score", "--reward_model", "models/rm"]))
    assert ppo.parse_args(["--value_head_on_policy", "--reward_fn", "toy_task:gold_score"]).critic_init == "rm"
    assert grpo.parse_args(["--reward_fn", "toy_task:gold_score"]).reward_model is None
    assert ppo.parse_args([]).reward_model == ["models/rm"]  # no --reward_fn: nothing changes
