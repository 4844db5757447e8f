"""The offline toy task: the "CartPole of RLHF".

A synthetic language of movie-review sentences with a simulated human labeller, in the spirit of
the sentiment-continuation task of Ziegler et al. 2019 ("Fine-Tuning Language Models from Human
Preferences"). The goal of the RLHF pipeline is to continue a review opening *positively*, in
fluent, non-repetitive sentences that end properly.

`python toy_task.py` writes, deterministically from `--seed`, into `--out_dir` (default toy_data/):

    sft/{train,validation}.jsonl       prompt, completion            -> sft.py
    prefs/{train,validation}.jsonl     prompt, chosen, rejected      -> train_rm.py
                                       (4 ranked completions a prompt: 6 pairs)
    prefs/bayes_ceiling.json           the best accuracy any RM can reach on the validation labels
    prompts/{train,validation}.jsonl   prompt                        -> ppo.py
    base_model/                        a word-level HF tokenizer + a tiny random GPT-NeoX (Pythia-style)

The stage scripts read these with `datasets.load_dataset(dir)` and `from_pretrained(dir)`, exactly as
they would read a hub dataset or `EleutherAI/pythia-1b-deduped`: there is no toy-only code path.

The gold reward is `toy_task:gold_score`, a plain `(prompts, completions) -> list[float]` that ppo.py
accepts as `--gold_reward_fn toy_task:gold_score`. Text is space-separated words ("the plot was good .")
so that decode(encode(text)) == text.
"""

from __future__ import annotations

import json
import math
import os
import random
from dataclasses import dataclass

# ----------------------------------------------------------------------------------------------
# The lexicon. Polarity is the sentiment a word carries; intensifiers scale it.
# ----------------------------------------------------------------------------------------------
NOUNS = (
    "movie film plot story acting cast script dialogue ending music soundtrack direction pacing "
    "cinematography humor villain hero lead performance writing editing visuals effects twist "
    "finale opening premise setting tone atmosphere camera sound lighting action romance drama "
    "comedy sequel score design"
).split()
POSITIVE = (
    "good great excellent wonderful brilliant amazing fantastic superb charming delightful moving "
    "beautiful clever funny gripping powerful memorable enjoyable witty lovely"
).split()
NEGATIVE = (
    "bad awful terrible boring dull weak poor messy bland silly stupid clumsy lazy tedious "
    "forgettable annoying painful shallow lifeless pointless"
).split()
NEUTRAL = (
    "long short loud quiet simple dark strange unusual familiar modern old different complex serious light"
).split()
ADJ_POLARITY = {**{w: 1.0 for w in POSITIVE}, **{w: -1.0 for w in NEGATIVE}, **{w: 0.0 for w in NEUTRAL}}
INTENSIFIERS = {
    "very": 1.5, "really": 1.5, "truly": 1.5, "extremely": 2.0, "incredibly": 2.0, "quite": 1.2,
    "so": 1.5, "rather": 1.1, "somewhat": 0.6, "slightly": 0.5, "fairly": 0.8,
}
# "i loved the plot" / "i did not love the plot"
VERBS = {  # past -> (base, polarity)
    "liked": ("like", 1.0), "loved": ("love", 2.0), "enjoyed": ("enjoy", 1.0), "adored": ("adore", 2.0),
    "admired": ("admire", 1.0), "appreciated": ("appreciate", 1.0), "hated": ("hate", -2.0),
    "disliked": ("dislike", -1.0), "despised": ("despise", -2.0), "resented": ("resent", -1.0),
}
VERB_BASE = {base: pol for base, pol in VERBS.values()}
AUDIENCES = [("anyone",), ("everyone",), ("my", "friends"), ("my", "family"), ("fans",), ("kids",), ("adults",)]
PLACES = [("at", "home"), ("in", "the", "cinema"), ("on", "a", "plane"), ("with", "my", "friends"),
          ("with", "my", "family"), ("on", "tv"), ("on", "my", "laptop"), ("at", "a", "festival")]
TIMES = [("yesterday",), ("last", "week"), ("last", "night"), ("on", "sunday"), ("on", "friday"),
         ("this", "morning"), ("twice",), ("again",)]
