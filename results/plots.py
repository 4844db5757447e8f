"""Regenerates every figure and table in results/README.md from the TensorBoard logs of the sweep.

    python results/sweep.py && python results/plots.py

Reads runs/sweeps/** (TensorBoard event files written by ppo.py and train_rm.py), writes
results/figures/*.png and results/sweep_summary.json, and rewrites the blocks of results/README.md between
`<!-- generated:NAME -->` and `<!-- /generated:NAME -->`, so that no number there is typed by hand.
"""

from __future__ import annotations

import functools
import glob
import json
import math
import os
import re
import shutil
import statistics
import sys
from collections import defaultdict

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
RUNS = os.path.join(os.path.dirname(HERE), "runs", "sweeps")
FIGS = os.path.join(HERE, "figures")
sys.path.insert(0, HERE)
from sweep import (ABLATIONS, DPO_BETAS, DPO_EPOCHS, DPO_LEARNING_RATES, DPO_OVEROPT_BETAS,  # noqa: E402
                   ENSEMBLE_BETAS, ENSEMBLE_SIZES, ESTIMATORS, GAO_PAIRS, GOLD_REWARD, GRPO_LOSS_DETAILS, LOSS_DETAILS,
                   RM_PAIRS)


def save(fig, name: str) -> str:
    fig.tight_layout()
    path = os.path.join(FIGS, name)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def load(run_dir: str) -> dict:
    ea = EventAccumulator(run_dir, size_guidance={"scalars": 0, "tensors": 0})
    ea.Reload()
    scalars = {t: [(e.step, e.value) for e in ea.Scalars(t)] for t in ea.Tags()["scalars"]}
    texts = {}
    for t in ea.Tags().get("tensors", []):
        if t.endswith("/text_summary"):
            texts[t.removesuffix("/text_summary")] = [(e.step, e.tensor_proto.string_val[0].decode())
                                                      for e in ea.Tensors(t)]
    return {"scalars": scalars, "texts": texts}


def runs_of(group: str) -> dict[str, dict[int, dict]]:
    """{name: {seed: log}} for runs/sweeps/<group>/<name>_s<seed>."""
    out: dict[str, dict[int, dict]] = defaultdict(dict)
    for d in sorted(glob.glob(os.path.join(RUNS, group, "*_s*"))):
        m = re.fullmatch(r"(.+)_s(\d+)", os.path.basename(d))
        if m:
            log = load(d)
            if "final/gold_win_rate" in log["scalars"]:  # finished runs only
                out[m.group(1)][int(m.group(2))] = log
    return out


def final(log: dict, key: str) -> float:
    return log["scalars"][key][-1][1]


def mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def pm(xs: list[float], digits: int = 3) -> str:
    m, s = mean_std(xs)
    return f"{m:.{digits}f} ± {s:.{digits}f}" if len(xs) > 1 else f"{m:.{digits}f}"


def finals(seeds: dict[int, dict]) -> dict[str, list[float]]:
    keys = {"gold": "eval/gold_score", "rm": "eval/rm_score", "kl": "eval/kl", "win": "final/gold_win_rate",
            "length": "eval/response_length", "eos": "eval/eos_rate"}
    return {k: [final(log, t) for _, log in sorted(seeds.items())] for k, t in keys.items()}


def curve(seeds: dict[int, dict], tag: str) -> tuple[list[float], list[float], list[float]]:
    """x, mean, std over seeds at the steps all seeds logged."""
    series = [dict(log["scalars"][tag]) for log in seeds.values()]
    steps = sorted(set.intersection(*(set(s) for s in series)))
    ys = [[s[x] for s in series] for x in steps]
    return steps, [statistics.mean(y) for y in ys], [statistics.stdev(y) if len(y) > 1 else 0.0 for y in ys]


def training_seconds(log: dict) -> list[tuple[int, float]]:
    """(episode, seconds of PPO updates so far) after every update: the run's own time/update, summed; evaluations
    and startup excluded, so that runs compare by the time their updates took."""
    total, out = 0.0, []
    for step, seconds in log["scalars"]["time/update"]:
        total += seconds
        out.append((step, total))
    return out


def gold_within(log: dict, budget: float) -> float:
    """The gold score of the last evaluation reached within `budget` seconds of updates (the SFT one at 0 s)."""
    elapsed = dict(training_seconds(log))
    golds = [(step, g) for step, g in log["scalars"]["eval/gold_score"]
             if step == 0 or elapsed.get(step, math.inf) <= budget]
    return golds[-1][1]


SUMMARY = os.path.join(HERE, "sweep_summary.json")


@functools.cache
def last_summary() -> dict:
    """sweep_summary.json as the last run of this script wrote it: groups whose logs are on another machine."""
    return json.load(open(SUMMARY)) if os.path.exists(SUMMARY) else {}


def resources(out: str) -> dict | None:
    """A sweep run's wall seconds and peak RSS (results/sweep.py writes <out>.resources.json), or None."""
    path = out + ".resources.json"
    if not os.path.exists(path):  # measured on another machine: the last summary keeps it
        return last_summary().get("resources", {}).get(out)
    return json.load(open(path))


def estimators_table(runs: dict[str, dict[int, dict]]) -> tuple[str, dict]:
    """Equal episodes: the final evaluation. Equal wall time: each run's gold score at its last evaluation within
    the time of updates the fastest run took for all of its episodes."""
    budget = min(training_seconds(log)[-1][1] for seeds in runs.values() for log in seeds.values())
    rows = ["| estimator | script and flags | seeds | gold score | gold win rate vs SFT | KL (nats) | episodes / s | "
            f"gold score after {budget:.0f} s of updates | peak RSS (GiB) |", "|---|---|---|---|---|---|---|---|---|"]
    summary = {}
    for name in [n for n in ESTIMATORS if n in runs]:
        seeds = runs[name]
        f = finals(seeds)
        f["eps"] = [statistics.mean(v for _, v in log["scalars"]["eps"]) for _, log in sorted(seeds.items())]
        f["gold_equal_time"] = [gold_within(log, budget) for _, log in sorted(seeds.items())]
        summary[f"estimators/{name}"] = f
        memory = resources(os.path.join("sweeps", "estimators_memory", f"{name}_s1"))  # its own short run
        rss = "not measured"
        if memory:
            f["peak_rss_gib"] = memory["peak_rss_gib"]
            rss = f"{memory['peak_rss_gib']:.3f}"
        rows.append(f"| {name} | `{' '.join(ESTIMATORS[name])}` | {len(f['gold'])} | {pm(f['gold'])} "
                    f"| {pm(f['win'])} | {pm(f['kl'], 2)} | {pm(f['eps'], 0)} | {pm(f['gold_equal_time'])} | {rss} |")
    return "\n".join(rows), summary


