"""Shared fixtures, built once per test session: a tiny toy task, a stand-in reward model, an easy preference set,
and the stages' 2-process runs in one torchrun launch; and helpers to run a stage script."""

import contextlib
import importlib
import inspect
import json
import multiprocessing
import os
import subprocess
import sys
import threading
import traceback

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


@pytest.fixture(scope="session")
def second_rm(standin_rm, tmp_path_factory):
    """A second ensemble member: the stand-in RM with other stored statistics, so its normalised scores differ."""
    import shutil

    path = tmp_path_factory.mktemp("member") / "rm2"
    shutil.copytree(standin_rm, path)
    config = json.loads((path / "config.json").read_text())
    config.update(reward_mean=config["reward_mean"] + 0.5, reward_std=2.0 * config["reward_std"])
    (path / "config.json").write_text(json.dumps(config))
    return str(path)


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


def script_command(script: str, *args: str) -> tuple[list[str], str, dict]:
    """`python script ...` from the repo root: the command, its cwd and its environment."""
    return [sys.executable, script, *args], ROOT, {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}


def last_error_line(proc: subprocess.CompletedProcess) -> str:
    """The last stderr line (the one-line error) of a run that must have failed."""
    assert proc.returncode != 0, f"{proc.args} should have failed:\n{proc.stdout[-2000:]}"
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def run_script_expect_error(script: str, *args: str, timeout: int = 120) -> str:
    """Run a script that must fail; return its last stderr line (the one-line error)."""
    cmd, cwd, env = script_command(script, *args)
    return last_error_line(subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout))


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


class Crash(Exception):
    pass


def crash_after(save_checkpoint):
    # a run that stops right after its first checkpoint, as if killed there: every rank raises at the same step
    def save_then_crash(*args, **kwargs):
        save_checkpoint(*args, **kwargs)
        raise Crash
    return save_then_crash


if __name__ == "__main__":
    # each script as `torchrun script argv` runs it, one after the other in the same 2 processes, on one
    # process group (torn down after the last): the scripts import these two from common when they start
    teardown = common.teardown_distributed
    common.setup_distributed, common.teardown_distributed = the_first_runs_group, wait_for_the_others
    save_checkpoint = common.save_checkpoint
    for script, argv, *crash in json.loads(sys.argv[1]):  # crash: ["crash after the first checkpoint"]
        sys.argv = [script, *argv]
        common.save_checkpoint = crash_after(save_checkpoint) if crash else save_checkpoint
        try:
            runpy.run_path(script, run_name="__main__")
        except Crash:
            dist.barrier()
    teardown()
"""


def call_with_fixtures(hook, request, tmp):
    """A test module's hook (two_process_runs, background_runs) called with the session fixtures its parameters
    name, and tmp for the parameter named tmp."""
    return hook(**{name: tmp if name == "tmp" else request.getfixturevalue(name)
                   for name in inspect.signature(hook).parameters})


class BackgroundRun:
    """A subprocess (command, cwd, env), or a function that drives its own, run in the background; result() waits
    for it and gives the finished process (subprocess.CompletedProcess), or the function's return value."""

    live: list[subprocess.Popen] = []  # killed at the end of the session if still running

    def __init__(self, work, log_dir):
        self.work, self.log_dir = work, log_dir
        self.cwd = None if callable(work) else work[1]
        self.done, self.value, self.error = threading.Event(), None, None

    def run(self) -> None:
        try:
            self.value = self.work() if callable(self.work) else self.run_command(*self.work)
        except BaseException as e:  # raised again in the test that asks for the result
            self.error = e
        finally:
            self.done.set()

    def run_command(self, cmd: list[str], cwd, env: dict) -> subprocess.CompletedProcess:
        # the output goes to files: a pipe that nobody reads would fill and stop the process
        with open(self.log_dir / "stdout.txt", "w+") as out, open(self.log_dir / "stderr.txt", "w+") as err:
            proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=err, text=True)
            self.live.append(proc)
            proc.wait()
            out.seek(0)
            err.seek(0)
            return subprocess.CompletedProcess(cmd, proc.returncode, out.read(), err.read())

    def result(self, timeout: int = 600):
        assert self.done.wait(timeout), f"{self.work} did not finish in {timeout} s"
        if self.error is not None:
            raise self.error
        return self.value


