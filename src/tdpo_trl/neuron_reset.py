"""Dormant and active neurons of the critic head, and their periodic reset (the "R" of TDPO-R).

A hidden neuron's score is its mean |activation| over a batch, divided by the mean score of its layer (Sokar et al.,
2023). A neuron is dormant when its score is at most a threshold, active otherwise. TDPO-R resets the ACTIVE neurons:
they fit early experience (primacy bias) while the dormant ones act as a regularizer.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .trainer_callback import TDPOCallback


RESET_TARGETS = ("active", "dormant", "all", "none")
SCORING_MODES = ("one_step_per_sample", "all_steps")
_PASSTHROUGH = (nn.Dropout, nn.Identity)


@dataclass
class HiddenLayer:
    """A hidden Linear layer, the nonlinearity read after it, and the Linear that consumes its neurons."""

    linear: nn.Linear
    activation: Callable[[torch.Tensor], torch.Tensor]
    next_linear: nn.Linear

    @property
    def num_neurons(self) -> int:
        return self.linear.out_features


def hidden_layers(head: nn.Module) -> list[HiddenLayer]:
    """Every Linear of `head` but the last, in order. The activation is the first module between a Linear and the
    next one that is not dropout or identity; without one (the paper's head), ReLU is applied when scoring."""
    modules = [m for m in head.modules() if m is not head and not list(m.children())]
    linear_positions = [i for i, m in enumerate(modules) if isinstance(m, nn.Linear)]
    if len(linear_positions) < 2:
        raise ValueError(f"the critic head needs at least 2 Linear layers to have hidden neurons, got {head}")
    layers = []
    for start, end in zip(linear_positions, linear_positions[1:]):
        linear, next_linear = modules[start], modules[end]
        if linear.out_features != next_linear.in_features:
            raise ValueError(
                f"cannot pair {linear} with the next Linear {next_linear}: {linear.out_features} outputs feed "
                f"{next_linear.in_features} inputs; neuron reset needs a plain MLP head"
            )
        between = [m for m in modules[start + 1 : end] if not isinstance(m, _PASSTHROUGH)]
        layers.append(HiddenLayer(linear, between[0] if between else F.relu, next_linear))
    return layers


@torch.no_grad()
def activation_sums(head: nn.Module, features: torch.Tensor, layers: list[HiddenLayer]) -> torch.Tensor:
    """Sum over the batch of |activation| of every hidden neuron, layers concatenated: `(sum of widths,)` float64.

    `head` runs in eval mode (no dropout) on `features` `(B, D)`; its train/eval mode is restored afterwards.
    """
    sums: dict[int, torch.Tensor] = {}

    def hook(index):
        def record(module, inputs, output):
            sums[index] = layers[index].activation(output).abs().double().sum(dim=0)  # (out_features,)

        return record

    handles = [layer.linear.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    was_training = head.training
    try:
        head.eval()
        head(features)
    finally:
        head.train(was_training)
        for handle in handles:
            handle.remove()
    return torch.cat([sums[i] for i in range(len(layers))])


def neuron_scores(mean_activations: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per layer: mean |activation| of each neuron divided by the layer's mean (+1e-9)."""
    return [means / (means.mean() + 1e-9) for means in mean_activations]


def mask_overlap(previous: torch.Tensor, current: torch.Tensor) -> Optional[float]:
    """|previous ∧ current| / min(|previous|, |current|) of two boolean masks; None when either is empty."""
    smaller = min(int(previous.sum()), int(current.sum()))
    if smaller == 0:
        return None
    return int((previous & current).sum()) / smaller


def _default_bound(fan_in: int) -> float:
    # PyTorch's nn.Linear init: kaiming_uniform_(a=sqrt(5)) gives U(-1/sqrt(fan_in), 1/sqrt(fan_in)); same for biases.
    return 1.0 / math.sqrt(fan_in)


def _draw(shape, fan_in: int, init_std: Optional[float], generator: torch.Generator) -> torch.Tensor:
    if init_std is not None:
        return torch.randn(shape, generator=generator) * init_std
    bound = _default_bound(fan_in)
    return torch.rand(shape, generator=generator) * (2 * bound) - bound


@torch.no_grad()
def reset_neurons(
    layers: list[HiddenLayer],
    masks: list[torch.Tensor],
    optimizer: Optional[torch.optim.Optimizer],
    generator: torch.Generator,
    init_std: Optional[float] = None,
) -> int:
    """Re-initialize the neurons where `masks[k]` is True; returns how many were reset.

    Neuron i of layer k: row i and bias i of `layers[k].linear`, column i of `layers[k].next_linear`. Weights are drawn
    from N(0, init_std) (biases of the reset rows set to 0), or from PyTorch's default Linear init when `init_std` is
    None. The optimizer's per-parameter state tensors (Adam's exp_avg, exp_avg_sq, ...) are zeroed at exactly those
    entries; step counts are kept. Random numbers come from `generator` only.
    """
    count = 0
    for layer, mask in zip(layers, masks):
        rows = mask.nonzero().flatten().cpu()
        if rows.numel() == 0:
            continue
        count += rows.numel()
        linear, next_linear = layer.linear, layer.next_linear
        weight = _draw((rows.numel(), linear.in_features), linear.in_features, init_std, generator)
        linear.weight[rows.to(linear.weight.device)] = weight.to(linear.weight)
        _zero_state(optimizer, linear.weight, (rows,))
        if linear.bias is not None:
            if init_std is not None:
                bias = torch.zeros(rows.numel())
            else:
                bias = _draw((rows.numel(),), linear.in_features, None, generator)
            linear.bias[rows.to(linear.bias.device)] = bias.to(linear.bias)
            _zero_state(optimizer, linear.bias, (rows,))
        column = _draw((next_linear.out_features, rows.numel()), next_linear.in_features, init_std, generator)
        next_linear.weight[:, rows.to(next_linear.weight.device)] = column.to(next_linear.weight)
        _zero_state(optimizer, next_linear.weight, (slice(None), rows))
    return count


def _zero_state(optimizer, param: torch.Tensor, index: tuple):
    if optimizer is None:
        return
    for value in optimizer.state.get(param, {}).values():  # a parameter that never stepped has no state
        if torch.is_tensor(value) and value.shape == param.shape:
            value[tuple(i.to(value.device) if torch.is_tensor(i) else i for i in index)] = 0


class ActiveNeuronResetCallback(TDPOCallback):
    """Score the critic's hidden neurons every epoch, log dormant/active statistics, and reset neurons periodically.

    After each epoch's training, the critic head runs once (no grad, eval mode) on the epoch's cached critic
    features; activation sums are summed across processes, so every process computes the same masks and resets the
    same neurons with the same random numbers. Resets draw from a dedicated generator seeded once (from `seed`, or
    the run's seed), so successive resets draw fresh numbers and the global RNG is untouched.

    Args:
        frequency: reset after every `frequency`-th epoch, `(epoch + 1) % frequency == 0`.
        threshold: dormant when the normalized score is `<= threshold`.
        target: `"active"` (TDPO-R), `"dormant"` (ReDo), `"all"`, or `"none"` (statistics only).
        scoring: which of the epoch's cached features `(n, T, D)` are scored: `"one_step_per_sample"` (each
            sample's features at one random step, `(n, D)`, as many as the official code scores) or `"all_steps"`.
        scoring_size: at most this many of them per process (random subset); `None`: no cap.
        schedule: `schedule(epoch) -> bool` to decide resets instead of `frequency`.
        seed: seed of the reset generator; `None` takes `trainer.config.seed`.
        init_std: std of re-drawn weights; `None` takes the head's `init_std` (the paper's N(0, 1/(d+1))) or,
            if it has none, PyTorch's default Linear init.

    Metrics added to the epoch's record: `neurons/dormant_fraction`, `neurons/active_fraction` (all hidden neurons)
    and per layer `neurons/layer_<k>/...`; `neurons/mask_overlap` between this and the previous dormant mask
    (omitted while either is empty); `neurons/reset_count` (resets so far) and `neurons/reset_neurons` (neurons
    reset this epoch).
    """

    def __init__(
        self,
        frequency: int = 10,
        threshold: float = 0.0,
        target: str = "active",
        scoring: str = "one_step_per_sample",
        scoring_size: Optional[int] = None,
        schedule: Optional[Callable[[int], bool]] = None,
        seed: Optional[int] = None,
        init_std: Optional[float] = None,
    ):
        if not isinstance(frequency, int) or frequency < 1:
            raise ValueError(f"`frequency` must be an integer >= 1, got {frequency!r}")
        if not (isinstance(threshold, (int, float)) and math.isfinite(threshold) and threshold >= 0):
            raise ValueError(f"`threshold` must be a finite number >= 0, got {threshold!r}")
        if target not in RESET_TARGETS:
            raise ValueError(f"`target` must be one of {RESET_TARGETS}, got {target!r}")
        if scoring not in SCORING_MODES:
            raise ValueError(f"`scoring` must be one of {SCORING_MODES}, got {scoring!r}")
        if scoring_size is not None and scoring_size < 1:
            raise ValueError(f"`scoring_size` must be None or >= 1, got {scoring_size!r}")
        self.frequency, self.threshold, self.target = frequency, float(threshold), target
        self.scoring, self.scoring_size, self.schedule = scoring, scoring_size, schedule
        self.seed, self.init_std = seed, init_std
        self.reset_count = 0
        self.dormant_masks: Optional[list[torch.Tensor]] = None  # from the latest measurement
        self._generator: Optional[torch.Generator] = None

    @classmethod
    def from_config(cls, config) -> "ActiveNeuronResetCallback":
        return cls(
            frequency=config.neuron_reset_frequency,
            threshold=config.neuron_reset_threshold,
            target=config.neuron_reset_target,
            scoring=config.neuron_reset_scoring,
            scoring_size=config.neuron_reset_scoring_size,
            seed=config.seed,
        )

    def should_reset(self, epoch: int) -> bool:
        if self.target == "none":
            return False
        return self.schedule(epoch) if self.schedule is not None else (epoch + 1) % self.frequency == 0

    def generator(self, trainer=None) -> torch.Generator:
        if self._generator is None:
            seed = self.seed if self.seed is not None else trainer.config.seed
            # an offset keeps this stream apart from anything seeded with the run seed itself
            self._generator = torch.Generator().manual_seed(int(seed) + 0x5EED)
        return self._generator

    def on_train_begin(self, trainer, **kwargs):
        if getattr(trainer, "critic", None) is None:
            raise ValueError("ActiveNeuronResetCallback needs a critic, but the trainer runs in DDPO mode (no critic)")
        hidden_layers(trainer.accelerator.unwrap_model(trainer.critic_head))  # fail early on an unsupported head

    def scored_features(self, trainer, features: torch.Tensor) -> torch.Tensor:
        """The rows of the epoch's cached features `(n, T, D)` that are scored, `(m, D)`."""
        if self.scoring == "all_steps":
            return features.flatten(0, 1)  # (n, T, D) -> (n * T, D)
        steps = torch.randint(features.shape[1], (len(features),), generator=self.generator(trainer))
        rows = torch.arange(len(features), device=features.device)
        return features[rows, steps.to(features.device)]  # (n, D)

    def measure(self, trainer, features: torch.Tensor) -> list[torch.Tensor]:
        """Dormant masks (one bool `(width,)` per hidden layer) from this process's `features` `(n, D)`, with the
        activation sums reduced across processes."""
        head = trainer.accelerator.unwrap_model(trainer.critic_head)
        layers = hidden_layers(head)
        if self.scoring_size is not None and self.scoring_size < len(features):
            subset = torch.randperm(len(features), generator=self.generator(trainer))[: self.scoring_size]
            features = features[subset.to(features.device)]
        sums = activation_sums(head, features, layers)
        counts = torch.tensor([float(len(features))], dtype=torch.float64, device=sums.device)
        totals = trainer.accelerator.reduce(torch.cat([sums, counts]), reduction="sum")
        means = (totals[:-1] / totals[-1]).split([layer.num_neurons for layer in layers])
        return [scores <= self.threshold for scores in neuron_scores(list(means))]

    def on_epoch_end(self, trainer, *, epoch: int, samples: dict, metrics: dict, **kwargs):
        dormant = self.measure(trainer, self.scored_features(trainer, samples["critic_features"]))
        metrics.update(self.statistics(dormant, self.dormant_masks))
        self.dormant_masks = [mask.cpu() for mask in dormant]

        reset = 0
        if self.should_reset(epoch):
            selected = {
                "active": [~mask for mask in dormant],
                "dormant": dormant,
                "all": [torch.ones_like(mask) for mask in dormant],
            }[self.target]
            head = trainer.accelerator.unwrap_model(trainer.critic_head)
            init_std = self.init_std if self.init_std is not None else getattr(head, "init_std", None)
            reset = reset_neurons(
                hidden_layers(head), selected, trainer.critic_optimizer, self.generator(trainer), init_std
            )
            self.reset_count += 1
        metrics["neurons/reset_count"] = self.reset_count
        metrics["neurons/reset_neurons"] = reset

    @staticmethod
    def statistics(dormant: list[torch.Tensor], previous: Optional[list[torch.Tensor]] = None) -> dict[str, float]:
        stats = {}
        for k, mask in enumerate(dormant):
            stats[f"neurons/layer_{k}/dormant_fraction"] = mask.float().mean().item()
            stats[f"neurons/layer_{k}/active_fraction"] = 1.0 - stats[f"neurons/layer_{k}/dormant_fraction"]
        everything = torch.cat([mask.cpu() for mask in dormant])
        stats["neurons/dormant_fraction"] = everything.float().mean().item()
        stats["neurons/active_fraction"] = 1.0 - stats["neurons/dormant_fraction"]
        if previous is not None:
            overlap = mask_overlap(torch.cat(previous), everything)
            if overlap is not None:
                stats["neurons/mask_overlap"] = overlap
        return stats

    def state_dict(self) -> dict:
        return {
            "reset_count": self.reset_count,
            "dormant_masks": self.dormant_masks,
            "generator": self._generator.get_state() if self._generator is not None else None,
        }

    def load_state_dict(self, state: dict):
        self.reset_count = int(state["reset_count"])
        self.dormant_masks = state["dormant_masks"]
        if state["generator"] is not None:
            self._generator = torch.Generator()
            self._generator.set_state(state["generator"])
