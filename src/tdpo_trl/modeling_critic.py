"""The TDPO-R critic: V(x_t), a value for every denoising step.

The critic is a frozen feature extractor (`encoder`) followed by a trainable MLP (`head`). Features are computed
once per sampled latent right after sampling, cached, and reused in every training update; only the head is trained.
"""

import math
from collections.abc import Callable
from typing import Optional

import torch
import torch.nn.functional as F
from accelerate.logging import get_logger
from torch import nn

from .loading import load_pretrained
from .registry import Registry


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


logger = get_logger(__name__)

# name -> `factory(latent_shape) -> nn.Module`: critic encoders known by name (plugins add theirs, e.g. the digits
# demo's "digit_classifier"); any other `critic_encoder` is a CLIP checkpoint id or folder
CRITIC_ENCODERS = Registry("critic encoder")
CRITIC_ENCODERS.register("latents", LatentFeatures)


def encoder_from_config(config, latent_shape: tuple[int, ...]) -> nn.Module:
    """The frozen feature extractor that `config.critic_encoder` names."""
    if config.critic_encoder in CRITIC_ENCODERS:
        return CRITIC_ENCODERS[config.critic_encoder](latent_shape)
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
    def encode(self, latents: torch.Tensor, decode: Optional[Callable] = None, batch_size: int = 32) -> torch.Tensor:
        """Features of latents `(N, ...)` -> `(N, feature_dim)`. An encoder that reads images sees `decode(latents)`,
        images `(n, 3, H, W)` in [0, 1]: the family's own decoding (`TDPOPipeline.decode`: packing, scale and shift
        handled) or `critic_decoder`'s."""
        features = []
        for chunk in latents.split(batch_size):
            if self.needs_pixels:
                if decode is None:
                    raise ValueError("this critic's encoder reads images: pass `decode` (the pipeline's `decode`)")
                chunk = decode(chunk).float()
            features.append(self.encoder(chunk))
        return torch.cat(features)

    @torch.no_grad()
    def value_steps(self, head: nn.Module, latents, steps, task_index: int, decode=None, batch_size: int = 32):
        """Features `(B, k, D)` and values `(B, k)` of a trajectory's x_t `(B, T, ...)` at `steps` `(B, k)` (None: all
        T steps), valued for task `task_index` by `head` (this critic's head, or its prepared wrapper's module)."""
        head.eval()
        if steps is not None:
            latents = latents[torch.arange(len(latents), device=latents.device)[:, None], steps]  # (B, k, ...)
        batch, num_steps = latents.shape[:2]
        features = self.encode(latents.flatten(0, 1), decode, batch_size=batch_size).view(batch, num_steps, -1)
        task_index = torch.full((batch, num_steps), task_index, device=features.device)
        return features, head(features, task_index).float()

    def forward(self, latents: torch.Tensor, decode: Optional[Callable] = None) -> torch.Tensor:
        return self.head(self.encode(latents, decode))


def autoencoder_decode(autoencoder: nn.Module) -> Callable:
    """`latents -> images in [0, 1]` through `autoencoder` (e.g. TAESD, `critic_decoder`), for unscaled SD latents."""

    def decode(latents: torch.Tensor) -> torch.Tensor:
        scaled = latents.to(autoencoder.dtype) / autoencoder.config.scaling_factor
        return (autoencoder.decode(scaled, return_dict=False)[0].float() / 2 + 0.5).clamp(0, 1)

    return decode


def build_critic(config, reward_functions: list, pipeline, device, inference_dtype, critic=None):
    """The run's critic (one value output per task), the function its encoder reads x_t through (`latents -> images
    in [0, 1]`), and the head's optimizer: `(critic, decoder, optimizer)`. `critic`: one to use instead of the one
    `config.critic_encoder` names.

    One critic told the task: one value output per task (rewards are normalized per task, so the outputs share a
    scale); one encoder, one optimizer and one neuron-reset schedule for all tasks. The paper's critic reads the
    reward's own encoder: a reward holding `critic_encoder` lends it (`shared_image_features`, no copy).
    """
    num_tasks = len(reward_functions)
    shared = None
    if critic is None and config.critic_encoder != "latents":
        shared = shared_image_features(reward_functions, config.critic_encoder)
    if critic is None:
        critic = TimestepCritic.from_config(config, pipeline.latent_shape(), num_outputs=num_tasks, encoder=shared)
    if critic.head.num_outputs != num_tasks:
        raise ValueError(
            f"the critic head has {critic.head.num_outputs} value outputs for {num_tasks} tasks; give it one output "
            "per task (`num_outputs`)"
        )
    if shared is not None:  # left in the reward's dtype: a cast here would be undone by every reward call
        logger.info(f"the critic shares the reward's image encoder {config.critic_encoder!r}")
        critic.encoder.to(device)
    else:
        critic.encoder.to(device, dtype=inference_dtype)
    # what decodes x_t for an image-reading critic: the family's VAE decoding, or a cheap AutoencoderTiny (TAESD)
    decoder = pipeline.decode
    if config.critic_decoder and critic.needs_pixels:
        from diffusers import AutoencoderTiny

        autoencoder = load_pretrained(AutoencoderTiny.from_pretrained, config.critic_decoder, "critic_decoder")
        decoder = autoencoder_decode(autoencoder.requires_grad_(False).eval().to(device, dtype=inference_dtype))
    critic.head.to(device, dtype=torch.float32)
    optimizer = torch.optim.AdamW(
        critic.head.parameters(),
        lr=config.critic_learning_rate,
        betas=(config.critic_adam_beta1, config.critic_adam_beta2),
        weight_decay=config.critic_adam_weight_decay,
        eps=config.critic_adam_epsilon,
    )
    return critic, decoder, optimizer
