"""Per-image reward models with DDPO's signature `(images, prompts, metadata) -> (rewards, metadata)`.

`images` are `(B, 3, H, W)` in [0, 1]; rewards come back as a float32 `(B,)` tensor on the images' device. Model-based
rewards load their weights on the first call (so building one is cheap), run without gradients in `dtype`, and
score in chunks of `batch_size`.
"""

import importlib
import io
from typing import Optional

import torch
import torch.nn.functional as F
from huggingface_hub import hf_hub_download
from PIL import Image

from ..loading import check_hub_file
from ..modeling_critic import CLIPImageFeatures, ValueHead, clip_pixel_values
from .zero_shot import load_clip


def _to_pil(images: torch.Tensor) -> list[Image.Image]:
    array = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in array]


def _jpeg_kilobytes(images: torch.Tensor, quality: int) -> torch.Tensor:
    sizes = []
    for image in _to_pil(images):
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=quality)
        sizes.append(buffer.tell() / 1000)
    return torch.tensor(sizes, dtype=torch.float32, device=images.device)


def jpeg_compressibility(images, prompts=None, metadata=None, quality: int = 95):
    """Minus the JPEG size in kB at `quality` (DDPO's compressibility reward): smaller files score higher."""
    return -_jpeg_kilobytes(images, quality), {}


def jpeg_incompressibility(images, prompts=None, metadata=None, quality: int = 95):
    """The JPEG size in kB at `quality` (DDPO's incompressibility reward): more detail scores higher."""
    return _jpeg_kilobytes(images, quality), {}


class _LazyModelReward:
    """Loads its models on the first call, then scores in chunks without gradients."""

    name = "reward"

    def __init__(self, device: Optional[str] = None, dtype: torch.dtype = torch.float32, batch_size: int = 32):
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be >= 1, got {batch_size}")
        self.device, self.dtype, self.batch_size = device, dtype, batch_size
        self._loaded = False

    def load(self):
        raise NotImplementedError

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        raise NotImplementedError

    def modules(self) -> list[torch.nn.Module]:
        raise NotImplementedError

    def image_features(self, name_or_path: str) -> Optional[CLIPImageFeatures]:
        """This reward's frozen CLIP image features if it reads checkpoint `name_or_path`, else None: a critic
        reading the same checkpoint shares them (`modeling_critic.shared_image_features`), one copy in memory."""
        return None

    def warm_up(self):
        """Load the models now rather than on the first call."""
        self._load_once()

    def hub_files(self) -> list[tuple[str, str]]:
        """`(repo, filename)` of a file of each Hub model `load` reads (checked by `check_available`)."""
        return []

    def check_available(self):
        """Without downloading: each model `load` reads is a local folder, cached, or reachable on the Hub."""
        if not self._loaded:
            for repo, filename in self.hub_files():
                check_hub_file(repo, filename, f"reward {self.name!r}")

    def _load_once(self):
        if not self._loaded:
            self.load()
            self._loaded = True

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts=None, metadata=None):
        self._load_once()
        device = torch.device(self.device) if self.device is not None else images.device
        for module in self.modules():
            module.to(device=device, dtype=self.dtype).eval()
        prompts = list(prompts) if prompts is not None else [""] * len(images)
        scores = [
            self.score(images[i : i + self.batch_size].to(device), prompts[i : i + self.batch_size])
            for i in range(0, len(images), self.batch_size)
        ]
        return torch.cat(scores).float().to(images.device), {}


