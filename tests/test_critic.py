import pytest
import torch
from torch import nn

from tdpo_trl import (
    CLIPImageFeatures,
    LatentFeatures,
    TDPOConfig,
    TDPOStableDiffusionPipeline,
    TimestepCritic,
    ValueHead,
)
from tdpo_trl.tiny_models import tiny_clip_vision_model, tiny_stable_diffusion


def test_value_head_matches_the_paper_shape_and_init():
    torch.manual_seed(0)
    head = ValueHead(768)
    linears = head.linear_layers
    assert [(m.in_features, m.out_features) for m in linears] == [
        (768, 1024),
        (1024, 128),
        (128, 64),
        (64, 16),
        (16, 1),
    ]
    assert [m.p for m in head if isinstance(m, nn.Dropout)] == [0.2, 0.2, 0.1]
    assert not any(isinstance(m, (nn.ReLU, nn.GELU)) for m in head)  # no nonlinearity, as the LAION head
    assert all(torch.all(m.bias == 0) for m in linears)
    assert linears[0].weight.std().item() == pytest.approx(1 / 769, rel=0.02)
    assert head(torch.randn(3, 5, 768)).shape == (3, 5)


def test_value_head_with_activation():
    head = ValueHead(8, hidden_sizes=(4,), dropout=(0.0,), activation="relu")
    assert isinstance(head[1], nn.ReLU)
    with pytest.raises(ValueError, match="activation must be 'none' or one of .* got 'swish'"):
        ValueHead(8, hidden_sizes=(4,), dropout=(0.0,), activation="swish")


def test_latent_features_are_l2_normalized_flat_latents():
    encoder = LatentFeatures((4, 8, 8))
    features = encoder(torch.randn(3, 4, 8, 8))
    assert encoder.feature_dim == 256 and features.shape == (3, 256)
    torch.testing.assert_close(features.norm(dim=-1), torch.ones(3))


