"""train_rm.py: the Bradley-Terry loss, the learning-rate schedule, the reward normalisation and the head's
initialisation, where the reward is read, the data formats, end-to-end runs (normalisation, FSDP2 on 2 processes),
and one-line errors on bad input. Everything runs on the tiny toy task of conftest."""

import contextlib
import json
import math
import os
import shutil

import datasets
import numpy as np
import pytest
import torch
from conftest import one_thread as one_torch_thread
from conftest import ROOT, run_script_expect_error

import common
import train_rm
from common import load_causal_lm, load_reward_model, load_tokenizer

# A tiny run: 512 easy pairs, 1 epoch of batch 32, 64 normalisation samples of 12 tokens.
TINY = ["--num_train_pairs", "None", "--num_train_epochs", "1", "--batch_size", "32", "--micro_batch_size", "16",
        "--learning_rate", "1e-3", "--eval_every", "1000", "--num_normalisation_prompts", "64",
        "--response_length", "12", "--generation_batch_size", "32"]


def write_jsonl(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


@pytest.fixture(autouse=True, scope="module")
def _one_thread_for_this_module():
    """In-process runs on one torch thread (conftest.one_thread)."""
    with one_torch_thread():
        yield


@contextlib.contextmanager
def one_omp_thread():
    """OMP_NUM_THREADS=1 for a subprocess: a 64-wide model gains nothing from 2 threads, and on a busy
    machine 2 spinning OpenMP threads per process make it several times slower (torchrun runs get the same)."""
    old = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        yield
    finally:
        if old is None:
            del os.environ["OMP_NUM_THREADS"]
        else:
            os.environ["OMP_NUM_THREADS"] = old


@pytest.fixture(scope="module")
def trained_rm(toy_dir, easy_prefs, tmp_path_factory):
    """One tiny end-to-end run on the easy set (the random base model stands in for the SFT model), in-process
    (train_rm.py's command line runs in test_torchrun_two_processes_matches_one)."""
    tmp = tmp_path_factory.mktemp("rm")
    out = str(tmp / "rm")
    cwd = os.getcwd()
    os.chdir(tmp)  # TensorBoard logs go to tmp/runs
    try:
        train_rm.main(train_rm.parse_args(["--model_name_or_path", os.path.join(toy_dir, "base_model"), "--dataset",
                                           easy_prefs, "--output_dir", out, "--run_name", "test_rm_e2e",
                                           "--normalize_std", *TINY]))
    finally:
        os.chdir(cwd)
    return out


@pytest.fixture(scope="module")
def tiny_rm(toy_dir):
    tokenizer = load_tokenizer(os.path.join(toy_dir, "base_model"))
    torch.manual_seed(0)
    return load_reward_model(os.path.join(toy_dir, "base_model"), tokenizer).eval(), tokenizer


# ----------------------------------------------------------------------------------------------
# The loss
# ----------------------------------------------------------------------------------------------
def test_bradley_terry_loss_hand_values():
    zero = torch.zeros(3)
    assert train_rm.bradley_terry_loss(zero, zero).item() == pytest.approx(math.log(2))
    two, nil = torch.tensor([2.0]), torch.tensor([0.0])
    assert train_rm.bradley_terry_loss(two, nil).item() == pytest.approx(math.log1p(math.exp(-2)))
    assert train_rm.bradley_terry_loss(nil, two).item() == pytest.approx(math.log1p(math.exp(2)))
    # the gradient raises the chosen reward and lowers the rejected one: dL/dr_c = -1/2, dL/dr_r = +1/2 at a tie
    r_chosen, r_rejected = torch.zeros(1, requires_grad=True), torch.zeros(1, requires_grad=True)
    train_rm.bradley_terry_loss(r_chosen, r_rejected).backward()
    assert r_chosen.grad.item() == pytest.approx(-0.5) and r_rejected.grad.item() == pytest.approx(0.5)
    # a margin m asks for r_c - r_r > m: a gap of exactly m costs log 2, and a margin raises the loss
    one, nil = torch.tensor([1.0]), torch.tensor([0.0])
    assert train_rm.bradley_terry_loss(one, nil, margin=torch.tensor([1.0])).item() == pytest.approx(math.log(2))
    assert train_rm.bradley_terry_loss(one, nil, margin=torch.tensor([0.5])) > train_rm.bradley_terry_loss(one, nil)


# ----------------------------------------------------------------------------------------------
# The learning-rate schedule, reward normalisation and the head's initialisation
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("schedule, middle", [("cosine", 0.5), ("linear", 0.5), ("constant", 1.0)])
def test_train_rm_learning_rate_at_hand_values(schedule, middle):
    """train_rm.learning_rate_at: linear warmup, then cosine / linear to 0 or constant, against hand values at
    the warmup's start and end, the middle of the decay and the end (lr 1e-3, 10 warmup steps, 110 in all)."""
    args = train_rm.Args(learning_rate=1e-3, warmup_steps=10, lr_schedule=schedule)
    f = lambda step: train_rm.learning_rate_at(step, 110, args)  # noqa: E731
    assert f(0) == pytest.approx(1e-4)  # warmup start
    assert f(9) == pytest.approx(1e-3)  # warmup end
    assert f(10) == pytest.approx(1e-3)  # decay start
    assert f(60) == pytest.approx(1e-3 * middle)
    assert f(85) == pytest.approx(1e-3 * {"cosine": 0.5 * (1 + math.cos(0.75 * math.pi)), "linear": 0.25,
                                           "constant": 1.0}[schedule])
    assert f(110) == pytest.approx(1e-3 if schedule == "constant" else 0.0, abs=1e-15)
    no_warmup = train_rm.Args(learning_rate=1e-3, warmup_steps=0, lr_schedule=schedule)
    assert train_rm.learning_rate_at(0, 110, no_warmup) == pytest.approx(1e-3)


@pytest.mark.parametrize("schedule, end", [("cosine", 0.0), ("linear", 0.0), ("constant", 1e-3)])
def test_train_rm_learning_rate_at_stays_at_the_end_past_total_steps(schedule, end):
    """train_rm.learning_rate_at past total_steps keeps the rate of total_steps, as sft.cosine_with_warmup does:
    0 for cosine and linear decay (progress capped at 1). Uncapped, cosine rose again and linear went negative."""
    args = train_rm.Args(learning_rate=1e-3, warmup_steps=10, lr_schedule=schedule)
    for step in (110, 111, 160, 210, 1000):
        assert train_rm.learning_rate_at(step, 110, args) == pytest.approx(end, abs=1e-15)


def test_reward_normalisation_against_numpy():
    """train_rm.reward_normalisation from sums against numpy on known samples: the mean is np.mean, the std is
    Bessel-corrected (n - 1, np.std(ddof=1)), and the third value, the raw std, is that std whatever
    normalize_std (reward_std is then 1) and without the 1e-8 floor."""
    r = np.array([1.0, 2.0, 3.0, 4.0, 10.0])  # mean 4; sum of squared deviations 50: std sqrt(12.5), not sqrt(10)
    sums = (r.sum(), (r**2).sum(), float(len(r)))
    mean, std, raw_std = train_rm.reward_normalisation(*sums, normalize_std=True)
    assert mean == pytest.approx(np.mean(r)) == pytest.approx(4.0)
    assert std == pytest.approx(np.std(r, ddof=1)) == pytest.approx(math.sqrt(12.5))
    assert raw_std == pytest.approx(np.std(r, ddof=1))
    mean, std, raw_std = train_rm.reward_normalisation(*sums, normalize_std=False)
    assert (mean, std) == (pytest.approx(4.0), 1.0)
    assert raw_std == pytest.approx(np.std(r, ddof=1))
    # random samples at an offset, where E[r^2] - E[r]^2 cancels more
    r = np.random.default_rng(0).normal(3.0, 0.5, size=1000)
    mean, std, raw_std = train_rm.reward_normalisation(r.sum(), (r**2).sum(), float(len(r)), True)
    assert mean == pytest.approx(np.mean(r), rel=1e-12)
    assert std == raw_std == pytest.approx(np.std(r, ddof=1), rel=1e-9)
    # equal rewards: the raw std is 0, and reward_std floors at 1e-8 rather than dividing by 0
    mean, std, raw_std = train_rm.reward_normalisation(6.0, 12.0, 3.0, True)
    assert (mean, raw_std) == (pytest.approx(2.0), pytest.approx(0.0, abs=1e-7))
    assert 0 < std <= 1e-7 + 1e-8


def test_rm_head_init_std(toy_dir, tmp_path, monkeypatch):
    """train_rm.main initialises the fresh (1, d_model) scalar head with std 1/sqrt(d_model + 1) (Ziegler et al.
    2019): torch.nn.init.normal_ records its calls during a 1-step run on the toy task (base model 64 wide)."""
    calls = []
    normal_ = torch.nn.init.normal_

    def recording_normal_(tensor, mean=0.0, std=1.0, *args, **kwargs):
        calls.append((tuple(tensor.shape), std))
        return normal_(tensor, mean, std, *args, **kwargs)

    monkeypatch.setattr(torch.nn.init, "normal_", recording_normal_)
    monkeypatch.chdir(tmp_path)
    args = train_rm.parse_args(["--model_name_or_path", os.path.join(toy_dir, "base_model"),
                                "--dataset", os.path.join(toy_dir, "prefs"), "--output_dir", str(tmp_path / "rm"),
                                "--run_name", "test_math_rm_init", "--num_train_pairs", "64", "--batch_size", "64",
                                "--num_eval_pairs", "64", "--no_normalize", "--checkpoint_every", "0"])
    train_rm.main(args)
    head_calls = [std for shape, std in calls if shape == (1, 64)]
    assert any(std == pytest.approx(1 / math.sqrt(64 + 1), rel=1e-12) for std in head_calls), calls


# ----------------------------------------------------------------------------------------------
# Where the reward is read
# ----------------------------------------------------------------------------------------------
def encode(tokenizer, texts):
    return [tokenizer(t)["input_ids"] + [tokenizer.eos_token_id] for t in texts]


TEXTS = ["overall i found it sharp .", "i would recommend it", "the plot was good . it is worth watching ."]


def test_left_and_right_padding_give_the_same_reward(tiny_rm):
    model, tokenizer = tiny_rm
    seqs = encode(tokenizer, TEXTS)
    with torch.no_grad():
        alone = torch.cat([train_rm.get_reward(model, *train_rm.right_pad([s], tokenizer.pad_token_id)) for s in seqs])
        right = train_rm.get_reward(model, *train_rm.right_pad(seqs, tokenizer.pad_token_id))
        left = train_rm.get_reward(model, *train_rm.left_pad(seqs, tokenizer.pad_token_id))
        # PPO's layout: left-padded prompt, then a response with padding after its EOS
        both, _ = train_rm.left_pad([s + [tokenizer.pad_token_id] * k for k, s in enumerate(seqs)],
                                    tokenizer.pad_token_id)
        ppo = train_rm.get_reward(model, both, (both != tokenizer.pad_token_id).long())
    assert alone.std() > 1e-4  # the texts really score differently
    torch.testing.assert_close(right, alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(left, alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(ppo, alone, atol=1e-5, rtol=0)


def test_concatenated_forward_equals_two_forwards(tiny_rm):
    model, tokenizer = tiny_rm
    pairs = {"chosen_ids": encode(tokenizer, TEXTS),
             "rejected_ids": encode(tokenizer, ["it is a comedy about love .", "i", "stars ."]), "margin": None}
    with torch.no_grad():
        input_ids, attention_mask, index, _ = train_rm.pair_batch(pairs, [0, 1, 2], tokenizer.pad_token_id, "cpu")
        assert input_ids.shape[0] == 6 and index.tolist() == [0, 1, 2, 3, 4, 5]  # (2B, T): chosen then rejected
        together = train_rm.get_reward(model, input_ids, attention_mask)[index]
        chosen = train_rm.get_reward(model, *train_rm.right_pad(pairs["chosen_ids"], tokenizer.pad_token_id))
        rejected = train_rm.get_reward(model, *train_rm.right_pad(pairs["rejected_ids"], tokenizer.pad_token_id))
    torch.testing.assert_close(together, torch.cat([chosen, rejected]), atol=1e-5, rtol=0)


def test_pairs_sharing_completions_score_each_once(tiny_rm):
    # the k choose 2 pairs of k = 3 ranked completions (A > B > C): 6 sides, 3 distinct sequences
    model, tokenizer = tiny_rm
    a, b, c = encode(tokenizer, TEXTS)
    pairs = {"chosen_ids": [a, a, b], "rejected_ids": [b, c, c], "margin": None}
    with torch.no_grad():
        input_ids, attention_mask, index, _ = train_rm.pair_batch(pairs, [0, 1, 2], tokenizer.pad_token_id, "cpu")
        assert input_ids.shape[0] == 3
        rewards = train_rm.get_reward(model, input_ids, attention_mask)[index]
        each = train_rm.get_reward(model, *train_rm.right_pad([a, a, b, b, c, c], tokenizer.pad_token_id))
    torch.testing.assert_close(rewards, each, atol=1e-5, rtol=0)


def test_truncate_after_eos():
    eos, pad = 1, 0
    responses = torch.tensor([[5, 6, 1, 7, 1], [5, 5, 5, 5, 5], [1, 8, 8, 8, 8]])
    expected = torch.tensor([[5, 6, 1, 0, 0], [5, 5, 5, 5, 5], [1, 0, 0, 0, 0]])
    truncated, response_mask, has_eos = train_rm.truncate_after_eos(responses, eos, pad)
    assert torch.equal(truncated, expected)
    assert torch.equal(response_mask, torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]).bool())
    assert has_eos.tolist() == [True, False, True]


# ----------------------------------------------------------------------------------------------
# Dataset formats
# ----------------------------------------------------------------------------------------------
def test_split_implicit_prompt_pair_on_hh_examples():
    single = ("\n\nHuman: What is a good movie?\n\nAssistant:", " Try a comedy.", " I don't know.")
    assert common.split_implicit_prompt_pair(single[0] + single[1], single[0] + single[2]) == single
    # several turns: the prompt runs up to the *last* shared assistant turn
    history = ("\n\nHuman: Hi\n\nAssistant: Hello! How can I help?\n\nHuman: Recommend a film."
               "\n\nAssistant:")
    chosen, rejected = " I liked Alien.", " I liked nothing."  # the completions share " I liked "
    assert common.split_implicit_prompt_pair(history + chosen, history + rejected) == (history, chosen, rejected)
    # a completion that is a prefix of the other
    assert (common.split_implicit_prompt_pair(history + " Yes.", history + " Yes. Alien.")
            == (history, " Yes.", " Yes. Alien."))
    # no shared assistant turn: no prompt to find
    with pytest.raises(ValueError):
        common.split_implicit_prompt_pair("\n\nHuman: a\n\nAssistant: b", "\n\nHuman: c\n\nAssistant: b")


def make_args(toy_dir, **kw):
    return train_rm.Args(model_name_or_path=os.path.join(toy_dir, "base_model"), **kw)


def test_implicit_prompt_and_conversational_formats(toy_dir):
    tokenizer = load_tokenizer(os.path.join(toy_dir, "base_model"))
    eos = tokenizer.eos_token_id
    ids = lambda text: tokenizer(text)["input_ids"]  # noqa: E731

    # implicit prompt, with toy words as the dialogue (the marker is configurable)
    hh = datasets.DatasetDict({"train": datasets.Dataset.from_list([
        {"chosen": "i watched it <assistant> it is good .", "rejected": "i watched it <assistant> it is bad ."},
        {"chosen": "no marker here", "rejected": "another text"},  # no shared prompt: dropped
    ])})
    args = make_args(toy_dir, dataset_format="implicit_prompt", implicit_prompt_marker="<assistant>",
                     max_dropped_fraction=0.5)
    out = common.load_preference_split(args, hh, "train", tokenizer, None)
    assert out["prompt"] == ["i watched it <assistant>"]
    assert out["chosen_ids"] == [ids("i watched it <assistant> it is good .") + [eos]]
    assert out["rejected_ids"] == [ids("i watched it <assistant> it is bad .") + [eos]]

    # conversational, both layouts: explicit prompt column, or whole conversations
    user = [{"role": "user", "content": "the plot was"}]
    good, bad = [{"role": "assistant", "content": "good ."}], [{"role": "assistant", "content": "bad ."}]
    for rows in ([{"prompt": user, "chosen": good, "rejected": bad}],
                 [{"chosen": user + good, "rejected": user + bad}]):
        conv = datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)})
        args = make_args(toy_dir, dataset_format="conversational")
        out = common.load_preference_split(args, conv, "train", tokenizer, None)
        assert out["prompt"] == ["<user> the plot was <assistant> "]
        assert out["chosen_ids"] == [ids("<user> the plot was <assistant> good .") + [eos]]
        assert out["rejected_ids"] == [ids("<user> the plot was <assistant> bad .") + [eos]]

    # standard: prompt + separator + completion + EOS, and a text already ending in EOS gets no second one
    std = datasets.DatasetDict({"train": datasets.Dataset.from_list([
        {"prompt": "the plot", "chosen": "was good . <eos>", "rejected": "was bad ."}])})
    out = common.load_preference_split(make_args(toy_dir), std, "train", tokenizer, None)
    assert out["chosen_ids"] == [ids("the plot was good .") + [eos]]
    assert out["rejected_ids"] == [ids("the plot was bad .") + [eos]]


