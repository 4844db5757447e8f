"""dpo.py: the losses on hand values, the identity with train_rm.py's Bradley-Terry loss, the gradient against its
analytic form, then tiny end-to-end runs: the first step, a zero learning rate, resume, the precomputed reference,
torchrun with 2 processes, and the presets on real rows and every preference format."""

import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, one_thread

import common
import dpo
import train_rm

TIMING_KEYS = ("wall_time_s", "train_time_s", "args")


@pytest.fixture(autouse=True, scope="module")
def _one_thread_for_this_module():
    with one_thread():
        yield


# ----------------------------------------------------------------------------------------------
# The equations
# ----------------------------------------------------------------------------------------------
def test_dpo_and_ipo_losses_hand_computed():
    beta = 0.5
    logps_w, ref_w = torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -4.5])
    logps_l, ref_l = torch.tensor([-6.0, -2.0]), torch.tensor([-5.0, -2.5])
    r_w, r_l = dpo.implicit_reward(logps_w, ref_w, beta), dpo.implicit_reward(logps_l, ref_l, beta)
    torch.testing.assert_close(r_w, torch.tensor([0.5, -0.25]))
    torch.testing.assert_close(r_l, torch.tensor([-0.5, 0.25]))
    # h = (log pi_w - log ref_w) - (log pi_l - log ref_l) = (2, -1); DPO: mean(-log sigmoid(beta h))
    dpo_loss = (math.log1p(math.exp(-1.0)) + math.log1p(math.exp(0.5))) / 2  # 0.31326 and 0.97408
    assert dpo.bradley_terry_loss(r_w, r_l).item() == pytest.approx(dpo_loss, rel=1e-6)
    # IPO: mean((h - 1/(2 beta))^2) = mean((2 - 1)^2, (-1 - 1)^2) = 2.5
    assert dpo.ipo_loss(r_w, r_l, beta).item() == pytest.approx(2.5, rel=1e-6)
    # where the policy is the reference (step 0), every implicit reward is 0: DPO's loss is log 2, IPO's 1/(4 beta^2)
    zero = torch.zeros(3)
    assert dpo.bradley_terry_loss(zero, zero).item() == pytest.approx(math.log(2))
    assert dpo.ipo_loss(zero, zero, 0.1).item() == pytest.approx(25.0)


def test_dpo_loss_is_train_rms_bradley_terry_loss_on_the_implicit_reward():
    """Rafailov et al. 2023, Eq. 7 written out (-log sigmoid(beta h)) equals train_rm.py's loss applied to
    r = beta log pi/pi_ref, with and without a margin; and dpo.py's copy of the loss is train_rm.py's."""
    torch.manual_seed(0)
    beta = 0.1
    logps_w, ref_w, logps_l, ref_l = (torch.randn(64) * 20 - 40 for _ in range(4))
    h = (logps_w - ref_w) - (logps_l - ref_l)
    paper = -torch.nn.functional.logsigmoid(beta * h).mean()
    rm = train_rm.bradley_terry_loss(beta * (logps_w - ref_w), beta * (logps_l - ref_l))
    ours = dpo.bradley_terry_loss(dpo.implicit_reward(logps_w, ref_w, beta), dpo.implicit_reward(logps_l, ref_l, beta))
    torch.testing.assert_close(rm, paper)
    torch.testing.assert_close(ours, paper)
    margin = torch.rand(64)
    torch.testing.assert_close(train_rm.bradley_terry_loss(beta * (logps_w - ref_w), beta * (logps_l - ref_l), margin),
                               -torch.nn.functional.logsigmoid(beta * h - margin).mean())


def toy_pairs(toy_dir, tok, rows: list[int]) -> dict:
    """Rows of the toy task's preference data as load_preference_split returns them (prompt + " " + completion +
    EOS), with their completion starts. Rows 0-5 share a prompt (its 4 ranked completions' 6 pairs)."""
    with open(os.path.join(toy_dir, "prefs", "train.jsonl")) as f:
        data = [json.loads(line) for line, _ in zip(f, range(max(rows) + 1))]
    encode = lambda prompt, text: tok(prompt + " " + text)["input_ids"] + [tok.eos_token_id]  # noqa: E731
    pairs = {"prompt": [data[i]["prompt"] for i in rows], "margin": None,
             "chosen_ids": [encode(data[i]["prompt"], data[i]["chosen"]) for i in rows],
             "rejected_ids": [encode(data[i]["prompt"], data[i]["rejected"]) for i in rows]}
    dpo.completion_starts(pairs, tok, add_special_tokens=True)
    return pairs


