"""`attribute_parity`: fairness by name. Statistical parity of an attribute read by CLIP zero-shot classification.

    tdpo-trl train ... --reward attribute_parity \\
        --reward_kwargs '{"attributes": ["a photo of a man", "a photo of a woman"]}'

Each image is classified among `attributes` by a CLIP checkpoint (default CLIP ViT-L/14, shared with any reward or
critic that reads the same checkpoint); `StatisticalParity` counts the labels per prompt and rewards each sample by
how much it moves its prompt's distribution toward `target` (uniform by default). What a zero-shot reading can and
cannot judge: docs/reward_families.md.
"""

from typing import Optional, Union

import torch

from .distribution import StatisticalParity
from .zero_shot import DEFAULT_CLIP, ZeroShotClassifier


class AttributeParity(StatisticalParity):
    """Statistical parity over CLIP zero-shot classes.

    Args:
        attributes: one text per class, e.g. `["a photo of a man", "a photo of a woman"]` (at least 2).
        clip_model: the CLIP checkpoint (Hub id or folder) that classifies.
        target, distance, hard, min_confidence, credit: as [`StatisticalParity`]. With a zero-shot reader,
            `min_confidence` (e.g. 0.6 for two classes) keeps images CLIP cannot place from filling a class.
        device, dtype, batch_size: where and how CLIP runs.
    """

    name = "attribute_parity"
    default_prompt_repeats = 8  # a prompt's share of each class is estimated from 8 images

    def __init__(
        self,
        attributes: list[str],
        clip_model: str = DEFAULT_CLIP,
        target: Optional[Union[torch.Tensor, list[float]]] = None,
        distance: str = "total_variation",
        hard: bool = True,
        min_confidence: Optional[float] = None,
        credit: str = "leave_one_out",
        device: Optional[str] = None,
        dtype: torch.dtype = torch.float32,
        batch_size: int = 32,
    ):
        self.classifier = ZeroShotClassifier(attributes, clip_model, device=device, dtype=dtype, batch_size=batch_size)
        super().__init__(self.classifier, target, distance, hard, min_confidence, credit)
        if self.target is not None and len(self.target) != len(attributes):
            raise ValueError(
                f"`target` has {len(self.target)} classes but `attributes` {len(attributes)}: {attributes}"
            )
        self.attributes, self.clip_model = list(attributes), clip_model

    def check_available(self):
        self.classifier.check_available()

    def warm_up(self):
        self.classifier.warm_up()

    def image_features(self, name_or_path: str):
        return self.classifier.image_features(name_or_path)