def test_bootstrap_resamples_the_pairs_with_replacement(toy_dir):
    """--bootstrap (ensemble members that differ in data): as many pairs as before, each one of the original
    pairs, some repeated and some left out; the same draw for the same seed, another for another seed."""
    tokenizer = load_tokenizer(os.path.join(toy_dir, "base_model"))
    rows = [{"prompt": f"p{i}", "chosen": f"good {i} .", "rejected": f"bad {i} ."} for i in range(40)]
    data = datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)})
    plain = common.load_preference_split(make_args(toy_dir), data, "train", tokenizer, None)
    draws = [common.load_preference_split(make_args(toy_dir, seed=seed), data, "train", tokenizer, None,
                                          bootstrap=True)["prompt"] for seed in (1, 1, 2)]
    assert len(draws[0]) == 40 and set(draws[0]) < set(plain["prompt"])  # some left out ...
    assert len(set(draws[0])) < 40  # ... because some are drawn twice
    assert draws[0] == draws[1] and draws[0] != draws[2]


# ----------------------------------------------------------------------------------------------
# End to end, normalisation, FSDP2
# ----------------------------------------------------------------------------------------------
def test_end_to_end_easy_set_and_the_saved_rm_loads(trained_rm):
    from transformers import AutoModelForSequenceClassification

    results = json.load(open(os.path.join(trained_rm, "eval_results.json")))
    assert results["val_accuracy"] >= 0.75, results  # chance is 0.5
    model = AutoModelForSequenceClassification.from_pretrained(trained_rm)
    assert model.config.num_labels == 1 and model.config.pad_token_id is not None
    assert model.config.reward_mean == pytest.approx(results["reward_mean"])
    assert model.config.reward_std == pytest.approx(results["reward_std"])


