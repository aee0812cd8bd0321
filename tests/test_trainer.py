import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import cat_prompt, tiny_config
from trl import DDPOTrainer

from tdpo_trl import TDPOStableDiffusionPipeline, TDPOTrainer
from tdpo_trl.rollout import Rollout
from tdpo_trl.tiny_models import (
    TINY_TRAINING_DEFAULTS,
    left_minus_right_brightness,
    mean_brightness,
    tiny_stable_diffusion,
)


def lora_state(trainer):
    return {n: p.detach().clone() for n, p in trainer.sd_pipeline.unet.named_parameters() if "lora" in n}


def critic_state(trainer):
    return {n: p.detach().clone() for n, p in trainer.critic.head.named_parameters()}


def test_is_a_ddpo_trainer():
    assert issubclass(TDPOTrainer, DDPOTrainer)
    assert "tdpo" in TDPOTrainer._tag_names


def test_two_epochs_change_every_lora_and_critic_tensor(tmp_path, tiny_pipeline):
    trainer = TDPOTrainer(tiny_config(tmp_path), mean_brightness, cat_prompt, tiny_pipeline)
    lora_before, critic_before = lora_state(trainer), critic_state(trainer)
    assert len(lora_before) == 64  # A and B of to_q, to_k, to_v, to_out.0 in 8 attention layers
    trainer.train()
    for name, value in lora_state(trainer).items():
        assert not torch.equal(value, lora_before[name]), f"LoRA tensor {name} did not change"
    for name, value in critic_state(trainer).items():
        assert not torch.equal(value, critic_before[name]), f"critic tensor {name} did not change"
    frozen = [n for n, p in trainer.sd_pipeline.unet.named_parameters() if p.requires_grad and "lora" not in n]
    assert frozen == []


def test_ddpo_mode_trains_without_a_critic(tmp_path, tiny_pipeline):
    trainer = TDPOTrainer(tiny_config(tmp_path, use_critic=False), mean_brightness, cat_prompt, tiny_pipeline)
    assert trainer.critic is None
    before = lora_state(trainer)
    trainer.train()
    assert all(not torch.equal(v, before[n]) for n, v in lora_state(trainer).items())
    assert not any(key.startswith("critic/") for key in trainer.log_history[-1])


