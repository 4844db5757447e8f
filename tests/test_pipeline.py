"""pipeline.py: the one-command toy pipeline, at test scale, run from a directory other than the repo's."""

import functools
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT

PIPELINE = os.path.join(ROOT, "pipeline.py")
TINY_TOY = "--toy_args=--n_sft 400 --n_prefs 400 --n_prompts 100 --hidden_size 32 --num_layers 1"
# one OpenMP thread per stage: the models are 32 wide, and two threads waiting for each other made the stages
# slower, not faster (the PPO stage took 18 s instead of 11 s on this suite's 2-core machine)
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
       "OMP_NUM_THREADS": "1"}


def run_pipeline(cwd, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python /abs/path/pipeline.py ...` run from `cwd`, as a user elsewhere would."""
    return subprocess.run([sys.executable, PIPELINE, *args], cwd=cwd, env=ENV, capture_output=True, text=True,
                          timeout=timeout)


def test_pipeline_runs_every_stage_and_prints_the_summary(background_runs):
    run = background_runs["pipeline_every_stage"]
    proc, tmp_path = run.result(), run.cwd
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    models = tmp_path / "models"
    for stage in ("sft", "rm", "ppo"):
        assert (models / stage / "config.json").exists()
        assert (tmp_path / "runs" / f"pipeline_{stage}").is_dir()  # TensorBoard runs/ is relative to the cwd too
    assert (tmp_path / "toy" / "base_model" / "config.json").exists()
    summary = json.loads((models / "pipeline_summary.json").read_text())
    ppo = json.loads((models / "ppo" / "eval_results.json").read_text())
    rm = json.loads((models / "rm" / "eval_results.json").read_text())
    rows = {name: (sft, after) for name, sft, after in summary["rows"]}
    # the table reads the stages' own results, formatted, and states the RM beside its ceiling
    assert rows["gold win rate vs SFT"][1] == f"{ppo['gold_win_rate']:.3f}"
    assert rows["KL to reference (nats/response)"] == ("0.00", f"{ppo['ppo']['kl']:.2f}")
    assert rows["EOS rate"] == (f"{ppo['sft']['eos_rate']:.3f}", f"{ppo['ppo']['eos_rate']:.3f}")
    rm_row = f"RM validation accuracy {rm['val_accuracy']:.3f} (Bayes ceiling {rm['bayes_ceiling']:.3f}"
    assert rm_row in summary["rows"][-1][0]
    assert set(summary["wall_time_s"]) == {"toy_task", "sft", "rm", "ppo"}
    assert "gold win rate vs SFT" in proc.stdout and "Bayes ceiling" in proc.stdout


def test_pipeline_stops_at_a_failing_stage(background_runs):
    run = background_runs["pipeline_failing_stage"]
    proc = run.result()
    assert proc.returncode == 1
    assert "the toy task stage failed" in proc.stderr.strip().splitlines()[-1], proc.stderr[-3000:]
    assert not (run.cwd / "m").exists()


# ----------------------------------------------------------------------------------------------
# Signals: forwarded once to the stage, which checkpoints; pipeline.py exits with the stage's status
# ----------------------------------------------------------------------------------------------
def children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def sft_checkpoints(models) -> list[str]:
    path = models / "sft_checkpoints"
    if not path.is_dir():
        return []
    return sorted(d for d in os.listdir(path) if d.startswith("step_") and not d.endswith(".tmp"))


def interrupt_the_pipeline(tmp, sig: signal.Signals) -> dict:
    """pipeline.py signalled once SFT is in its training loop; what it and the SFT stage did. Leaves nothing
    running."""
    models = tmp / "models"
    with open(tmp / "out.txt", "w") as out, open(tmp / "err.txt", "w") as err:
        proc = subprocess.Popen([sys.executable, PIPELINE, "--data_dir", "toy", "--models_dir", "models", TINY_TOY,
                                 "--sft_args=--num_train_epochs 50 --checkpoint_every 1 --num_eval_samples 16"],
                                cwd=tmp, env=ENV, stdout=out, stderr=err)
    stage = None
    try:
        deadline = time.time() + 120
        while not sft_checkpoints(models):  # SFT's first step is done: it is in its training loop
            assert proc.poll() is None, (f"pipeline.py ended ({proc.returncode}):\n"
                                         f"{(tmp / 'err.txt').read_text()[-3000:]}")
            assert time.time() < deadline, "SFT wrote no checkpoint in time"
            time.sleep(0.02)
        (stage,) = children(proc.pid)  # the SFT process
        os.kill(proc.pid, sig)  # pipeline.py only: it must pass the signal on
        proc.wait(timeout=120)
    finally:
        for pid in (proc.pid, stage):  # on failure, leave nothing running
            if pid and alive(pid):
                os.kill(pid, signal.SIGKILL)
        proc.wait()
    return {"status": proc.returncode, "stage_alive": alive(stage), "models": models,
            "out": (tmp / "out.txt").read_text(), "err": (tmp / "err.txt").read_text()}


def background_runs(tmp) -> dict:
    """The whole pipeline, one whose first stage fails, and one interrupted by each signal of SIGNALS: run in the
    background from the start of the session (conftest's background_runs), on the core the in-process tests leave
    idle."""
    for name in ("every_stage", "failing", *(sig.name for sig, _ in SIGNALS)):
        (tmp / name).mkdir()
    # from a dir of its own, with relative paths: the scripts are found beside pipeline.py, the outputs land there
    every_stage = [sys.executable, PIPELINE, "--data_dir", "toy", "--models_dir", "models", TINY_TOY,
                   "--sft_args=--num_train_epochs 1 --num_eval_samples 16",
                   "--rm_args=--num_train_epochs 1 --num_normalisation_prompts 16",
                   "--ppo_args=--total_episodes 64 --batch_size 32 --eval_samples 16 --response_length 8"]
    failing = [sys.executable, PIPELINE, "--data_dir", "toy", "--models_dir", "m", "--toy_args=--no_such_flag 1"]
    runs = {"pipeline_every_stage": (every_stage, tmp / "every_stage", ENV),
            "pipeline_failing_stage": (failing, tmp / "failing", ENV)}
    for sig, _ in SIGNALS:
        runs[f"pipeline_{sig.name}"] = functools.partial(interrupt_the_pipeline, tmp / sig.name, sig)
    return runs


# Ctrl-C: the stage checkpoints and exits 130 (common.catch_signals), and the pipeline with it. SIGTERM takes the
# same handler here (pipeline.RunningStage.on_signal); a stage's own SIGTERM (exit 143) is test_reliability's
# test_sigterm_checkpoints_exits_and_resumes. One signal only: the suite's budget
SIGNALS = [(signal.SIGINT, 130)]


@pytest.mark.parametrize("sig, status", SIGNALS, ids=[sig.name for sig, _ in SIGNALS])
def test_a_signal_to_the_pipeline_checkpoints_the_running_stage(sig, status, background_runs):
    run = background_runs[f"pipeline_{sig.name}"].result()
    models = run["models"]
    assert run["status"] == status, run["err"][-3000:]
    assert not run["stage_alive"], "the SFT stage outlived pipeline.py"
    assert "Traceback" not in run["err"], run["err"][-3000:]
    assert f"{sig.name}: checkpoint" in run["out"]  # the stage's own line
    assert f"pipeline: {sig.name} stopped the SFT stage (exit {status})" in run["err"]
    assert sft_checkpoints(models)
    assert not (models / "sft" / "eval_results.json").exists() and not (models / "rm").exists()


# ----------------------------------------------------------------------------------------------
# Bad flags: one line naming the flag and the fix, before any stage starts
# ----------------------------------------------------------------------------------------------
BAD_FLAGS = {
    "no processes": (["--nproc", "0"], "pipeline: --nproc 0: a stage needs at least one process; pass --nproc 1"),
    "negative processes": (["--nproc", "-2"], "pipeline: --nproc -2: a stage needs at least one process"),
    "unclosed quote": (["--sft_args=--seed '2"], "pipeline: --sft_args: No closing quotation"),
    "a stage's output dir": (["--ppo_args=--output-dir elsewhere"],
                             "--ppo_args sets --output_dir, which pipeline.py sets itself"),
    "data dir holds other files": (["--data_dir", "mine"], "--data_dir 'mine' holds files that are not toy_task.py's"),
    "models inside the data dir": (["--data_dir", "toy", "--models_dir", "toy/models"], "overlap"),
}


@pytest.mark.parametrize("case", list(BAD_FLAGS))
def test_bad_flags_stop_before_any_stage(case, tmp_path):
    flags, message = BAD_FLAGS[case]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("not the toy task")
    proc = run_pipeline(tmp_path, *flags, timeout=60)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1 and message in lines[0], proc.stderr
    assert "===" not in proc.stdout  # no stage started
    assert sorted(os.listdir(tmp_path)) == ["mine"]
    assert (tmp_path / "mine" / "notes.txt").read_text() == "not the toy task"


def test_pipeline_reads_the_marker_common_writes(tmp_path):
    """pipeline.py reads the toy task's marker without importing common: the same file name, and a dir common
    marked as toy_task's is one the rebuild may replace; one marked by another stage is not."""
    import common
    import pipeline

    assert pipeline.MARKER == common.MARKER
    for stage, rebuildable in (("toy_task", True), ("sft", False)):
        marked = tmp_path / stage
        marked.mkdir()
        common.write_marker(str(marked), stage)
        assert pipeline.is_rebuildable(str(marked)) == rebuildable
