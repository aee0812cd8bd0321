"""`tdpo-trl evaluate` end to end on the tiny pipeline: scores, the cross-reward figure and image grids."""

import json
import shutil

import pytest
import torch
from conftest import cat_prompt, tiny_config

from tdpo_trl import TDPOStableDiffusionPipeline, TDPOTrainer
from tdpo_trl.commands import cli
from tdpo_trl.evaluation import mean_std, sample_images, score_images
from tdpo_trl.rewards import jpeg_compressibility
from tdpo_trl.tiny_models import left_minus_right_brightness, mean_brightness, tiny_stable_diffusion


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("eval-run")
    config = tiny_config(tmp_path, num_epochs=2, save_freq=1, train_learning_rate=3e-2)
    pipeline = TDPOStableDiffusionPipeline(tiny_stable_diffusion(seed=0))
    TDPOTrainer(config, left_minus_right_brightness, cat_prompt, pipeline).train()
    return tmp_path / "logs" / "test"


def test_evaluate_command_scores_checkpoints_and_plots_them(run_folder, tmp_path):
    out = tmp_path / "eval"
    argv = [
        "evaluate", "--base", "tiny", "--runs", f"tdpo={run_folder}",
        "--target_reward", "tdpo_trl.tiny_models:left_minus_right_brightness",
        "--eval_rewards", "jpeg_compressibility", "tdpo_trl.tiny_models.mean_brightness",
        "--num_prompts", "3", "--num_steps", "4", "--output_dir", str(out),
    ]  # fmt: skip
    result = cli.main(argv)
    records = result["results"]["tdpo"]
    assert [r["checkpoint"] for r in records] == ["base", "checkpoint_0", "checkpoint_1"]
    assert (out / "cross_reward.png").stat().st_size > 0
    for name in ("base", "checkpoint_0", "checkpoint_1"):
        assert (out / "grids" / f"tdpo_{name}.png").exists()
    saved = json.loads((out / "cross_reward.json").read_text())
    assert saved["runs"]["tdpo"] == records and len(saved["prompts"]) == 3

    # the plotted points are the scores
    axes = result["figure"].axes
    assert [ax.get_ylabel() for ax in axes] == [
        "jpeg_compressibility (out-of-domain)",
        "mean_brightness (out-of-domain)",
    ]
    for ax, name in zip(axes, ["jpeg_compressibility", "mean_brightness"]):
        (line,) = ax.get_lines()
        assert line.get_xdata().tolist() == [r["target"] for r in records]
        assert line.get_ydata().tolist() == [r[name] for r in records]

    # and the scores are what the checkpoint's LoRA makes: recomputed independently for the last checkpoint
    pipeline = tiny_stable_diffusion(seed=0)
    pipeline.set_progress_bar_config(disable=True)
    pipeline.load_lora_weights(str(run_folder / "checkpoints" / "checkpoint_1"))
    images = sample_images(pipeline, saved["prompts"], seed=0, num_inference_steps=4, guidance_scale=5.0, eta=1.0)
    scores = score_images(
        {"target": left_minus_right_brightness, "jpeg": jpeg_compressibility, "bright": mean_brightness},
        images,
        saved["prompts"],
    )
    assert scores["target"].mean().item() == pytest.approx(records[-1]["target"], abs=1e-6)
    assert scores["bright"].mean().item() == pytest.approx(records[-1]["mean_brightness"], abs=1e-6)
    assert records[0]["target"] != records[-1]["target"], "training changed nothing: the figure would be flat"


def test_evaluate_groups_prompts_for_a_distribution_level_target(run_folder, tmp_path):
    argv = [
        "evaluate", "--base", "tiny", "--runs", f"tdpo={run_folder}", "--target_reward", "digit_pixel_diversity",
        "--eval_rewards", "tdpo_trl.tiny_models.mean_brightness", "--num_prompts", "8", "--num_steps", "2",
        "--output_dir", str(tmp_path),
    ]  # fmt: skip
    cli.main(argv)
    prompts = json.loads((tmp_path / "cross_reward.json").read_text())["prompts"]
    assert prompts[:4] == [prompts[0]] * 4 and prompts[4:] == [prompts[4]] * 4  # diversity's 4 per prompt
    with pytest.raises(ValueError, match="`prompt_repeats` must be >= 1, got 0"):
        cli.main([*argv, "--prompt_repeats", "0"])


def test_sampling_is_seeded_and_leaves_the_global_rng_alone():
    pipeline = tiny_stable_diffusion(seed=0)
    pipeline.set_progress_bar_config(disable=True)
    state = torch.random.get_rng_state()
    a = sample_images(pipeline, ["a cat", "a dog"], seed=3, num_inference_steps=4, guidance_scale=5.0, eta=1.0)
    assert torch.equal(torch.random.get_rng_state(), state)
    b = sample_images(pipeline, ["a cat", "a dog"], seed=3, num_inference_steps=4, guidance_scale=5.0, eta=1.0)
    assert torch.equal(a, b)


