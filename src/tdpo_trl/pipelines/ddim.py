"""DDIM steps with a known density: the step math of the UNet families (SD 1.x/2.x, SDXL).

Each DDIM step x_t -> x_{t-1} with `eta > 0` is Gaussian (formulas 12 and 16 of the DDIM paper). Sampling and the
log-prob of a recorded step go through TRL's `scheduler_step`; `ddim_transition` gives the step's mean and standard
deviation, for the closed-form KL to the base model.
"""

import torch
from diffusers import DDIMScheduler
from diffusers.utils.torch_utils import randn_tensor
from trl.models.modeling_sd_base import _get_variance, _left_broadcast, scheduler_step


def ddim_transition(
    scheduler, model_output: torch.Tensor, timesteps: torch.Tensor, sample: torch.Tensor, eta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation of the Gaussian DDIM step x_t -> x_{t-1}, the quantities whose log-density
    `trl.models.modeling_sd_base.scheduler_step` returns. Shapes as `sample`."""
    prev = torch.clamp(timesteps - scheduler.config.num_train_timesteps // scheduler.num_inference_steps, 0)
    alpha = _left_broadcast(scheduler.alphas_cumprod.gather(0, timesteps.cpu()), sample.shape).to(sample.device)
    alpha_prev = _left_broadcast(scheduler.alphas_cumprod.gather(0, prev.cpu()), sample.shape).to(sample.device)
    if scheduler.config.prediction_type == "epsilon":
        x0, epsilon = (sample - (1 - alpha) ** 0.5 * model_output) / alpha**0.5, model_output
    elif scheduler.config.prediction_type == "v_prediction":
        x0 = alpha**0.5 * sample - (1 - alpha) ** 0.5 * model_output
        epsilon = alpha**0.5 * model_output + (1 - alpha) ** 0.5 * sample
    else:
        raise ValueError(f"unsupported prediction_type {scheduler.config.prediction_type!r}")
    if scheduler.config.clip_sample:
        x0 = x0.clamp(-scheduler.config.clip_sample_range, scheduler.config.clip_sample_range)
    std = eta * _get_variance(scheduler, timesteps, prev) ** 0.5
    std = _left_broadcast(std, sample.shape).to(sample.device)
    mean = alpha_prev**0.5 * x0 + (1 - alpha_prev - std**2) ** 0.5 * epsilon
    return mean, std


class DDIMSteps:
    """The sampler steps of a DDIM family (mixed into a `TDPOPipeline`): noise- or v-prediction UNets."""

    def configure_scheduler(self):
        """DDIM, whose steps are Gaussian with a known log-prob."""
        pipeline = self.diffusers_pipeline
        pipeline.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config)
        scheduler_config = pipeline.scheduler.config
        if scheduler_config.timestep_spacing == "leading" and scheduler_config.steps_offset == 0:
            # The last DDIM step would be t=0, where the step's variance is 0 and its log-prob is not finite.
            raise ValueError(
                "the scheduler has timestep_spacing='leading' with steps_offset=0, so DDIM sampling ends at t=0 where "
                "log-probabilities are undefined; set `steps_offset=1` (as Stable Diffusion) or "
                "timestep_spacing='trailing' in the scheduler config"
            )

    def initial_latents(self, batch: int, device, dtype) -> torch.Tensor:
        latents = randn_tensor((batch, *self.latent_shape()), device=device, dtype=dtype)
        return latents * self.scheduler.init_noise_sigma

    def model_input(self, latents: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        return self.scheduler.scale_model_input(latents, timestep)

    def sample_step(self, prediction, timesteps, latents, *, eta: float) -> tuple[torch.Tensor, torch.Tensor]:
        step = scheduler_step(self.scheduler, prediction, timesteps, latents, eta=eta)
        return step.latents, step.log_probs

    def step_log_prob(self, prediction, timesteps, latents, *, eta: float, next_latents) -> torch.Tensor:
        return scheduler_step(
            self.scheduler, prediction, timesteps, latents, eta=eta, prev_sample=next_latents
        ).log_probs

    def transition(self, prediction, timesteps, latents, *, eta: float) -> tuple[torch.Tensor, torch.Tensor]:
        return ddim_transition(self.scheduler, prediction, timesteps, latents, eta)

    def training_target(self, latents, noise, timesteps) -> tuple[torch.Tensor, torch.Tensor]:
        """DDPM noising at `timesteps`; the target is the noise, or v for v-prediction models."""
        scheduler = self.scheduler
        noisy = scheduler.add_noise(latents, noise, timesteps)
        if scheduler.config.prediction_type == "v_prediction":
            return noisy, scheduler.get_velocity(latents, noise, timesteps)
        return noisy, noise
