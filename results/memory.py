"""Measured memory of PPO's four models, and what the same bytes per parameter mean at 7B.

    python results/memory.py            # writes results/memory.json and the memory table of results/README.md

PPO holds four models (Ouyang et al. 2022; Huang et al. 2024): the policy and the critic, which train, and
the frozen reference and reward model. For each, this counts the bytes of the tensors that exist after
one real training step, the way ppo.py builds them (common.load_causal_lm / load_reward_model, AdamW):
parameters, gradients and the optimizer's state (`exp_avg`, `exp_avg_sq`, `step`). Activations depend on
batch and length and are left out. Configs: the toy model (models/sft, models/rm) and the benchmark
config of benchmarks/ppo_speed.py (GPT-NeoX 4 x 256), each in float32 and in bfloat16.
The 7B column multiplies the measured bytes per parameter by 7e9 per model.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from common import load_causal_lm, load_reward_model, load_tokenizer  # noqa: E402


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def trained_bytes(model, make_loss) -> dict[str, int]:
    """params, grads and AdamW state after one step of a trainable model."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    make_loss(model).backward()
    opt.step()
    params = list(model.parameters())
    state = [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]
    return {"params": nbytes(params), "grads": nbytes(p.grad for p in params), "optimizer": nbytes(state),
            "num_params": sum(p.numel() for p in params)}


def measure(sft_dir: str, rm_dir: str, dtype: str) -> dict[str, dict[str, int]]:
    tokenizer = load_tokenizer(sft_dir)
    ids = torch.randint(5, 100, (4, 24))
    policy = load_causal_lm(sft_dir, tokenizer, dtype)
    critic = load_reward_model(rm_dir, tokenizer, dtype)
    ref = load_causal_lm(sft_dir, tokenizer, dtype).requires_grad_(False)
    rm = load_reward_model(rm_dir, tokenizer, dtype).requires_grad_(False)
    out = {
        "policy": trained_bytes(policy, lambda m: m(input_ids=ids).logits.float().logsumexp(-1).mean()),
        "critic": trained_bytes(critic, lambda m: m(input_ids=ids).logits.float().pow(2).mean()),
        "reference (frozen)": {"params": nbytes(ref.parameters()),
                               "num_params": sum(p.numel() for p in ref.parameters())},
        "reward model (frozen)": {"params": nbytes(rm.parameters()),
                                  "num_params": sum(p.numel() for p in rm.parameters())},
    }
    return out


def benchmark_models(workdir: str) -> tuple[str, str]:
    sys.path.insert(0, os.path.join(os.path.dirname(HERE), "benchmarks"))
    import ppo_speed

    paths = ppo_speed.build_models(ppo_speed.Args(), workdir)
    return paths["sft"], paths["rm"]


def table(results: dict) -> str:
    rows = ["| model | tensor | toy fp32 | toy bf16 | benchmark fp32 | benchmark bf16 "
            "| bytes/param fp32 | bytes/param bf16 | 7B, fp32 | 7B, bf16 |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    totals = {k: 0 for k in ("toy_fp32", "toy_bf16", "bench_fp32", "bench_bf16", "7b_fp32", "7b_bf16")}
    for model in results["toy_fp32"]:
        for tensor in ("params", "grads", "optimizer"):
            if tensor not in results["toy_fp32"][model]:
                continue
            cells = []
            for cfg in ("toy_fp32", "toy_bf16", "bench_fp32", "bench_bf16"):
                b = results[cfg][model][tensor]
                totals[cfg] += b
                cells.append(f"{b / 2**20:.2f} MiB")
            per = {p: results[f"bench_{p}"][model][tensor] / results[f"bench_{p}"][model]["num_params"]
                   for p in ("fp32", "bf16")}
            gb = {p: per[p] * 7e9 / 1e9 for p in per}
            totals["7b_fp32"] += gb["fp32"]
            totals["7b_bf16"] += gb["bf16"]
            cells += [f"{per['fp32']:.1f}", f"{per['bf16']:.1f}", f"{gb['fp32']:.0f} GB", f"{gb['bf16']:.0f} GB"]
            rows.append(f"| {model} | {tensor} | " + " | ".join(cells) + " |")
    rows.append("| **total** | | "
                + " | ".join(f"{totals[c] / 2**20:.2f} MiB"
                             for c in ("toy_fp32", "toy_bf16", "bench_fp32", "bench_bf16"))
                + f" | | | **{totals['7b_fp32']:.0f} GB** | **{totals['7b_bf16']:.0f} GB** |")
    return "\n".join(rows)


def main() -> None:
    torch.manual_seed(0)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        bench_sft, bench_rm = benchmark_models(tmp)
        for name, (sft, rm) in {"toy": ("models/sft", "models/rm"), "bench": (bench_sft, bench_rm)}.items():
            for p, dtype in (("fp32", "float32"), ("bf16", "bfloat16")):
                results[f"{name}_{p}"] = measure(sft, rm, dtype)
    with open(os.path.join(HERE, "memory.json"), "w") as f:
        json.dump(results, f, indent=1)
    body = table(results)
    print(body)
    from plots import replace_block  # the same marker blocks as the sweep's tables

    path = os.path.join(HERE, "README.md")
    text = replace_block(open(path).read(), "memory", body)
    with open(path, "w") as f:
        f.write(text)

if __name__ == "__main__":
    main()
