"""The offline toy task: determinism, the labeller's agreement rate, and the gold scorer by hand."""

import json
import math
import os
import random

import pytest

import toy_task
from toy_task import gold_score, gold_score_one, is_grammatical, parse_sentence


def test_build_is_deterministic(tmp_path):
    args = dict(n_sft=200, n_prefs=300, n_prompts=50, hidden_size=32, num_layers=1)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    toy_task.build(toy_task.Args(out_dir=a, **args))
    toy_task.build(toy_task.Args(out_dir=b, **args))
    for rel in ("sft/train.jsonl", "prefs/validation.jsonl", "prompts/train.jsonl", "prefs/bayes_ceiling.json"):
        assert open(os.path.join(a, rel)).read() == open(os.path.join(b, rel)).read(), rel
    with pytest.raises(SystemExit, match="exists"):  # nothing that exists is overwritten by accident
        toy_task.build(toy_task.Args(out_dir=a, **args))


def test_label_agreement_in_human_range(toy_dir):
    ceiling = json.load(open(os.path.join(toy_dir, "prefs", "bayes_ceiling.json")))
    assert 0.70 <= ceiling["bayes_accuracy"] <= 0.80
    assert 0.65 <= ceiling["realised_label_agreement"] <= 0.85  # sampled labels: n=200, so wider
    rows = [json.loads(line) for line in open(os.path.join(toy_dir, "prefs", "train.jsonl"))]
    agree = sum(r["chosen_gold"] > r["rejected_gold"] for r in rows) / len(rows)
    assert 0.70 <= agree <= 0.85, agree


def test_bayes_ceiling_is_exact_expectation():
    # sigmoid(|d|/T): d=0 -> 1/2 (a coin flip); d large -> 1
    assert toy_task.agreement([0.0], 1.0) == 0.5
    assert toy_task.agreement([1.0, -1.0], 1.0) == pytest.approx(1 / (1 + math.exp(-1)))
    t = toy_task.calibrate_temperature([0.5, -1.0, 2.0, 0.1], 0.73)
    assert toy_task.agreement([0.5, -1.0, 2.0, 0.1], t) == pytest.approx(0.73, abs=1e-6)


def test_ranking_pairs_follow_bradley_terry():
    # a Plackett-Luce ranking of k candidates orders any two of them as Bradley-Terry does on their own:
    # P(a above b) = sigmoid((gold_a - gold_b) / T), so each pair's Bayes ceiling is sigmoid(|delta| / T)
    rng, t = random.Random(0), 0.5
    group = {"gold": [0.6, 0.0, -0.3, 0.2]}
    n, above = 20000, {}
    for _ in range(n):
        for better, worse in toy_task.rank_pairs(rng, group, t):
            above[better, worse] = above.get((better, worse), 0) + 1
    for a, b in ((0, 1), (1, 2), (3, 2), (0, 3)):
        expected = 1 / (1 + math.exp(-(group["gold"][a] - group["gold"][b]) / t))
        assert above.get((a, b), 0) / n == pytest.approx(expected, abs=0.015), (a, b)
    assert all(len(toy_task.rank_pairs(rng, group, t)) == 6 for _ in range(5))  # k choose 2


def test_preference_pairs_come_in_ranked_groups(toy_dir):
    rows = [json.loads(line) for line in open(os.path.join(toy_dir, "prefs", "train.jsonl"))]
    k = toy_task.Args.completions_per_prompt
    for start in range(0, 60, k * (k - 1) // 2):  # consecutive rows: one prompt, its k completions, all pairs
        group = rows[start : start + k * (k - 1) // 2]
        assert len({r["prompt"] for r in group}) == 1
        assert len({r["chosen"] for r in group} | {r["rejected"] for r in group}) == k


def test_sft_data_is_grammatical_and_tokenizer_round_trips(toy_dir):
    from transformers import AutoTokenizer

    rows = [json.loads(line) for line in open(os.path.join(toy_dir, "sft", "train.jsonl"))]
    assert all(is_grammatical(r["prompt"], r["completion"]) for r in rows)
    tok = AutoTokenizer.from_pretrained(os.path.join(toy_dir, "base_model"))
    assert tok.pad_token_id != tok.eos_token_id
    for r in rows[:50]:
        text = r["prompt"] + " " + r["completion"]
        ids = tok(text).input_ids
        assert tok.unk_token_id not in ids
        assert tok.decode(ids) == text


def test_negation():
    good, not_good, not_bad = (gold_score_one("the plot was", c) for c in ("good .", "not good .", "not bad ."))
    assert good > not_bad > 0 > not_good
    assert parse_sentence("i did not like the plot".split()) < 0 < parse_sentence("i liked the plot".split())
    assert parse_sentence("i would not recommend it".split()) < 0


def test_intensifier_and_saturation():
    assert gold_score_one("the plot was", "very good .") > gold_score_one("the plot was", "good .")
    # tanh: each more praise adds less
    one = gold_score_one("", "the plot was great .")
    two = gold_score_one("", "the plot was great . i loved the music .")
    three = gold_score_one("", "the plot was great . i loved the music . the cast is superb .")
    assert 0 < two - one and three - two < two - one


def test_repetition_and_broken_text_are_penalised():
    clean = gold_score_one("the plot was", "good . i loved the music .")
    repeated = gold_score_one("the plot was", "good . i loved the music . i loved the music .")
    stutter = gold_score_one("the plot was", "good good .")
    swapped = gold_score_one("the plot was", "good . i the loved music .")
    reused = gold_score_one("", "the plot was good . the cast was good .")
    assert repeated < clean and stutter < 0 and swapped < clean - 0.9
    assert reused == pytest.approx(math.tanh(2 / 3) - 0.25)
    # a sentence the prompt already said is a repeat too
    assert (gold_score_one("the cast was good .", "the cast was good .")
            < gold_score_one("the cast was good .", "i liked the plot ."))


def test_missing_ending():
    assert gold_score_one("the plot was", "good") == -1.0
    assert gold_score_one("the plot was", "") == -1.0
    assert gold_score_one("the plot was", "good . i loved") == pytest.approx(math.tanh(1 / 3) - 1.0)
    assert not is_grammatical("the plot was", "good . i loved")


def test_gold_score_is_a_batch_function():
    assert gold_score(["the plot was", "i"], ["good .", "hated the film ."]) == [
        gold_score_one("the plot was", "good ."), gold_score_one("i", "hated the film .")]
