"""Distribution-level rewards on the embedded digits model, read by its shipped classifier."""

from typing import Optional

import torch

from ..rewards.distribution import Diversity, StatisticalParity
from .judges import grayscale, shared_judges


class DigitParity(StatisticalParity):
    """`digit_parity`: the drawn digits' class distribution should be uniform over 0-9 (statistical parity with the
    shipped classifier as the attribute classifier; total-variation distance). For prompts that name no digit,
    e.g. "a handwritten digit", which the base model answers with a 4 most of the time. Counts the classifier's
    labels (`hard=True`); `min_confidence=0.9` also counts images it reads with less confidence as "unreadable" (95%
    of the base model's samples pass 0.9; measured in docs/distribution_rewards.md)."""

    name = "digit_parity"

    def __init__(self, judges_path: Optional[str] = None, **kwargs):
        super().__init__(self._probabilities, **kwargs)
        self.judges_path = judges_path

    def warm_up(self):
        shared_judges(self.judges_path)

    def _probabilities(self, images: torch.Tensor) -> torch.Tensor:  # (B, 3, 16, 16) in [0, 1] -> (B, 10)
        classifier = shared_judges(self.judges_path).classifier
        return classifier(grayscale(images.float().cpu())).softmax(-1).to(images.device)


class DigitDiversity(Diversity):
    """`digit_diversity`: within-prompt diversity in the shipped classifier's 64-d feature space (cosine distance),
    i.e. variety of style among the images of one prompt, in groups of 8 samples per prompt.

    Each sample's leave-one-out diversity credit is added to `accuracy_weight` x (1 if the classifier reads the digit
    its prompt names, else 0; 0 for prompts that name none). Without that term the cheapest way to be different is to
    draw another digit; with it (0.02, a wrong digit costing about twice a typical credit) the policy has to find
    variety within the digit. The group score (`reward/group_score`, the held-out `target`) is the diversity alone.
    Measured in docs/distribution_rewards.md.
    """

    name = "digit_diversity"
    default_prompt_repeats = 8

    def __init__(self, judges_path: Optional[str] = None, accuracy_weight: float = 0.02, **kwargs):
        super().__init__(encoder=self._features, **kwargs)
        if not accuracy_weight >= 0:
            raise ValueError(f"`accuracy_weight` must be >= 0, got {accuracy_weight!r}")
        self.judges_path, self.accuracy_weight = judges_path, accuracy_weight

    def warm_up(self):
        shared_judges(self.judges_path)

    def _features(self, images: torch.Tensor) -> torch.Tensor:  # (B, 3, 16, 16) in [0, 1] -> (B, 64)
        classifier = shared_judges(self.judges_path).classifier
        return classifier.features(grayscale(images.float().cpu())).to(images.device)

    def features(self, images, prompts=None, metadata=None):  # -> (B, 64 + 1): unit features, then accuracy
        features = super().features(images, prompts, metadata)
        accuracy = features.new_zeros(len(features))  # no prompts: no digit named
        if prompts is not None:
            accuracy = shared_judges(self.judges_path).score(images, list(prompts), names=("accuracy",))["accuracy"]
        return torch.cat([features, accuracy.nan_to_num(0.0).to(features)[:, None]], dim=1)

    def group_scores(self, features):
        return super().group_scores(features[:, :-1])  # diversity of the features, without the accuracy column

    def rewards_from_features(self, features, prompts):
        rewards, info = super().rewards_from_features(features, prompts)
        return rewards + self.accuracy_weight * features[:, -1].float(), info


class DigitPixelDiversity(Diversity):
    """`digit_pixel_diversity`: within-prompt diversity in pixel space (cosine distance of the centered 16x16
    grayscale images). An eval metric for `digit_diversity` that shares nothing with the classifier its features
    come from: a policy that fools the classifier's feature space without changing the drawings does not raise it."""

    name = "digit_pixel_diversity"

    def __init__(self, **kwargs):
        super().__init__(encoder=self._pixels, **kwargs)

    @staticmethod
    def _pixels(images: torch.Tensor) -> torch.Tensor:  # (B, 3, 16, 16) in [0, 1] -> (B, 256)
        pixels = grayscale(images.float()).flatten(1)  # (B, H * W) in [-1, 1]
        return pixels - pixels.mean(dim=1, keepdim=True)  # centered: a uniform brightness shift is no variety


class DigitParityIndependent(StatisticalParity):
    """`digit_parity_independent`: the class distribution's total-variation distance to uniform as read by the
    independent scikit-learn judge (`tdpo_trl.digits.independent_judge`; hard labels). An eval metric that shares
    nothing with `digit_parity`'s classifier. Needs scikit-learn."""

    name = "digit_parity_independent"

    def __init__(self, **kwargs):
        kwargs.setdefault("hard", True)
        super().__init__(self._one_hot, **kwargs)

    def warm_up(self):
        from .independent_judge import independent_classifier

        independent_classifier()

    @staticmethod
    def _one_hot(images: torch.Tensor) -> torch.Tensor:  # (B, 3, 16, 16) in [0, 1] -> (B, 10)
        from .independent_judge import independent_labels

        return torch.nn.functional.one_hot(independent_labels(images).long(), 10).float().to(images.device)