NAMES = (
    "anna ben carla david emma frank grace henry iris jack kate leo maria nick olga paul rosa sam "
    "tina victor wendy yuri zoe omar lena ivan nora hugo ella max alice bruno clara dmitri elena "
    "felix greta hans ines jonas karl lucia marco nina oscar petra quinn rita sofia tom ursula vera").split()
GENRES = "comedy drama thriller western musical romance horror mystery documentary cartoon fantasy adventure".split()
TOPICS = [("a", "family"), ("a", "detective"), ("two", "friends"), ("a", "small", "town"), ("a", "robot"),
          ("a", "war"), ("love",), ("a", "heist"), ("space",), ("a", "dog"), ("a", "teacher"), ("revenge",),
          ("a", "king"), ("the", "sea"), ("a", "band"), ("a", "school"), ("a", "ghost"), ("time", "travel")]
DETS = ["the", "this", "that"]
COPULAS = ["was", "is"]

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"
USER, ASSISTANT = "<user>", "<assistant>"  # role markers for the chat template


def vocabulary() -> list[str]:
    words = [PAD, EOS, UNK, USER, ASSISTANT, ".", "and", "but", "not", "i", "did", "it", "would",
             "recommend", "to", "worth", "watching", "overall", "found", "watched", "stars", "about", "a"]
    words += NOUNS + POSITIVE + NEGATIVE + NEUTRAL + list(INTENSIFIERS) + list(VERBS) + list(VERB_BASE)
    words += NAMES + GENRES + DETS + COPULAS
    for phrases in (AUDIENCES, PLACES, TIMES, TOPICS):
        words += [w for p in phrases for w in p]
    return list(dict.fromkeys(words))  # dedupe, keep order


# ----------------------------------------------------------------------------------------------
# The grammar as a parser. Each `_clause_*` function takes (tokens, i) and yields
# (end_index, polarity) for every way the clause can be read from position i.
# ----------------------------------------------------------------------------------------------
def _phrase(tokens, i, phrases):
    for p in phrases:
        if tuple(tokens[i : i + len(p)]) == p:
            yield i + len(p)


def _adjp(tokens, i):
    """ADJP := [INTENSIFIER] ADJ"""
    factor = 1.0
    if i < len(tokens) and tokens[i] in INTENSIFIERS:
        factor, i = INTENSIFIERS[tokens[i]], i + 1
    if i < len(tokens) and tokens[i] in ADJ_POLARITY:
        yield i + 1, factor * ADJ_POLARITY[tokens[i]]


def _not(tokens, i):
    """Negation flips the sign and weakens it: "not bad" is mildly positive, not "great"."""
    yield i, 1.0
    if i < len(tokens) and tokens[i] == "not":
        yield i + 1, -0.6


def _clause_aspect(tokens, i):
    """DET NOUN COPULA [not] ADJP [and ADJP]     "the plot was not very good and funny" """
    if i + 2 < len(tokens) and tokens[i] in DETS and tokens[i + 1] in NOUNS and tokens[i + 2] in COPULAS:
        for j, neg in _not(tokens, i + 3):
            for k, pol in _adjp(tokens, j):
                yield k, neg * pol
                if k < len(tokens) and tokens[k] == "and":
                    for m, pol2 in _adjp(tokens, k + 1):
                        yield m, neg * (pol + pol2)


def _clause_verb(tokens, i):
    """i [INTENSIFIER] VERB_PAST DET NOUN  |  i did not VERB_BASE DET NOUN"""
    if i >= len(tokens) or tokens[i] != "i":
        return
    j, factor, pol = i + 1, 1.0, None
    if tokens[j : j + 2] == ["did", "not"] and j + 2 < len(tokens) and tokens[j + 2] in VERB_BASE:
        j, pol = j + 3, -0.6 * VERB_BASE[tokens[j + 2]]
    else:
        if j < len(tokens) and tokens[j] in ("really", "truly"):
            factor, j = INTENSIFIERS[tokens[j]], j + 1
        if j < len(tokens) and tokens[j] in VERBS:
            j, pol = j + 1, factor * VERBS[tokens[j]][1]
    if pol is not None and j + 1 < len(tokens) and tokens[j] in DETS and tokens[j + 1] in NOUNS:
        yield j + 2, pol