def test_gradient_is_the_analytic_dpo_gradient(toy_dir):
    """grad L = -beta * sigmoid(-beta h) * (grad log pi(y_w) - grad log pi(y_l)) for one pair (Rafailov et al. 2023,
    Sec. 4), through sequence_logprobs on a tiny model, against a reference that differs from it (h != 0)."""
    base = os.path.join(toy_dir, "base_model")
    tok = common.load_tokenizer(base)
    torch.manual_seed(0)
    policy, ref = common.load_causal_lm(base, tok), common.load_causal_lm(base, tok).requires_grad_(False)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    pairs = toy_pairs(toy_dir, tok, [0])
    ids, mask, index, _ = train_rm.pair_batch(pairs, [0], tok.pad_token_id, "cpu")
    completion = dpo.completion_mask(pairs, [0], index, mask)
    beta, temperature = 0.3, 0.7

    def logps(model):
        return dpo.sequence_logprobs(model, ids, mask, completion, temperature)[index]  # (2,) chosen, rejected

    ref_logps, policy_logps = logps(ref), logps(policy)
    r = dpo.implicit_reward(policy_logps, ref_logps, beta)
    dpo.bradley_terry_loss(r[:1], r[1:]).backward()
    params = list(policy.parameters())
    autograd = [p.grad.clone() for p in params]
    grad_w = torch.autograd.grad(logps(policy)[0], params)
    grad_l = torch.autograd.grad(logps(policy)[1], params)
    h = ((policy_logps[0] - ref_logps[0]) - (policy_logps[1] - ref_logps[1])).detach()
    assert abs(h.item()) > 0.1  # away from the start, where sigmoid(-beta h) = 1/2
    weight = -beta * torch.sigmoid(-beta * h)
    for a, gw, gl in zip(autograd, grad_w, grad_l):
        torch.testing.assert_close(a, weight * (gw - gl), rtol=1e-4, atol=1e-6)  # float32 sums


def test_log_pi_counts_the_completion_tokens_only(toy_dir):
    """sequence_logprobs sums log pi(y_t) over the completion (EOS included) at the given temperature; the prompt and
    the padding count nothing, and a completion that two pairs share is one row of the batch."""
    base = os.path.join(toy_dir, "base_model")
    tok = common.load_tokenizer(base)
    model = common.load_causal_lm(base, tok).eval()
    pairs = toy_pairs(toy_dir, tok, [0, 1, 2, 6])  # rows 0-2 share their chosen completion
    idx = [0, 1, 2, 3]
    ids, mask, index, _ = train_rm.pair_batch(pairs, idx, tok.pad_token_id, "cpu")
    assert ids.shape[0] < 8
    with torch.no_grad():
        got = dpo.sequence_logprobs(model, ids, mask, dpo.completion_mask(pairs, idx, index, mask), 0.7)[index]
        for k, (seq, start) in enumerate(zip(pairs["chosen_ids"] + pairs["rejected_ids"],
                                             pairs["chosen_start"] + pairs["rejected_start"])):
            assert seq[:start] == tok(pairs["prompt"][k % 4])["input_ids"]  # the prompt, whole, and nothing more
            logits = model(torch.tensor([seq])).logits[0, :-1] / 0.7
            by_hand = sum(logits[t - 1].log_softmax(-1)[seq[t]] for t in range(start, len(seq)))
            assert got[k].item() == pytest.approx(by_hand.item(), abs=1e-4)


# ----------------------------------------------------------------------------------------------
# End to end
# ----------------------------------------------------------------------------------------------
def tiny_flags(toy_dir, rm, output_dir, *extra) -> list[str]:
    """4 steps of 64 pairs, 2 micro-batches each; 64 validation pairs; 16 held-out prompts, greedy (so that 2
    processes sample what one does)."""
    return ["--model_name_or_path", os.path.join(toy_dir, "base_model"), "--reward_model", rm,
            "--dataset", os.path.join(toy_dir, "prefs"), "--prompt_dataset", os.path.join(toy_dir, "prompts"),
            "--output_dir", str(output_dir), "--num_train_pairs", "256", "--num_eval_pairs", "64",
            "--batch_size", "64", "--micro_batch_size", "32", "--eval_batch_size", "32", "--learning_rate", "1e-3",
            "--eval_samples", "16", "--generation_batch_size", "16", "--response_length", "8",
            "--eval_temperature", "0", "--log_every", "1", "--run_name", str(output_dir) + "_tb", *extra]


