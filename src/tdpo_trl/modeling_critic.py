"""The TDPO-R critic: V(x_t), a value for every denoising step.

The critic is a frozen feature extractor (`encoder`) followed by a trainable MLP (`head`). Features are computed
once per sampled latent right after sampling, cached, and reused in every training update; only the head is trained.
"""

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


class ValueHead(nn.Sequential):
    """MLP from a feature vector to one value (or `num_outputs` values: one per task of a multi-task run).

    With `activation="none"` it mirrors the LAION aesthetic-predictor head used by the paper: Linear layers with
    dropout and no nonlinearity. Weights are drawn from N(0, 1/(d+1)) with d the input feature size; biases are zero.
    """

    def __init__(
        self,
        input_dim: int,
        hidden_sizes: tuple[int, ...] = (1024, 128, 64, 16),
        dropout: tuple[float, ...] = (0.2, 0.2, 0.1, 0.0),
        activation: str = "none",
        num_outputs: int = 1,
    ):
        if num_outputs < 1:
            raise ValueError(f"`num_outputs` must be >= 1, got {num_outputs}")
        if len(dropout) != len(hidden_sizes):
            raise ValueError(f"need one dropout value per hidden size, got {list(dropout)} for {list(hidden_sizes)}")
        if activation != "none" and activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be 'none' or one of {sorted(_ACTIVATIONS)}, got {activation!r}")
        layers: list[nn.Module] = []
        in_features = input_dim
        for size, p in zip(hidden_sizes, dropout):
            layers.append(nn.Linear(in_features, size))
            if activation != "none":
                layers.append(_ACTIVATIONS[activation]())
            if p > 0:
                layers.append(nn.Dropout(p))
            in_features = size
        layers.append(nn.Linear(in_features, num_outputs))
        super().__init__(*layers)
        self.input_dim, self.num_outputs = input_dim, num_outputs
        self.hidden_sizes, self.dropout, self.activation = list(hidden_sizes), list(dropout), activation
        self.init_std = 1.0 / (input_dim + 1)
        self.reset_parameters()

    @property
    def config(self) -> dict:
        """The constructor arguments: `ValueHead(**head.config)` builds the same architecture."""
        return {
            "input_dim": self.input_dim,
            "hidden_sizes": self.hidden_sizes,
            "dropout": self.dropout,
            "activation": self.activation,
            "num_outputs": self.num_outputs,
        }

    @property
    def linear_layers(self) -> list[nn.Linear]:
        return [m for m in self if isinstance(m, nn.Linear)]

    def reset_parameters(self):
        for layer in self.linear_layers:
            nn.init.normal_(layer.weight, mean=0.0, std=self.init_std)
            nn.init.zeros_(layer.bias)

    def forward(self, features: torch.Tensor, task_index: Optional[torch.Tensor] = None) -> torch.Tensor:
        # (..., input_dim) -> (...); with several outputs, each row's task's value (`task_index` (...) long), or
        # without `task_index` all of them (..., num_outputs)
        values = super().forward(features)  # (..., num_outputs)
        if self.num_outputs == 1:
            return values.squeeze(-1)
        if task_index is None:
            return values
        index = task_index.to(values.device).long().expand(values.shape[:-1])
        return values.gather(-1, index.unsqueeze(-1)).squeeze(-1)


class LatentFeatures(nn.Module):
    """Features = the flattened latent x_t, L2-normalized. No decoding; for small models."""

    def __init__(self, latent_shape: tuple[int, ...]):
        super().__init__()
        self.latent_shape = tuple(latent_shape)
        self.feature_dim = math.prod(self.latent_shape)
        self.needs_pixels = False

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return F.normalize(latents.flatten(1).float(), dim=-1)


# CLIP's preprocessing constants (shared by every OpenAI / LAION CLIP checkpoint)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_pixel_values(images: torch.Tensor, size: int) -> torch.Tensor:
    """Images (B, 3, H, W) in [0, 1] -> CLIP's input: resized to `size` (bicubic, antialiased), normalized."""
    pixels = F.interpolate(images.float(), size=(size, size), mode="bicubic", antialias=True).clamp(0, 1)
    mean = torch.tensor(CLIP_MEAN, device=pixels.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=pixels.device).view(1, 3, 1, 1)
    return (pixels - mean) / std