class AestheticScore(_LazyModelReward):
    """LAION aesthetic predictor: an MLP on normalized CLIP ViT-L/14 image embeddings (the paper's target reward).

    Downloads `clip_model` (1.7 GB) and `head_filename` from `head_repo` (4 MB; the weights TRL's DDPO example uses).
    """

    name = "aesthetic"

    def __init__(
        self,
        clip_model: str = "openai/clip-vit-large-patch14",
        head_repo: str = "trl-lib/ddpo-aesthetic-predictor",
        head_filename: str = "aesthetic-model.pth",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.clip_model, self.head_repo, self.head_filename = clip_model, head_repo, head_filename

    def load(self):
        self.features = CLIPImageFeatures.from_pretrained(self.clip_model)
        self.head = ValueHead(self.features.feature_dim, (1024, 128, 64, 16), (0.2, 0.2, 0.1, 0.0))
        state = torch.load(hf_hub_download(self.head_repo, self.head_filename), map_location="cpu", weights_only=True)
        self.head.load_state_dict({key.removeprefix("layers."): value for key, value in state.items()})

    def hub_files(self):
        return [(self.clip_model, "config.json"), (self.head_repo, self.head_filename)]

    def modules(self):
        return [self.features, self.head]

    def image_features(self, name_or_path):
        if name_or_path != self.clip_model:
            return None
        self._load_once()
        return self.features

    def score(self, images, prompts):
        return self.head(self.features(images).to(self.dtype))


class CLIPTextImageScore(_LazyModelReward):
    """`scale` x cosine similarity of CLIP image and text embeddings; `scale=None` uses the model's logit scale."""

    name = "clip_text_image"

    def __init__(self, model: str, tokenizer: Optional[str] = None, scale: Optional[float] = None, **kwargs):
        super().__init__(**kwargs)
        self.model_name, self.tokenizer_name, self.scale = model, tokenizer or model, scale

    def load(self):
        self.model, self.tokenizer = load_clip(self.model_name, self.tokenizer_name)  # shared with zero-shot readers

    def hub_files(self):
        return [(self.model_name, "config.json"), (self.tokenizer_name, "tokenizer_config.json")]

    def modules(self):
        return [self.model]

    def image_features(self, name_or_path):
        if name_or_path != self.model_name:
            return None
        self._load_once()
        if getattr(self, "_image_features", None) is None:
            self._image_features = CLIPImageFeatures(self.model)  # the image tower of the same module, no copy
        return self._image_features

    def score(self, images, prompts):
        pixels = clip_pixel_values(images, self.model.config.vision_config.image_size).to(self.dtype)
        tokens = self.tokenizer(
            prompts, padding=True, truncation=True, max_length=self.tokenizer.model_max_length, return_tensors="pt"
        ).to(pixels.device)
        output = self.model(**tokens, pixel_values=pixels)  # projected embeddings of both towers
        image_embeds = F.normalize(output.image_embeds.float(), dim=-1)
        text_embeds = F.normalize(output.text_embeds.float(), dim=-1)
        scale = self.model.logit_scale.exp().float() if self.scale is None else self.scale
        return scale * (image_embeds * text_embeds).sum(-1)


class PickScore(CLIPTextImageScore):
    """PickScore (Kirstain et al., 2023): a CLIP-H fine-tuned on human preferences, scaled image-text logit.

    Downloads `yuvalkirstain/PickScore_v1` (3.9 GB) and the tokenizer of `laion/CLIP-ViT-H-14-laion2B-s32B-b79K`.
    """

    name = "pickscore"

    def __init__(
        self,
        model: str = "yuvalkirstain/PickScore_v1",
        tokenizer: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
        **kwargs,
    ):
        super().__init__(model, tokenizer, scale=None, **kwargs)


class CLIPScore(CLIPTextImageScore):
    """CLIP score: 100 x cosine(image, prompt) with CLIP ViT-L/14 (1.7 GB), text-image agreement."""

    name = "clip_score"

    def __init__(self, model: str = "openai/clip-vit-large-patch14", **kwargs):
        super().__init__(model, model, scale=100.0, **kwargs)


def _optional(module: str, package: str):
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(f"this reward needs the `{package}` package: pip install {package}") from err


class HPSv2(CLIPTextImageScore):
    """HPS v2 (Wu et al., 2023): open_clip ViT-H-14 fine-tuned on human preference (needs `open_clip_torch`)."""

    name = "hpsv2"

    def __init__(
        self,
        repo: str = "xswu/HPSv2",
        filename: str = "HPS_v2_compressed.pt",
        model_name: str = "ViT-H-14",
        **kwargs,
    ):
        super().__init__(model_name, scale=1.0, **kwargs)  # `model_name`: an open_clip architecture
        self.repo, self.filename = repo, filename

    def load(self):
        open_clip = _optional("open_clip", "open_clip_torch")
        model, _, _ = open_clip.create_model_and_transforms(self.model_name, pretrained=None)
        checkpoint = torch.load(hf_hub_download(self.repo, self.filename), map_location="cpu", weights_only=False)
        model.load_state_dict(checkpoint["state_dict"])
        self.model, self.tokenizer = model, open_clip.get_tokenizer(self.model_name)

    def hub_files(self):
        return [(self.repo, self.filename)]

    def score(self, images, prompts):
        pixels = clip_pixel_values(images, self.model.visual.image_size[0]).to(self.dtype)
        image_embeds = F.normalize(self.model.encode_image(pixels).float(), dim=-1)
        text_embeds = F.normalize(self.model.encode_text(self.tokenizer(prompts).to(pixels.device)).float(), dim=-1)
        return (image_embeds * text_embeds).sum(-1)


class ImageRewardScore(_LazyModelReward):
    """ImageReward (Xu et al., 2023), through its own package (`image-reward`); downloads ImageReward-v1.0."""

    name = "imagereward"

    def __init__(self, model: str = "ImageReward-v1.0", **kwargs):
        super().__init__(**kwargs)
        self.model_name = model

    def load(self):
        image_reward = _optional("ImageReward", "image-reward")
        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = image_reward.load(self.model_name, device=device)  # the package keeps its own device

    def modules(self):
        return []

    def score(self, images, prompts):
        return torch.tensor([float(self.model.score(p, im)) for p, im in zip(prompts, _to_pil(images))])