def _clause_recommend(tokens, i):
    """i would [not] recommend it [to AUDIENCE]"""
    if tokens[i : i + 2] == ["i", "would"]:
        for j, neg in _not(tokens, i + 2):
            if tokens[j : j + 2] == ["recommend", "it"]:
                yield j + 2, neg * 1.5
                if j + 2 < len(tokens) and tokens[j + 2] == "to":
                    for k in _phrase(tokens, j + 3, AUDIENCES):
                        yield k, neg * 1.5


def _clause_worth(tokens, i):
    """it is [not] worth watching"""
    if tokens[i : i + 2] == ["it", "is"]:
        for j, neg in _not(tokens, i + 2):
            if tokens[j : j + 2] == ["worth", "watching"]:
                yield j + 2, neg * 1.0


def _clause_overall(tokens, i):
    """overall i found it ADJP"""
    if tokens[i : i + 4] == ["overall", "i", "found", "it"]:
        yield from _adjp(tokens, i + 4)


def _clause_neutral(tokens, i):
    """i watched it PLACE TIME | the film stars NAME and NAME | it is a GENRE about TOPIC"""
    if tokens[i : i + 3] == ["i", "watched", "it"]:
        for j in _phrase(tokens, i + 3, PLACES):
            for k in _phrase(tokens, j, TIMES):
                yield k, 0.0
    if tokens[i : i + 3] == ["the", "film", "stars"] and i + 5 < len(tokens):
        if tokens[i + 3] in NAMES and tokens[i + 4] == "and" and tokens[i + 5] in NAMES:
            yield i + 6, 0.0
    if tokens[i : i + 3] == ["it", "is", "a"] and i + 4 < len(tokens):
        if tokens[i + 3] in GENRES and tokens[i + 4] == "about":
            for j in _phrase(tokens, i + 5, TOPICS):
                yield j, 0.0


CLAUSES = (_clause_aspect, _clause_verb, _clause_recommend, _clause_worth, _clause_overall, _clause_neutral)


def _clause(tokens, i):
    for clause in CLAUSES:
        yield from clause(tokens, i)


def parse_sentence(words: list[str]) -> float | None:
    """Polarity of one sentence (without its final "."), or None if the grammar cannot read it.

    SENTENCE := CLAUSE | CLAUSE but CLAUSE
    """
    for j, pol in _clause(words, 0):
        if j == len(words):
            return pol
        if j < len(words) and words[j] == "but":
            for k, pol2 in _clause(words, j + 1):
                if k == len(words):
                    return pol + pol2
    return None


# ----------------------------------------------------------------------------------------------
# The gold scorer: the "true" human preference the labellers noisily report.
# ----------------------------------------------------------------------------------------------
SENTIMENT_SCALE = 3.0  # tanh(S / 3): diminishing returns, so piling on praise stops paying
BROKEN_PENALTY = 1.0  # per ungrammatical sentence
REPEAT_PENALTY = 0.5  # per sentence that repeats an earlier one word for word
REUSED_ADJ_PENALTY = 0.25  # per adjective used again in the same completion
NO_ENDING_PENALTY = 1.0  # the completion stops mid-sentence


def gold_score_one(prompt: str, completion: str) -> float:
    """gold = tanh(sentiment / 3) - fluency penalties - ending penalty.

    - sentiment: sum of sentence polarities, negation-aware ("not good" < 0 < "not bad");
    - fluency: -1 per sentence the grammar cannot parse, -0.5 per repeated sentence,
      -0.25 per reused adjective;
    - ending: -1 when the completion does not end with a finished sentence (".").
    Only sentences that contain completion words are graded; the prompt may end mid-sentence.
    """
    p_words, c_words = prompt.split(), completion.split()
    words = p_words + c_words
    n_prompt = len(p_words)
    ended = len(c_words) > 0 and c_words[-1] == "."
    score = 0.0 if ended else -NO_ENDING_PENALTY
    sentiment, seen, adjectives = 0.0, set(), []
    start = 0
    for i, w in enumerate(words + (["."] if not ended else [])):
        if w != ".":
            continue
        sentence, start, complete = words[start:i], i + 1, i < len(words)
        if i < n_prompt:  # entirely inside the prompt: not the policy's doing
            seen.add(tuple(sentence))
            continue
        if not complete:  # the unfinished tail: already penalised as a missing ending
            break
        polarity = parse_sentence(sentence)
        if polarity is None:
            score -= BROKEN_PENALTY
        else:
            sentiment += polarity
        if tuple(sentence) in seen:
            score -= REPEAT_PENALTY
        seen.add(tuple(sentence))
        start_in_completion = max(0, i - len(sentence) - n_prompt)
        adjectives += [w for w in words[n_prompt + start_in_completion : i] if w in ADJ_POLARITY]
    score -= REUSED_ADJ_PENALTY * (len(adjectives) - len(set(adjectives)))
    return score + math.tanh(sentiment / SENTIMENT_SCALE)


