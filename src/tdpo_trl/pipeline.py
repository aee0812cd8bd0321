"""`TDPOStableDiffusionPipeline`: TRL's default DDPO pipeline, constructible before any Accelerator exists."""

import logging
import os
import warnings
from dataclasses import dataclass
from typing import Optional, Union

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from diffusers.utils import convert_state_dict_to_diffusers, convert_unet_state_dict_to_peft
from diffusers.utils.torch_utils import randn_tensor
from peft import LoraConfig, get_peft_model_state_dict, set_peft_model_state_dict
from trl import DefaultDDPOStableDiffusionPipeline

from .loading import check_model_reference, load_pretrained


logger = logging.getLogger(__name__)

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"

# TRL's `pipeline_step` calls diffusers' deprecated `_encode_prompt`, which warns on every sampling call (once per
# epoch and per held-out evaluation in a user's log). The call is TRL's, not the user's: silence that one message.
warnings.filterwarnings("ignore", message=r"`_encode_prompt\(\)` is deprecated", category=FutureWarning)


@dataclass
class SampledTrajectories:
    """What one sampling call returns: `images` `(B, 3, H, W)` in [0, 1], `latents` `(B, T + 1, ...)` (x_T ... x_0),
    `log_probs` `(B, T)` of each step's transition, `timesteps` `(B, T)`."""

    images: torch.Tensor
    latents: torch.Tensor
    log_probs: torch.Tensor
    timesteps: torch.Tensor


def is_guided(guidance_scale: float) -> bool:
    """Whether sampling at `guidance_scale` uses classifier-free guidance (as diffusers: only above 1); the update
    recomputes log-probs the same way."""
    return guidance_scale > 1.0


def default_lora_config() -> LoraConfig:
    """The adapter TRL's DDPO trains: rank 4 on the attention projections."""
    return LoraConfig(
        r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_k", "to_q", "to_v", "to_out.0"]
    )


