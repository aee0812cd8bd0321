"""One optimizer step for several models trained by one loss (the policy and the critic).

`Accelerator.clip_grad_norm_` unscales the gradients of every prepared optimizer, so calling it once per model makes
the second call raise under fp16 ("unscale_() has already been called"); and each `AcceleratedOptimizer.step` calls
`GradScaler.update()`, which makes the next optimizer's gradients be unscaled a second time. Here the gradients are
unscaled once, clipped per model with its own norm, every optimizer steps through the scaler, and the scale is
updated once, as PyTorch documents for several optimizers. A step whose gradient norm is NaN or infinite is skipped
(by the scaler under fp16, by us otherwise), so a non-finite loss never reaches the weights.
"""

import math
from dataclasses import dataclass

import numpy as np
import torch
from accelerate.logging import get_logger


logger = get_logger(__name__)


@dataclass
class OptimizerGroup:
    """An accelerate-prepared optimizer, the parameters it updates and their gradient-norm limit."""

    name: str
    optimizer: torch.optim.Optimizer  # an `accelerate.optimizer.AcceleratedOptimizer`
    parameters: list[torch.nn.Parameter]
    max_grad_norm: float


def _inner(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # the torch optimizer inside an AcceleratedOptimizer


def grad_norm_stats(grad_norms: dict[str, list[float]], epoch: int) -> dict[str, float]:
    """`<model>/grad_norm` (mean of the finite norms) and `<model>/skipped_steps` (steps whose gradient was NaN or
    infinite) of an epoch's `{model: [norm per optimizer step]}`. Gradients are all-reduced before their norm is
    taken, so every process counts the same."""
    stats = {}
    for name, norms in grad_norms.items():
        if not norms:
            continue
        finite = [n for n in norms if math.isfinite(n)]
        stats[f"{name}/grad_norm"] = float(np.mean(finite)) if finite else float("nan")
        stats[f"{name}/skipped_steps"] = len(norms) - len(finite)
        if len(finite) < len(norms):
            logger.warning(
                f"epoch {epoch}: skipped {len(norms) - len(finite)} of {len(norms)} {name} optimizer steps whose "
                "loss or gradient was NaN or infinite (under fp16 loss scaling a few skips are expected while "
                "the scale settles)"
            )
    return stats


def clip_and_step(accelerator, groups: list[OptimizerGroup]) -> dict[str, tuple[float, bool]]:
    """Unscale once, clip each group to its own norm, step the groups whose norm is finite, zero all gradients.

    Call it only when `accelerator.sync_gradients` is true. Returns `{name: (grad_norm_before_clipping, stepped)}`.
    """
    scaler = accelerator.scaler
    if scaler is not None:
        for group in groups:
            scaler.unscale_(_inner(group.optimizer))
    results = {}
    for group in groups:
        norm = float(torch.nn.utils.clip_grad_norm_(group.parameters, group.max_grad_norm))
        finite = math.isfinite(norm)
        if scaler is not None:
            scaler.step(_inner(group.optimizer))  # skipped by the scaler when it found inf/NaN while unscaling
        elif finite:
            _inner(group.optimizer).step()
        results[group.name] = (norm, finite)
    if scaler is not None:
        scaler.update()  # once per step: lowers the scale after an overflow
    for group in groups:
        _inner(group.optimizer).zero_grad(set_to_none=True)
    return results


class EpochLearningRate:
    """The policy's learning rate per epoch: `train_learning_rate` x transformers' schedule (`get_scheduler`) with one
    step per epoch. Stateless: epoch `e`'s rate is set at its start from `e` alone, so a resumed run trains at the
    rates of an uninterrupted one without a scheduler in the checkpoint."""

    def __init__(self, optimizer: torch.optim.Optimizer, name: str, num_epochs: int, warmup_epochs: int = 0):
        from transformers import get_scheduler

        if name == "constant" and warmup_epochs:
            name = "constant_with_warmup"
        self.optimizer = optimizer = _inner(optimizer)
        self.base_rates = [group["lr"] for group in optimizer.param_groups]
        # the scheduler only holds the schedule (epoch -> factor); it is never stepped
        self.schedule = get_scheduler(name, optimizer, num_warmup_steps=warmup_epochs, num_training_steps=num_epochs)

    def set_epoch(self, epoch: int) -> float:
        """Set every parameter group's rate for `epoch`; returns the first group's."""
        factor = self.schedule.lr_lambdas[0](epoch)
        for group, rate in zip(self.optimizer.param_groups, self.base_rates):
            group["lr"] = rate * factor
        return self.optimizer.param_groups[0]["lr"]
