"""Hostile and careless input, as a user would give it: every case ends in one line that names the problem and
the fix, a non-zero exit, and every file that existed before unchanged (hashed before and after).

The catalogue runs each stage in-process through its real entry point (common.run), so a case costs only
what the stage does before it stops: the checks come before the first training step. The few cases that
need a real process (signals, two runs at once, torchrun) run as subprocesses. Faults are injected at
each filesystem step of the final save and of a checkpoint save.
"""

import errno
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import ROOT, one_thread

import common
import dpo
import grpo
import ppo
import sft
import train_rm

from test_reliability import kill_tree, launch


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------
def snapshot(*roots) -> dict[str, str]:
    """sha256 of every file under the roots: what a case must leave as it was."""
    hashes = {}
    for root in roots:
        for dirpath, _, files in os.walk(root):
            for name in files:
                path = os.path.join(dirpath, name)
                with open(path, "rb") as f:
                    hashes[path] = hashlib.sha256(f.read()).hexdigest()
    return hashes


def write_jsonl(path, rows) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return os.path.dirname(path)


def dataset(tmp_path, name, train_rows, validation_rows=None) -> str:
    """A local dataset dir of train/validation jsonl files."""
    path = str(tmp_path / name)
    write_jsonl(f"{path}/train.jsonl", train_rows)
    write_jsonl(f"{path}/validation.jsonl", validation_rows if validation_rows is not None else train_rows)
    return path


def copy_model(src, dst, config_edit=None, tokenizer_edit=None, remove=()) -> str:
    shutil.copytree(src, dst)
    for file, edit in (("config.json", config_edit), ("tokenizer.json", tokenizer_edit)):
        if edit:
            with open(os.path.join(dst, file)) as f:
                data = json.load(f)
            edit(data)
            with open(os.path.join(dst, file), "w") as f:
                json.dump(data, f)
    for file in remove:
        os.remove(os.path.join(dst, file))
    return str(dst)


def run_stage(module, argv) -> int | str:
    """The stage's own entry point; returns SystemExit's code (a message means exit status 1)."""
    with pytest.raises(SystemExit) as info:
        common.run(module.main, lambda: module.parse_args(argv))
    return info.value.code


class Ctx:
    """Paths of one case: the session's toy task and stand-in RM, and this test's tmp dir."""

    def __init__(self, toy_dir, rm, tmp_path):
        self.toy, self.rm, self.tmp = toy_dir, rm, tmp_path
        self.base = os.path.join(toy_dir, "base_model")
        self.out = str(tmp_path / "out")

    def sft(self, *extra):
        return sft, ["--model_name_or_path", self.base, "--dataset", os.path.join(self.toy, "sft"), "--output_dir",
                     self.out,
                     "--max_steps", "2", "--batch_size", "32", "--num_eval_samples", "0", "--num_logged_samples", "0",
                     "--run_name", str(self.tmp / "tb"), *extra]

    def rm_(self, *extra):
        return train_rm, ["--model_name_or_path", self.base, "--dataset", os.path.join(self.toy, "prefs"),
                          "--output_dir", self.out, "--num_train_pairs", "128", "--batch_size", "64",
                          "--num_normalisation_prompts", "8", "--run_name", str(self.tmp / "tb"), *extra]

    def ppo(self, *extra):
        return ppo, ["--sft_model", self.base, "--reward_model", self.rm, "--dataset",
                     os.path.join(self.toy, "prompts"),
                     "--output_dir", self.out, "--total_episodes", "64", "--batch_size", "32", "--response_length", "8",
                     "--eval_samples", "16", "--run_name", str(self.tmp / "tb"), *extra]

    def grpo(self, *extra):
        return grpo, ["--sft_model", self.base, "--reward_model", self.rm, "--dataset",
                      os.path.join(self.toy, "prompts"),
                      "--output_dir", self.out, "--total_episodes", "64", "--batch_size", "32", "--response_length",
                      "8",
                      "--eval_samples", "16", "--run_name", str(self.tmp / "tb"), *extra]

    def dpo(self, *extra):
        return dpo, ["--model_name_or_path", self.base, "--reward_model", self.rm, "--dataset",
                     os.path.join(self.toy, "prefs"), "--prompt_dataset", os.path.join(self.toy, "prompts"),
                     "--output_dir", self.out, "--num_train_pairs", "128", "--batch_size", "64", "--num_eval_pairs",
                     "16", "--eval_samples", "8", "--generation_batch_size", "8", "--response_length", "8",
                     "--run_name", str(self.tmp / "tb"), *extra]

    def marked_run(self, path, stage, finished=True) -> str:
        os.makedirs(path)
        common.write_marker(path, stage)
        with open(os.path.join(path, "weights.bin"), "w") as f:
            f.write("an earlier run's weights")
        if finished:
            common.write_json(os.path.join(path, "eval_results.json"), {"done": True})
        return path


# ----------------------------------------------------------------------------------------------
# The catalogue: class -> case -> (setup(ctx) -> (module, argv), the message's key phrase)
# ----------------------------------------------------------------------------------------------
def bad_rows(c, name, rows):
    return dataset(c.tmp, name, rows)


