"""Shared fixtures: a tiny toy task and a stand-in reward model built once per test session, and helpers to run a stage script."""

import contextlib
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # in-process runs too: a hub name fails at once, as in CI


@pytest.fixture(scope="session")
def toy_dir(tmp_path_factory):
    """toy_data at test scale: small splits and a 2-layer, 64-wide GPT-NeoX."""
    import toy_task

    out = str(tmp_path_factory.mktemp("toy") / "toy_data")
    toy_task.build(toy_task.Args(out_dir=out, n_sft=2000, n_prefs=2000, n_prompts=400, hidden_size=64, num_layers=2))
    return out


@contextlib.contextmanager
def one_thread():
    """One torch thread for the in-process runs: the models are tiny, and with other processes on the
    cores OpenMP's spin-waiting can make two threads many times slower than one."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@pytest.fixture(scope="session")
def standin_rm(toy_dir, tmp_path_factory):
    """An RM that is easy to raise: regressed for a few seconds onto 4 x (fraction of positive words).

    The policy stand-in is the random base model itself, which emits every word about equally often.
    """
    import toy_task
    from common import load_reward_model, load_tokenizer, save_model

    base = os.path.join(toy_dir, "base_model")
    tok = load_tokenizer(base, "right")
    torch.manual_seed(0)
    model = load_reward_model(base, tok)
    stack = contextlib.ExitStack()
    stack.enter_context(one_thread())  # session-scoped: runs before the module's one-thread fixture
    good = torch.tensor(tok.convert_tokens_to_ids(toy_task.POSITIVE))

    def batch(n=64, width=20):
        ids = torch.randint(5, len(tok), (n, width))
        lengths = torch.randint(4, width + 1, (n,))
        mask = torch.arange(width)[None] < lengths[:, None]
        ids = ids.masked_fill(~mask, tok.pad_token_id)
        return ids, mask.long(), 4 * (torch.isin(ids, good) & mask).float().sum(1) / lengths

    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(120):
        ids, mask, target = batch()
        loss = ((model(input_ids=ids, attention_mask=mask).logits.squeeze(-1) - target) ** 2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    with torch.no_grad():
        ids, mask, _ = batch(256)
        raw = model(input_ids=ids, attention_mask=mask).logits.squeeze(-1)
    stack.close()
    path = str(tmp_path_factory.mktemp("standins") / "rm")
    save_model(model, tok, path, "rm", extra_config={"reward_mean": raw.mean().item(), "reward_std": raw.std().item()})
    return path


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
