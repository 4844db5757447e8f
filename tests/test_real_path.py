"""The real-model path, offline: every dataset preset on a hand-written fixture in its hub schema
(tests/fixtures/), through tiny random configs of the real architectures (GPT-NeoX/Pythia, Llama, Qwen2,
GPT-2), each with a byte-level BPE tokenizer that follows its family's special-token conventions.

Each case runs SFT -> RM -> PPO for one step each, then checks what breaks when a family is handled
carelessly: the pad token, the reward read at the last real token under left padding, the score head,
and generation stopping at EOS or at the chat template's end-of-turn token.
"""

import glob
import json
import os

import pytest
import torch

from conftest import ROOT, one_thread

import common
import ppo
import sft
import train_rm

FIXTURES = os.path.join(ROOT, "tests", "fixtures")
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
# family -> (special tokens, pad token or None, EOS, BOS added in front, chat template)
FAMILIES = {
    "gpt_neox": (["<|endoftext|>"], None, "<|endoftext|>", None, None),  # Pythia: no pad token
    "llama": (["<unk>", "<s>", "</s>"], None, "</s>", "<s>", None),  # no pad; BOS in front of every text
    "qwen2": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], "<|endoftext|>", "<|endoftext|>", None,
              CHATML),  # pads with EOS
    "gpt2": (["<|endoftext|>"], None, "<|endoftext|>", None, None),
}


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


def corpus() -> list[str]:
    texts = []
    for path in sorted(glob.glob(os.path.join(FIXTURES, "*", "*.jsonl"))):
        with open(path) as f:
            for line in f:
                texts += [v if isinstance(v, str) else json.dumps(v) for v in json.loads(line).values()]
    return texts


