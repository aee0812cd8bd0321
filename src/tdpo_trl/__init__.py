"""tdpo-trl: TDPO-R reinforcement learning for text-to-image diffusion models, on TRL's DDPO."""

__version__ = "0.1.0.dev0"

from .advantages import clipped_value_loss, discounted_returns, explained_variance, temporal_advantages
from .distribution_rewards import DistributionReward, Diversity, StatisticalParity
from .guard import OverOptimizationGuard
from .modeling_critic import CLIPImageFeatures, LatentFeatures, TimestepCritic, ValueHead
from .neuron_reset import ActiveNeuronResetCallback
from .pipeline import TDPOStableDiffusionPipeline
from .pipeline_sd3 import TDPOStableDiffusion3Pipeline
from .pipeline_sdxl import TDPOStableDiffusionXLPipeline
from .tasks import Task, load_tasks
from .tdpo_config import TDPOConfig
from .tdpo_trainer import TDPOTrainer
from .trainer_callback import TDPOCallback


__all__ = [
    "ActiveNeuronResetCallback",
    "CLIPImageFeatures",
    "DistributionReward",
    "Diversity",
    "LatentFeatures",
    "OverOptimizationGuard",
    "StatisticalParity",
    "TDPOCallback",
    "TDPOConfig",
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
