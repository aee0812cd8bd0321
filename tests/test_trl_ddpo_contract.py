"""TRL 0.23.1's own DDPO tests (`tests/test_ddpo_trainer.py` of its source distribution), restated against
`TDPOTrainer` / `TDPOConfig` / `TDPOStableDiffusionPipeline` in DDPO mode (`use_critic=False`), with and without LoRA.

What changed from TRL's file: the Hub model `hf-internal-testing/tiny-stable-diffusion-torch` is a local tiny Stable
Diffusion with the same roles (built by `tiny_models.tiny_stable_diffusion`), so the shape asserts read that model's
sizes; pytest fixtures replace `unittest` set-up. Code written against `DDPOTrainer` runs unchanged on the subclass.
"""

import pytest
import torch
from trl import DDPOConfig, DDPOTrainer
from trl.models import DDPOStableDiffusionPipeline

from tdpo_trl import TDPOConfig, TDPOStableDiffusionPipeline, TDPOTrainer


def scorer_function(images, prompts, metadata):
    return torch.randn(1) * 3.0, {}


def prompt_function():
    return ("cabbages", {})


@pytest.fixture(params=[False, True], ids=["full", "lora"])
def trainer(request, tmp_path, monkeypatch, tiny_sd_path):
    monkeypatch.chdir(tmp_path)  # TRL's tests run in a temporary folder: `logdir` is relative
    training_args = TDPOConfig(
        num_epochs=2,
        train_gradient_accumulation_steps=1,
        per_prompt_stat_tracking_buffer_size=32,
        sample_num_batches_per_epoch=2,
        sample_batch_size=2,
        mixed_precision=None,
        save_freq=1000000,
        use_critic=False,
    )
    pipeline = TDPOStableDiffusionPipeline(tiny_sd_path, pretrained_model_revision="main", use_lora=request.param)
    return TDPOTrainer(training_args, scorer_function, prompt_function, pipeline)


def test_the_subclass_is_trls(trainer):
    assert isinstance(trainer, DDPOTrainer) and isinstance(trainer.config, DDPOConfig)
    assert isinstance(trainer.sd_pipeline, DDPOStableDiffusionPipeline)


def test_loss(trainer):
    advantage = torch.tensor([-1.0])
    clip_range = 0.0001
    ratio = torch.tensor([1.0])
    loss = trainer.loss(advantage, clip_range, ratio)
    assert loss.item() == 1.0


def test_generate_samples(trainer):
    samples, output_pairs = trainer._generate_samples(1, 2)
    assert len(samples) == 1
    assert len(output_pairs) == 1
    assert len(output_pairs[0][0]) == 2


def test_calculate_loss(trainer, tiny_sd_path):
    samples, _ = trainer._generate_samples(1, 2)
    sample = samples[0]

    latents = sample["latents"][0, 0].unsqueeze(0)
    next_latents = sample["next_latents"][0, 0].unsqueeze(0)
    log_probs = sample["log_probs"][0, 0].unsqueeze(0)
    timesteps = sample["timesteps"][0, 0].unsqueeze(0)
    prompt_embeds = sample["prompt_embeds"]
    advantage = torch.tensor([1.0], device=prompt_embeds.device)

    unet, text_encoder = trainer.sd_pipeline.unet.config, trainer.sd_pipeline.text_encoder.config
    size = unet.sample_size  # TRL's hub model: 64; here the tiny model's
    assert tuple(latents.shape) == (1, unet.in_channels, size, size)
    assert tuple(next_latents.shape) == (1, unet.in_channels, size, size)
    assert tuple(log_probs.shape) == (1,)
    assert tuple(timesteps.shape) == (1,)
    assert tuple(prompt_embeds.shape) == (2, trainer.sd_pipeline.tokenizer.model_max_length, text_encoder.hidden_size)
    loss, approx_kl, clipfrac = trainer.calculate_loss(
        latents, timesteps, next_latents, log_probs, advantage, prompt_embeds
    )

    assert torch.isfinite(loss.cpu())
