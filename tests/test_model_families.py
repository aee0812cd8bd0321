"""SDXL, SD3 and FLUX through the same trainer as SD 1.x: exact log-probs, a learnable reward rises, LoRA save ->
diffusers load gives the trained images, resume is bit-exact (2 processes: tests/test_multiprocess.py)."""

import json
import tempfile
from pathlib import Path

import pytest
import torch
from conftest import tiny_config
from diffusers import FluxPipeline, StableDiffusion3Pipeline, StableDiffusionXLPipeline

from tdpo_trl import TDPOFluxPipeline, TDPOStableDiffusion3Pipeline, TDPOStableDiffusionXLPipeline, TDPOTrainer
from tdpo_trl.evaluation import sample_images
from tdpo_trl.pipelines import LORA_WEIGHT_NAME
from tdpo_trl.rollout import Rollout
from tdpo_trl.tiny_models import (
    TINY_T5_LENGTH,
    TINY_TRAINING_DEFAULTS,
    left_minus_right_brightness,
    tiny_flux,
    tiny_stable_diffusion_3,
    tiny_stable_diffusion_xl,
)


# family -> (tiny diffusers pipeline, its training wrapper)
FAMILIES = {
    "sdxl": (tiny_stable_diffusion_xl, TDPOStableDiffusionXLPipeline),
    "sd3": (
        tiny_stable_diffusion_3,
        lambda pipe, **kw: TDPOStableDiffusion3Pipeline(pipe, max_sequence_length=16, **kw),
    ),
    "flux": (tiny_flux, lambda pipe, **kw: TDPOFluxPipeline(pipe, max_sequence_length=TINY_T5_LENGTH, **kw)),
}
DIFFUSERS_CLASSES = {"sdxl": StableDiffusionXLPipeline, "sd3": StableDiffusion3Pipeline, "flux": FluxPipeline}


def wrapped(family: str, **kwargs):
    build, wrapper = FAMILIES[family]
    return wrapper(build(), **kwargs)


def cat_prompt():
    return "a photo of a cat", {}


def lora_state(trainer) -> dict[str, torch.Tensor]:
    unet = trainer.accelerator.unwrap_model(trainer.unet)
    return {n: p.detach().clone() for n, p in unet.named_parameters() if p.requires_grad}


def assert_reward_rose(trainer, min_rise: float):
    """The last two epochs' reward mean rose more than `min_rise` first-epoch spreads above the first epoch's."""
    means = [record["reward/mean"] for record in trainer.log_history]
    first, spread = means[0], trainer.log_history[0]["reward/std"]
    rise = (sum(means[-2:]) / 2 - first) / spread
    print(f"reward mean every 4th epoch {[round(m, 4) for m in means[::4]]}, first-epoch spread {spread:.4f}")
    assert rise > min_rise, f"reward mean rose {rise:.2f} first-epoch spreads, expected > {min_rise}"


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


def test_sd3_conditioning_shapes_and_sde_schedule():
    pipeline = wrapped("sd3")
    _, conditioning = pipeline.encode_prompts(["a cat", "a dog"], "cpu")
    # CLIP tokens (16) then T5 tokens (16, zeros without a T5 encoder); pooled: both CLIP projections
    assert {k: tuple(v.shape) for k, v in conditioning.items()} == {
        "prompt_embeds": (2, 32, 64),
        "pooled_prompt_embeds": (2, 64),
    }
    pipeline.scheduler.set_timesteps(4)
    latents, velocity = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    timesteps = pipeline.scheduler.timesteps[[0, 3]]
    mean, std = pipeline.transition(velocity, timesteps, latents, eta=0.7)
    sigma, next_sigma = pipeline.scheduler.sigmas[[0, 3]], pipeline.scheduler.sigmas[[1, 4]]
    ode = latents + velocity * (next_sigma - sigma).view(-1, 1, 1, 1)  # the Euler step the SDE replaces
    assert mean.shape == latents.shape and (std > 0).all()
    assert not torch.allclose(mean, ode)  # the drift correction
    torch.testing.assert_close(pipeline.transition(velocity, timesteps, latents, eta=1e-4)[0], ode, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="sample_eta"):
        TDPOTrainer(tiny_config(Path(tempfile.mkdtemp()), sample_eta=0.0), left_minus_right_brightness, cat_prompt,
                    wrapped("sd3"))  # fmt: skip