def test_normalisation_gives_sft_samples_mean_zero(toy_dir, easy_prefs, trained_rm):
    """Re-sample the SFT policy on the training prompts (another seed), score with the saved RM and apply
    the stored statistics, as ppo.py does: mean ~0 and (with --normalize_std) std ~1."""
    from transformers import AutoModelForSequenceClassification

    sft = os.path.join(toy_dir, "base_model")
    tokenizer = load_tokenizer(trained_rm, padding_side="left")
    rm = AutoModelForSequenceClassification.from_pretrained(trained_rm).eval()
    policy = load_causal_lm(sft, tokenizer).eval()
    args = train_rm.parse_args(["--dataset", easy_prefs, *TINY])
    prompts = common.load_normalisation_prompts(args, datasets.load_dataset(easy_prefs)["train"]["prompt"])
    torch.manual_seed(1234)
    enc = tokenizer(prompts, padding=True, return_tensors="pt")
    responses = train_rm.sample_responses(policy, enc["input_ids"], enc["attention_mask"], args.response_length,
                                          args.temperature, tokenizer.eos_token_id, tokenizer.pad_token_id)
    query_responses = torch.cat([enc["input_ids"], responses], dim=1)
    with torch.no_grad():
        raw = train_rm.get_reward(rm, query_responses, (query_responses != tokenizer.pad_token_id).long())
    normalised = (raw - rm.config.reward_mean) / rm.config.reward_std
    assert rm.config.reward_std != 1.0
    assert abs(normalised.mean().item()) < 0.35, normalised  # 64 samples: standard error 1/8
    assert 0.7 < normalised.std().item() < 1.3


