"""Measured memory of ppo.py's memory options, and what they bring a 7B PPO to.

    python results/memory_options.py     # writes results/memory_options.json and its tables in results/README.md

Two measurements per option.

1. Static bytes on the benchmark config (benchmarks/ppo_speed.py's GPT-NeoX 4 x 256): the four models built
   as ppo.py builds them with the option (ppo.load_frozen, peft), one real AdamW step on the trained ones,
   then the bytes of every tensor that stays: weights, gradients, optimizer state, the frozen copies (int8
   weights counted at 1 byte). Divided by the parameters of one model and multiplied by 7e9, this is the
   7B column; activations and the KV cache come on top.
2. Peak resident memory of the whole process: each option runs `ppo.py` for 2 updates in a fresh
   process, and the process's peak resident memory
(ru_maxrss) is read at the end: the model weights, gradients and optimizer state, the activations and
the generation's KV cache together, as the OS sees them. The config is a GPT-NeoX of 6 layers x 768
(43M parameters per model, the toy tokenizer), big enough that the models, not the Python runtime,
set the differences; benchmarks/ppo_speed.py's 4 x 256 config (3M per model) would hide them in the
runtime's own memory. Peak RSS counts everything, including memory the allocator freed but kept.

On a CPU run, --offload_critic has nothing to move (the critic already lives in CPU memory); its saving
is the critic's GPU-resident bytes during generation and can only be measured on a GPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

OPTIONS = {
    "default (fp32, all four models)": [],
    "--frozen_dtype bfloat16": ["--frozen_dtype", "bfloat16"],
    "--frozen_dtype int8": ["--frozen_dtype", "int8"],
    "--gradient_checkpointing": ["--gradient_checkpointing"],
    "--lora_r 16": ["--lora_r", "16"],
    "--lora_r 16 --frozen_dtype bfloat16 --gradient_checkpointing": ["--lora_r", "16", "--frozen_dtype", "bfloat16",
                                                                      "--gradient_checkpointing"],
    # the 7B recipe (README); --offload_critic moves nothing on CPU
    "--frozen_dtype int8 --offload_critic --lora_r 8 --gradient_checkpointing": [
        "--frozen_dtype", "int8", "--offload_critic", "--lora_r", "8", "--gradient_checkpointing"],
}
RUN = "import resource, runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path('ppo.py', run_name='__main__'); " \
      "print('MAXRSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"


def build_models(workdir: str) -> tuple[str, str, int]:
    """A random 6 x 768 GPT-NeoX as the SFT model and as the RM, with the toy tokenizer."""
    import torch
    from transformers import AutoTokenizer, GPTNeoXConfig, GPTNeoXForCausalLM, GPTNeoXForSequenceClassification

    import toy_task

    toy_task.save_base_model(os.path.join(workdir, "tok"), 32, 1, seed=0)  # only its tokenizer is used
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(workdir, "tok"))
    config = GPTNeoXConfig(vocab_size=len(tokenizer), hidden_size=768, num_hidden_layers=6, num_attention_heads=12,
                           intermediate_size=3072, max_position_embeddings=128, rotary_pct=0.25,
                           tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id,
                           eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    sft, rm = os.path.join(workdir, "sft"), os.path.join(workdir, "rm")
    policy = GPTNeoXForCausalLM(config)
    policy.save_pretrained(sft)
    tokenizer.save_pretrained(sft)
    config.num_labels = 1
    GPTNeoXForSequenceClassification(config).save_pretrained(rm)
    tokenizer.save_pretrained(rm)
    return sft, rm, sum(p.numel() for p in policy.parameters())


def tensor_bytes(t) -> int:
    """Bytes a tensor holds; a torchao int8 weight (common.quantize_int8) counts its inner tensors, the int8 data
    and the per-row scales."""
    names = getattr(t, "tensor_data_names", None)
    if names:
        return sum(tensor_bytes(getattr(t, name)) for name in names)
    return t.numel() * t.element_size()


def frozen_bytes(model) -> int:
    """Bytes of a frozen model's weights (int8-quantised linear layers at their stored size)."""
    return sum(tensor_bytes(p) for p in model.parameters())


