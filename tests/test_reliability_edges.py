"""Reliability at the edges: a finished run left alone by --resume, a full disk at the final save, two runs sharing
one checkpoint dir, and entropy_from_logits on -inf logits. Each test failed on the code before its fix."""

import json
import math
import os
import signal
import socket
import sys

import pytest
import torch

from conftest import ROOT, one_thread

import common
import ppo

from test_hostile import Ctx, long_sft, run_stage, snapshot, wait_for
from test_reliability import kill_tree, launch


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


# ----------------------------------------------------------------------------------------------
# entropy_from_logits: a -inf logit (a top-k or masked sampler) is a token of probability 0, which adds nothing
# ----------------------------------------------------------------------------------------------
def test_entropy_from_logits_with_minus_inf_logits_matches_categorical():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=g, dtype=torch.float64) * 3.0
    keep = torch.rand(3, 5, 11, generator=g) < 0.5
    keep[..., 0] = True  # every row keeps a token
    masked = logits.masked_fill(~keep, float("-inf"))
    for x in (logits, masked, masked.float()):  # ordinary logits, -inf entries, float32 as in training
        expected = torch.distributions.Categorical(logits=x.double()).entropy()
        got = ppo.entropy_from_logits(x)
        assert torch.isfinite(got).all(), got
        tolerance = 1e-12 if x.dtype == torch.float64 else 1e-5
        torch.testing.assert_close(got.double(), expected, atol=tolerance, rtol=tolerance)
    # one token left: H = 0; two equal ones: H = log 2
    one = torch.tensor([0.3, float("-inf"), float("-inf")])
    two = torch.tensor([1.0, 1.0, float("-inf")])
    assert ppo.entropy_from_logits(one).item() == 0.0
    assert ppo.entropy_from_logits(two).item() == pytest.approx(math.log(2))
    # the entropy bonus backpropagates through it: finite gradients, 0 at the -inf logits
    x = masked.clone().requires_grad_(True)
    ppo.entropy_from_logits(x).sum().backward()
    assert torch.isfinite(x.grad).all() and (x.grad[~keep] == 0).all()


