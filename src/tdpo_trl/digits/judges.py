"""Judges of generated digits: a classifier, a learned "ink" reward, and two realism scores.

The ink reward imitates how the LAION aesthetic reward is built (an MLP head on a frozen image encoder's features),
so, like it, it can be over-optimized: a policy can raise the head's output in ways the true stroke mass, the
prompted digit and the realism of the image do not follow.

Every judge takes images `(B, 3, 16, 16)` in [0, 1] (what the pipeline returns) and works on their grayscale.
"""

import os
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .data import ASSETS, label_of, load_digits, train_test_split


def grayscale(images: torch.Tensor) -> torch.Tensor:
    """`(B, 3, H, W)` in [0, 1] -> `(B, 1, H, W)` in [-1, 1], the judges' input."""
    return images.float().mean(1, keepdim=True) * 2 - 1


def stroke_mass(images: torch.Tensor) -> torch.Tensor:
    """The true amount of ink: mean pixel intensity in [0, 1], `(B,)`. The ink regressor learns to predict it."""
    return images.float().mean(dim=(1, 2, 3))


def vary_strokes(images: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Thicker or thinner strokes (a random blend towards a 3x3 dilation or erosion) and random contrast: the data
    the ink regressor learns stroke mass from. `(B, 3, H, W)` in [0, 1] -> the same shape, grayscale."""
    gray = images.float().mean(1, keepdim=True)  # (B, 1, H, W)
    dilated = F.max_pool2d(gray, 3, 1, 1)
    eroded = -F.max_pool2d(-gray, 3, 1, 1)
    amount = torch.rand(len(gray), 1, 1, 1, generator=generator) * 2 - 1
    varied = torch.where(amount > 0, gray + amount * (dilated - gray), gray - amount * (eroded - gray))
    varied = varied * (0.7 + 0.3 * torch.rand(len(gray), 1, 1, 1, generator=generator))
    return varied.repeat(1, 3, 1, 1)


class DigitClassifier(nn.Module):
    """A small CNN on 16x16 grayscale digits in [-1, 1]; `features` (64-d) also feed the ink regressor."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(32 * 4 * 4, 64), nn.ReLU(),
        )  # fmt: skip
        self.head = nn.Linear(64, 10)

    def forward(self, gray: torch.Tensor) -> torch.Tensor:  # (B, 1, 16, 16) -> logits (B, 10)
        return self.head(self.features(gray))


class DigitClassifierFeatures(nn.Module):
    """Critic encoder `critic_encoder="digit_classifier"`: the frozen classifier's 64-d features of decoded images,
    exactly what the ink reward's head reads (as the paper's critic reads the CLIP features of the aesthetic reward).
    """

    def __init__(self, classifier: DigitClassifier):
        super().__init__()
        self.classifier = classifier.eval().requires_grad_(False)
        self.feature_dim = classifier.head.in_features
        self.needs_pixels = True

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # (B, 3, 16, 16) in [0, 1] -> (B, 64)
        return self.classifier.features(grayscale(images))


class InkRegressor(nn.Module):
    """An MLP on the frozen classifier's features predicting stroke mass (the aesthetic head's shape)."""

    def __init__(self, in_features: int = 64, hidden: int = 64):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:  # (B, 64) -> (B,)
        return self.mlp(features).squeeze(-1)


class GaussianRealism(nn.Module):
    """Log-likelihood per pixel under a Gaussian fit to real digits (probabilistic PCA: `mean`, `precision`).

    Equals scikit-learn's `PCA(n_components).fit(real).score_samples(x) / 256` on flattened grayscale in [0, 1].
    """

    def __init__(self, dim: int = 256):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("precision", torch.eye(dim))
        self.register_buffer("logdet_precision", torch.zeros(()))

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # (B, 3, 16, 16) in [0, 1] -> (B,)
        x = images.float().mean(1).flatten(1) - self.mean  # (B, 256)
        dim = x.shape[1]
        quadratic = ((x @ self.precision) * x).sum(1)
        log_likelihood = -0.5 * (dim * torch.log(torch.tensor(2 * torch.pi)) - self.logdet_precision + quadratic)
        return log_likelihood / dim


