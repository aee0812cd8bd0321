"""CLIP zero-shot classification: images -> probabilities over texts ("a photo of a man", "a photo of a woman").

One CLIP model per checkpoint is loaded in a process (`load_clip`) and shared by every reward, judge and critic that
reads it: `attribute_parity`, the composition reward's colour reader, `clip_score` / PickScore-style rewards and a
critic on the same checkpoint hold one copy of the weights.
"""

from typing import Optional

import torch
import torch.nn.functional as F

from ..loading import check_hub_file
from ..modeling_critic import CLIPImageFeatures, clip_pixel_values


DEFAULT_CLIP = "openai/clip-vit-large-patch14"
_LOADED: dict[tuple[str, str], tuple] = {}  # (model, tokenizer) -> (CLIPModel, tokenizer), one per process


def load_clip(model: str, tokenizer: Optional[str] = None) -> tuple:
    """`(CLIPModel, tokenizer)` of checkpoint `model` (a Hub id or folder), loaded once per process."""
    key = (model, tokenizer or model)
    if key not in _LOADED:
        from transformers import AutoTokenizer, CLIPModel

        _LOADED[key] = (CLIPModel.from_pretrained(model).eval(), AutoTokenizer.from_pretrained(key[1]))
    return _LOADED[key]


class ZeroShotClassifier:
    """`classifier(images) -> (B, C)` probabilities over `texts`: softmax of CLIP's scaled image-text cosines.

    Args:
        texts: one description per class, e.g. `["a photo of a man", "a photo of a woman"]`; or None, and pass the
            texts to `probabilities` per call.
        model: CLIP checkpoint (Hub id or folder), loaded on first use and shared (`load_clip`).
        device, dtype, batch_size: where, in what precision and how many images at a time it runs.
    """

    def __init__(
        self,
        texts: Optional[list[str]] = None,
        model: str = DEFAULT_CLIP,
        device: Optional[str] = None,
        dtype: torch.dtype = torch.float32,
        batch_size: int = 32,
    ):
        if texts is not None and (
            not isinstance(texts, (list, tuple)) or len(texts) < 2 or not all(isinstance(t, str) and t for t in texts)
        ):
            raise ValueError(f"zero-shot classes must be a list of at least 2 non-empty texts, got {texts!r}")
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be >= 1, got {batch_size}")
        self.texts, self.model_name, self.device, self.dtype, self.batch_size = texts, model, device, dtype, batch_size
        self._text_embeds: dict[tuple[str, ...], torch.Tensor] = {}
        self._image_features = None

    @property
    def clip(self):
        return load_clip(self.model_name)[0]

    def check_available(self):
        check_hub_file(self.model_name, "config.json", f"the zero-shot classifier on {self.model_name!r}")

    def warm_up(self):
        load_clip(self.model_name)

    def image_features(self, name_or_path: str) -> Optional[CLIPImageFeatures]:
        """This classifier's CLIP image tower if it reads `name_or_path`: a critic on that checkpoint shares it."""
        if name_or_path != self.model_name:
            return None
        if self._image_features is None:
            self._image_features = CLIPImageFeatures(self.clip)  # the image tower of the shared module, no copy
        return self._image_features

    @torch.no_grad()
    def text_embeddings(self, texts: list[str], device) -> torch.Tensor:
        """`(C, D)` unit text embeddings of `texts`, computed once per distinct list."""
        key = tuple(texts)
        if key not in self._text_embeds:
            model, tokenizer = load_clip(self.model_name)
            tokens = tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt").to(device)
            text = model.text_projection(model.text_model(**tokens).pooler_output)  # (C, D), as 4.x and 5.x agree
            self._text_embeds[key] = F.normalize(text.float(), dim=-1)
        return self._text_embeds[key].to(device)

    @torch.no_grad()
    def probabilities(self, images: torch.Tensor, texts: Optional[list[str]] = None) -> torch.Tensor:
        """`(B, 3, H, W)` images in [0, 1] -> `(B, C)` probabilities over `texts` (default: the classifier's)."""
        texts = texts if texts is not None else self.texts
        if texts is None:
            raise ValueError("no texts to classify against: give `texts` here or when building the classifier")
        model = self.clip
        device = torch.device(self.device) if self.device is not None else images.device
        model.to(device=device, dtype=self.dtype)
        text_embeds = self.text_embeddings(texts, device)  # (C, D)
        scale = model.logit_scale.exp().float()
        chunks = []
        for start in range(0, len(images), self.batch_size):
            pixels = clip_pixel_values(
                images[start : start + self.batch_size].to(device), model.config.vision_config.image_size
            )
            image = model.visual_projection(model.vision_model(pixel_values=pixels.to(self.dtype)).pooler_output)
            image_embeds = F.normalize(image.float(), dim=-1)  # (b, D)
            chunks.append((scale * image_embeds @ text_embeds.T).softmax(-1))  # (b, C)
        return torch.cat(chunks).to(images.device)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.probabilities(images)