def test_clip_features_decode_the_latents_first(tiny_clip_path):
    pipe = tiny_stable_diffusion()
    config = TDPOConfig(critic_encoder=tiny_clip_path, critic_hidden_sizes=[8], critic_dropout=[0.0])
    critic = TimestepCritic.from_config(config, latent_shape=(4, 8, 8))
    assert isinstance(critic.encoder, CLIPImageFeatures) and critic.needs_pixels
    assert critic.head.input_dim == 16  # the tiny CLIP's projection_dim

    latents = torch.randn(5, 4, 8, 8)
    features = critic.encode(latents, TDPOStableDiffusionPipeline(pipe).decode, batch_size=2)  # the family's decoding
    assert features.shape == (5, 16)
    torch.testing.assert_close(features.norm(dim=-1), torch.ones(5))
    # the same as decoding by hand and embedding
    images = (pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(features, critic.encoder(images))
    with pytest.raises(ValueError, match="pass `decode` \\(the pipeline's `decode`\\)"):
        critic.encode(latents)


def test_any_module_with_feature_dim_can_be_the_encoder():
    class MeanColour(nn.Module):
        feature_dim = 3
        needs_pixels = True

        def forward(self, images):
            return images.mean(dim=(2, 3))

    critic = TimestepCritic(MeanColour(), hidden_sizes=(4,), dropout=(0.0,))
    pipe = tiny_stable_diffusion()
    assert critic(torch.randn(2, 4, 8, 8), TDPOStableDiffusionPipeline(pipe).decode).shape == (2,)
    with pytest.raises(ValueError, match="no `feature_dim`"):
        TimestepCritic(nn.Identity())


def test_encoder_is_frozen_and_only_the_head_trains():
    critic = TimestepCritic(CLIPImageFeatures(tiny_clip_vision_model()), hidden_sizes=(8,), dropout=(0.0,))
    assert not any(p.requires_grad for p in critic.encoder.parameters())
    assert all(p.requires_grad for p in critic.head.parameters())


def test_critic_fits_a_synthetic_value_target():
    torch.manual_seed(0)
    critic = TimestepCritic(LatentFeatures((4, 8, 8)), hidden_sizes=(64, 16), dropout=(0.0, 0.0))
    latents = torch.randn(256, 4, 8, 8)
    features = critic.encode(latents)
    direction = torch.randn(256)
    targets = features @ direction  # a value that is linear in the features
    optimizer = torch.optim.AdamW(critic.head.parameters(), lr=1e-3)
    losses = []
    for _ in range(300):
        loss = 0.5 * (critic.head(features) - targets).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 10, (losses[0], losses[-1])


def test_critic_decoder_decodes_x_t_for_the_critic_instead_of_the_vae(tmp_path, tiny_clip_path, monkeypatch):
    from conftest import tiny_config
    from diffusers import AutoencoderTiny

    from tdpo_trl import TDPOStableDiffusionPipeline, TDPOTrainer
    from tdpo_trl.tiny_models import mean_brightness, tiny_autoencoder_tiny

    tiny_autoencoder_tiny().save_pretrained(tmp_path / "taesd")
    calls = {"vae": 0, "taesd": 0}

    def count(name, decode):
        def counted(*args, **kwargs):
            calls[name] += 1
            return decode(*args, **kwargs)

        return counted

    def sample(critic_decoder):
        config = tiny_config(tmp_path, critic_encoder=tiny_clip_path, critic_decoder=critic_decoder,
                             run_name=critic_decoder or "vae", critic_encode_batch_size=4)  # fmt: skip
        pipeline = TDPOStableDiffusionPipeline(tiny_stable_diffusion(), use_lora=True)
        trainer = TDPOTrainer(config, mean_brightness, lambda: ("a cat", {}), pipeline)
        pipeline.vae.decode = count("vae", pipeline.vae.decode)
        calls.update(vae=0, taesd=0)
        samples, _ = trainer._generate_samples(1, 4)  # 4 samples x 4 steps = 16 x_t, 4 per critic batch
        return dict(calls), samples[0]["critic_features"]

    monkeypatch.setattr(AutoencoderTiny, "decode", count("taesd", AutoencoderTiny.decode))  # the critic decoder's
    with_vae, vae_features = sample("")
    assert with_vae == {"vae": 1 + 4, "taesd": 0}  # the final images, and every x_t for the critic
    with_taesd, taesd_features = sample(str(tmp_path / "taesd"))
    assert with_taesd == {"vae": 1, "taesd": 4}  # the VAE decodes only the images the reward scores
    assert taesd_features.shape == vae_features.shape and not torch.allclose(taesd_features, vae_features)
    with pytest.raises(ValueError, match="critic_decoder"):
        tiny_config(tmp_path, critic_decoder=str(tmp_path / "missing-taesd"))


def test_the_critic_embeds_only_the_steps_that_will_be_trained(tmp_path):
    from collections import defaultdict

    from conftest import tiny_config

    from tdpo_trl import TDPOStableDiffusionPipeline, TDPOTrainer
    from tdpo_trl.tiny_models import left_minus_right_brightness

    def collect(**overrides):
        config = tiny_config(tmp_path, gamma=0.9, **overrides)  # 4 steps; gamma < 1 tells the steps' returns apart
        trainer = TDPOTrainer(config, left_minus_right_brightness, lambda: ("a cat", {}),
                              TDPOStableDiffusionPipeline(tiny_stable_diffusion(), use_lora=True))  # fmt: skip
        encoded = []
        encode = trainer.critic.encode
        trainer.critic.encode = lambda latents, *a, **k: encoded.append(len(latents)) or encode(latents, *a, **k)
        samples, _ = trainer._collect(0, 0, 0, defaultdict(float))
        return trainer, samples, sum(encoded)

    _, full, full_rows = collect()
    assert full_rows == 8 * 4 and full["returns"].shape == (8, 4)  # every x_t of 8 samples x 4 steps
    trainer, half, half_rows = collect(train_timestep_fraction=0.5, run_name="half")
    assert half_rows == 8 * 2, "only the 2 trained steps of each sample are embedded"
    for key in ("timesteps", "latents", "next_latents", "log_probs", "advantages", "returns", "values"):
        assert half[key].shape[:2] == (8, 2), key
    assert "trained_steps" not in half
    # each kept step carries its own return: G_t = gamma^(T-1-t) * r, t found from the step's timestep
    schedule = trainer.sd_pipeline.scheduler.timesteps.tolist()
    step_index = torch.tensor([[schedule.index(t) for t in row] for row in half["timesteps"].tolist()])
    final = half["returns"][torch.arange(8), step_index.argmax(dim=1)] / 0.9 ** (3 - step_index.max(dim=1).values)
    torch.testing.assert_close(half["returns"], final[:, None] * 0.9 ** (3 - step_index).float())
    assert torch.isfinite(half["advantages"]).all()
    # and the kept latents are the ones sampled at those steps: recomputed log-probs equal the recorded ones
    conditioning = half.conditioning(trainer.negative_conditioning.keys())
    with torch.no_grad():
        for j in range(2):
            _, approx_kl, _ = trainer.calculate_loss(
                half["latents"][:, j], half["timesteps"][:, j], half["next_latents"][:, j], half["log_probs"][:, j],
                torch.ones(8), conditioning,
            )  # fmt: skip
            assert approx_kl.item() == 0.0