class DigitJudges(nn.Module):
    """All judges, loaded from one safetensors file (`assets/judges.safetensors` by default).

    `reference` holds the real training digits `(1500, 256)` in [0, 1] (grayscale, flattened) for the nearest-real
    distance; it is rebuilt from the shipped dataset, not stored.
    """

    def __init__(self, images: Optional[torch.Tensor] = None):  # (1797, 3, 16, 16) in [-1, 1]; None: shipped
        super().__init__()
        self.classifier = DigitClassifier()
        self.ink = InkRegressor()
        self.realism = GaussianRealism()
        if images is None:
            images, _ = load_digits()
        train_idx, _ = train_test_split(len(images))
        self.register_buffer("reference", ((images[train_idx] + 1) / 2).mean(1).flatten(1), persistent=False)

    @classmethod
    def from_file(cls, path: Optional[str] = None) -> "DigitJudges":
        from safetensors.torch import load_file

        path = path or os.path.join(ASSETS, "judges.safetensors")
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"digit judges file {path!r} does not exist (maintainer_scripts/train_digits_base.py writes one)"
            )
        state = load_file(path)
        judges = cls()
        judges.load_state_dict(state)
        return judges.eval().requires_grad_(False)

    def save(self, path: str):
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, path)

    @torch.no_grad()
    def score(
        self, images: torch.Tensor, prompts: Optional[list[str]] = None, names: Optional[tuple[str, ...]] = None
    ) -> dict[str, torch.Tensor]:
        """Per-image scores `(B,)` of the judges in `names` (default: all; `accuracy` only with prompts, NaN for a
        prompt that names no digit). Only the requested judges run."""
        names = names or ("ink", "stroke_mass", "realism", "nearest_real") + (("accuracy",) if prompts else ())
        images = images.float().cpu()
        features = self.classifier.features(grayscale(images)) if {"ink", "accuracy"} & set(names) else None
        scores = {}
        for name in names:
            if name == "ink":
                scores[name] = self.ink(features)
            elif name == "stroke_mass":
                scores[name] = stroke_mass(images)
            elif name == "realism":
                scores[name] = self.realism(images)
            elif name == "nearest_real":
                flat = images.mean(1).flatten(1)  # (B, 256) in [0, 1]
                scores[name] = torch.cdist(flat, self.reference).min(1).values / 16.0  # RMS pixel distance
            elif name == "accuracy":
                labels = torch.tensor([label_of(p) for p in prompts])
                correct = (self.classifier.head(features).argmax(1) == labels).float()
                scores[name] = torch.where(labels >= 0, correct, torch.full_like(correct, float("nan")))
            else:
                raise ValueError(f"unknown judge {name!r}; expected ink, stroke_mass, realism, nearest_real, accuracy")
        return scores


_SHARED: dict[Optional[str], DigitJudges] = {}


def shared_judges(path: Optional[str] = None) -> DigitJudges:
    """One loaded `DigitJudges` per file, shared by the reward functions below."""
    if path not in _SHARED:
        _SHARED[path] = DigitJudges.from_file(path)
    return _SHARED[path]


class _DigitReward:
    key = ""

    def __init__(self, judges_path: Optional[str] = None):
        self.judges_path = judges_path

    def warm_up(self):
        shared_judges(self.judges_path)

    def __call__(self, images, prompts=None, metadata=None):
        scores = shared_judges(self.judges_path).score(images, prompts, names=(self.key,))
        return scores[self.key].to(images.device), {}


class DigitInk(_DigitReward):
    """The learned ink reward (the demo's target): the ink regressor's prediction of stroke mass."""

    name, key = "digit_ink", "ink"


class DigitAccuracy(_DigitReward):
    """1 when the classifier reads the digit the prompt names, else 0; its mean is prompted-digit accuracy."""

    name, key = "digit_accuracy", "accuracy"


class DigitRealism(_DigitReward):
    """Log-likelihood per pixel under a Gaussian (PPCA) fit to real digits; higher is more digit-like."""

    name, key = "digit_realism", "realism"


class DigitNearestReal(_DigitReward):
    """RMS pixel distance to the nearest real training digit (lower is closer to real data)."""

    name, key = "digit_nearest_real", "nearest_real"


class DigitStrokeMass(_DigitReward):
    """The true stroke mass (mean intensity), which the ink regressor approximates."""

    name, key = "digit_stroke_mass", "stroke_mass"