def gold_score(prompts: list[str], completions: list[str]) -> list[float]:
    """The gold reward of the toy task: `--gold_reward_fn toy_task:gold_score`."""
    return [gold_score_one(p, c) for p, c in zip(prompts, completions, strict=True)]


def is_grammatical(prompt: str, completion: str) -> bool:
    """True when every completion sentence parses and the completion ends with "."."""
    p_words, c_words = prompt.split(), completion.split()
    if not c_words or c_words[-1] != ".":
        return False
    words, n_prompt, start = p_words + c_words, len(p_words), 0
    for i, w in enumerate(words):
        if w == ".":
            if i >= n_prompt and parse_sentence(words[start:i]) is None:
                return False
            start = i + 1
    return True


# ----------------------------------------------------------------------------------------------
# The generator: fluent reviews of mixed sentiment, and the corruptions labellers see.
# ----------------------------------------------------------------------------------------------
def _adjp_words(rng: random.Random, sign: int) -> list[str]:
    pool = {1: POSITIVE, -1: NEGATIVE, 0: NEUTRAL}[sign]
    words = [rng.choice(pool)]
    if rng.random() < 0.35:
        words.insert(0, rng.choice(list(INTENSIFIERS)))
    return words


def _clause_words(rng: random.Random, sign: int) -> list[str]:
    """One clause whose polarity has sign `sign` (+1, -1, or 0 for neutral)."""
    if sign == 0:
        kind = rng.randrange(4)
        if kind == 0:
            return ["i", "watched", "it", *rng.choice(PLACES), *rng.choice(TIMES)]
        if kind == 1:
            a, b = rng.sample(NAMES, 2)
            return ["the", "film", "stars", a, "and", b]
        if kind == 2:
            return ["it", "is", "a", rng.choice(GENRES), "about", *rng.choice(TOPICS)]
        return [rng.choice(DETS), rng.choice(NOUNS), rng.choice(COPULAS), *_adjp_words(rng, 0)]
    negate = rng.random() < 0.25  # "not good" carries the opposite sign of "good"
    lex = -sign if negate else sign
    kind = rng.choices(range(5), weights=[6, 3, 1, 1, 1])[0]
    if kind == 0:
        words = [rng.choice(DETS), rng.choice(NOUNS), rng.choice(COPULAS)] + (["not"] if negate else [])
        words += _adjp_words(rng, lex)
        if rng.random() < 0.3:
            words += ["and", *_adjp_words(rng, lex)]
        return words
    if kind == 1:
        verb = rng.choice([v for v, (_, p) in VERBS.items() if (p > 0) == (lex > 0)])
        if negate:
            return ["i", "did", "not", VERBS[verb][0], rng.choice(DETS), rng.choice(NOUNS)]
        return ["i", *(["really"] if rng.random() < 0.3 else []), verb, rng.choice(DETS), rng.choice(NOUNS)]
    if kind == 2:
        words = ["i", "would"] + (["not"] if lex < 0 else []) + ["recommend", "it"]
        return words + (["to", *rng.choice(AUDIENCES)] if rng.random() < 0.5 else [])
    if kind == 3:
        return ["it", "is"] + (["not"] if lex < 0 else []) + ["worth", "watching"]
    return ["overall", "i", "found", "it", *_adjp_words(rng, sign)]


