"""Reliability: checkpoints and resume (SIGKILL, SIGTERM, torchrun) and non-finite values
(hostile input: test_hostile.py).

The resume tests run a stage three times: once uninterrupted, once stopped as soon as its first checkpoint
lands (a process of its own, killed or sent SIGTERM, in conftest's background runs; on 2 processes, stopped by
conftest's torchrun driver), and once resumed from that checkpoint. The resumed run must end with the same
eval_results.json and the same weights, bit for bit.
"""

import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, one_thread

import common
import ppo
import sft
import train_rm

TIMING_KEYS = ("wall_time_s", "train_time_s", "time_s", "run_name")


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------
def launch(script: str, args: list[str], nproc: int = 1) -> subprocess.Popen:
    """Start a stage as a subprocess (killed with kill_tree, which reaches torchrun's workers too)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, script, *args]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               script, *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, timeout: int = 240) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def kill_tree(pid: int, sig: int) -> None:
    """Signal a process and all its descendants (torchrun starts its workers in sessions of their own)."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            children.setdefault(ppid, []).append(int(entry))
    todo, tree = [pid], []
    while todo:
        tree.append(todo.pop())
        todo += children.get(tree[-1], [])
    for p in reversed(tree):  # the workers first, so that torchrun cannot restart or outlive them
        try:
            os.kill(p, sig)
        except ProcessLookupError:
            pass


def wait_for_checkpoint(proc: subprocess.Popen, checkpoint_dir: str, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not common.checkpoints(checkpoint_dir):
        if proc.poll() is not None:
            raise AssertionError(f"the run ended ({proc.returncode}) before its first checkpoint:\n"
                                 f"{proc.stderr.read()[-3000:]}")
        if time.time() > deadline:
            kill_tree(proc.pid, signal.SIGKILL)
            raise AssertionError("no checkpoint in time")
        time.sleep(0.005)


def results(output_dir) -> dict:
    """eval_results.json without the timings and names that differ between runs by design."""
    def strip(x):
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items() if k not in TIMING_KEYS and not k.startswith(("time/", "eps"))}
        if isinstance(x, list):
            return [strip(v) for v in x]
        return x
    with open(os.path.join(output_dir, "eval_results.json")) as f:
        data = json.load(f)
    data.pop("args", None)  # holds the output_dir
    return strip(data)


