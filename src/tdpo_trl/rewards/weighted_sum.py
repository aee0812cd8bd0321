"""`WeightedSum`: several rewards scored on the same samples, weighted and added."""

from collections.abc import Callable
from typing import Optional

import torch

from ..modeling_critic import shared_image_features
from .contract import check_available, check_reward_output, warm_up
from .distribution import is_distribution_reward


class WeightedSum:
    """`sum_k weight_k * reward_k(images, prompts, metadata)`; each component's scores are returned in the metadata
    (`metadata["components"][name]`, a `(B,)` tensor) and logged as `reward/<name>/mean`.

    Components may be [distribution-level](distribution_rewards.md) (e.g. `Diversity`): the sum is then one itself
    (`is_distribution_level`, the largest `default_prompt_repeats` of its components). Its features are each
    distribution component's features beside each per-image component's score (one column), gathered over
    processes as any distribution reward's; each sample's reward is the weighted sum of its leave-one-out credits and
    its per-image scores, and its `group_score` (the held-out target) the weighted sum of the distribution components'
    group scores and the per-image components' means.

    Example:
        ```python
        from tdpo_trl.rewards import WeightedSum, jpeg_compressibility, jpeg_incompressibility

        reward = WeightedSum({"small": (jpeg_compressibility, 1.0), "detailed": (jpeg_incompressibility, 0.5)})
        ```
    """

    def __init__(self, components: dict[str, tuple[Callable, float]]):
        if not components:
            raise ValueError("WeightedSum needs at least one (reward, weight) component")
        for name, value in components.items():
            if not (isinstance(value, tuple) and len(value) == 2 and callable(value[0])):
                raise ValueError(f"component {name!r} must be a (reward_function, weight) pair, got {value!r}")
        self.components = components
        self.reward_names = [f"{w:g} x {name}" for name, (_, w) in components.items()]
        distribution = [f for f, _ in components.values() if is_distribution_reward(f)]
        self.is_distribution_level = bool(distribution)
        self.default_prompt_repeats = max((f.default_prompt_repeats for f in distribution), default=1)
        self._widths: Optional[list[int]] = None  # feature columns per component, known after `features`

    def __call__(self, images, prompts=None, metadata=None):
        if self.is_distribution_level:  # one process's batch as the whole batch
            with torch.no_grad():
                return self.rewards_from_features(self.features(images, prompts, metadata), list(prompts))
        total, scores = 0.0, {}
        for name, (function, weight) in self.components.items():
            rewards, _ = function(images, prompts, metadata)
            scores[name] = torch.as_tensor(rewards, dtype=torch.float32, device=images.device)
            total = total + weight * scores[name]
        return total, {"components": scores}

    def features(self, images, prompts, metadata=None) -> torch.Tensor:
        """`(B, sum of widths)`: each distribution component's features, each per-image component's score column."""
        columns = []
        for name, (function, _) in self.components.items():
            if is_distribution_reward(function):
                columns.append(torch.as_tensor(function.features(images, prompts, metadata)).float())
            else:
                rewards, _ = check_reward_output(function(images, prompts, metadata), len(images), repr(name))
                columns.append(rewards.float()[:, None])  # (B, 1)
        self._widths = [c.shape[1] for c in columns]
        return torch.cat([c.to(images.device) for c in columns], dim=1)

    def rewards_from_features(self, features: torch.Tensor, prompts: list[str]) -> tuple[torch.Tensor, dict]:
        """`(N, D)` features of the whole batch -> `(N,)` weighted rewards, `{"group_score", "components"}`."""
        if self._widths is None or sum(self._widths) != features.shape[1]:
            raise ValueError(f"WeightedSum features of shape {tuple(features.shape)} do not match its components' "
                             f"widths {self._widths}; compute them with its `features`")  # fmt: skip
        total, components, score = 0.0, {}, 0.0
        for (name, (function, weight)), block in zip(self.components.items(), features.split(self._widths, dim=1)):
            if is_distribution_reward(function):
                rewards, info = function.rewards_from_features(block, prompts)
                score += weight * info["group_score"]
            else:
                rewards = block[:, 0]
                score += weight * rewards[torch.isfinite(rewards)].mean().item()
            components[name] = rewards
            total = total + weight * rewards
        return total, {"group_score": score, "components": components}

    def batch_score(self, images: torch.Tensor, prompts) -> float:
        """The weighted sum of the components' batch scores (see the class docstring)."""
        with torch.no_grad():
            return self.rewards_from_features(self.features(images, prompts), list(prompts))[1]["group_score"]

    def warm_up(self):
        for function, _ in self.components.values():
            warm_up(function)

    def check_available(self):
        for function, _ in self.components.values():
            check_available(function)

    def image_features(self, name_or_path: str):
        """A component's image features for a critic reading `name_or_path` (see `_LazyModelReward.image_features`)."""
        return shared_image_features([function for function, _ in self.components.values()], name_or_path)