CATALOGUE = {
    "flags": {
        "sft --batch_size 0": (lambda c: c.sft("--batch_size", "0"), "--batch_size 0: must be >= 1"),
        "sft --gradient_accumulation_steps 0": (lambda c: c.sft("--gradient_accumulation_steps", "0"),
                                                "--gradient_accumulation_steps 0: must be >= 1"),
        "sft --eval_every 0": (lambda c: c.sft("--eval_every", "0"), "--eval_every 0: must be >= 1"),
        "sft --learning_rate -1": (lambda c: c.sft("--learning_rate", "-1"), "--learning_rate -1.0: must be > 0"),
        "sft --learning_rate nan": (lambda c: c.sft("--learning_rate", "nan"), "--learning_rate nan: must be > 0"),
        "sft --seed -1": (lambda c: c.sft("--seed", "-1"), "--seed -1: must be in [0, 2^31)"),
        "sft --temperature 0 (fails at start, not at the final sampling)": (lambda c: c.sft("--temperature", "0"),
                                                                            "--temperature 0.0: must be > 0"),
        "sft --eval_batch_size 0": (lambda c: c.sft("--eval_batch_size", "0"), "--eval_batch_size 0: must be >= 1"),
        "sft --max_steps -3": (lambda c: c.sft("--max_steps", "-3"), "--max_steps -3: must be >= 0"),
        "sft batch size does not divide": (lambda c: c.sft("--batch_size", "32", "--gradient_accumulation_steps", "3"),
                                           "must be divisible by"),
        "rm --num_train_pairs 0": (lambda c: c.rm_("--num_train_pairs", "0"), "--num_train_pairs 0: must be >= 1"),
        "rm --log_every 0": (lambda c: c.rm_("--log_every", "0"), "--log_every 0: must be >= 1"),
        "rm --temperature 0": (lambda c: c.rm_("--temperature", "0"), "--temperature 0.0: must be > 0"),
        "rm --batch_size -4": (lambda c: c.rm_("--batch_size", "-4"), "--batch_size -4: must be >= 1"),
        "rm --max_grad_norm -1": (lambda c: c.rm_("--max_grad_norm", "-1"), "--max_grad_norm -1.0: must be >= 0"),
        "rm batch size does not divide": (lambda c: c.rm_("--batch_size", "64", "--micro_batch_size", "48"),
                                          "must be divisible by"),
        "ppo --learning_rate -0.001": (lambda c: c.ppo("--learning_rate", "-0.001"),
                                       "--learning_rate -0.001: must be > 0"),
        "ppo --local_rollout_forward_batch_size 0": (lambda c: c.ppo("--local_rollout_forward_batch_size", "0"),
                                                     "--local_rollout_forward_batch_size 0: must be >= 1"),
        "ppo --eval_batch_size 0": (lambda c: c.ppo("--eval_batch_size", "0"), "--eval_batch_size 0: must be >= 1"),
        "ppo --micro_batch_size 0": (lambda c: c.ppo("--micro_batch_size", "0"), "--micro_batch_size 0: must be >= 1"),
        "ppo --lam 1.5": (lambda c: c.ppo("--lam", "1.5"), "--lam 1.5: must be in [0, 1]"),
        "ppo --temperature 0": (lambda c: c.ppo("--temperature", "0"), "--temperature 0.0: must be > 0"),
        "ppo --kl_coef -0.1": (lambda c: c.ppo("--kl_coef", "-0.1"), "--kl_coef -0.1: must be >= 0"),
        "ppo fewer episodes than a batch": (lambda c: c.ppo("--total_episodes", "10"), "less than one batch"),
        "unknown preset": (lambda c: (ppo, ["pythia-7b-tldr", *c.ppo()[1]]),
                           "unknown preset 'pythia-7b-tldr'; the presets are toy, pythia-tldr"),
        "grpo with one sample per prompt": (lambda c: c.grpo("--samples_per_prompt", "1"),
                                            "pass --samples_per_prompt 2 or more"),
        "grpo batch not divisible by samples_per_prompt": (
            lambda c: c.grpo("--advantage_estimator", "rloo", "--samples_per_prompt", "3"),
            "not divisible by --samples_per_prompt 3"),
        "ppo --dual_clip 1": (lambda c: c.ppo("--dual_clip", "1.0"), "--dual_clip 1.0: must be > 1"),
        "grpo --cliprange_high 0": (lambda c: c.grpo("--cliprange_high", "0"), "--cliprange_high 0.0: must be > 0"),
        "ppo --advantage_estimator, moved to grpo.py": (lambda c: c.ppo("--advantage_estimator", "grpo"),
                                                        "are in grpo.py now: python grpo.py --advantage_estimator"),
        "ppo --samples_per_prompt=4, moved to grpo.py": (lambda c: c.ppo("--samples_per_prompt=4"),
                                                         "are in grpo.py now"),
        "grpo --reward_fn and --reward_model both": (lambda c: c.grpo("--reward_fn", "toy_task:gold_score"),
                                                     "give exactly one"),
        "ppo --reward_fn and --reward_model both": (lambda c: c.ppo("--reward_fn", "toy_task:gold_score"),
                                                    "give exactly one (--reward_fn needs --reward_model None)"),
        "ppo neither --reward_fn nor --reward_model": (lambda c: c.ppo("--reward_model", "None"),
                                                       "no reward: give --reward_model PATH or --reward_fn"),
        "ppo --reward_fn that cannot be imported": (
            lambda c: c.ppo("--reward_model", "None", "--reward_fn", "no_such_module_xyz:f", "--critic_init", "sft"),
            "--reward_fn 'no_such_module_xyz:f' cannot be imported"),
        "ppo --reward_fn with an explicit critic from the RM": (
            lambda c: c.ppo("--reward_model", "None", "--reward_fn", "toy_task:gold_score", "--critic_init", "rm"),
            "pass --critic_init sft"),
    },
    "paths": {
        "--output_dir .": (lambda c: c.sft("--output_dir", "."), "is or contains the current directory"),
        "--output_dir /": (lambda c: c.rm_("--output_dir", "/"), "is or contains the filesystem root"),
        "--output_dir the project root": (lambda c: c.ppo("--output_dir", ROOT),
                                          "is or contains this project's own directory"),
        "--output_dir home": (lambda c: c.sft("--output_dir", os.path.expanduser("~")),
                              "is or contains your home directory"),
        "ppo --output_dir models, holding its own inputs": (lambda c: ppo_into_models(c), "contains the SFT model"),
        "sft --output_dir = the dataset dir": (lambda c: c.sft("--output_dir", os.path.join(c.toy, "sft")),
                                               "is the dataset"),
        "rm --output_dir inside the model dir": (lambda c: c.rm_("--output_dir", os.path.join(c.base, "rm")),
                                                 "lies inside the model"),
        "--output_dir inside the toy task's dir": (lambda c: c.sft("--output_dir", os.path.join(c.toy, "new_sft")),
                                                   "lies inside the toy_task run dir"),
        "output dir holds someone's notes": (lambda c: notes_in(c.out) or c.sft(),
                                             "is not empty and was not written by sft"),
        "output dir holds someone's notes, with --overwrite": (lambda c: notes_in(c.out) or c.sft("--overwrite"),
                                                               "is not empty and was not written by sft"),
        "output dir holds another stage's run": (lambda c: c.marked_run(c.out, "sft") and c.ppo("--overwrite"),
                                                 "holds the run of sft, not of ppo"),
        "output dir holds a finished run": (lambda c: c.marked_run(c.out, "sft") and c.sft(),
                                            "holds a finished run; pass --overwrite"),
        "output path is a file": (lambda c: notes_file(c.out) or c.sft(), "is a file, not a dir"),
        "output's parent is a file": (
            lambda c: notes_file(str(c.tmp / "f")) or c.sft("--output_dir", str(c.tmp / "f" / "out")),
            "is a file, so the dir cannot be made"),
        "output under /proc": (lambda c: c.sft("--output_dir", "/proc/rlhf_out"), "cannot write in '/proc'"),
        "checkpoint dir holds someone's files": (
            lambda c: notes_in(str(c.tmp / "ck")) or c.sft("--checkpoint_dir", str(c.tmp / "ck")),
            "--checkpoint_dir"),
        "checkpoint dir inside the output dir": (lambda c: c.sft("--checkpoint_dir", os.path.join(c.out, "ck")),
                                                 "lies inside the output dir"),
        "a foreign {out}.tmp in the way of the atomic save": (lambda c: notes_in(c.out + ".tmp") or c.sft(),
                                                              "is in the way of the atomic save"),
        "dataset path that does not exist": (lambda c: c.sft("--dataset", str(c.tmp / "no_such_dir")),
                                             "does not exist"),
        "hub name that does not exist (offline)": (lambda c: c.rm_("--dataset", "no-such-org/no-such-preferences"),
                                                   "cannot load dataset 'no-such-org/no-such-preferences'"),
        "rm --prompt_dataset missing: fails before training": (lambda c: c.rm_("--prompt_dataset", str(c.tmp / "nope")),
                                                               "prompt dataset path"),
        "rm --bayes_ceiling_file not JSON": (
            lambda c: notes_file(str(c.tmp / "ceiling.json"))
                      or c.rm_("--bayes_ceiling_file", str(c.tmp / "ceiling.json")),
            "has no number \"bayes_accuracy\""),
    },
    "models": {
        "model dir without config.json": (
            lambda c: c.sft("--model_name_or_path", copy_model(c.base, c.tmp / "m", remove=["config.json"])),
            "has no config.json"),
        "config.json is not JSON": (lambda c: c.sft("--model_name_or_path", broken_config(c)),
                                    "config.json is not valid JSON"),
        "model dir without weights": (
            lambda c: c.sft("--model_name_or_path", copy_model(c.base, c.tmp / "m", remove=["model.safetensors"])),
            "has no weights"),
        "truncated model.safetensors": (lambda c: c.sft("--model_name_or_path", truncated_weights(c)),
                                        "is truncated or corrupt"),
        "model dir without tokenizer files": (
            lambda c: c.sft("--model_name_or_path",
                            copy_model(c.base, c.tmp / "m", remove=["tokenizer.json", "tokenizer_config.json"])),
            "has no tokenizer files"),
        "ppo SFT model without tokenizer files": (
            lambda c: c.ppo("--sft_model",
                            copy_model(c.base, c.tmp / "m", remove=["tokenizer.json", "tokenizer_config.json"])),
            "SFT model"),
        "model path is a file": (
            lambda c: notes_file(str(c.tmp / "m")) or c.sft("--model_name_or_path", str(c.tmp / "m")),
            "is a file, not a model dir"),
        "ppo --reward_model is a causal LM (the SFT model)": (lambda c: c.ppo("--reward_model", c.base),
                                                              "not a reward model"),
        "ppo reward model with num_labels=2": (
            lambda c: c.ppo("--reward_model",
                            copy_model(c.rm, c.tmp / "rm2",
                                       config_edit=lambda d: d.update(id2label={"0": "a", "1": "b"}))),
            "has 2 outputs"),
        "tokenizer without a pad token": (
            lambda c: c.sft("--model_name_or_path", edit_tokenizer_config(c, pad_token=None)),
            "has no pad token, which would mask the real EOS out of the loss; pass --add_pad_token"),
        "PAD == EOS": (lambda c: c.sft("--model_name_or_path", edit_tokenizer_config(c, pad_token="<eos>")),
                       "pads with its EOS token, which would mask the real EOS out of the loss; pass --add_pad_token"),
        "model config without EOS": (
            lambda c: c.sft("--model_name_or_path",
                            copy_model(c.base, c.tmp / "m", config_edit=lambda d: d.update(eos_token_id=None),
                                       remove=["generation_config.json"])),
            "has no eos_token_id"),
        "embeddings smaller than the tokenizer": (
            lambda c: c.sft("--model_name_or_path", copy_model(c.base, c.tmp / "m", tokenizer_edit=add_words)),
            "embedding rows, but its tokenizer has"),
        "an ensemble member with another tokenizer": (lambda c: c.ppo("--reward_model", c.rm, swapped_vocab_rm(c)),
                                                      "has another vocabulary than the policy"),
        "RM vocabulary differs, re-tokenising off": (
            lambda c: c.ppo("--reward_model", swapped_vocab_rm(c), "--no_rm_retokenize"),
            "differs from the policy's"),
    },
    "data rows": {
        "missing column": (lambda c: c.rm_("--chosen_column", "preferred"), "has no column 'preferred'"),
        "empty prompt": (
            lambda c: c.sft("--dataset", bad_rows(c, "d", [{"prompt": "the plot was", "completion": "good ."}] * 40
                                                  + [{"prompt": "", "completion": "good ."}])),
            "1 with an empty prompt; first: row 40"),
        "empty completion": (
            lambda c: c.sft("--dataset", bad_rows(c, "d", [{"prompt": "the plot was", "completion": "good ."}] * 40
                                                  + [{"prompt": "the plot", "completion": " "}])),
            "1 with an empty completion; first: row 40"),
        "prompt longer than the limit": (lambda c: c.ppo("--max_prompt_length", "2"), "longer than max_prompt_length"),
        "chosen == rejected in every row": (
            lambda c: c.rm_("--dataset", bad_rows(c, "d", [{"prompt": "the plot", "chosen": "was good .",
                                                            "rejected": "was good ."}] * 80)),
            "80 of 80 rows (100.0%) cannot be used (80 with chosen == rejected"),
        "null chosen": (
            lambda c: c.rm_("--dataset", bad_rows(c, "d", [{"prompt": "the plot", "chosen": "was good .",
                                                            "rejected": "was bad ."}] * 80
                                                  + [{"prompt": "the plot", "chosen": None, "rejected": "was bad ."}])),
            "row 80: column 'chosen' is null"),
        "numeric chosen": (
            lambda c: c.rm_("--dataset",
                            bad_rows(c, "d", [{"prompt": "the plot", "chosen": 3, "rejected": "was bad ."}] * 80)),
            "column 'chosen' is a int, not text"),
        "null margin": (
            lambda c: c.rm_("--dataset", bad_rows(c, "d", [{"prompt": "p", "chosen": "good .", "rejected": "bad .",
                                                            "m": 1.0}] * 80
                                                  + [{"prompt": "p", "chosen": "good .", "rejected": "bad .",
                                                      "m": None}]),
                            "--margin_column", "m"),
            "column 'm' is None, not a finite number"),
        "null completion (sft)": (
            lambda c: c.sft("--dataset", bad_rows(c, "d", [{"prompt": "the plot was", "completion": "good ."}] * 40
                                                  + [{"prompt": "the plot", "completion": None}])),
            "column 'completion' is null"),
        "null prompt (ppo)": (
            lambda c: c.ppo("--dataset", bad_rows(c, "d", [{"prompt": "the plot was"}] * 40 + [{"prompt": None}])),
            "row 40: column 'prompt' is null"),
        "non-UTF-8 bytes": (lambda c: c.sft("--dataset", latin1_rows(c)), "line 3: not UTF-8"),
        "a JSON line cut in half": (
            lambda c: c.sft("--dataset", bad_rows(c, "d", ['{"prompt": "the plot was", "completion": "good ."}'] * 5
                                                  + ['{"prompt": "the plo'])),
            "train.jsonl, line 6: not valid JSON"),
        "an empty train.jsonl": (lambda c: c.sft("--dataset", empty_train(c)), "train.jsonl' is empty"),
        "a message without content": (
            lambda c: c.sft("--dataset", bad_rows(c, "d", [{"messages": [{"role": "user", "content": "the plot"},
                                                                         {"role": "assistant", "content": "good ."}]}]
                                                  * 40 + [{"messages": [{"role": "user"},
                                                                        {"role": "assistant", "content": "good ."}]}])),
            "row 40: message 0 has no text 'content'"),
        "text the tokenizer maps to <unk>": (
            lambda c: c.sft("--dataset", bad_rows(c, "d", [{"prompt": "zzz qqq xxx", "completion": "www vvv"}] * 40)),
            "of the tokens are '<unk>'"),
        "implicit-prompt text without the marker": (
            lambda c: c.sft("--dataset", bad_rows(c, "d", [{"chosen": "no marker here"}] * 40), "--dataset_format",
                            "implicit_prompt", "--completion_column", "chosen"),
            "(40 without the prompt marker; first: row 0), more than --max_dropped_fraction 0.01"),
    },
    "checkpoints": {
        "--resume without checkpoints": (lambda c: c.sft("--resume"), "--resume: no checkpoint in"),
        "checkpoints of an unfinished run, no --resume": (
            lambda c: unfinished_sft(c) and c.sft("--checkpoint_every", "1"),
            "holds checkpoints of an unfinished run; pass --resume"),
        "--resume with another flag": (
            lambda c: unfinished_sft(c) and c.sft("--checkpoint_every", "1", "--resume", "--learning_rate", "1e-3"),
            "--resume: the checkpoint was made with --learning_rate 0.003, not 0.001"),
        "--resume after adding --value_head_on_policy": (
            lambda c: unfinished_ppo(c) and c.ppo(*PPO_CHECKPOINTED, "--resume", "--value_head_on_policy"),
            "--resume: the checkpoint was made with --value_head_on_policy False, not True"),
        "a truncated checkpoint shard": (
            lambda c: unfinished_sft(c, damage=truncate_shard) and c.sft("--checkpoint_every", "1", "--resume"),
            "__0_0.distcp' cannot be read"),
        "a deleted rank0.pt": (
            lambda c: unfinished_sft(c, damage=lambda p: os.remove(os.path.join(p, "rank0.pt")))
                      and c.sft("--checkpoint_every", "1", "--resume"),
            "is incomplete (no rank0.pt)"),
        "an unreadable meta.json": (
            lambda c: unfinished_sft(c, damage=lambda p: notes_file(os.path.join(p, "meta.json")))
                      and c.sft("--checkpoint_every", "1", "--resume"),
            "is unreadable"),
        "a checkpoint of 2 processes, resumed on 1": (
            lambda c: unfinished_sft(c, damage=two_process_meta) and c.sft("--checkpoint_every", "1", "--resume"),
            "was written by 2 processes, not 1"),
    },
}