def two_process_runs(toy_dir, easy_prefs, tmp) -> list:
    """train_rm.py on 2 processes, the TINY run of trained_rm without --normalize_std, its output in tmp / "rm2"
    (conftest's two_process_runs launches it with the other stages' 2-process runs)."""
    return [(os.path.join(ROOT, "train_rm.py"), ["--model_name_or_path", os.path.join(toy_dir, "base_model"),
                                                 "--dataset", easy_prefs, "--output_dir", str(tmp / "rm2"),
                                                 "--run_name", str(tmp / "tb_rm"), *TINY])]


def test_torchrun_two_processes_matches_one(trained_rm, two_process_runs):
    out = str(two_process_runs["dir"] / "rm2")
    two = json.load(open(os.path.join(out, "eval_results.json")))
    one = json.load(open(os.path.join(trained_rm, "eval_results.json")))
    # the same global batches, sharded over 2 ranks: the same model up to float reduction order
    assert two["val_accuracy"] == pytest.approx(one["val_accuracy"], abs=0.03)
    assert two["val_loss"] == pytest.approx(one["val_loss"], abs=0.02)
    assert two["normalisation"]["num_samples"] == 64  # global statistics, not one rank's
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["reward_std"] == 1.0 and config["reward_mean"] == pytest.approx(two["reward_mean"])