def flag_rows(runs: dict[str, dict[int, dict]], flags: dict[str, list[str]], base: dict[str, list[float]] | None,
              group: str, summary: dict) -> list[str]:
    """One table row per run name: seeds, gold score (and its difference to `base`), win rate, KL."""
    rows = []
    for name in [n for n in flags if n in runs]:
        f = finals(runs[name])
        summary[f"{group}/{name}"] = f
        delta = f" | {statistics.mean(f['gold']) - statistics.mean(base['gold']):+.3f}" if base else ""
        rows.append(f"| {name} | `{' '.join(flags[name])}` | {len(f['gold'])} | {pm(f['gold'])}{delta} "
                    f"| {pm(f['win'])} | {pm(f['kl'], 2)} |")
    return rows


def plot_training_curves(default: dict[int, dict]) -> str:
    panels = [("objective/scores", "RM score (train batch)"), ("eval/gold_score", "gold score (held-out)"),
              ("objective/kl", "KL to reference (train batch)"), ("objective/entropy", "entropy (train batch)"),
              ("val/response_length", "response length (train batch)")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2))
    for ax, (tag, title) in zip(axes, panels):
        x, m, s = curve(default, tag)
        ax.plot(x, m, color="C0")
        ax.fill_between(x, [a - b for a, b in zip(m, s)], [a + b for a, b in zip(m, s)], color="C0", alpha=0.25)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("episodes")
    fig.suptitle(f"default ppo.py run, mean ± std over {len(default)} seeds", fontsize=10)
    return save(fig, "training_curves.png")


def plot_frontier(beta: dict[str, dict[int, dict]], fits: dict | None = None) -> str:
    """Gold and RM score vs √KL, one curve per β; with `fits`, the main RM's Gao et al. fits (gao_fit) on the
    gold panel."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    order = sorted(beta, key=lambda n: float(n.removeprefix("beta")))
    for i, name in enumerate(order):
        x, kl, _ = curve(beta[name], "eval/kl")
        for ax, tag in zip(axes, ("eval/gold_score", "eval/rm_score")):
            _, y, _ = curve(beta[name], tag)
            ax.plot([math.sqrt(max(k, 0.0)) for k in kl], y, "o-", ms=3, color=f"C{i}",
                    label=f"β = {name.removeprefix('beta')}")
    if fits:  # fitted to gains over the starting policy, so drawn from where the curves start (SFT, mean over seeds)
        start = statistics.mean(log["scalars"]["eval/gold_score"][0][1]
                                for runs in beta.values() for log in runs.values())
        for form, style, what in (("rl", "k--", "PPO at β = 0"), ("bon", "k:", "best-of-n")):
            if form in fits:
                e = fits[form]
                grid, gain = fit_line(e, form)
                axes[0].plot(grid, start + gain, style, lw=1,
                             label=f"Gao fit, {what}: α {e['alpha']:.2f}, β {e['beta']:.2f}")
    axes[0].set_title("gold score (held-out) vs √KL")
    axes[1].set_title("RM score (the proxy, held-out) vs √KL")
    for ax in axes:
        ax.set_xlabel("√KL(π ‖ π_ref)  (nats^½, per response)")
        ax.legend(fontsize=8)
    fig.suptitle("one curve per β: evaluations every 1280 episodes, mean over seeds (Gao et al. 2022 axes)",
                 fontsize=10)
    return save(fig, "kl_frontier.png")


def plot_rm_size(rm_rows: list[dict]) -> str:
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    n = [r["pairs"] for r in rm_rows]
    axes[0].plot(n, [r["val_accuracy"] for r in rm_rows], "o-", label="RM validation accuracy")
    axes[0].axhline(rm_rows[0]["bayes_ceiling"], color="k", ls="--", label="Bayes ceiling")
    axes[0].set_xscale("log")
    axes[0].set_xlabel("preference pairs")
    axes[0].legend()
    axes[0].set_title("RM accuracy vs data")
    rm_rows = [r for r in rm_rows if r["seeds"] > 0]
    acc = [r["val_accuracy"] for r in rm_rows]
    axes[1].errorbar(acc, [r["ppo_gold"][0] for r in rm_rows], yerr=[r["ppo_gold"][1] for r in rm_rows], fmt="o-",
                     capsize=3)
    for r in rm_rows:
        axes[1].annotate(f"{r['pairs']}", (r["val_accuracy"], r["ppo_gold"][0]), textcoords="offset points",
                         xytext=(4, -10), fontsize=8)
    axes[1].set_xlabel("RM validation accuracy")
    axes[1].set_ylabel("final gold score of PPO (held-out)")
    axes[1].set_title("PPO's gold score vs RM quality")
    return save(fig, "rm_size.png")


ENSEMBLE_NAMES = ["single"] + [f"{how}{n}" for n in sorted(ENSEMBLE_SIZES, reverse=True)
                               for how in ("mean", "min", "uwo")]


def peak_and_end(log: dict) -> dict[str, float]:
    """A run's best held-out gold score, where it was reached (episodes, KL), and its end."""
    golds, kls = log["scalars"]["eval/gold_score"], dict(log["scalars"]["eval/kl"])
    step, peak = max(golds, key=lambda sg: sg[1])
    return {"peak": peak, "peak_episodes": step, "peak_kl": kls[step], "end": golds[-1][1], "end_kl": kls[golds[-1][0]],
            "drop": peak - golds[-1][1]}


def median_over_updates(log: dict, tag: str) -> float:
    """Robust to another job sharing the cores for part of a run."""
    return statistics.median(v for _, v in log["scalars"][tag])


