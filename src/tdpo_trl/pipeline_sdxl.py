"""`TDPOStableDiffusionXLPipeline`: SDXL for DDPO / TDPO-R training, through the same trainer as Stable Diffusion 1.x.

What differs from SD 1.x is all here: two text encoders (their hidden states concatenated, the second's pooled
embedding as `text_embeds`), the added time ids (original size, crop, target size) and a sampler written against the
wrapper's own denoiser call. The DDIM step and its log-prob are TRL's `scheduler_step`, as for SD 1.x; the LoRA is
saved with `StableDiffusionXLPipeline.save_lora_weights`, so `StableDiffusionXLPipeline.load_lora_weights(folder)`
reads it.
"""

import torch
from diffusers import StableDiffusionXLPipeline

from .pipeline import SampledTrajectories, TDPOStableDiffusionPipeline


class TDPOStableDiffusionXLPipeline(TDPOStableDiffusionPipeline):
    """Stable Diffusion XL wrapped for DDPO / TDPO training (DDIM sampling that records log-probs).

    Constructed like `TDPOStableDiffusionPipeline`: a model id, a local folder or a `StableDiffusionXLPipeline`,
    `use_lora`, `lora_config`, `torch_dtype`. Conditioning per sample: `prompt_embeds` `(B, L, D1 + D2)`,
    `pooled_prompt_embeds` `(B, P)` and `add_time_ids` `(B, 6)`. With an empty negative prompt and the model's
    `force_zeros_for_empty_prompt` (SDXL base), the negative conditioning is zeros, as diffusers samples it.
    """

    pipeline_class = StableDiffusionXLPipeline

    def frozen_modules(self) -> list[torch.nn.Module]:
        return [self.sd_pipeline.vae, self.sd_pipeline.text_encoder, self.sd_pipeline.text_encoder_2]

    def image_size(self) -> tuple[int, int]:
        """`(height, width)` in pixels at the model's native resolution."""
        _, height, width = self.latent_shape()
        factor = self.sd_pipeline.vae_scale_factor
        return height * factor, width * factor

    def _time_ids(self, batch: int, device, dtype) -> torch.Tensor:
        """`(B, 6)`: original size, crop top-left (0, 0) and target size, all the native resolution."""
        size = self.image_size()
        sd = self.sd_pipeline
        time_ids = sd._get_add_time_ids(
            size, (0, 0), size, dtype=dtype, text_encoder_projection_dim=sd.text_encoder_2.config.projection_dim
        )  # (1, 6)
        return time_ids.to(device).repeat(batch, 1)

    def encode_prompts(self, prompts: list[str], device) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        ids = self.tokenize(prompts).to(device)
        embeds, _, pooled, _ = self.sd_pipeline.encode_prompt(
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
        if not negative_prompt and self.sd_pipeline.config.get("force_zeros_for_empty_prompt", False):
            for key in ("prompt_embeds", "pooled_prompt_embeds"):
                conditioning[key] = torch.zeros_like(conditioning[key])
        return conditioning

    conditioning_inputs = {
        "prompt_embeds": "encoder_hidden_states",
        "pooled_prompt_embeds": "text_embeds",
        "add_time_ids": "time_ids",
    }

    def sample_with_log_probs(self, conditioning: dict, negative_conditioning: dict, **kwargs) -> SampledTrajectories:
        """DDIM sampling through `predict` and TRL's `scheduler_step` (`sample_ddim`)."""
        return self.sample_ddim(conditioning, negative_conditioning, **kwargs)

    def predict(self, model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        added = {"text_embeds": inputs["text_embeds"], "time_ids": inputs["time_ids"]}
        return model(
            inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"], added_cond_kwargs=added
        ).sample
