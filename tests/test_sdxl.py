"""SDXL through the same trainer: exact log-probs, a learnable reward rises, LoRA save -> diffusers load, resume."""

import pytest
import torch
from conftest import tiny_config
from diffusers import StableDiffusionXLPipeline

from tdpo_trl import TDPOStableDiffusionXLPipeline, TDPOTrainer
from tdpo_trl.evaluation import sample_images
from tdpo_trl.pipeline import LORA_WEIGHT_NAME
from tdpo_trl.tiny_models import TINY_TRAINING_DEFAULTS, left_minus_right_brightness, tiny_stable_diffusion_xl


def cat_prompt():
    return "a photo of a cat", {}


def lora_state(trainer) -> dict[str, torch.Tensor]:
    unet = trainer.accelerator.unwrap_model(trainer.unet)
    return {n: p.detach().clone() for n, p in unet.named_parameters() if p.requires_grad}


def test_sdxl_conditioning_shapes_and_zero_negative_prompt():
    pipeline = TDPOStableDiffusionXLPipeline(tiny_stable_diffusion_xl())
    ids, conditioning = pipeline.encode_prompts(["a cat", "a dog"], "cpu")
    assert ids.shape[0] == 2
    assert {k: tuple(v.shape) for k, v in conditioning.items()} == {
        "prompt_embeds": (2, 16, 64),  # both encoders' hidden states, concatenated
        "pooled_prompt_embeds": (2, 32),
        "add_time_ids": (2, 6),
    }
    assert conditioning["add_time_ids"][0].tolist() == [16, 16, 0, 0, 16, 16]  # native size, no crop
    negative = pipeline.encode_negative_prompt("", "cpu")  # SDXL base: force_zeros_for_empty_prompt
    assert not negative["prompt_embeds"].any() and not negative["pooled_prompt_embeds"].any()
    assert pipeline.encode_negative_prompt("blurry", "cpu")["prompt_embeds"].any()


@pytest.mark.parametrize("use_critic", [True, False], ids=["tdpo", "ddpo"])
def test_sdxl_recomputed_log_probs_equal_the_sampled_ones(tmp_path, use_critic):
    config = tiny_config(tmp_path, use_critic=use_critic, sample_guidance_scale=5.0)
    trainer = TDPOTrainer(config, left_minus_right_brightness, cat_prompt, TDPOStableDiffusionXLPipeline(
        tiny_stable_diffusion_xl()))  # fmt: skip
    samples, _ = trainer._generate_samples(1, 4)
    sample = samples[0]
    assert {"pooled_prompt_embeds", "negative_add_time_ids"} <= set(sample)
    conditioning = trainer._conditioning(sample)
    with torch.no_grad():
        for j in range(config.sample_num_steps):
            _, approx_kl, clipfrac, _ = trainer.calculate_loss(
                sample["latents"][:, j], sample["timesteps"][:, j], sample["next_latents"][:, j],
                sample["log_probs"][:, j], torch.ones(4), conditioning,
            )  # fmt: skip
            assert approx_kl.item() == 0.0 and clipfrac.item() == 0.0, f"step {j}: ratio != 1 before any update"


def test_sdxl_learns_a_learnable_reward(tmp_path):
    # 32 samples an epoch without guidance (half the denoiser passes); the tiny SDXL UNet needs a larger step than SD's
    settings = {**TINY_TRAINING_DEFAULTS, "sample_num_batches_per_epoch": 2, "train_learning_rate": 5e-3}
    config = tiny_config(tmp_path, num_epochs=8, sample_guidance_scale=1.0, **settings)
    pipeline = TDPOStableDiffusionXLPipeline(tiny_stable_diffusion_xl(), use_lora=False)
    trainer = TDPOTrainer(config, left_minus_right_brightness, cat_prompt, pipeline)
    trainer.train()
    means = [record["reward/mean"] for record in trainer.log_history]
    first, spread = means[0], trainer.log_history[0]["reward/std"]
    last = sum(means[-2:]) / 2
    print(f"reward mean per epoch {[round(m, 4) for m in means]}, first-epoch spread {spread:.4f}")
    assert last - first > spread, f"reward mean {first:.4f} -> {last:.4f} did not rise by one spread ({spread:.4f})"