def ensembles_table(runs: dict[str, dict[int, dict]]) -> tuple[str, dict]:
    rows = ["| reward | β | seeds | gold at the end | per seed | KL at the end | best gold on the way | its KL "
            "| its episodes | drop from best to end | s / update | score phase (s) | peak RSS (GiB) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    summary = {}
    for b in ENSEMBLE_BETAS:
        for name in ENSEMBLE_NAMES:
            key = f"{name}_beta{b:g}"
            if key not in runs:
                continue
            seeds = sorted(runs[key].items())
            points = [peak_and_end(log) for _, log in seeds]
            f = {k: [p[k] for p in points] for k in ("end", "end_kl", "peak", "peak_kl", "peak_episodes", "drop")}
            used = [resources(os.path.join("sweeps", "ensembles", f"{key}_s{seed}")) for seed, _ in seeds]
            f["update_seconds"] = [median_over_updates(log, "time/update") for _, log in seeds]
            f["score_seconds"] = [median_over_updates(log, "time/score") for _, log in seeds]
            f["peak_rss_gib"] = [u["peak_rss_gib"] for u in used if u]
            summary[f"ensembles/{key}"] = f
            reward = "single RM (models/rm)" if name == "single" else f"{name[:-1]} of {name[-1]}"
            per_seed = ", ".join(f"{x:.2f}" for x in f["end"])
            rows.append(f"| {reward} | {b:g} | {len(seeds)} | {pm(f['end'])} | {per_seed} | {pm(f['end_kl'], 1)} "
                        f"| {pm(f['peak'])} | {pm(f['peak_kl'], 1)} | {pm(f['peak_episodes'], 0)} | {pm(f['drop'])} "
                        f"| {pm(f['update_seconds'], 2)} | {pm(f['score_seconds'], 3)} "
                        f"| {pm(f['peak_rss_gib'], 3) if f['peak_rss_gib'] else '-'} |")
    cost = runs_of("ensembles_cost")
    if cost:  # 1, 3, 5 RMs on the same short run, one run at a time on an idle machine
        rows += ["", "What the members cost on the same short run (seed 1, 1280 episodes at β = 0.05, "
                 "one run at a time; medians over its 20 updates):", "",
                 "| reward | RMs | s / update | score phase (s) | peak RSS (GiB) |", "|---|---|---|---|---|"]
        for name in [n for n in ("single", "mean3", "mean5") if n in cost]:
            log = cost[name][1]
            used = resources(os.path.join("sweeps", "ensembles_cost", f"{name}_s1"))
            f = {"update_seconds": median_over_updates(log, "time/update"),
                 "score_seconds": median_over_updates(log, "time/score"),
                 "peak_rss_gib": used["peak_rss_gib"] if used else math.nan}
            summary[f"ensembles_cost/{name}"] = f
            rows.append(f"| {name} | {1 if name == 'single' else name[-1]} | {f['update_seconds']:.3f} "
                        f"| {f['score_seconds']:.3f} | {f['peak_rss_gib']:.3f} |")
    return "\n".join(rows), summary


def plot_ensembles(runs: dict[str, dict[int, dict]]) -> str:
    fig, axes = plt.subplots(2, len(ENSEMBLE_BETAS), figsize=(5 * len(ENSEMBLE_BETAS), 8), squeeze=False)
    for col, b in enumerate(ENSEMBLE_BETAS):
        for i, name in enumerate(ENSEMBLE_NAMES):
            key = f"{name}_beta{b:g}"
            if key not in runs:
                continue
            x, kl, _ = curve(runs[key], "eval/kl")
            _, gold, _ = curve(runs[key], "eval/gold_score")
            style = (dict(color="k", lw=2) if name == "single"
                     else dict(color=f"C{i}", ls="-" if name.endswith("5") else ":"))
            axes[0, col].plot([math.sqrt(max(k, 0.0)) for k in kl], gold, marker="o", ms=2, label=f"{name} (mean)",
                              **style)
            axes[1, col].plot(x, gold, marker="o", ms=2, label=f"{name} (mean)", **style)
            for log in runs[key].values():  # each seed, faint: the mean hides runs that collapse and runs that do not
                steps, golds = zip(*log["scalars"]["eval/gold_score"])
                kls = dict(log["scalars"]["eval/kl"])
                axes[0, col].plot([math.sqrt(max(kls[t], 0.0)) for t in steps], golds, "-", lw=0.7, alpha=0.3,
                                  color=style["color"])
                axes[1, col].plot(steps, golds, "-", lw=0.7, alpha=0.3, color=style["color"])
        axes[0, col].set_title(f"β = {b:g}: gold vs √KL (seed mean; each seed faint)")
        axes[0, col].set_xlabel("√KL(π ‖ π_ref)  (nats^½, per response)")
        axes[1, col].set_title(f"β = {b:g}: gold score vs episodes")
        axes[1, col].set_xlabel("episodes")
        for ax in axes[:, col]:
            ax.set_ylabel("gold score (held-out)")
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
    return save(fig, "ensembles.png")


def fit_gao(d: list[float], r: list[float], form: str) -> dict:
    """Least squares of Gao et al. 2022's forms, which pass through R(0) = 0 (their section 2), on d = √KL and
    R = the gold score's gain over the starting policy: RL: R = d (α - β log d); best-of-n: R = d (α - β d).
    Both are linear in (α, β): the normal equations of the two columns d and -d log d (or -d²)."""
    d, r = np.asarray(d, dtype=float), np.asarray(r, dtype=float)
    second = -d * np.log(d) if form == "rl" else -d * d
    (alpha, beta), *_ = np.linalg.lstsq(np.stack([d, second], 1), r, rcond=None)
    fitted = alpha * d + beta * second
    r2 = 1.0 - float(((r - fitted) ** 2).sum() / ((r - r.mean()) ** 2).sum())
    return {"alpha": float(alpha), "beta": float(beta), "r2": r2, "points": len(d)}


def gao_curve(fit: dict, form: str, d: np.ndarray) -> np.ndarray:
    return d * (fit["alpha"] - fit["beta"] * (np.log(d) if form == "rl" else d))


def fit_line(fit: dict, form: str) -> tuple[np.ndarray, np.ndarray]:
    """The fitted R(d) to draw, over the d range of the points it was fitted on."""
    grid = np.linspace(1e-3, max(fit["d"]) * 1.02, 200)
    return grid, gao_curve(fit, form, grid)


# RL fits use the evaluations up to this KL (d = 4), the range that the runs against every RM size reach; the
# longer beta-0 runs against the main RM go on to a collapse at 100+ nats that would otherwise dominate their fit
RL_FIT_MAX_KL = 16.0


def rl_points(seeds: dict[int, dict], max_kl: float = RL_FIT_MAX_KL) -> tuple[list[float], list[float]]:
    """(√KL, gold gain over the run's own first evaluation) at every evaluation after the start up to max_kl,
    all seeds."""
    d, r = [], []
    for log in seeds.values():
        golds, kls = log["scalars"]["eval/gold_score"], dict(log["scalars"]["eval/kl"])
        start = golds[0][1]
        for step, g in golds[1:]:
            if 0 < kls[step] <= max_kl:
                d.append(math.sqrt(kls[step]))
                r.append(g - start)
    return d, r


def gao_fits(gao: dict, bon: dict | None) -> tuple[str, dict, dict]:
    """One row per proxy: its RL runs at β = 0 and its best-of-n on the SFT policy, each fitted."""
    proxies = [(f"{n} pairs", f"rm_{n}", gao.get(f"pairs{n}_beta0"), os.path.join("sweeps", "rm_size", f"rm_{n}"))
               for n in GAO_PAIRS]
    proxies.append(("240000 pairs (models/rm)", "rm_240000", gao.get("pairs240000_beta0"),
                    os.path.join("models", "rm")))
    n_max = max(ENSEMBLE_SIZES)  # RL at beta 0 for the mean only; best-of-n for each way to combine
    proxies += [(f"ensemble: {how} of {n_max}", f"{how}{n_max}", gao.get(f"{how}{n_max}_beta0"), None)
                for how in ("mean", "min", "uwo")]
    rows = ["| proxy reward | RM val accuracy | best-of-n α | β | R² | points | RL α | β | R² "
            f"| points (3 seeds, KL ≤ {RL_FIT_MAX_KL:g}) |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    summary, drawn = {}, {}
    for label, bon_key, rl_runs, rm_dir in proxies:
        acc = (json.load(open(os.path.join(rm_dir, "eval_results.json")))["val_accuracy"]
               if rm_dir and os.path.isdir(rm_dir) else None)
        entry, cells = {}, []
        if bon and bon_key in bon["proxies"]:
            gold = bon["proxies"][bon_key]["gold"]
            d = [math.sqrt(k) for k in bon["kl"][1:]]
            r = [g - gold[0] for g in gold[1:]]  # n = 1 is the SFT policy itself
            entry["bon"] = {**fit_gao(d, r, "bon"), "d": d, "r": r}
            cells += [f"{entry['bon']['alpha']:.3f}", f"{entry['bon']['beta']:.3f}", f"{entry['bon']['r2']:.3f}",
                      str(entry["bon"]["points"])]
        else:
            cells += ["not run"] * 4
        if rl_runs:
            d, r = rl_points(rl_runs)
            entry["rl"] = {**fit_gao(d, r, "rl"), "d": d, "r": r, "all": rl_points(rl_runs, math.inf)}
            cells += [f"{entry['rl']['alpha']:.3f}", f"{entry['rl']['beta']:.3f}", f"{entry['rl']['r2']:.3f}",
                      str(entry["rl"]["points"])]
        else:
            cells += ["not run"] * 4
        if entry:
            summary[f"gao_fit/{bon_key}"] = {k: {kk: vv for kk, vv in v.items() if kk not in ("d", "r", "all")}
                                             for k, v in entry.items()}
            drawn[bon_key] = (label, entry)
        rows.append(f"| {label} | {f'{acc:.3f}' if acc is not None else '-'} | " + " | ".join(cells) + " |")
    if bon:  # the best-of-n scores themselves, with their standard errors over prompts
        shown = [i for i, n in enumerate(bon["n"]) if math.log2(n) % 2 == 0 or n == bon["n"][-1]]
        rows += ["", f"Best-of-n gold score on {bon['num_prompts']} held-out prompts x {bon['n_max']} SFT samples "
                 f"(T = {bon['temperature']}); ± is the standard error over prompts; the last column is the difference "
                 "to the main RM on the same samples, ± its paired standard error:", "",
                 "| proxy reward | " + " | ".join(f"n = {bon['n'][i]} (KL {bon['kl'][i]:.2f})" for i in shown)
                 + f" | best n | vs 240000 pairs at n = {bon['n'][-1]} |", "|---" * (len(shown) + 3) + "|"]
        base = bon["proxies"].get("rm_240000")
        for name, c in bon["proxies"].items():
            g = c["gold"]
            cells = [f"{g[i]:.3f}" + (f" ± {c['gold_se'][i]:.3f}" if i == len(g) - 1 else "") for i in shown]
            delta = (f"{g[-1] - base['gold'][-1]:+.3f} ± {c['minus_rm_240000_se'][-1]:.3f}"
                     if base and name != "rm_240000" else "")
            rows.append(f"| {name} | " + " | ".join(cells) + f" | {bon['n'][g.index(max(g))]} | {delta} |")
    return "\n".join(rows), summary, drawn


def plot_gao(drawn: dict, frontier: dict | None) -> str:
    """Gold gain vs √KL: best-of-n (left) and RL at β = 0 (right), points and fits per proxy reward."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for i, (label, entry) in enumerate(drawn.values()):
        for ax, form in zip(axes, ("bon", "rl")):
            if form not in entry:
                continue
            e = entry[form]
            if form == "rl":  # the points beyond the fitted range, faint
                beyond = [(d, r) for d, r in zip(*e["all"]) if d * d > RL_FIT_MAX_KL]
                ax.plot([d for d, _ in beyond], [r for _, r in beyond], "o", ms=2, alpha=0.15, color=f"C{i}")
            ax.plot(e["d"], e["r"], "o", ms=2 if form == "rl" else 4, alpha=0.5, color=f"C{i}")
            ax.plot(*fit_line(e, form), "-", color=f"C{i}",
                    label=f"{label}: α {e['alpha']:.2f}, β {e['beta']:.2f}, R² {e['r2']:.2f}")
    if frontier:  # the β sweep's final points (models/rm, 3 seeds each) against the same axes
        axes[1].plot(frontier["d"], frontier["r"], "k^", ms=6, label="PPO at β > 0, final (models/rm; gain over SFT)")
    axes[0].set_title("best-of-n on the SFT policy: d = √(log n − (n−1)/n)")
    axes[1].set_title(f"PPO at β = 0: every evaluation of 3 seeds (fits: KL ≤ {RL_FIT_MAX_KL:g})")
    for ax in axes:
        ax.axhline(0, color="grey", lw=0.5)
        ax.set_xlabel("d = √KL  (nats^½)")
        ax.set_ylabel("gold score gain over SFT (held-out)")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6)
    fig.suptitle("Gao et al. 2022's functional forms fitted by least squares (lines) to the toy task (points)",
                 fontsize=10)
    return save(fig, "gao_fit.png")


def last_samples(log: dict, n: int = 4) -> str:
    step, table = log["texts"]["eval/samples"][-1]
    lines = table.splitlines()
    return "\n".join(lines[:2 + n])


# ----------------------------------------------------------------------------------------------
# DPO (dpo.py) against PPO's β sweep and best-of-n on the gold scorer (results/sweep.py --groups dpo)
# ----------------------------------------------------------------------------------------------
MATCHED_KL = (2.0, 5.0, 10.0)


def gold_at_kl(points: list[tuple[float, float]], kl: float) -> float:
    """The gold score at `kl` on the line through (KL, gold) points sorted by KL; nan outside their range (a method
    that never reached that KL, or started beyond it, has no value there: nothing is extrapolated)."""
    points = sorted(points)
    if not points or not points[0][0] <= kl <= points[-1][0]:
        return math.nan
    return float(np.interp(kl, [k for k, _ in points], [g for _, g in points]))


def pm_nan(xs: list[float], digits: int = 3) -> str:
    """pm over the seeds that have a value; '-' when none has, and the count when only some have."""
    have = [x for x in xs if not math.isnan(x)]
    if not have:
        return "-"
    return pm(have, digits) + (f" ({len(have)} of {len(xs)} seeds)" if len(have) < len(xs) else "")


def frontier_points(finals_by_beta: dict[str, dict[str, list[float]]]) -> list[list[tuple[float, float]]]:
    """Each seed's (KL, gold) final points over the β values: one frontier per seed (seeds in order 1, 2, 3)."""
    seeds = min(len(f["gold"]) for f in finals_by_beta.values())
    return [[(f["kl"][s], f["gold"][s]) for f in finals_by_beta.values()] for s in range(seeds)]


def evaluations(log: dict, tag: str) -> dict[int, float]:
    return dict(log["scalars"][tag])


def dpo_section(runs: dict[str, dict[int, dict]], summary: dict) -> tuple[str, dict]:
    """The dpo block: the β table, the methods compared on the gold scorer (best gold and gold at matched KL), gold
    along several epochs, the cost beside ppo.py's, and DPO against PPO with the RM-size study's pairs."""
    out, known = {}, {**last_summary(), **summary}
    f_beta = {}
    rows = ["| β | seeds | gold score | RM score | KL (nats) | gold win rate vs SFT | response length "
            "| implicit reward's val accuracy | best gold on the way | its KL | its step |", "|---" * 11 + "|"]
    def one_epoch_row(label: str, name: str) -> dict:
        """A one-epoch run's finals over its seeds, with its best evaluation on the way, as a row of the β table."""
        seeds = runs[name]
        f = finals(seeds)
        f["val_accuracy"] = [final(log, "eval/rewards/accuracies") for _, log in sorted(seeds.items())]
        points = [peak_and_end(log) for _, log in sorted(seeds.items())]
        f.update({k: [p[k] for p in points] for k in ("peak", "peak_kl", "peak_episodes")})
        out[f"dpo/{name}"] = f
        rows.append(f"| {label} | {len(f['gold'])} | {pm(f['gold'])} | {pm(f['rm'])} | {pm(f['kl'], 2)} "
                    f"| {pm(f['win'])} | {pm(f['length'], 1)} | {pm(f['val_accuracy'])} | {pm(f['peak'])} "
                    f"| {pm(f['peak_kl'], 2)} | {pm(f['peak_episodes'], 0)} |")
        return f

    for b in [b for b in DPO_BETAS if f"beta{b:g}" in runs]:
        f_beta[f"beta{b:g}"] = one_epoch_row(f"{b:g}", f"beta{b:g}")
    for lr in [lr for lr in DPO_LEARNING_RATES if f"beta0.1_lr{lr:g}" in runs]:  # another learning rate, β = 0.1
        one_epoch_row(f"0.1, `--learning_rate {lr:g}`", f"beta0.1_lr{lr:g}")
    blocks = ["Final evaluation of each β (1 epoch, `dpo.py --beta β`, seeds 1-3), and its best evaluation on the "
              "way (every 375 steps):", "", *rows]

    # the methods on the gold scorer: the best gold each reaches, and the gold at matched KL
    ppo_beta = {k.removeprefix("beta/"): v for k, v in known.items() if k.startswith("beta/beta") and k != "beta/beta0"}
    bon_path = os.path.join(HERE, "best_of_n.json")
    bon = json.load(open(bon_path)) if os.path.exists(bon_path) else None
    head = "| method | points | best gold | its KL | " + " | ".join(f"gold at KL {k:g}" for k in MATCHED_KL) + " |"
    rows = [head, "|---" * (4 + len(MATCHED_KL)) + "|"]
    for label, by_beta in (("DPO, final points of the β sweep", f_beta),
                           ("PPO (models/rm), final points of its β sweep (β > 0)", ppo_beta)):
        if not by_beta:
            continue
        best = max(by_beta, key=lambda n: statistics.mean(by_beta[n]["gold"]))
        curves = frontier_points(by_beta)
        matched = [[gold_at_kl(c, k) for c in curves] for k in MATCHED_KL]
        out[f"dpo_vs/{label.split(',')[0]}"] = {"best": best, "matched_kl": dict(zip(MATCHED_KL, matched))}
        betas = ", ".join(n.removeprefix("beta") for n in by_beta)
        rows.append(f"| {label} | {betas} (β) | {pm(by_beta[best]['gold'])} (β = {best.removeprefix('beta')}) "
                    f"| {pm(by_beta[best]['kl'], 2)} | " + " | ".join(pm_nan(m) for m in matched) + " |")
    if bon:
        gold, se = bon["proxies"]["rm_240000"]["gold"], bon["proxies"]["rm_240000"]["gold_se"]
        i = gold.index(max(gold))
        curve = list(zip(bon["kl"], gold))
        matched = [gold_at_kl(curve, k) for k in MATCHED_KL]
        out["dpo_vs/best-of-n"] = {"best": gold[i], "kl": bon["kl"][i], "matched_kl": matched}
        rows.append(f"| best-of-n on the SFT policy (models/rm), n = 1-{bon['n'][-1]} | {len(gold)} (n) "
                    f"| {gold[i]:.3f} ± {se[i]:.3f} (n = {bon['n'][i]}) | {bon['kl'][i]:.2f} | "
                    + " | ".join("-" if math.isnan(g) else f"{g:.3f}" for g in matched) + " |")
    blocks += ["", "The methods on the gold scorer, all on the same 512 held-out prompts (± over seeds 1-3; "
               "best-of-n: ± the standard error over prompts at its best n; gold at a KL a method never reached is "
               "'-'; between two points the gold is interpolated linearly in KL, per seed):", "", *rows]

    # gold along several epochs, for a small and a large β
    over = {b: runs[f"epochs{DPO_EPOCHS}_beta{b:g}"] for b in DPO_OVEROPT_BETAS
            if f"epochs{DPO_EPOCHS}_beta{b:g}" in runs}
    if over:
        rows = ["| β | seeds | step | epochs | gold score | RM score | KL (nats) | implicit reward's val accuracy |",
                "|---|---|---|---|---|---|---|---|"]
        for b, seeds in over.items():
            logs = [log for _, log in sorted(seeds.items())]
            steps = sorted(set.intersection(*(set(evaluations(log, "eval/gold_score")) for log in logs)))
            per_epoch = steps[-1] // DPO_EPOCHS
            for step in [s for s in steps if s % per_epoch == 0]:
                cell = {t: [evaluations(log, t)[step] for log in logs]
                        for t in ("eval/gold_score", "eval/rm_score", "eval/kl")}
                acc = [evaluations(log, "eval/rewards/accuracies").get(step, math.nan) for log in logs]
                rows.append(f"| {b:g} | {len(logs)} | {step} | {step / per_epoch:g} | {pm(cell['eval/gold_score'])} "
                            f"| {pm(cell['eval/rm_score'])} | {pm(cell['eval/kl'], 2)} | {pm_nan(acc)} |")
            points = [peak_and_end(log) for log in logs]
            out[f"dpo/epochs{DPO_EPOCHS}_beta{b:g}"] = {k: [p[k] for p in points] for k in points[0]}
            rows.append(f"| {b:g} | best on the way | {pm([p['peak_episodes'] for p in points], 0)} | | "
                        f"{pm([p['peak'] for p in points])} | | {pm([p['peak_kl'] for p in points], 2)} | |")
            if ppo_beta:  # PPO's frontier at the KL where DPO ended, each PPO seed's line at the DPO runs' mean KL
                kl = statistics.mean(evaluations(log, "eval/kl")[steps[-1]] for log in logs)
                ppo_gold = [gold_at_kl(c, kl) for c in frontier_points(ppo_beta)]
                out[f"dpo/epochs{DPO_EPOCHS}_beta{b:g}"]["ppo_gold_at_end_kl"] = ppo_gold
                rows.append(f"| {b:g} | PPO's β sweep at the end's KL | | | {pm_nan(ppo_gold)} | | {kl:.2f} | |")
        blocks += ["", f"Gold, RM score and KL along {DPO_EPOCHS} epochs (`--num_train_epochs {DPO_EPOCHS}`, the "
                   "reference precomputed; evaluated every 375 steps, shown at the end of each epoch; the cosine "
                   "schedule spans the 3 epochs):", "", *rows]
        plot_dpo_overopt(over)

    # cost, one run at a time on the same machine
    names = ("cost_rm", "cost_ppo", "cost_dpo", "cost_dpo_precompute")
    used = {name: resources(os.path.join("sweeps", "dpo", f"{name}_s1")) for name in names}
    used = {name: u for name, u in used.items() if u and os.path.isdir(os.path.join("sweeps", "dpo", f"{name}_s1"))}
    if used:
        rows = ["| run | command (seed 1) | wall time (s) | CPU time (s) | peak RSS (GiB) | gold score | KL (nats) |",
                "|---|---|---|---|---|---|---|"]
        commands = {"cost_rm": "train_rm.py", "cost_ppo": "ppo.py --eval_every 0", "cost_dpo": "dpo.py --eval_every 0",
                    "cost_dpo_precompute": "dpo.py --eval_every 0 --precompute_ref_log_probs"}
        for name, u in used.items():
            out[f"dpo/{name}"] = dict(u)
            scores = "| - | -"
            if name in runs:
                log = runs[name][1]
                out[f"dpo/{name}"].update(gold=final(log, "eval/gold_score"), kl=final(log, "eval/kl"))
                scores = f"| {final(log, 'eval/gold_score'):.3f} | {final(log, 'eval/kl'):.2f}"
            rows.append(f"| {name} | `{commands[name]}` | {u['wall_seconds']:.0f} "
                        f"| {u.get('cpu_seconds', math.nan):.0f} | {u['peak_rss_gib']:.3f} {scores} |")
        if {"cost_rm", "cost_ppo"} <= set(used):  # what DPO replaces: the RM stage and the PPO stage
            rm, ppo_ = used["cost_rm"], used["cost_ppo"]
            rows.append(f"| RM + PPO | `train_rm.py && ppo.py` | {rm['wall_seconds'] + ppo_['wall_seconds']:.0f} "
                        f"| {rm.get('cpu_seconds', math.nan) + ppo_.get('cpu_seconds', math.nan):.0f} "
                        f"| {max(rm['peak_rss_gib'], ppo_['peak_rss_gib']):.3f} | | |")
        blocks += ["", "What each costs to its final model, its evaluations included, one run at a time (`--jobs 1 "
                   "--threads 1`; `sweeps/dpo/<run>_s1.resources.json`; CPU time is user + system time of the process, "
                   "less sensitive than wall time to the other jobs on the machine):", "", *rows]

    # the RM-size study's pairs
    data = {n: runs[f"pairs{n}"] for n in RM_PAIRS if f"pairs{n}" in runs}
    if data and f_beta.get("beta0.1"):
        ppo_rows = {r["pairs"]: r for r in known.get("rm_size", [])}
        rows = ["| pairs | DPO seeds | DPO gold score | DPO KL (nats) | DPO gold win rate | implicit reward's val "
                "accuracy | RM val accuracy (train_rm.py, same pairs) | PPO gold score (that RM) | PPO KL (nats) |",
                "|---|---|---|---|---|---|---|---|---|"]
        for n, seeds in [*data.items(), (240000, runs["beta0.1"])]:
            f = finals(seeds)
            f["val_accuracy"] = [final(log, "eval/rewards/accuracies") for _, log in sorted(seeds.items())]
            out[f"dpo/pairs{n}"] = f
            r = ppo_rows.get(n)
            ppo_cells = (f"{r['val_accuracy']:.3f} | {r['ppo_gold'][0]:.3f} ± {r['ppo_gold'][1]:.3f} | "
                         f"{r['ppo_kl'][0]:.2f} ± {r['ppo_kl'][1]:.2f}") if r else "- | - | -"
            rows.append(f"| {n} | {len(f['gold'])} | {pm(f['gold'])} | {pm(f['kl'], 2)} | {pm(f['win'])} "
                        f"| {pm(f['val_accuracy'])} | {ppo_cells} |")
        blocks += ["", "DPO from the RM-size study's pairs (`--dataset sweeps/dpo/prefs_N`: the exact pairs "
                   "`train_rm.py --num_train_pairs N` trained on; 240000: the β = 0.1 runs above), beside PPO against "
                   "the RM trained on the same pairs (section 4; PPO's ± over its seeds 1-3):", "", *rows]
    plot_dpo_frontier(runs, f_beta, ppo_beta, bon, known)
    return "\n".join(blocks), out


def plot_dpo_frontier(runs: dict, f_beta: dict, ppo_beta: dict, bon: dict | None, known: dict) -> str:
    """Gold and RM score vs √KL: DPO's β curves (every 375 steps, mean over seeds) and final points, PPO's β sweep
    final points, best-of-n on the SFT policy, and the main RM's Gao et al. fits, from the SFT start."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 6))
    for i, name in enumerate(f_beta):
        _, kl, _ = curve(runs[name], "eval/kl")
        for ax, tag in zip(axes, ("eval/gold_score", "eval/rm_score")):
            _, y, _ = curve(runs[name], tag)
            ax.plot([math.sqrt(max(k, 0.0)) for k in kl], y, "o-", ms=3, color=f"C{i}",
                    label=f"DPO β = {name.removeprefix('beta')} (every 375 steps)")
    for ax, key in zip(axes, ("gold", "rm")):
        for label, by_beta, style in (("PPO, final (β sweep)", ppo_beta, "k^"), ("DPO, final", f_beta, "ks")):
            if by_beta:
                ax.errorbar([math.sqrt(statistics.mean(v["kl"])) for v in by_beta.values()],
                            [statistics.mean(v[key]) for v in by_beta.values()],
                            yerr=[mean_std(v[key])[1] for v in by_beta.values()], fmt=style, ms=6, capsize=3,
                            mfc="none" if "DPO" in label else None,
                            label=f"{label} (mean ± std, {min(len(v[key]) for v in by_beta.values())} seeds)")
    start = statistics.mean(evaluations(log, "eval/gold_score")[0] for seeds in runs.values() for log in seeds.values())
    if bon:
        d = [math.sqrt(k) for k in bon["kl"]]
        axes[0].plot(d, bon["proxies"]["rm_240000"]["gold"], "k:", marker=".", label="best-of-n (n = 1-256), gold")
        axes[1].plot(d, bon["proxies"]["rm_240000"]["proxy"], "k:", marker=".", label="best-of-n, RM score")
    fits = known.get("gao_fit/rm_240000", {})
    for form, style, what, d_max in (("rl", "k--", "PPO at β = 0", math.sqrt(RL_FIT_MAX_KL)),
                                     ("bon", "k-.", "best-of-n", math.sqrt(bon["kl"][-1]) if bon else 2.0)):
        if form in fits:
            grid = np.linspace(1e-3, d_max, 200)
            axes[0].plot(grid, start + gao_curve(fits[form], form, grid), style, lw=0.8,
                         label=f"Gao fit, {what}: α {fits[form]['alpha']:.2f}, β {fits[form]['beta']:.2f}")
    axes[0].set_title("gold score (held-out) vs √KL")
    axes[1].set_title("RM score (models/rm, held-out) vs √KL")
    for ax in axes:
        ax.set_xlabel("√KL(π ‖ π_SFT)  (nats^½, per response)")
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2)
    fig.suptitle("DPO against PPO and best-of-n: the same 512 prompts, T = 0.7, exact KL (Gao et al. 2022 axes)",
                 fontsize=10)
    return save(fig, "dpo_frontier.png")


def plot_dpo_overopt(over: dict[float, dict[int, dict]]) -> str:
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for i, (b, seeds) in enumerate(over.items()):
        for ax, (tag, title) in zip(axes, (("eval/gold_score", "gold score"), ("eval/rm_score", "RM score (models/rm)"),
                                           ("eval/kl", "KL to SFT (nats)"))):
            x, m, s = curve(seeds, tag)
            ax.plot(x, m, "o-", ms=3, color=f"C{i}", label=f"β = {b:g}")
            ax.fill_between(x, [a - c for a, c in zip(m, s)], [a + c for a, c in zip(m, s)], color=f"C{i}", alpha=0.2)
            ax.set_title(title, fontsize=10)
            ax.set_xlabel("DPO steps (1875 = 1 epoch)")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"DPO along {DPO_EPOCHS} epochs, mean ± std over {len(next(iter(over.values())))} seeds", fontsize=10)
    return save(fig, "dpo_overoptimisation.png")


def write_blocks(blocks: dict[str, str], summary: dict) -> None:
    """Rewrite the README's generated blocks and merge the summary into sweep_summary.json (the groups whose logs are
    not here keep their last summary)."""
    readme_path = os.path.join(HERE, "README.md")
    text = open(readme_path).read()
    for name, body in blocks.items():
        text = replace_block(text, name, body)
    with open(readme_path, "w") as f:
        f.write(text)
    if "resources" in summary:
        summary["resources"] = {**last_summary().get("resources", {}), **summary["resources"]}
    with open(SUMMARY, "w") as f:
        json.dump({**last_summary(), **summary}, f, indent=1)


def main_dpo() -> None:
    """`python results/plots.py dpo`: the dpo block and its figures alone, on a machine that has only the dpo group's
    logs (the other blocks, whose logs are elsewhere, stay as they are)."""
    os.makedirs(FIGS, exist_ok=True)
    runs = runs_of("dpo")
    if not runs:
        raise SystemExit(f"no finished runs in {RUNS}/dpo; run results/sweep.py --groups dpo first")
    body, summary = dpo_section(runs, {})
    found = {path.removesuffix(".resources.json"): json.load(open(path))
             for path in glob.glob(os.path.join("sweeps", "dpo", "*.resources.json"))}
    write_blocks({"dpo": body}, {**summary, "resources": found})
    print(f"wrote {FIGS}/dpo_*.png, results/sweep_summary.json and the block dpo of results/README.md")


def replace_block(text: str, name: str, body: str) -> str:
    pattern = re.compile(rf"(<!-- generated:{name} -->\n).*?(<!-- /generated:{name} -->)", re.S)
    if not pattern.search(text):
        raise SystemExit(f"results/README.md has no <!-- generated:{name} --> block")
    return pattern.sub(lambda m: m.group(1) + body.rstrip() + "\n" + m.group(2), text)


def main() -> None:
    os.makedirs(FIGS, exist_ok=True)
    blocks, summary = {}, {}
    pipeline = os.path.join("models", "pipeline_summary.json")
    if os.path.exists(pipeline):  # the main job's table (python pipeline.py)
        shutil.copy(pipeline, os.path.join(HERE, "toy_pipeline", "pipeline_summary.json"))
        for stage in ("sft", "rm", "ppo"):
            shutil.copy(os.path.join("models", stage, "eval_results.json"),
                        os.path.join(HERE, "toy_pipeline", f"{stage}.json"))
        res = json.load(open(pipeline))
        rows = ["| held-out prompts: " + str(res["ppo"]["num_eval_prompts"]) + " | SFT | PPO |", "|---|---|---|"]
        rows += [f"| {name} | {a} | {b} |" for name, a, b in res["rows"][:-1]]
        times = ", ".join(f"{k} {v:.0f} s" for k, v in res["wall_time_s"].items())
        blocks["pipeline"] = "\n".join(rows) + (f"\n\n{res['rows'][-1][0]}.\n\nWall time: {times}; "
                                                f"total {res['total_wall_time_s']:.0f} s.")
    beta = runs_of("beta")
    default = beta.get("beta0.05", {})
    base = finals(default) if default else None  # the default rows: beta 0.05, seeds 1-3

    if default:
        plot_training_curves(default)

    if beta:
        rows = ["| β | gold score | RM score | KL (nats) | gold win rate vs SFT | response length | EOS rate |",
                "|---|---|---|---|---|---|---|"]
        for name in sorted(beta, key=lambda n: float(n.removeprefix("beta"))):
            f = finals(beta[name])
            summary[f"beta/{name}"] = f
            rows.append(f"| {name.removeprefix('beta')} | {pm(f['gold'])} | {pm(f['rm'])} | {pm(f['kl'], 2)} "
                        f"| {pm(f['win'])} | {pm(f['length'], 1)} | {pm(f['eos'])} |")
        blocks["beta"] = "\n".join(rows)
        # what over-optimisation looks like: the final held-out samples at beta 0 next to the default
        samples = []
        for name, pick in (("beta0", "the seed with the lowest final gold score"),
                           ("beta0.05", "seed 1, the default run")):
            if name in beta:
                runs = beta[name]
                seed = min(runs, key=lambda k: final(runs[k], "eval/gold_score")) if name == "beta0" else min(runs)
                samples.append(f"β = {name.removeprefix('beta')}, seed {seed} ({pick}), final evaluation, "
                               "first held-out prompts:\n\n"
                               + last_samples(runs[seed], 6))
        blocks["samples"] = "\n\n".join(samples)

    ablations = runs_of("ablations")
    if ablations and default:
        rows = ["| variant | flag | seeds | gold score | Δ gold vs default | gold win rate vs SFT | KL (nats) |",
                "|---|---|---|---|---|---|---|",
                f"| **default** | | {len(default)} | {pm(base['gold'])} | | {pm(base['win'])} | {pm(base['kl'], 2)} |"]
        for name in [n for n in ABLATIONS if n in ablations]:
            f = finals(ablations[name])
            summary[f"ablations/{name}"] = f
            rows.append(f"| {name} | `{' '.join(ABLATIONS[name])}` | {len(f['gold'])} | {pm(f['gold'])} "
                        f"| {statistics.mean(f['gold']) - statistics.mean(base['gold']):+.3f} | {pm(f['win'])} "
                        f"| {pm(f['kl'], 2)} |")
        blocks["ablations"] = "\n".join(rows)

    rm_runs = runs_of("rm_size")
    rm_dirs = glob.glob(os.path.join("sweeps", "rm_size", "rm_*", "eval_results.json"))
    if rm_dirs and default and rm_runs:  # the RMs alone (the gao group trains them too) keep the last table
        rm_rows = []
        for n in sorted(int(re.search(r"rm_(\d+)", d).group(1)) for d in rm_dirs):
            res = json.load(open(os.path.join("sweeps", "rm_size", f"rm_{n}", "eval_results.json")))
            f = (finals(rm_runs[f"pairs{n}"]) if f"pairs{n}" in rm_runs
                 else {k: [math.nan] for k in ("gold", "win", "kl")})
            rm_rows.append({"pairs": n, "val_accuracy": res["val_accuracy"], "bayes_ceiling": res["bayes_ceiling"],
                            "rm_raw_std": res["normalisation"]["raw_std"],
                            "ppo_gold": mean_std(f["gold"]), "ppo_win": mean_std(f["win"]), "ppo_kl": mean_std(f["kl"]),
                            "seeds": len(f["gold"]) if f"pairs{n}" in rm_runs else 0})
        full = json.load(open(os.path.join("models", "rm", "eval_results.json")))
        rm_rows.append({"pairs": full["train_pairs"], "val_accuracy": full["val_accuracy"],
                        "bayes_ceiling": full["bayes_ceiling"],
                        "rm_raw_std": full["normalisation"]["raw_std"],
                        "ppo_gold": mean_std(base["gold"]), "ppo_win": mean_std(base["win"]),
                        "ppo_kl": mean_std(base["kl"]),
                        "seeds": len(default)})
        plot_rm_size(rm_rows)
        summary["rm_size"] = rm_rows
        rows = ["| pairs | RM val accuracy | % of Bayes ceiling | RM score std on SFT samples (raw) | PPO seeds "
                "| PPO gold score | PPO gold win rate vs SFT | PPO KL (nats) |",
                "|---|---|---|---|---|---|---|---|"]
        for r in rm_rows:
            spread = ((lambda ms: f"{ms[0]:.3f} ± {ms[1]:.3f}") if r["seeds"] > 1 else (lambda ms: f"{ms[0]:.3f}")
                      if r["seeds"] == 1 else (lambda ms: "not run"))
            rows.append(f"| {r['pairs']} | {r['val_accuracy']:.3f} | {r['val_accuracy'] / r['bayes_ceiling']:.1%} "
                        f"| {r['rm_raw_std']:.2f} | {r['seeds']} | {spread(r['ppo_gold'])} | {spread(r['ppo_win'])} "
                        f"| {spread(r['ppo_kl'])} |")
        blocks["rm_size"] = "\n".join(rows)

    estimators = runs_of("estimators")
    if estimators:
        blocks["estimators"], estimator_summary = estimators_table(estimators)
        summary.update(estimator_summary)
    loss_details = runs_of("loss_details")
    if loss_details and "gae" in estimators:  # the default flags: the estimators group's gae runs
        gae = finals(estimators["gae"])
        rows = ["| variant | flag | seeds | gold score | Δ gold vs default | gold win rate vs SFT | KL (nats) |",
                "|---|---|---|---|---|---|---|",
                f"| **default** (estimators/gae) | | {len(gae['gold'])} | {pm(gae['gold'])} | | {pm(gae['win'])} "
                f"| {pm(gae['kl'], 2)} |"]
        blocks["loss_details"] = "\n".join(rows + flag_rows(loss_details, LOSS_DETAILS, gae, "loss_details", summary))
    grpo_details = runs_of("grpo_loss_details")
    if grpo_details and "grpo" in estimators:  # grpo.py's default flags: the estimators group's grpo runs
        grpo = finals(estimators["grpo"])
        rows = ["| variant | flag | seeds | gold score | Δ gold vs grpo.py's default | gold win rate vs SFT "
                "| KL (nats) |",
                "|---|---|---|---|---|---|---|",
                f"| **default** (estimators/grpo) | | {len(grpo['gold'])} | {pm(grpo['gold'])} | | {pm(grpo['win'])} "
                f"| {pm(grpo['kl'], 2)} |"]
        blocks["grpo_loss_details"] = "\n".join(rows + flag_rows(grpo_details, GRPO_LOSS_DETAILS, grpo,
                                                                  "grpo_loss_details", summary))
    gold_reward = runs_of("gold_reward")
    if gold_reward:
        rows = ["| reward, β | flags | seeds | gold score | gold win rate vs SFT | KL (nats) |",
                "|---|---|---|---|---|---|"]
        blocks["gold_reward"] = "\n".join(rows + flag_rows(gold_reward, GOLD_REWARD, None, "gold_reward", summary))

    ensembles = runs_of("ensembles")
    if ensembles:
        blocks["ensembles"], ensemble_summary = ensembles_table(ensembles)
        summary.update(ensemble_summary)
        plot_ensembles(ensembles)
    bon_path = os.path.join(HERE, "best_of_n.json")
    bon = json.load(open(bon_path)) if os.path.exists(bon_path) else None
    gao = runs_of("gao")
    if gao or bon:
        blocks["gao_fit"], gao_summary, drawn = gao_fits(gao, bon)
        summary.update(gao_summary)
        frontier = None
        if bon:  # the β sweep's final points, as gains over the SFT policy's gold score on the same prompts
            betas = {k: v for k, v in {**last_summary(), **summary}.items()
                     if k.startswith("beta/beta") and k != "beta/beta0"}
            sft = json.load(open(os.path.join(HERE, "toy_pipeline",
                                              "pipeline_summary.json")))["ppo"]["sft"]["gold_score"]
            frontier = {"d": [math.sqrt(statistics.mean(v["kl"])) for v in betas.values()],
                        "r": [statistics.mean(v["gold"]) - sft for v in betas.values()]}
        plot_gao(drawn, frontier)
    if beta:  # after the fits, which it draws when there are any
        main_rm = drawn.get("rm_240000") if gao or bon else None  # (label, its fits)
        plot_frontier(beta, main_rm[1] if main_rm else None)
    dpo = runs_of("dpo")
    if dpo:
        blocks["dpo"], dpo_summary = dpo_section(dpo, summary)
        summary.update(dpo_summary)
    found = {path.removesuffix(".resources.json"): json.load(open(path))
             for path in glob.glob(os.path.join("sweeps", "**", "*.resources.json"), recursive=True)}
    if found:
        summary["resources"] = found

    # groups whose logs are not here keep their last summary (each group's runs may live on another machine)
    write_blocks(blocks, summary)
    print(f"wrote {FIGS}/*.png, results/sweep_summary.json and the blocks {sorted(blocks)} of results/README.md")


if __name__ == "__main__":
    if sys.argv[1:] not in ([], ["dpo"]):  # anything else would rewrite every block from the logs on this machine
        raise SystemExit(f"results/plots.py: unknown arguments {' '.join(sys.argv[1:])!r}; run it with none (every "
                         "block) or with 'dpo' (the dpo block alone)")
    main_dpo() if sys.argv[1:] == ["dpo"] else main()