def assert_same_weights(dir_a, dir_b) -> None:
    a, b = load_file(os.path.join(dir_a, "model.safetensors")), load_file(os.path.join(dir_b, "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs"


# ----------------------------------------------------------------------------------------------
# Kill, resume, compare
# ----------------------------------------------------------------------------------------------
def sft_flags(toy_dir, out, tb) -> list[str]:
    return ["--model_name_or_path", os.path.join(toy_dir, "base_model"), "--dataset", os.path.join(toy_dir, "sft"),
            "--output_dir", out, "--run_name", tb, "--max_steps", "12", "--batch_size", "32", "--warmup_steps", "2",
            "--eval_every", "6", "--num_eval_samples", "16", "--num_logged_samples", "2", "--max_new_tokens", "16",
            "--checkpoint_every", "4"]


def ppo_flags(toy_dir, rm, out, tb) -> list[str]:
    return ["--sft_model", os.path.join(toy_dir, "base_model"), "--reward_model", rm,
            "--dataset", os.path.join(toy_dir, "prompts"), "--output_dir", out, "--run_name", tb,
            "--total_episodes", "320", "--batch_size", "32", "--response_length", "8", "--learning_rate", "3e-3",
            "--adaptive_kl", "--kl_target", "0.5", "--kl_horizon", "200",  # beta moves: its state must resume too
            "--eval_samples", "32", "--eval_every", "5", "--checkpoint_every", "3"]


def rm_flags(toy_dir, out, tb) -> list[str]:
    return ["--model_name_or_path", os.path.join(toy_dir, "base_model"), "--dataset", os.path.join(toy_dir, "prefs"),
            "--output_dir", out, "--run_name", tb, "--batch_size", "16", "--num_train_pairs", "800",
            "--num_eval_pairs", "64", "--num_train_epochs", "1", "--eval_every", "20", "--checkpoint_every", "10",
            "--num_normalisation_prompts", "32"]


def interrupt(script: str, flags: list[str], out: str, sig: int) -> dict:
    """Start a stage as a process of its own, signal it as soon as its first checkpoint lands, and say how it
    ended."""
    proc = launch(script, flags)
    wait_for_checkpoint(proc, out + "_checkpoints")
    kill_tree(proc.pid, sig)
    rc, stdout, stderr = finish(proc)
    return {"flags": flags, "out": out, "rc": rc, "stdout": stdout, "stderr": stderr,
            "finished": os.path.exists(os.path.join(out, "eval_results.json")),
            "checkpoints": common.checkpoints(out + "_checkpoints")}


def background_runs(toy_dir, standin_rm, tmp) -> dict:
    """The interrupted runs of the resume tests: run in the background from the start of the session (conftest's
    background_runs), on the core the in-process tests leave idle. Each test runs the uninterrupted run and the
    resumed one in-process (one torch thread, as these processes' OMP_NUM_THREADS=1): their starts cost no imports."""
    killed, stopped = str(tmp / "killed"), str(tmp / "stopped")
    return {"ppo_sigkill": functools.partial(interrupt, "ppo.py", ppo_flags(toy_dir, standin_rm, killed,
                                                                            str(tmp / "runs" / "killed")),
                                             killed, signal.SIGKILL),
            "rm_sigterm": functools.partial(interrupt, "train_rm.py", rm_flags(toy_dir, stopped,
                                                                               str(tmp / "runs" / "stopped")),
                                            stopped, signal.SIGTERM)}


# SFT's resume: test_torchrun_two_processes_resume, on 2 processes (the suite's budget)
def test_sigkill_then_resume_is_bit_identical(toy_dir, standin_rm, background_runs, tmp_path, monkeypatch, capsys):
    """PPO killed right after its first checkpoint, resumed: the same results and weights as a run never killed."""
    monkeypatch.chdir(tmp_path)
    whole = str(tmp_path / "whole")
    ppo.main(ppo.parse_args(ppo_flags(toy_dir, standin_rm, whole, str(tmp_path / "runs" / "whole"))))
    run = background_runs["ppo_sigkill"].result()
    assert run["rc"] == -signal.SIGKILL
    assert not run["finished"], "the run finished before the kill"
    step = int(run["checkpoints"][-1].rsplit("_", 1)[1])
    assert step < 10
    killed_flags, killed = run["flags"], run["out"]

    capsys.readouterr()
    ppo.main(ppo.parse_args(killed_flags + ["--resume"]))
    assert f"resumed from {killed}_checkpoints/step_{step}" in capsys.readouterr().out
    assert results(killed) == results(whole)
    assert_same_weights(killed, whole)


def test_sigterm_checkpoints_exits_and_resumes(toy_dir, background_runs, tmp_path, monkeypatch):
    """Preemption: SIGTERM makes the RM write a checkpoint at the end of the step and exit with 143."""
    monkeypatch.chdir(tmp_path)
    whole = str(tmp_path / "whole")
    train_rm.main(train_rm.parse_args(rm_flags(toy_dir, whole, str(tmp_path / "runs" / "whole"))))
    run = background_runs["rm_sigterm"].result()
    assert run["rc"] == 143, run["stderr"][-3000:]
    assert "SIGTERM: checkpoint" in run["stdout"] and "Traceback" not in run["stderr"]
    assert not run["finished"]
    train_rm.main(train_rm.parse_args(run["flags"] + ["--resume"]))
    stopped = run["out"]
    assert results(stopped) == results(whole)
    assert_same_weights(stopped, whole)


def two_process_runs(toy_dir, tmp) -> list:
    """SFT on 2 processes three times (conftest's two_process_runs launches them with the other stages' 2-process
    runs): uninterrupted, in tmp / "sft_whole"; stopped right after its first checkpoint (conftest's driver raises
    in every rank there, so that the run ends without its final save, as if killed), in tmp / "sft_killed"; and
    that run again with --resume."""
    def flags(name):
        return sft_flags(toy_dir, str(tmp / name), str(tmp / "runs" / name))
    sft_py = os.path.join(ROOT, "sft.py")
    return [(sft_py, flags("sft_whole")), (sft_py, flags("sft_killed"), "crash after the first checkpoint"),
            (sft_py, flags("sft_killed") + ["--resume"])]


def test_torchrun_two_processes_resume(two_process_runs):
    """FSDP2 over 2 CPU processes: DCP writes each rank's shards, and the run resumed from its first checkpoint
    matches the uninterrupted one bit for bit. (A process killed for real: test_sigkill_then_resume_is_bit_identical
    on one process, and test_hostile's rank that dies under torchrun.)"""
    whole, killed = two_process_runs["dir"] / "sft_whole", two_process_runs["dir"] / "sft_killed"
    assert f"resumed from {killed}_checkpoints/step_4" in two_process_runs["stdout"]  # not a finished run's refusal
    latest = common.checkpoints(f"{killed}_checkpoints")[-1]
    assert sorted(f for f in os.listdir(latest) if f.startswith("rank")) == ["rank0.pt", "rank1.pt"]
    assert results(killed) == results(whole)
    assert_same_weights(killed, whole)


# ----------------------------------------------------------------------------------------------
# Atomic checkpoints, and resume's own checks
# ----------------------------------------------------------------------------------------------
def test_resume_refuses_other_flags_and_missing_checkpoints(toy_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    def args(*extra):
        return sft.parse_args(sft_flags(toy_dir, str(tmp_path / "o"), "t")[:-2]
                              + ["--checkpoint_every", "0", "--max_steps", "2", "--num_eval_samples", "0",
                                 "--num_logged_samples", "0", *extra])
    with pytest.raises(SystemExit, match="--resume: no checkpoint in"):
        sft.main(args("--resume"))
    sft.main(args())
    assert common.checkpoints(str(tmp_path / "o_checkpoints")) == [str(tmp_path / "o_checkpoints" / "step_2")]
    shutil.rmtree(tmp_path / "o")  # as if it died after the final checkpoint, before the save
    with pytest.raises(SystemExit, match="holds checkpoints of an unfinished run; pass --resume"):
        sft.main(args())
    with pytest.raises(SystemExit, match=r"--resume: the checkpoint was made with --learning_rate 0.003, not 0.001"):
        sft.main(args("--resume", "--learning_rate", "1e-3"))


# ----------------------------------------------------------------------------------------------
# Numerical faults
# ----------------------------------------------------------------------------------------------
def test_nan_reward_stops_at_its_update_and_keeps_the_last_checkpoint(toy_dir, standin_rm, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    real, calls = ppo.rm_scores, []

    def rm_scores_nan_from_update_3(*args, **kwargs):
        calls.append(1)  # call 1 scores the SFT baseline's evaluation, calls 2 and 3 the first two updates
        scores = real(*args, **kwargs)
        return scores * float("nan") if len(calls) >= 4 else scores
    monkeypatch.setattr(ppo, "rm_scores", rm_scores_nan_from_update_3)
    out = tmp_path / "ppo"
    flags = ppo_flags(toy_dir, standin_rm, str(out), str(tmp_path / "tb"))
    with pytest.raises(SystemExit) as info:
        ppo.main(ppo.parse_args(flags + ["--checkpoint_every", "1", "--eval_every", "0", "--gold_reward_fn", "None"]))
    message = str(info.value)
    kept = str(tmp_path / "ppo_checkpoints" / "step_2")
    assert message == (f"non-finite reward at update 3: stopped before the update; last good checkpoint: {kept}. "
                       "Check the reward model (and its reward_mean/reward_std)")
    assert common.checkpoints(str(tmp_path / "ppo_checkpoints")) == [kept]
    assert not out.exists()
