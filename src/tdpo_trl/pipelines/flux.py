"""`TDPOFluxPipeline`: FLUX.1 (a rectified-flow MMDiT on packed 2x2 latent patches with rotary position ids) on the
flow-matching SDE steps shared with SD3 (`flow_matching.py`). FLUX.1-dev is guidance-distilled: the guidance scale is
an input of the transformer, with no classifier-free doubling of the batch. The LoRA is saved in diffusers' FLUX
format: `FluxPipeline.load_lora_weights` reads it."""

import contextlib
from typing import Optional

import numpy as np
import torch
from diffusers import FluxPipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from .base import TDPOPipeline, register_family
from .flow_matching import FlowMatchingSDESteps


@register_family
class TDPOFluxPipeline(FlowMatchingSDESteps, TDPOPipeline):
    """FLUX.1 wrapped for DDPO / TDPO-R training.

    Constructed like `TDPOStableDiffusionPipeline`, plus:
        max_sequence_length: T5 tokens per prompt (FLUX.1-dev's default 512; 256 for schnell).
        resolution: image side in pixels; default the VAE's `sample_size` (1024 for FLUX.1).
        guidance_scale: the distilled guidance the transformer is given (FLUX.1-dev's 3.5); a trainer replaces it
            with its config's `sample_guidance_scale`. Ignored by transformers without a guidance embedding
            (schnell).
        offload_text_encoders: keep T5 and CLIP on the CPU, moved to the device only to encode a batch of prompts
            (saves T5-XXL's 9.5 GB in bf16 on the GPU for a transfer per sampling batch).

    `sample_guidance_scale` is thus the distilled guidance, never classifier-free guidance (`classifier_free_guidance`
    is False: one transformer call per step). `sample_eta` is the SDE's noise level (> 0). Conditioning per sample:
    `prompt_embeds` `(B, L, D)` (T5), `pooled_prompt_embeds` `(B, P)` (CLIP), `text_ids` `(B, L, 3)` and `guidance`
    `(B,)`. Latents are packed: `(B, h/2 * w/2, 4 C)` for the VAE's `(C, h, w)`.
    """

    pipeline_class = FluxPipeline
    denoiser_name = "transformer"
    frozen_module_names = ("vae", "text_encoder", "text_encoder_2")
    classifier_free_guidance = False
    # `trains_final_step` stays False (FlowMatchingSDESteps'): FLUX's last SDE step is not nearly deterministic as
    # SD3's (its sigmas end at 1/N), but TDPO-R learned more without it on 5 of 5 seeds (docs/model_families.md)
    conditioning_inputs = {
        "prompt_embeds": "encoder_hidden_states",
        "pooled_prompt_embeds": "pooled_projections",
        "text_ids": "txt_ids",
        "guidance": "guidance",
    }

    def __init__(
        self, *args, max_sequence_length: int = 512, resolution: Optional[int] = None, guidance_scale: float = 3.5,
        offload_text_encoders: bool = False, **kwargs,
    ):  # fmt: skip
        self.max_sequence_length, self.guidance_scale = max_sequence_length, guidance_scale
        self.offload_text_encoders = offload_text_encoders
        super().__init__(*args, **kwargs)
        pipeline = self.diffusers_pipeline
        native = (
            getattr(pipeline.vae.config, "sample_size", None)
            or pipeline.default_sample_size * pipeline.vae_scale_factor
        )
        self.resolution = int(resolution or native)
        pipeline.vae.enable_slicing()  # decode a batch of 1024 px images one at a time: activations of one image
        if self.resolution % (2 * pipeline.vae_scale_factor):
            raise ValueError(
                f"`resolution` {self.resolution} must be a multiple of {2 * pipeline.vae_scale_factor} (the VAE's "
                "downscaling times FLUX's 2x2 latent patches)"
            )

    def apply_training_config(self, config):
        self.guidance_scale = float(config.sample_guidance_scale)
        super().apply_training_config(config)

    def resident_modules(self) -> list[torch.nn.Module]:
        """The VAE only with `offload_text_encoders`: T5-XXL (4.8 B) and CLIP wait on the CPU between batches."""
        return [self.vae] if self.offload_text_encoders else self.frozen_modules()

    @contextlib.contextmanager
    def offloaded_modules_on(self, device):
        """With `offload_text_encoders`, the text encoders on `device` for the block, back on the CPU after it."""
        encoders = [self.diffusers_pipeline.text_encoder, self.diffusers_pipeline.text_encoder_2]
        if self.offload_text_encoders:
            for encoder in encoders:
                encoder.to(device)
        try:
            yield
        finally:
            if self.offload_text_encoders:
                for encoder in encoders:
                    encoder.to("cpu")

    def encode_prompts(self, prompts: list[str], device) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        ids = self.tokenize(prompts).to(device)
        with self.offloaded_modules_on(device):
            embeds, pooled, text_ids = self.diffusers_pipeline.encode_prompt(
                list(prompts), device=device, num_images_per_prompt=1, max_sequence_length=self.max_sequence_length
            )
        batch = len(prompts)
        return ids, {
            "prompt_embeds": embeds,  # (B, L, D)
            "pooled_prompt_embeds": pooled,  # (B, P)
            "text_ids": text_ids.expand(batch, -1, -1),  # (B, L, 3): the same for every prompt
            "guidance": torch.full((batch,), self.guidance_scale, device=device, dtype=torch.float32),  # (B,)
        }

    def latent_side(self) -> int:
        """The side of the VAE's (unpacked) latents."""
        return self.resolution // self.diffusers_pipeline.vae_scale_factor

    def latent_shape(self) -> tuple[int, ...]:
        """`(h/2 * w/2, 4 C)`: one sample's packed latents (a token per 2x2 patch of the VAE's latents)."""
        side = self.latent_side()
        return ((side // 2) ** 2, self.denoiser.config.in_channels)

    def image_resolution(self) -> int:
        return self.resolution

    def set_timesteps(self, num_inference_steps: int, device):
        """FLUX's schedule: sigmas 1 ... 1/N, shifted by `mu`, which grows with the image's token count (as diffusers'
        `FluxPipeline` computes it)."""
        config = self.scheduler.config
        mu = calculate_shift(
            self.latent_shape()[0],
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )
        sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        self.scheduler.set_timesteps(sigmas=sigmas, device=device, mu=mu)

    def predict(self, model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The transformer's velocity prediction (timesteps in [0, 1], as FLUX takes them)."""
        latents = inputs["sample"]
        side = self.latent_side()
        image_ids = FluxPipeline._prepare_latent_image_ids(None, side // 2, side // 2, latents.device, latents.dtype)
        guidance = inputs["guidance"] if self.denoiser.config.guidance_embeds else None
        return model(
            hidden_states=latents,
            timestep=inputs["timestep"].to(latents.dtype) / 1000,
            guidance=guidance,
            pooled_projections=inputs["pooled_projections"],
            encoder_hidden_states=inputs["encoder_hidden_states"],
            txt_ids=inputs["txt_ids"][0],  # (L, 3): the same for every sample
            img_ids=image_ids,  # (h/2 * w/2, 3)
            return_dict=False,
        )[0]

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images `(B, 3, H, W)` in [0, 1] from packed latents (FLUX's VAE latents are scaled and shifted)."""
        vae, pipeline = self.vae, self.diffusers_pipeline
        latents = pipeline._unpack_latents(latents, self.resolution, self.resolution, pipeline.vae_scale_factor)
        latents = latents.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
        return (vae.decode(latents, return_dict=False)[0] / 2 + 0.5).clamp(0, 1).contiguous()

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Packed latents `(B, h/2 * w/2, 4 C)` of images `(B, 3, H, W)` in [-1, 1]."""
        vae = self.vae
        latents = vae.encode(images.to(vae.dtype)).latent_dist.mode()
        latents = (latents - vae.config.shift_factor) * vae.config.scaling_factor  # (B, C, h, w)
        batch, channels, height, width = latents.shape
        return FluxPipeline._pack_latents(latents, batch, channels, height, width)
