"""Distribution-level rewards: a property of the model's output distribution (diversity, fairness), estimated on the
epoch's batch and credited back to the samples that make it.

A [`DistributionReward`] works in two stages, so that the batch can span processes without moving images:

1. `features(images, prompts, metadata) -> (B, D)`: per-sample features (embeddings, class probabilities), computed
   on each process for its own samples;
2. `rewards_from_features(features, prompts) -> (N,)`: on the features of the whole batch, gathered from every
   process. Samples are grouped by prompt; each group G gets a score S(G) (higher is better) and each sample its
   leave-one-out credit S(G) - S(G without it): positive when the sample moves the group toward the goal.

The trainer gathers the features of all processes before stage 2, so 1 process and 2 processes give every sample the
same reward for the same samples. `TDPOConfig.prompt_repeats` (set from `default_prompt_repeats` when left unset)
makes each prompt appear `k` times in a row, forming the groups.
"""

from collections import defaultdict
from collections.abc import Callable
from typing import Any, Optional, Union

import torch

from ..loading import check_hub_file


CREDIT_MODES = ("leave_one_out", "shared")
DISTANCES = ("total_variation", "kl")


def prompt_groups(prompts: list[str]) -> list[torch.Tensor]:
    """Indices of the samples of each distinct prompt, in order of first appearance."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i, prompt in enumerate(prompts):
        groups[prompt].append(i)
    return [torch.tensor(indices) for indices in groups.values()]


class DistributionReward:
    """Base class. Subclasses set `name` and implement `features` and `group_scores`.

    Args:
        credit: `"leave_one_out"` (each sample gets S(G) - S(G without it)) or `"shared"` (every sample of a group
            gets S(G); only useful when groups differ, since a shared reward has no contrast inside a group).
    """

    name = "distribution_reward"
    default_prompt_repeats = 1  # how many samples of one prompt an epoch's batch should hold (`prompt_repeats`)
    is_distribution_level = True

    def __init__(self, credit: str = "leave_one_out"):
        if credit not in CREDIT_MODES:
            raise ValueError(f"`credit` must be one of {CREDIT_MODES}, got {credit!r}")
        self.credit = credit

    def features(self, images: torch.Tensor, prompts, metadata=None) -> torch.Tensor:
        """`(B, 3, H, W)` images in [0, 1] -> `(B, D)` float features."""
        raise NotImplementedError

    def group_scores(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`(n, D)` features of one group -> `(S(G), S(G without i) for each i)`: a scalar and an `(n,)` tensor."""
        raise NotImplementedError

    def rewards_from_features(self, features: torch.Tensor, prompts: list[str]) -> tuple[torch.Tensor, dict]:
        """`(N, D)` features of the whole batch -> `(N,)` rewards and `{"group_score": mean S(G) over groups}`.
        A row with a NaN or infinite feature is left out of its group and rewarded NaN (the trainer gives it
        advantage 0); a group with no finite row has no score."""
        if len(prompts) != len(features):
            raise ValueError(f"{len(prompts)} prompts for {len(features)} feature rows")
        features = features.float()
        rewards = torch.full((len(features),), float("nan"), dtype=torch.float32, device=features.device)
        finite = torch.isfinite(features).all(1)  # a sample whose features failed is left out and rewarded NaN
        scores = []
        for group in prompt_groups(list(prompts)):
            group = group.to(features.device)
            group = group[finite[group]]
            if not len(group):
                continue
            score, without = self.group_scores(features[group])
            rewards[group] = score - without if self.credit == "leave_one_out" else score.expand(len(group))
            scores.append(score)
        group_score = torch.stack(scores).mean().item() if scores else float("nan")
        return rewards, {"group_score": group_score, "num_groups": len(scores)}

    def batch_score(self, images: torch.Tensor, prompts) -> float:
        """Mean S(G) over the prompt groups of a batch: the distribution metric itself (e.g. -TV to the target)."""
        with torch.no_grad():
            return self.rewards_from_features(self.features(images, prompts), list(prompts))[1]["group_score"]

    def __call__(self, images: torch.Tensor, prompts, metadata=None) -> tuple[torch.Tensor, dict]:
        """One process's batch as the whole batch (the trainer instead gathers `features` over processes)."""
        with torch.no_grad():
            return self.rewards_from_features(self.features(images, prompts, metadata), list(prompts))


def is_distribution_reward(function: Any) -> bool:
    return bool(getattr(function, "is_distribution_level", False))


DEFAULT_CLIP = "openai/clip-vit-large-patch14"  # `Diversity`'s default encoder


class Diversity(DistributionReward):
    """Within-prompt diversity: S(G) = mean pairwise cosine distance of the frozen embeddings of a prompt's images.

    Args:
        encoder: `images (B, 3, H, W) in [0, 1] -> (B, D)`; default: CLIP ViT-L/14 image embeddings (downloaded on
            first use), as `tdpo_trl.modeling_critic.CLIPImageFeatures`.
        credit: see [`DistributionReward`].

    A group of one image has S = 0 (no pairs); give each prompt at least 3 samples (`prompt_repeats`, default 4).
    """

    name = "diversity"
    default_prompt_repeats = 4

    def __init__(self, encoder: Optional[Callable] = None, credit: str = "leave_one_out"):
        super().__init__(credit)
        self._encoder = encoder

    @property
    def encoder(self) -> Callable:
        if self._encoder is None:
            from ..modeling_critic import CLIPImageFeatures

            self._encoder = CLIPImageFeatures.from_pretrained(DEFAULT_CLIP).eval()
        return self._encoder

    def check_available(self):
        """The default encoder, CLIP ViT-L/14, is cached or reachable (see `rewards.check_available`), if it will be
        used: not when an encoder was given, nor by a subclass with its own `features`."""
        if self._encoder is None and type(self).features is Diversity.features:
            check_hub_file(DEFAULT_CLIP, "config.json", f"reward {self.name!r} (its default encoder)")

    def features(self, images, prompts=None, metadata=None):
        with torch.no_grad():
            embeddings = self.encoder(images).float()  # (B, D)
        return torch.nn.functional.normalize(embeddings, dim=-1)

    def group_scores(self, features):
        n = len(features)
        distances = (1 - features @ features.T).clamp_min(0)  # (n, n) cosine distances, 0 on the diagonal
        total = distances.sum() / 2  # sum over pairs i < j
        pairs = n * (n - 1) / 2
        score = total / pairs if n > 1 else distances.new_zeros(())
        pairs_without = (n - 1) * (n - 2) / 2
        if pairs_without == 0:
            return score, distances.new_zeros(n)
        return score, (total - distances.sum(1)) / pairs_without  # removing i drops its n - 1 pairs


