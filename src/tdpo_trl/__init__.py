"""tdpo-trl: TDPO-R reinforcement learning for text-to-image diffusion models, on TRL's DDPO."""

from .advantages import clipped_value_loss, discounted_returns, explained_variance, temporal_advantages
from .guard import OverOptimizationGuard
from .image_logging import TrackerImageLogger
from .modeling_critic import CLIPImageFeatures, LatentFeatures, TimestepCritic, ValueHead
from .neuron_reset import ActiveNeuronResetCallback
from .pipelines import (
    TDPOFluxPipeline,
    TDPOPipeline,
    TDPOStableDiffusion3Pipeline,
    TDPOStableDiffusionPipeline,
    TDPOStableDiffusionXLPipeline,
)
from .rewards import AttributeParity, CompositionReward, DistributionReward, Diversity, StatisticalParity
from .tasks import Task, load_tasks
from .tdpo_config import TDPOConfig
from .tdpo_trainer import TDPOTrainer
from .trainer_callback import TDPOCallback
from .version import __version__ as __version__


__all__ = [
    "ActiveNeuronResetCallback",
    "CLIPImageFeatures",
    "DistributionReward",
    "Diversity",
    "AttributeParity",
    "CompositionReward",
    "LatentFeatures",
    "OverOptimizationGuard",
    "StatisticalParity",
    "TDPOCallback",
    "TrackerImageLogger",
    "TDPOConfig",
    "TDPOPipeline",
    "TDPOFluxPipeline",
    "TDPOStableDiffusion3Pipeline",
    "TDPOStableDiffusionPipeline",
    "TDPOStableDiffusionXLPipeline",
    "TDPOTrainer",
    "Task",
    "TimestepCritic",
    "ValueHead",
    "clipped_value_loss",
    "discounted_returns",
    "explained_variance",
    "load_tasks",
    "temporal_advantages",
]
