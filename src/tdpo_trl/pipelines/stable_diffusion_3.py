"""`TDPOStableDiffusion3Pipeline`: Stable Diffusion 3 (an MMDiT transformer, flow matching through the SDE step of
`flow_matching.py`). The LoRA is saved in diffusers' SD3 format: `StableDiffusion3Pipeline.load_lora_weights` reads
it."""

import torch
from diffusers import StableDiffusion3Pipeline

from .base import TDPOPipeline, register_family
from .flow_matching import FlowMatchingSDESteps


@register_family
class TDPOStableDiffusion3Pipeline(FlowMatchingSDESteps, TDPOPipeline):
    """Stable Diffusion 3 wrapped for DDPO / TDPO-R training.

    Constructed like `TDPOStableDiffusionPipeline`. `max_sequence_length`: T5 tokens per prompt (SD3's default 256;
    without a T5 encoder its part of the conditioning is zeros). `sample_eta` of the config is the SDE's noise level
    (Flow-GRPO uses 0.7); it must be > 0. `use_lora=False` trains the whole transformer (saved under
    `transformer/`). Conditioning per sample: `prompt_embeds` `(B, L, D)` (CLIP tokens, then T5 tokens) and
    `pooled_prompt_embeds` `(B, P)`.
    """

    pipeline_class = StableDiffusion3Pipeline
    denoiser_name = "transformer"
    frozen_module_names = ("vae", "text_encoder", "text_encoder_2", "text_encoder_3")
    conditioning_inputs = {"prompt_embeds": "encoder_hidden_states", "pooled_prompt_embeds": "pooled_projections"}

    def __init__(self, *args, max_sequence_length: int = 256, **kwargs):
        self.max_sequence_length = max_sequence_length
        super().__init__(*args, **kwargs)

    def encode_prompts(self, prompts: list[str], device) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        ids = self.tokenize(prompts).to(device)
        prompts = list(prompts)
        embeds, _, pooled, _ = self.diffusers_pipeline.encode_prompt(
            prompts, prompts, prompts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )  # fmt: skip
        return ids, {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}  # (B, L, D), (B, P)

    def predict(self, model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The transformer's velocity prediction."""
        return model(
            hidden_states=inputs["sample"],
            timestep=inputs["timestep"],
            encoder_hidden_states=inputs["encoder_hidden_states"],
            pooled_projections=inputs["pooled_projections"],
            return_dict=False,
        )[0]

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images `(B, 3, H, W)` in [0, 1] (SD3's VAE latents are scaled and shifted)."""
        vae = self.vae
        latents = latents.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
        return (vae.decode(latents, return_dict=False)[0] / 2 + 0.5).clamp(0, 1).contiguous()

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        vae = self.vae
        latents = vae.encode(images.to(vae.dtype)).latent_dist.mode()
        return (latents - vae.config.shift_factor) * vae.config.scaling_factor
