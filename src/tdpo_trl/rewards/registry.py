"""Rewards by name: the built-in ones, those plugins register (the digits demo's `digit_*`), and dotted paths."""

import importlib
from collections.abc import Callable

from ..registry import Registry
from ..tiny_models import left_minus_right_brightness, mean_brightness
from .attribute_parity import AttributeParity
from .composition import CompositionReward
from .distribution import Diversity
from .models import (
    AestheticScore,
    CLIPScore,
    HPSv2,
    ImageRewardScore,
    PickScore,
    jpeg_compressibility,
    jpeg_incompressibility,
)


# name -> a reward class or a factory taking the reward's keyword arguments
REWARD_FUNCTIONS = Registry(
    "reward",
    {
        "aesthetic": AestheticScore,
        "pickscore": PickScore,
        "hpsv2": HPSv2,
        "imagereward": ImageRewardScore,
        "clip_score": CLIPScore,
        "jpeg_compressibility": lambda **kwargs: jpeg_compressibility,
        "jpeg_incompressibility": lambda **kwargs: jpeg_incompressibility,
        # distribution-level (`tdpo_trl.rewards.distribution`): one reward per sample from the whole batch
        "diversity": Diversity,
        "attribute_parity": AttributeParity,
        # object composition, GenEval-style (`tdpo_trl.rewards.composition`): dense score, and strict 0/1 for judging
        "composition": CompositionReward,
        "composition_correct": lambda **kwargs: CompositionReward(strict=True, **kwargs),
        # the tiny test models' learnable rewards (`tdpo_trl.tiny_models`)
        "brightness": lambda **kwargs: mean_brightness,
        "left_minus_right": lambda **kwargs: left_minus_right_brightness,
    },
)


def register_reward(name: str, factory: Callable = None):
    """Make `get_reward_function(name, **kwargs)` build `factory(**kwargs)`; usable as a class decorator."""
    return REWARD_FUNCTIONS.register(name, factory)


def get_reward_function(spec: str, **kwargs) -> Callable:
    """A reward by registry name (`REWARD_FUNCTIONS`) or dotted path (`"pkg.module:name"` or `"pkg.module.name"`).

    A class found by path is instantiated with `kwargs`; a function is returned as is (and takes no `kwargs`).
    """
    if spec in REWARD_FUNCTIONS:
        return _construct(spec, REWARD_FUNCTIONS[spec], kwargs)
    module_name, _, attribute = spec.partition(":") if ":" in spec else spec.rpartition(".")
    if not module_name or not attribute:
        raise ValueError(
            f"unknown reward {spec!r}: expected one of {sorted(REWARD_FUNCTIONS)} or a dotted path like "
            "'my_package.rewards:my_reward'"
        )
    try:
        found = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"cannot import reward {spec!r}: {err}") from err
    if isinstance(found, type):
        found = _construct(spec, found, kwargs)
    elif kwargs:
        raise ValueError(f"reward {spec!r} is a function and takes no keyword arguments, got {kwargs}")
    if not callable(found):
        raise ValueError(f"reward {spec!r} is a {type(found).__name__}, not a callable")
    return found


def _construct(spec: str, factory: Callable, kwargs: dict):
    try:
        return factory(**kwargs)
    except TypeError as err:  # an unknown or missing keyword: the user's kwargs, not a bug
        raise ValueError(f"reward {spec!r} does not accept the keyword arguments {kwargs}: {err}") from err
