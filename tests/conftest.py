"""Shared fixtures: a tiny toy task built once per test session, and a helper to run a stage script."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


@pytest.fixture(scope="session")
def toy_dir(tmp_path_factory):
    """toy_data at test scale: small splits and a 2-layer, 64-wide GPT-NeoX."""
    import toy_task

    out = str(tmp_path_factory.mktemp("toy") / "toy_data")
    toy_task.build(toy_task.Args(out_dir=out, n_sft=2000, n_prefs=2000, n_prompts=400, hidden_size=64, num_layers=2))
    return out


def run_script(script: str, *args: str, nproc: int = 1, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run `python script ...` (or torchrun with nproc processes) from the repo root; fail loudly."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    if nproc == 1:
        cmd = [sys.executable, script, *args]
    else:
        env["OMP_NUM_THREADS"] = "1"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", script, *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def run_script_expect_error(script: str, *args: str, timeout: int = 120) -> str:
    """Run a script that must fail; return its last stderr line (the one-line error)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, script, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode != 0, f"{script} {args} should have failed:\n{proc.stdout[-2000:]}"
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""
