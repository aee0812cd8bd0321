"""`TDPOStableDiffusionXLPipeline`: SDXL (two text encoders, added time ids) on DDIM steps.

The LoRA is saved with `StableDiffusionXLPipeline.save_lora_weights`, so `StableDiffusionXLPipeline.load_lora_weights`
reads it.
"""

import torch
from diffusers import StableDiffusionXLPipeline

from .base import TDPOPipeline, register_family
from .ddim import DDIMSteps


@register_family
class TDPOStableDiffusionXLPipeline(DDIMSteps, TDPOPipeline):
    """Stable Diffusion XL wrapped for DDPO / TDPO-R training (DDIM sampling that records log-probs).

    Constructed like `TDPOStableDiffusionPipeline`: a model id, a local folder or a `StableDiffusionXLPipeline`,
    `use_lora`, `lora_config`, `torch_dtype`. Conditioning per sample: `prompt_embeds` `(B, L, D1 + D2)` (both
    encoders' hidden states), `pooled_prompt_embeds` `(B, P)` (the second's pooled embedding) and `add_time_ids`
    `(B, 6)`. With an empty negative prompt and the model's `force_zeros_for_empty_prompt` (SDXL base), the negative
    conditioning is zeros, as diffusers samples it.
    """

    pipeline_class = StableDiffusionXLPipeline
    frozen_module_names = ("vae", "text_encoder", "text_encoder_2")
    conditioning_inputs = {
        "prompt_embeds": "encoder_hidden_states",
        "pooled_prompt_embeds": "text_embeds",
        "add_time_ids": "time_ids",
    }

    def image_size(self) -> tuple[int, int]:
        """`(height, width)` in pixels at the model's native resolution."""
        _, height, width = self.latent_shape()
        factor = self.diffusers_pipeline.vae_scale_factor
        return height * factor, width * factor

    def _time_ids(self, batch: int, device, dtype) -> torch.Tensor:
        """`(B, 6)`: original size, crop top-left (0, 0) and target size, all the native resolution."""
        size = self.image_size()
        pipeline = self.diffusers_pipeline
        time_ids = pipeline._get_add_time_ids(
            size, (0, 0), size, dtype=dtype, text_encoder_projection_dim=pipeline.text_encoder_2.config.projection_dim
        )  # (1, 6)
        return time_ids.to(device).repeat(batch, 1)

    def encode_prompts(self, prompts: list[str], device) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        ids = self.tokenize(prompts).to(device)
        embeds, _, pooled, _ = self.diffusers_pipeline.encode_prompt(
            list(prompts), device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        conditioning = {
            "prompt_embeds": embeds,  # (B, L, D1 + D2)
            "pooled_prompt_embeds": pooled,  # (B, P)
            "add_time_ids": self._time_ids(len(prompts), device, embeds.dtype),  # (B, 6)
        }
        return ids, conditioning

    def encode_negative_prompt(self, negative_prompt: str, device) -> dict[str, torch.Tensor]:
        conditioning = self.encode_prompts([negative_prompt], device)[1]
        if not negative_prompt and self.diffusers_pipeline.config.get("force_zeros_for_empty_prompt", False):
            for key in ("prompt_embeds", "pooled_prompt_embeds"):
                conditioning[key] = torch.zeros_like(conditioning[key])
        return conditioning

    def predict(self, model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        added = {"text_embeds": inputs["text_embeds"], "time_ids": inputs["time_ids"]}
        return model(
            inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"], added_cond_kwargs=added
        ).sample
