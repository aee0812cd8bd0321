"""Callback hooks of TDPOTrainer and the neuron reset in real (tiny) training runs."""

import os

import pytest
import torch
from conftest import cat_prompt, tiny_config
from transformers import TrainerCallback

from tdpo_trl import ActiveNeuronResetCallback, TDPOCallback, TDPOStableDiffusionPipeline, TDPOTrainer
from tdpo_trl.tiny_models import mean_brightness, tiny_stable_diffusion


class RecordingCallback(TDPOCallback):
    def __init__(self):
        self.events = []

    def _record(self, name, kwargs):
        self.events.append((name, kwargs))

    def on_train_begin(self, trainer, **kwargs):
        self._record("on_train_begin", kwargs)

    def on_epoch_begin(self, trainer, **kwargs):
        self._record("on_epoch_begin", kwargs)

    def on_step_end(self, trainer, **kwargs):
        self._record("on_step_end", kwargs)

    def on_epoch_end(self, trainer, **kwargs):
        self._record("on_epoch_end", {**kwargs, "feature_shape": tuple(kwargs["samples"]["critic_features"].shape)})
        kwargs["metrics"]["custom/epoch_twice"] = 2 * kwargs["epoch"]

    def on_log(self, trainer, **kwargs):
        self._record("on_log", kwargs)

    def on_save(self, trainer, **kwargs):
        self._record("on_save", {**kwargs, "exists": os.path.isdir(kwargs["output_dir"])})

    def on_train_end(self, trainer, **kwargs):
        self._record("on_train_end", kwargs)


def test_a_user_callback_receives_every_event_in_order(tmp_path, tiny_pipeline):
    recorder = RecordingCallback()
    config = tiny_config(tmp_path, num_epochs=2, save_freq=1)
    trainer = TDPOTrainer(config, mean_brightness, cat_prompt, tiny_pipeline, callbacks=[recorder])
    trainer.train()

    steps_per_epoch = 4 * 4  # 4 timestep positions x 4 minibatches, one optimizer step each (TDPO)
    per_epoch = ["on_epoch_begin"] + ["on_step_end"] * steps_per_epoch + ["on_epoch_end", "on_log", "on_save"]
    assert [name for name, _ in recorder.events] == ["on_train_begin"] + per_epoch * 2 + ["on_train_end"]

    step_ends = [kw for name, kw in recorder.events if name == "on_step_end"]
    assert [kw["global_step"] for kw in step_ends] == list(range(1, 2 * steps_per_epoch + 1))
    assert [kw["epoch"] for kw in step_ends] == [0] * steps_per_epoch + [1] * steps_per_epoch
    epoch_ends = [kw for name, kw in recorder.events if name == "on_epoch_end"]
    assert [kw["epoch"] for kw in epoch_ends] == [0, 1]
    assert epoch_ends[0]["feature_shape"] == (8, 4, 4 * 8 * 8)  # (samples, steps, latent features)
    assert all(kw["exists"] for name, kw in recorder.events if name == "on_save")
    # a metric added in on_epoch_end is logged with the epoch's record
    assert [record["custom/epoch_twice"] for record in trainer.log_history] == [0, 2]
    logs = [kw["logs"] for name, kw in recorder.events if name == "on_log"]
    assert logs == trainer.log_history
    assert recorder.events[-1][1] == {"epoch": 2, "global_step": 2 * steps_per_epoch}


