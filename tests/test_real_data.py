"""Real data and real tokenizers: the hh-rlhf preset on real HH-RLHF rows with the real Pythia
tokenizer, the one policy for rows that cannot be used, prompts cut to length behind their BOS or chat
header (the RM's normalisation prompts too), and the RM's end token when PPO re-tokenises for it.

The real files come from ../shared/real (see its README); the tests that need them skip without it. Llama 3
and Qwen2.5 style chat tokenizers are built here, with their special tokens and templates.
"""

import json
import os

import pytest
import torch

from conftest import ROOT, one_thread

import common
import ppo
import sft
import train_rm
from test_real_path import tiny_model_dir

REAL = os.path.join(os.path.dirname(ROOT), "shared", "real")
needs_real = pytest.mark.skipif(not os.path.isdir(REAL), reason=f"{REAL} (real tokenizers and HH-RLHF rows) is absent")
# Qwen2.5's template, cut down: a default system turn when the conversation has none
QWEN_TEMPLATE = ("{% if messages[0]['role'] != 'system' %}"
                 "{{ '<|im_start|>system\\nYou are Qwen, a helpful assistant.<|im_end|>\\n' }}{% endif %}"
                 "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
                 "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
# Llama 3's: <|begin_of_text|> in front, <|eot_id|> after each turn
LLAMA3_TEMPLATE = ("{{ '<|begin_of_text|>' }}{% for m in messages %}"
                   "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n'"
                   " + m['content'] + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
                   "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


def chat_tokenizer(style: str):
    """A byte-level BPE tokenizer with Qwen2.5's or Llama 3's special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = {"qwen": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                "llama3": ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                           "<|eot_id|>", "<|finetune_right_pad_id|>"]}[style]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["the plot was good and the acting was bad", "a helpful assistant"] * 10,
                            trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if style == "llama3":  # Llama 3's tokenizer puts <|begin_of_text|> before every text
        tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                           special_tokens=[("<|begin_of_text|>",
                                                                            tok.token_to_id("<|begin_of_text|>"))])
        # the base model's EOS, which is not the chat template's end-of-turn token <|eot_id|>
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>",
                                            eos_token="<|end_of_text|>", pad_token="<|finetune_right_pad_id|>")
        tokenizer.chat_template = LLAMA3_TEMPLATE
    else:
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
        tokenizer.chat_template = QWEN_TEMPLATE
    return tokenizer


# ----------------------------------------------------------------------------------------------
# Rows that cannot be used: one policy in every stage
# ----------------------------------------------------------------------------------------------
def test_drop_unusable_counts_and_stops_above_the_fraction(capsys):
    reasons = [None] * 197 + ["with an empty completion"] * 2 + ["with an empty prompt"]
    assert common.drop_unusable(reasons, "split 'train'", 0.02) == list(range(197))
    assert "split 'train': dropped 3 of 200 rows that cannot be used (2 with an empty completion, " \
           "1 with an empty prompt; first: row 197)" in capsys.readouterr().out
    with pytest.raises(SystemExit,
                       match=r"3 of 200 rows \(1.5%\) cannot be used .* more than --max_dropped_fraction 0.01"):
        common.drop_unusable(reasons, "split 'train'", 0.01)
    assert common.drop_unusable([None, None], "x", 0.0) == [0, 1]


# ----------------------------------------------------------------------------------------------
# Truncation keeps the BOS and the chat header; the RM's normalisation prompts follow PPO's rule
# ----------------------------------------------------------------------------------------------
def test_a_cut_prompt_keeps_the_bos_and_the_chat_header(capsys):
    llama = chat_tokenizer("llama3")
    bos = llama.bos_token_id
    ids = llama(["the plot was good and the acting was bad " * 3, "good"])["input_ids"]
    assert ids[0][0] == bos and common.prompt_head(llama, chat=False) == [bos]
    cut = common.fit_prompts(ids, 6, True, common.prompt_head(llama, chat=False), "x")
    assert cut[0][0] == bos and len(cut[0]) == 6 and cut[0][1:] == ids[0][-5:]  # BOS, then the end of the text
    assert cut[1] == ids[1]
    qwen = chat_tokenizer("qwen")
    text = qwen.apply_chat_template([{"role": "user", "content": "the plot was good and the acting was bad " * 3}],
                                    tokenize=False, add_generation_prompt=True)
    ids = qwen([text], add_special_tokens=False)["input_ids"]
    head = common.prompt_head(qwen, chat=True)
    assert qwen.decode(head) == "<|im_start|>system\nYou are Qwen, a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    cut = common.fit_prompts(ids, len(head) + 8, True, head, "x")[0]
    assert cut[: len(head)] == head and cut[len(head):] == ids[0][-8:]  # the system turn survives the cut
    assert qwen.decode(cut).endswith("<|im_start|>assistant\n")
    # a conversation with a system turn of its own keeps it, and the user header after it
    text = qwen.apply_chat_template([{"role": "system", "content": "be brief"},
                                     {"role": "user", "content": "the plot was good and the acting was bad " * 6}],
                                    tokenize=False, add_generation_prompt=True)
    own = qwen([text], add_special_tokens=False)["input_ids"]
    cut = common.fit_prompts(own, len(head) + 8, True, head, "x")[0]
    assert qwen.decode(cut).startswith("<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\n")
    assert len(cut) == len(head) + 8 < len(own[0])
    assert cut[-8:] == own[0][-8:]
    with pytest.raises(SystemExit, match="leaves no room after the"):
        common.fit_prompts(ids, len(head), True, head, "x")
    with pytest.raises(SystemExit, match=r"x: 1 of 1 prompts are longer than max_prompt_length=5 tokens"):
        common.fit_prompts(ids, 5, False, head, "x")


def test_sft_and_ppo_cut_prompts_behind_the_bos(tmp_path):
    """A Llama-style tokenizer (BOS before every text): SFT's and PPO's cut prompts still start with it."""
    base = tiny_model_dir("llama", str(tmp_path / "base"))
    tokenizer = common.load_tokenizer(base, add_pad_token=True)
    bos = tokenizer.bos_token_id
    prompts = ["the first prompt, which is long enough to be cut " * 2, "short"]
    args = sft.parse_args(["--model_name_or_path", base, "--max_prompt_length", "8", "--truncate_long_prompts"])
    pairs = common.tokenize_pairs(prompts, [" yes", " no"], tokenizer, args, False, "x")
    assert [p[0] for p, _ in pairs] == [bos, bos] and len(pairs[0][0]) == 8
    import datasets

    splits = datasets.DatasetDict({"train": datasets.Dataset.from_list([{"prompt": p} for p in prompts])})
    ppo_args = ppo.parse_args(["--sft_model", base, "--max_prompt_length", "8", "--truncate_long_prompts"])
    _, ids = common.prompts_of_split(ppo_args, splits, "train", tokenizer, base)
    assert [x[0] for x in ids] == [bos, bos] and len(ids[0]) == 8


def test_rm_normalisation_prompts_follow_ppo_length_rule(toy_dir, tmp_path, monkeypatch):
    """The normalisation prompts are checked (and cut) like PPO's, before training: not sampled at any length."""
    monkeypatch.chdir(tmp_path)
    argv = ["--model_name_or_path", os.path.join(toy_dir, "base_model"), "--dataset", os.path.join(toy_dir, "prefs"),
            "--output_dir", str(tmp_path / "rm"), "--num_train_pairs", "128", "--batch_size", "64",
            "--num_normalisation_prompts", "8", "--max_prompt_length", "3"]
    with pytest.raises(SystemExit,
                       match=r"normalisation prompts: [1-8] of 8 prompts are longer than max_prompt_length=3"):
        train_rm.main(train_rm.parse_args(argv))
    assert not os.path.exists(str(tmp_path / "rm_checkpoints"))  # stopped before the first step
    for preset in ("pythia-tldr", "hh-rlhf", "ultrafeedback"):
        rm, policy = train_rm.parse_args([preset]), ppo.parse_args([preset])
        assert ((rm.max_prompt_length, rm.truncate_long_prompts)
                == (policy.max_prompt_length, policy.truncate_long_prompts))


# ----------------------------------------------------------------------------------------------
# An RM with another (chat) tokenizer reads its reward at its own end-of-turn token
# ----------------------------------------------------------------------------------------------
class TokenIdAsScore(torch.nn.Module):
    """A stand-in RM whose score at each position is the token id there: what rm_scores reads is visible."""

    def forward(self, input_ids, attention_mask):
        return input_ids.float()


def test_retokenised_rm_reads_its_reward_at_its_end_of_turn_token():
    policy_tok, rm_tok = chat_tokenizer("qwen"), chat_tokenizer("llama3")
    text = policy_tok.apply_chat_template([{"role": "user", "content": "the plot"}], tokenize=False,
                                          add_generation_prompt=True)
    query = policy_tok(text, add_special_tokens=False)["input_ids"]
    im_end = policy_tok.convert_tokens_to_ids("<|im_end|>")
    responses = [policy_tok(" was good", add_special_tokens=False)["input_ids"] + [im_end],  # ended at <|im_end|>
                 policy_tok(" was bad and", add_special_tokens=False)["input_ids"]]  # cut at the length limit
    width = max(len(r) for r in responses)
    padded = torch.tensor([r + [policy_tok.pad_token_id] * (width - len(r)) for r in responses])
    responses, response_mask, has_eos = ppo.truncate_after_eos(padded, [policy_tok.eos_token_id, im_end],
                                                               policy_tok.pad_token_id)
    query_responses = torch.cat([torch.tensor([query] * 2), responses], 1)
    attention_mask = torch.cat([torch.ones(2, len(query), dtype=torch.long), response_mask.long()], 1)
    eot = rm_tok.convert_tokens_to_ids("<|eot_id|>")
    assert common.end_of_turn_tokens(rm_tok) == [eot]
    scores = ppo.rm_scores(TokenIdAsScore(), query_responses, attention_mask, response_mask, len(query), policy_tok,
                           (rm_tok, eot), has_eos, 2)
    # the ended response is scored at the RM's <|eot_id|>; the cut one at its own last token, as without re-tokenising
    assert scores.tolist() == [float(eot), float(rm_tok(" and", add_special_tokens=False)["input_ids"][-1])]


# ----------------------------------------------------------------------------------------------
# Acceptance: the hh-rlhf preset, SFT -> RM -> PPO, on real HH-RLHF rows with the real Pythia tokenizer
# ----------------------------------------------------------------------------------------------
def tiny_pythia(path: str) -> str:
    """A random 2-layer GPT-NeoX with the real Pythia (GPT-NeoX-20B) tokenizer: Pythia's padded vocabulary."""
    from transformers import AutoTokenizer, GPTNeoXConfig, GPTNeoXForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(os.path.join(REAL, "tokenizers", "pythia"))
    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=50304, hidden_size=32, num_hidden_layers=2,
                                             num_attention_heads=2, intermediate_size=64, max_position_embeddings=2048,
                                             eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@needs_real
def test_hh_rlhf_preset_runs_every_stage_on_real_rows(tmp_path, monkeypatch, capsys):
    """Only paths and sizes are overridden; SFT reads the raw rows, empty final replies and all."""
    monkeypatch.chdir(tmp_path)
    base, data = tiny_pythia(str(tmp_path / "base")), os.path.join(REAL, "hh_rlhf")
    sft_out, rm_out = str(tmp_path / "sft"), str(tmp_path / "rm")
    sft.main(sft.parse_args(["hh-rlhf", "--model_name_or_path", base, "--dataset", data, "--output_dir", sft_out,
                             "--max_steps", "1", "--batch_size", "4", "--gradient_accumulation_steps", "1",
                             "--eval_batch_size", "4", "--num_eval_pairs", "8", "--num_eval_samples", "4",
                             "--max_new_tokens", "4"]))
    printed = capsys.readouterr().out
    # the 4 dialogues of the 2,000 whose final chosen reply is empty are dropped, with their count
    assert ("split 'train': dropped 4 of 2000 rows that cannot be used (4 with an empty completion; first: row 86)"
            in printed)
    results = train_rm.main(train_rm.parse_args([
        "hh-rlhf", "--model_name_or_path", sft_out, "--dataset", data, "--output_dir", rm_out,
        "--num_train_pairs", "16", "--num_eval_pairs", "8", "--batch_size", "8", "--micro_batch_size", "8",
        "--eval_batch_size", "8", "--num_normalisation_prompts", "4", "--generation_batch_size", "4",
        "--response_length", "4"]))
    assert results["normalisation"]["num_samples"] == 4
    printed = capsys.readouterr().out
    assert "normalisation prompts" not in printed or "keeping their last tokens" in printed
    out = ppo.main(ppo.parse_args([
        "hh-rlhf", "--sft_model", sft_out, "--reward_model", rm_out, "--dataset", data,
        "--output_dir", str(tmp_path / "ppo"), "--total_episodes", "4", "--batch_size", "4",
        "--micro_batch_size", "4", "--local_rollout_forward_batch_size", "4", "--response_length", "4",
        "--eval_samples", "4", "--eval_batch_size", "4"]))
    assert out["episodes"] == 4 and out["num_eval_prompts"] == 4
    # 23 real HH prompts are over the preset's 512 tokens: cut, and none longer (Pythia adds no BOS)
    assert ("split 'train' of '" + data + "': 23 of 2000 prompts are longer than max_prompt_length=512"
            in capsys.readouterr().out)
    with open(os.path.join(tmp_path / "ppo", "eval_results.json")) as f:
        assert json.load(f)["episodes"] == 4

