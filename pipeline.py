"""The whole toy pipeline in one command: build the task, then SFT, RM and PPO, then a summary table.

    python pipeline.py                    # ~3 minutes on 2 CPU cores; writes toy_data/ and models/
    python pipeline.py --nproc 2          # every stage under torchrun --nproc_per_node=2 (FSDP2, gloo)
    python pipeline.py --ppo_args="--kl_coef 0.1 --seed 2"   # extra flags for one stage

Each stage runs as its own process with exactly the command a user would type (`python sft.py ...`), so
this file only sequences them and reads back their `eval_results.json`. The table it prints compares the
SFT and PPO policies on the held-out prompts (ppo.py's final evaluation) and states the reward model's
validation accuracy beside the Bayes ceiling the toy data records. The same table goes to
`{models_dir}/pipeline_summary.json`.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass

import tyro


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
    run_prefix: str = "pipeline"
    """TensorBoard runs are runs/{run_prefix}_{sft,rm,ppo}"""


def run_stage(name: str, script: str, flags: list[str], nproc: int) -> float:
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]
    cmd = launcher + [script] + flags
    print(f"\n=== {name}: {shlex.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    if subprocess.run(cmd).returncode != 0:
        raise SystemExit(f"pipeline: the {name} stage failed (command above); fix it and re-run pipeline.py")
    return time.perf_counter() - t0


def read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def summary_rows(rm: dict, ppo: dict) -> list[tuple[str, str, str]]:
    """(metric, SFT, PPO) rows of the final table, from the stages' eval_results.json."""
    s, p = ppo["sft"], ppo["ppo"]
    rows = [
        ("gold score (toy_task.gold_score)", f"{s['gold_score']:.3f}", f"{p['gold_score']:.3f}"),
        ("RM score (normalised)", f"{s['rm_score']:.3f}", f"{p['rm_score']:.3f}"),
        ("gold win rate vs SFT", "0.5", f"{ppo['gold_win_rate']:.3f}"),
        ("KL to reference (nats/response)", f"{s['kl']:.2f}", f"{p['kl']:.2f}"),
        ("response length (tokens)", f"{s['response_length']:.1f}", f"{p['response_length']:.1f}"),
        ("EOS rate", f"{s['eos_rate']:.3f}", f"{p['eos_rate']:.3f}"),
    ]
    acc = f"RM validation accuracy {rm['val_accuracy']:.3f}"
    if rm.get("bayes_ceiling"):
        acc += f" (Bayes ceiling {rm['bayes_ceiling']:.3f}: {rm['val_accuracy'] / rm['bayes_ceiling']:.1%})"
    rows.append((acc, "", ""))
    return rows


def print_table(rows: list[tuple[str, str, str]], num_prompts: int) -> None:
    w = max(len(r[0]) for r in rows[:-1])
    print(f"\nHeld-out prompts: {num_prompts}")
    print(f"{'':{w}}  {'SFT':>8}  {'PPO':>8}")
    for name, a, b in rows[:-1]:
        print(f"{name:{w}}  {a:>8}  {b:>8}")
    print(rows[-1][0])


def main(args: Args) -> dict:
    sft_dir, rm_dir, ppo_dir = (os.path.join(args.models_dir, d) for d in ("sft", "rm", "ppo"))
    s, p = str(args.seed), args.run_prefix
    times = {}
    times["toy_task"] = run_stage("toy task", "toy_task.py", ["--out_dir", args.data_dir, "--overwrite", *shlex.split(args.toy_args)], 1)
    times["sft"] = run_stage("SFT", "sft.py", [
        "--dataset", f"{args.data_dir}/sft", "--model_name_or_path", f"{args.data_dir}/base_model",
        "--output_dir", sft_dir, "--seed", s, "--overwrite", "--run_name", f"{p}_sft", *shlex.split(args.sft_args)], args.nproc)
    times["rm"] = run_stage("reward model", "train_rm.py", [
        "--dataset", f"{args.data_dir}/prefs", "--model_name_or_path", sft_dir,
        "--output_dir", rm_dir, "--seed", s, "--overwrite",
        "--run_name", f"{p}_rm", *shlex.split(args.rm_args)], args.nproc)
    times["ppo"] = run_stage("PPO", "ppo.py", [
        "--sft_model", sft_dir, "--reward_model", rm_dir, "--dataset", f"{args.data_dir}/prompts",
        "--output_dir", ppo_dir, "--seed", s, "--overwrite", "--run_name", f"{p}_ppo", *shlex.split(args.ppo_args)], args.nproc)

    rm, ppo = read_json(f"{rm_dir}/eval_results.json"), read_json(f"{ppo_dir}/eval_results.json")
    rows = summary_rows(rm, ppo)
    print_table(rows, ppo["num_eval_prompts"])
    total = sum(times.values())
    print("wall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()) + f"; total {total:.0f} s")
    summary = {"rows": rows, "wall_time_s": times, "total_wall_time_s": total, "rm": rm, "ppo": {k: ppo[k] for k in ("sft", "ppo", "gold_win_rate", "num_eval_prompts")}}
    with open(os.path.join(args.models_dir, "pipeline_summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary


if __name__ == "__main__":
    main(tyro.cli(Args, use_underscores=True))