def test_judges_that_do_not_apply_are_left_out_of_the_mean():
    nan = float("nan")
    stats = mean_std({"accuracy": torch.tensor([1.0, nan, 0.0, nan]), "none": torch.tensor([nan, nan])}, "heldout")
    assert stats["heldout/accuracy/mean"] == 0.5 and stats["heldout/accuracy/std"] == 0.5
    assert stats["heldout/none/mean"] != stats["heldout/none/mean"]  # NaN: applies to no image


def test_bad_run_folder(tmp_path):
    argv = [
        "evaluate", "--base", "tiny", "--runs", f"x={tmp_path}", "--target_reward", "jpeg_compressibility",
        "--eval_rewards", "jpeg_incompressibility", "--num_steps", "2", "--output_dir", str(tmp_path / "o"),
    ]  # fmt: skip
    with pytest.raises(ValueError, match="holds no checkpoint_<i> folder"):
        cli.main(argv)


def test_trainer_scores_training_samples_and_a_heldout_set(tmp_path, tiny_pipeline):
    config = tiny_config(
        tmp_path,
        num_epochs=2,
        eval_reward_functions=["jpeg_compressibility", "tdpo_trl.tiny_models:mean_brightness"],
        eval_freq=2,
        eval_num_prompts=3,
        eval_seed=5,
    )
    trainer = TDPOTrainer(config, left_minus_right_brightness, cat_prompt, tiny_pipeline)
    trainer.train()
    first, second = trainer.log_history
    for record in (first, second):
        assert {"eval/jpeg_compressibility/mean", "eval/mean_brightness/std"} <= record.keys()
    assert "heldout/target/mean" not in first  # every 2 epochs
    assert {
        "heldout/target/mean",
        "heldout/jpeg_compressibility/mean",
        "heldout/mean_brightness/mean",
    } <= second.keys()
    assert (tmp_path / "logs" / "test" / "heldout" / "epoch_1.png").exists()

    # the held-out numbers are the seeded samples of the trained model on the fixed prompts
    state = torch.random.get_rng_state()
    again = trainer.evaluate_heldout()
    assert again["heldout/target/mean"] == second["heldout/target/mean"]
    assert torch.equal(state, torch.random.get_rng_state())
    assert len(trainer.heldout.prompts(0)) == 3


def test_evaluate_verifies_what_it_loads_as_resume_does(run_folder, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    from tdpo_trl.commands.cli import entry_point

    run_folder = shutil.copytree(run_folder, tmp_path / "run")  # the module's run stays intact
    weights = run_folder / "checkpoints" / "checkpoint_1" / "pytorch_lora_weights.safetensors"
    tensors = load_file(weights)
    name = next(iter(tensors))
    tensors[name] = tensors[name] * 1000  # a LoRA tensor altered after the checkpoint was written
    save_file(tensors, weights)
    argv = [
        "evaluate", "--base", "tiny", "--runs", f"tdpo={run_folder}", "--target_reward", "jpeg_compressibility",
        "--eval_rewards", "jpeg_incompressibility", "--num_prompts", "2", "--num_steps", "2",
        "--output_dir", str(tmp_path / "eval"),
    ]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        entry_point(argv)
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_info.value.code == 2 and "checkpoint_1' cannot be evaluated" in error, error
    assert "pytorch_lora_weights.safetensors" in error and "nothing of it was loaded" in error


def test_evaluate_samples_at_the_resolution_asked(run_folder, tmp_path):
    from PIL import Image

    argv = [
        "evaluate", "--base", "tiny", "--runs", f"tdpo={run_folder}", "--target_reward", "jpeg_compressibility",
        "--eval_rewards", "tdpo_trl.tiny_models.mean_brightness", "--num_prompts", "1", "--num_steps", "2",
    ]  # fmt: skip
    sizes = {}
    for resolution in (None, 32, 48):  # the tiny model's own: 16
        out = tmp_path / str(resolution)
        cli.main([*argv, "--output_dir", str(out)] + ([] if resolution is None else ["--resolution", str(resolution)]))
        sizes[resolution] = Image.open(out / "grids" / "tdpo_base.png").size
    (w32, h32), (w48, h48), (w, h) = sizes[32], sizes[48], sizes[None]  # one image in the grid's border
    assert w48 - w32 == h48 - h32 == 16 and w32 - w == h32 - h == 16
    with pytest.raises(ValueError, match="`resolution` must be a multiple of 8 .*, got 20"):
        cli.main([*argv, "--output_dir", str(tmp_path / "bad"), "--resolution", "20"])