# ----------------------------------------------------------------------------------------------
# Bad input: one clear line, nothing saved
# ----------------------------------------------------------------------------------------------
def run_main_expect_exit(toy_dir, *argv) -> str:
    args = train_rm.parse_args(["--model_name_or_path", os.path.join(toy_dir, "base_model"), *argv])
    with pytest.raises(SystemExit) as info:
        train_rm.main(args)
    message = str(info.value.code)
    assert "\n" not in message
    return message


def test_evaluation_changes_no_training_number(toy_dir, easy_prefs, tmp_path, monkeypatch):
    """Validation is a deterministic forward: evaluating every step or only at the end gives the same RM."""
    monkeypatch.chdir(tmp_path)
    runs = []
    with one_omp_thread():
        for every in ("1", "0"):
            args = train_rm.parse_args(["--model_name_or_path", os.path.join(toy_dir, "base_model"),
                                        "--dataset", easy_prefs, "--output_dir", str(tmp_path / every), *TINY,
                                        "--eval_every", every])
            runs.append(train_rm.main(args))
    assert len(runs[0]["val_accuracy_history"]) == runs[0]["steps"] and len(runs[1]["val_accuracy_history"]) == 1
    for key in ("val_accuracy", "val_loss", "reward_mean"):
        assert runs[0][key] == runs[1][key]
    a, b = (load_reward_model(str(tmp_path / e), load_tokenizer(str(tmp_path / e))) for e in ("1", "0"))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_missing_column(toy_dir, tmp_path):
    with one_omp_thread():
        line = run_script_expect_error("train_rm.py", "--model_name_or_path", os.path.join(toy_dir, "base_model"),
                                       "--dataset", os.path.join(toy_dir, "prefs"), "--chosen_column", "preferred",
                                       "--output_dir", str(tmp_path / "rm"))
    assert "no column 'preferred'" in line and "--chosen_column" in line, line
    assert not os.path.exists(tmp_path / "rm")


