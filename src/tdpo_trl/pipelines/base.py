"""The interface every model family implements, the sampling loop they share, and the family registry.

A family is one module under `tdpo_trl.pipelines`: a subclass of [`TDPOPipeline`] that mixes in the step math of its
sampler ([`DDIMSteps`](ddim.py) or [`FlowMatchingSDESteps`](flow_matching.py)), implements the abstract methods below
and registers itself with [`register_family`] under the diffusers pipeline class it trains. The trainer only calls
methods of this interface, so a new family needs no change elsewhere.
"""

import abc
import contextlib
import os
from dataclasses import dataclass
from typing import ClassVar, Optional, Union

import torch
from diffusers import DiffusionPipeline
from diffusers.utils import convert_state_dict_to_diffusers, convert_unet_state_dict_to_peft
from peft import LoraConfig, get_peft_model_state_dict, set_peft_model_state_dict
from trl.models import DDPOStableDiffusionPipeline

from ..loading import check_model_reference, load_pretrained


LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


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


def guide(prediction: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Classifier-free guidance of a `(2B, ...)` prediction (unconditional rows, then conditional) -> `(B, ...)`."""
    uncond, cond = prediction.chunk(2)
    return uncond + guidance_scale * (cond - uncond)


def default_lora_config() -> LoraConfig:
    """The adapter TRL's DDPO trains: rank 4 on the attention projections."""
    return LoraConfig(
        r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_k", "to_q", "to_v", "to_out.0"]
    )


class TDPOPipeline(DDPOStableDiffusionPipeline, abc.ABC):
    """A diffusers pipeline wrapped for DDPO / TDPO-R training: sampling that records log-probs, the denoiser call,
    the step's density, LoRA I/O. Also TRL's `DDPOStableDiffusionPipeline` interface (`unet`, `vae`, `scheduler`,
    `save_checkpoint`, ...).

    Args:
        pretrained_model_name: a diffusers model id, a local folder, or an already-built `pipeline_class`.
        pretrained_model_revision: Hub revision, for ids.
        use_lora: train a LoRA adapter on the denoiser (`True`) or the whole denoiser (`False`).
        lora_config: the adapter to train. `None`: the `lora_*` fields of the trainer's `TDPOConfig` (whose defaults
            are `default_lora_config()`).
        torch_dtype: dtype to load the pipeline in.
    """

    pipeline_class: ClassVar[type] = DiffusionPipeline  # the diffusers pipeline this wrapper trains
    denoiser_name: ClassVar[str] = "unet"  # its attribute, and the prefix of its keys in diffusers' LoRA files
    frozen_module_names: ClassVar[tuple[str, ...]] = ("vae", "text_encoder")  # inference-only modules, if present
    trains_final_step: ClassVar[bool] = True  # `TDPOConfig.train_final_step=None` trains the last denoising step
    # False for guidance-distilled models (FLUX.1-dev): the guidance scale is a denoiser input, never CFG
    classifier_free_guidance: ClassVar[bool] = True
    # conditioning key -> the denoiser's keyword argument (e.g. SDXL adds pooled embeddings and time ids)
    conditioning_inputs: ClassVar[dict[str, str]] = {"prompt_embeds": "encoder_hidden_states"}

    def __init__(
        self,
        pretrained_model_name: Union[str, DiffusionPipeline],
        *,
        pretrained_model_revision: str = "main",
        use_lora: bool = True,
        lora_config: Optional[LoraConfig] = None,
        torch_dtype: Optional[torch.dtype] = None,
    ):
        if isinstance(pretrained_model_name, self.pipeline_class):
            self.diffusers_pipeline = pretrained_model_name
            self.pretrained_model = self.diffusers_pipeline.config.get("_name_or_path")
        elif isinstance(pretrained_model_name, str):
            kwargs = {"torch_dtype": torch_dtype} if torch_dtype is not None else {}
            check_model_reference(pretrained_model_name, "pretrained_model_name")
            self.diffusers_pipeline = load_pretrained(
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

        self.configure_scheduler()
        if hasattr(self.diffusers_pipeline, "safety_checker"):
            self.diffusers_pipeline.safety_checker = None
        for module in self.frozen_modules():
            module.requires_grad_(False)
        self.denoiser.requires_grad_(not self.use_lora)

    # ---------------------------------------------------------------- what each family implements

    @abc.abstractmethod
    def configure_scheduler(self):
        """Set up the scheduler whose steps have a known density (called once, at construction)."""

    @abc.abstractmethod
    def encode_prompts(self, prompts: list[str], device) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """`(prompt_ids, conditioning)`: the first tokenizer's ids `(B, L)` and the denoiser's text conditioning, a
        dict of batch-first tensors whose keys `conditioning_inputs` maps to the denoiser's arguments."""

    @abc.abstractmethod
    def predict(self, model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The denoiser's prediction (noise, v or velocity) on `denoiser_inputs`; `model` may be the prepared (DDP)
        one."""

    @abc.abstractmethod
    def initial_latents(self, batch: int, device, dtype) -> torch.Tensor:
        """x_T `(B, ...)` for `batch` samples, from the global RNG (after `scheduler.set_timesteps`)."""

    @abc.abstractmethod
    def model_input(self, latents: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        """The denoiser's `sample` input for `latents` at scheduler timestep `timestep` (a scalar)."""

    @abc.abstractmethod
    def sample_step(self, prediction, timesteps, latents, *, eta: float) -> tuple[torch.Tensor, torch.Tensor]:
        """One stochastic step from `latents` at `timesteps` `(B,)`: `(next_latents, log_prob (B,))`."""

    @abc.abstractmethod
    def step_log_prob(self, prediction, timesteps, latents, *, eta: float, next_latents) -> torch.Tensor:
        """Log-prob `(B,)` of the transition `latents -> next_latents` under `prediction`."""

    @abc.abstractmethod
    def transition(self, prediction, timesteps, latents, *, eta: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and standard deviation of the Gaussian step `latents -> next latents` (for the KL to the base)."""

    @abc.abstractmethod
    def training_target(self, latents, noise, timesteps) -> tuple[torch.Tensor, torch.Tensor]:
        """`(noisy_latents, target)` of the model's own training loss at training `timesteps` (the pretraining
        loss)."""

    # ---------------------------------------------------------------- shared by every family

    @property
    def denoiser(self) -> torch.nn.Module:
        """The network being trained (a UNet or a transformer)."""
        return getattr(self.diffusers_pipeline, self.denoiser_name)

    def frozen_modules(self) -> list[torch.nn.Module]:
        """Modules used only for inference (moved to the device and cast to the inference dtype by the trainer)."""
        modules = (getattr(self.diffusers_pipeline, name, None) for name in self.frozen_module_names)
        return [module for module in modules if module is not None]

    def resident_modules(self) -> list[torch.nn.Module]:
        """Frozen modules the trainer keeps on the accelerator, in the inference dtype (all of them, unless a family
        offloads some, e.g. FLUX's text encoders with `offload_text_encoders`)."""
        return self.frozen_modules()

    def offloaded_modules_on(self, device):
        """A context in which the frozen modules `resident_modules` leaves out are on `device` (e.g. to sample with
        the diffusers pipeline); nothing to do unless a family offloads some."""
        return contextlib.nullcontext()

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        """Token ids `(B, L)` of the first tokenizer (what per-prompt statistics decode back to prompts)."""
        tokenizer = self.tokenizer
        return tokenizer(
            list(prompts), return_tensors="pt", padding="max_length", truncation=True,
            max_length=tokenizer.model_max_length,
        ).input_ids  # fmt: skip

    def guided(self, guidance_scale: float) -> bool:
        """Whether sampling at `guidance_scale` runs classifier-free guidance (a `(2B, ...)` denoiser batch); the
        update recomputes log-probs the same way."""
        return self.classifier_free_guidance and is_guided(guidance_scale)

    def set_timesteps(self, num_inference_steps: int, device):
        """Set the scheduler's sampling schedule (FLUX shifts it by the image's size)."""
        self.scheduler.set_timesteps(num_inference_steps, device=device)

    def encode_negative_prompt(self, negative_prompt: str, device) -> dict[str, torch.Tensor]:
        """The conditioning of the negative prompt (batch 1), used for classifier-free guidance."""
        return self.encode_prompts([negative_prompt], device)[1]

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

    def conditioning_from_embeds(self, embeds, guided: bool) -> dict[str, torch.Tensor]:
        """The conditioning dict of TRL's `embeds` argument (`DDPOTrainer.calculate_loss`): the prompts' embeddings
        `(B, L, D)`, or with guidance the negative prompt's rows then the prompts' `(2B, L, D)`. A dict is returned as
        is; a tensor needs a family conditioned on one input (SD 1.x)."""
        if isinstance(embeds, dict):
            return embeds
        keys = list(self.conditioning_inputs)
        if len(keys) != 1:
            raise ValueError(f"{type(self).__name__} is conditioned on {keys}; pass the conditioning as a dict")
        if not guided:
            return {keys[0]: embeds}
        negative, positive = embeds.chunk(2)
        return {keys[0]: positive, f"negative_{keys[0]}": negative}

    @torch.no_grad()
    def sample_with_log_probs(
        self, conditioning: dict, negative_conditioning: dict, *, num_inference_steps: int, guidance_scale: float,
        eta: float,
    ) -> SampledTrajectories:  # fmt: skip
        """Sample a batch from the global RNG, recording every step's latent and log-prob. Classifier-free guidance
        only where `guided(guidance_scale)`."""
        scheduler = self.scheduler
        embeds = conditioning["prompt_embeds"]
        batch, device = len(embeds), embeds.device
        self.set_timesteps(num_inference_steps, device)
        latents = self.initial_latents(batch, device, embeds.dtype)
        cfg = self.guided(guidance_scale)
        both = {**conditioning, **{f"negative_{k}": v for k, v in negative_conditioning.items()}}
        all_latents, log_probs = [latents], []
        for t in scheduler.timesteps:
            timesteps = t.repeat(batch)  # (B,)
            prediction = self.predict(
                self.denoiser, self.denoiser_inputs(self.model_input(latents, t), timesteps, both, cfg)
            )
            if cfg:
                prediction = guide(prediction, guidance_scale)
            latents, log_prob = self.sample_step(prediction, timesteps, latents, eta=eta)
            all_latents.append(latents)
            log_probs.append(log_prob)
        return SampledTrajectories(
            images=self.decode(latents),
            latents=torch.stack(all_latents, dim=1),  # (B, T + 1, ...)
            log_probs=torch.stack(log_probs, dim=1),  # (B, T)
            timesteps=scheduler.timesteps.repeat(batch, 1),  # (B, T)
        )

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images `(B, 3, H, W)` in [0, 1], contiguous; an fp16 VAE that asks for it (`force_upcast`) decodes in
        fp32."""
        vae = self.vae
        upcast = vae.dtype == torch.float16 and vae.config.get("force_upcast", False)
        dtype = torch.float32 if upcast else vae.dtype
        if upcast:
            vae.to(torch.float32)
        try:
            images = vae.decode(latents.to(dtype) / vae.config.scaling_factor, return_dict=False)[0]
        finally:
            if upcast:
                vae.to(torch.float16)
        # contiguous, as TRL's sampler returns them: the VAE's output may be channels-last, and a reward's reduction
        # over it would sum in another order (last-bit differences)
        return (images / 2 + 0.5).clamp(0, 1).contiguous()

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Latents of images `(B, 3, H, W)` in [-1, 1]: the VAE's posterior mean, scaled."""
        vae = self.vae
        return vae.encode(images.to(vae.dtype)).latent_dist.mode() * vae.config.scaling_factor

    def latent_shape(self) -> tuple[int, ...]:
        """The shape of one sample's latents at the model's native resolution (`(C, h, w)` here)."""
        config = self.denoiser.config
        return (config.in_channels, config.sample_size, config.sample_size)

    def image_resolution(self) -> int:
        """The side of the model's native images in pixels."""
        return self.latent_shape()[-1] * self.diffusers_pipeline.vae_scale_factor

    def apply_training_config(self, config):
        """Take `use_lora` (unless it is `None`), `gradient_checkpointing` and, if no `lora_config` was given, the
        LoRA settings of a `TDPOConfig`. Called by `TDPOTrainer` before the adapter is attached."""
        if config.use_lora is not None and config.use_lora != self.use_lora:
            self.use_lora = config.use_lora
            self.denoiser.requires_grad_(not self.use_lora)
        if self.lora_config is None:
            self.lora_config = config.lora_config()
        if config.gradient_checkpointing:
            self.denoiser.enable_gradient_checkpointing()

    def get_trainable_layers(self) -> torch.nn.Module:
        """Attach the LoRA adapter (if `use_lora`) and return the denoiser, whose trainable weights are in fp32."""
        denoiser = self.denoiser
        if self.use_lora:
            if getattr(denoiser, "peft_config", None) and "default" in denoiser.peft_config:
                raise RuntimeError(
                    f"the {self.denoiser_name} already has a 'default' LoRA adapter; build a new pipeline to retrain"
                )
            denoiser.add_adapter(self.lora_config if self.lora_config is not None else default_lora_config())
            for param in denoiser.parameters():
                if param.requires_grad:  # only the adapter: upcast so fp16 runs can unscale its gradients
                    param.data = param.data.float()
        return denoiser

    def save_denoiser(self, denoiser: torch.nn.Module, output_dir: str):
        """The LoRA in diffusers format, with its config (rank, alpha, targets) in the safetensors metadata so that
        `load_lora_weights` restores the same scaling; without LoRA the whole denoiser under `<denoiser_name>/`, as
        diffusers lays out a pipeline folder."""
        name = self.denoiser_name
        if not self.use_lora:
            denoiser.save_pretrained(os.path.join(output_dir, name))
            return
        state_dict = convert_state_dict_to_diffusers(get_peft_model_state_dict(denoiser, adapter_name="default"))
        self.diffusers_pipeline.save_lora_weights(
            save_directory=output_dir,
            weight_name=LORA_WEIGHT_NAME,
            **{
                f"{name}_lora_layers": state_dict,
                f"{name}_lora_adapter_metadata": denoiser.peft_config["default"].to_dict(),
            },
        )

    def load_denoiser(self, denoiser: torch.nn.Module, input_dir: str):
        """Load what `save_denoiser` wrote into `denoiser`: the LoRA into the adapter being trained (`default`), or
        the whole denoiser's weights."""
        if not self.use_lora:
            loaded = type(denoiser).from_pretrained(input_dir, subfolder=self.denoiser_name)
            denoiser.load_state_dict(loaded.state_dict())
            return
        loaded = self.diffusers_pipeline.lora_state_dict(input_dir, weight_name=LORA_WEIGHT_NAME)
        state_dict = loaded[0] if isinstance(loaded, tuple) else loaded  # SD/SDXL: (state_dict, alphas); SD3: dict
        prefix = f"{self.denoiser_name}."
        denoiser_state_dict = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
        denoiser_state_dict = convert_unet_state_dict_to_peft(denoiser_state_dict)
        result = set_peft_model_state_dict(denoiser, denoiser_state_dict, adapter_name="default")
        if result.unexpected_keys:
            raise ValueError(
                f"checkpoint {input_dir} has LoRA keys this {self.denoiser_name} lacks: {result.unexpected_keys[:5]}"
            )

    # ---------------------------------------------------------------- TRL's `DDPOStableDiffusionPipeline` interface

    @property
    def sd_pipeline(self) -> DiffusionPipeline:
        """TRL's name for `diffusers_pipeline` (TRL's inherited methods read it)."""
        return self.diffusers_pipeline

    @property
    def unet(self) -> torch.nn.Module:
        """TRL's name for the trained network: `denoiser`, a UNet or a transformer."""
        return self.denoiser

    @property
    def vae(self):
        return self.diffusers_pipeline.vae

    @property
    def tokenizer(self):
        return self.diffusers_pipeline.tokenizer

    @property
    def scheduler(self):
        return self.diffusers_pipeline.scheduler

    @property
    def text_encoder(self):
        return self.diffusers_pipeline.text_encoder

    @property
    def autocast(self):
        """As TRL: no autocast for LoRA (its weights are fp32), else the trainer's accelerator autocast (None)."""
        return contextlib.nullcontext if self.use_lora else None

    def set_progress_bar_config(self, *args, **kwargs):
        self.diffusers_pipeline.set_progress_bar_config(*args, **kwargs)

    def save_checkpoint(self, models, weights, output_dir):
        """TRL's save-state hook: `models` is the denoiser alone (see `save_denoiser`)."""
        if len(models) != 1:
            raise ValueError(f"expected the {self.denoiser_name} alone, got {len(models)} models")
        self.save_denoiser(models[0], output_dir)

    def load_checkpoint(self, models, input_dir):
        """TRL's load-state hook: `models` is the denoiser alone (see `load_denoiser`)."""
        if len(models) != 1:
            raise ValueError(f"expected the {self.denoiser_name} alone, got {len(models)} models")
        self.load_denoiser(models[0], input_dir)


# diffusers pipeline class name (as `model_index.json` names it) -> the family's wrapper
FAMILIES: dict[str, type[TDPOPipeline]] = {}


def register_family(wrapper: type[TDPOPipeline]) -> type[TDPOPipeline]:
    """Class decorator: `wrapper` trains its `pipeline_class`; `tdpo-trl train` picks it from `model_index.json`."""
    if not (isinstance(wrapper, type) and issubclass(wrapper, TDPOPipeline)):
        raise TypeError(f"a model family must subclass TDPOPipeline, got {wrapper!r}")
    FAMILIES[wrapper.pipeline_class.__name__] = wrapper
    return wrapper


def family_for(pipeline_class_name: str) -> type[TDPOPipeline]:
    """The wrapper that trains the diffusers pipeline class named `pipeline_class_name` (`"StableDiffusionPipeline"`,
    ...)."""
    if pipeline_class_name not in FAMILIES:
        raise ValueError(f"no tdpo_trl model family trains {pipeline_class_name!r}; supported: {sorted(FAMILIES)}")
    return FAMILIES[pipeline_class_name]