def _sentence(rng: random.Random, lean: tuple[int, int, int]) -> list[str]:
    """One sentence; `lean` weighs positive, negative and neutral sentences."""
    sign = rng.choices([1, -1, 0], weights=lean)[0]
    words = _clause_words(rng, sign)
    if sign != 0 and rng.random() < 0.15:  # "the plot was good but the acting was weak"
        words += ["but", *_clause_words(rng, rng.choice([1, -1]))]
    return words + ["."]


def _extend(rng: random.Random, completion: list[str], max_completion: int, lean: tuple[int, int, int]) -> list[str]:
    """Append 0-2 more whole sentences while they fit."""
    for _ in range(rng.choice([0, 1, 1, 2])):
        nxt = _sentence(rng, lean)
        if len(completion) + len(nxt) > max_completion:
            break
        completion = completion + nxt
    return completion


def make_review(rng: random.Random, max_prompt: int = 14, max_completion: int = 24) -> tuple[str, str]:
    """A review opening (0-1 sentences plus the start of the next) and its continuation.

    Each review leans one way, as real reviews do: its sentences share a sentiment more often than
    not. Across reviews the sentiment is mixed. The coherence is what lets a language model trained on
    these texts learn which words are positive from context alone.
    """
    w = rng.choice([1, 2, 3, 5, 6, 7])
    lean = (w, 8 - w, 2)
    while True:
        opening = _sentence(rng, lean) if rng.random() < 0.5 else []
        sentence = _sentence(rng, lean)
        cut = rng.randint(1, max(1, len(sentence) - 2))  # keep at least one word + "." to complete
        prompt, completion = opening + sentence[:cut], sentence[cut:]
        if len(prompt) <= max_prompt and len(completion) <= max_completion:
            return " ".join(prompt), " ".join(_extend(rng, completion, max_completion, lean))


def continue_prompt(rng: random.Random, prompt: str, lean: tuple[int, int, int], max_completion: int = 24) -> str:
    """Another fluent continuation of `prompt`: finish its open sentence, then 0-2 more.

    Samples sentences, splices the prompt's unfinished sentence over their first words and keeps
    the first splice the grammar accepts (words of one category are interchangeable).
    """
    words = prompt.split()
    partial = words[len(words) - words[::-1].index(".") :] if "." in words else words
    while True:
        s = _sentence(rng, lean)[:-1]
        if len(s) > len(partial) and parse_sentence(partial + s[len(partial) :]) is not None:
            rest = s[len(partial) :] + ["."]
            if len(rest) <= max_completion:
                return " ".join(_extend(rng, rest, max_completion, lean))


def corrupt(rng: random.Random, prompt: str, completion: str) -> str:
    """A flawed completion of the kinds small LMs produce: cut off, looping, or garbled."""
    words = completion.split()
    kind = rng.randrange(4)
    if kind == 0 and len(words) > 3:  # cut off mid-sentence: no proper ending
        return " ".join(words[: rng.randint(1, len(words) - 2)])
    if kind == 1 and words[-1] == ".":  # repeat the last sentence: a classic degenerate LM loop
        body = words[:-1]
        start = len(body) - body[::-1].index(".") if "." in body else 0
        return " ".join(words + words[start:])
    if kind == 2 and len(words) > 3:  # garbled: the words of the text shuffled, "." kept last
        body = [w for w in words if w != "."]
        rng.shuffle(body)
        return " ".join(body + ["."])
    # stutter: one word looped three times ("the the the plot")
    i = rng.randrange(len(words))
    return " ".join(words[: i + 1] + [words[i]] * 2 + words[i:])


def bt_prob(delta: float, temperature: float) -> float:
    """P(labeller prefers A over B) = sigmoid((gold_A - gold_B) / temperature)  (Bradley-Terry)."""
    return 1.0 / (1.0 + math.exp(-delta / temperature))


def agreement(deltas: list[float], temperature: float) -> float:
    """Expected fraction of labels that agree with the gold-preferred completion (ties count 1/2).

    This is also the Bayes-optimal accuracy: no reward model can beat predicting the gold choice.
    """
    return sum(bt_prob(abs(d), temperature) for d in deltas) / len(deltas)


def calibrate_temperature(deltas: list[float], target: float) -> float:
    """The labeller temperature at which agreement with gold equals `target` (bisection)."""
    lo, hi = 1e-3, 100.0
    for _ in range(100):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if agreement(deltas, mid) > target else (lo, mid)
    return math.sqrt(lo * hi)


