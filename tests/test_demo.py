"""`tdpo-trl demo` end to end in a short configuration, and the `tdpo-trl` command's entry points."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from tdpo_trl.commands import demo, train
from tdpo_trl.commands.cli import main as cli_main
from tdpo_trl.digits import eval_prompts, load_digits_pipeline


SHORT = ["--num_epochs", "2", "--sample_batch_size", "8", "--sample_num_batches_per_epoch", "1",
         "--train_batch_size", "8", "--samples_per_digit", "2", "--save_freq", "1",
         "--neuron_reset_frequency", "1"]  # fmt: skip


def run_demo(output_dir, *extra):
    command = [sys.executable, "-m", "tdpo_trl.commands.cli", "demo", "--output_dir", str(output_dir), *SHORT, *extra]
    return subprocess.run(
        command, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "2"}
    )


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("demo") / "out"
    result = run_demo(output_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    return output_dir, result.stdout


def test_demo_writes_every_output(demo_run):
    output_dir, stdout = demo_run
    expected = ["lora/pytorch_lora_weights.safetensors", "lora/README.md", "metrics.jsonl", "before_after.png",
                "cross_reward.png", "summary.json", "checkpoints/checkpoint_0",
                "checkpoints/checkpoint_1", "unregularized/lora/pytorch_lora_weights.safetensors"]  # fmt: skip
    for name in expected:
        assert (output_dir / name).exists(), name
    assert list((output_dir / "tensorboard").glob("**/events.out.tfevents.*"))
    for name in ("before_after.png", "cross_reward.png"):
        assert (output_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the printed table and paths
    assert "prompted-digit accuracy" in stdout and "ink reward (target)" in stdout and " -> " in stdout
    assert str(output_dir / "lora" / "pytorch_lora_weights.safetensors") in stdout


def test_demo_metrics_are_finite_and_consistent(demo_run):
    output_dir, _ = demo_run
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1]
    for record in records:
        assert all(v is not None and math.isfinite(v) for v in record.values()), record
        assert 0.0 <= record["eval/digit_accuracy/mean"] <= 1.0
        assert record["critic/loss"] >= 0.0
    assert [r["neurons/reset_count"] for r in records] == [1, 2]
    assert records[0]["step"] < records[1]["step"]

    # the tensorboard scalars are the same numbers
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    accumulator = event_accumulator.EventAccumulator(str(output_dir / "tensorboard"))  # the scalars' folder
    accumulator.Reload()
    logged = accumulator.Scalars("reward/mean")
    assert [e.step for e in logged] == [r["step"] for r in records]
    assert [e.value for e in logged] == pytest.approx([r["reward/mean"] for r in records], rel=1e-6)

    summary = json.loads((output_dir / "summary.json").read_text())
    assert summary["epochs"] == 2 and summary["fixed_samples"] == 20
    assert summary["mode"].startswith("TDPO-R + pretraining loss")
    assert summary["unregularized_mode"] == "TDPO-R"
    for when in ("before", "after", "unregularized"):
        assert all(math.isfinite(v) for v in summary[when].values())
        assert 0.0 <= summary[when]["accuracy"] <= 1.0
        assert 0.0 <= summary[when]["independent_accuracy"] <= 1.0
    assert all("pretrain/loss" in r for r in records)
    # the contrast: the same budget without the regularizers, in its own folder
    contrast = [json.loads(line) for line in (output_dir / "unregularized" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in contrast] == [0, 1] and not any("pretrain/loss" in r for r in contrast)
    # each run's own run summary (the code `train()` prints): the LoRA it saved, its reward first -> last
    assert list(summary["runs"]) == [summary["mode"], summary["unregularized_mode"]]
    for folder, history, run in zip(("lora", "unregularized/lora"), (records, contrast), summary["runs"].values()):
        assert run["lora_file"] == str(output_dir / folder / "pytorch_lora_weights.safetensors")
        assert run["reward"]["reward/mean"] == pytest.approx([history[0]["reward/mean"], history[-1]["reward/mean"]])


def test_demo_lora_reproduces_the_reported_after_scores(demo_run):
    """A fresh copy of the shipped base with the saved LoRA gives the demo's 'after' numbers; without it, 'before'."""
    output_dir, _ = demo_run
    summary = json.loads((output_dir / "summary.json").read_text())
    config = train.default_config("digits", project_kwargs={"project_dir": str(output_dir / "unused")})
    prompts = eval_prompts(2)
    pipeline = load_digits_pipeline()
    _, before = demo.judge_fixed_samples(pipeline, config, prompts)
    pipeline.load_lora_weights(str(output_dir / "lora"))
    _, after = demo.judge_fixed_samples(pipeline, config, prompts)
    assert before == pytest.approx(summary["before"], abs=1e-4)
    assert after == pytest.approx(summary["after"], abs=1e-4)
    contrast = load_digits_pipeline()
    contrast.load_lora_weights(str(output_dir / "unregularized" / "lora"))
    assert demo.judge_fixed_samples(contrast, config, prompts)[1] == pytest.approx(summary["unregularized"], abs=1e-4)


