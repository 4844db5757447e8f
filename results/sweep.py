"""Runs every experiment behind results/README.md: the beta sweep, the ablations and the RM-size study; the advantage
estimators (ppo.py's GAE against grpo.py's GRPO, RLOO and REINFORCE++), the loss details, PPO against the gold
scorer, RM ensembles, and DPO (dpo.py) against all of them.

    python results/sweep.py                        # all groups, 2 runs at a time with 1 thread each
    python results/sweep.py --groups beta --jobs 1 --threads 2
    python results/plots.py                        # then: tables and figures from the TensorBoard logs

Prerequisite: the default pipeline (`python pipeline.py`), whose models/sft and models/rm every PPO run
starts from. Each run is a plain `python ppo.py ...` (or `grpo.py`, `train_rm.py`) command; its TensorBoard log goes
to runs/sweeps/<group>/<name>_s<seed> and its output dir to sweeps/<group>/<name>_s<seed>. A run whose
eval_results.json already exists is skipped, and a run interrupted after a checkpoint continues from it
(--resume), so an interrupted sweep resumes where it stopped.

The beta runs evaluate on the 512 held-out prompts every 20 updates (--eval_every 20), the others only
before and after training. Evaluation samples from its own seed (ppo.py forks the RNG), so this changes no
training number; it only adds the points of the KL-reward curves. The default rows are therefore the same
runs as `python pipeline.py --seed N`, up to the thread count (floating-point sums in another order).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import tyro

SEEDS = (1, 2, 3)
BETAS = (0.0, 0.01, 0.03, 0.05, 0.1, 0.3)  # 0.05 is ppo.py's default
# each ablation flips one implementation detail of ppo.py's default
ABLATIONS = {
    "no_eos_penalty": ["--missing_eos_penalty", "None"],
    "whiten_rewards": ["--whiten_rewards"],
    "critic_from_sft": ["--critic_init", "sft"],
    "adaptive_kl": ["--adaptive_kl"],
    "kl_as_loss": ["--no_kl_in_reward"],
    "no_advantage_whitening": ["--no_whiten_advantages"],
    "ppo_epochs_1": ["--num_ppo_epochs", "1"],
}
RM_PAIRS = (3000, 10000, 30000)  # "all" (240000) is the default RM
# the estimators at the default episodes: GAE is ppo.py, the critic-free ones grpo.py, whose group methods sample each
# prompt 4 times (batch: 16 prompts x 4). GRPO as Shao et al. 2024: the KL as a k3 loss term (grpo.py's defaults);
# RLOO and REINFORCE++ keep it in the reward, as their papers. Each flag list starts with its script.
ESTIMATORS = {
    "gae": ["ppo.py"],
    "grpo": ["grpo.py", "--advantage_estimator", "grpo", "--samples_per_prompt", "4"],
    "rloo": ["grpo.py", "--advantage_estimator", "rloo", "--samples_per_prompt", "4", "--kl_in_reward"],
    "reinforce_pp": ["grpo.py", "--advantage_estimator", "reinforce_pp", "--samples_per_prompt", "1", "--kl_in_reward"],
}
# one loss detail each on top of ppo.py's default (the estimators group's gae runs have the default flags)
LOSS_DETAILS = {
    "dual_clip3": ["--dual_clip", "3"],
    "entropy0.01": ["--entropy_coef", "0.01"],
    "critic_warmup5": ["--critic_warmup_updates", "5"],
}
# the loss details that came with the critic-free family, on top of grpo.py's default (the estimators group's grpo
# runs). Before the split they ran on ppo.py, with its critic (commit 787c9cb; results/README.md says so)
GRPO_LOSS_DETAILS = {
    "cliprange_high0.28": ["--cliprange_high", "0.28"],
    "seq_mean_token_mean": ["--loss_aggregation", "seq_mean_token_mean"],
    "seq_mean_token_sum_norm": ["--loss_aggregation", "seq_mean_token_sum_norm"],
}
# PPO against the gold scorer itself (the perfect RM) vs the learned RM; the critic starts from SFT in all four,
# since a reward function has no weights to copy
GOLD_REWARD = {f"{source}_beta{b:g}": ["--kl_coef", str(b), "--critic_init", "sft", *flags]
               for b in (0.05, 0.0) for source, flags in
               (("rm", []), ("gold", ["--reward_model", "None", "--reward_fn", "toy_task:gold_score"]))}
ENSEMBLE_SEEDS = (1, 2, 3, 4, 5)  # members: train_rm.py --seed s --bootstrap
ENSEMBLE_SIZES = (3, 5)  # the first 3 members, and all 5
# over-optimisation needs a long run: 4x the default 6400 episodes, so that the single RM's gold score turns down
ENSEMBLE_EPISODES = 4 * 6400
ENSEMBLE_BETAS = (0.0, 0.01)
# Gao et al. 2022's RL curves need gold vs KL along a run without the KL penalty: PPO at beta 0 for the default
# episodes against each RM size (and the main RM, and the mean of the 5 ensemble members), evaluated every 5 updates
# (20 points a run: at beta 0 the first 20 updates already reach 2-7 nats)
GAO_PAIRS = RM_PAIRS
# the process's peak memory per estimator: one short run each (seed 1, 1280 episodes, then the final evaluation),
# which passes through every phase of a full run (rollout, scoring, update, evaluation) with the same shapes
MEMORY_EPISODES = 1280
# what an ensemble costs, apart from what the policy does: 1, 3 and 5 RMs at the default beta for MEMORY_EPISODES,
# seed 1; run with --jobs 1 on an otherwise idle machine, so that the medians of time/score compare
# the beta, estimator, gold-reward and ensemble runs evaluate every 20 updates for curves (over episodes and wall time),
# the gao runs every 5; the others at the end
EVAL_EVERY = {"beta": ["--eval_every", "20"], "ablations": ["--eval_every", "0"], "rm_size": ["--eval_every", "0"],
              "estimators": ["--eval_every", "20"], "loss_details": ["--eval_every", "0"],
              "grpo_loss_details": ["--eval_every", "0"], "gold_reward": ["--eval_every", "20"],
              "ensembles": ["--eval_every", "20"], "gao": ["--eval_every", "5"],
              "estimators_memory": ["--eval_every", "0"], "ensembles_cost": ["--eval_every", "0"],
              "dpo": []}  # each dpo run names its own (DPO_EVAL)
# DPO (dpo.py): the SFT model trained on the RM's own preference pairs, in the RM's batches (seed s orders
# them as train_rm.py --seed s does), evaluated on PPO's held-out prompts as PPO is. Five parts, in order of priority:
# the beta frontier (1 epoch, evaluated every 375 steps: 5 points a run; 4096 validation pairs for the implicit
# reward's accuracy); the RM-size study's pairs: the exact subsets train_rm.py --num_train_pairs n trained on (seed 1),
# written out as dataset dirs (pref_subsets), so that every seed of DPO trains on those pairs; the cost of
# train_rm.py's, ppo.py's and dpo.py's defaults (seed 1, evaluated before and after training, one run at a time),
# with the reference on the fly and precomputed; over-optimisation along DPO_EPOCHS epochs for a small and a large
# beta (the reference precomputed once: the same numbers up to rounding, cheaper from the second epoch); another
# learning rate at beta 0.1
DPO_BETAS = (0.01, 0.03, 0.1, 0.3, 1.0)  # 0.1 is dpo.py's default (Rafailov et al. 2023)
DPO_EVAL = ["--eval_every", "375", "--num_eval_pairs", "4096"]
DPO_EPOCHS = 3
DPO_OVEROPT_BETAS = (0.03, 0.3)
DPO_LEARNING_RATES = (1e-3,)  # beside dpo.py's 3e-4, at its default beta 0.1


@dataclass
class Args:
    groups: list[str] = field(default_factory=lambda: ["beta", "ablations", "rm_size"])
    """which experiment groups to run: beta, ablations, rm_size, estimators, estimators_memory, loss_details,
    grpo_loss_details, gold_reward, gao, ensembles, ensembles_cost, dpo"""
    jobs: int = 2
    """runs at a time"""
    threads: int = 1
    """torch threads per run (jobs x threads = the cores to use)"""
    seeds: list[int] = field(default_factory=lambda: list(SEEDS))
    rm_size_seeds: list[int] = field(default_factory=lambda: list(SEEDS))
    """PPO seeds per smaller RM in the rm_size group"""
    out_dir: str = "sweeps"
    dry_run: bool = False
    """print the commands only"""
    dpo_parts: list[str] = field(default_factory=lambda: ["frontier", "data", "cost", "epochs"])
    """the parts of the dpo group to run, in this order: frontier (the beta sweep), data (the RM-size study's pairs),
    cost (beside ppo.py's), epochs (over-optimisation along DPO_EPOCHS epochs), lr (other learning rates)"""


def ppo_run(args: Args, group: str, name: str, seed: int, flags: list[str], script: str = "ppo.py"):
    """(output dir, command) of one run of ppo.py, or of grpo.py; flags may start with the script's name."""
    if flags and flags[0].endswith(".py"):
        script, flags = flags[0], flags[1:]
    out = f"{args.out_dir}/{group}/{name}_s{seed}"
    return out, [sys.executable, script, "--output_dir", out, "--run_name", f"sweeps/{group}/{name}_s{seed}",
                 "--seed", str(seed), *EVAL_EVERY[group], *flags]


def plan(args: Args) -> list[list[tuple[str, list[str]]]]:
    """Stages of (output dir, command); the runs within one stage are independent."""
    stages: list[list[tuple[str, list[str]]]] = []
    if "beta" in args.groups:
        stages.append([ppo_run(args, "beta", f"beta{b:g}", s, ["--kl_coef", str(b)])
                       for b in BETAS for s in args.seeds])
    if "ablations" in args.groups:
        stages.append([ppo_run(args, "ablations", n, s, f) for n, f in ABLATIONS.items() for s in args.seeds])
    rms = [(f"{args.out_dir}/rm_size/rm_{n}", [sys.executable, "train_rm.py", "--num_train_pairs", str(n),
            "--output_dir", f"{args.out_dir}/rm_size/rm_{n}", "--run_name", f"sweeps/rm_size/rm_{n}"])
           for n in RM_PAIRS]
    if "rm_size" in args.groups or "gao" in args.groups:
        stages.append(rms)
    if "rm_size" in args.groups:
        stages.append([ppo_run(args, "rm_size", f"pairs{n}", s, ["--reward_model", f"{args.out_dir}/rm_size/rm_{n}"])
                       for n in RM_PAIRS for s in args.rm_size_seeds])
    for group, runs in (("estimators", ESTIMATORS), ("loss_details", LOSS_DETAILS), ("gold_reward", GOLD_REWARD),
                        ("grpo_loss_details", {n: ["grpo.py", *f] for n, f in GRPO_LOSS_DETAILS.items()})):
        if group in args.groups:
            stages.append([ppo_run(args, group, n, s, f) for n, f in runs.items() for s in args.seeds])
    if "estimators_memory" in args.groups:  # peak RSS is per process: runs side by side do not change it
        stages.append([ppo_run(args, "estimators_memory", n, 1, [*f, "--total_episodes", str(MEMORY_EPISODES)])
                       for n, f in ESTIMATORS.items()])
    members = [f"{args.out_dir}/ensembles/rm_s{m}" for m in ENSEMBLE_SEEDS]
    # the members: seeds 1-5, each on a bootstrap resample
    if {"ensembles", "gao", "ensembles_cost"} & set(args.groups):
        stages.append([(path, [sys.executable, "train_rm.py", "--seed", str(m), "--bootstrap", "--output_dir", path,
                               "--run_name", f"sweeps/ensembles/rm_s{m}"]) for m, path in zip(ENSEMBLE_SEEDS, members)])
    if "gao" in args.groups:  # every RM size, and the mean of the 5 members, at beta 0 for the same episodes
        rewards = {**{f"pairs{n}": [f"{args.out_dir}/rm_size/rm_{n}"] for n in GAO_PAIRS}, "pairs240000": ["models/rm"],
                   f"mean{len(members)}": [*members, "--ensemble", "mean"]}
        stages.append([ppo_run(args, "gao", f"{name}_beta0", s, ["--kl_coef", "0", "--reward_model", *reward])
                       for name, reward in rewards.items() for s in args.seeds])
    if "ensembles" in args.groups:  # PPO on the members' mean/min/uwo vs the single RM
        # the single RM and the largest ensembles at both betas first, then the smaller ensembles: a sweep stopped
        # halfway leaves whole comparisons
        by_size = [[("single", ["models/rm"], "mean")] * (n == max(ENSEMBLE_SIZES)) +
                   [(f"{how}{n}", members[:n], how) for how in ("mean", "min", "uwo")]
                   for n in sorted(ENSEMBLE_SIZES, reverse=True)]
        stages.append([ppo_run(args, "ensembles", f"{name}_beta{b:g}", s, ["--kl_coef", str(b), "--total_episodes",
                               str(ENSEMBLE_EPISODES), "--reward_model", *paths, "--ensemble", how])
                       for runs in by_size for b in ENSEMBLE_BETAS for name, paths, how in runs for s in args.seeds])
    if "ensembles_cost" in args.groups:
        stages.append([ppo_run(args, "ensembles_cost", name, 1, ["--total_episodes", str(MEMORY_EPISODES),
                                                                 "--reward_model", *paths])
                       for name, paths in (("single", ["models/rm"]), ("mean3", members[:3]), ("mean5", members))])
    if "dpo" in args.groups:
        def dpo(name: str, seed: int, flags: list[str]):
            return ppo_run(args, "dpo", name, seed, ["dpo.py", *flags])
        parts = {
            "frontier": [dpo(f"beta{b:g}", s, [*DPO_EVAL, "--beta", str(b)]) for b in DPO_BETAS for s in args.seeds],
            "data": [dpo(f"pairs{n}", s, [*DPO_EVAL, "--dataset", f"{args.out_dir}/dpo/prefs_{n}"])
                     for n in RM_PAIRS for s in args.seeds],
            "cost": [ppo_run(args, "dpo", "cost_ppo", 1, ["ppo.py", "--eval_every", "0"]),
                     ppo_run(args, "dpo", "cost_rm", 1, ["train_rm.py"]),  # the stage DPO replaces besides PPO
                     dpo("cost_dpo", 1, ["--eval_every", "0"]),
                     dpo("cost_dpo_precompute", 1, ["--eval_every", "0", "--precompute_ref_log_probs"])],
            "epochs": [dpo(f"epochs{DPO_EPOCHS}_beta{b:g}", s, [*DPO_EVAL, "--beta", str(b), "--num_train_epochs",
                                                                 str(DPO_EPOCHS), "--precompute_ref_log_probs"])
                       for b in DPO_OVEROPT_BETAS for s in args.seeds],
            "lr": [dpo(f"beta0.1_lr{lr:g}", s, [*DPO_EVAL, "--learning_rate", str(lr)])
                   for lr in DPO_LEARNING_RATES for s in args.seeds],
        }
        unknown = [p for p in args.dpo_parts if p not in parts]
        if unknown:
            raise SystemExit(f"--dpo_parts {' '.join(unknown)}: no such part; the parts are {', '.join(parts)}")
        stages += [parts[p] for p in args.dpo_parts]
    return stages


def pref_subsets(out_dir: str) -> None:
    """sweeps/dpo/prefs_{n}: the n training pairs train_rm.py --num_train_pairs n --seed 1 trains on (the RM-size
    study's RMs; common.load_preference_split draws them with shuffle(seed).select), the validation pairs and the
    Bayes ceiling beside them, so that dpo.py trains every seed on those exact pairs."""
    import datasets

    for n in RM_PAIRS:
        path = f"{out_dir}/dpo/prefs_{n}"
        if not os.path.exists(f"{path}/train.jsonl"):
            os.makedirs(path, exist_ok=True)
            train = datasets.load_dataset("toy_data/prefs")["train"]
            train.shuffle(seed=1).select(range(n)).to_json(f"{path}/train.jsonl")
            for name in ("validation.jsonl", "bayes_ceiling.json"):
                shutil.copy(f"toy_data/prefs/{name}", path)


def execute(out: str, cmd: list[str], threads: int) -> tuple[str, float, int]:
    if os.path.exists(os.path.join(out, "eval_results.json")):
        return out, 0.0, 0
    os.makedirs(os.path.dirname(out), exist_ok=True)
    checkpoint_dir = out + "_checkpoints"
    if os.path.isdir(checkpoint_dir) and os.listdir(checkpoint_dir):
        cmd = cmd + ["--resume"]  # an interrupted run continues, bit-identical to an uninterrupted one
    else:
        run_name = cmd[cmd.index("--run_name") + 1]
        shutil.rmtree(os.path.join("runs", run_name), ignore_errors=True)  # a partial log from before any checkpoint
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    with open(out + ".log", "a") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        # wait4 gives this child's own resource usage (RUSAGE_CHILDREN would mix the runs that share the pool)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = rc = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - t0
    if rc == 0:
        shutil.rmtree(checkpoint_dir, ignore_errors=True)  # the finished model is in `out`
        with open(out + ".resources.json", "w") as f:  # ru_maxrss is in KiB on Linux
            json.dump({"wall_seconds": seconds, "peak_rss_gib": usage.ru_maxrss / 2**20, "threads": threads,
                       "cpu_seconds": usage.ru_utime + usage.ru_stime}, f)
    return out, seconds, rc


def main(args: Args) -> None:
    for d in ("models/sft", "models/rm"):
        if not args.dry_run and not os.path.isdir(d):
            raise SystemExit(f"{d} does not exist; run `python pipeline.py` first")
    stages = plan(args)
    if "dpo" in args.groups and not args.dry_run:
        pref_subsets(args.out_dir)
    total = sum(len(s) for s in stages)
    done = 0
    for stage in stages:
        if args.dry_run:
            for _, cmd in stage:
                print(f"OMP_NUM_THREADS={args.threads} " + shlex.join(cmd[1:]))
            continue
        with ThreadPoolExecutor(args.jobs) as pool:
            for out, seconds, rc in pool.map(lambda oc: execute(*oc, args.threads), stage):
                done += 1
                status = ("skipped (done)" if seconds == 0 and rc == 0 else f"{seconds:.0f} s" if rc == 0
                          else f"FAILED rc={rc}, see {out}.log")
                print(f"[{done}/{total}] {out}: {status}", flush=True)
                if rc != 0:
                    raise SystemExit(f"sweep: {out} failed; see {out}.log")


if __name__ == "__main__":
    main(tyro.cli(Args, use_underscores=True))