def test_flux_conditioning_packed_latents_guidance_and_shifted_schedule(tmp_path):
    pipeline = wrapped("flux")
    ids, conditioning = pipeline.encode_prompts(["a cat", "a dog"], "cpu")
    assert ids.shape == (2, 16)
    assert {k: tuple(v.shape) for k, v in conditioning.items()} == {
        "prompt_embeds": (2, TINY_T5_LENGTH, 32),  # T5 tokens
        "pooled_prompt_embeds": (2, 32),  # CLIP's pooled output
        "text_ids": (2, TINY_T5_LENGTH, 3),
        "guidance": (2,),
    }
    assert pipeline.latent_shape() == (16, 16) and pipeline.image_resolution() == 16  # 4x4 tokens of 2x2x4 latents
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    packed = pipeline.encode_images(images)
    assert packed.shape == (2, 16, 16) and pipeline.decode(packed).shape == (2, 3, 16, 16)

    # the schedule diffusers' FluxPipeline samples with: sigmas 1 ... 1/N, shifted by the image's token count
    diffusers_pipeline = tiny_flux()
    diffusers_pipeline(["a cat"], num_inference_steps=4, height=16, width=16, output_type="latent",
                       max_sequence_length=TINY_T5_LENGTH)  # fmt: skip
    pipeline.set_timesteps(4, "cpu")
    torch.testing.assert_close(pipeline.scheduler.timesteps, diffusers_pipeline.scheduler.timesteps, rtol=0, atol=0)
    torch.testing.assert_close(pipeline.scheduler.sigmas, diffusers_pipeline.scheduler.sigmas, rtol=0, atol=0)

    # guidance-distilled: the scale is a transformer input (it changes the prediction), never a doubled batch
    trainer = TDPOTrainer(tiny_config(tmp_path, sample_guidance_scale=5.0), left_minus_right_brightness, cat_prompt,
                          wrapped("flux"))  # fmt: skip
    assert not trainer.guided_training and not trainer.sd_pipeline.guided(5.0)
    assert trainer.sd_pipeline.guidance_scale == 5.0 and not trainer.train_final_step
    inputs = trainer.sd_pipeline.denoiser_inputs(packed, torch.full((2,), 500.0), conditioning, cfg=False)
    with torch.no_grad():
        at_5 = trainer.sd_pipeline.predict(trainer.sd_pipeline.denoiser, {**inputs, "guidance": torch.full((2,), 5.0)})
        at_1 = trainer.sd_pipeline.predict(trainer.sd_pipeline.denoiser, {**inputs, "guidance": torch.ones(2)})
    assert at_5.shape == packed.shape and not torch.allclose(at_5, at_1)
    samples, _ = trainer._generate_samples(1, 4)
    assert samples[0]["latents"].shape == (4, 4, 16, 16)  # (B, T, tokens, channels): no CFG rows
    assert (samples[0]["guidance"] == 5.0).all()


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("use_critic", [True, False], ids=["tdpo", "ddpo"])
def test_recomputed_log_probs_equal_the_sampled_ones(tmp_path, family, use_critic):
    config = tiny_config(tmp_path, use_critic=use_critic, sample_guidance_scale=5.0)
    trainer = TDPOTrainer(config, left_minus_right_brightness, cat_prompt, wrapped(family))
    samples, _ = trainer._generate_samples(1, 4)
    sample = samples[0]
    assert {"pooled_prompt_embeds", "negative_pooled_prompt_embeds"} <= set(sample)
    conditioning = sample.conditioning(trainer.negative_conditioning.keys())
    with torch.no_grad():
        for j in range(config.sample_num_steps):
            _, approx_kl, clipfrac = trainer.calculate_loss(
                sample["latents"][:, j], sample["timesteps"][:, j], sample["next_latents"][:, j],
                sample["log_probs"][:, j], torch.ones(4), conditioning,
            )  # fmt: skip
            assert approx_kl.item() == 0.0 and clipfrac.item() == 0.0, f"step {j}: ratio != 1 before any update"


def test_sdxl_learns_a_learnable_reward(tmp_path):
    # 32 samples an epoch without guidance (half the denoiser passes); the tiny SDXL UNet needs a larger step than SD's
    settings = {**TINY_TRAINING_DEFAULTS, "sample_num_batches_per_epoch": 2, "train_learning_rate": 5e-3}
    config = tiny_config(tmp_path, num_epochs=8, sample_guidance_scale=1.0, **settings)
    pipeline = wrapped("sdxl", use_lora=False)
    trainer = TDPOTrainer(config, left_minus_right_brightness, cat_prompt, pipeline)
    trainer.train()
    means = [record["reward/mean"] for record in trainer.log_history]
    first, spread = means[0], trainer.log_history[0]["reward/std"]
    last = sum(means[-2:]) / 2
    print(f"reward mean per epoch {[round(m, 4) for m in means]}, first-epoch spread {spread:.4f}")
    assert last - first > spread, f"reward mean {first:.4f} -> {last:.4f} did not rise by one spread ({spread:.4f})"


