"""pipeline.py: the one-command toy pipeline, at test scale."""

import json

from conftest import run_script, run_script_expect_error


def test_pipeline_runs_every_stage_and_prints_the_summary(tmp_path):
    data, models = tmp_path / "toy", tmp_path / "models"
    proc = run_script(
        "pipeline.py", "--data_dir", str(data), "--models_dir", str(models), "--run_prefix", str(tmp_path / "runs" / "p"),
        "--toy_args=--n_sft 400 --n_prefs 400 --n_prompts 100 --hidden_size 32 --num_layers 1",
        "--sft_args=--num_train_epochs 1 --num_eval_samples 16",
        "--rm_args=--num_epochs 1 --num_normalisation_prompts 16",
        "--ppo_args=--total_episodes 64 --batch_size 32 --eval_samples 16 --response_length 8",
        timeout=600)
    for stage in ("sft", "rm", "ppo"):
        assert (models / stage / "config.json").exists()
    summary = json.loads((models / "pipeline_summary.json").read_text())
    ppo = json.loads((models / "ppo" / "eval_results.json").read_text())
    rm = json.loads((models / "rm" / "eval_results.json").read_text())
    rows = {name: (sft, after) for name, sft, after in summary["rows"]}
    # the table reads the stages' own results, formatted, and states the RM beside its ceiling
    assert rows["gold win rate vs SFT"][1] == f"{ppo['gold_win_rate']:.3f}"
    assert rows["KL to reference (nats/response)"] == ("0.00", f"{ppo['ppo']['kl']:.2f}")
    assert rows["EOS rate"] == (f"{ppo['sft']['eos_rate']:.3f}", f"{ppo['ppo']['eos_rate']:.3f}")
    assert f"RM validation accuracy {rm['val_accuracy']:.3f} (Bayes ceiling {rm['bayes_ceiling']:.3f}" in summary["rows"][-1][0]
    assert set(summary["wall_time_s"]) == {"toy_task", "sft", "rm", "ppo"}
    assert "gold win rate vs SFT" in proc.stdout and "Bayes ceiling" in proc.stdout


def test_pipeline_stops_at_a_failing_stage(tmp_path):
    last_line = run_script_expect_error("pipeline.py", "--data_dir", str(tmp_path / "toy"), "--models_dir", str(tmp_path / "m"),
                                        "--toy_args=--no_such_flag 1")
    assert "the toy task stage failed" in last_line
    assert not (tmp_path / "m").exists()
