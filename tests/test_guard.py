"""OverOptimizationGuard: flags a judge's fall while the target rises, stops or keeps the best weights."""

import pytest
import torch
from conftest import cat_prompt, tiny_config
from safetensors.torch import load_file

from tdpo_trl import OverOptimizationGuard, TDPOStableDiffusionPipeline, TDPOTrainer
from tdpo_trl.tiny_models import mean_brightness, tiny_stable_diffusion


def darkness(images, prompts=None, metadata=None):
    return 1 - images.mean(dim=(1, 2, 3)), {}  # falls exactly as the brightness target rises


def make_trainer(tmp_path, guard, **overrides):
    config = tiny_config(tmp_path, eval_freq=1, eval_num_prompts=4, **overrides)
    pipeline = TDPOStableDiffusionPipeline(tiny_stable_diffusion(seed=0), use_lora=True)
    return TDPOTrainer(
        config, mean_brightness, cat_prompt, pipeline, callbacks=[guard], eval_reward_functions={"darkness": darkness}
    )


HISTORY = [  # (held-out target, judge): start 0.30 / 1.00, tolerance 0.05
    (0.32, 0.99),  # fine
    (0.35, 0.97),  # fine, best so far
    (0.40, 0.90),  # the judge fell 0.10 while the target rose: flagged
    (0.42, 0.96),  # fine again, and the best target
]


@pytest.mark.parametrize("action, stop_after, kept", [("stop", 2, 1), ("mark", None, 3)])
def test_the_guard_flags_a_constructed_history_and_keeps_the_right_weights(tmp_path, action, stop_after, kept):
    guard = OverOptimizationGuard({"darkness": 0.05}, action=action)
    trainer = make_trainer(tmp_path, guard)
    guard.start = {"target": 0.30, "darkness": 1.00}
    guard._keep(trainer, -1, 0.30)
    name, parameter = next((n, p) for n, p in trainer.trained_parameters() if "lora_B" in n)
    logged = []
    for epoch, (target, judge) in enumerate(HISTORY):
        with torch.no_grad():
            parameter.fill_(epoch)  # weights that say which epoch they belong to
        metrics = {"heldout/target/mean": target, "heldout/darkness/mean": judge}
        guard.on_epoch_end(trainer, epoch=epoch, metrics=metrics)
        logged.append(metrics)
        if trainer.should_stop:
            break
    assert [m["guard/flagged"] for m in logged] == [0, 0, 1, 0][: len(logged)]
    assert logged[2]["guard/darkness/drop"] == pytest.approx(0.10)
    assert trainer.should_stop == (action == "stop") and (stop_after is None or len(logged) == stop_after + 1)
    assert guard.kept_epoch == kept and guard.flagged["epoch"] == 2
    assert torch.equal(guard.kept_weights[name], torch.full_like(parameter, kept))
    assert "flagged epoch 2" in guard.explanation() and "`darkness` fell 0.1 (tolerance 0.05)" in guard.explanation()

    trainer.save_pretrained(tmp_path / "saved")
    lora = load_file(tmp_path / "saved" / "pytorch_lora_weights.safetensors")
    saved = lora[name.replace("lora_B.default", "lora.up")]  # the same tensor, in diffusers' naming
    assert torch.equal(saved, torch.full_like(saved, kept))
    assert torch.equal(parameter, torch.full_like(parameter, len(logged) - 1))  # the trainer's weights are restored
    card = (tmp_path / "saved" / "README.md").read_text()
    assert f"These weights are those of epoch {kept}" in card


def test_the_guard_reads_the_held_out_evaluation_during_training(tmp_path):
    guard = OverOptimizationGuard({"darkness": 1.0}, action="mark")
    trainer = make_trainer(tmp_path, guard, num_epochs=2, save_freq=1)
    trainer.train()
    assert set(guard.start) == {"target", "darkness"}
    assert guard.start["target"] + guard.start["darkness"] == pytest.approx(1.0, abs=1e-6)  # one is 1 - the other
    record = trainer.log_history[-1]
    assert record["guard/flagged"] == 0 and record["guard/kept_epoch"] in (-1, 0, 1)
    assert record["guard/darkness/drop"] == pytest.approx(
        record["heldout/target/mean"] - guard.start["target"], abs=1e-5
    )
    resumed = make_trainer(
        tmp_path, OverOptimizationGuard({"darkness": 1.0}, action="mark"), num_epochs=2,
        resume_from=str(tmp_path / "logs" / "test"),
    )  # fmt: skip
    assert resumed._guard().start == guard.start and resumed._guard().kept_epoch == guard.kept_epoch