class StatisticalParity(DistributionReward):
    """Fairness as statistical parity: the distribution of an attribute over a prompt's images should match a target
    (uniform by default). S(G) = -distance(mean class probabilities of G, target).

    Args:
        attribute_classifier: `images (B, 3, H, W) in [0, 1] -> (B, C)` class probabilities (rows sum to 1).
        target: `(C,)` target distribution; default uniform.
        distance: `"total_variation"` (1/2 sum |p - q|, in [0, 1]) or `"kl"` (KL(p || q), p the batch's mean
            probabilities).
        hard: count the classifier's argmax labels (default) instead of averaging its probabilities. With
            `hard=False` a policy can score as balanced by drawing images the classifier cannot read (each one's
            probabilities near uniform): on digits, soft parity fell to TV 0.14 while an independent judge's counts
            said 0.33 (docs/distribution_rewards.md). Counts have no such shortcut.
        min_confidence: with `hard`, an image whose top probability is below this counts as "unreadable", an extra
            class whose target share is 0, so drawings the classifier can hardly read lower the score instead of
            filling a rare class by a hair. `None` (default): every image counts as its argmax.
        credit: see [`DistributionReward`].
    """

    name = "statistical_parity"

    def __init__(
        self,
        attribute_classifier: Callable,
        target: Optional[Union[torch.Tensor, list[float]]] = None,
        distance: str = "total_variation",
        hard: bool = True,
        min_confidence: Optional[float] = None,
        credit: str = "leave_one_out",
    ):
        super().__init__(credit)
        if not callable(attribute_classifier):
            raise TypeError(f"`attribute_classifier` must be callable, got {type(attribute_classifier).__name__}")
        if distance not in DISTANCES:
            raise ValueError(f"`distance` must be one of {DISTANCES}, got {distance!r}")
        if target is not None:
            given, target = target, torch.as_tensor(target, dtype=torch.float32)
            bad = target.dim() != 1 or not torch.isfinite(target).all() or (target < 0).any()
            if bad or abs(target.sum().item() - 1) > 1e-4:
                shown = given.tolist() if isinstance(given, torch.Tensor) else given
                raise ValueError(f"`target` must be a 1-d distribution (non-negative, sums to 1), got {shown}")
        if min_confidence is not None and not (hard and 0 < min_confidence <= 1):
            raise ValueError(f"`min_confidence` must be in (0, 1] and needs `hard=True`, got {min_confidence!r} with "
                             f"hard={hard}")  # fmt: skip
        self.attribute_classifier, self.target, self.distance, self.hard = attribute_classifier, target, distance, hard
        self.min_confidence = min_confidence

    def features(self, images, prompts=None, metadata=None):
        with torch.no_grad():
            probabilities = torch.as_tensor(self.attribute_classifier(images)).float()  # (B, C)
        if probabilities.dim() != 2 or len(probabilities) != len(images):
            raise ValueError(
                f"the attribute classifier must return (batch, classes) probabilities for {len(images)} images, got "
                f"shape {tuple(probabilities.shape)}"
            )
        if not self.hard:
            return probabilities
        confidence, labels = probabilities.max(1)
        classes = probabilities.shape[1]
        if self.min_confidence is None:
            counts = torch.nn.functional.one_hot(labels, classes).float()  # (B, C)
        else:
            labels = torch.where(confidence >= self.min_confidence, labels, classes)  # `classes`: unreadable
            counts = torch.nn.functional.one_hot(labels, classes + 1).float()  # (B, C + 1), last column: unreadable
        counts[~torch.isfinite(probabilities).all(1)] = float("nan")  # a failed reading counts as no sample
        return counts

    def _distance(self, p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:  # p (..., C), q (C,) -> (...)
        if self.distance == "total_variation":
            return 0.5 * (p - q).abs().sum(-1)
        p = p.clamp_min(1e-8)
        return (p * (p.log() - q.clamp_min(1e-8).log())).sum(-1)

    def group_scores(self, features):
        n, columns = features.shape
        classes = columns - (self.min_confidence is not None)  # without the "unreadable" column
        target = self.target if self.target is not None else torch.full((classes,), 1.0 / classes)
        if len(target) != classes:
            raise ValueError(f"`target` has {len(target)} classes but the attribute classifier returns {classes}")
        target = torch.cat([target, target.new_zeros(columns - classes)]).to(features.device)  # unreadable: 0
        total = features.sum(0)  # (C,)
        score = -self._distance(total / n, target)
        if n == 1:
            return score, score.new_zeros(1)
        without = (total[None] - features) / (n - 1)  # (n, C): the mean without sample i
        return score, -self._distance(without, target)


__all__ = ["DistributionReward", "Diversity", "StatisticalParity", "is_distribution_reward", "prompt_groups"]
