"""sft.py: the completion-only loss mask, the data checks, and tiny end-to-end runs
(one process, torchrun with 2 processes, the conversational format)."""

import json
import math
import os
import re

import pytest
import torch
from conftest import ROOT, run_script_expect_error

import common
import sft

PAD, EOS = 0, 1


@pytest.fixture(autouse=True)
def one_thread():
    """In-process runs on one thread: the test models are 64 wide, and on a shared 2-core machine two
    OpenMP threads that wait for each other run 10-30x slower (measured here), not 2x faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------------------
# The math, on hand-built examples
# ----------------------------------------------------------------------------------------------
def test_build_labels_masks_the_prompt():
    prompt, completion = [10, 11, 12], [20, 21, EOS]
    assert sft.build_labels(prompt, completion) == [-100, -100, -100, 20, 21, EOS]
    assert sft.build_labels(prompt, completion, train_on_prompt=True) == [10, 11, 12, 20, 21, EOS]


def test_collate_right_pads_and_never_targets_padding():
    batch = sft.collate([([10, 11], [20, EOS]), ([12], [EOS])], PAD, train_on_prompt=False)
    assert batch["input_ids"].tolist() == [[10, 11, 20, EOS], [12, EOS, PAD, PAD]]
    assert batch["labels"].tolist() == [[-100, -100, 20, EOS], [-100, EOS, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    # train_on_prompt: the prompt becomes a target too, the padding still not
    batch = sft.collate([([10, 11], [20, EOS]), ([12], [EOS])], PAD, train_on_prompt=True)
    assert batch["labels"].tolist() == [[10, 11, 20, EOS], [12, EOS, -100, -100]]


def test_sft_loss_is_the_nll_of_the_shifted_targets():
    torch.manual_seed(0)
    logits = torch.randn(1, 4, 30)  # (B, T, V)
    labels = torch.tensor([[-100, -100, 20, EOS]])  # prompt of 2 tokens, completion [20, EOS]
    nll, count = sft.sft_loss(logits, labels)
    logp = logits.log_softmax(-1)
    # position 1 predicts token 2 (= 20), position 2 predicts token 3 (= EOS); position 0 predicts a prompt token
    expected = -(logp[0, 1, 20] + logp[0, 2, EOS])
    assert count.item() == 2
    assert torch.allclose(nll, expected)


def test_cosine_with_warmup():
    f = sft.cosine_with_warmup
    assert [f(s, 4, 20) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4, 4, 20) == 1.0
    assert math.isclose(f(12, 4, 20), 0.5)
    assert math.isclose(f(20, 4, 20), 0.0, abs_tol=1e-12)
    assert f(0, 0, 10) == 1.0  # no warmup


def test_sft_cosine_with_warmup_hand_values():
    """sft.cosine_with_warmup: (s + 1) / warmup during warmup, then 0.5 * (1 + cos(pi * progress)), against
    hand values at the warmup's start and end, the middle of the decay and the end."""
    f = sft.cosine_with_warmup
    assert f(0, 10, 110) == pytest.approx(0.1)  # warmup start
    assert f(9, 10, 110) == pytest.approx(1.0)  # warmup end
    assert f(10, 10, 110) == pytest.approx(1.0)  # decay start: cos 0
    assert f(35, 10, 110) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))  # a quarter of the decay
    assert f(60, 10, 110) == pytest.approx(0.5)  # the middle
    assert f(110, 10, 110) == pytest.approx(0.0, abs=1e-12)  # the end
    assert f(200, 10, 110) == pytest.approx(0.0, abs=1e-12)  # past the end: stays 0


def test_group_by_length_keeps_every_index_and_groups_lengths():
    lengths = [(i * 7919) % 40 for i in range(1000)]
    order = torch.randperm(1000, generator=torch.Generator().manual_seed(0)).tolist()
    grouped = common.group_by_length(order, lengths, 10, torch.Generator().manual_seed(0), batches_per_group=20)
    assert sorted(grouped) == list(range(1000))
    spread = [max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in
              (grouped[j : j + 10] for j in range(0, 1000, 10))]
    assert sum(spread) / len(spread) < 5  # random batches of 10 out of 0..39 spread ~30