@pytest.mark.parametrize(
    "settings, min_rise",
    [
        # seeds 0-4 rose 1.17-1.75 spreads (TDPO-R, LoRA), 0.78-1.84 (DDPO, full transformer): docs/model_families.md
        ({"use_critic": True, "train_learning_rate": 3e-2}, 1.0),
        ({"use_critic": False, "train_learning_rate": 1e-2, "use_lora": False}, 0.5),
    ],
    ids=["tdpo-lora", "ddpo-full"],
)
def test_sd3_learns_a_learnable_reward(tmp_path, settings, min_rise):
    settings = {**TINY_TRAINING_DEFAULTS, "sample_num_batches_per_epoch": 2, "sample_eta": 0.7, **settings}
    use_lora = settings.pop("use_lora", True)
    config = tiny_config(tmp_path, num_epochs=40, sample_guidance_scale=1.0, **settings)
    trainer = TDPOTrainer(config, left_minus_right_brightness, cat_prompt, wrapped("sd3", use_lora=use_lora))
    assert trainer.num_train_timesteps == 3  # the last, nearly deterministic SDE step is not trained
    trainer.train()
    assert_reward_rose(trainer, min_rise)


def test_the_final_step_is_left_out_where_the_family_or_the_config_says(tmp_path):
    sd3 = TDPOTrainer(tiny_config(tmp_path), left_minus_right_brightness, cat_prompt, wrapped("sd3"))
    assert (sd3.train_final_step, sd3.num_train_timesteps) == (False, 3)
    samples, _ = sd3._generate_samples(2, 4)  # one inner epoch: the critic embeds only the steps it will train
    assert all(s["trained_steps"].shape == (4, 3) and (s["trained_steps"] != 3).all() for s in samples)
    config = tiny_config(tmp_path, train_final_step=True, use_critic=False)
    assert TDPOTrainer(config, left_minus_right_brightness, cat_prompt, wrapped("sd3")).num_train_timesteps == 4
    config = tiny_config(tmp_path, train_final_step=False, train_timestep_fraction=0.5, use_critic=False)
    sdxl = TDPOTrainer(config, left_minus_right_brightness, cat_prompt, wrapped("sdxl"))
    assert sdxl.num_train_timesteps == 1  # int(3 * 0.5)
    samples = sdxl._generate_samples(1, 4)[0][0]
    rollout = Rollout({k: samples[k] for k in ("timesteps", "latents", "log_probs")})
    batches = sdxl.trained_steps.shuffle_and_batch(rollout, sdxl.config.train_batch_size)
    final = sdxl.sd_pipeline.scheduler.timesteps[-1]
    assert all((batch["timesteps"][:, 0] != final).all() for batch in batches)
    with pytest.raises(ValueError, match=r"`sample_num_steps` - 1 \(the final step untrained\)"):
        tiny_config(tmp_path, sample_num_steps=1, train_final_step=False)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_lora_saved_for_diffusers_reproduces_the_trained_images(tmp_path, family):
    config = tiny_config(tmp_path, num_epochs=2, train_learning_rate=3e-2)
    trainer = TDPOTrainer(config, left_minus_right_brightness, cat_prompt, wrapped(family))
    trainer.train()
    trainer.save_pretrained(str(tmp_path / "saved"))
    assert (tmp_path / "saved" / LORA_WEIGHT_NAME).is_file()
    diffusers_class = DIFFUSERS_CLASSES[family]
    card = (tmp_path / "saved" / "README.md").read_text()
    assert f"{diffusers_class.__name__}.from_pretrained(" in card
    assert ("distilled guidance" in card) == (family == "flux")  # FLUX's guidance is a transformer input, not CFG

    resolution = trainer.sd_pipeline.image_resolution()  # the tiny FLUX's 16 px is not FluxPipeline's default
    settings = dict(seed=7, num_inference_steps=4, guidance_scale=5.0, eta=1.0, batch_size=2, resolution=resolution)
    prompts = ["a photo of a cat", "a dog"]
    trained = sample_images(trainer.sd_pipeline.diffusers_pipeline, prompts, **settings)
    loaded = FAMILIES[family][0]()  # a fresh base
    base = sample_images(loaded, prompts, **settings)
    loaded.load_lora_weights(str(tmp_path / "saved"), weight_name=LORA_WEIGHT_NAME)
    assert isinstance(loaded, diffusers_class)
    reloaded = sample_images(loaded, prompts, **settings)
    assert not torch.equal(trained, base), "training did not change the images"
    torch.testing.assert_close(reloaded, trained, rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_resume_is_bit_exact(tmp_path, family):
    def train(run_name, epochs, resume=False):
        config = tiny_config(
            tmp_path, run_name=run_name, num_epochs=epochs, save_freq=1, neuron_reset_frequency=1,
            resume_from=str(tmp_path / "logs" / run_name) if resume else "",
        )  # fmt: skip
        trainer = TDPOTrainer(config, left_minus_right_brightness, cat_prompt, wrapped(family))
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

    from tdpo_trl.commands.train import model_family

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
    from tdpo_trl.commands.train import main, parse_args

    main(*parse_args(["--pretrained_model", "tiny-sdxl", "--num_epochs", "1", "--sample_batch_size", "4",
                      "--sample_num_batches_per_epoch", "1", "--train_batch_size", "4",
                      "--logdir", str(tmp_path / "logs"), "--save_dir", str(tmp_path / "saved")]))  # fmt: skip
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tmp_path / "saved" / "unet")  # the tiny defaults train the full UNet
    assert unet.config.addition_embed_type == "text_time"


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_full_transformer_saves_resumes_and_evaluates(tmp_path, family):
    """Without LoRA the whole transformer goes under `transformer/`: save_pretrained, checkpoints and resume,
    `evaluate_checkpoints` and the model card's usage all read it there (SD3 and FLUX)."""
    from huggingface_hub import ModelCard

    from tdpo_trl.evaluation import evaluate_checkpoints

    def train(run_name, epochs, resume=False):
        config = tiny_config(
            tmp_path, run_name=run_name, num_epochs=epochs, save_freq=1, use_critic=False, train_learning_rate=1e-2,
            resume_from=str(tmp_path / "logs" / run_name) if resume else "",
        )  # fmt: skip
        trainer = TDPOTrainer(config, left_minus_right_brightness, cat_prompt, wrapped(family, use_lora=False))
        trainer.train()
        return trainer

    straight = train("straight", 2)
    train("interrupted", 1)
    resumed = train("interrupted", 2, resume=True)
    a, b = lora_state(straight), lora_state(resumed)
    assert len(a) > 10 and all(torch.equal(a[n], b[n]) for n in a)  # every transformer weight, bit-exact

    straight.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out" / LORA_WEIGHT_NAME).exists()
    transformer_class = type(straight.sd_pipeline.denoiser)  # SD3Transformer2DModel, FluxTransformer2DModel
    loaded = transformer_class.from_pretrained(tmp_path / "out", subfolder="transformer")
    assert all(torch.equal(loaded.state_dict()[n], v) for n, v in a.items())
    card = ModelCard.load(tmp_path / "out" / "README.md").text
    assert f"{transformer_class.__name__}.from_pretrained(" in card and "transformer=transformer" in card
    assert ("torch_dtype=torch.bfloat16" in card) == (family == "flux")  # FLUX.1 runs in bf16, the others in fp16

    base = FAMILIES[family][0]()
    results = evaluate_checkpoints(
        base, {"run": str(tmp_path / "out")}, left_minus_right_brightness, {}, ["a photo of a cat"] * 2,
        num_inference_steps=4, guidance_scale=1.0, resolution=straight.sd_pipeline.image_resolution(),
    )  # fmt: skip
    assert [r["checkpoint"] for r in results["run"]] == ["base", "out"]
    assert results["run"][0]["target"] != results["run"][1]["target"]  # the trained transformer was used
    fresh = FAMILIES[family][0]().transformer.state_dict()  # evaluation put the base transformer back
    assert all(torch.equal(v, fresh[n]) for n, v in base.transformer.state_dict().items())