class Worker:
    """One spawned process (one torch thread) that calls functions for the background runs, one at a time: for work
    that holds the GIL, such as fake tensors' Python per op, which a thread of the test process would take from the
    tests. Started by the background_runs fixture before the 2-process launch (else by its first call); its imports
    are paid once for the session."""

    process, pipe = None, None

    @classmethod
    def start(cls, modules: list[str]) -> None:
        """Start the process, which imports these modules (those of the functions it will call) while this one
        goes on."""
        spawn = multiprocessing.get_context("spawn")  # not fork: this process has threads, and torch's state
        cls.pipe, theirs = spawn.Pipe()
        cls.process = spawn.Process(target=serve, args=(theirs, modules), daemon=True)
        cls.process.start()
        theirs.close()

    @classmethod
    def call(cls, function, *args):
        if cls.process is None:
            cls.start([function.__module__])
        cls.pipe.send((function, args))
        try:
            ok, value = cls.pipe.recv()
        except (EOFError, ConnectionError):  # it died: no answer will come; the next call starts another
            process, cls.process = cls.process, None
            process.join(10)
            raise AssertionError(f"the worker process died in {function.__name__} (exit {process.exitcode})") from None
        if not ok:
            raise AssertionError(f"{function.__name__} failed in the worker process:\n{value}")
        return value

    @classmethod
    def stop(cls) -> None:
        if cls.process is not None:
            process, cls.process = cls.process, None  # a later call starts another, as after a death
            process.kill()
            process.join()


def serve(pipe, modules: list[str]) -> None:
    """The worker's loop: (function, args) in, (True, its value) or (False, the traceback) out."""
    torch.set_num_threads(1)
    for module in modules:
        importlib.import_module(module)
    while True:
        function, args = pipe.recv()
        try:
            pipe.send((True, function(*args)))
        except Exception:
            pipe.send((False, traceback.format_exc()))


class in_the_worker:  # noqa: N801 (read as a function: in_the_worker(function, *args))
    """A background run that is function(*args) called in the Worker process. function: defined at the top level
    of a module the worker can import (a test module, or one of the project's), and args and its value picklable."""

    def __init__(self, function, *args):
        self.function, self.args = function, args

    def __call__(self):
        return Worker.call(self.function, *self.args)


def reads_a_background_run(item) -> bool:
    return "background_runs" in inspect.signature(item.function).parameters


def pytest_collection_modifyitems(items) -> None:
    """The tests that read a background run's result go last, in their order: the others run in this process while
    the background runs take the other core, so that few tests wait for one."""
    items.sort(key=reads_a_background_run)  # stable: the order within each part is kept


@pytest.fixture(scope="session", autouse=True)
def background_runs(request, tmp_path_factory):
    """The slow work of the selected tests that needs no test process: runs of the scripts in a process of their
    own, and the planner's fake-tensor plans (in_the_worker), one after another in the background from the start of
    the session (after the 2-process launch, which takes both cores): each has one thread, and takes the core that
    the in-process tests (one thread) leave idle. A module that has such runs gives them by its background_runs():
    {name: (command, cwd, env), a function, or in_the_worker(function, ...)}; like two_process_runs(), it names the
    session fixtures it needs (tmp: a dir of its own). Its test asks this fixture for [name].result()."""
    # the modules of the selected tests that take this fixture by name (it is autouse: every test has it)
    modules = {item.module for item in request.session.items if reads_a_background_run(item)}
    runs = {}
    for module in sorted(modules, key=lambda m: m.__name__):
        if not hasattr(module, "background_runs"):
            continue
        tmp = tmp_path_factory.mktemp(module.__name__)
        for name, work in call_with_fixtures(module.background_runs, request, tmp).items():
            runs[name] = BackgroundRun(work, tmp_path_factory.mktemp(name))
    in_worker = [run.work for run in runs.values() if isinstance(run.work, in_the_worker)]
    if in_worker:  # its imports take seconds of one core, which the 2-process launch leaves partly idle
        Worker.start(sorted({work.function.__module__ for work in in_worker}))
    if any("two_process_runs" in item.fixturenames for item in request.session.items):
        request.getfixturevalue("two_process_runs")
    stopping = threading.Event()

    def run_all():
        for run in runs.values():
            if stopping.is_set():
                return
            run.run()
    thread = threading.Thread(target=run_all, daemon=True)
    thread.start()
    yield runs
    stopping.set()
    for proc in BackgroundRun.live:
        if proc.poll() is None:
            proc.kill()
    Worker.stop()  # a call in progress ends with an EOFError in the thread
    thread.join()


@pytest.fixture(scope="session")
def two_process_runs(request, toy_dir, tmp_path_factory):
    """Every 2-process run of the selected tests in one torchrun launch: each start of a pair of processes costs
    seconds of imports. The runs are the test modules' own, given by their two_process_runs() with the flags
    they choose; each writes under dir / its name. Returns that dir and the launch's stdout."""
    selected = {item.module for item in request.session.items if "two_process_runs" in item.fixturenames}
    tmp = tmp_path_factory.mktemp("two_process_runs")
    runs = []
    for module in sorted(selected, key=lambda m: m.__name__):
        runs += call_with_fixtures(module.two_process_runs, request, tmp)  # tmp: the launch's dir
    driver = tmp / "two_process_runs.py"
    driver.write_text(TWO_PROCESS_DRIVER.format(root=ROOT))
    proc = run_script(str(driver), json.dumps(runs), nproc=2, timeout=900)
    return {"dir": tmp, "stdout": proc.stdout}
