"""Model families behind one interface: [`TDPOPipeline`] (`base.py`), one module per family, each registered under
the diffusers pipeline class it trains."""

from .base import (
    FAMILIES,
    LORA_WEIGHT_NAME,
    SampledTrajectories,
    TDPOPipeline,
    default_lora_config,
    family_for,
    guide,
    is_guided,
    register_family,
)
from .ddim import DDIMSteps, ddim_transition
from .flow_matching import FlowMatchingSDESteps
from .flux import TDPOFluxPipeline
from .stable_diffusion import TDPOStableDiffusionPipeline
from .stable_diffusion_3 import TDPOStableDiffusion3Pipeline
from .stable_diffusion_xl import TDPOStableDiffusionXLPipeline


__all__ = [
    "FAMILIES",
    "LORA_WEIGHT_NAME",
    "DDIMSteps",
    "FlowMatchingSDESteps",
    "SampledTrajectories",
    "TDPOFluxPipeline",
    "TDPOPipeline",
    "TDPOStableDiffusion3Pipeline",
    "TDPOStableDiffusionPipeline",
    "TDPOStableDiffusionXLPipeline",
    "ddim_transition",
    "default_lora_config",
    "family_for",
    "guide",
    "is_guided",
    "register_family",
]