def test_logged_metrics_are_namespaced_and_finite(tmp_path, tiny_pipeline):
    trainer = TDPOTrainer(tiny_config(tmp_path, num_epochs=1), mean_brightness, cat_prompt, tiny_pipeline)
    trainer.train()
    (record,) = trainer.log_history
    expected = {
        "policy/loss", "policy/approx_kl", "policy/clipfrac", "critic/loss", "critic/value_mean",
        "critic/explained_variance", "advantage/mean", "advantage/std", "reward/mean", "reward/std",
        "time/sampling_s", "time/reward_s", "time/training_s", "time/epoch_s",
    }  # fmt: skip
    assert expected <= set(record)
    for key in expected:
        assert math.isfinite(record[key]), (key, record[key])
    assert record["advantage/mean"] == pytest.approx(0.0, abs=1e-5)  # normalized over all (sample, step) entries
    assert record["advantage/std"] == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize(
    "use_critic, accumulation, expected_steps",
    [
        (True, 1, 4 * 4),  # 4 timestep positions x 4 minibatches
        (True, 2, 4 * 4 // 2),
        (False, 1, 4),  # DDPO: one step per minibatch, accumulated over its 4 timesteps
        (False, 2, 2),
    ],
)
def test_optimizer_steps_per_epoch(tmp_path, tiny_pipeline, use_critic, accumulation, expected_steps):
    config = tiny_config(tmp_path, num_epochs=1, use_critic=use_critic, train_gradient_accumulation_steps=accumulation)
    trainer = TDPOTrainer(config, mean_brightness, cat_prompt, tiny_pipeline)
    trainer.train()
    assert trainer.log_history[-1]["step"] == expected_steps


def test_update_order_is_timestep_major_for_tdpo_and_sample_major_for_ddpo(tmp_path, tiny_pipeline):
    trainer = TDPOTrainer(tiny_config(tmp_path, sample_num_steps=2), mean_brightness, cat_prompt, tiny_pipeline)
    assert trainer._update_order(3) == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    trainer.critic = None  # the order DDPO mode uses
    assert trainer._update_order(3) == [(0, 0), (1, 0), (0, 1), (1, 1), (0, 2), (1, 2)]


def test_critic_features_are_computed_at_sampling_and_never_in_training(tmp_path, tiny_pipeline):
    trainer = TDPOTrainer(tiny_config(tmp_path, num_epochs=1), mean_brightness, cat_prompt, tiny_pipeline)
    calls = []
    forward = trainer.critic.encoder.forward
    trainer.critic.encoder.forward = lambda x: calls.append(x.shape[0]) or forward(x)
    train_batched = trainer._train_batched_samples

    def spy(*args, **kwargs):
        seen = len(calls)
        result = train_batched(*args, **kwargs)
        assert len(calls) == seen, "the critic encoder ran during training"
        return result

    trainer._train_batched_samples = spy
    trainer.train()
    assert sum(calls) == 8 * 4  # every (sample, step) latent encoded exactly once


def test_advantages_are_returns_minus_sampled_values(tmp_path, tiny_pipeline):
    config = tiny_config(tmp_path, gamma=0.5, normalize_temporal_advantages=False)
    trainer = TDPOTrainer(config, mean_brightness, cat_prompt, tiny_pipeline)
    values = torch.tensor([[0.1, 0.2, 0.3], [0.0, -0.5, 1.0]])
    samples = Rollout({"timesteps": torch.zeros(2, 3, dtype=torch.long), "values": values})
    samples, stats = trainer._compute_advantages(samples, np.array([1.0, -1.0]))
    returns = torch.tensor([[0.25, 0.5, 1.0], [-0.25, -0.5, -1.0]])
    torch.testing.assert_close(samples["returns"], returns)
    torch.testing.assert_close(samples["advantages"], returns - values)
    assert stats["critic/value_mean"] == pytest.approx(values.mean().item())


def test_nonfinite_rewards_give_zero_advantage(tmp_path, tiny_pipeline):
    trainer = TDPOTrainer(tiny_config(tmp_path, use_critic=False), mean_brightness, cat_prompt, tiny_pipeline)
    normalized = trainer._normalized_rewards(np.array([1.0, np.nan, 3.0, np.inf]), None, epoch=0)
    np.testing.assert_allclose(normalized, [-1.0, 0.0, 1.0, 0.0], atol=1e-6)
    with pytest.raises(ValueError, match="every reward of epoch 3 is NaN or infinite"):
        trainer._normalized_rewards(np.array([np.nan, np.nan]), None, epoch=3)


def test_clip_critic_end_to_end(tmp_path, tiny_pipeline, tiny_clip_path):
    config = tiny_config(
        tmp_path, num_epochs=1, critic_encoder=tiny_clip_path, critic_hidden_sizes=[8], critic_dropout=[0.1]
    )
    trainer = TDPOTrainer(config, mean_brightness, cat_prompt, tiny_pipeline)
    before = critic_state(trainer)
    trainer.train()
    assert trainer.critic.head.input_dim == 16
    assert all(not torch.equal(v, before[n]) for n, v in critic_state(trainer).items())


def test_checkpoints_with_default_settings_and_resume(tmp_path):
    config = tiny_config(tmp_path, save_freq=1, num_checkpoint_limit=2, num_epochs=3)
    trainer = TDPOTrainer(config, mean_brightness, cat_prompt, TDPOStableDiffusionPipeline(tiny_stable_diffusion()))
    trainer.train()
    folder = tmp_path / "logs" / "test" / "checkpoints"
    assert sorted(os.listdir(folder)) == ["checkpoint_1", "checkpoint_2"]  # rotated to num_checkpoint_limit
    files = set(os.listdir(folder / "checkpoint_2"))
    assert {"pytorch_lora_weights.safetensors", "model.safetensors", "optimizer.bin", "optimizer_1.bin"} <= files

    with pytest.raises(
        ValueError, match=r"already holds checkpoints \(checkpoint_2 is the latest\); set `resume_from`"
    ):
        TDPOTrainer(config, mean_brightness, cat_prompt, TDPOStableDiffusionPipeline(tiny_stable_diffusion()))

    config = tiny_config(
        tmp_path, save_freq=1, num_checkpoint_limit=2, num_epochs=3, resume_from=str(tmp_path / "logs" / "test")
    )
    resumed = TDPOTrainer(config, mean_brightness, cat_prompt, TDPOStableDiffusionPipeline(tiny_stable_diffusion()))
    assert resumed.first_epoch == 3 and resumed.progress.global_step == trainer.progress.global_step
    for name, value in lora_state(trainer).items():
        torch.testing.assert_close(lora_state(resumed)[name], value, rtol=0, atol=0)
    for name, value in critic_state(trainer).items():
        torch.testing.assert_close(critic_state(resumed)[name], value, rtol=0, atol=0)


def test_critic_with_ddpo_mode_is_rejected(tmp_path, tiny_pipeline):
    from tdpo_trl import LatentFeatures, TimestepCritic

    critic = TimestepCritic(LatentFeatures((4, 8, 8)), hidden_sizes=(8,), dropout=(0.0,))
    with pytest.raises(ValueError, match="`config.use_critic` is False"):
        TDPOTrainer(tiny_config(tmp_path, use_critic=False), mean_brightness, cat_prompt, tiny_pipeline, critic=critic)


def test_pipeline_builds_from_a_path_before_any_accelerator(tiny_sd_path):
    # A fresh interpreter, so that no accelerate state exists (TRL's pipeline raises RuntimeError here).
    code = (
        "import sys; from tdpo_trl import TDPOStableDiffusionPipeline as P;"
        "p = P(sys.argv[1], use_lora=True); print(type(p.get_trainable_layers()).__name__)"
    )
    result = subprocess.run([sys.executable, "-c", code, tiny_sd_path], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("UNet2DConditionModel")


def test_scheduler_ending_at_t0_is_rejected():
    pipe = tiny_stable_diffusion()
    pipe.scheduler.register_to_config(steps_offset=0)
    with pytest.raises(ValueError, match="steps_offset=0, so DDIM sampling ends at t=0"):
        TDPOStableDiffusionPipeline(pipe)


def test_left_minus_right_brightness():
    images = torch.zeros(2, 3, 4, 4)
    images[0, :, :, :2] = 1.0  # left half white
    images[1, :, :, 2:] = 0.5  # right half grey
    rewards, _ = left_minus_right_brightness(images, ("a", "b"), ({}, {}))
    torch.testing.assert_close(rewards, torch.tensor([1.0, -0.5]))


def test_tdpo_raises_a_learnable_reward(tmp_path):
    # The settings of the README's main job (full UNet, 64 samples x 4 steps per epoch); see TINY_TRAINING_DEFAULTS.
    config = tiny_config(tmp_path, num_epochs=8, **TINY_TRAINING_DEFAULTS)
    pipeline = TDPOStableDiffusionPipeline(tiny_stable_diffusion(), use_lora=False)
    trainer = TDPOTrainer(config, left_minus_right_brightness, cat_prompt, pipeline)
    trainer.train()
    means = [record["reward/mean"] for record in trainer.log_history]
    first, spread = means[0], trainer.log_history[0]["reward/std"]
    last = sum(means[-2:]) / 2
    print(f"reward mean per epoch {[round(m, 4) for m in means]}, first-epoch spread {spread:.4f}")
    assert last - first > spread, f"reward mean {first:.4f} -> {last:.4f} did not rise by one spread ({spread:.4f})"


def test_sampling_without_guidance_recomputes_exact_log_probs(tmp_path, tiny_pipeline):
    """guidance_scale <= 1: TRL's SD sampler cannot (it concatenates the negative prompt anyway); the shared DDIM loop
    samples, and the update recomputes the same log-probs."""
    config = tiny_config(tmp_path, sample_guidance_scale=1.0)
    trainer = TDPOTrainer(config, mean_brightness, cat_prompt, tiny_pipeline)
    (sample,), _ = trainer._generate_samples(1, 4)
    conditioning = sample.conditioning(trainer.negative_conditioning.keys())
    with torch.no_grad():
        for j in range(config.sample_num_steps):
            _, approx_kl, _ = trainer.calculate_loss(
                sample["latents"][:, j], sample["timesteps"][:, j], sample["next_latents"][:, j],
                sample["log_probs"][:, j], torch.ones(4), conditioning,
            )  # fmt: skip
            assert approx_kl.item() == 0.0


def test_per_prompt_normalization_uses_ddpo_tracker(tmp_path, tiny_pipeline):
    config = tiny_config(tmp_path, per_prompt_stat_tracking=True, per_prompt_stat_tracking_min_count=2)
    trainer = TDPOTrainer(config, mean_brightness, cat_prompt, tiny_pipeline)
    prompt_ids = trainer.sd_pipeline.tokenize(["a cat", "a dog", "a cat", "a dog"])
    normalized = trainer._normalized_rewards(np.array([1.0, 10.0, 3.0, 30.0]), prompt_ids)
    # each prompt normalized by its own statistics: cat (1, 3) and dog (10, 30)
    np.testing.assert_allclose(normalized, [-1.0, -1.0, 1.0, 1.0], atol=1e-5)


def test_tensorboard_logging_writes_events(tmp_path, tiny_pipeline):
    pytest.importorskip("tensorboard")
    config = tiny_config(tmp_path, num_epochs=1, log_with="tensorboard")
    trainer = TDPOTrainer(config, mean_brightness, cat_prompt, tiny_pipeline)
    trainer.train()
    trainer.accelerator.end_training()
    events = [f for _, _, files in os.walk(tmp_path / "logs" / "test") for f in files if f.startswith("events.out")]
    assert events, "no TensorBoard event file was written"
