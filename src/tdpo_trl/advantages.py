"""Returns, temporal advantages and losses of TDPO-R, as pure tensor functions.

Shapes: N samples, T denoising steps (in sampling order: index 0 is the noisiest step).
"""

import torch


def discounted_returns(final_rewards: torch.Tensor, num_steps: int, gamma: float = 1.0) -> torch.Tensor:
    """Returns G_t of a trajectory whose only reward arrives after its last step.

    G_{T-1} = r and G_t = gamma * G_{t+1}, so G_t = gamma^(T-1-t) * r.

    Args:
        final_rewards: `(N,)` reward of each sample's final image.
    Returns:
        `(N, T)` returns.
    """
    exponents = torch.arange(num_steps - 1, -1, -1, device=final_rewards.device, dtype=final_rewards.dtype)
    return final_rewards[:, None] * gamma ** exponents[None, :]


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