def test_entropy_from_logits_is_unchanged_on_ordinary_logits():
    """Bit for bit on finite logits, values and gradients (an entropy bonus trains through it), so that no run moves."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 7, 50, generator=g)
    head = torch.nn.Linear(50, 50)
    weights = torch.linspace(0.1, 1.0, 7)

    def entropy_and_grads(entropy):
        head.zero_grad()
        h = entropy(head(x) * 20.0)  # logits out of a layer, as in training; some probabilities underflow to 0
        (h * weights).sum().backward()
        return h.detach(), head.weight.grad.clone()
    before = entropy_and_grads(lambda logits: logits.logsumexp(-1) - (torch.softmax(logits, -1) * logits).sum(-1))
    after = entropy_and_grads(ppo.entropy_from_logits)
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])


# ----------------------------------------------------------------------------------------------
# A full disk during the final save: safetensors' own error (a Rust I/O error, not an OSError) becomes the same one
# line as a full disk at a checkpoint, and the previous run stays as it was
# ----------------------------------------------------------------------------------------------
def stage_flags(c: Ctx, stage: str, *extra):
    return {"sft": c.sft, "rm": c.rm_, "ppo": c.ppo}[stage](*extra)


@pytest.mark.parametrize("stage", ["sft", "rm", "ppo"])
def test_disk_full_in_safetensors_at_the_final_save(stage, toy_dir, standin_rm, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    c = Ctx(toy_dir, standin_rm, tmp_path)
    module, argv = stage_flags(c, stage, "--overwrite")
    module.main(module.parse_args(argv))  # the previous run
    before = snapshot(c.out)
    import transformers.modeling_utils
    from safetensors import SafetensorError

    def full(tensors, filename, metadata=None):
        # safetensors 0.8 writes a temp file beside the target and renames it; the disk fills in the middle. The
        # message is the library's (its format checked on a real failed write: 'File too large (os error 27)')
        with open(os.path.join(os.path.dirname(filename), ".tmpAbC123"), "wb") as f:
            f.write(b"half a model")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full)
    code = run_stage(module, argv)
    assert isinstance(code, str) and "\n" not in code, code
    assert code.startswith(f"cannot write '{c.out}.tmp': the disk is full; '{c.out}' is unchanged"), code
    assert f"the partial write ({c.out}.tmp) was removed" in code, code
    assert snapshot(c.out) == before
    assert not os.path.exists(c.out + ".tmp")  # the partial save is gone, and the space it took


def test_safetensors_errors_that_are_not_io_errors_are_not_hidden(tmp_path):
    from safetensors import SafetensorError

    with (pytest.raises(SafetensorError, match="shared tensors"),
          common.write_errors(str(tmp_path / "x.tmp"), "unchanged")):
        raise SafetensorError("Some tensors share memory, this will lead to duplicate memory on disk: shared tensors")


# ----------------------------------------------------------------------------------------------
# A finished run is a result: --resume on it says so in one line and changes no file
# ----------------------------------------------------------------------------------------------
def files_state(*roots) -> dict[str, tuple[int, bytes]]:
    """mtime and bytes of every file under the roots."""
    found = {}
    for root in roots:
        for dirpath, _, names in os.walk(root):
            for name in names:
                path = os.path.join(dirpath, name)
                with open(path, "rb") as f:
                    found[path] = (os.stat(path).st_mtime_ns, f.read())
    return found


@pytest.mark.parametrize("stage", ["sft", "rm", "ppo"])
def test_resume_leaves_a_finished_run_alone(stage, toy_dir, standin_rm, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    c = Ctx(toy_dir, standin_rm, tmp_path)
    module, argv = stage_flags(c, stage)
    module.main(module.parse_args(argv))
    last = common.latest_checkpoint(c.out + "_checkpoints")
    assert last and os.path.isfile(os.path.join(c.out, "eval_results.json"))
    before = files_state(tmp_path)  # the run, its checkpoints, its TensorBoard log, its (in-process: kept) locks
    code = run_stage(module, argv + ["--resume"])
    unit = "update" if stage == "ppo" else "step"
    assert code == (f"'{c.out}' holds a run that finished at {unit} {last.rsplit('_', 1)[1]}: --resume has nothing to "
                    "continue and changed no file; pass --overwrite instead of --resume to run it again, or pick "
                    "another --output_dir"), code
    assert files_state(tmp_path) == before


def test_resume_of_a_finished_run_without_its_checkpoints(toy_dir, standin_rm, tmp_path, monkeypatch):
    """The checkpoints deleted after the run (results/sweep.py does): still a finished run, at the step its marker
    keeps."""
    monkeypatch.chdir(tmp_path)
    c = Ctx(toy_dir, standin_rm, tmp_path)
    module, argv = c.sft()
    module.main(module.parse_args(argv))
    import shutil
    shutil.rmtree(c.out + "_checkpoints")
    before = files_state(c.out)
    code = run_stage(module, argv + ["--resume"])
    assert code.startswith(f"'{c.out}' holds a run that finished at step 2: --resume has nothing to continue"), code
    assert files_state(c.out) == before


def test_resume_continues_an_overwrite_run_that_stopped_before_its_final_save(toy_dir, standin_rm, tmp_path,
                                                                              monkeypatch):
    """--overwrite over a finished run, stopped after its first checkpoint: the old run is still in output_dir (the
    final save is atomic), and --resume continues the new run, not the finished one."""
    import sft

    monkeypatch.chdir(tmp_path)
    c = Ctx(toy_dir, standin_rm, tmp_path)
    module, argv = c.sft("--checkpoint_every", "1")
    module.main(module.parse_args(argv))
    finished = files_state(c.out)

    class Stop(Exception):
        pass
    real = sft.save_or_stop

    def stop_after_step_1(step, *a):
        real(step, *a)
        if step == 1:
            raise Stop
    monkeypatch.setattr(sft, "save_or_stop", stop_after_step_1)
    with pytest.raises(Stop):
        module.main(module.parse_args(argv + ["--overwrite", "--learning_rate", "1e-3"]))
    monkeypatch.setattr(sft, "save_or_stop", real)
    assert files_state(c.out) == finished and common.latest_checkpoint(c.out + "_checkpoints").endswith("step_1")
    module.main(module.parse_args(argv + ["--resume", "--learning_rate", "1e-3"]))
    with open(os.path.join(c.out, "eval_results.json")) as f:
        assert f.read() != finished[os.path.join(c.out, "eval_results.json")][1].decode()
    assert common.latest_checkpoint(c.out + "_checkpoints").endswith("step_2")


# ----------------------------------------------------------------------------------------------
# Two runs, one checkpoint dir: the dir is locked as the output dir is, and it belongs to one output dir
# ----------------------------------------------------------------------------------------------
def test_a_second_run_into_the_same_checkpoint_dir_is_refused(toy_dir, standin_rm, tmp_path, monkeypatch):
    """A run in another process holds the checkpoint dir; this one (in-process: its start costs nothing) is refused."""
    monkeypatch.chdir(tmp_path)
    shared = str(tmp_path / "shared_checkpoints")
    first = launch("sft.py", long_sft(toy_dir, str(tmp_path / "a")) + ["--checkpoint_dir", shared])
    try:
        wait_for(lambda: common.checkpoints(shared), first)  # the first run is writing into it
        # --overwrite, as a user told 'checkpoints of an unfinished run' would pass: it would delete the first's
        module, argv = Ctx(toy_dir, standin_rm, tmp_path).sft("--output_dir", str(tmp_path / "b"), "--checkpoint_dir",
                                                              shared, "--overwrite")
        code = run_stage(module, argv)
        assert code.startswith(f"--checkpoint_dir '{shared}' is in use by process {first.pid} "
                               f"on {socket.gethostname()} (sft.py "), code
        assert code.endswith(f"pick another --checkpoint_dir (delete '{shared}.lock' if that run is gone)"), code
        assert not os.path.exists(tmp_path / "b")
        with open(os.path.join(common.latest_checkpoint(shared), "meta.json")) as f:
            assert json.load(f)["args"]["output_dir"] == str(tmp_path / "a")
    finally:
        kill_tree(first.pid, signal.SIGKILL)
        first.wait()


def test_a_checkpoint_dir_of_another_output_dir_is_refused(toy_dir, standin_rm, tmp_path, monkeypatch):
    """One after the other: the second run would take the first's checkpoints for its own (or, with --overwrite,
    delete them)."""
    monkeypatch.chdir(tmp_path)
    c = Ctx(toy_dir, standin_rm, tmp_path)
    shared = str(tmp_path / "shared")
    module, argv = c.sft("--checkpoint_dir", shared)
    module.main(module.parse_args(argv))
    before = files_state(shared)
    other = str(tmp_path / "other")
    for extra in ([], ["--overwrite"], ["--resume"]):
        code = run_stage(module, argv + ["--output_dir", other, *extra])
        assert code == (f"--checkpoint_dir '{shared}' holds the checkpoints of the run in '{c.out}', not of "
                        f"--output_dir '{other}'; pick another --checkpoint_dir"), code
    assert files_state(shared) == before and not os.path.exists(other)


# ----------------------------------------------------------------------------------------------
# torchrun's report: its root cause shows our one line (torch.distributed.elastic's error file), not a link to its docs
# ----------------------------------------------------------------------------------------------
def test_our_line_goes_into_torchruns_error_file(tmp_path, monkeypatch):
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    error_file = str(tmp_path / "error.json")
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", error_file)  # what torchrun gives each worker

    def fails(_):
        raise SystemExit("--batch_size 33 must be divisible by the 2 processes")
    with pytest.raises(SystemExit):
        common.run(fails, lambda: None)
    with open(error_file) as f:
        written = f.read()
    # the agent's own reader and report (torch.distributed.elastic), as torchrun prints it
    report = ChildFailedError("sft.py", {0: ProcessFailure(local_rank=0, pid=123, exitcode=1,
                                                           error_file=error_file)}).format_msg()
    assert "traceback : --batch_size 33 must be divisible by the 2 processes" in report, report
    assert "To enable traceback" not in report
    with pytest.raises(SystemExit):  # a later line does not replace the first (the root cause is the earliest)
        common.run(lambda _: common.on_rank0(lambda: fails(None)), lambda: None)
    with open(error_file) as f:
        assert f.read() == written


def background_runs(toy_dir, tmp) -> dict:
    """torchrun with a path refused after the process group starts: run in the background from the start of the
    session (conftest's background_runs), on the core the in-process tests leave idle."""
    notes = tmp / "notes.txt"
    notes.write_text("my notes")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return {"torchrun_refused_output_dir": (
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "sft.py",
         "--model_name_or_path", os.path.join(toy_dir, "base_model"), "--dataset", os.path.join(toy_dir, "sft"),
         "--output_dir", str(notes)], ROOT, env)}


def test_torchrun_report_names_our_line(background_runs):
    """A path refused after the process group starts (rank 0 checks it, rank 1 stops with it), on 2 processes: our
    line, then torchrun's report, whose root cause repeats it whichever rank torchrun saw stop first."""
    proc = background_runs["torchrun_refused_output_dir"].result()
    notes = proc.args[proc.args.index("--output_dir") + 1]
    line = f"--output_dir '{notes}' is a file, not a dir; pick another --output_dir"
    with open(notes) as f:
        assert proc.returncode == 1 and f.read() == "my notes"
    assert line in proc.stderr.split("ChildFailedError")[0], proc.stderr  # above the report
    failures, root_cause = proc.stderr.split("Root Cause")
    assert f"traceback : {line}" in root_cause, proc.stderr
    assert "To enable traceback" not in failures, proc.stderr  # the other rank's entry too
