"""TDPO-R trainer: DDPO with a per-timestep critic and temporal-difference advantages.

Zhang et al., "Confronting Reward Overoptimization for Diffusion Models: A Perspective of Inductive and Primacy
Biases", ICML 2024 (https://arxiv.org/abs/2402.08552). Built on TRL's `DDPOTrainer` (trl < 0.24).
"""

import contextlib
import copy
import math
import os
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent import futures
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration, gather_object, set_seed
from tqdm.auto import tqdm
from trl import DDPOTrainer
from trl.models import DDPOStableDiffusionPipeline
from trl.trainer.utils import PerPromptStatTracker

from . import saving
from .advantages import (
    batch_normalize,
    clipped_value_loss,
    discounted_returns,
    explained_variance,
    temporal_advantages,
)
from .checkpointing import (
    StatTrackerState,
    TrainingProgress,
    check_structure,
    list_checkpoints,
    resolve_checkpoint,
    run_folder_of,
    save_checkpoint,
)
from .distribution_rewards import DistributionReward, is_distribution_reward
from .evaluation import mean_std, sample_images, save_image_grid, score_images
from .guard import OverOptimizationGuard
from .hub import check_repo_id, push_folder
from .loading import load_pretrained
from .model_card import create_model_card
from .modeling_critic import TimestepCritic, shared_image_features
from .neuron_reset import ActiveNeuronResetCallback
from .optimization import EpochLearningRate, OptimizerGroup, clip_and_step
from .pipeline import is_guided
from .prompts import RepeatedPrompts, get_prompt_function, has_state
from .regularizers import (
    PretrainingData,
    load_pretraining_dataset,
    pretraining_inputs,
    reference_policy,
    transition_kl,
)
from .rewards import get_reward_function, reward_name, short_name
from .tasks import Task, check_tasks
from .tdpo_config import TDPOConfig, check_prompt_repeats
from .trainer_callback import TDPOCallback, call_event, check_callbacks
from .validation import (
    CheckedPromptFunction,
    call_reward_function,
    check_finite_weights,
    check_reward_output,
    describe,
)


logger = get_logger(__name__)
SINGLE_TASK = "default"  # the task name of a run given one reward and one prompt function

# Sample entries indexed by denoising step: shape (N, T, ...). They are permuted along T before training.
_PER_STEP_KEYS = (
    "timesteps",
    "latents",
    "next_latents",
    "log_probs",
    "advantages",
    "critic_features",
    "values",
    "returns",
)


def _step_permutations(num_samples: int, num_steps: int, device, num_trainable: Optional[int] = None) -> torch.Tensor:
    """An independent random order of the denoising steps for each sample, `(N, T)`, from the global RNG. With
    `num_trainable < T` only the first `num_trainable` steps are shuffled; the others stay last, in order."""
    num_trainable = num_steps if num_trainable is None else num_trainable
    rest = torch.arange(num_trainable, num_steps, device=device)
    return torch.stack([torch.cat([torch.randperm(num_trainable, device=device), rest]) for _ in range(num_samples)])


