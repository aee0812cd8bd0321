"""Rewards: the contract every reward keeps (`contract`), per-image reward models (`models`), distribution-level
rewards (`distribution`, `attribute_parity`), object composition (`composition`, `composition_prompts`), CLIP
zero-shot classification (`zero_shot`), `WeightedSum`, and the registry that builds any of them by name (`registry`).

Build one by name with `get_reward_function("aesthetic")`, or a function of your own by dotted path
(`"my_package.rewards:sharpness"`). A reward class a plugin registers (e.g. the digits demo's `DigitInk`) is also
importable from here by its class name.
"""

from .attribute_parity import AttributeParity
from .composition import CompositionReward, Detection, OWLDetector, score_composition
from .composition_prompts import Composition, Wanted, composition_prompts, parse_composition
from .contract import (
    REWARD_CONTRACT,
    call_reward_function,
    check_available,
    check_reward_output,
    reward_name,
    short_name,
    warm_up,
)
from .distribution import (
    CREDIT_MODES,
    DISTANCES,
    DistributionReward,
    Diversity,
    StatisticalParity,
    is_distribution_reward,
    prompt_groups,
)
from .models import (
    AestheticScore,
    CLIPScore,
    CLIPTextImageScore,
    HPSv2,
    ImageRewardScore,
    PickScore,
    jpeg_compressibility,
    jpeg_incompressibility,
)
from .registry import REWARD_FUNCTIONS, get_reward_function, register_reward
from .weighted_sum import WeightedSum
from .zero_shot import ZeroShotClassifier


def __getattr__(name: str):
    """A reward class registered by a plugin, by its class name (`from tdpo_trl.rewards import DigitInk`)."""
    if name.startswith("__"):  # introspection (`__wrapped__`, `__path__`, ...) loads no plugin
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    for factory in REWARD_FUNCTIONS.values():
        if isinstance(factory, type) and factory.__name__ == name:
            return factory
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CREDIT_MODES",
    "DISTANCES",
    "REWARD_CONTRACT",
    "REWARD_FUNCTIONS",
    "AestheticScore",
    "AttributeParity",
    "Composition",
    "CompositionReward",
    "Detection",
    "OWLDetector",
    "Wanted",
    "ZeroShotClassifier",
    "composition_prompts",
    "parse_composition",
    "score_composition",
    "CLIPScore",
    "CLIPTextImageScore",
    "DistributionReward",
    "Diversity",
    "HPSv2",
    "ImageRewardScore",
    "PickScore",
    "StatisticalParity",
    "WeightedSum",
    "call_reward_function",
    "check_reward_output",
    "get_reward_function",
    "is_distribution_reward",
    "prompt_groups",
    "jpeg_compressibility",
    "jpeg_incompressibility",
    "register_reward",
    "reward_name",
    "short_name",
    "check_available",
    "warm_up",
]