@pytest.fixture(scope="module")
def e2e(toy_dir, standin_rm, tmp_path_factory):
    """One in-process run, with implicit_reward spied on to catch the first step's rewards."""
    tmp = tmp_path_factory.mktemp("dpo_e2e")
    calls, real = [], dpo.implicit_reward

    def spy(logps, ref_logps, beta):
        out = real(logps, ref_logps, beta)
        calls.append(out.detach().clone())
        return out
    dpo.implicit_reward = spy
    cwd = os.getcwd()
    os.chdir(tmp)
    try:
        out = dpo.main(dpo.parse_args(tiny_flags(toy_dir, standin_rm, tmp / "dpo", "--checkpoint_every", "2")))
    finally:
        dpo.implicit_reward = real
        os.chdir(cwd)
    return {"out": out, "dir": tmp / "dpo", "calls": calls, "tmp": tmp}


def results(output_dir) -> dict:
    with open(os.path.join(output_dir, "eval_results.json")) as f:
        return {k: v for k, v in json.load(f).items() if k not in TIMING_KEYS}


def weights(output_dir) -> dict:
    return load_file(os.path.join(output_dir, "model.safetensors"))


def test_the_first_step_starts_at_the_reference_and_the_run_learns(e2e):
    first_chosen, first_rejected = e2e["calls"][0], e2e["calls"][1]  # the first micro-batch, before any update
    assert torch.equal(first_chosen, torch.zeros_like(first_chosen))
    assert torch.equal(first_rejected, torch.zeros_like(first_rejected))
    res = results(e2e["dir"])
    assert set(res) >= {"sft", "dpo", "gold_win_rate", "final_kl", "num_eval_prompts", "val_accuracy", "history"}
    assert res["num_eval_prompts"] == 16 and res["steps"] == 4 and res["sft"]["kl"] == 0.0
    assert res["final_kl"] > 0 and res["history"][0]["step"] == 0 and res["history"][-1]["step"] == 4
    assert res["val_accuracy"] > 0.5  # the implicit reward ranks most held-out pairs right after 4 steps
    assert set(res["history"][-1]) >= {"eval/rewards/margins", "eval/gold_score", "eval/kl", "eval/rm_score"}