def test_the_cross_reward_figure_draws_one_curve_per_run(tmp_path):
    history = [{"reward/mean": 0.3 + 0.01 * i, "eval/digit_accuracy/mean": 1.0 - 0.01 * i,
                "eval/digit_realism/mean": 1.5} for i in range(8)]  # fmt: skip
    figure = demo.plot_epoch_cross_reward({"regularized": history, "unregularized": history}, tmp_path / "c.png")
    for ax in figure.axes[:2]:
        assert [line.get_label() for line in ax.get_lines()] == ["regularized", "unregularized"]
    panels = {name: torch.rand(20, 3, 16, 16) for name in ("before", "after", "unregularized")}
    scores = {name: {"stroke_mass": 0.3, "accuracy": 1.0, "realism": 1.5} for name in panels}
    figure = demo.plot_before_after(panels, scores, tmp_path / "b.png")
    assert [ax.get_title().split("\n")[0] for ax in figure.axes] == [
        "before",
        "after",
        "after, without the regularizers",
    ]


def test_demo_refuses_a_used_output_dir_and_keeps_its_files(demo_run):
    output_dir, _ = demo_run
    lora = output_dir / "lora" / "pytorch_lora_weights.safetensors"
    before = (lora.read_bytes(), (output_dir / "metrics.jsonl").read_text())
    result = run_demo(output_dir)
    assert result.returncode != 0
    assert "already holds checkpoints" in result.stderr and "resume_from" in result.stderr
    assert (lora.read_bytes(), (output_dir / "metrics.jsonl").read_text()) == before


def test_command_lists_its_subcommands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("demo", "train", "evaluate"))


@pytest.mark.parametrize("command", ["train", "demo"])
def test_every_config_field_is_a_flag(command, capsys):
    with pytest.raises(SystemExit):
        cli_main([command, "--help"])
    out = capsys.readouterr().out
    for flag in ("--lora_rank", "--neuron_reset_frequency", "--critic_encoder", "--sample_num_steps", "--gamma"):
        assert flag in out


def test_bad_flag_values_are_named(capsys):
    with pytest.raises(ValueError, match="`samples_per_digit` must be >= 1, got 0"):
        cli_main(["demo", "--samples_per_digit", "0"])
    with pytest.raises(ValueError, match="`sample_num_steps` must be >= 1, got 0"):
        cli_main(["train", "--sample_num_steps", "0"])
    with pytest.raises(SystemExit):
        cli_main(["train", "--lora_init", "bogus"])
    assert "invalid choice: 'bogus'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown reward 'no_such_reward'"):
        train.build_trainer(
            train.ScriptArguments(pretrained_model="tiny", reward="no_such_reward"),
            train.default_config("tiny", project_kwargs={"project_dir": "/nonexistent/never-written"}),
        )


def test_train_defaults_follow_the_model(tmp_path):
    script_args, config = train.parse_args(["--pretrained_model", "digits", "--num_epochs", "3"])
    assert (script_args.reward, script_args.prompts, config.num_epochs) == ("digit_ink", "digits", 3)
    assert config.use_lora and config.sample_num_steps == 10 and config.critic_encoder == "latents"
    script_args, config = train.parse_args(["--pretrained_model", "some/model", "--reward", "aesthetic"])
    assert config.critic_encoder == "openai/clip-vit-large-patch14" and script_args.reward == "aesthetic"
