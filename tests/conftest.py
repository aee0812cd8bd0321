import os

import pytest
import torch

from tdpo_trl import TDPOConfig, TDPOStableDiffusionPipeline
from tdpo_trl.tiny_models import tiny_clip_vision_model, tiny_stable_diffusion


# Two threads is the machine; keeping torch to them avoids oversubscription when pytest runs subprocesses.
torch.set_num_threads(min(2, os.cpu_count() or 1))


def tiny_config(tmp_path, **overrides) -> TDPOConfig:
    """A TDPOConfig sized for the tiny pipeline: 8 samples x 4 steps per epoch, CPU, fp32."""
    kwargs = dict(
        num_epochs=2,
        sample_num_steps=4,  # 4 DDIM steps keep an epoch under a second
        sample_batch_size=4,
        sample_num_batches_per_epoch=2,  # 8 samples per epoch
        train_batch_size=2,  # 4 minibatches per epoch
        train_learning_rate=3e-3,
        mixed_precision="no",  # CPU
        critic_encoder="latents",  # no image encoder to download
        critic_hidden_sizes=[32, 8],
        critic_dropout=[0.0, 0.0],
        critic_learning_rate=1e-3,
        logdir=str(tmp_path / "logs"),
        run_name="test",
        save_freq=1000,  # checkpoints only where a test asks for them
        seed=0,
    )
    kwargs.update(overrides)
    return TDPOConfig(**kwargs)


def cat_prompt():
    return "a photo of a cat", {}


@pytest.fixture
def tiny_pipeline():
    return TDPOStableDiffusionPipeline(tiny_stable_diffusion(seed=0), use_lora=True)


@pytest.fixture(scope="session")
def tiny_sd_path(tmp_path_factory):
    """The tiny pipeline saved to disk, as a model folder would come from the Hub."""
    path = tmp_path_factory.mktemp("tiny-sd")
    tiny_stable_diffusion(seed=0).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_clip_path(tmp_path_factory):
    """A tiny CLIP vision checkpoint on disk, standing in for openai/clip-vit-large-patch14."""
    path = tmp_path_factory.mktemp("tiny-clip")
    tiny_clip_vision_model(seed=0).save_pretrained(path)
    return str(path)