def test_neuron_reset_follows_its_frequency_in_a_training_run(tmp_path, tiny_pipeline):
    config = tiny_config(tmp_path, num_epochs=4, neuron_reset_frequency=2)
    trainer = TDPOTrainer(config, mean_brightness, cat_prompt, tiny_pipeline)
    (callback,) = [c for c in trainer.callbacks if isinstance(c, ActiveNeuronResetCallback)]
    head = trainer.accelerator.unwrap_model(trainer.critic_head)
    weights = []
    for epoch in range(4):
        trainer.train(epochs=epoch + 1)
        weights.append(head[0].weight.detach().clone())

    history = trainer.log_history
    assert [r["neurons/reset_count"] for r in history] == [0, 1, 1, 2]
    reset = [r["neurons/reset_neurons"] for r in history]
    assert reset[0] == reset[2] == 0 and reset[1] > 0 and reset[3] > 0
    assert callback.reset_count == 2
    for record in history:
        assert 0.0 <= record["neurons/dormant_fraction"] <= 1.0
        assert record["neurons/active_fraction"] == pytest.approx(1 - record["neurons/dormant_fraction"])
        assert {"neurons/layer_0/dormant_fraction", "neurons/layer_1/dormant_fraction"} <= record.keys()
    # after a reset epoch the re-drawn rows are N(0, 1/(d+1)) again: far from the trained values
    init_std = head.init_std
    assert abs(weights[1].std().item() / init_std - 1) < 0.1


def fresh_pipeline():
    return TDPOStableDiffusionPipeline(tiny_stable_diffusion(seed=0), use_lora=True)


@pytest.mark.parametrize("overrides", [{"use_critic": False}, {"neuron_reset": False}])
def test_neuron_reset_is_off_in_ddpo_mode_and_when_disabled(tmp_path, tiny_pipeline, overrides):
    trainer = TDPOTrainer(tiny_config(tmp_path, num_epochs=1, **overrides), mean_brightness, cat_prompt, tiny_pipeline)
    assert not trainer.callbacks
    trainer.train()
    assert not any(key.startswith("neurons/") for key in trainer.log_history[-1])


def test_a_given_reset_callback_replaces_the_configured_one(tmp_path, tiny_pipeline):
    mine = ActiveNeuronResetCallback(frequency=3, target="dormant")
    trainer = TDPOTrainer(tiny_config(tmp_path), mean_brightness, cat_prompt, tiny_pipeline, callbacks=[mine])
    assert trainer.callbacks == [mine]


def test_bad_callbacks_are_rejected(tmp_path, tiny_pipeline):
    with pytest.raises(TypeError, match="subclass tdpo_trl.TDPOCallback instead"):
        TDPOTrainer(tiny_config(tmp_path), mean_brightness, cat_prompt, tiny_pipeline, callbacks=[TrainerCallback()])
    with pytest.raises(ValueError, match="ActiveNeuronResetCallback was given, but `config.use_critic` is False"):
        TDPOTrainer(
            tiny_config(tmp_path, use_critic=False),
            mean_brightness,
            cat_prompt,
            tiny_pipeline,
            callbacks=[ActiveNeuronResetCallback()],
        )
    trainer = TDPOTrainer(tiny_config(tmp_path, neuron_reset=False), mean_brightness, cat_prompt, tiny_pipeline)
    trainer.add_callback(RecordingCallback)  # a class is instantiated, as transformers does
    assert isinstance(trainer.callbacks[-1], RecordingCallback)


def test_reset_state_travels_with_checkpoints(tmp_path, tiny_pipeline):
    config = tiny_config(tmp_path, num_epochs=2, save_freq=1, neuron_reset_frequency=1)
    first = TDPOTrainer(config, mean_brightness, cat_prompt, tiny_pipeline)
    first.train()
    (callback,) = first.callbacks
    assert callback.reset_count == 2
    expected_draw = torch.rand(4, generator=torch.Generator().set_state(callback.generator().get_state()))

    resumed_config = tiny_config(
        tmp_path, num_epochs=2, save_freq=1, neuron_reset_frequency=1, resume_from=str(tmp_path / "logs" / "test")
    )
    resumed = TDPOTrainer(resumed_config, mean_brightness, cat_prompt, fresh_pipeline())
    (restored,) = resumed.callbacks
    assert restored.reset_count == 2
    assert [m.tolist() for m in restored.dormant_masks] == [m.tolist() for m in callback.dormant_masks]
    assert torch.equal(torch.rand(4, generator=restored.generator()), expected_draw)