# dpo.py's cases, in the same table
SAME_PAIR = [{"prompt": "the plot", "chosen": "was good .", "rejected": "was good ."}] * 80
CATALOGUE["flags"].update({
    "dpo --beta 0": (lambda c: c.dpo("--beta", "0"), "--beta 0.0: must be > 0"),
    "dpo --temperature 0": (lambda c: c.dpo("--temperature", "0"), "--temperature 0.0: must be > 0"),
    "dpo --eval_samples -1": (lambda c: c.dpo("--eval_samples", "-1"), "--eval_samples -1: must be >= 0"),
    "dpo --loss_type ipo with a margin column": (lambda c: c.dpo("--loss_type", "ipo", "--margin_column", "m"),
                                                 "IPO has none"),
    "dpo batch size does not divide": (lambda c: c.dpo("--batch_size", "64", "--micro_batch_size", "48"),
                                       "must be divisible by"),
    "dpo fewer pairs than a batch": (lambda c: c.dpo("--num_train_pairs", "32"), "fewer than one --batch_size 64"),
})
CATALOGUE["paths"].update({
    "dpo --output_dir inside its SFT model": (lambda c: c.dpo("--output_dir", os.path.join(c.base, "dpo")),
                                              "lies inside the model"),
    "dpo --prompt_dataset that does not exist": (lambda c: c.dpo("--prompt_dataset", str(c.tmp / "nope")),
                                                 "--prompt_dataset path"),
    "dpo --output_dir holds an RM's run": (lambda c: c.marked_run(c.out, "rm") and c.dpo("--overwrite"),
                                           "holds the run of rm, not of dpo"),
})
CATALOGUE["models"].update({
    "dpo --reward_model is a causal LM (the SFT model)": (lambda c: c.dpo("--reward_model", c.base),
                                                          "not a reward model"),
    "dpo model without weights": (lambda c: c.dpo("--model_name_or_path", copy_model(
        c.base, c.tmp / "m", remove=["model.safetensors"])), "has no weights"),
})
CATALOGUE["data rows"].update({
    "dpo missing column": (lambda c: c.dpo("--rejected_column", "worse"), "has no column 'worse'"),
    "dpo chosen == rejected in every row": (lambda c: c.dpo("--dataset", bad_rows(c, "d", SAME_PAIR)),
                                            "80 with chosen == rejected"),
    "dpo held-out prompt longer than the limit": (lambda c: c.dpo("--max_prompt_length", "2"),
                                                  "longer than max_prompt_length"),
})
CATALOGUE["checkpoints"].update({
    "dpo --resume without checkpoints": (lambda c: c.dpo("--resume"), "--resume: no checkpoint in"),
    "dpo --resume with another beta": (lambda c: unfinished_dpo(c) and c.dpo("--checkpoint_every", "1", "--resume",
                                                                             "--beta", "0.2"),
                                       "--resume: the checkpoint was made with --beta 0.1, not 0.2"),
})

