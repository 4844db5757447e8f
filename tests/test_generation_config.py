"""Every sampling call samples from plain softmax(logits / T), the distribution ppo.policy_forward's logprobs
model, whatever the model's generation_config.json says.

transformers 5.x fills every field a generate() call leaves unset from model.generation_config, so a shipped
repetition_penalty (Qwen2.5-Instruct), top_k, min_new_tokens, ... would reshape PPO's rollouts while the ratio
and the KL assume plain sampling. The tiny model here ships every GenerationConfig field of transformers 5.23 that
adds a logits processor or warper, changes the decoding mode, stops generation or changes what generate()
returns. Each of the four sampling sites (PPO's rollouts and evaluation, SFT's sample check, the RM's
normalisation) is run through common.load_causal_lm, as the stages run it.
"""

import contextlib
import json
import os
import shutil

import pytest
import torch
from transformers import LogitsProcessor

from conftest import one_thread

import common
import ppo
import sft
import toy_task
import train_rm

# the sampling fields of Qwen2.5-0.5B-Instruct's generation_config.json
QWEN = {"do_sample": True, "repetition_penalty": 1.1, "temperature": 0.7, "top_p": 0.8, "top_k": 20}
# GenerationConfig field -> a value that is not neutral (transformers 5.23: GenerationMixin._get_logits_processor,
# GenerationConfig.get_generation_mode, _get_stopping_criteria, generate)
EVERY_FIELD = {
    # logits processors, whatever the decoding mode
    "guidance_scale": 1.5, "sequence_bias": [[[10], 5.0]], "repetition_penalty": 1.3,
    "no_repeat_ngram_size": 2, "encoder_repetition_penalty": 1.2, "encoder_no_repeat_ngram_size": 2,  # on the prompt
    "bad_words_ids": [[7], [8, 9]], "min_length": 30, "min_new_tokens": 5, "forced_bos_token_id": 3,
    "forced_eos_token_id": 2, "remove_invalid_values": True, "exponential_decay_length_penalty": [2, 1.5],
    "suppress_tokens": [4, 5], "begin_suppress_tokens": [6], "renormalize_logits": True,
    "watermarking_config": {"greenlist_ratio": 0.5, "bias": 3.0},
    # warpers, when sampling
    "temperature": 0.5, "top_k": 5, "top_p": 0.8, "min_p": 0.1, "top_h": 0.5, "typical_p": 0.9,
    "epsilon_cutoff": 3e-4, "eta_cutoff": 3e-4,
    # decoding mode: greedy, beams, contrastive, DoLa, constrained, group beams, assisted (prompt lookup, early
    # exit, multi-token prediction); token healing rewrites the prompt's last token
    "do_sample": False, "num_beams": 4, "num_return_sequences": 2, "length_penalty": 2.0, "early_stopping": True,
    "penalty_alpha": 0.6, "dola_layers": "high", "force_words_ids": [[5]], "prompt_lookup_num_tokens": 3,
    "num_beam_groups": 2, "assistant_early_exit": 1, "use_mtp": True, "token_healing": True,
    # stopping and output: max_new_tokens and EOS are the only stops; sequences come back as a tensor
    "max_new_tokens": 3, "max_length": 7, "max_time": 1e-6, "stop_strings": ["good"], "is_assistant": True,
    "return_dict_in_generate": True, "output_scores": True, "output_logits": True,
    # the forward itself
    "use_cache": False, "cache_implementation": "offloaded",
}
# a field that does not load alone, and what it ships with
COMPANIONS = {"num_return_sequences": {"do_sample": True}, "num_beam_groups": {"num_beams": 4}}
MAX_NEW_TOKENS = 8


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def plain_dir(tmp_path_factory):
    """A random 2-layer, 32-wide GPT-NeoX with the toy task's word-level tokenizer (distinct PAD and EOS)."""
    path = str(tmp_path_factory.mktemp("gen") / "plain")
    toy_task.save_base_model(path, hidden_size=32, num_layers=2, seed=0)
    return path


def shipping(plain_dir: str, path: str, fields: dict) -> str:
    """The plain model, saved with these fields added to its generation_config.json (as a hub model ships them)."""
    shutil.copytree(plain_dir, path)
    with open(os.path.join(path, "generation_config.json")) as f:
        config = json.load(f)
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump({**config, **fields}, f)
    return path


class ScoreRecorder(LogitsProcessor):
    """Appended after generate()'s own processors: it sees the scores generate() samples from (what output_scores
    returns), and leaves them as they are."""

    def __init__(self, scores: list):
        self.scores = scores

    def __call__(self, input_ids, scores):
        self.scores.append(scores.clone())
        return scores


@contextlib.contextmanager
def recorded(model):
    """Record each model.generate call: its inputs and output, and the decoding mode, logits processors, stopping
    criteria and scores generate() built from the merged config. The call itself runs as the site made it."""
    calls = []
    real_generate, real_processors = model.generate, model._get_logits_processor
    real_criteria = model._get_stopping_criteria

    def get_logits_processor(generation_config, **kwargs):
        processors = real_processors(generation_config=generation_config, **kwargs)
        calls[-1].update(mode=generation_config.get_generation_mode(),
                         processors=[type(p).__name__ for p in processors])
        processors.append(ScoreRecorder(calls[-1]["scores"]))
        return processors

    def get_stopping_criteria(**kwargs):
        criteria = real_criteria(**kwargs)
        calls[-1]["criteria"] = [type(c).__name__ for c in criteria]
        return criteria

    def generate(**kwargs):
        calls.append({"input_ids": kwargs["input_ids"], "attention_mask": kwargs["attention_mask"], "scores": []})
        calls[-1]["output"] = real_generate(**kwargs)
        return calls[-1]["output"]

    model.generate, model._get_logits_processor = generate, get_logits_processor
    model._get_stopping_criteria = get_stopping_criteria
    try:
        yield calls
    finally:
        del model.generate, model._get_logits_processor, model._get_stopping_criteria


