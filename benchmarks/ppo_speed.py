"""Speed benchmark of ppo.py's update loop against its floor (and, optionally, TRL's PPOTrainer).

Config: GPT-NeoX 4 layers x 256 hidden, random init, the toy tokenizer; batch 64, prompts of
16 tokens, responses of 32; 4 PPO epochs, 1 minibatch; fp32; 2 CPU threads.

The floor is the sum of the raw parts of one update, each timed alone in this same run on the same
models and shapes: one `generate`; three no-grad forwards (reference, RM, critic); 4 x (forward +
backward + AdamW step) for the policy and for the critic. ppo.py cannot be faster than that without
changing the work; the ratio ppo/floor says how much it spends on everything else.

    python benchmarks/ppo_speed.py                 # ppo.py and the floor
    python benchmarks/ppo_speed.py --compile       # ppo.py with torch.compile
    PYTHONPATH=/path/to/trl-1.12 python benchmarks/ppo_speed.py --trl   # + TRL, if importable

TRL is not a dependency of this project: install `trl==1.12.0 accelerate` somewhere else
(e.g. `pip install --no-deps --target /tmp/trlsite trl==1.12.0 accelerate`) and put it on PYTHONPATH.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


@dataclass
class Args:
    batch_size: int = 64
    """episodes per update"""
    prompt_length: int = 16
    """prompt tokens"""
    response_length: int = 32
    """response tokens"""
    num_ppo_epochs: int = 4
    """PPO epochs over each batch (1 minibatch)"""
    hidden_size: int = 256
    """model width"""
    num_layers: int = 4
    """model depth"""
    updates: int = 8
    """updates to run; the first `warmup` are not counted"""
    warmup: int = 2
    """updates excluded from the steady state"""
    threads: int = 2
    """torch CPU threads"""
    compile: bool = False
    """run ppo.py with --compile"""
    trl: bool = False
    """also time TRL 1.12's trl.experimental.ppo.PPOTrainer on the same work (needs trl importable)"""
    floor_repeats: int = 3
    """timings of each floor part; the median is used"""
    out_json: str | None = None
    """also write the results here"""