def test_rank_shard_gives_equal_disjoint_shares():
    items = list(range(11))
    shards = [sft.rank_shard(items, r, 2) for r in range(2)]
    assert shards == [[0, 2, 4, 6, 8], [1, 3, 5, 7, 9]]


# ----------------------------------------------------------------------------------------------
# Data: formats and bad input
# ----------------------------------------------------------------------------------------------
def write_jsonl(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def read_rows(toy_dir, split, n=None):
    with open(os.path.join(toy_dir, "sft", f"{split}.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return rows[:n]


def tiny_args(toy_dir, tmp_path, **overrides) -> sft.Args:
    """A run of a few seconds on the test-scale toy task."""
    kwargs = dict(
        model_name_or_path=os.path.join(toy_dir, "base_model"), dataset=os.path.join(toy_dir, "sft"),
        output_dir=str(tmp_path / "sft"), run_name="test_sft", max_steps=12, batch_size=32, warmup_steps=2,
        eval_every=12, num_eval_samples=16, num_logged_samples=2, max_new_tokens=16,
    )
    return sft.Args(**{**kwargs, **overrides})


def cli_flags(args: sft.Args, *names) -> list[str]:
    return [f"--{name}={getattr(args, name)}" for name in names]


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run in-process stages inside tmp_path, so their TensorBoard runs/ land there."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_missing_column(toy_dir, in_tmp):
    with pytest.raises(SystemExit, match=r"has no column 'text' \(it has: prompt, completion\); set --prompt_column"):
        sft.main(tiny_args(toy_dir, in_tmp, prompt_column="text"))
    assert not os.path.exists(in_tmp / "sft")


def test_empty_completion(toy_dir, in_tmp):
    rows = read_rows(toy_dir, "train", 50)
    rows[7]["completion"] = "  "
    write_jsonl(str(in_tmp / "data" / "train.jsonl"), rows)
    write_jsonl(str(in_tmp / "data" / "validation.jsonl"), read_rows(toy_dir, "validation", 20))
    with pytest.raises(SystemExit, match=r"split 'train': 1 of 50 rows \(2.0%\) cannot be used "
                                         r"\(1 with an empty completion; first: row 7\)"):
        sft.main(tiny_args(toy_dir, in_tmp, dataset=str(in_tmp / "data")))


def test_nonexistent_dataset_path_one_line_from_the_cli(toy_dir, tmp_path):
    line = run_script_expect_error("sft.py", "--model_name_or_path", os.path.join(toy_dir, "base_model"),
                                   "--dataset", str(tmp_path / "nope" / "sft"), "--output_dir", str(tmp_path / "out"))
    assert line == f"dataset path '{tmp_path / 'nope' / 'sft'}' does not exist"


def test_long_prompts_rejected_by_default_and_truncated_by_flag(toy_dir, in_tmp, capsys):
    with pytest.raises(SystemExit, match=r"prompts are longer than max_prompt_length=3 tokens \(longest: \d+\); "
                                         r"raise --max_prompt_length, or pass --truncate_long_prompts"):
        sft.main(tiny_args(toy_dir, in_tmp, max_prompt_length=3))
    assert not os.path.exists(in_tmp / "sft")

    tokenizer = sft.load_tokenizer(os.path.join(toy_dir, "base_model"))
    args = sft.Args(max_prompt_length=3, truncate_long_prompts=True)
    pairs = common.tokenize_pairs(["the plot was very", "i"], ["good .", "loved it ."], tokenizer, args, False, "test")
    assert "warning: test: 1 of 2 prompts are longer than max_prompt_length=3" in capsys.readouterr().out
    assert tokenizer.decode(pairs[0][0]) == "plot was very"  # left-truncated: the end of the prompt stays
    assert pairs[0][1] == tokenizer("good .")["input_ids"] + [tokenizer.eos_token_id]
    assert tokenizer.decode(pairs[1][0]) == "i"


def test_long_completions_are_cut_without_eos(toy_dir, capsys):
    tokenizer = sft.load_tokenizer(os.path.join(toy_dir, "base_model"))
    args = sft.Args(max_completion_length=3)
    pairs = common.tokenize_pairs(["i"], ["loved the plot ."], tokenizer, args, False, "test")
    assert tokenizer.decode(pairs[0][1]) == "loved the plot"  # EOS would claim the text was finished
    assert "1 of 1 completions are longer than max_completion_length=3" in capsys.readouterr().out


def test_nan_loss_stops_and_keeps_the_old_output(toy_dir, in_tmp):
    old = in_tmp / "sft"
    old.mkdir()
    common.write_marker(str(old), "sft")  # an earlier sft.py run, which --overwrite may replace
    (old / "marker").write_text("previous model")
    with pytest.raises(SystemExit) as info:
        # absurd rate: the weights blow up within a few steps
        sft.main(tiny_args(toy_dir, in_tmp, learning_rate=1e30, max_grad_norm=0.0, warmup_steps=0,
                            num_logged_samples=0, checkpoint_every=1, overwrite=True))
    message = str(info.value)
    match = re.fullmatch(r"the (training loss|gradient norm) is (nan|inf) at step (\d+): stopped before the optimizer "
                         r"step; last good checkpoint: (\S+)\. Lower --learning_rate or check the data", message)
    assert match, message
    step, kept = int(match.group(3)), match.group(4)
    assert kept == str(in_tmp / "sft_checkpoints" / f"step_{step - 1}") and os.path.isdir(kept)
    assert (old / "marker").read_text() == "previous model" and sorted(os.listdir(old)) == ["marker", common.MARKER]


# ----------------------------------------------------------------------------------------------
# End to end
# ----------------------------------------------------------------------------------------------
def check_saved_model_generates(output_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    model = AutoModelForCausalLM.from_pretrained(output_dir)
    prompt = tokenizer("the plot was", return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape[1] > prompt["input_ids"].shape[1]
    assert tokenizer.pad_token_id != tokenizer.eos_token_id


def test_sft_end_to_end_and_deterministic(toy_dir, in_tmp, capsys):
    args = tiny_args(toy_dir, in_tmp, max_steps=24, eval_every=24)
    metrics = sft.main(args)
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("sft done: val loss ")
    with open(os.path.join(args.output_dir, "eval_results.json")) as f:
        results = json.load(f)
    assert results == metrics
    assert results["val_loss"] < results["initial_val_loss"] - 1.0, results
    assert results["num_eval_samples"] == 16 and 0.0 <= results["eval_fn_and_eos"] <= results["eos_rate"]
    assert os.path.isdir(in_tmp / "runs" / "test_sft")  # TensorBoard
    check_saved_model_generates(args.output_dir)

    # determinism: the same seed twice gives the same numbers
    short = dict(max_steps=4, num_logged_samples=0, num_eval_samples=8)
    first = sft.main(tiny_args(toy_dir, in_tmp, output_dir=str(in_tmp / "a"), **short))
    second = sft.main(tiny_args(toy_dir, in_tmp, output_dir=str(in_tmp / "b"), **short))
    assert first["train_loss"] == second["train_loss"] and first["val_loss"] == second["val_loss"]
    assert first["eval_fn_and_eos"] == second["eval_fn_and_eos"]

    # --max_steps 0 only evaluates (e.g. a saved model)
    evaluated = sft.main(tiny_args(toy_dir, in_tmp, model_name_or_path=args.output_dir, output_dir=str(in_tmp / "c"),
                                   max_steps=0, num_logged_samples=0, num_eval_samples=8))
    assert evaluated["train_loss"] is None and math.isclose(evaluated["val_loss"], metrics["val_loss"], rel_tol=1e-5)


def two_process_runs(toy_dir, tmp) -> list:
    """sft.py on 2 processes with 2 micro-batches each, its output in tmp / "sft" (conftest's two_process_runs
    launches it with the other stages' 2-process runs)."""
    args = tiny_args(toy_dir, tmp, gradient_accumulation_steps=2)
    flags = cli_flags(args, "model_name_or_path", "dataset", "output_dir", "max_steps", "batch_size", "warmup_steps",
                      "eval_every", "num_eval_samples", "max_new_tokens", "gradient_accumulation_steps")
    return [(os.path.join(ROOT, "sft.py"), [*flags, f"--run_name={tmp / 'tb_sft'}"])]


def test_sft_torchrun_two_processes(toy_dir, in_tmp, two_process_runs):
    output_dir = str(two_process_runs["dir"] / "sft")
    with open(os.path.join(output_dir, "eval_results.json")) as f:
        results = json.load(f)
    assert results["world_size"] == 2 and results["num_eval_samples"] == 16
    assert results["val_loss"] < results["initial_val_loss"] - 0.5, results
    check_saved_model_generates(output_dir)

    # The same global batches, split 2 processes x 2 micro-batches instead of 1 x 1, give the same
    # gradients: the loss is a token mean over the whole optimizer batch, not a mean of means.
    single = sft.main(tiny_args(toy_dir, in_tmp, output_dir=str(in_tmp / "single"), num_logged_samples=0,
                                num_eval_samples=0))
    assert math.isclose(single["val_loss"], results["val_loss"], rel_tol=1e-4), (single, results)
    assert math.isclose(single["train_loss"], results["train_loss"], rel_tol=1e-4), (single, results)


def test_conversational_format_through_the_chat_template(toy_dir, in_tmp):
    for split, n in (("train", 400), ("validation", 40)):
        rows = [{"messages": [{"role": "user", "content": r["prompt"]},
                              {"role": "assistant", "content": r["completion"]}]}
                for r in read_rows(toy_dir, split, n)]
        write_jsonl(str(in_tmp / "chat" / f"{split}.jsonl"), rows)
    args = tiny_args(toy_dir, in_tmp, dataset=str(in_tmp / "chat"), max_prompt_length=20, eval_fn=None)

    tokenizer = sft.load_tokenizer(args.model_name_or_path)
    ds = common.load_sft_splits(args)["train"]
    prompts, completions, conversational = common.prompts_and_completions(ds, args, tokenizer, "chat")
    first = read_rows(toy_dir, "train", 1)[0]
    assert conversational
    assert prompts[0] == f"<user> {first['prompt']} <assistant> "  # ends with the generation prompt
    assert completions[0] == first["completion"]
    (prompt_ids, completion_ids), = common.tokenize_pairs(prompts[:1], completions[:1], tokenizer, args, True, "chat")
    labels = sft.build_labels(prompt_ids, completion_ids)
    assert tokenizer.convert_ids_to_tokens(prompt_ids)[-1] == "<assistant>"
    assert labels[: len(prompt_ids)] == [-100] * len(prompt_ids)  # the template and the user turn are not targets
    assert labels[len(prompt_ids):] == tokenizer(first["completion"])["input_ids"] + [tokenizer.eos_token_id]

    results = sft.main(args)
    assert results["val_loss"] < results["initial_val_loss"] - 0.5
    assert results["eval_fn_mean"] is None and 0.0 <= results["eos_rate"] <= 1.0

    bad = [{"messages": [{"role": "user", "content": "the plot"}]}]  # no assistant turn to learn
    write_jsonl(str(in_tmp / "bad" / "train.jsonl"), bad)
    write_jsonl(str(in_tmp / "bad" / "validation.jsonl"), bad)
    with pytest.raises(SystemExit, match="row 0: the last message must have role 'assistant'"):
        sft.main(tiny_args(toy_dir, in_tmp, dataset=str(in_tmp / "bad"), overwrite=True))


def test_presets_parse():
    assert sft.parse_args([]) == sft.Args()
    args = sft.parse_args(["pythia-tldr", "--learning_rate", "1e-5"])
    assert args.model_name_or_path == "EleutherAI/pythia-1b-deduped" and args.learning_rate == 1e-5
    assert args.train_on_prompt and args.eval_fn is None
    assert sft.parse_args(["--max_steps", "3"]).max_steps == 3
