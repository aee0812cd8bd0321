"""A prompted-digit judge that shares nothing with the ink reward, the critic or the project's classifier.

A scikit-learn RBF support-vector classifier (a different model family: no convolutions, no learned features), fit
when first used on the 8x8 UCI digits exactly as scikit-learn ships them (`sklearn.datasets.load_digits`, the
training split every digits model uses). Images are read by averaging 16x16 -> 8x8 and rescaling to the UCI's 0..16
counts. Deterministic: the SVC has no randomness given its data. Needs `scikit-learn` (`pip install scikit-learn`).
"""

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from .data import label_of, train_test_split


@lru_cache(maxsize=1)
def independent_classifier():
    """The fitted `sklearn.svm.SVC` (its data and fit never touch the project's weights or assets)."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.svm import SVC
    except ImportError as err:
        raise ImportError("the independent digit judge needs scikit-learn: pip install scikit-learn") from err
    digits = load_digits()
    train_idx, _ = train_test_split(len(digits.target))
    features = digits.images.reshape(len(digits.target), -1)[train_idx.numpy()]  # (1500, 64), counts 0..16
    return SVC(C=10.0, gamma=0.001).fit(features, digits.target[train_idx.numpy()])


def uci_features(images: torch.Tensor) -> np.ndarray:
    """`(B, 3, 16, 16)` images in [0, 1] -> `(B, 64)` UCI-style 8x8 counts in [0, 16]."""
    small = F.avg_pool2d(images.float().cpu().mean(1, keepdim=True), 2)  # (B, 1, 8, 8) in [0, 1]
    return (small.clamp(0, 1) * 16).flatten(1).numpy()


def independent_labels(images: torch.Tensor) -> torch.Tensor:
    """The digit the independent judge reads in each `(B, 3, 16, 16)` image in [0, 1], `(B,)`."""
    return torch.as_tensor(independent_classifier().predict(uci_features(images)))


class DigitAccuracyIndependent:
    """1 when the independent scikit-learn judge reads the digit the prompt names, else 0; NaN for a prompt that
    names no digit (as `digit_accuracy`)."""

    name = "digit_accuracy_independent"

    def warm_up(self):
        independent_classifier()

    def __call__(self, images, prompts, metadata=None):
        labels = independent_labels(images)
        wanted = torch.tensor([label_of(p) for p in prompts])
        correct = (labels == wanted).float()
        return torch.where(wanted >= 0, correct, torch.full_like(correct, float("nan"))).to(images.device), {}