def notes_in(path) -> None:
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "notes.txt"), "w") as f:
        f.write("my notes, not a run")


def notes_file(path) -> None:
    with open(path, "w") as f:
        f.write("a file of notes, not JSON\n")


def ppo_into_models(c):
    models = c.tmp / "models"
    os.makedirs(models)
    sft_dir, rm_dir = copy_model(c.base, models / "sft"), copy_model(c.rm, models / "rm")
    return ppo, c.ppo("--sft_model", sft_dir, "--reward_model", rm_dir, "--output_dir", str(models))[1]


def broken_config(c) -> str:
    path = copy_model(c.base, c.tmp / "m")
    notes_file(os.path.join(path, "config.json"))
    return path


def truncated_weights(c) -> str:
    path = copy_model(c.base, c.tmp / "m")
    file = os.path.join(path, "model.safetensors")
    os.truncate(file, os.path.getsize(file) // 2)
    return path


def edit_tokenizer_config(c, **update) -> str:
    path = copy_model(c.base, c.tmp / "m")
    with open(os.path.join(path, "tokenizer_config.json")) as f:
        cfg = json.load(f)
    cfg.update(update)
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f)
    return path


def add_words(tok: dict) -> None:
    vocab = tok["model"]["vocab"]
    for word in ("zebra", "quokka", "axolotl"):
        vocab[word] = len(vocab)


