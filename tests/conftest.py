"""Shared fixtures, built once per test session: a tiny toy task, a stand-in reward model, an easy preference set,
and the stages' 2-process runs in one torchrun launch; and helpers to run a stage script."""

import contextlib
import json
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
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", script,
               *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-5000:]}")
    return proc


def run_script_expect_error(script: str, *args: str, timeout: int = 120) -> str:
    """Run a script that must fail; return its last stderr line (the one-line error)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, script, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode != 0, f"{script} {args} should have failed:\n{proc.stdout[-2000:]}"
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


@pytest.fixture(scope="session")
def easy_prefs(toy_dir, tmp_path_factory):
    """A hand-made easy preference set: chosen is a fluent toy completion, rejected the same text cut off
    mid-sentence (last word and final "." dropped). Even the random base model can learn to tell them apart."""
    out = tmp_path_factory.mktemp("easy") / "prefs"
    out.mkdir()
    for split, n in (("train", 512), ("validation", 128)):
        rows = []
        for line in open(os.path.join(toy_dir, "sft", f"{split}.jsonl")):
            r = json.loads(line)
            words = r["completion"].split()
            if len(words) >= 3 and len(rows) < n:
                rows.append({"prompt": r["prompt"], "chosen": r["completion"], "rejected": " ".join(words[:-2])})
        (out / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(out)


# ----------------------------------------------------------------------------------------------
# The stages on 2 processes: the torchrun runs of the whole session in one launch
# ----------------------------------------------------------------------------------------------
TWO_PROCESS_DRIVER = """
import json, os, runpy, sys
sys.path.insert(0, {root!r})
import torch
import torch.distributed as dist

import common


def the_first_runs_group(*args, setup=common.setup_distributed, **kwargs):
    # the first run sets the process group up, the later runs take it as it is: a second init_process_group in
    # the same processes can hang in gloo's rendezvous (one rank through it, the other still waiting)
    if not dist.is_initialized():
        return setup(*args, **kwargs)
    local_rank = int(os.environ["LOCAL_RANK"])
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    return common.Dist(dist.get_rank(), dist.get_world_size(), local_rank, device)


def wait_for_the_others():
    # a run still ends with every rank waiting for the others; the group stays up for the next run
    dist.barrier()


if __name__ == "__main__":
    # each script as `torchrun script argv` runs it, one after the other in the same 2 processes, on one
    # process group (torn down after the last): the scripts import these two from common when they start
    teardown = common.teardown_distributed
    common.setup_distributed, common.teardown_distributed = the_first_runs_group, wait_for_the_others
    for script, argv in json.loads(sys.argv[1]):
        sys.argv = [script, *argv]
        runpy.run_path(script, run_name="__main__")
    teardown()
"""


@pytest.fixture(scope="session")
def two_process_runs(request, toy_dir, tmp_path_factory):
    """Every 2-process run of the selected tests in one torchrun launch: each start of a pair of processes costs
    seconds of imports. The runs are the test modules' own, given by their two_process_runs() with the flags
    they choose; each writes under dir / its name. Returns that dir and the launch's stdout."""
    import test_ppo_runs
    import test_rm
    import test_sft

    selected = {item.module.__name__ for item in request.session.items if "two_process_runs" in item.fixturenames}
    tmp = tmp_path_factory.mktemp("two_process_runs")
    runs = []
    if "test_sft" in selected:
        runs += test_sft.two_process_runs(toy_dir, tmp)
    if "test_rm" in selected:
        runs += test_rm.two_process_runs(toy_dir, request.getfixturevalue("easy_prefs"), tmp)
    if "test_ppo_runs" in selected:
        runs += test_ppo_runs.two_process_runs(toy_dir, request.getfixturevalue("standin_rm"), tmp)
    if "test_memory" in selected:
        import test_memory

        runs += test_memory.two_process_runs(toy_dir, request.getfixturevalue("standin_rm"), tmp)
    driver = tmp / "two_process_runs.py"
    driver.write_text(TWO_PROCESS_DRIVER.format(root=ROOT))
    proc = run_script(str(driver), json.dumps(runs), nproc=2, timeout=900)
    return {"dir": tmp, "stdout": proc.stdout}