def test_sdxl_lora_saved_for_diffusers_reproduces_the_trained_images(tmp_path):
    config = tiny_config(tmp_path, num_epochs=2, train_learning_rate=3e-2)
    trainer = TDPOTrainer(config, left_minus_right_brightness, cat_prompt, TDPOStableDiffusionXLPipeline(
        tiny_stable_diffusion_xl()))  # fmt: skip
    trainer.train()
    trainer.save_pretrained(str(tmp_path / "saved"))
    assert (tmp_path / "saved" / LORA_WEIGHT_NAME).is_file()
    assert "StableDiffusionXLPipeline.from_pretrained(" in (tmp_path / "saved" / "README.md").read_text()

    settings = dict(seed=7, num_inference_steps=4, guidance_scale=5.0, eta=1.0, batch_size=2)
    prompts = ["a photo of a cat", "a dog"]
    trained = sample_images(trainer.sd_pipeline.sd_pipeline, prompts, **settings)
    loaded = tiny_stable_diffusion_xl()  # a fresh base
    base = sample_images(loaded, prompts, **settings)
    loaded.load_lora_weights(str(tmp_path / "saved"), weight_name=LORA_WEIGHT_NAME)
    assert isinstance(loaded, StableDiffusionXLPipeline)
    reloaded = sample_images(loaded, prompts, **settings)
    assert not torch.equal(trained, base), "training did not change the images"
    torch.testing.assert_close(reloaded, trained, rtol=0, atol=1e-6)


def test_sdxl_resume_is_bit_exact(tmp_path):
    def train(run_name, epochs, resume=False):
        config = tiny_config(
            tmp_path, run_name=run_name, num_epochs=epochs, save_freq=1, neuron_reset_frequency=1,
            resume_from=str(tmp_path / "logs" / run_name) if resume else "",
        )  # fmt: skip
        trainer = TDPOTrainer(config, left_minus_right_brightness, cat_prompt, TDPOStableDiffusionXLPipeline(
            tiny_stable_diffusion_xl()))  # fmt: skip
        trainer.train()
        return trainer

    straight = train("straight", 2)
    train("interrupted", 1)
    resumed = train("interrupted", 2, resume=True)
    assert resumed.first_epoch == 1
    a, b = lora_state(straight), lora_state(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    heads = (straight.critic.head.state_dict(), resumed.critic.head.state_dict())
    assert all(torch.equal(heads[0][n], heads[1][n]) for n in heads[0])
    assert [r["reward/mean"] for r in resumed.log_history] == [r["reward/mean"] for r in straight.log_history]


def test_the_command_line_picks_the_family_from_the_model_folder(tmp_path):
    from diffusers import DDPMPipeline, UNet2DModel

    from tdpo_trl.scripts.train import model_family

    tiny_stable_diffusion_xl().save_pretrained(tmp_path / "sdxl")
    assert model_family(str(tmp_path / "sdxl")) is TDPOStableDiffusionXLPipeline
    blocks = dict(down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
    unet = UNet2DModel(block_out_channels=(32, 64), sample_size=8, norm_num_groups=8, **blocks)
    DDPMPipeline(unet=unet, scheduler=tiny_stable_diffusion_xl().scheduler).save_pretrained(tmp_path / "ddpm")
    with pytest.raises(ValueError, match=r"'DDPMPipeline'.*StableDiffusionXLPipeline"):
        model_family(str(tmp_path / "ddpm"))
    with pytest.raises(ValueError, match="pretrained_model"):
        model_family(str(tmp_path / "missing"))


def test_tdpo_trl_train_runs_the_tiny_sdxl(tmp_path):
    from tdpo_trl.scripts.train import main, parse_args

    main(*parse_args(["--pretrained_model", "tiny-sdxl", "--num_epochs", "1", "--sample_batch_size", "4",
                      "--sample_num_batches_per_epoch", "1", "--train_batch_size", "4",
                      "--logdir", str(tmp_path / "logs"), "--save_dir", str(tmp_path / "saved")]))  # fmt: skip
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tmp_path / "saved" / "unet")  # the tiny defaults train the full UNet
    assert unet.config.addition_embed_type == "text_time"