class TDPOStableDiffusionPipeline(DefaultDDPOStableDiffusionPipeline):
    """Stable Diffusion wrapped for DDPO / TDPO training (DDIM sampling that records log-probs).

    Differences from `trl.DefaultDDPOStableDiffusionPipeline`:
    - it can be built before any `Accelerator` (TRL's warns through accelerate's logger and raises `RuntimeError`);
    - it accepts an already-built `StableDiffusionPipeline` as well as a model id or path;
    - the LoRA adapter is configurable (`lora_config`);
    - checkpoints are loaded into the adapter being trained, not into a new one.

    Args:
        pretrained_model_name: a diffusers Stable Diffusion model id, a local folder, or a `StableDiffusionPipeline`.
        pretrained_model_revision: Hub revision, for ids.
        use_lora: train a LoRA adapter on the UNet (`True`) or the whole UNet (`False`).
        lora_config: the adapter to train. `None`: the `lora_*` fields of the trainer's `TDPOConfig` (whose defaults
            are `default_lora_config()`).
        torch_dtype: dtype to load the pipeline in.
    """

    pipeline_class = StableDiffusionPipeline  # the diffusers pipeline this wrapper trains
    trains_final_step = True  # `TDPOConfig.train_final_step=None` trains the last denoising step

    def __init__(
        self,
        pretrained_model_name: Union[str, StableDiffusionPipeline],
        *,
        pretrained_model_revision: str = "main",
        use_lora: bool = True,
        lora_config: Optional[LoraConfig] = None,
        torch_dtype: Optional[torch.dtype] = None,
    ):
        if isinstance(pretrained_model_name, self.pipeline_class):
            self.sd_pipeline = pretrained_model_name
            self.pretrained_model = self.sd_pipeline.config.get("_name_or_path")
        elif isinstance(pretrained_model_name, str):
            kwargs = {"torch_dtype": torch_dtype} if torch_dtype is not None else {}
            check_model_reference(pretrained_model_name, "pretrained_model_name")
            self.sd_pipeline = load_pretrained(
                self.pipeline_class.from_pretrained,
                pretrained_model_name,
                "pretrained_model_name",
                revision=pretrained_model_revision,
                **kwargs,
            )
            self.pretrained_model = pretrained_model_name
        else:
            raise TypeError(
                f"`pretrained_model_name` must be a model id, a local path or a {self.pipeline_class.__name__}, got "
                f"{type(pretrained_model_name).__name__}"
            )
        self.pretrained_revision = pretrained_model_revision
        self.use_lora = use_lora
        self.lora_config = lora_config

        self._configure_scheduler()
        if hasattr(self.sd_pipeline, "safety_checker"):
            self.sd_pipeline.safety_checker = None
        for module in self.frozen_modules():
            module.requires_grad_(False)
        self.denoiser.requires_grad_(not self.use_lora)

    def _configure_scheduler(self):
        """DDIM, whose steps are Gaussian with a known log-prob (TRL's `scheduler_step`)."""
        self.sd_pipeline.scheduler = DDIMScheduler.from_config(self.sd_pipeline.scheduler.config)
        scheduler_config = self.sd_pipeline.scheduler.config
        if scheduler_config.timestep_spacing == "leading" and scheduler_config.steps_offset == 0:
            # The last DDIM step would be t=0, where the step's variance is 0 and its log-prob is not finite.
            raise ValueError(
                "the scheduler has timestep_spacing='leading' with steps_offset=0, so DDIM sampling ends at t=0 where "
                "log-probabilities are undefined; set `steps_offset=1` (as Stable Diffusion) or "
                "timestep_spacing='trailing' in the scheduler config"
            )

    # ---------------------------------------------------------------- what the trainer calls (one per model family)

    @property
    def denoiser(self) -> torch.nn.Module:
        """The network being trained (a UNet here; a transformer for flow-matching families)."""
        return self.sd_pipeline.unet

    def frozen_modules(self) -> list[torch.nn.Module]:
        """Modules used only for inference (moved to the device and cast to the inference dtype by the trainer)."""
        return [self.sd_pipeline.vae, self.sd_pipeline.text_encoder]

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        """Token ids `(B, L)` of the first tokenizer (what per-prompt statistics decode back to prompts)."""
        tokenizer = self.sd_pipeline.tokenizer
        return tokenizer(
            list(prompts), return_tensors="pt", padding="max_length", truncation=True,
            max_length=tokenizer.model_max_length,
        ).input_ids  # fmt: skip

    def encode_prompts(self, prompts: list[str], device) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """`(prompt_ids, conditioning)`: the token ids and the denoiser's text conditioning, every tensor batch-first
        (`{"prompt_embeds": (B, L, D)}` here)."""
        ids = self.tokenize(prompts).to(device)
        return ids, {"prompt_embeds": self.sd_pipeline.text_encoder(ids)[0]}

    def encode_negative_prompt(self, negative_prompt: str, device) -> dict[str, torch.Tensor]:
        """The conditioning of the negative prompt (batch 1), used for classifier-free guidance."""
        return self.encode_prompts([negative_prompt], device)[1]

    def sample_with_log_probs(
        self, conditioning: dict, negative_conditioning: dict, *, num_inference_steps: int, guidance_scale: float,
        eta: float,
    ) -> SampledTrajectories:  # fmt: skip
        """Sample a batch with TRL's DDIM sampler, recording every step's latent and log-prob. Without guidance
        (`guidance_scale <= 1`, which TRL's sampler does not support) through `sample_ddim`."""
        if not is_guided(guidance_scale):
            return self.sample_ddim(
                conditioning, negative_conditioning, num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale, eta=eta,
            )  # fmt: skip
        output = self(
            prompt_embeds=conditioning["prompt_embeds"],
            negative_prompt_embeds=negative_conditioning["prompt_embeds"],
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            eta=eta,
            output_type="pt",
        )
        batch = len(conditioning["prompt_embeds"])
        return SampledTrajectories(
            images=output.images,
            latents=torch.stack(output.latents, dim=1),  # (B, T + 1, C, h, w)
            log_probs=torch.stack(output.log_probs, dim=1),  # (B, T)
            timesteps=self.scheduler.timesteps.repeat(batch, 1),  # (B, T)
        )

    @torch.no_grad()
    def sample_ddim(
        self, conditioning: dict, negative_conditioning: dict, *, num_inference_steps: int, guidance_scale: float,
        eta: float,
    ) -> SampledTrajectories:  # fmt: skip
        """DDIM sampling through the wrapper's `denoiser_inputs` / `predict` and TRL's `scheduler_step`, from the
        global RNG as TRL's SD sampler; guidance only when `guidance_scale > 1`."""
        scheduler = self.scheduler
        embeds = conditioning["prompt_embeds"]
        batch, device = len(embeds), embeds.device
        scheduler.set_timesteps(num_inference_steps, device=device)
        latents = randn_tensor((batch, *self.latent_shape()), device=device, dtype=embeds.dtype)
        latents = latents * scheduler.init_noise_sigma
        cfg = is_guided(guidance_scale)
        both = {**conditioning, **{f"negative_{k}": v for k, v in negative_conditioning.items()}}
        all_latents, log_probs = [latents], []
        for t in scheduler.timesteps:
            timesteps = t.repeat(batch)  # (B,)
            inputs = self.denoiser_inputs(scheduler.scale_model_input(latents, t), timesteps, both, cfg)
            prediction = self.predict(self.denoiser, inputs)
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

    # conditioning key -> the denoiser's keyword argument (SDXL adds pooled embeddings and time ids)
    conditioning_inputs = {"prompt_embeds": "encoder_hidden_states"}

    def denoiser_inputs(self, latents, timesteps, conditioning: dict, cfg: bool) -> dict[str, torch.Tensor]:
        """The denoiser's batch-first inputs for one step: `sample`, `timestep` and the conditioning, renamed by
        `conditioning_inputs`. With `cfg` `(2B, ...)`: the negative prompt's conditioning
        (`conditioning["negative_<key>"]`), then the prompts'."""
        if not cfg:
            inputs = {"sample": latents, "timestep": timesteps}
            return {**inputs, **{name: conditioning[key] for key, name in self.conditioning_inputs.items()}}
        inputs = {"sample": torch.cat([latents] * 2), "timestep": torch.cat([timesteps] * 2)}
        for key, name in self.conditioning_inputs.items():
            inputs[name] = torch.cat([conditioning[f"negative_{key}"], conditioning[key]])
        return inputs

    def predict(self, model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The denoiser's prediction (noise, or v) on `denoiser_inputs`; `model` may be the prepared (DDP) one."""
        return model(inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"]).sample

    def step_log_prob(self, prediction, timesteps, latents, *, eta: float, next_latents) -> torch.Tensor:
        """Log-prob `(B,)` of the transition `latents -> next_latents` under `prediction` (TRL's DDIM step)."""
        return self.scheduler_step(prediction, timesteps, latents, eta=eta, prev_sample=next_latents).log_probs

    def transition(self, prediction, timesteps, latents, *, eta: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and standard deviation of the Gaussian step `latents -> next latents` (for the KL to the base)."""
        from .regularizers import ddim_transition

        return ddim_transition(self.scheduler, prediction, timesteps, latents, eta)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Latents of images `(B, 3, H, W)` in [-1, 1]: the VAE's posterior mean, scaled (for Stable Diffusion's VAE
        the posterior's spread is negligible; the digits base was trained on the mean)."""
        vae = self.sd_pipeline.vae
        return vae.encode(images.to(vae.dtype)).latent_dist.mode() * vae.config.scaling_factor

    def training_target(self, latents, noise, timesteps) -> tuple[torch.Tensor, torch.Tensor]:
        """`(noisy_latents, target)` of the model's own training loss at `timesteps` (noise, or v)."""
        scheduler = self.scheduler
        noisy = scheduler.add_noise(latents, noise, timesteps)
        if scheduler.config.prediction_type == "v_prediction":
            return noisy, scheduler.get_velocity(latents, noise, timesteps)
        return noisy, noise

    def latent_shape(self) -> tuple[int, int, int]:
        """`(C, h, w)` of the latents at the model's native resolution."""
        config = self.denoiser.config
        return (config.in_channels, config.sample_size, config.sample_size)

    def apply_training_config(self, config):
        """Take `use_lora` (unless it is `None`) and, if no `lora_config` was given, the LoRA settings of a
        `TDPOConfig`. Called by `TDPOTrainer` before the adapter is attached."""
        if config.use_lora is not None and config.use_lora != self.use_lora:
            self.use_lora = config.use_lora
            self.denoiser.requires_grad_(not self.use_lora)
        if self.lora_config is None:
            self.lora_config = config.lora_config()

    def get_trainable_layers(self) -> torch.nn.Module:
        """Attach the LoRA adapter (if `use_lora`) and return the UNet, whose trainable weights are in fp32."""
        unet = self.denoiser
        if self.use_lora:
            if getattr(unet, "peft_config", None) and "default" in unet.peft_config:
                raise RuntimeError("the UNet already has a 'default' LoRA adapter; build a new pipeline to retrain")
            unet.add_adapter(self.lora_config if self.lora_config is not None else default_lora_config())
            for param in unet.parameters():
                if param.requires_grad:  # only the adapter: upcast so fp16 runs can unscale its gradients
                    param.data = param.data.float()
        return unet

    denoiser_name = "unet"  # the denoiser's name in diffusers' LoRA files (`<name>.` key prefix, `<name>_lora_layers`)

    def save_checkpoint(self, models, weights, output_dir):
        """The LoRA in diffusers format, with its config (rank, alpha, targets) in the safetensors metadata so that
        `load_lora_weights` restores the same scaling; without LoRA the whole denoiser under `unet/` (`transformer/`
        for SD3), as diffusers lays out a pipeline folder."""
        if len(models) != 1:
            raise ValueError(f"expected the {self.denoiser_name} alone, got {len(models)} models")
        denoiser, name = models[0], self.denoiser_name
        if not self.use_lora:
            denoiser.save_pretrained(os.path.join(output_dir, name))
            return
        state_dict = convert_state_dict_to_diffusers(get_peft_model_state_dict(denoiser, adapter_name="default"))
        self.sd_pipeline.save_lora_weights(
            save_directory=output_dir,
            weight_name=LORA_WEIGHT_NAME,
            **{
                f"{name}_lora_layers": state_dict,
                f"{name}_lora_adapter_metadata": denoiser.peft_config["default"].to_dict(),
            },
        )

    def load_checkpoint(self, models, input_dir):
        """Load a checkpoint's LoRA weights into the adapter being trained (`default`), or its whole denoiser."""
        if len(models) != 1:
            raise ValueError(f"expected the {self.denoiser_name} alone, got {len(models)} models")
        if not self.use_lora:
            loaded = type(models[0]).from_pretrained(input_dir, subfolder=self.denoiser_name)
            models[0].load_state_dict(loaded.state_dict())
            return
        loaded = self.sd_pipeline.lora_state_dict(input_dir, weight_name=LORA_WEIGHT_NAME)
        state_dict = loaded[0] if isinstance(loaded, tuple) else loaded  # SD/SDXL: (state_dict, alphas); SD3: dict
        prefix = f"{self.denoiser_name}."
        denoiser_state_dict = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
        denoiser_state_dict = convert_unet_state_dict_to_peft(denoiser_state_dict)
        result = set_peft_model_state_dict(models[0], denoiser_state_dict, adapter_name="default")
        if result.unexpected_keys:
            raise ValueError(
                f"checkpoint {input_dir} has LoRA keys this {self.denoiser_name} lacks: {result.unexpected_keys[:5]}"
            )