def build_models(args: Args, workdir: str) -> dict[str, str]:
    """Random GPT-NeoX policy and seq-classifier dirs (RM and critic), with the toy tokenizer, and a prompt set."""
    import random

    from transformers import AutoModelForSequenceClassification, GPTNeoXConfig, GPTNeoXForCausalLM

    import toy_task

    tok_dir = os.path.join(workdir, "tok")
    toy_task.save_base_model(tok_dir, 32, 1, seed=0)  # only its tokenizer is used
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    config = GPTNeoXConfig(
        vocab_size=len(tokenizer), hidden_size=args.hidden_size, num_hidden_layers=args.num_layers,
        num_attention_heads=4, intermediate_size=4 * args.hidden_size, max_position_embeddings=128,
        rotary_pct=0.25, tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    sft = os.path.join(workdir, "sft")
    GPTNeoXForCausalLM(config).save_pretrained(sft)
    tokenizer.save_pretrained(sft)
    rm = os.path.join(workdir, "rm")
    model = AutoModelForSequenceClassification.from_pretrained(sft, num_labels=1)
    model.config.reward_mean, model.config.reward_std = 0.0, 1.0
    model.save_pretrained(rm)
    tokenizer.save_pretrained(rm)
    # prompts of exactly `prompt_length` words (no padding): every rollout of the same shape
    words = [w for w in toy_task.vocabulary() if not w.startswith("<")]
    rng = random.Random(0)
    data = os.path.join(workdir, "prompts")
    os.makedirs(data)
    n = args.batch_size * (args.updates + 2)
    for split in ("train", "validation"):
        with open(os.path.join(data, f"{split}.jsonl"), "w") as f:
            for _ in range(n):
                f.write(json.dumps({"prompt": " ".join(rng.choices(words, k=args.prompt_length))}) + "\n")
    return {"sft": sft, "rm": rm, "prompts": data}


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_floor(args: Args, paths: dict[str, str]) -> dict[str, float]:
    """Each raw part of one update, timed alone (median of `floor_repeats`)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(paths["sft"], padding_side="left")
    policy = AutoModelForCausalLM.from_pretrained(paths["sft"])
    ref = AutoModelForCausalLM.from_pretrained(paths["sft"]).eval()
    rm = AutoModelForSequenceClassification.from_pretrained(paths["rm"]).eval()
    critic = AutoModelForSequenceClassification.from_pretrained(paths["rm"])
    prompts = [json.loads(line)["prompt"]
               for line in open(os.path.join(paths["prompts"], "train.jsonl"))][: args.batch_size]
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    generation = dict(max_new_tokens=args.response_length, do_sample=True,
                      temperature=0.7, top_k=0, top_p=1.0, pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        query_response = policy.generate(**enc, **generation)
    mask = torch.ones_like(query_response)
    parts = {}
    with torch.no_grad():
        parts["generate"] = median_time(lambda: policy.generate(**enc, **generation), args.floor_repeats)
        parts["forward_ref"] = median_time(lambda: ref(input_ids=query_response, attention_mask=mask),
                                           args.floor_repeats)
        parts["forward_rm"] = median_time(lambda: rm(input_ids=query_response, attention_mask=mask), args.floor_repeats)
        parts["forward_critic"] = median_time(lambda: critic(input_ids=query_response, attention_mask=mask),
                                              args.floor_repeats)

    def train_steps(model, loss_fn):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-6, eps=1e-5)

        def run():
            for _ in range(args.num_ppo_epochs):
                loss = loss_fn(model(input_ids=query_response, attention_mask=mask))
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

        run()  # warm the optimizer state
        return median_time(run, args.floor_repeats)

    parts["train_policy"] = train_steps(policy, lambda out: out.logits.float().mean())
    parts["train_critic"] = train_steps(critic, lambda out: out.logits.float().mean())
    parts["total"] = sum(parts.values())
    return parts


def time_ppo(args: Args, paths: dict[str, str], workdir: str) -> dict:
    """ppo.py's own main() on the benchmark config; steady state = median over updates after warmup."""
    import ppo

    ppo_args = ppo.parse_args([
        "--sft_model", paths["sft"], "--reward_model", paths["rm"], "--dataset", paths["prompts"],
        "--output_dir", os.path.join(workdir, "ppo_out"), "--run_name", "bench",
        "--batch_size", str(args.batch_size), "--num_minibatches", "1",
        "--num_ppo_epochs", str(args.num_ppo_epochs), "--response_length", str(args.response_length),
        "--total_episodes", str(args.batch_size * args.updates),
        "--local_rollout_forward_batch_size", str(args.batch_size),
        "--eval_every", "0", "--sample_every", "0", "--no_save",
        *(["--compile"] if args.compile else []),
    ])
    ppo_args.gold_reward_fn = None
    out = ppo.main(ppo_args)
    steady = out["timings"][args.warmup :]
    phases = {k: statistics.median(t[k] for t in steady) for k in steady[0] if k.startswith("time/")}
    update = statistics.median(t["time/update"] for t in steady)
    return {"eps": args.batch_size / update, "update_s": update, "phases": phases}


def time_trl(args: Args, paths: dict[str, str], workdir: str) -> dict:
    """TRL 1.12's PPOTrainer on the same models, data and shapes; steady state from per-update timestamps."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(paths["sft"], padding_side="left")
    prompts = [json.loads(line)["prompt"] for line in open(os.path.join(paths["prompts"], "train.jsonl"))]
    dataset = Dataset.from_dict({"input_ids": [tokenizer(p).input_ids for p in prompts]})
    stamps = []

    class Stamp(TrainerCallback):
        def on_step_end(self, *a, **k):
            stamps.append(time.perf_counter())

    config = PPOConfig(
        output_dir=os.path.join(workdir, "trl_out"), per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1, num_mini_batches=1, num_ppo_epochs=args.num_ppo_epochs,
        response_length=args.response_length, total_episodes=args.batch_size * args.updates,
        local_rollout_forward_batch_size=args.batch_size, temperature=0.7, stop_token="eos",
        missing_eos_penalty=1.0, report_to=[], num_sample_generations=0, save_strategy="no",
        use_cpu=True, bf16=False, fp16=False, logging_steps=1, seed=0, dataloader_num_workers=0,
    )
    trainer = PPOTrainer(
        args=config, processing_class=tokenizer, model=AutoModelForCausalLM.from_pretrained(paths["sft"]),
        ref_model=AutoModelForCausalLM.from_pretrained(paths["sft"]),
        reward_model=AutoModelForSequenceClassification.from_pretrained(paths["rm"]),
        value_model=AutoModelForSequenceClassification.from_pretrained(paths["rm"]),
        train_dataset=dataset, callbacks=[Stamp()],
    )
    trainer.train()
    per_update = [b - a for a, b in zip(stamps, stamps[1:])][args.warmup - 1 :]
    update = statistics.median(per_update)
    return {"eps": args.batch_size / update, "update_s": update}


def main(args: Args) -> dict:
    torch.set_num_threads(args.threads)
    results: dict = {"config": vars(args), "torch": torch.__version__, "threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as workdir:
        paths = build_models(args, workdir)
        results["ppo"] = time_ppo(args, paths, workdir)
        results["floor"] = time_floor(args, paths)
        if args.trl:
            results["trl"] = time_trl(args, paths, workdir)
    floor_eps = args.batch_size / results["floor"]["total"]
    results["floor"]["eps"] = floor_eps
    results["ppo_over_floor"] = results["ppo"]["eps"] / floor_eps
    print(f"\nppo.py{' --compile' if args.compile else ''}: {results['ppo']['eps']:.2f} episodes/s "
          f"({results['ppo']['update_s']:.3f} s/update, steady-state median of {args.updates - args.warmup})")
    for k, v in results["ppo"]["phases"].items():
        print(f"  {k:<28} {v:.3f} s")
    print(f"floor: {floor_eps:.2f} episodes/s ({results['floor']['total']:.3f} s/update)")
    for k, v in results["floor"].items():
        if k not in ("total", "eps"):
            print(f"  {k:<28} {v:.3f} s")
    print(f"ppo.py / floor = {results['ppo_over_floor']:.3f}")
    if "trl" in results:
        results["ppo_over_trl"] = results["ppo"]["eps"] / results["trl"]["eps"]
        print(f"TRL 1.12 PPOTrainer: {results['trl']['eps']:.2f} episodes/s; "
              f"ppo.py / TRL = {results['ppo_over_trl']:.3f}")
    if args.out_json:
        with open(args.out_json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    import tyro

    main(tyro.cli(Args, use_underscores=True))