def swapped_vocab_rm(c) -> str:
    path = copy_model(c.rm, c.tmp / "other_rm")
    with open(os.path.join(path, "tokenizer.json")) as f:
        tok = json.load(f)
    vocab = tok["model"]["vocab"]
    vocab["good"], vocab["bad"] = vocab["bad"], vocab["good"]  # same size, different vocabulary
    with open(os.path.join(path, "tokenizer.json"), "w") as f:
        json.dump(tok, f)
    return path


def latin1_rows(c) -> str:
    path = dataset(c.tmp, "d", [{"prompt": "the plot was", "completion": "good ."}] * 4)
    with open(os.path.join(path, "train.jsonl"), "rb") as f:
        lines = f.read().splitlines(keepends=True)
    lines[2] = '{"prompt": "caf\u00e9", "completion": "good ."}\n'.encode("latin-1")
    with open(os.path.join(path, "train.jsonl"), "wb") as f:
        f.write(b"".join(lines))
    return path


def empty_train(c) -> str:
    path = dataset(c.tmp, "d", [{"prompt": "the plot was", "completion": "good ."}] * 4)
    open(os.path.join(path, "train.jsonl"), "w").close()
    return path


def unfinished_sft(c, damage=None) -> bool:
    """A 2-step SFT run with a checkpoint per step, its output dir gone: as if it died before the final save."""
    module, argv = c.sft("--checkpoint_every", "1")
    module.main(module.parse_args(argv))
    shutil.rmtree(c.out)
    if damage:
        damage(common.latest_checkpoint(c.out + "_checkpoints"))
    return True