def tiny_model_dir(family: str, path: str) -> str:
    """A random 2-layer model of `family` and its tokenizer, saved as an HF dir (what a hub id would give)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import (GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig,
                              LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM)

    specials, pad, eos, bos, template = FAMILIES[family]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus(), trainers.BpeTrainer(vocab_size=600, special_tokens=specials,
                                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if bos is not None:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A",
                                                           special_tokens=[(bos, tok.token_to_id(bos))])
    kwargs = {"eos_token": eos, "bos_token": bos or eos}
    if pad is not None:
        kwargs["pad_token"] = pad
    if family == "llama":
        kwargs["unk_token"] = "<unk>"
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs)
    if template:
        tokenizer.chat_template = template
    tokenizer.save_pretrained(path)
    ids = {"vocab_size": tok.get_vocab_size(), "eos_token_id": tok.token_to_id(eos),
           "bos_token_id": tok.token_to_id(bos or eos)}
    if family == "gpt_neox":
        model = GPTNeoXForCausalLM(GPTNeoXConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                 intermediate_size=64, max_position_embeddings=2048, **ids))
    elif family == "llama":
        model = LlamaForCausalLM(LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                             num_key_value_heads=1, intermediate_size=64, max_position_embeddings=2048,
                                             **ids))
    elif family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                             num_key_value_heads=1, intermediate_size=64, max_position_embeddings=2048,
                                             pad_token_id=tok.token_to_id(pad), **ids))
    else:
        model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=2048, **ids))
    model.save_pretrained(path)
    return path


# (preset, family): every preset, and every architecture, once
CASES = [("pythia-tldr", "gpt_neox"), ("hh-rlhf", "llama"), ("ultrafeedback", "qwen2"), ("pythia-tldr", "gpt2")]
DATA = {  # preset -> (SFT data, preference data, prompt data)
    "pythia-tldr": ("tldr_sft", "tldr_prefs", "tldr_sft"),
    "hh-rlhf": ("hh_rlhf", "hh_rlhf", "hh_rlhf"),
    "ultrafeedback": ("ultrafeedback", "ultrafeedback", "ultrafeedback"),
}


def run_chain(tmp_path, base: str, preset: str, sft_flags: list[str], rm_flags: list[str],
              ppo_flags: list[str]) -> dict:
    """SFT, RM and PPO for one step each, with `preset` and the data flags given; checks between stages."""
    # SFT: the preset's columns, formats and lengths; a tiny model and batch, one step
    sft_out = str(tmp_path / "sft")
    args = sft.parse_args([preset, "--model_name_or_path", base, "--output_dir", sft_out, *sft_flags,
                           "--add_pad_token", "--batch_size", "4", "--gradient_accumulation_steps", "1",
                           "--max_steps", "1", "--eval_batch_size", "4", "--num_eval_samples", "2",
                           "--num_logged_samples", "1", "--max_new_tokens", "8", "--checkpoint_every", "0"])
    results = sft.main(args)
    assert results["steps"] == 1 and results["train_loss"] > 0
    tokenizer = sft.load_tokenizer(sft_out)
    assert tokenizer.pad_token_id != tokenizer.eos_token_id  # added where the family had none or padded with EOS
    from transformers import AutoModelForCausalLM

    policy = AutoModelForCausalLM.from_pretrained(sft_out)
    assert policy.config.pad_token_id == tokenizer.pad_token_id
    assert policy.get_input_embeddings().weight.shape[0] >= len(tokenizer)

    # RM: one step on the preference data, normalised on 4 SFT samples
    rm_out = str(tmp_path / "rm")
    rm_args = train_rm.parse_args([preset, "--model_name_or_path", sft_out, "--output_dir", rm_out, *rm_flags,
                                   "--batch_size", "4", "--micro_batch_size", "4", "--eval_batch_size", "4",
                                   "--num_train_pairs", "4", "--num_train_epochs", "1",
                                   "--num_normalisation_prompts", "4", "--generation_batch_size", "4",
                                   "--response_length", "8", "--checkpoint_every", "0"])
    rm_results = train_rm.main(rm_args)
    assert rm_results["steps"] == 1 and 0.0 <= rm_results["val_accuracy"] <= 1.0
    from common import load_reward_model

    rm = load_reward_model(rm_out, tokenizer).eval()
    assert isinstance(rm.score, torch.nn.Linear) and rm.score.out_features == 1  # the scalar head
    assert rm.config.reward_mean == pytest.approx(rm_results["reward_mean"])
    # the reward is read at the last real token: left padding changes nothing
    texts = ["a short one", "a much longer text than the other one, with more words in it"]
    enc = [tokenizer(t)["input_ids"] + [tokenizer.eos_token_id] for t in texts]
    queries, mask = ppo.left_pad(enc, tokenizer.pad_token_id, "cpu")
    with torch.no_grad():
        batched = train_rm.get_reward(rm, queries, mask)
        alone = torch.stack([train_rm.get_reward(rm, torch.tensor([e]), torch.ones(1, len(e), dtype=torch.long))[0]
                             for e in enc])
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)

    # PPO: one update of 4 episodes, with evaluation on 2 held-out prompts
    ppo_out = str(tmp_path / "ppo")
    ppo_args = ppo.parse_args([preset, "--sft_model", sft_out, "--reward_model", rm_out, "--output_dir", ppo_out,
                               *ppo_flags, "--total_episodes", "4", "--batch_size", "4",
                               "--micro_batch_size", "2", "--response_length", "8", "--eval_samples", "2",
                               "--eval_batch_size", "2", "--local_rollout_forward_batch_size", "4",
                               "--eval_every", "0", "--sample_every", "0", "--checkpoint_every", "0"])
    out = ppo.main(ppo_args)
    assert out["episodes"] == 4 and all(v == v for v in out["history"][0].values())  # no NaN
    assert 0 < out["ppo"]["response_length"] <= 8
    AutoModelForCausalLM.from_pretrained(ppo_out)
    return out


@pytest.mark.parametrize("preset, family", CASES)
def test_preset_runs_each_stage_on_its_fixture(preset, family, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # TensorBoard runs/ land here
    base = tiny_model_dir(family, str(tmp_path / "base"))
    sft_data, pref_data, prompt_data = (os.path.join(FIXTURES, d) for d in DATA[preset])
    rm_flags = ["--dataset", pref_data]
    if train_rm.parse_args([preset]).prompt_dataset is not None:  # TL;DR normalises on the SFT dataset's queries
        rm_flags += ["--prompt_dataset", sft_data]
    run_chain(tmp_path, base, preset, ["--dataset", sft_data], rm_flags, ["--dataset", prompt_data])


def test_trl_formats_work_by_name_with_column_flags(tmp_path, monkeypatch):
    """TRL's standard and conversational formats, under other column names, need flags and no code."""
    monkeypatch.chdir(tmp_path)
    base = tiny_model_dir("qwen2", str(tmp_path / "base"))
    rows = [json.loads(line) for line in open(os.path.join(FIXTURES, "ultrafeedback", "train_prefs.jsonl"))]
    for split, part in (("train", rows[:5]), ("test", rows[5:])):
        # conversational prompt/completion (SFT), prompt/chosen/rejected (RM) and prompt-only (PPO), renamed
        def write(d, rs, split=split):
            os.makedirs(tmp_path / d, exist_ok=True)
            open(tmp_path / d / f"{split}.jsonl", "w").write("".join(json.dumps(r) + "\n" for r in rs))

        write("sft", [{"question": r["chosen"][:1], "answer": r["chosen"][1:]} for r in part])
        write("prefs", [{"question": r["chosen"][:1], "good": r["chosen"][1:], "bad": r["rejected"][1:]} for r in part])
        write("prompts", [{"question": r["chosen"][:1]} for r in part])
    common = ["--eval_split", "test"]
    out = run_chain(tmp_path / "run", base, "toy",
                    ["--dataset", str(tmp_path / "sft"), "--prompt_column", "question", "--completion_column", "answer",
                     "--max_prompt_length", "64", *common, "--eval_fn", "None"],
                    ["--dataset", str(tmp_path / "prefs"), "--dataset_format", "conversational",
                     "--prompt_column", "question", "--chosen_column", "good", "--rejected_column", "bad", *common],
                    ["--dataset", str(tmp_path / "prompts"), "--prompt_column", "question", "--max_prompt_length", "64",
                     "--gold_reward_fn", "None", *common])
    assert out["num_eval_prompts"] == 2