@pytest.mark.parametrize("loss_type, start_loss", [("sigmoid", math.log(2)), ("ipo", 1 / (4 * 0.1**2))])
def test_zero_learning_rate_moves_nothing(loss_type, start_loss, toy_dir, standin_rm, tmp_path, monkeypatch):
    """With a learning rate of 0 the policy stays the reference: the saved weights are the SFT weights, every
    implicit reward is 0 (DPO's loss log 2, IPO's 1/(4 beta^2)), and the final evaluation is the SFT one, KL 0."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(dpo, "learning_rate_at", lambda step, total, args: 0.0)
    out = dpo.main(dpo.parse_args(tiny_flags(toy_dir, standin_rm, tmp_path / "zero", "--num_train_pairs", "128",
                                             "--loss_type", loss_type)))
    base = load_file(os.path.join(toy_dir, "base_model", "model.safetensors"))
    saved = weights(tmp_path / "zero")
    assert all(torch.equal(saved[k], base[k]) for k in base)
    val = out["history"][-1]
    assert val["eval/rewards/chosen"] == val["eval/rewards/rejected"] == val["eval/rewards/accuracies"] == 0.0
    assert val["eval/loss"] == pytest.approx(start_loss, rel=1e-6)
    assert out["dpo"] == out["sft"] and out["final_kl"] == 0.0 and out["gold_win_rate"] == 0.5


def test_resume_after_a_crash_is_bit_identical(e2e, toy_dir, standin_rm, tmp_path, monkeypatch):
    """Killed after its step-2 checkpoint (the crash raised in-process), then --resume: the same eval_results.json
    and weights, bit for bit, as the uninterrupted run."""
    monkeypatch.chdir(tmp_path)
    flags = tiny_flags(toy_dir, standin_rm, tmp_path / "resumed", "--checkpoint_every", "2")
    real = dpo.save_or_stop

    class Crash(Exception):
        pass

    def crash_after_step_2(step, *a):
        real(step, *a)
        if step == 2:
            raise Crash
    monkeypatch.setattr(dpo, "save_or_stop", crash_after_step_2)
    with pytest.raises(Crash):
        dpo.main(dpo.parse_args(flags))
    monkeypatch.setattr(dpo, "save_or_stop", real)
    assert common.checkpoints(str(tmp_path / "resumed_checkpoints"))[-1].endswith("step_2")
    dpo.main(dpo.parse_args([*flags, "--resume"]))
    assert results(tmp_path / "resumed") == results(e2e["dir"])
    a, b = weights(tmp_path / "resumed"), weights(e2e["dir"])
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_precomputed_reference_gives_the_same_run(e2e, toy_dir, standin_rm, tmp_path, monkeypatch):
    """--precompute_ref_log_probs: the reference's log-probabilities once, in other batches; the same training up to
    float rounding (the same numbers, summed over other paddings)."""
    monkeypatch.chdir(tmp_path)
    out = dpo.main(dpo.parse_args(tiny_flags(toy_dir, standin_rm, tmp_path / "pre", "--precompute_ref_log_probs")))
    a, b = weights(tmp_path / "pre"), weights(e2e["dir"])
    assert all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a)
    assert out["val_loss"] == pytest.approx(e2e["out"]["val_loss"], rel=1e-4)


def two_process_runs(toy_dir, standin_rm, tmp) -> list:
    """dpo.py on 2 processes, its output in tmp / "dpo" (conftest's two_process_runs launches it with the other
    stages' 2-process runs). The reference is precomputed, so that its gathered table is tested too."""
    return [(os.path.join(ROOT, "dpo.py"), tiny_flags(toy_dir, standin_rm, tmp / "dpo", "--micro_batch_size", "16",
                                                      "--precompute_ref_log_probs"))]


def test_torchrun_two_processes_train_as_one(e2e, two_process_runs):
    """2 processes with FSDP2 on the same global batches (each rank half of every micro-batch split) train as one
    does: the saved weights to 1e-4 relative, every evaluation to 1e-4 (greedy samples; float sums in another order;
    measured differences ~1e-6)."""
    out = two_process_runs["dir"] / "dpo"
    two, one = results(out), results(e2e["dir"])
    assert two["num_eval_prompts"] == one["num_eval_prompts"] == 16
    for a, b in zip(two["history"], one["history"], strict=True):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-6)
    a, b = weights(out), weights(e2e["dir"])
    assert all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a)


# ----------------------------------------------------------------------------------------------
# The presets: real HH-RLHF rows with the real Pythia tokenizer, and the TL;DR and UltraFeedback fixtures
# ----------------------------------------------------------------------------------------------
def random_rm(base: str, path: str) -> str:
    """A random scalar head on the tiny base model, saved as train_rm.py saves an RM (mean 0, std 1)."""
    tok = common.load_tokenizer(base, add_pad_token=True)
    torch.manual_seed(0)
    common.save_model(common.load_reward_model(base, tok), tok, path, "rm",
                      extra_config={"reward_mean": 0.0, "reward_std": 1.0})
    return path


TINY_PRESET = ["--num_train_pairs", "8", "--num_eval_pairs", "4", "--batch_size", "4", "--micro_batch_size", "2",
               "--eval_batch_size", "4", "--eval_samples", "2", "--generation_batch_size", "2", "--response_length",
               "4", "--checkpoint_every", "0", "--add_pad_token"]


@pytest.mark.parametrize("preset, family, data", [("pythia-tldr", "gpt_neox", "tldr_prefs"),
                                                  ("ultrafeedback", "qwen2", "ultrafeedback")])
