"""`TDPOStableDiffusion3Pipeline`: Stable Diffusion 3 (flow matching, an MMDiT transformer) for DDPO / TDPO-R.

Flow matching samples with a deterministic ODE; policy-gradient RL needs stochastic steps with a known density. As in
Flow-GRPO (Liu et al. 2025, arXiv 2505.05470), each Euler step of the ODE is replaced by a step of an SDE with the
same marginals: in noise level sigma (1 -> 0), for velocity v = eps - x0,

    x_{sigma + d} = x + [v + g^2 / (2 sigma) * (x + (1 - sigma) v)] d + g sqrt(-d) z,    d < 0, z ~ N(0, I),

with g = eta * sqrt(sigma / (1 - sigma)) (sigma = 1 at the first step is replaced by the schedule's second sigma in
the denominator). The bracket is the reverse-time drift v - (g^2 / 2) * score with score -(x + (1 - sigma) v) / sigma,
so every step is Gaussian: mean as above, standard deviation g sqrt(-d). eta = 0 is the ODE (and has no density).
"""

import math

import torch
from diffusers import StableDiffusion3Pipeline
from diffusers.utils.torch_utils import randn_tensor

from .pipeline import SampledTrajectories, TDPOStableDiffusionPipeline, is_guided


class TDPOStableDiffusion3Pipeline(TDPOStableDiffusionPipeline):
    """Stable Diffusion 3 wrapped for DDPO / TDPO training: the flow-matching SDE sampler above, LoRA on the
    transformer saved in diffusers' SD3 format (`StableDiffusion3Pipeline.load_lora_weights(folder)` reads it).

    Constructed like `TDPOStableDiffusionPipeline`. `max_sequence_length`: T5 tokens per prompt (SD3's default 256;
    without a T5 encoder its part of the conditioning is zeros). `sample_eta` of the config is the SDE's noise level
    (Flow-GRPO uses 0.7); it must be > 0. `use_lora=False` trains the whole transformer
    (saved under `transformer/`).
    """

    pipeline_class = StableDiffusion3Pipeline
    denoiser_name = "transformer"
    trains_final_step = False  # last SDE step (sigma 0.009 -> 0): std ~0.006, 10-100x below the others'

    def __init__(self, *args, max_sequence_length: int = 256, **kwargs):
        self.max_sequence_length = max_sequence_length
        super().__init__(*args, **kwargs)

    def _configure_scheduler(self):
        """Keep the flow-matching scheduler: its sigmas (with SD3's shift) define the SDE's steps."""

    def apply_training_config(self, config):
        if config.sample_eta <= 0:
            raise ValueError(
                f"`sample_eta` is {config.sample_eta}, but flow-matching steps need noise (eta > 0, e.g. 0.7) to have "
                "a log-probability"
            )
        super().apply_training_config(config)

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.sd_pipeline.transformer

    @property
    def unet(self):  # TRL's name for the trained network
        return self.sd_pipeline.transformer

    def frozen_modules(self) -> list[torch.nn.Module]:
        sd = self.sd_pipeline
        return [m for m in (sd.vae, sd.text_encoder, sd.text_encoder_2, sd.text_encoder_3) if m is not None]

    def latent_shape(self) -> tuple[int, int, int]:
        config = self.denoiser.config
        return (config.in_channels, config.sample_size, config.sample_size)

    def encode_prompts(self, prompts: list[str], device) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        ids = self.tokenize(prompts).to(device)
        prompts = list(prompts)
        embeds, _, pooled, _ = self.sd_pipeline.encode_prompt(
            prompts, prompts, prompts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )  # fmt: skip
        return ids, {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}  # (B, L, D), (B, P)

    def encode_negative_prompt(self, negative_prompt: str, device) -> dict[str, torch.Tensor]:
        return self.encode_prompts([negative_prompt], device)[1]

    conditioning_inputs = {"prompt_embeds": "encoder_hidden_states", "pooled_prompt_embeds": "pooled_projections"}

    def predict(self, model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The transformer's velocity prediction."""
        return model(
            hidden_states=inputs["sample"],
            timestep=inputs["timestep"],
            encoder_hidden_states=inputs["encoder_hidden_states"],
            pooled_projections=inputs["pooled_projections"],
            return_dict=False,
        )[0]

    # ------------------------------------------------------------------ the SDE step

    def _sigmas(self, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        """`(sigma, next_sigma)` `(B,)` of each sample's step in the current schedule, and the first-step cap."""
        scheduler = self.scheduler
        schedule = scheduler.timesteps.to(timesteps.device)
        index = (schedule[None, :] - timesteps[:, None].to(schedule.dtype)).abs().argmin(dim=1)  # (B,)
        sigmas = scheduler.sigmas.to(timesteps.device)
        return sigmas[index], sigmas[index + 1], float(sigmas[1])

    def transition(self, prediction, timesteps, latents, *, eta: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and standard deviation of the SDE step from `latents` at `timesteps` (module docstring)."""
        sigma, next_sigma, cap = self._sigmas(timesteps)
        shape = (-1,) + (1,) * (latents.ndim - 1)
        sigma, next_sigma = sigma.view(shape).float(), next_sigma.view(shape).float()
        d = next_sigma - sigma  # < 0
        g = eta * torch.sqrt(sigma / (1 - torch.where(sigma >= 1, torch.full_like(sigma, cap), sigma)))
        x, v = latents.float(), prediction.float()
        mean = x + (v + g**2 / (2 * sigma) * (x + (1 - sigma) * v)) * d
        return mean, g * torch.sqrt(-d)

    def step_log_prob(self, prediction, timesteps, latents, *, eta: float, next_latents) -> torch.Tensor:
        """Log-density `(B,)` of `next_latents` under the SDE step, averaged over latent dimensions (as DDPO's)."""
        mean, std = self.transition(prediction, timesteps, latents, eta=eta)
        log_prob = (
            -((next_latents.detach().float() - mean) ** 2) / (2 * std**2)
            - torch.log(std)
            - math.log(math.sqrt(2 * math.pi))
        )
        return log_prob.mean(dim=tuple(range(1, log_prob.ndim)))

    @torch.no_grad()
    def sample_with_log_probs(
        self, conditioning: dict, negative_conditioning: dict, *, num_inference_steps: int, guidance_scale: float,
        eta: float,
    ) -> SampledTrajectories:  # fmt: skip
        """SDE sampling from the global RNG; each step's latent and log-prob recorded."""
        scheduler = self.scheduler
        embeds = conditioning["prompt_embeds"]
        batch, device = len(embeds), embeds.device
        scheduler.set_timesteps(num_inference_steps, device=device)
        latents = randn_tensor((batch, *self.latent_shape()), device=device, dtype=embeds.dtype)
        cfg = is_guided(guidance_scale)
        both = {**conditioning, **{f"negative_{k}": v for k, v in negative_conditioning.items()}}
        all_latents, log_probs = [latents], []
        for t in scheduler.timesteps:
            timesteps = t.repeat(batch)  # (B,)
            prediction = self.predict(self.denoiser, self.denoiser_inputs(latents, timesteps, both, cfg))
            if cfg:
                uncond, cond = prediction.chunk(2)
                prediction = uncond + guidance_scale * (cond - uncond)
            mean, std = self.transition(prediction, timesteps, latents, eta=eta)
            noise = randn_tensor(latents.shape, device=device, dtype=mean.dtype)
            next_latents = (mean + std * noise).to(latents.dtype)
            log_probs.append(self.step_log_prob(prediction, timesteps, latents, eta=eta, next_latents=next_latents))
            latents = next_latents
            all_latents.append(latents)
        return SampledTrajectories(
            images=self.decode(latents),
            latents=torch.stack(all_latents, dim=1),  # (B, T + 1, C, h, w)
            log_probs=torch.stack(log_probs, dim=1),  # (B, T)
            timesteps=scheduler.timesteps.repeat(batch, 1),  # (B, T)
        )

    # ------------------------------------------------------------------ VAE and the pretraining loss

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images `(B, 3, H, W)` in [0, 1] (SD3's VAE latents are scaled and shifted)."""
        vae = self.sd_pipeline.vae
        latents = latents.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
        return (vae.decode(latents, return_dict=False)[0] / 2 + 0.5).clamp(0, 1)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        vae = self.sd_pipeline.vae
        latents = vae.encode(images.to(vae.dtype)).latent_dist.mode()
        return (latents - vae.config.shift_factor) * vae.config.scaling_factor

    def training_target(self, latents, noise, timesteps) -> tuple[torch.Tensor, torch.Tensor]:
        """Rectified flow at sigma = t / num_train_timesteps: x = (1 - sigma) x0 + sigma eps, target v = eps - x0."""
        sigma = (timesteps.float() / self.scheduler.config.num_train_timesteps).view(-1, *[1] * (latents.ndim - 1))
        noisy = (1 - sigma) * latents + sigma * noise
        return noisy.to(latents.dtype), noise - latents