def test_chat_prompts_stop_at_the_end_of_turn_token(tmp_path):
    """Conversational prompts are rendered with add_generation_prompt, and <|im_end|> ends a response."""
    base = tiny_model_dir("qwen2", str(tmp_path / "base"))
    from common import load_tokenizer

    tokenizer = load_tokenizer(base, "left", add_pad_token=True)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert ppo.end_of_turn_tokens(tokenizer) == [im_end]
    args = ppo.parse_args(["ultrafeedback"])
    assert ppo.stop_token_ids(args, tokenizer, chat=True) == [tokenizer.eos_token_id, im_end]
    assert ppo.stop_token_ids(args, tokenizer, chat=False) == [tokenizer.eos_token_id]
    prompt = common.render_chat_prompt([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "old"}],
                                       tokenizer)
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"  # the old reply is dropped
    assert common.render_chat_prompt("hi", tokenizer) == prompt  # a text prompt is one user turn
    responses = torch.tensor([[5, im_end, 7, 8], [5, 6, 7, 8]])
    out, mask, ended = ppo.truncate_after_eos(responses, [tokenizer.eos_token_id, im_end], tokenizer.pad_token_id)
    assert ended.tolist() == [True, False] and mask[0].tolist() == [True, True, False, False]
    # SFT and the RM end a chat completion at the same token, where PPO reads the reward: both render it with
    # common.render_conversation
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]
    _, completion = common.render_conversation(tokenizer, messages[:1], messages[1:])
    assert completion == "hello there<|im_end|>" and sft.end_of_turn_tokens(tokenizer) == [im_end]
