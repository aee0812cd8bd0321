"""Returns, temporal advantages and losses of TDPO-R, as pure tensor functions.

Shapes: N samples, T denoising steps (in sampling order: index 0 is the noisiest step).
"""

from typing import Optional

import numpy as np
import torch


def discounted_returns(
    final_rewards: torch.Tensor, num_steps: int, gamma: float = 1.0, step_rewards: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Returns G_t of trajectories rewarded `final_rewards` after their last step, plus optional per-step rewards.

    G_{T-1} = r + s_{T-1} and G_t = s_t + gamma * G_{t+1}; without `step_rewards` (s = 0), G_t = gamma^(T-1-t) * r.

    Args:
        final_rewards: `(N,)` reward of each sample's final image.
        step_rewards: `(N, T)` reward of each denoising step (e.g. a KL penalty), or `None`.
    Returns:
        `(N, T)` returns.
    """
    exponents = torch.arange(num_steps - 1, -1, -1, device=final_rewards.device, dtype=final_rewards.dtype)
    returns = final_rewards[:, None] * gamma ** exponents[None, :]
    if step_rewards is None:
        return returns
    if step_rewards.shape != returns.shape:
        raise ValueError(f"step_rewards {tuple(step_rewards.shape)} must be (N, T) = {tuple(returns.shape)}")
    discounted_sum = torch.zeros_like(final_rewards)
    step_returns = []
    for t in reversed(range(num_steps)):
        discounted_sum = step_rewards[:, t] + gamma * discounted_sum
        step_returns.append(discounted_sum)
    return returns + torch.stack(step_returns[::-1], dim=1)


def batch_normalize(rewards: np.ndarray, eps: float = 1e-7) -> np.ndarray:
    """Batch-wise reward normalization of the large-scale RL paper: `(r - mean) / (std + 1e-7)` over the finite
    rewards `(N,)` of the whole batch (the caller gathers them over processes and drops the non-finite ones)."""
    rewards = np.asarray(rewards, dtype=np.float64)
    return ((rewards - rewards.mean()) / (rewards.std() + eps)).astype(np.float32)


def normalize_rewards(
    rewards: np.ndarray, prompts: Optional[np.ndarray], tracker=None, when: str = "", reward: str = ""
) -> np.ndarray:
    """Normalized rewards `(N,)`: per prompt by `tracker` (TRL's `PerPromptStatTracker`, given `prompts`), else over
    the batch (`batch_normalize`). A NaN or infinite reward is left out of the statistics and normalized to 0 (its
    sample gets advantage 0); all of them non-finite is an error naming `when` and the `reward`."""
    finite = np.isfinite(rewards)
    if not finite.any():
        raise ValueError(
            f"every reward of {when} is NaN or infinite ({len(rewards)} samples, first values "
            f"{rewards[:4].tolist()}); check the reward function {reward!r}"
        )
    normalized = np.zeros_like(rewards)  # a sample whose reward failed contributes nothing
    if tracker is not None:
        normalized[finite] = tracker.update(prompts[finite], rewards[finite])
    else:
        normalized[finite] = batch_normalize(rewards[finite])
    return normalized


def normalize(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / (std + eps) over all entries (population std, as numpy)."""
    return (x - x.mean()) / (x.std(unbiased=False) + eps)


def temporal_advantages(returns: torch.Tensor, values: torch.Tensor, normalized: bool = True) -> torch.Tensor:
    """A_t = G_t - V(x_t), optionally normalized over all `(N, T)` entries."""
    if returns.shape != values.shape:
        raise ValueError(f"returns {tuple(returns.shape)} and values {tuple(values.shape)} must have the same shape")
    advantages = returns - values
    return normalize(advantages) if normalized else advantages


def clipped_value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, clip_range: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO2 value loss: 0.5 * mean(max((V - G)^2, (clip(V, V_old +- eps) - G)^2)); `clip_range=0` disables clipping.

    Returns the loss and the fraction of entries where the clipped term was the larger one.
    """
    unclipped = (values - returns) ** 2
    if clip_range <= 0:
        return 0.5 * unclipped.mean(), torch.zeros((), device=values.device)
    clipped_values = old_values + (values - old_values).clamp(-clip_range, clip_range)
    clipped = (clipped_values - returns) ** 2
    return 0.5 * torch.maximum(unclipped, clipped).mean(), (clipped > unclipped).float().mean()


def explained_variance(predictions: torch.Tensor, targets: torch.Tensor) -> float:
    """1 - Var(targets - predictions) / Var(targets): 1 is perfect, <= 0 no better than the mean. NaN if constant."""
    var_targets = targets.var(unbiased=False)
    if var_targets == 0:
        return float("nan")
    return float(1 - (targets - predictions).var(unbiased=False) / var_targets)
