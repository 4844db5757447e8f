"""The whole toy pipeline in one command: build the task, then SFT, RM and PPO, then a summary table.

    python pipeline.py                    # ~3 minutes on 2 CPU cores; writes toy_data/ and models/
    python pipeline.py --nproc 2          # every stage under torchrun --nproc_per_node=2 (FSDP2, gloo)
    python pipeline.py --ppo_args="--kl_coef 0.1 --seed 2"   # extra flags for one stage
    python pipeline.py --dpo              # also dpo.py after the RM, and a DPO column in the summary

Each stage runs as its own process with exactly the command a user would type (`python sft.py ...`), so
this file only sequences them and reads back their `eval_results.json`. The table it prints compares the
SFT and PPO policies on the held-out prompts (ppo.py's final evaluation) and states the reward model's
validation accuracy beside the Bayes ceiling the toy data records. The same table goes to
`{models_dir}/pipeline_summary.json`.

It runs from any directory: the scripts are found beside this file, and every path (--data_dir, --models_dir,
runs/) is relative to where you run it. SIGTERM and Ctrl-C go on to the running stage, which checkpoints and
exits (143 or 130); pipeline.py then says which stage stopped and exits with the same status.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import NoReturn

import tyro

HERE = os.path.dirname(os.path.abspath(__file__))  # the stage scripts sit beside this file, wherever it runs from
# passed on to the running stage; SIGHUP too, as a stage in its own session no longer gets the terminal's hangup
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@dataclass
class Args:
    data_dir: str = "toy_data"
    """where toy_task.py writes the task (rebuilt with --overwrite, so the task is always the code's)"""
    models_dir: str = "models"
    """sft/, rm/ and ppo/ go here, each stage run with --overwrite (the pipeline always starts afresh)"""
    seed: int = 1
    """seed of SFT, RM and PPO; the toy task keeps its own fixed seed, so it is the same task every run"""
    nproc: int = 1
    """processes per stage; > 1 runs each stage under torchrun with FSDP2"""
    toy_args: str = ""
    sft_args: str = ""
    rm_args: str = ""
    ppo_args: str = ""
    """extra flags for one stage, e.g. --ppo_args='--kl_coef 0.1'"""
    dpo: bool = False
    """also run dpo.py after the RM: the SFT model trained on the RM's preference pairs, evaluated as PPO is (the same
    held-out prompts, scored by the same RM); the summary gets a DPO column"""
    dpo_args: str = ""
    """extra flags for dpo.py, e.g. --dpo_args='--beta 0.3'"""
    run_prefix: str = "pipeline"
    """TensorBoard runs are runs/{run_prefix}_{sft,rm,ppo}"""


# ----------------------------------------------------------------------------------------------
# Checks of the flags, before any stage starts: a one-line error naming the flag and the fix
# ----------------------------------------------------------------------------------------------
STAGE_OUTPUT_FLAG = {"toy": "out_dir", "sft": "output_dir", "rm": "output_dir", "ppo": "output_dir",
                     "dpo": "output_dir"}


def check_args(args: Args) -> dict[str, list[str]]:
    """Refuse bad flags before any stage runs; return each stage's extra flags, split as a shell would."""
    if args.nproc < 1:
        raise SystemExit(f"pipeline: --nproc {args.nproc}: a stage needs at least one process; pass --nproc 1, "
                         "or --nproc N > 1 for torchrun with N processes")
    extra = {stage: stage_flags(args, stage) for stage in STAGE_OUTPUT_FLAG}
    check_dirs(args.data_dir, args.models_dir)
    return extra


def stage_flags(args: Args, stage: str) -> list[str]:
    """--{stage}_args split into flags; the output dir stays pipeline.py's, since the next stages read it there."""
    flag, own = f"--{stage}_args", STAGE_OUTPUT_FLAG[stage]
    try:
        flags = shlex.split(getattr(args, f"{stage}_args"))
    except ValueError as e:  # e.g. an unclosed quote
        raise SystemExit(f"pipeline: {flag}: {e}; give the stage's flags as one quoted string, "
                         f"e.g. {flag}='--seed 2'") from None
    if any(f.startswith("--") and f[2:].split("=", 1)[0].replace("-", "_") == own for f in flags):
        where = "--data_dir" if stage == "toy" else "--models_dir"
        raise SystemExit(f"pipeline: {flag} sets --{own}, which pipeline.py sets itself "
                         f"(the next stages read it there); pass {where} to pipeline.py instead")
    return flags


def check_dirs(data_dir: str, models_dir: str) -> None:
    """toy_task.py --overwrite deletes --data_dir before it rebuilds it: refuse any directory that holds
    something else, and a --models_dir that overlaps it."""
    if is_within(data_dir, models_dir) or is_within(models_dir, data_dir):
        raise SystemExit(f"pipeline: --data_dir '{data_dir}' and --models_dir '{models_dir}' overlap; "
                         "toy_task.py rebuilds --data_dir from scratch, so give them separate directories")
    if is_within(os.getcwd(), data_dir) or is_within(HERE, data_dir) or not is_rebuildable(data_dir):
        raise SystemExit(f"pipeline: --data_dir '{data_dir}' holds files that are not toy_task.py's, which its rebuild "
                         "(toy_task.py --overwrite) would delete; pick a new directory")


def is_within(path: str, parent: str) -> bool:
    path, parent = os.path.realpath(path), os.path.realpath(parent)
    return path == parent or path.startswith(parent.rstrip(os.sep) + os.sep)


def is_rebuildable(data_dir: str) -> bool:
    """Nothing there, an empty directory, or the task toy_task.py wrote (it carries toy_task's marker)."""
    from common import read_marker

    if not os.path.lexists(data_dir):
        return True
    if not os.path.isdir(data_dir):
        return False
    return not os.listdir(data_dir) or (read_marker(data_dir) or {}).get("stage") == "toy_task"


# ----------------------------------------------------------------------------------------------
# Signals: SIGTERM and Ctrl-C go on to the running stage, which checkpoints and exits; then we stop
# ----------------------------------------------------------------------------------------------
@dataclass
class RunningStage:
    """The stage process now running (None between stages) and the signals pipeline.py has received."""
    proc: subprocess.Popen | None = None
    torchrun: bool = False
    received: list[int] = field(default_factory=list)
    unsent: list[int] = field(default_factory=list)  # received while no stage ran: the next one gets them
    sent: int = 0  # signals forwarded to this stage

    def on_signal(self, signum: int, frame) -> None:
        self.received.append(signum)
        if self.proc is None:
            self.unsent.append(signum)
        else:
            self.forward(signum)

    def start(self, proc: subprocess.Popen, torchrun: bool) -> None:
        self.proc, self.torchrun, self.sent = proc, torchrun, 0
        unsent, self.unsent = self.unsent, []  # from here on the handler forwards by itself
        for signum in unsent:
            self.forward(signum)

    def wait(self) -> int:
        code = self.proc.wait()
        self.proc = None
        return code

    def forward(self, signum: int) -> None:
        if self.proc.returncode is not None:  # already reaped: its pid may be another process's by now
            return
        pids = [self.proc.pid]
        if self.torchrun and self.sent > 0:
            # torchrun passes the first signal to its workers and waits for them; a second one (Ctrl-C again: stop
            # at once) must reach the workers themselves, as torchrun would give up waiting and leave them running
            pids = child_pids(self.proc.pid) or pids
        self.sent += 1
        for pid in pids:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:  # it has just exited
                pass


def forward_signals() -> RunningStage:
    running = RunningStage()
    for signum in FORWARDED_SIGNALS:
        signal.signal(signum, running.on_signal)
    return running


def child_pids(pid: int) -> list[int]:
    """The processes `pid` started (from Linux's /proc; none found elsewhere)."""
    pids = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                pids += [int(child) for child in f.read().split()]
    except OSError:
        pass
    return pids


def exit_stopped(name: str, code: int, signum: int, resumable: bool) -> NoReturn:
    """A signal stopped the pipeline during this stage: one line, and the stage's own status (143 after SIGTERM,
    130 after Ctrl-C), else 128 + the signal (torchrun exits 1; a stage killed before it set its handlers has a
    negative code; one that had just finished, 0)."""
    status = code if code > 128 else 128 + signum
    what = signal.Signals(signum).name
    if code == 0:
        line = f"pipeline: {what} came as the {name} stage finished; stopped before the next stage"
    elif resumable:
        line = (f"pipeline: {what} stopped the {name} stage (exit {status}); if its line above reports a checkpoint, "
                "its command above with --resume continues from there")
    else:
        line = f"pipeline: {what} stopped the {name} stage (exit {status}); run pipeline.py again to start over"
    print(line, file=sys.stderr, flush=True)
    raise SystemExit(status)


# ----------------------------------------------------------------------------------------------
# The stages, and the summary
# ----------------------------------------------------------------------------------------------
def run_stage(name: str, script: str, flags: list[str], nproc: int, running: RunningStage,
              resumable: bool = True) -> float:
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                    f"--nproc_per_node={nproc}"]
    cmd = launcher + [os.path.join(HERE, script)] + flags  # the child's cwd is ours: its paths mean what ours do
    print(f"\n=== {name}: {shlex.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    # a session of its own: a terminal's Ctrl-C reaches pipeline.py alone, which forwards it once (in our process
    # group the stage would get it twice, and a second Ctrl-C means "stop at once, without a checkpoint")
    running.start(subprocess.Popen(cmd, start_new_session=True), torchrun=nproc > 1)
    code = running.wait()
    if running.received:
        exit_stopped(name, code, running.received[0], resumable)
    if code != 0:
        raise SystemExit(f"pipeline: the {name} stage failed (command above); fix it and re-run pipeline.py")
    return time.perf_counter() - t0


def read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def summary_rows(rm: dict, ppo: dict, dpo: dict | None = None) -> list[tuple[str, ...]]:
    """(metric, SFT, PPO) rows of the final table, from the stages' eval_results.json; with `dpo` (dpo.py's, evaluated
    on the same prompts with the same samples of the SFT policy) a DPO column too."""
    s, p = ppo["sft"], ppo["ppo"]
    rows = [
        ("gold score (toy_task.gold_score)", f"{s['gold_score']:.3f}", f"{p['gold_score']:.3f}"),
        ("RM score (normalised)", f"{s['rm_score']:.3f}", f"{p['rm_score']:.3f}"),
        ("gold win rate vs SFT", "0.5", f"{ppo['gold_win_rate']:.3f}"),
        ("KL to reference (nats/response)", f"{s['kl']:.2f}", f"{p['kl']:.2f}"),
        ("response length (tokens)", f"{s['response_length']:.1f}", f"{p['response_length']:.1f}"),
        ("EOS rate", f"{s['eos_rate']:.3f}", f"{p['eos_rate']:.3f}"),
    ]
    if dpo is not None:
        d = dpo["dpo"]
        column = [f"{d['gold_score']:.3f}", f"{d['rm_score']:.3f}", f"{dpo['gold_win_rate']:.3f}", f"{d['kl']:.2f}",
                  f"{d['response_length']:.1f}", f"{d['eos_rate']:.3f}"]
        rows = [(*row, value) for row, value in zip(rows, column)]
    acc = f"RM validation accuracy {rm['val_accuracy']:.3f}"
    if rm.get("bayes_ceiling"):
        acc += f" (Bayes ceiling {rm['bayes_ceiling']:.3f}: {rm['val_accuracy'] / rm['bayes_ceiling']:.1%})"
    if dpo is not None:
        acc += f"; DPO's implicit reward {dpo['val_accuracy']:.3f}"
    rows.append((acc, *[""] * (len(rows[0]) - 1)))
    return rows


def print_table(rows: list[tuple[str, ...]], num_prompts: int) -> None:
    w = max(len(r[0]) for r in rows[:-1])
    print(f"\nHeld-out prompts: {num_prompts}")
    print(f"{'':{w}}" + "".join(f"  {name:>8}" for name in ("SFT", "PPO", "DPO")[: len(rows[0]) - 1]))
    for name, *values in rows[:-1]:
        print(f"{name:{w}}" + "".join(f"  {v:>8}" for v in values))
    print(rows[-1][0])


def main(args: Args) -> dict:
    extra = check_args(args)
    running = forward_signals()
    sft_dir, rm_dir, ppo_dir = (os.path.join(args.models_dir, d) for d in ("sft", "rm", "ppo"))
    s, p = str(args.seed), args.run_prefix
    times = {}
    times["toy_task"] = run_stage("toy task", "toy_task.py", ["--out_dir", args.data_dir, "--overwrite", *extra["toy"]],
                                  1, running, resumable=False)
    times["sft"] = run_stage("SFT", "sft.py", [
        "--dataset", f"{args.data_dir}/sft", "--model_name_or_path", f"{args.data_dir}/base_model",
        "--output_dir", sft_dir, "--seed", s, "--overwrite", "--run_name", f"{p}_sft",
        *extra["sft"]], args.nproc, running)
    times["rm"] = run_stage("reward model", "train_rm.py", [
        "--dataset", f"{args.data_dir}/prefs", "--model_name_or_path", sft_dir,
        "--output_dir", rm_dir, "--seed", s, "--overwrite",
        "--run_name", f"{p}_rm", *extra["rm"]], args.nproc, running)
    if args.dpo:  # the SFT model on the RM's preference pairs; evaluated by the RM on PPO's held-out prompts
        times["dpo"] = run_stage("DPO", "dpo.py", [
            "--model_name_or_path", sft_dir, "--reward_model", rm_dir, "--dataset", f"{args.data_dir}/prefs",
            "--prompt_dataset", f"{args.data_dir}/prompts", "--output_dir", os.path.join(args.models_dir, "dpo"),
            "--seed", s, "--overwrite", "--run_name", f"{p}_dpo", *extra["dpo"]], args.nproc, running)
    times["ppo"] = run_stage("PPO", "ppo.py", [
        "--sft_model", sft_dir, "--reward_model", rm_dir, "--dataset", f"{args.data_dir}/prompts",
        "--output_dir", ppo_dir, "--seed", s, "--overwrite", "--run_name", f"{p}_ppo",
        *extra["ppo"]], args.nproc, running)

    rm, ppo = read_json(f"{rm_dir}/eval_results.json"), read_json(f"{ppo_dir}/eval_results.json")
    dpo = read_json(os.path.join(args.models_dir, "dpo", "eval_results.json")) if args.dpo else None
    rows = summary_rows(rm, ppo, dpo)
    print_table(rows, ppo["num_eval_prompts"])
    total = sum(times.values())
    print("wall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()) + f"; total {total:.0f} s")
    summary = {"rows": rows, "wall_time_s": times, "total_wall_time_s": total, "rm": rm,
               "ppo": {k: ppo[k] for k in ("sft", "ppo", "gold_win_rate", "num_eval_prompts")}}
    if dpo is not None:
        summary["dpo"] = {k: dpo[k] for k in ("sft", "dpo", "gold_win_rate", "num_eval_prompts", "val_accuracy")}
    with open(os.path.join(args.models_dir, "pipeline_summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary


if __name__ == "__main__":
    try:
        main(tyro.cli(Args, use_underscores=True))
    except KeyboardInterrupt:  # Ctrl-C before the first stage started (from then on it is forwarded instead)
        print("pipeline: interrupted before the first stage started", file=sys.stderr)
        raise SystemExit(130) from None
