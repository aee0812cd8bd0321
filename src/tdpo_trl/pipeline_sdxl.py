"""`TDPOStableDiffusionXLPipeline`: SDXL for DDPO / TDPO-R training, through the same trainer as Stable Diffusion 1.x.

What differs from SD 1.x is all here: two text encoders (their hidden states concatenated, the second's pooled
embedding as `text_embeds`), the added time ids (original size, crop, target size) and a sampler written against the
wrapper's own denoiser call. The DDIM step and its log-prob are TRL's `scheduler_step`, as for SD 1.x; the LoRA is
saved with `StableDiffusionXLPipeline.save_lora_weights`, so `StableDiffusionXLPipeline.load_lora_weights(folder)`
reads it.
"""

import torch
from diffusers import StableDiffusionXLPipeline
from diffusers.utils.torch_utils import randn_tensor

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

    def denoiser_inputs(self, latents, timesteps, conditioning: dict, cfg: bool) -> dict[str, torch.Tensor]:
        keys = {
            "prompt_embeds": "encoder_hidden_states",
            "pooled_prompt_embeds": "text_embeds",
            "add_time_ids": "time_ids",
        }
        if cfg:  # (2B, ...): negative, then positive
            inputs = {"sample": torch.cat([latents] * 2), "timestep": torch.cat([timesteps] * 2)}
            for key, name in keys.items():
                inputs[name] = torch.cat([conditioning[f"negative_{key}"], conditioning[key]])
            return inputs
        return {"sample": latents, "timestep": timesteps, **{name: conditioning[key] for key, name in keys.items()}}

    def predict(self, model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        added = {"text_embeds": inputs["text_embeds"], "time_ids": inputs["time_ids"]}
        return model(
            inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"], added_cond_kwargs=added
        ).sample

    @torch.no_grad()
    def sample_with_log_probs(
        self, conditioning: dict, negative_conditioning: dict, *, num_inference_steps: int, guidance_scale: float,
        eta: float,
    ) -> SampledTrajectories:  # fmt: skip
        """DDIM sampling through `predict` and TRL's `scheduler_step`, from the global RNG (as TRL's SD sampler)."""
        sd, scheduler = self.sd_pipeline, self.scheduler
        embeds = conditioning["prompt_embeds"]
        batch, device = len(embeds), embeds.device
        scheduler.set_timesteps(num_inference_steps, device=device)
        latents = randn_tensor((batch, *self.latent_shape()), device=device, dtype=embeds.dtype)
        latents = latents * scheduler.init_noise_sigma
        cfg = guidance_scale > 1.0
        both = {**conditioning, **{f"negative_{k}": v for k, v in negative_conditioning.items()}}
        all_latents, log_probs = [latents], []
        for t in scheduler.timesteps:
            timesteps = t.repeat(batch)  # (B,)
            inputs = self.denoiser_inputs(scheduler.scale_model_input(latents, t), timesteps, both, cfg)
            prediction = self.predict(sd.unet, inputs)
            if cfg:
                uncond, cond = prediction.chunk(2)
                prediction = uncond + guidance_scale * (cond - uncond)
            step = self.scheduler_step(prediction, timesteps, latents, eta=eta)
            latents = step.latents
            all_latents.append(latents)
            log_probs.append(step.log_probs)
        return SampledTrajectories(
            images=self.decode(latents),
            latents=torch.stack(all_latents, dim=1),  # (B, T + 1, C, h, w)
            log_probs=torch.stack(log_probs, dim=1),  # (B, T)
            timesteps=scheduler.timesteps.repeat(batch, 1),  # (B, T)
        )

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images `(B, 3, H, W)` in [0, 1]; an fp16 VAE that asks for it (`force_upcast`) decodes in fp32."""
        vae = self.sd_pipeline.vae
        upcast = vae.dtype == torch.float16 and vae.config.get("force_upcast", False)
        dtype = torch.float32 if upcast else vae.dtype
        if upcast:
            vae.to(torch.float32)
        try:
            images = vae.decode(latents.to(dtype) / vae.config.scaling_factor, return_dict=False)[0]
        finally:
            if upcast:
                vae.to(torch.float16)
        return (images / 2 + 0.5).clamp(0, 1)
