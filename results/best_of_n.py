"""Best-of-n sampling from the SFT policy against each reward model: the data for Gao et al. 2022's best-of-n fit.

    python results/sweep.py --groups gao ensembles   # the smaller RMs and the ensemble members
    python results/best_of_n.py                      # writes results/best_of_n.json
    python results/plots.py                          # the gao_fit block and figure

For each of the first --num_prompts held-out prompts (ppo.py's evaluation split), --n_max responses are sampled
from models/sft at ppo.py's training temperature. Every RM scores all of them, as ppo.py scores a rollout
(normalised with the RM's stored statistics, ppo.reward_scores), and so do the ensembles of the sweep's
members (ppo.ensemble_scores); toy_task.gold_score scores them too.

Best-of-n returns, per prompt, the response the proxy scores highest among n samples. Its expected gold score
is computed exactly over every n-subset of the n_max samples: with the samples sorted by proxy score, the i-th
lowest (1-based) is the best of a random n-subset with probability C(i-1, n-1) / C(n_max, n). The KL of
best-of-n from the policy is log n - (n-1)/n (Stiennon et al. 2020, appendix; Gao et al. 2022, section 2),
an upper bound that is exact when no two samples tie.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass, replace

import torch
import tyro
from tqdm import tqdm

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import ppo  # noqa: E402
from common import load_causal_lm  # noqa: E402


@dataclass
class Args:
    num_prompts: int = 256
    """held-out prompts (the first of ppo.py's evaluation split)"""
    n_max: int = 256
    """samples per prompt; best-of-n is estimated for n = 1, 2, 4, ... up to n_max"""
    seed: int = 1
    out: str = os.path.join(HERE, "best_of_n.json")
    rms: tuple[str, ...] = ("sweeps/rm_size/rm_3000", "sweeps/rm_size/rm_10000", "sweeps/rm_size/rm_30000", "models/rm")
    """single RMs, smallest data first (models/rm: the main job's, 240000 pairs)"""
    members: tuple[str, ...] = tuple(f"sweeps/ensembles/rm_s{m}" for m in range(1, 6))
    """the ensemble members of results/sweep.py; ensembles of the first 3 and of all 5, each mean, min and uwo"""
    uwo_coef: float = 1.0
    """ppo.py's default"""


def best_of_n_weights(n_max: int, n: int) -> torch.Tensor:
    """P(the i-th lowest of n_max samples is the best of a random n-subset), i = 1..n_max -> (n_max,);
    sums to 1."""
    return torch.tensor([math.comb(i - 1, n - 1) / math.comb(n_max, n) for i in range(1, n_max + 1)],
                        dtype=torch.float64)


def best_of_n_per_prompt(proxy: torch.Tensor, gold: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Expected (gold, proxy) score of the proxy's best of n per prompt, from (prompts, n_max) samples
    -> 2 x (prompts,)"""
    order = proxy.argsort(dim=1)  # ascending
    w = best_of_n_weights(proxy.shape[1], n)
    return (gold.gather(1, order) * w).sum(1), (proxy.gather(1, order) * w).sum(1)


def best_of_n(proxy: torch.Tensor, gold: torch.Tensor, n: int) -> tuple[float, float]:
    """Expected (gold, proxy) score of the proxy's best of n, averaged over prompts."""
    g, p = best_of_n_per_prompt(proxy, gold, n)
    return g.mean().item(), p.mean().item()


def standard_error(x: torch.Tensor) -> float:
    """Of the mean over prompts."""
    return (x.std() / math.sqrt(len(x))).item()


def kl_best_of_n(n: int) -> float:
    return math.log(n) - (n - 1) / n


def main(a: Args) -> None:
    missing = [p for p in (*a.rms, *a.members) if not os.path.isdir(p)]
    if missing:
        raise SystemExit(f"{', '.join(missing)} not found: run `python results/sweep.py --groups gao ensembles` first")
    if a.n_max < 1 or a.n_max & (a.n_max - 1):
        raise SystemExit(f"--n_max {a.n_max} must be a power of 2")
    if a.num_prompts < 1:
        raise SystemExit(f"--num_prompts {a.num_prompts} must be at least 1")
    out_dir = os.path.dirname(os.path.abspath(a.out))
    if not os.path.isdir(out_dir):  # before the sampling, not after it
        raise SystemExit(f"--out {a.out}: the folder {out_dir} does not exist; create it or pick another --out")
    torch.manual_seed(a.seed)
    args = ppo.Args(save=False, seed=a.seed, eval_samples=a.num_prompts)
    setup = ppo.set_up(args)
    if len(setup.eval_ids) < a.num_prompts:
        raise SystemExit(f"--num_prompts {a.num_prompts}: the evaluation split has only {len(setup.eval_ids)} prompts")
    tokenizer, device = setup.tokenizer, torch.device("cpu")
    policy = load_causal_lm(args.sft_model, tokenizer, args.dtype).eval()
    config = ppo.generation_config(tokenizer, args.response_length, args.temperature, setup.stop_ids)
    rewards = {path: ppo.load_reward(replace(args, reward_model=[path]), setup)[0] for path in (*a.rms, *a.members)}

    t0 = time.perf_counter()
    prompts, prompt_ids = setup.eval_texts, setup.eval_ids
    scores = {path: torch.zeros(len(prompt_ids), a.n_max, dtype=torch.float64) for path in rewards}
    gold = torch.zeros(len(prompt_ids), a.n_max, dtype=torch.float64)
    per_batch = max(1, args.eval_batch_size // len(prompt_ids))  # samples per prompt in one generate call
    with torch.no_grad():
        for j in tqdm(range(0, a.n_max, per_batch), desc="best-of-n samples"):
            k = min(per_batch, a.n_max - j)
            ids = [p for p in prompt_ids for _ in range(k)]
            queries, query_mask = ppo.left_pad(ids, tokenizer.pad_token_id, device)
            P = queries.shape[1]
            responses, response_mask, has_eos = ppo.truncate_after_eos(
                ppo.generate(policy, queries, query_mask, config), setup.stop_ids, tokenizer.pad_token_id)
            query_responses = torch.cat([queries, responses], 1)
            attention_mask = torch.cat([query_mask, torch.ones_like(responses)], 1)
            for path, reward in rewards.items():
                s = ppo.reward_scores(reward, tokenizer, query_responses, attention_mask, response_mask, P, has_eos,
                                      args.local_rollout_forward_batch_size)[0]
                scores[path][:, j:j + k] = s.view(len(prompt_ids), k).double()
            completions = tokenizer.batch_decode(responses, skip_special_tokens=True)
            g = setup.gold_fn([p for p in prompts for _ in range(k)], completions)
            gold[:, j:j + k] = torch.tensor(g, dtype=torch.float64).view(len(prompt_ids), k)
    seconds = time.perf_counter() - t0

    members = torch.stack([scores[m] for m in a.members])  # (M, prompts, n_max)
    proxies = {os.path.basename(p.rstrip("/")) if p != "models/rm" else "rm_240000": scores[p] for p in a.rms}
    for size in (3, len(a.members)):
        for how in ("mean", "min", "uwo"):
            proxies[f"{how}{size}"] = ppo.ensemble_scores(members[:size], how, a.uwo_coef)
    ns = [2 ** e for e in range(int(math.log2(a.n_max)) + 1)]
    out = {"command": "python results/best_of_n.py " + " ".join(sys.argv[1:]), "num_prompts": len(prompt_ids),
           "n_max": a.n_max, "temperature": args.temperature, "seconds": seconds, "sft_gold": gold.mean().item(),
           "n": ns, "kl": [kl_best_of_n(n) for n in ns], "proxies": {}}
    # the standard error over prompts, and that of each proxy's difference to the main RM on the same samples
    curves = {name: [best_of_n_per_prompt(proxy, gold, n) for n in ns] for name, proxy in proxies.items()}
    single = curves.get("rm_240000")
    for name, curve in curves.items():
        out["proxies"][name] = {"gold": [g.mean().item() for g, _ in curve],
                                "proxy": [p.mean().item() for _, p in curve],
                                "gold_se": [standard_error(g) for g, _ in curve]}
        if single is not None:
            out["proxies"][name]["minus_rm_240000_se"] = [standard_error(g - s)
                                                          for (g, _), (s, _) in zip(curve, single)]
    with open(a.out, "w") as f:
        json.dump(out, f, indent=1)
    print(f"{len(prompt_ids)} prompts x {a.n_max} samples in {seconds:.0f} s; SFT gold {out['sft_gold']:.3f}")
    for name, c in out["proxies"].items():
        print(f"{name:>12}: best-of-{ns[-1]} gold {c['gold'][-1]:+.3f} ± {c['gold_se'][-1]:.3f}, best-of-n peak "
              f"{max(c['gold']):+.3f} at n = {ns[c['gold'].index(max(c['gold']))]}")


if __name__ == "__main__":
    main(tyro.cli(Args, use_underscores=True))