# ----------------------------------------------------------------------------------------------
# Writers
# ----------------------------------------------------------------------------------------------
@dataclass
class Args:
    out_dir: str = "toy_data"
    """where to write the datasets and the base model"""
    seed: int = 0
    """everything written is a deterministic function of this seed"""
    n_sft: int = 10000
    """SFT training pairs (validation gets a tenth)"""
    n_prefs: int = 240000
    """preference training pairs (validation gets a tenth): 40,000 prompts x 6 pairs, enough for train_rm.py to
    reach 96% of the Bayes ceiling within its 2-minute budget (TL;DR has 92,832 training pairs, HH-RLHF 160,800)"""
    completions_per_prompt: int = 4
    """k completions ranked per prompt, giving k choose 2 pairs (InstructGPT: k = 4 to 9)"""
    n_prompts: int = 10000
    """PPO training prompts (validation gets 512)"""
    labeller_agreement: float = 0.78
    """how often the simulated labeller picks the gold-preferred completion (humans: 70-80%; InstructGPT ~73%)"""
    corrupt_prob: float = 0.35
    """chance that a completion shown to the labeller is corrupted (broken, repetitive, unfinished)"""
    hidden_size: int = 64
    """base model width (64: at the same RM accuracy per pair as 128, 2.6x the pairs per second)"""
    num_layers: int = 4
    """base model depth"""
    overwrite: bool = False
    """replace an existing out_dir"""


def _write_jsonl(path: str, rows: list[dict]) -> None:
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def make_preference_groups(rng: random.Random, n_pairs: int, k: int, corrupt_prob: float) -> list[dict]:
    """Prompts with k distinct candidate completions each, and their gold scores, until the groups hold
    n_pairs comparisons (k choose 2 per prompt). Labels are sampled later, once the temperature is known."""
    groups, pairs = [], 0
    while pairs < n_pairs:
        prompt = make_review(rng)[0]
        # Each candidate comes from a "policy" with its own sentiment lean, as comparisons in InstructGPT
        # came from different models: candidates differ in sentiment, not only in noise.
        cands = [continue_prompt(rng, prompt, lean=(w, 8 - w, 2)) for w in (rng.randint(1, 7) for _ in range(k))]
        cands = [corrupt(rng, prompt, c) if rng.random() < corrupt_prob else c for c in cands]
        if len(set(cands)) < k:
            continue
        groups.append({"prompt": prompt, "cands": cands, "gold": gold_score([prompt] * k, cands)})
        pairs += k * (k - 1) // 2
    return groups


def rank_pairs(rng: random.Random, group: dict, temperature: float) -> list[tuple[int, int]]:
    """The labeller ranks the k candidates; every (better, worse) pair of the ranking becomes a comparison.

    The ranking is a Plackett-Luce sample with scores gold / T (sort by gold / T + Gumbel noise). Any two
    candidates then come out in the order (a, b) with probability sigmoid((gold_a - gold_b) / T), the
    Bradley-Terry probability, whatever the others are: the Bayes ceiling of each pair is unchanged.
    """
    noisy = [g / temperature - math.log(-math.log(rng.random())) for g in group["gold"]]
    order = sorted(range(len(noisy)), key=lambda i: -noisy[i])
    return [(order[i], order[j]) for i in range(len(order)) for j in range(i + 1, len(order))]