PPO_CHECKPOINTED = ("--checkpoint_every", "1", "--eval_every", "0", "--gold_reward_fn", "None")


def unfinished_ppo(c) -> bool:
    module, argv = c.ppo(*PPO_CHECKPOINTED)
    module.main(module.parse_args(argv))
    shutil.rmtree(c.out)
    return True



def unfinished_dpo(c) -> bool:
    module, argv = c.dpo("--checkpoint_every", "1")
    module.main(module.parse_args(argv))
    shutil.rmtree(c.out)
    return True

def truncate_shard(checkpoint: str) -> None:
    shard = [f for f in os.listdir(checkpoint) if f.endswith(".distcp")][0]
    os.truncate(os.path.join(checkpoint, shard), 100)


def two_process_meta(checkpoint: str) -> None:
    meta = json.load(open(os.path.join(checkpoint, "meta.json")))
    common.write_json(os.path.join(checkpoint, "meta.json"), {**meta, "world_size": 2})


CASES = [(cls, name) for cls, cases in CATALOGUE.items() for name in cases]


@pytest.mark.parametrize("cls,name", CASES, ids=[f"{cls}: {name}" for cls, name in CASES])
def test_hostile_input(cls, name, toy_dir, standin_rm, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # TensorBoard runs/ of anything that starts land here
    setup, expected = CATALOGUE[cls][name]
    c = Ctx(toy_dir, standin_rm, tmp_path)
    module, argv = setup(c)
    protected = [p for p in (ROOT, os.path.expanduser("~")) if p in argv]
    listing = {p: sorted(os.listdir(p)) for p in protected}
    before = snapshot(tmp_path, toy_dir, standin_rm)
    code = run_stage(module, argv)
    assert isinstance(code, str), f"exit status {code!r}, not a one-line message"  # python exits 1 with it
    assert expected in code, code
    assert "\n" not in code.strip(), code
    after = snapshot(tmp_path, toy_dir, standin_rm)
    assert {p: h for p, h in after.items() if p in before} == before, \
        "a file that existed before was changed or deleted"
    assert set(before) <= set(after)
    assert {p: sorted(os.listdir(p)) for p in protected} == listing


def test_the_catalogue_covers_every_class():
    assert len(CASES) >= 60
    assert set(CATALOGUE) == {"flags", "paths", "models", "data rows", "checkpoints"}


# ----------------------------------------------------------------------------------------------
# Disk full: one line naming the path, and the previous checkpoint and model intact
# ----------------------------------------------------------------------------------------------
def test_disk_full_at_the_final_save_keeps_the_previous_run(toy_dir, standin_rm, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    c = Ctx(toy_dir, standin_rm, tmp_path)
    module, argv = c.sft("--overwrite")
    module.main(module.parse_args(argv))  # the previous run
    before = snapshot(c.out)
    from transformers import PreTrainedModel

    def full(self, path, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", os.path.join(path, "model.safetensors"))
    monkeypatch.setattr(PreTrainedModel, "save_pretrained", full)
    code = run_stage(module, argv)
    assert "the disk is full" in code and f"'{c.out}' is unchanged" in code and "model.safetensors" in code, code
    assert snapshot(c.out) == before
    assert not os.path.exists(c.out + ".tmp")  # the partial save is gone, and the space it took


def test_disk_full_at_a_checkpoint_keeps_the_previous_checkpoint(toy_dir, standin_rm, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    c = Ctx(toy_dir, standin_rm, tmp_path)
    real, calls = common.torch.save, []

    def full_on_the_second(obj, path, *a, **k):
        if str(path).endswith("rank0.pt"):
            calls.append(path)
        if len(calls) == 2 and str(path).endswith("rank0.pt"):
            raise OSError(errno.ENOSPC, "No space left on device", path)
        return real(obj, path, *a, **k)
    monkeypatch.setattr(common.torch, "save", full_on_the_second)
    code = run_stage(*c.sft("--checkpoint_every", "1"))
    kept = os.path.join(c.out + "_checkpoints", "step_1")
    assert "the disk is full" in code and f"the previous checkpoint ({kept}) is intact" in code, code
    assert common.checkpoints(c.out + "_checkpoints") == [kept]
    assert not os.path.exists(os.path.join(c.out + "_checkpoints", "step_2.tmp"))
    monkeypatch.undo()
    module, argv = c.sft("--checkpoint_every", "1", "--resume")  # it continues from step_1
    module.main(module.parse_args(argv))
    assert os.path.exists(os.path.join(c.out, "eval_results.json"))


# ----------------------------------------------------------------------------------------------
# Fault injection at each filesystem step of the final save and of a checkpoint save
# ----------------------------------------------------------------------------------------------
class Crash(Exception):
    pass


def tiny_model(toy_dir, seed):
    import torch
    from common import load_causal_lm, load_tokenizer

    tok = load_tokenizer(os.path.join(toy_dir, "base_model"))
    torch.manual_seed(seed)
    model = load_causal_lm(os.path.join(toy_dir, "base_model"), tok)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    return model, tok


def files(root) -> dict[str, str]:
    """snapshot() keyed by the path below root, to compare two dirs."""
    return {os.path.relpath(p, root): h for p, h in snapshot(root).items()}


def inject(monkeypatch, owner, attr, when) -> None:
    """owner.attr raises Crash on the calls where when(*args) holds (a kill at that instant)."""
    real = getattr(owner, attr)

    def wrapper(*args, **kwargs):
        if when(*args):
            raise Crash(attr)
        return real(*args, **kwargs)
    monkeypatch.setattr(owner, attr, wrapper)


def final_save_faults():
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    return {  # each filesystem step of common.save_model, in order
        "make the .tmp dir": (common.os, "makedirs", lambda p, *a: str(p).endswith(".tmp")),
        "write its marker": (common, "write_marker", lambda *a: True),
        "write the weights": (PreTrainedModel, "save_pretrained", lambda *a: True),
        "write the tokenizer": (PreTrainedTokenizerBase, "save_pretrained", lambda *a: True),
        "write eval_results.json": (common, "write_json", lambda p, *a: str(p).endswith("eval_results.json")),
        "swap the dirs": (common, "exchange", lambda *a: True),
        "delete the old run": (common.shutil, "rmtree", lambda p, *a: str(p).endswith((".tmp", ".old"))),
        "(two renames) move the old run aside": (common.os, "replace", lambda a, b: str(b).endswith(".old")),
        "(two renames) move the new run in": (common.os, "replace", lambda a, b: str(a).endswith(".tmp")),
    }


@pytest.mark.parametrize("fallback", [False, True], ids=["rename-exchange", "two-renames"])
@pytest.mark.parametrize("step", list(final_save_faults()))
def test_a_fault_at_each_step_of_the_final_save(step, fallback, toy_dir, tmp_path, monkeypatch):
    """At every instant the output path holds the complete old run or the complete new one (the two-rename
    fallback, for kernels without an atomic swap, has one instant without it, which the next start restores);
    the next start removes what the crash left, and a save then succeeds."""
    if step == "swap the dirs" and fallback or step.startswith("(two renames)") and not fallback:
        pytest.skip("a step of the other replacement path")
    out, reference = str(tmp_path / "out"), str(tmp_path / "reference")
    old_model, tok = tiny_model(toy_dir, 1)
    new_model, _ = tiny_model(toy_dir, 2)
    common.save_model(new_model, tok, reference, "sft", results={"run": "new"})
    new = files(reference)
    shutil.rmtree(reference)
    common.save_model(old_model, tok, out, "sft", results={"run": "old"})
    old = files(out)
    if fallback:
        monkeypatch.setattr(common, "exchange", lambda a, b: False)
    owner, attr, when = final_save_faults()[step]
    inject(monkeypatch, owner, attr, when)
    with pytest.raises(Crash):
        common.save_model(new_model, tok, out, "sft", results={"run": "new"})
    monkeypatch.undo()
    if os.path.exists(out):
        assert files(out) in (old, new)
    else:
        assert fallback and step == "(two renames) move the new run in"
    common.recover_output(out)  # the next start
    assert sorted(os.listdir(tmp_path)) == ["out"] and files(out) in (old, new)
    common.save_model(new_model, tok, out, "sft", results={"run": "new"})
    assert sorted(os.listdir(tmp_path)) == ["out"] and files(out) == new


CHECKPOINT_FAULTS = {  # each filesystem step of common.save_checkpoint, in order
    "make the .tmp dir": (common.os, "makedirs", lambda p, *a: str(p).endswith(".tmp")),
    "write meta.json": (common, "write_json", lambda p, *a: str(p).endswith("meta.json")),
    "write the shards (DCP)": ("dcp", "save", lambda *a: True),
    "write rank0.pt": (common.torch, "save", lambda obj, path, *a: str(path).endswith("rank0.pt")),
    "rename .tmp to step_2": (common.os, "replace", lambda a, b: str(a).endswith(".tmp")),
    "delete step_1": (common.shutil, "rmtree", lambda p, *a: str(p).endswith("step_1")),
}


@pytest.mark.parametrize("step", list(CHECKPOINT_FAULTS))
def test_a_fault_at_each_step_of_a_checkpoint_save(step, tmp_path, monkeypatch):
    """The previous checkpoint stays the latest, and loads, until the new one is complete."""
    import torch
    import torch.distributed.checkpoint as dcp

    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    common.save_checkpoint(str(tmp_path), 1, model, optimizer, {"step": 1, "args": {}}, "sft")
    saved = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    owner, attr, when = CHECKPOINT_FAULTS[step]
    inject(monkeypatch, dcp if owner == "dcp" else owner, attr, when)
    with pytest.raises(Crash):
        common.save_checkpoint(str(tmp_path), 2, model, optimizer, {"step": 2, "args": {}}, "sft")
    monkeypatch.undo()
    latest = common.latest_checkpoint(str(tmp_path))
    state = common.load_checkpoint(latest, model, optimizer)
    if step == "delete step_1":  # the new one was committed; the next save deletes the old one
        assert latest == str(tmp_path / "step_2") and state["step"] == 2
    else:
        assert latest == str(tmp_path / "step_1") and state["step"] == 1 and torch.equal(model.weight, saved)
    common.save_checkpoint(str(tmp_path), 3, model, optimizer, {"step": 3, "args": {}}, "sft")
    assert common.checkpoints(str(tmp_path)) == [str(tmp_path / "step_3")]
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


# ----------------------------------------------------------------------------------------------
# Signals, concurrency, torchrun: real processes
# ----------------------------------------------------------------------------------------------
def long_sft(toy_dir, out) -> list[str]:
    return ["--model_name_or_path", os.path.join(toy_dir, "base_model"), "--dataset", os.path.join(toy_dir, "sft"),
            "--output_dir", out, "--run_name", out + "_tb", "--max_steps", "100000", "--batch_size", "32",
            "--num_eval_samples", "0", "--num_logged_samples", "0", "--checkpoint_every", "1", "--eval_every", "100000"]


def wait_for(predicate, proc, timeout=120):
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, f"ended ({proc.returncode}) too early:\n{proc.stderr.read()[-3000:]}"
        assert time.time() < deadline, "timed out"
        time.sleep(0.02)


def test_a_second_ctrl_c_stops_at_once(capsys):
    signals = common.catch_signals()
    try:
        def main(_):
            os.kill(os.getpid(), signal.SIGINT)  # the first: stop after this step
            assert signals["stop"] and signals["signal"] == signal.SIGINT
            os.kill(os.getpid(), signal.SIGINT)  # the second: at once
            time.sleep(5)
            raise AssertionError("not interrupted")
        with pytest.raises(SystemExit) as info:
            common.run(main, lambda: None)
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    assert info.value.code == 130
    err = capsys.readouterr().err
    assert "interrupted: stopped at once" in err and "Traceback" not in err


def test_ctrl_c_before_training_is_one_line(toy_dir, standin_rm, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(sft, "load_tokenizer", interrupted)
    assert run_stage(*Ctx(toy_dir, standin_rm, tmp_path).sft()) == 130
    assert "interrupted: stopped at once" in capsys.readouterr().err


def test_a_second_run_into_the_same_output_dir_is_refused(toy_dir, tmp_path):
    out = str(tmp_path / "out")
    first = launch("sft.py", long_sft(toy_dir, out))
    try:
        wait_for(lambda: os.path.exists(out + ".lock"), first)
        second = launch("sft.py", long_sft(toy_dir, out))
        _, err = second.communicate(timeout=120)
        assert second.returncode == 1 and "Traceback" not in err
        assert f"--output_dir '{out}' is in use by process {first.pid}" in err.strip().splitlines()[-1]
    finally:
        kill_tree(first.pid, signal.SIGKILL)
        first.wait()


def test_a_stale_lock_is_taken_over_with_a_note(toy_dir, standin_rm, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    c = Ctx(toy_dir, standin_rm, tmp_path)
    common.write_json(c.out + ".lock", {"pid": gone.pid, "host": socket.gethostname(), "command": "an old run"})
    module, argv = c.sft()
    module.main(module.parse_args(argv))
    assert f"took over '{c.out}.lock' from process {gone.pid}, which is gone" in capsys.readouterr().out
    assert os.path.exists(os.path.join(c.out, "eval_results.json"))


def test_a_lock_held_by_a_live_process_is_respected(toy_dir, standin_rm, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        c = Ctx(toy_dir, standin_rm, tmp_path)
        common.write_json(c.out + ".lock", {"pid": holder.pid, "host": socket.gethostname(), "command": "sft.py"})
        code = run_stage(*c.sft())
        assert f"is in use by process {holder.pid}" in code and "\n" not in code
        assert not os.path.exists(c.out)
    finally:
        holder.kill()
        holder.wait()


def is_worker(pid: int, out: str) -> bool:
    """A torchrun worker of this test's run (not torchrun itself)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read().decode(errors="replace").split("\0")
    except OSError:
        return False
    return "sft.py" in cmdline and out in cmdline and "torch.distributed.run" not in cmdline


def test_torchrun_a_rank_that_dies_stops_the_other_promptly(toy_dir, tmp_path):
    out = str(tmp_path / "out")
    proc = launch("sft.py", long_sft(toy_dir, out), nproc=2)
    try:
        wait_for(lambda: common.checkpoints(out + "_checkpoints"), proc, timeout=180)
        workers = [pid for pid in map(int, filter(str.isdigit, os.listdir("/proc"))) if is_worker(pid, out)]
        assert len(workers) == 2, workers
        t0 = time.time()
        os.kill(max(workers), signal.SIGKILL)  # one rank dies (say, the OOM killer)
        _, err = proc.communicate(timeout=60)
        took = time.time() - t0
    finally:
        kill_tree(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0 and took < 30, took
    ours = [line for line in err.splitlines() if "lost contact with rank" in line]
    assert ours and "the process that stopped first printed why above" in ours[0], err[-3000:]