# site -> its sampling temperature (0: greedy)
SITES = {"ppo rollout": 0.7, "ppo greedy evaluation": 0.0, "sft sample check": 0.7, "rm normalisation": 0.7}


def sample(site: str, model, tokenizer, prompt_ids: list[list[int]]) -> None:
    """Call the site's real sampling function, as its stage does."""
    stop = [tokenizer.eos_token_id]
    temperature = SITES[site]
    queries, query_mask = ppo.left_pad(prompt_ids, tokenizer.pad_token_id, "cpu")
    if site.startswith("ppo"):
        ppo.generate(model, queries, query_mask, ppo.generation_config(tokenizer, MAX_NEW_TOKENS, temperature, stop))
    elif site == "sft sample check":
        args = sft.Args(eval_batch_size=len(prompt_ids), temperature=temperature, max_new_tokens=MAX_NEW_TOKENS)
        sft.sample_completions(model, tokenizer, prompt_ids, args, "cpu", stop)
    else:
        train_rm.sample_responses(model, queries, query_mask, MAX_NEW_TOKENS, temperature, stop, tokenizer.pad_token_id)


def load(path: str):
    tokenizer = common.load_tokenizer(path, "left")
    prompts = ["the acting was good . the acting was", "i liked the plot", "that film is"]
    return common.load_causal_lm(path, tokenizer), tokenizer, [tokenizer(p)["input_ids"] for p in prompts]


@pytest.mark.parametrize("field", sorted(EVERY_FIELD))
def test_each_shipped_field_is_off(plain_dir, tmp_path, field):
    """Whatever one field the model ships, generate() builds at most the temperature warper, samples (or, at
    temperature 0, decodes greedily) one sequence per prompt, and stops at max_new_tokens or EOS only."""
    fields = {field: EVERY_FIELD[field], **COMPANIONS.get(field, {})}
    model, tokenizer, prompt_ids = load(shipping(plain_dir, str(tmp_path / "m"), fields))
    for site, temperature in SITES.items():
        torch.manual_seed(0)
        with recorded(model) as calls:
            sample(site, model, tokenizer, prompt_ids)
        call = calls[0]
        expected = ["TemperatureLogitsWarper"] if temperature not in (0.0, 1.0) else []
        assert (call["mode"], call["processors"]) == ("sample" if temperature else "greedy_search", expected), site
        assert sorted(call["criteria"]) == ["EosTokenCriteria", "MaxLengthCriteria"], site
        assert torch.is_tensor(call["output"]) and call["output"].shape[0] == len(prompt_ids), site


@pytest.mark.parametrize("site", sorted(SITES))
@pytest.mark.parametrize("shipped", ["qwen", "every_field"])
def test_sampled_logprobs_are_policy_forward_logprobs(plain_dir, tmp_path, shipped, site):
    """log_softmax of the scores generate() sampled from, at the sampled tokens, equals ppo.policy_forward's
    logprobs of those tokens (logits / T, log_softmax) up to each response's first EOS: what PPO trains on is what
    was sampled. (Greedy evaluation: the scores are the plain logits, T = 1.)"""
    fields = QWEN if shipped == "qwen" else EVERY_FIELD
    model, tokenizer, prompt_ids = load(shipping(plain_dir, str(tmp_path / "m"), fields))
    torch.manual_seed(0)
    with recorded(model) as calls:
        sample(site, model, tokenizer, prompt_ids)
    call = calls[0]
    context_length = call["input_ids"].shape[1]
    responses = call["output"][:, context_length:]  # (B, T)
    _, response_mask, _ = ppo.truncate_after_eos(responses, [tokenizer.eos_token_id], tokenizer.pad_token_id)
    sampled = torch.stack(call["scores"], 1).log_softmax(-1).gather(2, responses[..., None]).squeeze(2)  # (B, T)
    attention_mask = torch.cat([call["attention_mask"], torch.ones_like(responses)], 1)
    with torch.no_grad():
        logits, _ = ppo.policy_forward(model, call["output"], attention_mask, responses.shape[1], SITES[site] or 1.0)
    trained = logits.log_softmax(-1).gather(2, responses[..., None]).squeeze(2)
    torch.testing.assert_close(sampled[response_mask], trained[response_mask], atol=1e-5, rtol=0)


def test_saved_model_ships_token_ids_only(plain_dir, tmp_path):
    """A stage's saved model (SFT's, PPO's) carries none of the shipped sampling settings on: its
    generation_config.json holds the token ids only."""
    model, tokenizer, _ = load(shipping(plain_dir, str(tmp_path / "m"), EVERY_FIELD))
    common.save_model(model, tokenizer, str(tmp_path / "saved"), "sft")
    with open(tmp_path / "saved" / "generation_config.json") as f:
        saved = json.load(f)
    assert set(saved) <= {"bos_token_id", "eos_token_id", "pad_token_id", "transformers_version"}, saved
    assert (saved["eos_token_id"], saved["pad_token_id"]) == (tokenizer.eos_token_id, tokenizer.pad_token_id)