@pytest.mark.parametrize(
    "settings, seed, min_rise",
    [
        # seeds 0-4 rose 0.41-11.9 spreads (TDPO-R, full transformer lr 3e-3), 0.94-3.69 (DDPO, full lr 1e-2, the
        # final step trained): docs/model_families.md
        ({"use_critic": True, "train_learning_rate": 3e-3}, 0, 1.0),
        ({"use_critic": False, "train_learning_rate": 1e-2, "train_final_step": True}, 0, 1.0),
    ],
    ids=["tdpo-full", "ddpo-full"],
)
def test_flux_learns_a_learnable_reward(tmp_path, settings, seed, min_rise):
    settings = {**TINY_TRAINING_DEFAULTS, "sample_num_batches_per_epoch": 2, "sample_eta": 0.7, **settings}
    config = tiny_config(tmp_path, num_epochs=40, sample_guidance_scale=3.5, seed=seed, **settings)
    pipeline = TDPOFluxPipeline(tiny_flux(seed=seed), max_sequence_length=TINY_T5_LENGTH, use_lora=False)
    trainer = TDPOTrainer(config, left_minus_right_brightness, cat_prompt, pipeline)
    assert trainer.num_train_timesteps == 4 - (not config.train_final_step)  # by default the last step is not trained
    trainer.train()
    assert_reward_rose(trainer, min_rise)