def test_preset_runs_on_its_fixture(preset, family, data, tmp_path, monkeypatch):
    """The preset's columns and formats on a fixture in its hub schema, a tiny model of the family: every completion
    starts where its prompt ends (the TL;DR texts need no separator, the chat template renders the prompt)."""
    from test_real_path import FIXTURES, tiny_model_dir

    monkeypatch.chdir(tmp_path)
    base = tiny_model_dir(family, str(tmp_path / "base"))
    fixture = os.path.join(FIXTURES, data)
    prompts = ["--prompt_dataset", os.path.join(FIXTURES, "tldr_sft" if preset == "pythia-tldr" else data)]
    args = dpo.parse_args([preset, "--model_name_or_path", base, "--dataset", fixture, *prompts,
                           "--reward_model", random_rm(base, str(tmp_path / "rm")), "--output_dir",
                           str(tmp_path / "dpo"), *TINY_PRESET])
    check_completions_start_after_their_prompts(args, base)
    out = dpo.main(args)
    assert out["steps"] >= 1 and out["num_eval_prompts"] == 2 and math.isfinite(out["val_loss"])


def check_completions_start_after_their_prompts(args, base):
    """On these formats no token straddles the prompt/completion boundary: each completion starts right after its
    prompt's own tokens."""
    tok = common.load_tokenizer(base, add_pad_token=True)
    pairs = common.load_preference_split(args, common.load_dataset(args.dataset), args.train_split, tok, 8)
    special = args.dataset_format != "conversational"
    dpo.completion_starts(pairs, tok, add_special_tokens=special)
    for prompt, ids, start in zip(pairs["prompt"], pairs["chosen_ids"], pairs["chosen_start"]):
        assert ids[:start] == tok(prompt, add_special_tokens=special)["input_ids"] and start < len(ids) - 1


@pytest.mark.skipif(not os.path.isdir(os.path.join(os.path.dirname(common.PROJECT_ROOT), "shared", "real")),
                    reason="../shared/real (real tokenizers and HH-RLHF rows) is absent")
def test_hh_rlhf_preset_on_real_rows(tmp_path, monkeypatch):
    """The hh-rlhf preset on 2,000 real HH-RLHF dialogues with the real Pythia tokenizer: each pair split after its
    last "\\n\\nAssistant:", the completion counted from the reply's first token, and one DPO step."""
    from test_real_data import REAL, tiny_pythia

    monkeypatch.chdir(tmp_path)
    base, data = tiny_pythia(str(tmp_path / "base")), os.path.join(REAL, "hh_rlhf")
    args = dpo.parse_args(["hh-rlhf", "--model_name_or_path", base, "--dataset", data, "--prompt_dataset", data,
                           "--reward_model", random_rm(base, str(tmp_path / "rm")), "--output_dir",
                           str(tmp_path / "dpo"), *TINY_PRESET, "--max_length", "256"])  # sizes only: the short ones
    tok = common.load_tokenizer(base, add_pad_token=True)
    pairs = common.load_preference_split(args, common.load_dataset(data), "train", tok, 32)
    dpo.completion_starts(pairs, tok, add_special_tokens=True)
    for prompt, ids, start in zip(pairs["prompt"], pairs["chosen_ids"], pairs["chosen_start"]):
        assert prompt.endswith("\n\nAssistant:") and ids[:start] == tok(prompt)["input_ids"]
    out = dpo.main(args)
    assert out["steps"] >= 1 and out["num_eval_prompts"] == 2 and math.isfinite(out["val_loss"])


def test_pipeline_summary_gets_a_dpo_column_only_with_dpo():
    """`python pipeline.py --dpo` adds a DPO column (dpo.py's eval_results.json) to the summary; without it the rows
    are the three columns they were."""
    import pipeline

    metrics = {"gold_score": 0.5, "rm_score": 1.0, "kl": 4.0, "response_length": 9.0, "eos_rate": 1.0}
    rm = {"val_accuracy": 0.75, "bayes_ceiling": 0.78}
    ppo = {"sft": {**metrics, "kl": 0.0}, "ppo": metrics, "gold_win_rate": 0.9}
    plain = pipeline.summary_rows(rm, ppo)
    assert {len(row) for row in plain} == {3} and plain[-1][0].startswith("RM validation accuracy 0.750")
    dpo_results = {"dpo": {**metrics, "kl": 2.5}, "gold_win_rate": 0.8, "val_accuracy": 0.7}
    with_dpo = pipeline.summary_rows(rm, ppo, dpo_results)
    assert [row[:3] for row in with_dpo[:-1]] == plain[:-1] and {len(row) for row in with_dpo} == {4}
    assert dict((row[0], row[3]) for row in with_dpo)["KL to reference (nats/response)"] == "2.50"
    assert with_dpo[-1][0].endswith("DPO's implicit reward 0.700")