def build(args: Args) -> None:
    # the stages' rules for an output dir (common.py): only a marked toy_data dir is replaced, atomically
    from common import (OutputLock, check_output_path, check_own_dir, recover_output, remove_own_dir, replace_dir,
                        write_marker)

    check_output_path(args.out_dir, "--out_dir", {})
    OutputLock(args.out_dir, "--out_dir")
    recover_output(args.out_dir)
    check_own_dir(args.out_dir, "--out_dir", "toy_task", "run")
    if os.path.exists(args.out_dir) and os.listdir(args.out_dir) and not args.overwrite:
        raise SystemExit(f"{args.out_dir} exists; pass --overwrite to rebuild it, or pick another --out_dir")
    tmp = args.out_dir.rstrip("/") + ".tmp"
    remove_own_dir(tmp)
    os.makedirs(tmp)
    write_marker(tmp, "toy_task")
    for sub in ("sft", "prefs", "prompts"):
        os.makedirs(os.path.join(tmp, sub))
    rng = random.Random(args.seed)

    # SFT: fluent continuations of mixed sentiment (EOS is appended by sft.py, not stored in text).
    for split, n in (("train", args.n_sft), ("validation", args.n_sft // 10)):
        rows = [dict(zip(("prompt", "completion"), make_review(rng))) for _ in range(n)]
        _write_jsonl(os.path.join(tmp, "sft", f"{split}.jsonl"), rows)

    # Preferences: the labeller ranks k completions per prompt; all k choose 2 pairs are kept, as in
    # InstructGPT (Ouyang et al. 2022, Sec. 3.5), with noisy Bradley-Terry labels (Christiano et al. 2017).
    k = args.completions_per_prompt
    groups = {s: make_preference_groups(rng, n, k, args.corrupt_prob)
              for s, n in (("train", args.n_prefs), ("validation", args.n_prefs // 10))}
    temperature = calibrate_temperature([g["gold"][a] - g["gold"][b] for g in groups["train"]
                                         for a in range(k) for b in range(a + 1, k)], args.labeller_agreement)
    for split, split_groups in groups.items():
        out, deltas, agree = [], [], 0.0
        for g in split_groups:
            for c, r in rank_pairs(rng, g, temperature):
                g_c, g_r = g["gold"][c], g["gold"][r]
                deltas.append(g_c - g_r)
                agree += 1.0 if g_c > g_r else 0.5 if g_c == g_r else 0.0  # ties count 1/2, as in agreement()
                out.append({"prompt": g["prompt"], "chosen": g["cands"][c], "rejected": g["cands"][r],
                            "chosen_gold": round(g_c, 4), "rejected_gold": round(g_r, 4)})
        _write_jsonl(os.path.join(tmp, "prefs", f"{split}.jsonl"), out)
        if split == "validation":
            ceiling = {
                "bayes_accuracy": agreement(deltas, temperature),
                "realised_label_agreement": agree / len(out),
                "labeller_temperature": temperature,
                "n_pairs": len(out),
                "note": "bayes_accuracy = mean over validation pairs of sigmoid(|gold_chosen - gold_rejected| / T): "
                "the expected accuracy of the best possible RM on these noisy labels.",
            }
            with open(os.path.join(tmp, "prefs", "bayes_ceiling.json"), "w") as f:
                json.dump(ceiling, f, indent=2)

    for split, n in (("train", args.n_prompts), ("validation", 512)):
        _write_jsonl(os.path.join(tmp, "prompts", f"{split}.jsonl"),
                     [{"prompt": make_review(rng)[0]} for _ in range(n)])

    save_base_model(os.path.join(tmp, "base_model"), args.hidden_size, args.num_layers, args.seed)
    replace_dir(tmp, args.out_dir)
    print(f"wrote {args.out_dir}: labeller temperature {temperature:.3f}, "
          f"Bayes-optimal validation accuracy {ceiling['bayes_accuracy']:.4f}")


CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}<user> {{ m['content'] }} "
    "{% else %}<assistant> {{ m['content'] }}{% if not loop.last %} {% endif %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<assistant> {% endif %}"
)


def save_base_model(path: str, hidden_size: int, num_layers: int, seed: int) -> None:
    """A word-level tokenizer (distinct PAD and EOS) and a tiny random Pythia-style GPT-NeoX."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, eos_token=EOS, unk_token=UNK, model_max_length=128
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(path)
    config = GPTNeoXConfig(
        vocab_size=len(vocab), hidden_size=hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=4, intermediate_size=4 * hidden_size, max_position_embeddings=128,
        rotary_pct=0.25, use_parallel_residual=True, tie_word_embeddings=False,
        pad_token_id=vocab[PAD], eos_token_id=vocab[EOS], bos_token_id=vocab[EOS],
    )
    torch.manual_seed(seed)
    GPTNeoXForCausalLM(config).save_pretrained(path)


if __name__ == "__main__":
    import tyro

    from common import run

    run(build, lambda: tyro.cli(Args))