def test_bad_guard_settings_are_named(tmp_path):
    with pytest.raises(ValueError, match="tolerance of 'x' must be a finite number >= 0, got -1"):
        OverOptimizationGuard({"x": -1})
    with pytest.raises(ValueError, match="`action` must be 'stop' or 'mark', got 'halt'"):
        OverOptimizationGuard({"x": 0.1}, action="halt")
    trainer = make_trainer(tmp_path, OverOptimizationGuard({"accuracy": 0.1}))
    with pytest.raises(ValueError, match=r"judges \['accuracy'\] are not among the eval rewards \['darkness'\]"):
        trainer.train()


def test_tdpo_trl_train_takes_the_guard(tmp_path):
    from tdpo_trl.commands import train

    base = ["--pretrained_model", "tiny", "--num_epochs", "2", "--logdir", str(tmp_path), "--eval_num_prompts", "2"]
    judged = [*base, "--eval_freq", "1", "--eval_reward_functions", "jpeg_compressibility"]
    trainer = train.cli(
        [
            *judged,
            "--guard",
            '{"jpeg_compressibility": 1000}',
            "--guard_action",
            "stop",
            "--save_dir",
            str(tmp_path / "s"),
        ]
    )
    guard = trainer._guard()
    assert guard.tolerances == {"jpeg_compressibility": 1000} and guard.action == "stop"
    assert set(guard.start) == {"target", "jpeg_compressibility"}
    assert [r["guard/flagged"] for r in trainer.log_history] == [0, 0]  # nothing falls by 1000 kB
    assert (tmp_path / "s" / "unet").is_dir()  # the tiny model trains the whole UNet
    assert train.build_trainer(*train.parse_args(base))._guard() is None  # no --guard, no guard

    with pytest.raises(ValueError, match="`guard`: tolerance of 'jpeg_compressibility' must be a finite number >= 0"):
        train.parse_args([*judged, "--guard", '{"jpeg_compressibility": -1}'])
    with pytest.raises(ValueError, match="`guard`: `action` must be 'stop' or 'mark', got 'halt'"):
        train.parse_args([*judged, "--guard", '{"jpeg_compressibility": 1}', "--guard_action", "halt"])
    with pytest.raises(ValueError, match=r"reads the held-out evaluation: set --eval_freq > 0"):
        train.build_trainer(*train.parse_args([*base, "--guard", '{"jpeg_compressibility": 1}']))
    with pytest.raises(ValueError, match=r"--guard judges \['realism'\] are not among --eval_reward_functions"):
        train.build_trainer(*train.parse_args([*judged, "--guard", '{"realism": 1}']))


def test_in_a_multi_task_run_the_guard_watches_the_task_it_names(tmp_path):
    from test_tasks import two_tasks

    def run(guard, **overrides):
        config = tiny_config(tmp_path, eval_freq=1, eval_num_prompts=4, num_epochs=1, **overrides)
        pipeline = TDPOStableDiffusionPipeline(tiny_stable_diffusion(seed=0), use_lora=True)
        trainer = TDPOTrainer(
            config,
            None,
            None,
            pipeline,
            tasks=two_tasks(),
            callbacks=[guard],
            eval_reward_functions={"darkness": darkness},
        )
        trainer.train()
        return trainer

    guard = OverOptimizationGuard({"darkness": 1.0}, action="mark", task="bright")
    record = run(guard).log_history[-1]
    # the "bright" task's target is mean brightness: its start and drop read that task's held-out keys
    assert guard.start["target"] + guard.start["darkness"] == pytest.approx(1.0, abs=1e-6)
    assert record["guard/darkness/drop"] == pytest.approx(
        record["task/bright/heldout/target/mean"] - guard.start["target"], abs=1e-5
    )
    assert record["guard/flagged"] == 0 and "task/left/heldout/target/mean" in record

    with pytest.raises(ValueError, match=r"multi-task run needs `task`, one of \['bright', 'left'\]"):
        run(OverOptimizationGuard({"darkness": 1.0}))
    with pytest.raises(ValueError, match=r"task 'dark' is not among the trainer's tasks \['bright', 'left'\]"):
        run(OverOptimizationGuard({"darkness": 1.0}, task="dark"))