def static_bytes(sft: str, rm: str, flags: list[str]) -> dict[str, int]:
    """The tensors that stay after one training step, for the models ppo.py builds under `flags`
    (the LoRA wrapping as in ppo.main; gradient checkpointing changes no static byte)."""
    import torch

    import ppo
    import common
    from common import load_causal_lm, load_reward_model, load_tokenizer

    args = ppo.parse_args(["--sft_model", sft, "--reward_model", rm, *flags])
    tokenizer = load_tokenizer(sft)
    ids = torch.randint(5, 100, (4, 24))
    policy = load_causal_lm(sft, tokenizer, args.dtype)
    if args.lora_r:
        from peft import LoraConfig, get_peft_model

        policy = get_peft_model(policy, LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0.0,
                                                   target_modules=args.lora_target_modules))
    critic = load_reward_model(rm, tokenizer, args.dtype)
    out = {}
    for name, model, loss in (("policy", policy, lambda m: m(input_ids=ids).logits.float().logsumexp(-1).mean()),
                              ("critic", critic, lambda m: m(input_ids=ids).logits.float().pow(2).mean())):
        trained = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(trained, lr=1e-5)
        loss(model).backward()
        opt.step()
        state = [v for st in opt.state.values() for v in st.values() if torch.is_tensor(v)]
        out[f"{name} weights"] = sum(p.numel() * p.element_size() for p in model.parameters())
        out[f"{name} gradients"] = sum(p.grad.numel() * p.grad.element_size() for p in trained)
        out[f"{name} optimizer"] = sum(v.numel() * v.element_size() for v in state)
    out["reference"] = 0 if args.lora_r else frozen_bytes(
        common.load_frozen(load_causal_lm, sft, tokenizer, args.dtype, args.frozen_dtype))
    rm_model = common.load_frozen(load_reward_model, rm, tokenizer, args.dtype, args.frozen_dtype)
    out["reward model"] = frozen_bytes(rm_model)
    return out


def main() -> None:
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import ppo_speed

    statics = {}
    with tempfile.TemporaryDirectory() as tmp:
        paths = ppo_speed.build_models(ppo_speed.Args(), tmp)
        for name, flags in {**OPTIONS,
                            "--dtype bfloat16 --lora_r 16": ["--dtype", "bfloat16", "--lora_r", "16"]}.items():
            statics[name] = static_bytes(paths["sft"], paths["rm"], flags)
        from transformers import AutoModelForCausalLM

        n_bench = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(paths["sft"]).parameters())
    rows = ["| option | policy | critic | reference | reward model | total "
            "| bytes per parameter | 7B, before activations |",
            "|---|---|---|---|---|---|---|---|"]
    for name, b in statics.items():
        policy = sum(v for k, v in b.items() if k.startswith("policy"))
        critic = sum(v for k, v in b.items() if k.startswith("critic"))
        total = sum(b.values())
        cells = [f"{x / 2**20:.1f} MiB" for x in (policy, critic, b["reference"], b["reward model"], total)]
        rows.append(f"| `{name}` | " + " | ".join(cells)
                    + f" | {total / n_bench:.1f} | {total / n_bench * 7 :.0f} GB |")
    static_table = "\n".join(rows) + f"\n\nBenchmark config: {n_bench / 1e6:.2f}M parameters per model."
    print(static_table)

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        sft, rm, n_params = build_models(tmp)
        for name, flags in OPTIONS.items():
            cmd = [sys.executable, "-c", RUN, "ppo.py", "--sft_model", sft, "--reward_model", rm,
                   "--dataset", os.path.join(ROOT, "toy_data", "prompts"),
                   "--total_episodes", "64", "--batch_size", "32",
                   "--response_length", "32", "--eval_every", "0", "--eval_samples", "32", "--sample_every", "0",
                   "--gold_reward_fn", "None", "--no_save", "--run_name", os.path.join(tmp, "runs", name), *flags]
            env = {**os.environ, "OMP_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1"}
            proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("MAXRSS_KB")]
            if proc.returncode != 0 or not lines:
                raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
            results[name] = int(lines[0].split()[1]) * 1024
            print(f"{name}: peak RSS {results[name] / 2**30:.2f} GiB", flush=True)
    base = results["default (fp32, all four models)"]
    rows = ["| option | peak RSS (GiB) | saved vs default (GiB) |", "|---|---|---|"]
    for name, rss in results.items():
        rows.append(f"| `{name}` | {rss / 2**30:.2f} | {(base - rss) / 2**30:+.2f} |")
    body = ("\n".join(rows)
            + f"\n\nModel size: {n_params / 1e6:.1f}M parameters per model (policy, reference, critic, RM).")
    with open(os.path.join(HERE, "memory_options.json"), "w") as f:
        json.dump({"static_bytes_benchmark": statics, "params_per_model_benchmark": n_bench,
                   "peak_rss_bytes": results, "params_per_model": n_params}, f, indent=1)
    print(body)
    from plots import replace_block

    path = os.path.join(HERE, "README.md")
    text = replace_block(open(path).read(), "memory_options_static", static_table)
    text = replace_block(text, "memory_options", body)
    with open(path, "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
