"""`TDPOStableDiffusionPipeline`: Stable Diffusion 1.x / 2.x (a UNet on DDIM steps), TRL's default DDPO pipeline."""

import warnings

import torch
from diffusers import StableDiffusionPipeline
from trl import DefaultDDPOStableDiffusionPipeline

from .base import TDPOPipeline, register_family
from .ddim import DDIMSteps


# TRL's `pipeline_step` (the inherited `__call__`) calls diffusers' deprecated `_encode_prompt`, which warns on every
# call. The call is TRL's, not the user's: silence that one message.
warnings.filterwarnings("ignore", message=r"`_encode_prompt\(\)` is deprecated", category=FutureWarning)


@register_family
class TDPOStableDiffusionPipeline(DDIMSteps, TDPOPipeline, DefaultDDPOStableDiffusionPipeline):
    """Stable Diffusion wrapped for DDPO / TDPO-R training (DDIM sampling that records log-probs).

    A `trl.DefaultDDPOStableDiffusionPipeline` (its `__call__`, `rgb_with_grad` and `scheduler_step` are TRL's), with
    these differences:
    - it can be built before any `Accelerator` (TRL's warns through accelerate's logger and raises `RuntimeError`);
    - it accepts an already-built `StableDiffusionPipeline` as well as a model id or path;
    - the LoRA adapter is configurable (`lora_config`);
    - checkpoints are loaded into the adapter being trained, not into a new one.

    Args: see [`TDPOPipeline`]. Conditioning per sample: `prompt_embeds` `(B, L, D)`.
    """

    pipeline_class = StableDiffusionPipeline

    def encode_prompts(self, prompts: list[str], device) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        ids = self.tokenize(prompts).to(device)
        return ids, {"prompt_embeds": self.text_encoder(ids)[0]}  # (B, L, D)

    def predict(self, model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The UNet's noise (or v) prediction."""
        return model(inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"]).sample