def test_tdpo_trl_train_runs_a_saved_tiny_flux_folder(tmp_path):
    from diffusers import FluxTransformer2DModel

    from tdpo_trl.commands.train import main, model_family, parse_args

    tiny_flux().save_pretrained(tmp_path / "tiny-flux")
    assert model_family(str(tmp_path / "tiny-flux")) is TDPOFluxPipeline  # read from model_index.json
    main(*parse_args(["--pretrained_model", str(tmp_path / "tiny-flux"), "--num_epochs", "2", "--sample_num_steps",
                      "4", "--sample_batch_size", "4", "--sample_num_batches_per_epoch", "1", "--train_batch_size",
                      "4", "--sample_guidance_scale", "3.5", "--mixed_precision", "no", "--critic_encoder",
                      "latents", "--reward", "left_minus_right", "--use_lora", "false", "--eval_freq", "2",
                      "--eval_num_prompts", "2", "--logdir", str(tmp_path / "logs"), "--run_name", "flux",
                      "--save_dir", str(tmp_path / "saved")]))  # fmt: skip
    records = [json.loads(line) for line in (tmp_path / "logs" / "flux" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1] and "heldout/target/mean" in records[-1]
    saved = FluxTransformer2DModel.from_pretrained(tmp_path / "saved" / "transformer")
    assert saved.config.guidance_embeds


def test_flux_gradient_checkpointing_and_offloaded_text_encoders_train_the_same(tmp_path):
    """The memory options for FLUX.1-dev's size change where things are kept, not what is trained."""

    def train(run_name, **options):
        config = tiny_config(tmp_path, run_name=run_name, use_critic=False, train_learning_rate=1e-2,
                             gradient_checkpointing=options.pop("gradient_checkpointing", False))  # fmt: skip
        trainer = TDPOTrainer(config, left_minus_right_brightness, cat_prompt, wrapped("flux", **options))
        trainer.train()
        return trainer

    plain = train("plain")
    saving = train("saving", gradient_checkpointing=True, offload_text_encoders=True)
    assert saving.sd_pipeline.denoiser.gradient_checkpointing and not plain.sd_pipeline.denoiser.gradient_checkpointing
    assert saving.sd_pipeline.resident_modules() == [saving.sd_pipeline.vae]  # T5 and CLIP wait on the CPU
    a, b = lora_state(plain), lora_state(saving)
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    assert [r["reward/mean"] for r in plain.log_history] == [r["reward/mean"] for r in saving.log_history]


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_an_image_critic_reads_x_t_through_the_familys_decoding(tmp_path, family, tiny_clip_path):
    """The critic's CLIP sees x_t as the family decodes it: SD3's VAE shift, FLUX's packed latents (these once went
    to the VAE unshifted, and FLUX's packed ones could not be decoded at all)."""
    config = tiny_config(tmp_path, critic_encoder=tiny_clip_path, train_timestep_fraction=1.0, train_final_step=True)
    trainer = TDPOTrainer(config, left_minus_right_brightness, cat_prompt, wrapped(family))
    samples, _ = trainer._generate_samples(1, 4)
    latents, features = samples[0]["latents"], samples[0]["critic_features"]  # (B, T, ...), (B, T, D): every step
    for step in (0, 3):
        expected = trainer.critic.encoder(trainer.sd_pipeline.decode(latents[:, step]).float())
        torch.testing.assert_close(features[:, step], expected, rtol=1e-5, atol=1e-5)