def _same_folder(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def shown_reward_key(record: dict, prefix: str = "") -> str:
    """The per-epoch reward to show a person (progress bar, tables): a distribution-level reward's batch score
    `<prefix>reward/group_score` (its per-sample leave-one-out credits average about 0), else `<prefix>reward/mean`."""
    key = f"{prefix}reward/group_score"
    return key if key in record else f"{prefix}reward/mean"


class TDPOTrainer(DDPOTrainer):
    """Fine-tune a diffusion model on a reward with TDPO-R (or DDPO with `config.use_critic=False`).

    Sampling records, for every denoising step t of every trajectory, the critic's value V(x_t) and the critic
    features of x_t (cached, never recomputed). The final reward is normalized (per prompt or over the batch), turned
    into per-step returns G_t, and into temporal advantages A_t = G_t - V(x_t). Training is timestep-major: for every
    timestep position, for every minibatch, a PPO-clipped policy loss on that step's log-prob ratio plus a clipped
    value loss. Gradients of the LoRA (or UNet) and of the critic head are all-reduced across processes.

    Args:
        config ([`TDPOConfig`]): training configuration.
        reward_function (`Callable[[torch.Tensor, tuple[str], tuple[Any]], tuple[torch.Tensor, Any]]`):
            `(images, prompts, prompt_metadata) -> (rewards, reward_metadata)`; images are `(B, 3, H, W)` in [0, 1].
        prompt_function (`Callable[[], tuple[str, Any]]`): returns one `(prompt, metadata)` pair per call.
        sd_pipeline ([`TDPOStableDiffusionPipeline`], [`TDPOStableDiffusionXLPipeline`]): the model, wrapped; any
            wrapper with their interface (`encode_prompts`, `sample_with_log_probs`, `denoiser_inputs`, `predict`,
            `step_log_prob`, ...: one per model family) trains the same way.
        image_samples_hook (`Callable`, *optional*): called as `hook(prompt_image_data, global_step, tracker)`.
        critic ([`TimestepCritic`], *optional*): a critic to use instead of the one `config.critic_encoder` names.
        callbacks (`list[TDPOCallback]`, *optional*): called at the events listed in [`TDPOCallback`]. An
            [`ActiveNeuronResetCallback`] is added when `config.neuron_reset` is on and none is given.
        eval_reward_functions (`dict[str, Callable]`, *optional*): out-of-domain rewards by metric name; default: the
            ones `config.eval_reward_functions` names.
        tasks (`list[Task]`, *optional*): several tasks trained jointly (see `tdpo_trl.tasks`), instead of
            `reward_function` and `prompt_function` (pass None for those). Metrics become `task/<name>/...`.

    Example:
        ```python
        from tdpo_trl import TDPOConfig, TDPOStableDiffusionPipeline, TDPOTrainer

        pipeline = TDPOStableDiffusionPipeline("stable-diffusion-v1-5/stable-diffusion-v1-5", use_lora=True)
        trainer = TDPOTrainer(
            TDPOConfig(num_epochs=100, sample_batch_size=8, train_batch_size=2),
            reward_function=lambda images, prompts, metadata: (images.mean(dim=(1, 2, 3)), {}),
            prompt_function=lambda: ("a photo of a cat", {}),
            sd_pipeline=pipeline,
        )
        trainer.train()
        ```
    """

    _tag_names = ["trl", "ddpo", "tdpo"]

    def __init__(
        self,
        config: TDPOConfig,
        reward_function: Optional[Callable[[torch.Tensor, tuple[str], tuple[Any]], Any]],
        prompt_function: Optional[Callable[[], tuple[str, Any]]],
        sd_pipeline: DDPOStableDiffusionPipeline,
        image_samples_hook: Optional[Callable[[Any, Any, Any], Any]] = None,
        critic: Optional[TimestepCritic] = None,
        callbacks: Optional[list[TDPOCallback]] = None,
        eval_reward_functions: Optional[dict[str, Callable]] = None,
        tasks: Optional[list[Task]] = None,
    ):
        # DDPOTrainer.__init__ is not called: it forwards the un-wrapped UNet (no gradient all-reduce across
        # processes), checkpoints on rank 0 only (deadlock), needs `project_kwargs` to save and validates after
        # building the Accelerator. The methods that work are reused: `loss`, `_setup_optimizer`,
        # `_generate_samples`, `_config_check`. (`compute_rewards` is replaced: it checks what the reward returns,
        # and TRL's async path expected futures.)
        if not isinstance(config, TDPOConfig):
            raise TypeError(f"`config` must be a TDPOConfig, got {type(config).__name__}")
        if critic is not None and not config.use_critic:
            raise ValueError("a `critic` was given but `config.use_critic` is False (DDPO mode); drop one of them")
        self.config = config
        if tasks is not None:
            if reward_function is not None or prompt_function is not None:
                raise ValueError("give either `tasks` or `reward_function` and `prompt_function`, not both")
            self.tasks = check_tasks(tasks)
        else:
            if not callable(reward_function):
                raise TypeError(f"`reward_function` must be callable, got {describe(reward_function)}")
            if not callable(prompt_function):
                raise TypeError(f"`prompt_function` must be callable, got {describe(prompt_function)}")
            self.tasks = [Task(SINGLE_TASK, reward_function, prompt_function)]
        self.multi_task = tasks is not None and len(self.tasks) > 1
        # per task: the prompt function (grouped by `prompt_repeats`, every (prompt, metadata) checked)
        self.prompt_repeats = [self._prompt_repeats(task) for task in self.tasks]
        self._prompt_sources = [
            RepeatedPrompts(task.prompt_function, k) if k > 1 else task.prompt_function
            for task, k in zip(self.tasks, self.prompt_repeats)
        ]
        self._prompt_fns = [CheckedPromptFunction(source) for source in self._prompt_sources]
        self.reward_fn = self.tasks[0].reward_function  # the task being sampled (TRL's names); set per task in `step`
        self.prompt_fn = self._prompt_fns[0]
        self._task_index = 0  # the task being sampled and scored
        self.training_task: Optional[str] = None  # the task being trained (`step`)
        if not hasattr(sd_pipeline, "sample_with_log_probs"):
            raise TypeError(
                f"`sd_pipeline` must be a tdpo_trl pipeline wrapper (TDPOStableDiffusionPipeline, "
                f"TDPOStableDiffusionXLPipeline), got {type(sd_pipeline).__name__}; wrap a diffusers pipeline with "
                "TDPOStableDiffusionPipeline(pipe)"
            )
        self.sd_pipeline = sd_pipeline
        self.image_samples_callback = image_samples_hook
        self.train_final_step = (
            config.train_final_step if config.train_final_step is not None else sd_pipeline.trains_final_step
        )
        config.check_num_train_timesteps(self.train_final_step)
        self.num_trainable_steps = config.num_trainable_steps(self.train_final_step)
        self.num_train_timesteps = config.num_train_timesteps(self.train_final_step)
        self.progress = TrainingProgress()
        self.should_stop = False  # a callback (e.g. OverOptimizationGuard) sets it to end `train` after this epoch
        self.log_history: list[dict[str, float]] = self.progress.log_history  # one record per epoch, checkpointed
        self.callbacks = check_callbacks(callbacks)
        if eval_reward_functions is None:
            eval_reward_functions = {short_name(s): get_reward_function(s) for s in config.eval_reward_functions}
        self.eval_reward_functions = dict(eval_reward_functions)
        self._heldout_prompts: dict[int, list[str]] = {}  # per task
        has_reset = any(isinstance(c, ActiveNeuronResetCallback) for c in self.callbacks)
        if config.neuron_reset and not has_reset:
            self.callbacks.append(ActiveNeuronResetCallback.from_config(config))
        elif has_reset and not config.use_critic:
            raise ValueError("an ActiveNeuronResetCallback was given, but `config.use_critic` is False (no critic)")

        self.accelerator = Accelerator(
            log_with=config.log_with,
            mixed_precision=config.mixed_precision,
            project_config=self._project_configuration(),
            # TDPO: one optimizer step per timestep position after `train_gradient_accumulation_steps` minibatches.
            # DDPO: as TRL, accumulate over all trained timesteps of that many minibatches.
            gradient_accumulation_steps=config.train_gradient_accumulation_steps
            * (1 if config.use_critic else self.num_train_timesteps),
            **config.accelerator_kwargs,
        )
        is_okay, message = self._config_check()
        if not is_okay:
            raise ValueError(message)
        if self.accelerator.is_main_process and config.log_with is not None:
            tracker_config = config.to_dict()
            tracker_config = {
                k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in tracker_config.items()
            }
            self.accelerator.init_trackers(
                config.tracker_project_name, config=tracker_config, init_kwargs=config.tracker_kwargs
            )
        set_seed(config.seed, device_specific=True)

        self.sd_pipeline.set_progress_bar_config(disable=True)  # per-step bars; the epoch bar is in `train`
        inference_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(
            self.accelerator.mixed_precision, torch.float32
        )
        device = self.accelerator.device
        for module in (*self.sd_pipeline.frozen_modules(), self.sd_pipeline.denoiser):
            if module.dtype == inference_dtype:
                module.to(device)
            else:  # frozen weights are only used for inference
                module.to(device, dtype=inference_dtype)
        if hasattr(self.sd_pipeline, "apply_training_config"):
            self.sd_pipeline.apply_training_config(config)
        elif config.use_lora is not None and config.use_lora != self.sd_pipeline.use_lora:
            raise ValueError(
                f"`config.use_lora` is {config.use_lora} but the pipeline's `use_lora` is {self.sd_pipeline.use_lora}"
            )
        unet = self.sd_pipeline.get_trainable_layers()
        # the KL's reference policy: the LoRA disabled, or (full-UNet training) a frozen copy of the base UNet
        self._reference_unet = None
        if config.kl_coef > 0 and not self.sd_pipeline.use_lora:
            self._reference_unet = copy.deepcopy(unet).requires_grad_(False).eval()
        if config.allow_tf32 and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True
        self.optimizer = self._setup_optimizer([p for p in unet.parameters() if p.requires_grad])
        self.learning_rate = EpochLearningRate(
            self.optimizer, config.train_lr_scheduler, config.num_epochs, config.train_lr_warmup_epochs
        )

        with torch.no_grad():  # the negative prompt's conditioning (batch 1), for classifier-free guidance
            self.negative_conditioning = self.sd_pipeline.encode_negative_prompt(config.negative_prompts, device)
        self.stat_trackers = []  # one per task
        if config.per_prompt_stat_tracking:
            self.stat_trackers = [
                PerPromptStatTracker(
                    config.per_prompt_stat_tracking_buffer_size, config.per_prompt_stat_tracking_min_count
                )
                for _ in self.tasks
            ]
            self.stat_tracker = self.stat_trackers[0]
        self.autocast = self.sd_pipeline.autocast or self.accelerator.autocast
        if config.async_reward_computation:
            self.executor = futures.ThreadPoolExecutor(max_workers=config.max_workers)

        self.critic = None
        if config.use_critic:
            # one critic told the task: one value output per task (rewards are normalized per task, so the outputs
            # share a scale); one encoder, one optimizer and one neuron-reset schedule for all tasks
            # the paper's critic reads the reward's own encoder: a reward holding `critic_encoder` lends it (no copy)
            shared = None
            if critic is None and config.critic_encoder != "latents":
                shared = shared_image_features([task.reward_function for task in self.tasks], config.critic_encoder)
            self.critic = (
                critic
                if critic is not None
                else TimestepCritic.from_config(
                    config, self.sd_pipeline.latent_shape(), num_outputs=len(self.tasks), encoder=shared
                )
            )
            if self.critic.head.num_outputs != len(self.tasks):
                raise ValueError(
                    f"the critic head has {self.critic.head.num_outputs} value outputs for {len(self.tasks)} tasks; "
                    "give it one output per task (`num_outputs`)"
                )
            if shared is not None:  # left in the reward's dtype: a cast here would be undone by every reward call
                logger.info(f"the critic shares the reward's image encoder {config.critic_encoder!r}")
                self.critic.encoder.to(device)
            else:
                self.critic.encoder.to(device, dtype=inference_dtype)
            # what decodes x_t for an image-reading critic: the VAE, or a cheap AutoencoderTiny (TAESD)
            self.critic_decoder = self.sd_pipeline.vae
            if config.critic_decoder and self.critic.needs_pixels:
                from diffusers import AutoencoderTiny

                decoder = load_pretrained(AutoencoderTiny.from_pretrained, config.critic_decoder, "critic_decoder")
                self.critic_decoder = decoder.requires_grad_(False).eval().to(device, dtype=inference_dtype)
            self.critic.head.to(device, dtype=torch.float32)
            critic_optimizer = torch.optim.AdamW(
                self.critic.head.parameters(),
                lr=config.critic_learning_rate,
                betas=(config.critic_adam_beta1, config.critic_adam_beta2),
                weight_decay=config.critic_adam_weight_decay,
                eps=config.critic_adam_epsilon,
            )
            self.unet, self.optimizer, self.critic_head, self.critic_optimizer = self.accelerator.prepare(
                unet, self.optimizer, self.critic.head, critic_optimizer
            )
        else:
            self.unet, self.optimizer = self.accelerator.prepare(unet, self.optimizer)
        self.trainable_layers = [p for p in self.unet.parameters() if p.requires_grad]
        self._optimizer_groups = [
            OptimizerGroup("policy", self.optimizer, self.trainable_layers, config.train_max_grad_norm)
        ]
        if self.critic is not None:
            self._optimizer_groups.append(
                OptimizerGroup(
                    "critic", self.critic_optimizer, list(self.critic_head.parameters()), config.critic_max_grad_norm
                )
            )

        self.accelerator.register_save_state_pre_hook(self._save_model_hook)
        self.accelerator.register_load_state_pre_hook(self._load_model_hook)
        self.accelerator.register_for_checkpointing(self.progress)
        for tracker in self.stat_trackers:
            self.accelerator.register_for_checkpointing(StatTrackerState(tracker))
        for source in self._prompt_sources:  # a resumed run draws the prompts an uninterrupted one would
            if has_state(source):
                self.accelerator.register_for_checkpointing(source)
        for callback in self.callbacks:
            self._checkpoint_callback_state(callback)
        self.pretraining = None  # image-caption batches of the pretraining loss; their position is checkpointed
        if config.pretrain_loss_coef > 0:
            dataset = load_pretraining_dataset(config.pretrain_dataset, config.pretrain_dataset_split)
            sd = self.sd_pipeline.sd_pipeline
            self.pretraining = PretrainingData(
                dataset,
                config.pretrain_batch_size,
                resolution=self.sd_pipeline.latent_shape()[-1] * sd.vae_scale_factor,
                seed=config.seed,
                image_column=config.pretrain_image_column,
                caption_column=config.pretrain_caption_column,
            )
            self.accelerator.register_for_checkpointing(self.pretraining)
        if self._resume_checkpoint:
            self._resume(self._resume_checkpoint)
        self.first_epoch = self.progress.epoch

    # ------------------------------------------------------------------ setup helpers

    def add_callback(self, callback: TDPOCallback):
        """Add a callback (an instance or a `TDPOCallback` subclass) after construction."""
        (callback,) = check_callbacks([callback])
        self._checkpoint_callback_state(callback)
        self.callbacks.append(callback)

    def _prompt_repeats(self, task: Task) -> int:
        """`config.prompt_repeats`, or the reward's `default_prompt_repeats` (distribution-level rewards), else 1."""
        config = self.config
        repeats = config.prompt_repeats or getattr(task.reward_function, "default_prompt_repeats", 1)
        check_prompt_repeats(repeats, config.sample_batch_size * config.sample_num_batches_per_epoch)
        return repeats

    def _checkpoint_callback_state(self, callback: TDPOCallback):
        """Callback state (e.g. reset counts, RNG) travels with checkpoints."""
        if hasattr(callback, "state_dict") and hasattr(callback, "load_state_dict"):
            self.accelerator.register_for_checkpointing(callback)

    def _project_configuration(self) -> ProjectConfiguration:
        """Checkpoints go to `<project_dir>/checkpoints/checkpoint_<i>`, `project_dir` defaulting to
        `<logdir>/<run_name>`; the newest `total_limit` (default `num_checkpoint_limit`) are kept.

        Without a `run_name` the run folder gets a timestamp, so that a second run never collides with the first; a
        resumed run continues in its own folder. Writing into a folder that holds another run's checkpoints is refused.
        """
        config = self.config
        kwargs = dict(config.project_kwargs)
        # verified before anything else happens; `_resume` loads it once the models exist
        self._resume_checkpoint = resolve_checkpoint(config.resume_from) if config.resume_from else None
        resumed_run = run_folder_of(self._resume_checkpoint) if self._resume_checkpoint else None
        if "project_dir" not in kwargs:
            if resumed_run and not config.run_name:
                kwargs["project_dir"] = resumed_run
            else:
                run_name = config.run_name or f"{config.exp_name}_{time.strftime('%Y-%m-%d_%H-%M-%S')}"
                kwargs["project_dir"] = os.path.join(config.logdir, run_name)
        continues_run = resumed_run is not None and _same_folder(kwargs["project_dir"], resumed_run)
        if resumed_run and not continues_run and not config.resume_as_new_run:
            raise ValueError(
                f"`resume_from` {config.resume_from!r} continues the run in {resumed_run!r}, but this run would write "
                f"to {kwargs['project_dir']!r}; drop `run_name` (and `project_kwargs['project_dir']`) to continue the "
                "run in its own folder, or set `resume_as_new_run=True` to start a new run there from that checkpoint"
            )
        self.checkpoint_limit = kwargs.pop("total_limit", config.num_checkpoint_limit)
        kwargs["automatic_checkpoint_naming"] = False  # checkpoints are named and rotated by `save_checkpoint`
        self.checkpoint_dir = os.path.join(kwargs["project_dir"], "checkpoints")
        existing = list_checkpoints(self.checkpoint_dir)
        if existing and not continues_run:
            what = " of another run; " if config.resume_from else "; set `resume_from` to continue that run, or "
            raise ValueError(
                f"{self.checkpoint_dir!r} already holds checkpoints ({os.path.basename(existing[-1])} is the latest)"
                f"{what}choose another `run_name` or `logdir`"
            )
        return ProjectConfiguration(**kwargs)

    def _resume(self, path: str):
        """Load weights, optimizers, RNG states, progress, reward statistics and callback state of a (verified)
        checkpoint, after checking that it was written by a model of the same shape."""
        check_structure(path, self.model_structure())
        logger.info(f"Resuming from {path}")
        self.accelerator.load_state(path)

    def model_structure(self) -> dict:
        """What a checkpoint's tensors must fit: LoRA shape and critic shape, by `TDPOConfig` field name."""
        structure = {"use_lora": bool(self.sd_pipeline.use_lora), "use_critic": self.critic is not None}
        unet = self.accelerator.unwrap_model(self.unet)
        lora = unet.peft_config.get("default") if getattr(unet, "peft_config", None) else None
        if lora is not None:
            structure["lora_rank"] = int(lora.r)
            structure["lora_alpha"] = float(lora.lora_alpha)
            structure["lora_target_modules"] = sorted(lora.target_modules)
        if self.critic is not None:
            head = self.accelerator.unwrap_model(self.critic_head)
            structure["critic_encoder"] = self.config.critic_encoder
            structure["critic_input_dim"] = int(head.input_dim)
            structure["critic_hidden_sizes"] = [int(size) for size in head.hidden_sizes]
            structure["critic_activation"] = head.activation
        return structure

    def trained_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        """`(name, parameter)` of every trained weight: the LoRA (or UNet) and the critic head."""
        named = [(f"unet.{n}", p) for n, p in self.accelerator.unwrap_model(self.unet).named_parameters()]
        named = [(n, p) for n, p in named if p.requires_grad]
        if self.critic is not None:
            head = self.accelerator.unwrap_model(self.critic_head)
            named += [(f"critic_head.{n}", p) for n, p in head.named_parameters()]
        return named

    def _named_weights(self) -> list[tuple[str, torch.Tensor]]:
        """The trained tensors (weights and optimizer moments) that checkpoints and saves hold."""
        named = list(self.trained_parameters())
        for group in self._optimizer_groups:
            for i, state in enumerate(group.optimizer.state.values()):
                named += [(f"{group.name}_optimizer.state.{i}.{k}", v) for k, v in state.items() if torch.is_tensor(v)]
        return named

    def _save_model_hook(self, models, weights, output_dir):
        # The UNet is saved by the pipeline (LoRA in diffusers format); accelerate saves the critic head.
        index = self._unet_index(models)
        self.sd_pipeline.save_checkpoint([self.accelerator.unwrap_model(models[index])], None, output_dir)
        weights.pop(index)

    def _load_model_hook(self, models, input_dir):
        index = self._unet_index(models)
        self.sd_pipeline.load_checkpoint([self.accelerator.unwrap_model(models[index])], input_dir)
        models.pop(index)

    def _unet_index(self, models) -> int:
        unet = self.accelerator.unwrap_model(self.unet)
        return next(i for i, m in enumerate(models) if self.accelerator.unwrap_model(m) is unet)

    # ------------------------------------------------------------------ sampling

    def _generate_samples(self, iterations, batch_size):
        """DDPO sampling (as TRL's, through the pipeline wrapper's `encode_prompts` and `sample_with_log_probs`, so
        that any model family samples the same way), plus the critic's features and values V(x_t) at every step."""
        samples, prompt_image_pairs = [], []
        pipeline, device = self.sd_pipeline, self.accelerator.device
        pipeline.denoiser.eval()
        negative = {  # (batch_size, ...) each
            f"negative_{k}": v.repeat(batch_size, *[1] * (v.ndim - 1)) for k, v in self.negative_conditioning.items()
        }
        for _ in range(iterations):
            prompts, prompt_metadata = zip(*[self.prompt_fn() for _ in range(batch_size)])
            with torch.no_grad():
                prompt_ids, conditioning = pipeline.encode_prompts(list(prompts), device)
            with self.autocast():
                output = pipeline.sample_with_log_probs(
                    conditioning,
                    {k[len("negative_") :]: v for k, v in negative.items()},
                    num_inference_steps=self.config.sample_num_steps,
                    guidance_scale=self.config.sample_guidance_scale,
                    eta=self.config.sample_eta,
                )
            samples.append(
                {
                    "prompt_ids": prompt_ids,
                    **conditioning,
                    "timesteps": output.timesteps,
                    "latents": output.latents[:, :-1],  # each entry is the latent before timestep t
                    "next_latents": output.latents[:, 1:],  # each entry is the latent after timestep t
                    "log_probs": output.log_probs,
                    **negative,
                }
            )
            prompt_image_pairs.append([output.images, prompts, prompt_metadata])
        if self.critic is None:
            return samples, prompt_image_pairs
        head = self.accelerator.unwrap_model(self.critic_head)
        head.eval()
        for sample in samples:
            latents = sample["latents"]  # (B, T, C, h, w): x_t before each denoising step
            if self._encode_trained_steps_only:
                # draw now which steps will be trained (as `_shuffle_and_batch` would) and embed only those
                batch, steps = latents.shape[:2]
                step_perms = _step_permutations(batch, steps, latents.device, self.num_trainable_steps)  # (B, T)
                sample["trained_steps"] = step_perms[:, : self.num_train_timesteps]  # (B, k)
                latents = latents[torch.arange(batch, device=latents.device)[:, None], sample["trained_steps"]]
            batch, steps = latents.shape[:2]  # steps: T, or k trained steps
            features = self.critic.encode(
                latents.flatten(0, 1), self.critic_decoder, batch_size=self.config.critic_encode_batch_size
            )  # (B*steps, D)
            sample["critic_features"] = features.view(batch, steps, -1)
            task_index = torch.full((batch, steps), self._task_index, device=features.device)
            with torch.no_grad():
                sample["values"] = head(sample["critic_features"], task_index).float()  # (B, T)
        return samples, prompt_image_pairs

    def compute_rewards(self, prompt_image_pairs, is_async=False):
        """Score each sampled batch with the reward function (in the thread pool if `is_async`), checking what it
        returns. Returns `(rewards, metadata)`: per batch a `(B,)` float32 tensor and the function's metadata.

        A distribution-level reward instead scores the epoch's batch of every process at once
        (`_distribution_rewards`).
        """
        if is_distribution_reward(self.reward_fn):
            return self._distribution_rewards(self.reward_fn, list(prompt_image_pairs))

        def score(pair):
            images, prompts, prompt_metadata = pair[:3]
            return call_reward_function(self.reward_fn, images, prompts, prompt_metadata)

        pairs = list(prompt_image_pairs)
        results = list(self.executor.map(score, pairs)) if is_async else [score(pair) for pair in pairs]
        rewards, metadata = zip(*results)
        return [r.to(self.accelerator.device) for r in rewards], list(metadata)

    def _distribution_rewards(self, function: DistributionReward, prompt_image_pairs: list):
        """Per-sample features on each process, gathered; rewards from the whole batch (every process computes the
        same ones); this process's rows, split back into its sampled batches. So the batch a distribution is measured
        on is the epoch's samples of all processes, and 1 or 2 processes give the same rewards for the same samples.
        """
        name = f"distribution reward {reward_name(function)!r}"
        features, prompts = [], []
        for images, batch_prompts, metadata, *_ in prompt_image_pairs:
            batch_features = torch.as_tensor(function.features(images, batch_prompts, metadata))
            if batch_features.dim() != 2 or len(batch_features) != len(images):
                raise ValueError(
                    f"{name}: `features` returned shape {tuple(batch_features.shape)} for {len(images)} images; "
                    "expected (batch, feature_dim)"
                )
            features.append(batch_features.float().to(self.accelerator.device))
            prompts.extend(batch_prompts)
        gathered = self.accelerator.gather(torch.cat(features))  # (N_all, D), process-major as `_local_rows` reads
        all_prompts = gather_object(prompts)  # as is on one process
        rewards, info = check_reward_output(function.rewards_from_features(gathered, all_prompts), len(gathered), name)
        local = self._local_rows(rewards.to(self.accelerator.device))  # (n_local,)
        sizes = [len(pair[0]) for pair in prompt_image_pairs]
        if not (isinstance(info, dict) and "components" in info):
            return list(local.split(sizes)), [info] * len(sizes)
        # per-sample component scores (a `WeightedSum`'s) of the whole batch -> this process's rows, per sampled batch
        parts = {
            name: self._local_rows(v.to(self.accelerator.device)).split(sizes)
            for name, v in info["components"].items()
        }
        infos = [{**info, "components": {name: split[b] for name, split in parts.items()}} for b in range(len(sizes))]
        return list(local.split(sizes)), infos

    # ------------------------------------------------------------------ advantages

    def _normalized_rewards(
        self, rewards: np.ndarray, prompt_ids: Optional[torch.Tensor], epoch: Optional[int] = None
    ) -> np.ndarray:
        """Per-prompt (as DDPO's tracker, one per task) or batch-wise normalization of the rewards `(N_all,)`
        gathered over all processes (`reward_normalization`): every process computes the same numbers.

        Either way a NaN or infinite reward is left out of the statistics and its sample gets advantage 0.
        """
        finite = np.isfinite(rewards)
        if not finite.any():
            raise ValueError(
                f"every reward of epoch {epoch if epoch is not None else '?'} is NaN or infinite ({len(rewards)} "
                f"samples, first values "
                f"{rewards[:4].tolist()}); check the reward function {reward_name(self.reward_fn)!r}"
            )
        normalized = np.zeros_like(rewards)  # a sample whose reward failed contributes nothing
        if self.config.per_prompt_stat_tracking:
            prompt_ids = self.accelerator.gather(prompt_ids).cpu().numpy()
            prompts = np.asarray(self.sd_pipeline.tokenizer.batch_decode(prompt_ids, skip_special_tokens=True))
            tracker = self.stat_trackers[self._task_index]
            normalized[finite] = tracker.update(prompts[finite], rewards[finite])
        else:
            normalized[finite] = batch_normalize(rewards[finite])
        return normalized

    def _compute_advantages(self, samples: dict, normalized_rewards: np.ndarray) -> dict[str, float]:
        """Sets `samples["advantages"]` (and `samples["returns"]` in TDPO mode), each `(n_local, T)`."""
        device = self.accelerator.device
        rewards = torch.as_tensor(normalized_rewards, dtype=torch.float32, device=device)  # (N_all,)
        num_steps = samples["timesteps"].shape[1]
        stats, step_rewards = {}, None
        if "kl_ref" in samples:  # kl_penalty="reward": every step pays kl_coef * KL_t
            kl = self.accelerator.gather(samples.pop("kl_ref"))  # (N_all, T)
            step_rewards = -self.config.kl_coef * kl
            stats["policy/kl_ref"] = kl.mean().item()
        returns = discounted_returns(rewards, num_steps, self.config.gamma, step_rewards)  # (N_all, T)
        if self.critic is None:
            # DDPO: one advantage for every step, or the penalized return of each step
            advantages = rewards[:, None].expand(-1, num_steps) if step_rewards is None else returns
        else:
            values = self.accelerator.gather(samples["values"])  # (N_all, T) or (N_all, k), from sampling time
            if "trained_steps" in samples:  # only the k steps to be trained were embedded: keep just those steps
                returns = returns.gather(1, self.accelerator.gather(samples["trained_steps"]))  # (N_all, k)
                self._keep_trained_steps(samples)
            advantages = temporal_advantages(returns, values, normalized=self.config.normalize_temporal_advantages)
            samples["returns"] = self._local_rows(returns)
            stats["critic/value_mean"] = values.mean().item()
            stats["critic/value_std"] = values.std(unbiased=False).item()
            stats["critic/explained_variance"] = explained_variance(values, returns)
        clip = self.config.train_adv_clip_max
        if math.isfinite(clip):
            advantages = advantages.clamp(-clip, clip)
        samples["advantages"] = self._local_rows(advantages)
        stats["advantage/mean"] = advantages.mean().item()
        stats["advantage/std"] = advantages.std(unbiased=False).item()
        return stats

    @property
    def _encode_trained_steps_only(self) -> bool:
        """With fewer steps trained than sampled (`train_timestep_fraction < 1` or the final step untrained) and one
        inner epoch, the critic embeds only the x_t that will be trained (the paper's 5 of 50 steps: a tenth of the
        encoder passes); more inner epochs train other steps."""
        return self.num_train_timesteps < self.config.sample_num_steps and self.config.train_num_inner_epochs == 1

    @staticmethod
    def _keep_trained_steps(samples: dict):
        """Reduce the per-step entries `(n, T, ...)` to the steps chosen at sampling time, `(n, k, ...)`, in the
        order drawn there (`_shuffle_and_batch` trains the first k positions of its own permutation: all of them)."""
        trained_steps = samples.pop("trained_steps")  # (n, k)
        rows = torch.arange(len(trained_steps), device=trained_steps.device)[:, None]
        for key in ("timesteps", "latents", "next_latents", "log_probs"):
            samples[key] = samples[key][rows, trained_steps]

    def _reward_component_stats(self, rewards_metadata: list) -> dict[str, float]:
        """`reward/<name>/mean|std` for rewards that report components (e.g. `tdpo_trl.rewards.WeightedSum`)."""
        components = defaultdict(list)
        for metadata in rewards_metadata:
            for name, values in (metadata.get("components", {}) if isinstance(metadata, dict) else {}).items():
                components[name].append(torch.as_tensor(values, dtype=torch.float32, device=self.accelerator.device))
        return self._gathered_mean_std("reward", components)

    def _eval_reward_stats(self, prompt_image_data: list) -> dict[str, float]:
        """`eval/<name>/mean|std`: the out-of-domain rewards of this epoch's training samples, over all processes."""
        scores = defaultdict(list)
        for images, prompts, prompt_metadata, *_ in prompt_image_data:
            for name, values in score_images(self.eval_reward_functions, images, prompts, prompt_metadata).items():
                scores[name].append(values.to(self.accelerator.device))
        return self._gathered_mean_std("eval", scores)

    def _gathered_mean_std(self, prefix: str, values: dict[str, list[torch.Tensor]]) -> dict[str, float]:
        """`<prefix>/<name>/mean|std` of each name's per-batch tensors, gathered over processes."""
        return mean_std(
            {name: self.accelerator.gather(torch.cat(batches)) for name, batches in values.items()}, prefix
        )

    def evaluate_heldout(self, epoch: Optional[int] = None) -> dict[str, float]:
        """Sample the fixed, seeded held-out prompts and score them with the target and the eval rewards.

        Returns `heldout/<name>/mean|std` (`target` for the training reward; with several tasks
        `task/<task>/heldout/...`, each task on its own held-out prompts with its own reward). Seeded on its own: the
        training RNG is untouched. Every process computes the same numbers; the main one saves an image grid to
        `<project_dir>/heldout/epoch_<epoch>.png` (`<task>_epoch_<epoch>.png`).
        """
        config, stats = self.config, {}
        for index, task in enumerate(self.tasks):
            prompts = self._task_heldout_prompts(index)
            with self.autocast():
                images = sample_images(
                    self.sd_pipeline.sd_pipeline,
                    prompts,
                    seed=config.eval_seed,
                    num_inference_steps=config.sample_num_steps,
                    guidance_scale=config.sample_guidance_scale,
                    eta=config.sample_eta,
                    batch_size=config.sample_batch_size,
                )
            rewards = {"target": task.reward_function, **self.eval_reward_functions}
            scores = score_images(rewards, images.to(self.accelerator.device), prompts)
            if self.accelerator.is_main_process and epoch is not None:
                name = f"{task.name}_epoch_{epoch}.png" if self.multi_task else f"epoch_{epoch}.png"
                save_image_grid(images, os.path.join(self.accelerator.project_dir, "heldout", name))
            stats.update({self._task_key(index, k): v for k, v in mean_std(scores, "heldout").items()})
        return stats

    def _task_heldout_prompts(self, index: int) -> list[str]:
        """Task `index`'s held-out prompts: its `eval_prompts` (a list, or a spec drawn `eval_num_prompts` times
        with `eval_seed`), else the config's `eval_prompts`. Repeated as the task's training prompts are."""
        if index not in self._heldout_prompts:
            config, task = self.config, self.tasks[index]
            spec = task.eval_prompts if task.eval_prompts is not None else config.eval_prompts
            if isinstance(spec, (list, tuple)):
                prompts = list(spec)
            else:
                repeats = self.prompt_repeats[index]
                source = RepeatedPrompts(get_prompt_function(spec, seed=config.eval_seed), repeats)
                prompts = [source()[0] for _ in range(max(config.eval_num_prompts, repeats))]
            self._heldout_prompts[index] = prompts
        return self._heldout_prompts[index]

    def _local_rows(self, gathered: torch.Tensor) -> torch.Tensor:
        """This process's rows of a tensor gathered over processes: (N_all, ...) -> (N_all / P, ...)."""
        rows = gathered.reshape(self.accelerator.num_processes, -1, *gathered.shape[1:])
        return rows[self.accelerator.process_index].contiguous()

    # ------------------------------------------------------------------ training

    def step(self, epoch: int, global_step: int) -> int:
        """Sample, score, and train on one epoch of trajectories (of every task). Returns the updated global step."""
        config = self.config
        call_event(self.callbacks, "on_epoch_begin", self, epoch=epoch, global_step=global_step)
        start = time.perf_counter()
        stats = {"epoch": epoch, "policy/learning_rate": self.learning_rate.set_epoch(epoch)}
        task_samples, times, train_info = [], defaultdict(float), defaultdict(list)
        # sequential (the paper's order): sample task 1, update on it, sample task 2 with the updated model, ...: each
        # task's update is on-policy. weighted (and a single task): sample every task, then one update over all.
        sequential = self.multi_task and config.multi_task_update == "sequential"
        for index in range(len(self.tasks)):
            samples, task_stats = self._collect(index, epoch, global_step, times)
            task_samples.append(samples)
            stats.update({self._task_key(index, k): v for k, v in task_stats.items()})
            if sequential:
                global_step = self._update(samples, epoch, global_step, train_info, self.tasks[index].name, times)

        # every task's samples, as the callbacks see them (e.g. the critic features neuron reset scores)
        if len(task_samples) == 1:
            all_samples = task_samples[0]
        else:
            all_samples = {k: torch.cat([s[k] for s in task_samples]) for k in task_samples[0]}
        if not sequential:  # the task being trained, for callbacks: None when minibatches mix tasks
            task_name = None if self.multi_task else self.tasks[0].name
            global_step = self._update(all_samples, epoch, global_step, train_info, task_name, times)
        trained = time.perf_counter()

        stats.update(self._skipped_step_stats(train_info, epoch))  # takes the grad norms out of `train_info`
        stats.update(self._reduce_info(train_info))
        if config.eval_freq and (epoch + 1) % config.eval_freq == 0:  # the model as this epoch leaves it
            stats.update(self.evaluate_heldout(epoch))
        evaluated = time.perf_counter()
        call_event(
            self.callbacks,
            "on_epoch_end",
            self,
            epoch=epoch,
            global_step=global_step,
            samples=all_samples,
            metrics=stats,
        )
        finished = time.perf_counter()
        stats.update(
            {
                "time/sampling_s": times["sampling"],
                "time/reward_s": times["reward"],
                "time/advantages_s": trained - start - times["sampling"] - times["reward"] - times["training"],
                "time/training_s": times["training"],
                "time/heldout_s": evaluated - trained,
                "time/callbacks_s": finished - evaluated,
                "time/epoch_s": finished - start,
            }
        )
        self.progress.epoch, self.progress.global_step = epoch + 1, global_step
        self.log(stats, step=global_step)

        if (epoch + 1) % config.save_freq == 0:
            output_dir = self.save_checkpoint()
            call_event(self.callbacks, "on_save", self, output_dir=output_dir, epoch=epoch, global_step=global_step)
        return global_step

    def _update(self, samples: dict, epoch: int, global_step: int, train_info, task_name, times: dict) -> int:
        """`train_num_inner_epochs` passes of minibatch updates over `samples`. Returns the updated global step."""
        start = time.perf_counter()
        self.training_task = task_name
        for inner_epoch in range(self.config.train_num_inner_epochs):
            batched = self._shuffle_and_batch(samples)
            global_step = self._train_batched_samples(inner_epoch, epoch, global_step, batched, train_info)
            if not self.accelerator.sync_gradients:
                raise RuntimeError(
                    "an inner epoch ended between optimizer steps; check gradient accumulation settings"
                )
        self.training_task = None
        times["training"] += time.perf_counter() - start
        return global_step

    def _task_key(self, index: int, key: str) -> str:
        """A task's metric name: `task/<name>/<key>` with several tasks, `<key>` with one."""
        return f"task/{self.tasks[index].name}/{key}" if self.multi_task else key

    def _use_task(self, index: int):
        """Point `prompt_fn` / `reward_fn` (which TRL's `_generate_samples` and `compute_rewards` call) at a task."""
        self._task_index = index
        self.prompt_fn, self.reward_fn = self._prompt_fns[index], self.tasks[index].reward_function

    def _collect(self, index: int, epoch: int, global_step: int, times: dict) -> tuple[dict, dict]:
        """Sample task `index`, score it with its reward, normalize its rewards and compute its advantages.

        Returns the collated samples (each entry `(n_local, ...)`, with `advantages` scaled by the task's weight in
        multi-task runs and `task_index`) and the task's metrics.
        """
        config, task = self.config, self.tasks[index]
        self._use_task(index)
        start = time.perf_counter()
        samples, prompt_image_data = self._generate_samples(
            config.sample_num_batches_per_epoch, config.sample_batch_size
        )
        # collate: each entry becomes (num_batches_per_epoch * sample_batch_size, ...)
        samples = {k: torch.cat([s[k] for s in samples]) for k in samples[0]}
        sampled = time.perf_counter()

        rewards, rewards_metadata = self.compute_rewards(prompt_image_data, is_async=config.async_reward_computation)
        for i, image_data in enumerate(prompt_image_data):
            image_data.extend([rewards[i], rewards_metadata[i]])
        if self.image_samples_callback is not None:
            tracker = self.accelerator.trackers[0] if self.accelerator.trackers else None
            self.image_samples_callback(prompt_image_data, global_step, tracker)
        rewards = self.accelerator.gather(torch.cat(rewards).float()).cpu().numpy()  # (N_all,)
        scored = time.perf_counter()
        times["sampling"] += sampled - start
        times["reward"] += scored - sampled

        if config.kl_coef > 0 and config.kl_penalty == "reward":
            samples["kl_ref"] = self._sampled_kl(samples)  # (n, T)
        normalized = self._normalized_rewards(rewards, samples.pop("prompt_ids"), epoch)
        finite = rewards[np.isfinite(rewards)]
        stats = {"reward/mean": float(finite.mean()), "reward/std": float(finite.std())}
        stats["reward/invalid_count"] = int(len(rewards) - len(finite))
        if stats["reward/invalid_count"]:
            logger.warning(
                f"epoch {epoch}{f' task {task.name!r}' if self.multi_task else ''}: {stats['reward/invalid_count']} "
                f"of {len(rewards)} rewards were NaN or infinite; they are left out of the reward statistics and "
                "their samples get advantage 0"
            )
        if isinstance(rewards_metadata[0], dict) and "group_score" in rewards_metadata[0]:  # distribution-level
            stats["reward/group_score"] = float(rewards_metadata[0]["group_score"])
        stats.update(self._reward_component_stats(rewards_metadata))
        stats.update(self._eval_reward_stats(prompt_image_data))
        stats.update(self._compute_advantages(samples, normalized))
        if self.multi_task:
            samples["advantages"] = samples["advantages"] * task.weight  # scales this task's policy loss
        samples["task_index"] = torch.full((len(samples["timesteps"]),), index, device=self.accelerator.device)
        return samples, stats

    def save_checkpoint(self) -> str:
        """Write the next `checkpoint_<i>` (every process must call this) and rotate old ones. Returns its path."""
        index = self.progress.next_checkpoint
        destination = os.path.join(self.checkpoint_dir, f"checkpoint_{index}")
        check_finite_weights(self._named_weights(), "a checkpoint", destination)  # before anything is written
        self.progress.next_checkpoint = index + 1  # saved inside the checkpoint: a resumed run continues the count
        return save_checkpoint(
            self.accelerator, self.checkpoint_dir, index, self.checkpoint_limit, structure=self.model_structure()
        )

    def _reduce_info(self, info: dict[str, list[torch.Tensor]]) -> dict[str, float]:
        means = {k: torch.stack(v).mean() for k, v in info.items()}
        return {k: v.item() for k, v in self.accelerator.reduce(means, reduction="mean").items()}

    def _skipped_step_stats(self, info: dict[str, list], epoch: int) -> dict[str, float]:
        """`<model>/grad_norm` (mean of the finite norms) and `<model>/skipped_steps` (steps whose gradient was NaN
        or infinite). Gradients are all-reduced before their norm is taken, so every process counts the same."""
        stats = {}
        for name in ("policy", "critic"):
            norms = info.pop(f"{name}/_grad_norms", None)  # floats, one per optimizer step
            if not norms:
                continue
            finite = [n for n in norms if math.isfinite(n)]
            stats[f"{name}/grad_norm"] = float(np.mean(finite)) if finite else float("nan")
            stats[f"{name}/skipped_steps"] = len(norms) - len(finite)
            if len(finite) < len(norms):
                logger.warning(
                    f"epoch {epoch}: skipped {len(norms) - len(finite)} of {len(norms)} {name} optimizer steps whose "
                    "loss or gradient was NaN or infinite (under fp16 loss scaling a few skips are expected while "
                    "the scale settles)"
                )
        return stats

    def _shuffle_and_batch(self, samples: dict) -> list[dict]:
        """Shuffle samples, permute steps independently per sample, and split into minibatches of train_batch_size."""
        device = self.accelerator.device
        num_samples, num_steps = samples["timesteps"].shape
        perm = torch.randperm(num_samples, device=device)
        samples = {k: v[perm] for k, v in samples.items()}
        # (entries already reduced to the trained steps by `_keep_trained_steps` are all trainable)
        num_trainable = min(num_steps, self.num_trainable_steps)
        step_perms = _step_permutations(num_samples, num_steps, device, num_trainable)  # (N, T)
        rows = torch.arange(num_samples, device=device)[:, None]
        for key in _PER_STEP_KEYS:
            if key in samples:
                samples[key] = samples[key][rows, step_perms]
        size = self.config.train_batch_size
        return [{k: v[i : i + size] for k, v in samples.items()} for i in range(0, num_samples, size)]

    def _update_order(self, num_minibatches: int) -> list[tuple[int, int]]:
        """(timestep position, minibatch) pairs: timestep-major for TDPO, sample-major for DDPO (as TRL)."""
        positions, batches = range(self.num_train_timesteps), range(num_minibatches)
        if self.critic is not None:
            return [(j, i) for j in positions for i in batches]
        return [(j, i) for i in batches for j in positions]

    def _train_batched_samples(self, inner_epoch, epoch, global_step, batched_samples, info=None):
        """One pass over the minibatches; an optimizer step every time accelerate's accumulation syncs."""
        info = info if info is not None else defaultdict(list)
        models = (self.unet, self.critic_head) if self.critic is not None else (self.unet,)
        for model in models:
            model.train()
        for j, i in self._update_order(len(batched_samples)):
            sample = batched_samples[i]
            conditioning = self._conditioning(sample)
            with self.accelerator.accumulate(*models):
                pretrain, pretrain_weight = None, self._pretrain_weight(sample["task_index"])
                # a task with weight 0 skips the pretraining batch; minibatches that mix tasks (training_task None)
                # always take one, so every process logs the same metrics
                if self.pretraining is not None and (pretrain_weight > 0 or self.training_task is None):
                    images, captions = self.pretraining.next_batch()
                    pretrain = pretraining_inputs(
                        self.sd_pipeline, images, captions, self.pretraining.generator, self.accelerator.device
                    )
                loss, approx_kl, clipfrac, terms = self.calculate_loss(
                    sample["latents"][:, j],
                    sample["timesteps"][:, j],
                    sample["next_latents"][:, j],
                    sample["log_probs"][:, j],
                    sample["advantages"][:, j],
                    conditioning,
                    pretrain_inputs=pretrain,
                    pretrain_weight=pretrain_weight,
                )
                info["policy/loss"].append(loss.detach())
                info["policy/approx_kl"].append(approx_kl.detach())
                info["policy/clipfrac"].append(clipfrac.detach())
                for name, value in terms.items():
                    info[name].append(value.detach())
                if self.critic is not None:
                    critic_loss, value_clipfrac = self.critic_loss(
                        sample["critic_features"][:, j], sample["values"][:, j], sample["returns"][:, j],
                        sample["task_index"],
                    )  # fmt: skip
                    info["critic/loss"].append(critic_loss.detach())
                    info["critic/value_clipfrac"].append(value_clipfrac.detach())
                    loss = loss + self.config.critic_loss_coef * critic_loss
                self.accelerator.backward(loss)
                if self.accelerator.sync_gradients:  # otherwise gradients accumulate
                    for name, (norm, _) in clip_and_step(self.accelerator, self._optimizer_groups).items():
                        info[f"{name}/_grad_norms"].append(norm)
            if self.accelerator.sync_gradients:
                global_step += 1
                call_event(
                    self.callbacks, "on_step_end", self, epoch=epoch, inner_epoch=inner_epoch, global_step=global_step
                )
        return global_step

    def _pretrain_weight(self, task_index: torch.Tensor) -> float:
        """The pretraining loss's weight on a minibatch: the mean `pretrain_loss_weight` of its samples' tasks."""
        weights = [task.pretrain_loss_weight for task in self.tasks]
        if all(w == weights[0] for w in weights):
            return float(weights[0])
        return float(torch.tensor(weights)[task_index.cpu()].mean())

    def calculate_loss(
        self, latents, timesteps, next_latents, log_probs, advantages, conditioning, pretrain_inputs=None,
        pretrain_weight=1.0,
    ):  # fmt: skip
        """PPO-clipped policy loss of one denoising step, plus the regularizers that are on; as
        `DDPOTrainer.calculate_loss` but through the prepared (all-reducing) denoiser and the pipeline wrapper's
        denoiser call and log-prob step. `advantages` is `(B,)`; `conditioning` the minibatch's text conditioning
        (`_conditioning`).

        `pretrain_inputs` = `(denoiser_inputs, target)` of a pretraining batch (`regularizers.pretraining_inputs`),
        denoised in the same call as the policy's minibatch (DDP allows one forward per backward).

        Returns `(loss, approx_kl, clipfrac, terms)`; `loss` includes `pretrain_loss_coef * pretrain_weight *
        terms["pretrain/loss"]` and `kl_coef * terms["policy/kl_ref"]` when those are on.
        """
        config, pipeline = self.config, self.sd_pipeline
        policy_inputs = pipeline.denoiser_inputs(latents, timesteps, conditioning, self.guided_training)
        inputs = policy_inputs
        if pretrain_inputs is not None:  # one batch: the policy's rows, then the pretraining rows
            inputs = {k: torch.cat([v, pretrain_inputs[0][k].to(v.dtype)]) for k, v in policy_inputs.items()}
        num_policy = len(policy_inputs["sample"])
        with self.autocast():
            prediction = pipeline.predict(self.unet, inputs)
            noise_pred = self._guided(prediction[:num_policy])
            # log-prob of next_latents given latents under the current policy
            log_prob = pipeline.step_log_prob(
                noise_pred, timesteps, latents, eta=config.sample_eta, next_latents=next_latents
            )
        log_ratio = log_prob - log_probs
        ratio = torch.exp(log_ratio)
        loss = self.loss(advantages, config.train_clip_range, ratio)
        approx_kl = 0.5 * torch.mean(log_ratio**2)
        clipfrac = torch.mean((torch.abs(ratio - 1.0) > config.train_clip_range).float())
        terms = {}
        if pretrain_inputs is not None:
            terms["pretrain/loss"] = F.mse_loss(prediction[num_policy:].float(), pretrain_inputs[1].float())
            loss = loss + config.pretrain_loss_coef * pretrain_weight * terms["pretrain/loss"]
        if config.kl_coef > 0 and config.kl_penalty == "loss":
            terms["policy/kl_ref"] = self._kl_to_reference(noise_pred, policy_inputs, timesteps, latents).mean()
            loss = loss + config.kl_coef * terms["policy/kl_ref"]
        return loss, approx_kl, clipfrac, terms

    def _conditioning(self, sample: dict) -> dict[str, torch.Tensor]:
        """A minibatch's text conditioning (prompts' and `negative_` ones), as sampling recorded it."""
        keys = self.negative_conditioning.keys()  # e.g. {"prompt_embeds"}; SDXL adds pooled embeds and time ids
        return {k: v for k, v in sample.items() if k in keys or (k.startswith("negative_") and k[9:] in keys)}

    def _kl_to_reference(self, noise_pred, unet_inputs, timesteps, latents) -> torch.Tensor:
        """Per-sample KL `(B,)` between the transition `noise_pred` gives and the base model's on `unet_inputs`."""
        unet = self.accelerator.unwrap_model(self.unet)
        with torch.no_grad(), reference_policy(unet, self._reference_unet) as reference, self.autocast():
            reference_pred = self._guided(self.sd_pipeline.predict(reference, unet_inputs))
        return transition_kl(self.sd_pipeline, noise_pred, reference_pred, timesteps, latents, self.config.sample_eta)

    @torch.no_grad()
    def _sampled_kl(self, samples: dict) -> torch.Tensor:
        """KL to the base model of every sampled transition, `(n, T)`, for `kl_penalty="reward"`."""
        unet = self.accelerator.unwrap_model(self.unet)
        num_samples, num_steps = samples["timesteps"].shape
        kl = torch.zeros(num_samples, num_steps, device=self.accelerator.device)
        size = self.config.train_batch_size
        for start in range(0, num_samples, size):
            rows = slice(start, start + size)
            conditioning = {k: v[rows] for k, v in self._conditioning(samples).items()}
            for j in range(num_steps):
                latents, timesteps = samples["latents"][rows, j], samples["timesteps"][rows, j]
                inputs = self.sd_pipeline.denoiser_inputs(latents, timesteps, conditioning, self.guided_training)
                with self.autocast():
                    noise_pred = self._guided(self.sd_pipeline.predict(unet, inputs))
                kl[rows, j] = self._kl_to_reference(noise_pred, inputs, timesteps, latents)
        return kl

    @property
    def guided_training(self) -> bool:
        """Whether the update recomputes log-probs with classifier-free guidance: `train_cfg`, and only when sampling
        guided (`sample_guidance_scale > 1`); unguided sampling is recomputed unguided, bit for bit and at half the
        denoiser batch."""
        return self.config.train_cfg and is_guided(self.config.sample_guidance_scale)

    def _guided(self, prediction: torch.Tensor) -> torch.Tensor:
        """Classifier-free guidance of a `(2B, ...)` prediction (unconditional, conditional) -> `(B, ...)`."""
        if not self.guided_training:
            return prediction
        uncond, cond = prediction.chunk(2)
        return uncond + self.config.sample_guidance_scale * (cond - uncond)

    def critic_loss(self, features, old_values, returns, task_index=None):
        """Clipped value loss of one denoising step from cached features `(B, D)` (each row valued for its task,
        `task_index` `(B,)`). Returns `(loss, clipfrac)`."""
        values = self.critic_head(features, task_index)  # (B,)
        return clipped_value_loss(values, old_values, returns, self.config.critic_value_clip_range)

    # ------------------------------------------------------------------ saving and sharing

    def reward_names(self) -> list[str]:
        """The trained rewards, for the model card (with several tasks: `<task>: <reward>`)."""
        names = []
        for task in self.tasks:
            function = task.reward_function
            found = getattr(function, "reward_names", None)  # a combined reward lists its components
            found = list(found) if found else [reward_name(function)]
            names.extend(f"{task.name}: {n}" for n in found) if self.multi_task else names.extend(found)
        return names

    def base_model_id(self) -> Optional[str]:
        """The base model's Hub id, if the pipeline was loaded by id (not from a local folder or built in memory)."""
        name = getattr(self.sd_pipeline, "pretrained_model", None)
        if not isinstance(name, str) or not name or os.path.exists(name):  # a local folder is not a Hub id
            return None
        return name

    def create_model_card(self, base_model: Optional[str] = None, repo_id: Optional[str] = None):
        """A `huggingface_hub.ModelCard` for the trained adapter (see `tdpo_trl.model_card`)."""
        from . import __version__

        unet = self.accelerator.unwrap_model(self.unet)
        lora_config = unet.peft_config.get("default") if getattr(unet, "peft_config", None) else None
        guard = self._guard()
        return create_model_card(
            config=self.config,
            base_model=base_model or self.base_model_id(),
            repo_id=repo_id,
            reward_names=self.reward_names(),
            use_lora=self.sd_pipeline.use_lora,
            lora_config=lora_config,
            start_metrics=self.log_history[0] if self.log_history else None,
            final_metrics=self.log_history[-1] if self.log_history else None,
            note=guard.explanation() if guard else None,
            version=__version__,
            pipeline_class=type(self.sd_pipeline.sd_pipeline).__name__,
            denoiser=(self.sd_pipeline.denoiser_name, type(unet).__name__),
        )

    def save_pretrained(
        self,
        save_directory: str,
        *,
        merged_pipeline: bool = False,
        base_model: Optional[str] = None,
        repo_id: Optional[str] = None,
    ) -> str:
        """Write the trained LoRA (diffusers format; `unet/` for full-UNet training), the critic head, the training
        config and a model card to `save_directory`. Every process may call it; the main process writes.

        Args:
            merged_pipeline: also write a full pipeline with the LoRA fused into the UNet, in `merged_pipeline/`.
            base_model: Hub id of the base model for the card, if the pipeline was not loaded by id.
            repo_id: the Hub repo the card's usage snippet names.
        """
        if os.path.isfile(save_directory):
            raise ValueError(f"`save_directory` {save_directory!r} is a file; give a folder")
        guard = self._guard()
        with guard.kept_weights_applied(self) if guard else contextlib.nullcontext():  # the guard's pick, if any
            check_finite_weights(self.trained_parameters(), "the trained weights", save_directory)
            if self.accelerator.is_main_process:
                os.makedirs(save_directory, exist_ok=True)
                unet = self.accelerator.unwrap_model(self.unet)
                saving.save_policy(self.sd_pipeline, unet, save_directory)
                if self.critic is not None:
                    head = self.accelerator.unwrap_model(self.critic_head)
                    saving.save_critic_head(head, save_directory, encoder=self.config.critic_encoder)
                saving.save_training_config(self.config, save_directory)
                if merged_pipeline:
                    saving.save_merged_pipeline(self.sd_pipeline, unet, save_directory)
                self.create_model_card(base_model=base_model, repo_id=repo_id).save(
                    os.path.join(save_directory, "README.md")
                )
            self.accelerator.wait_for_everyone()
        return save_directory

    def _guard(self) -> Optional[OverOptimizationGuard]:
        return next((c for c in self.callbacks if isinstance(c, OverOptimizationGuard)), None)

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: Optional[bool] = None,
        token: Optional[str] = None,
        commit_message: str = "Upload TDPO-R fine-tune",
        local_dir: Optional[str] = None,
        merged_pipeline: bool = False,
        base_model: Optional[str] = None,
        revision: Optional[str] = None,
    ) -> Optional[str]:
        """Save locally (`local_dir`, default `<project_dir>/hub/<repo name>`), then create the repo and upload.

        Returns the commit URL on the main process (None on the others). If the Hub cannot be reached, a
        `tdpo_trl.hub.HubUploadError` says what failed and where the saved files are; they are kept.
        """
        check_repo_id(repo_id)  # before anything is written
        if local_dir is None:
            local_dir = os.path.join(self.accelerator.project_dir, "hub", repo_id.split("/")[-1])
        local_dir = os.fspath(local_dir)
        self.save_pretrained(local_dir, merged_pipeline=merged_pipeline, base_model=base_model, repo_id=repo_id)
        url = None
        if self.accelerator.is_main_process:
            url = push_folder(
                local_dir, repo_id, private=private, token=token, commit_message=commit_message, revision=revision
            )
            logger.info(f"Pushed {local_dir} to {url}")
        self.accelerator.wait_for_everyone()
        return url

    def log(self, metrics: dict[str, float], step: int):
        """Send metrics to the trackers and keep them in `self.log_history`."""
        record = {**metrics, "step": step}
        self.log_history.append(record)
        self.accelerator.log(metrics, step=step)
        call_event(self.callbacks, "on_log", self, logs=record, step=step)

    def train(self, epochs: Optional[int] = None):
        """Train until epoch `epochs` (default `config.num_epochs`), continuing from a resumed checkpoint."""
        epochs = self.config.num_epochs if epochs is None else epochs
        if epochs > self.config.num_epochs and self.config.train_lr_scheduler != "constant":
            raise ValueError(
                f"train(epochs={epochs}) goes past num_epochs={self.config.num_epochs}, where the "
                f"{self.config.train_lr_scheduler!r} learning-rate schedule ends; set num_epochs to {epochs} instead"
            )
        global_step = self.progress.global_step
        bar = tqdm(
            range(self.progress.epoch, epochs),
            desc="TDPO" if self.critic is not None else "DDPO",
            unit="epoch",
            disable=not self.accelerator.is_local_main_process,
        )
        call_event(self.callbacks, "on_train_begin", self, epoch=self.progress.epoch, global_step=global_step)
        for epoch in bar:
            global_step = self.step(epoch, global_step)
            record = self.log_history[-1]
            keys = [shown_reward_key(record, self._task_key(i, "")) for i in range(len(self.tasks))]
            names = [task.name for task in self.tasks] if self.multi_task else ["reward"]
            bar.set_postfix({name: f"{record[key]:.4f}" for name, key in zip(names, keys)})
            if self.should_stop:
                logger.warning(f"training stopped by a callback after epoch {epoch}")
                break
        call_event(self.callbacks, "on_train_end", self, epoch=self.progress.epoch, global_step=global_step)
        self.accelerator.end_training()
