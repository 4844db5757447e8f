"""Copies between scripts are allowed, and kept honest: a function or class that two scripts define under the same
name has the same source text, so that `diff ppo.py grpo.py` shows only what the method changes and a fix made in
one copy cannot be forgotten in another. Each exception is listed here with its reason."""

import ast
import functools
import itertools
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ("ppo.py", "grpo.py", "train_rm.py", "sft.py", "common.py", "dpo.py")

# what each stage defines for itself under the shared names of the stage shape (Args ... main ... parse_args)
STAGE_SHAPE = {
    "Args": "each stage's own flags",
    "Setup": "each stage's own sizes, paths and data",
    "Progress": "what each stage's checkpoints carry",
    "Models": "each stage's own models",
    "main": "each stage's own method",
    "parse_args": "each stage's own presets (and ppo.py's moved flags)",
    "check_args": "each stage's own flags",
    "set_up": "each stage's own sizes and data",
    "build_models": "each stage's own models",
    "start_or_resume": "each stage's own state",
    "run_eval": "each stage's own evaluation",
    "save_or_stop": "each stage's own checkpoint state",
    "final_report": "each stage's own report",
}
# the method's delta: what grpo.py changes of ppo.py, by design
GRPO_DELTA = {
    "Args": "the critic's and GAE's flags out; the estimators', DAPO's and Dr. GRPO's in",
    "Models": "no critic, no value head",
    "Progress": "beta is fixed: no adaptive KL",
    "Rollout": "no values, no returns",
    "policy_forward": "no value head on the policy: logits only",
    "reference_logits": "policy_forward returns logits only",
    "evaluate": "policy_forward returns logits only",
    "train_forward": "no critic forward",
    "policy_loss": "DAPO's asymmetric clip and Dr. GRPO's aggregation, in place of PPO's dual clip",
    "micro_batch_backward": "L = L_CLIP (+ beta * KL): no value loss, no entropy bonus",
    "main": "k samples per prompt and a baseline made of them, in place of the critic and GAE",
    "check_args": "the estimators' flags in place of the critic's",
    "set_up": "the batch must hold whole groups of k samples",
    "build_models": "no critic",
    "start_or_resume": "no critic to compile, no critic warm-up to resume into",
    "parse_args": "grpo.py's own presets; no moved flags",
    "reward_fn_instead_of_rm": "no critic to start from the SFT model",
}
# the method's delta: what dpo.py changes of train_rm.py, by design (its batching it imports from train_rm.py)
DPO_DELTA = {
    **STAGE_SHAPE,
    "log_step": "TRL's DPO names (rewards/*, logps/*, loss) in place of the RM's train/*",
    "preference_accuracy": "the implicit reward beta log pi/pi_ref of the policy and its reference, not a scalar head",
}
EXCEPTIONS = {
    ("ppo.py", "grpo.py"): GRPO_DELTA,
    ("train_rm.py", "dpo.py"): DPO_DELTA,
    ("ppo.py", "dpo.py"): STAGE_SHAPE,
    ("grpo.py", "dpo.py"): STAGE_SHAPE,
    ("sft.py", "dpo.py"): STAGE_SHAPE,
    ("ppo.py", "train_rm.py"): STAGE_SHAPE,
    ("ppo.py", "sft.py"): STAGE_SHAPE,
    ("grpo.py", "train_rm.py"): STAGE_SHAPE,
    ("grpo.py", "sft.py"): STAGE_SHAPE,
    ("train_rm.py", "sft.py"): STAGE_SHAPE,
}


@functools.cache
def definitions(script: str) -> dict[str, str]:
    """The source text of every top-level function and class of a script, by name: the lines it spans, from its
    `def` or `class` line (decorators aside) to its last line. Read once per script (ast.get_source_segment gives
    the same text but splits the whole file again for every definition: seconds per script)."""
    path = os.path.join(ROOT, script)
    with open(path) as f:
        source = f.read()
    lines = source.splitlines(keepends=True)
    return {node.name: "".join(lines[node.lineno - 1 : node.end_lineno]) for node in ast.parse(source).body
            if isinstance(node, ast.FunctionDef | ast.ClassDef)}


@pytest.mark.parametrize("a, b", list(itertools.combinations(SCRIPTS, 2)), ids=lambda x: x)
def test_shared_names_have_the_same_text(a, b):
    """Every name both scripts define has one text in both, unless the pair's exceptions list it with a reason; and
    every listed exception does differ (a stale one would hide the next drift)."""
    first, second = definitions(a), definitions(b)
    exceptions = EXCEPTIONS.get((a, b), {})
    shared = set(first) & set(second)
    drifted = sorted(name for name in shared if first[name] != second[name] and name not in exceptions)
    assert not drifted, f"{a} and {b} define {drifted} with different texts: make the copies identical"
    stale = sorted(name for name in exceptions if name in shared and first[name] == second[name])
    assert not stale, f"{stale} are identical in {a} and {b} now: drop them from the exceptions"


def test_grpo_shares_the_rollout_with_ppo():
    """The parts of ppo.py that GRPO does not change are in grpo.py, word for word: the rollout, the reward, the KL."""
    ppo, grpo = definitions("ppo.py"), definitions("grpo.py")
    for name in ("generate", "truncate_after_eos", "reward_scores", "rm_scores", "kl_estimate", "kl_penalized_rewards",
                 "whiten", "logprobs_from_logits", "reference_logprobs", "ensemble_scores"):
        assert ppo[name] == grpo[name], name


def test_dpo_shares_the_rms_loss_and_loads_its_batching():
    """dpo.py is train_rm.py's Bradley-Terry loss on another reward: the loss, the schedule and the position ids are
    train_rm.py's text, and the batches are train_rm.py's own functions (the same batches by construction)."""
    import dpo
    import train_rm

    rm, ours = definitions("train_rm.py"), definitions("dpo.py")
    for name in ("bradley_terry_loss", "learning_rate_at", "position_ids_from", "all_reduce_sum"):
        assert rm[name] == ours[name], name
    for name in ("pair_batch", "pair_batches", "pairs_by_prompt", "shard", "clip_grad_norm_or_stop"):
        assert getattr(dpo, name) is getattr(train_rm, name), name
