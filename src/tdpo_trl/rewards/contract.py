"""The reward contract, checked in one place: what a reward function must return, and the names rewards are known by.

Every reward the trainer, the evaluation and `WeightedSum` call goes through `call_reward_function` or
`check_reward_output`; each error says what came back (type, shape, first values) and what was expected.
"""

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ..validation import describe


REWARD_CONTRACT = (
    "a reward function must return `(rewards, metadata)`: `rewards` a 1-D tensor, array or list of floats with one "
    "value per image, `metadata` anything (e.g. `{}`)"
)


def short_name(spec: str) -> str:
    """The metric name of a reward spec: `"aesthetic"` -> `aesthetic`, `"pkg.mod:fn"` -> `fn`."""
    return spec.split(":")[-1].split(".")[-1]


def reward_name(function) -> str:
    name = getattr(function, "name", None) or getattr(function, "__name__", type(function).__name__)
    return "custom (lambda)" if name == "<lambda>" else name


def warm_up(*functions: Callable):
    """Load whatever each function loads lazily (its `warm_up()`, if it has one). A resumed run calls it before the
    RNG state is restored: a model built on the first call draws its initial weights from the global RNG, which an
    uninterrupted run drew before the checkpoint was written."""
    for function in functions:
        method = getattr(function, "warm_up", None)
        if callable(method):
            method()


def check_available(*functions: Callable):
    """Check now that the models each function loads lazily can be loaded (its `check_available()`, if it has one):
    a model missing offline is one `ValueError` before training, not a traceback after the first epoch's sampling."""
    for function in functions:
        method = getattr(function, "check_available", None)
        if callable(method):
            method()


def check_reward_output(result: Any, batch_size: int, name: str = "reward function") -> tuple[torch.Tensor, Any]:
    """`(rewards (B,) float32, metadata)` from what a reward function returned for `batch_size` images.

    Non-finite rewards are allowed here (the trainer drops them from the statistics and counts them); a wrong type,
    shape or length is a `ValueError` naming the function and what it returned.
    """
    if isinstance(result, (torch.Tensor, np.ndarray)) or not isinstance(result, (tuple, list)) or len(result) != 2:
        raise ValueError(f"{name} returned {describe(result)}; {REWARD_CONTRACT}, e.g. `return rewards, {{}}`")
    rewards, metadata = result
    if isinstance(rewards, (int, float, bool, str)) or rewards is None:  # e.g. a bare list [r0, r1]
        raise ValueError(f"{name} returned {describe(result)}; {REWARD_CONTRACT}, e.g. `return rewards, {{}}`")
    try:
        array = rewards.detach() if isinstance(rewards, torch.Tensor) else torch.as_tensor(rewards)  # device kept
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"{name} returned rewards {describe(rewards)}, which are not numbers ({err}); "
                         f"{REWARD_CONTRACT}") from None  # fmt: skip
    if not (array.dtype.is_floating_point or array.dtype in (torch.int8, torch.int16, torch.int32, torch.int64)):
        raise ValueError(f"{name} returned rewards {describe(rewards)}; expected numbers (floats), got {array.dtype}")
    if array.shape != (batch_size,):
        hint = " (squeeze the last dimension)" if array.shape == (batch_size, 1) else ""
        raise ValueError(
            f"{name} returned rewards {describe(rewards)} for a batch of {batch_size} images; expected shape "
            f"({batch_size},): one reward per image{hint}"
        )
    return array.to(torch.float32), metadata


def call_reward_function(function: Callable, images, prompts, metadata) -> tuple[torch.Tensor, Any]:
    """`function(images, prompts, metadata)`, its output checked by `check_reward_output`."""
    name = f"reward function {reward_name(function)!r}"
    return check_reward_output(function(images, prompts, metadata), len(images), name)