class CLIPImageFeatures(nn.Module):
    """Frozen CLIP image embeddings of decoded images, L2-normalized (as the paper's critic).

    Args:
        model: a `transformers.CLIPVisionModelWithProjection`, or a `CLIPModel` (its image tower and projection are
            used; e.g. a CLIP-score reward's model, shared with the critic).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        vision_config = getattr(model.config, "vision_config", model.config)
        self.image_size = vision_config.image_size
        self.feature_dim = getattr(model.config, "projection_dim", None) or vision_config.hidden_size
        self.needs_pixels = True

    @classmethod
    def from_pretrained(cls, name_or_path: str, **kwargs) -> "CLIPImageFeatures":
        from transformers import CLIPVisionModelWithProjection

        return cls(CLIPVisionModelWithProjection.from_pretrained(name_or_path, **kwargs))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images: (B, 3, H, W) in [0, 1] -> (B, feature_dim)."""
        pixel_values = clip_pixel_values(images, self.image_size).to(next(self.model.parameters()).dtype)
        if hasattr(self.model, "visual_projection") and hasattr(self.model, "vision_model"):  # a whole CLIPModel
            embeds = self.model.visual_projection(self.model.vision_model(pixel_values=pixel_values).pooler_output)
        else:
            output = self.model(pixel_values=pixel_values)
            embeds = output.image_embeds if hasattr(output, "image_embeds") else output.pooler_output
        return F.normalize(embeds.float(), dim=-1)


def shared_image_features(rewards, name_or_path: str) -> Optional[nn.Module]:
    """The frozen image features of checkpoint `name_or_path` that one of `rewards` already holds, else None.

    The paper's critic reads the training reward's own encoder (CLIP ViT-L/14 for the aesthetic score): a reward
    that exposes `image_features(name_or_path)` (the built-in CLIP-based ones do) lends it to the critic, so the
    critic adds no second copy of the encoder's weights.
    """
    for reward in rewards:
        method = getattr(reward, "image_features", None)
        features = method(name_or_path) if callable(method) else None
        if features is not None:
            return features
    return None


def encoder_from_config(config, latent_shape: tuple[int, ...]) -> nn.Module:
    """The frozen feature extractor that `config.critic_encoder` names."""
    if config.critic_encoder == "latents":
        return LatentFeatures(latent_shape)
    if config.critic_encoder == "digit_classifier":  # the features the digits' ink reward reads
        import copy

        from .digits.judges import DigitClassifierFeatures, shared_judges

        return DigitClassifierFeatures(copy.deepcopy(shared_judges().classifier))
    from .loading import load_pretrained

    return load_pretrained(CLIPImageFeatures.from_pretrained, config.critic_encoder, "critic_encoder")


class TimestepCritic(nn.Module):
    """V(x_t): a frozen encoder and a trainable `ValueHead`.

    Args:
        encoder: maps a batch to `(B, feature_dim)`. If `encoder.needs_pixels` is true it receives images in [0, 1]
            decoded by the VAE, otherwise the latents. It must expose `feature_dim`.
        hidden_sizes, dropout, activation, num_outputs: see `ValueHead`.

    Example:
        ```python
        critic = TimestepCritic(LatentFeatures((4, 8, 8)), hidden_sizes=(32, 8), dropout=(0.0, 0.0))
        values = critic(torch.randn(2, 4, 8, 8))  # (2,)
        ```
    """

    def __init__(
        self,
        encoder: nn.Module,
        hidden_sizes: tuple[int, ...] = (1024, 128, 64, 16),
        dropout: tuple[float, ...] = (0.2, 0.2, 0.1, 0.0),
        activation: str = "none",
        feature_dim: Optional[int] = None,
        num_outputs: int = 1,
    ):
        super().__init__()
        feature_dim = feature_dim or getattr(encoder, "feature_dim", None)
        if feature_dim is None:
            raise ValueError("the critic encoder has no `feature_dim`; pass `feature_dim=` explicitly")
        self.encoder = encoder.requires_grad_(False)
        self.head = ValueHead(feature_dim, tuple(hidden_sizes), tuple(dropout), activation, num_outputs)

    @property
    def needs_pixels(self) -> bool:
        return bool(getattr(self.encoder, "needs_pixels", False))

    @classmethod
    def from_config(
        cls, config, latent_shape: tuple[int, ...], num_outputs: int = 1, encoder: Optional[nn.Module] = None
    ) -> "TimestepCritic":
        """Build the critic that `config.critic_encoder` names (a `TDPOConfig`); `encoder`, if given, is used instead
        of loading it (e.g. the reward's own copy, `shared_image_features`)."""
        if encoder is None:
            encoder = encoder_from_config(config, latent_shape)
        return cls(
            encoder,
            config.critic_hidden_sizes,
            config.critic_dropout,
            config.critic_activation,
            num_outputs=num_outputs,
        )

    @torch.no_grad()
    def encode(self, latents: torch.Tensor, vae: Optional[nn.Module] = None, batch_size: int = 32) -> torch.Tensor:
        """Features of latents `(N, C, h, w)` -> `(N, feature_dim)`, decoding with `vae` first if needed."""
        features = []
        for chunk in latents.split(batch_size):
            if self.needs_pixels:
                if vae is None:
                    raise ValueError("this critic's encoder reads images: pass the pipeline's `vae` to `encode`")
                images = vae.decode(chunk.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
                chunk = (images.float() / 2 + 0.5).clamp(0, 1)
            features.append(self.encoder(chunk))
        return torch.cat(features)

    def forward(self, latents: torch.Tensor, vae: Optional[nn.Module] = None) -> torch.Tensor:
        return self.head(self.encode(latents, vae))
