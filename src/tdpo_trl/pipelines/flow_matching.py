"""Flow matching through a Gaussian SDE step: the step math of the rectified-flow families (SD3).

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
from diffusers.utils.torch_utils import randn_tensor


def sde_transition(
    sigma: torch.Tensor,
    next_sigma: torch.Tensor,
    cap: float,
    velocity: torch.Tensor,
    latents: torch.Tensor,
    eta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation of the SDE step from `latents` at noise level `sigma` to `next_sigma` (both `(B,)`),
    computed in float32. `cap`: the sigma used in `g`'s denominator where sigma is 1."""
    shape = (-1,) + (1,) * (latents.ndim - 1)
    sigma, next_sigma = sigma.view(shape).float(), next_sigma.view(shape).float()
    d = next_sigma - sigma  # < 0
    g = eta * torch.sqrt(sigma / (1 - torch.where(sigma >= 1, torch.full_like(sigma, cap), sigma)))
    x, v = latents.float(), velocity.float()
    mean = x + (v + g**2 / (2 * sigma) * (x + (1 - sigma) * v)) * d
    return mean, g * torch.sqrt(-d)


def gaussian_log_prob(value: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Log-density `(B,)` of `value` under N(mean, std^2), averaged over the non-batch dimensions (as DDPO's)."""
    log_prob = (
        -((value.detach().float() - mean) ** 2) / (2 * std**2) - torch.log(std) - math.log(math.sqrt(2 * math.pi))
    )
    return log_prob.mean(dim=tuple(range(1, log_prob.ndim)))


class FlowMatchingSDESteps:
    """The sampler steps of a flow-matching family (mixed into a `TDPOPipeline`): a velocity-predicting transformer
    on a `FlowMatchEulerDiscreteScheduler`'s sigmas. `sample_eta` is the SDE's noise level (Flow-GRPO uses 0.7)."""

    trains_final_step = False  # last SDE step (sigma 0.009 -> 0): std ~0.006, 10-100x below the others'

    def configure_scheduler(self):
        """Keep the flow-matching scheduler: its sigmas (with the model's shift) define the SDE's steps."""

    def apply_training_config(self, config):
        if config.sample_eta <= 0:
            raise ValueError(
                f"`sample_eta` is {config.sample_eta}, but flow-matching steps need noise (eta > 0, e.g. 0.7) to have "
                "a log-probability"
            )
        super().apply_training_config(config)

    def initial_latents(self, batch: int, device, dtype) -> torch.Tensor:
        return randn_tensor((batch, *self.latent_shape()), device=device, dtype=dtype)

    def model_input(self, latents: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        return latents

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
        return sde_transition(sigma, next_sigma, cap, prediction, latents, eta)

    def step_log_prob(self, prediction, timesteps, latents, *, eta: float, next_latents) -> torch.Tensor:
        mean, std = self.transition(prediction, timesteps, latents, eta=eta)
        return gaussian_log_prob(next_latents, mean, std)

    def sample_step(self, prediction, timesteps, latents, *, eta: float) -> tuple[torch.Tensor, torch.Tensor]:
        mean, std = self.transition(prediction, timesteps, latents, eta=eta)
        noise = randn_tensor(latents.shape, device=latents.device, dtype=mean.dtype)
        next_latents = (mean + std * noise).to(latents.dtype)
        return next_latents, self.step_log_prob(prediction, timesteps, latents, eta=eta, next_latents=next_latents)

    def training_target(self, latents, noise, timesteps) -> tuple[torch.Tensor, torch.Tensor]:
        """Rectified flow at sigma = t / num_train_timesteps: x = (1 - sigma) x0 + sigma eps, target v = eps - x0."""
        sigma = (timesteps.float() / self.scheduler.config.num_train_timesteps).view(-1, *[1] * (latents.ndim - 1))
        noisy = (1 - sigma) * latents + sigma * noise
        return noisy.to(latents.dtype), noise - latents