def test_chosen_equals_rejected_everywhere(toy_dir, tmp_path):
    rows = [json.loads(line) for line in open(os.path.join(toy_dir, "prefs", "train.jsonl"))][:50]
    write_jsonl(str(tmp_path / "same" / "train.jsonl"), [{**r, "rejected": r["chosen"]} for r in rows])
    message = run_main_expect_exit(toy_dir, "--dataset", str(tmp_path / "same"), "--eval_split", "None",
                                   "--output_dir", str(tmp_path / "rm"))
    assert "50 of 50 rows (100.0%) cannot be used (50 with chosen == rejected" in message


def test_tokenizer_mismatch_with_the_policy(toy_dir, tmp_path):
    other = str(tmp_path / "other_sft")
    shutil.copytree(os.path.join(toy_dir, "base_model"), other)
    tokenizer = load_tokenizer(other)
    tokenizer.add_tokens(["<extra>"])  # one more word: ids the RM has never seen
    tokenizer.save_pretrained(other)
    message = run_main_expect_exit(toy_dir, "--dataset", os.path.join(toy_dir, "prefs"),
                                   "--sft_model_for_normalisation", other, "--output_dir", str(tmp_path / "rm"))
    assert "tokenizer" in message and "differs" in message


def test_nan_loss_stops_and_keeps_the_old_output(toy_dir, tmp_path, monkeypatch):
    out = tmp_path / "rm"
    out.mkdir()
    common.write_marker(str(out), "rm")  # an earlier train_rm.py run's dir
    (out / "keep.txt").write_text("an earlier run")
    monkeypatch.setattr(train_rm, "bradley_terry_loss", lambda c, r, m=None: (c - r).mean() * float("nan"))
    message = run_main_expect_exit(toy_dir, "--dataset", os.path.join(toy_dir, "prefs"), "--num_train_pairs", "128",
                                   "--eval_split", "None", "--output_dir", str(out), "--run_name", "test_rm_nan")
    assert "loss is nan" in message
    assert sorted(os.listdir(out)) == ["keep.txt", common.MARKER]
