"""scikit-learn's digits (1,797 8x8 images, UCI) as 16x16 RGB text-to-image data, and the prompts that name them."""

import os
import re
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F


ASSETS = os.path.join(os.path.dirname(__file__), "assets")
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
TEMPLATES = ["a handwritten digit {word}", "a drawing of the number {n}", "the digit {word}"]
NUM_TRAIN = 1500  # the rest (297) is held out, for the judges' accuracy and the base's realism reference
MAX_PROMPT_LENGTH = 8  # tokens, with <bos> and <eos>; the longest template has 6 words
_LABEL_PATTERN = re.compile(r"\b(" + "|".join(WORDS) + r"|[0-9])\b")


def load_digits(source: Optional[str] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Images `(1797, 3, 16, 16)` in [-1, 1] (8x8 upsampled bilinearly) and labels `(1797,)`.

    `source=None` reads the copy shipped in `assets/digits.safetensors`; `"sklearn"` reads scikit-learn's.
    """
    if source == "sklearn":
        from sklearn.datasets import load_digits as sklearn_digits

        digits = sklearn_digits()
        pixels, labels = torch.tensor(digits.images, dtype=torch.uint8), torch.tensor(digits.target)
    elif source is None:
        from safetensors.torch import load_file

        tensors = load_file(os.path.join(ASSETS, "digits.safetensors"))
        pixels, labels = tensors["pixels"], tensors["labels"].long()
    else:
        raise ValueError(f"load_digits: source must be None (the shipped copy) or 'sklearn', got {source!r}")
    images = pixels[:, None].float() / 16.0  # (N, 1, 8, 8) in [0, 1]; the UCI data counts 0..16 pixels per cell
    images = F.interpolate(images, size=(16, 16), mode="bilinear", align_corners=False)
    return (images * 2 - 1).repeat(1, 3, 1, 1), labels


def train_test_split(num_images: int = 1797, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed split every digits model uses: a seeded permutation, the first `NUM_TRAIN` for training."""
    order = torch.randperm(num_images, generator=torch.Generator().manual_seed(seed))
    return order[:NUM_TRAIN], order[NUM_TRAIN:]


def prompt_for(label: int, rng: np.random.Generator, drop_probability: float = 0.1) -> str:
    """A random template naming `label`; `""` with `drop_probability` (for classifier-free guidance)."""
    if rng.random() < drop_probability:
        return ""
    return TEMPLATES[rng.integers(len(TEMPLATES))].format(word=WORDS[label], n=label)


def label_of(prompt: str) -> int:
    """The digit a prompt names ("a handwritten digit seven" -> 7, "the number 7" -> 7); -1 when it names none."""
    match = _LABEL_PATTERN.search(prompt.lower())
    if match is None:
        return -1
    token = match.group(1)
    return int(token) if token.isdigit() else WORDS.index(token)


def pretraining_dataset(seed: int = 0, drop_probability: float = 0.1):
    """The base model's training digits as a `datasets.Dataset` (`image`: 16x16 RGB uint8 arrays, `text`: a caption
    naming the digit, empty with `drop_probability` as in training), for the pretraining-loss regularizer."""
    from datasets import Dataset

    images, labels = load_digits()
    train_idx, _ = train_test_split(len(images))
    rng = np.random.default_rng(seed)
    pixels = ((images[train_idx] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    captions = [prompt_for(int(labels[i]), rng, drop_probability) for i in train_idx]
    return Dataset.from_dict({"image": list(pixels), "text": captions})
