"""TDPO-R trainer: DDPO with a per-timestep critic and temporal-difference advantages.

Zhang et al., "Confronting Reward Overoptimization for Diffusion Models: A Perspective of Inductive and Primacy
Biases", ICML 2024 (https://arxiv.org/abs/2402.08552). Built on TRL's `DDPOTrainer` (trl < 0.24), whose contract it
keeps (`loss`, `_generate_samples`, `calculate_loss`, `compute_rewards`, `_train_batched_samples`).

One epoch (`step`), for each task: sample (`_generate_samples`) -> score (`compute_rewards`) -> normalize the rewards
and compute advantages (`_compute_advantages`) -> update the policy, the critic and the regularizers
(`_train_batched_samples`) -> held-out evaluation, callbacks, logging and checkpoints. The pieces live in their own
modules: `rollout` (the sampled batch, the trained steps), `scoring`, `advantages`, `regularizers`, `heldout`,
`run_folder` and `checkpointing`, `saving`, `model_card` and `hub`.
"""

import copy
import math
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent import futures
from typing import Any, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from trl import DDPOTrainer
from trl.trainer.utils import PerPromptStatTracker

from . import scoring, sharing
from .advantages import (
    clipped_value_loss,
    discounted_returns,
    explained_variance,
    normalize_rewards,
    temporal_advantages,
)
from .checkpointing import (
    CheckpointedState,
    StatTrackerState,
    TrainingProgress,
    check_structure,
    load_checkpoint,
    model_structure,
    register_denoiser_hooks,
    warn_unsaved_epochs,
    write_checkpoint,
)
from .guard import OverOptimizationGuard
from .heldout import HeldoutEvaluator
from .model_card import hub_base_model, trained_reward_names
from .modeling_critic import TimestepCritic, build_critic
from .neuron_reset import ActiveNeuronResetCallback
from .optimization import EpochLearningRate, OptimizerGroup, clip_and_step, grad_norm_stats
from .pipelines import TDPOPipeline, guide
from .prompts import has_state
from .regularizers import PretrainingData, ReferenceKL, pretraining_inputs
from .rewards import check_available, get_reward_function, reward_name, short_name, warm_up
from .rollout import Rollout, TrainedSteps, sample_rollout
from .run_folder import resolve_run_folder
from .run_summary import write_run_summary
from .tasks import Task, TaskPrompts, check_tasks, pretrain_weight_of
from .tdpo_config import TDPOConfig
from .trainer_callback import TDPOCallback, call_event, check_callbacks
from .validation import check_finite_weights, describe


logger = get_logger(__name__)
SINGLE_TASK = "default"  # the task name of a run given one reward and one prompt function


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
        sd_pipeline ([`TDPOPipeline`]): the model, wrapped by its family's pipeline (e.g.
            [`TDPOStableDiffusionPipeline`]); every family trains the same way through that interface.
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
        sd_pipeline: TDPOPipeline,
        image_samples_hook: Optional[Callable[[Any, Any, Any], Any]] = None,
        critic: Optional[TimestepCritic] = None,
        callbacks: Optional[list[TDPOCallback]] = None,
        eval_reward_functions: Optional[dict[str, Callable]] = None,
        tasks: Optional[list[Task]] = None,
    ):
        # DDPOTrainer.__init__ is not called: it forwards the un-wrapped UNet (no gradient all-reduce across
        # processes), checkpoints on rank 0 only (deadlock), needs `project_kwargs` to save and validates after
        # building the Accelerator. TRL's `loss`, `_setup_optimizer` and `_config_check` are reused.
        if not isinstance(config, TDPOConfig):
            raise TypeError(f"`config` must be a TDPOConfig, got {type(config).__name__}")
        if critic is not None and not config.use_critic:
            raise ValueError("a `critic` was given but `config.use_critic` is False (DDPO mode); drop one of them")
        if not isinstance(sd_pipeline, TDPOPipeline):
            raise TypeError(
                f"`sd_pipeline` must be a tdpo_trl pipeline (a TDPOPipeline: TDPOStableDiffusionPipeline, "
                f"TDPOStableDiffusionXLPipeline, ...), got {type(sd_pipeline).__name__}; wrap a diffusers pipeline "
                "with TDPOStableDiffusionPipeline(pipe)"
            )
        self.config = config
        self._init_tasks(reward_function, prompt_function, tasks)
        self.sd_pipeline = sd_pipeline  # TRL's name for the wrapped model
        self.image_samples_callback, final = image_samples_hook, config.train_final_step
        self.train_final_step = final if final is not None else sd_pipeline.trains_final_step
        self.trained_steps = TrainedSteps.from_config(config, self.train_final_step)
        self.num_trainable_steps = self.trained_steps.num_trainable
        self.num_train_timesteps = self.trained_steps.num_trained
        self.progress = TrainingProgress()
        self.should_stop = False  # a callback (e.g. OverOptimizationGuard) sets it to end `train` after this epoch
        self.log_history: list[dict[str, float]] = self.progress.log_history  # one record per epoch, checkpointed
        self.callbacks = check_callbacks(callbacks)
        if eval_reward_functions is None:
            eval_reward_functions = {short_name(s): get_reward_function(s) for s in config.eval_reward_functions}
        self.eval_reward_functions = dict(eval_reward_functions)
        self.all_reward_functions = [t.reward_function for t in self.tasks] + list(self.eval_reward_functions.values())
        check_available(*self.all_reward_functions)  # a model missing offline: an error now, not after an epoch
        self.heldout = HeldoutEvaluator(config, self.tasks, self.prompt_repeats, self.eval_reward_functions)
        has_reset = any(isinstance(c, ActiveNeuronResetCallback) for c in self.callbacks)
        if config.neuron_reset and not has_reset:
            self.callbacks.append(ActiveNeuronResetCallback.from_config(config))
        elif has_reset and not config.use_critic:
            raise ValueError("an ActiveNeuronResetCallback was given, but `config.use_critic` is False (no critic)")

        run_folder = resolve_run_folder(config)
        self.accelerator = Accelerator(
            log_with=config.log_with,
            mixed_precision=config.mixed_precision,
            project_config=run_folder.project,
            # TDPO: one optimizer step per timestep position after `train_gradient_accumulation_steps` minibatches.
            # DDPO: as TRL, accumulate over all trained timesteps of that many minibatches.
            gradient_accumulation_steps=config.train_gradient_accumulation_steps
            * (1 if config.use_critic else self.num_train_timesteps),
            **config.accelerator_kwargs,
        )
        run_folder.take(self.accelerator)  # locked; the checkpoints a resume abandons set aside
        self.run_folder, self.checkpoint_dir = run_folder, run_folder.checkpoint_dir
        is_okay, message = self._config_check()
        if not is_okay:
            raise ValueError(message)
        if self.accelerator.is_main_process and config.log_with is not None:
            tracker_config = {
                k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in config.to_dict().items()
            }
            self.accelerator.init_trackers(
                config.tracker_project_name, config=tracker_config, init_kwargs=config.tracker_kwargs
            )
        set_seed(config.seed, device_specific=True)

        denoiser, inference_dtype = self._init_policy()
        device = self.accelerator.device
        with torch.no_grad():  # the negative prompt's conditioning (batch 1), for classifier-free guidance
            self.negative_conditioning = self.sd_pipeline.encode_negative_prompt(config.negative_prompts, device)
        self.stat_trackers = []  # one per task
        if config.per_prompt_stat_tracking:
            sizes = (config.per_prompt_stat_tracking_buffer_size, config.per_prompt_stat_tracking_min_count)
            self.stat_trackers = [PerPromptStatTracker(*sizes) for _ in self.tasks]
            self.stat_tracker = self.stat_trackers[0]
        self.autocast = self.sd_pipeline.autocast or self.accelerator.autocast
        self.executor = futures.ThreadPoolExecutor(config.max_workers) if config.async_reward_computation else None
        self.reference_kl = ReferenceKL(
            self.sd_pipeline, self._reference_denoiser, config.sample_eta, self._guided, self.autocast
        )

        self.critic = None
        if config.use_critic:
            rewards = [task.reward_function for task in self.tasks]
            self.critic, self.critic_decoder, self.critic_optimizer = build_critic(
                config, rewards, self.sd_pipeline, device, inference_dtype, critic
            )
            self.denoiser, self.optimizer, self.critic_head, self.critic_optimizer = self.accelerator.prepare(
                denoiser, self.optimizer, self.critic.head, self.critic_optimizer
            )
        else:
            self.denoiser, self.optimizer = self.accelerator.prepare(denoiser, self.optimizer)
        self.trainable_layers = [p for p in self.denoiser.parameters() if p.requires_grad]
        self._optimizer_groups = [
            OptimizerGroup("policy", self.optimizer, self.trainable_layers, config.train_max_grad_norm)
        ]
        if self.critic is not None:
            critic_parameters = list(self.critic_head.parameters())
            self._optimizer_groups.append(
                OptimizerGroup("critic", self.critic_optimizer, critic_parameters, config.critic_max_grad_norm)
            )
        self._register_checkpointed_state()
        if run_folder.resume_checkpoint:
            self._resume(run_folder.resume_checkpoint)
        self.first_epoch = self.progress.epoch

    # ------------------------------------------------------------------ construction

    def _init_tasks(self, reward_function, prompt_function, tasks: Optional[list[Task]]):
        """`self.tasks` (one `default` task for a reward and a prompt function) and their prompt sources."""
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
        prompts = TaskPrompts(self.tasks, self.config)
        self.prompt_repeats, self._prompt_sources, self._prompt_fns = prompts.repeats, prompts.sources, prompts.checked
        self._use_task(0)
        self.training_task: Optional[str] = None  # the task being trained (`step`)

    def _init_policy(self) -> tuple[torch.nn.Module, torch.dtype]:
        """Move the model to the device in its dtypes, attach the LoRA, keep the KL's reference, build the policy
        optimizer. Returns the denoiser to prepare and the inference dtype."""
        config, pipeline, device = self.config, self.sd_pipeline, self.accelerator.device
        self.sd_pipeline.set_progress_bar_config(disable=True)  # per-step bars; the epoch bar is in `train`
        precision = self.accelerator.mixed_precision
        inference_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision, torch.float32)
        pipeline.apply_training_config(config)
        # frozen weights only serve inference; a whole denoiser being trained keeps fp32 master weights and computes
        # under autocast, as accelerate and diffusers' training scripts do (fp16 weights and Adam's eps give NaNs)
        for module in (*pipeline.resident_modules(), pipeline.denoiser):
            dtype = torch.float32 if module is pipeline.denoiser and not pipeline.use_lora else inference_dtype
            module.to(device, **({"dtype": dtype} if module.dtype != dtype else {}))
        denoiser = pipeline.get_trainable_layers()
        # the KL's reference policy: the LoRA disabled, or (full training) a frozen copy of the base denoiser
        self._reference_denoiser = None
        if config.kl_coef > 0 and not pipeline.use_lora:
            self._reference_denoiser = copy.deepcopy(denoiser).requires_grad_(False).eval()
        if config.allow_tf32 and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True
        self.optimizer = self._setup_optimizer([p for p in denoiser.parameters() if p.requires_grad])
        self.learning_rate = EpochLearningRate(
            self.optimizer, config.train_lr_scheduler, config.num_epochs, config.train_lr_warmup_epochs
        )
        return denoiser, inference_dtype

    def _register_checkpointed_state(self):
        """What checkpoints hold besides weights and optimizers, by name (`CheckpointedState`): the progress, the
        reward statistics, the prompts' and the pretraining data's positions, the callbacks' state."""
        register_denoiser_hooks(self.accelerator, self.sd_pipeline, self.denoiser)  # LoRA in diffusers format
        self.checkpointed = CheckpointedState()
        self.accelerator.register_for_checkpointing(self.checkpointed)
        self.checkpointed.add("progress", self.progress)
        for task, tracker in zip(self.tasks, self.stat_trackers):
            self.checkpointed.add(f"reward_statistics/{task.name}", StatTrackerState(tracker))
        for task, source in zip(self.tasks, self._prompt_sources):  # a resumed run draws the same prompts
            if has_state(source):
                self.checkpointed.add(f"prompts/{task.name}", source)
        for callback in self.callbacks:
            self.checkpointed.add_callback(callback)
        self.pretraining = None  # image-caption batches of the pretraining loss; their position is checkpointed
        if self.config.pretrain_loss_coef > 0:
            self.pretraining = PretrainingData.from_config(self.config, self.sd_pipeline.image_resolution())
            self.checkpointed.add("pretraining_data", self.pretraining)

    def add_callback(self, callback: TDPOCallback):
        """Add a callback (an instance or a `TDPOCallback` subclass); a resumed run gives it its checkpointed state."""
        (callback,) = check_callbacks([callback])
        self.checkpointed.add_callback(callback)
        self.callbacks.append(callback)

    @property
    def unet(self) -> torch.nn.Module:
        """TRL's name for the prepared (all-reducing) denoiser, `self.denoiser`."""
        return self.denoiser

    @property
    def guided_training(self) -> bool:
        """Whether the update recomputes log-probs with classifier-free guidance: `train_cfg` and guided sampling
        (`pipeline.guided`); unguided sampling is recomputed unguided, bit for bit, at half the batch."""
        return self.config.train_cfg and self.sd_pipeline.guided(self.config.sample_guidance_scale)

    def _guided(self, prediction: torch.Tensor) -> torch.Tensor:
        """The update's prediction: classifier-free guidance of a `(2B, ...)` prediction when `guided_training`."""
        return guide(prediction, self.config.sample_guidance_scale) if self.guided_training else prediction

    def _task_key(self, index: int, key: str) -> str:
        """A task's metric name: `task/<name>/<key>` with several tasks, `<key>` with one."""
        return f"task/{self.tasks[index].name}/{key}" if self.multi_task else key

    def _use_task(self, index: int):
        """Point `prompt_fn` / `reward_fn` (TRL's names, which sampling and scoring read) at a task."""
        self._task_index = index
        self.prompt_fn, self.reward_fn = self._prompt_fns[index], self.tasks[index].reward_function

    # ------------------------------------------------------------------ checkpoints

    def _resume(self, path: str):
        """Load a verified checkpoint of a model of the same shape: weights, optimizers, RNG, progress and state."""
        check_structure(path, self.model_structure())
        warm_up(*self.all_reward_functions)  # before the RNG state is restored: lazy models draw initial weights
        logger.info(f"Resuming from {path}")
        load_checkpoint(self.accelerator, path, self.checkpointed)

    def model_structure(self) -> dict:
        """What a checkpoint must fit: LoRA and critic shape, tasks, pretraining (`checkpointing.model_structure`)."""
        head = self.accelerator.unwrap_model(self.critic_head) if self.critic is not None else None
        denoiser, tasks = self.accelerator.unwrap_model(self.denoiser), [task.name for task in self.tasks]
        return model_structure(self.sd_pipeline.use_lora, denoiser, head, self.config, tasks)

    def trained_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        """`(name, parameter)` of every trained weight: the LoRA (or denoiser) and the critic head. (Denoiser
        weights are named `unet.*` whatever the family, as checkpoints written so far name them.)"""
        named = [(f"unet.{n}", p) for n, p in self.accelerator.unwrap_model(self.denoiser).named_parameters()]
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

    def save_checkpoint(self) -> str:
        """Write the next `checkpoint_<i>` (every process must call this) and rotate old ones. Returns its path."""
        index = self.progress.next_checkpoint
        destination = f"{self.checkpoint_dir}/checkpoint_{index}"
        check_finite_weights(self._named_weights(), "a checkpoint", destination)  # before anything is written
        self.progress.next_checkpoint = index + 1  # saved inside the checkpoint: a resumed run continues the count
        limit, structure = self.run_folder.checkpoint_limit, self.model_structure()
        return write_checkpoint(self.accelerator, self.checkpoint_dir, index, limit, structure=structure)

    # ------------------------------------------------------------------ sample

    def _generate_samples(self, iterations: int, batch_size: int) -> tuple[list[Rollout], list]:
        """Sample `iterations` batches of `batch_size` prompts of the current task through the pipeline's
        `sample_with_log_probs` (any model family samples the same way). With a critic, also embed x_t for it and
        record its values V(x_t), at the steps that will be trained (`TrainedSteps`).

        Returns, as TRL's: per batch a `Rollout` (`latents`, `next_latents`, `log_probs`, `timesteps` `(B, T, ...)`
        and the conditioning, `prompt_ids`) and `[images, prompts, prompt_metadata]`."""
        self.sd_pipeline.denoiser.eval()
        samples, prompt_image_pairs = [], []
        for _ in range(iterations):
            prompts, prompt_metadata = zip(*[self.prompt_fn() for _ in range(batch_size)])
            rollout, images = sample_rollout(
                self.sd_pipeline, list(prompts), self.negative_conditioning, self.config, self.accelerator.device,
                self.autocast,
            )  # fmt: skip
            samples.append(rollout)
            prompt_image_pairs.append([images, prompts, prompt_metadata])
        if self.critic is not None:
            for rollout in samples:
                self._record_values(rollout)
        return samples, prompt_image_pairs

    def _record_values(self, rollout: Rollout):
        """The critic's features and values of x_t, cached for the update: at the steps to be trained when they are
        drawn now (`trained_steps` `(B, k)`), else at every step."""
        if self.trained_steps.drawn_at_sampling:
            rollout["trained_steps"] = self.trained_steps.draw(len(rollout["latents"]), rollout["latents"].device)
        head, steps = self.accelerator.unwrap_model(self.critic_head), rollout.get("trained_steps")
        batch_size = self.config.critic_encode_batch_size
        rollout["critic_features"], rollout["values"] = self.critic.value_steps(  # (B, k, D), (B, k)
            head, rollout["latents"], steps, self._task_index, self.critic_decoder, batch_size
        )

    # ------------------------------------------------------------------ score

    def compute_rewards(self, prompt_image_pairs, is_async=False):
        """Score each sampled batch with the current task's reward, checking what it returns (`scoring`). Returns
        `(rewards, metadata)`: per batch a `(B,)` float32 tensor and the function's metadata."""
        executor = self.executor if is_async else None
        return scoring.score_batches(self.accelerator, self.reward_fn, prompt_image_pairs, executor)

    # ------------------------------------------------------------------ normalize and advantages

    def _normalized_rewards(
        self, rewards: np.ndarray, prompt_ids: Optional[torch.Tensor], epoch: Optional[int] = None
    ) -> np.ndarray:
        """The rewards `(N_all,)` of every process normalized per prompt (DDPO's tracker, one per task) or over the
        batch (`reward_normalization`); see `advantages.normalize_rewards`."""
        prompts, tracker = None, None
        if self.config.per_prompt_stat_tracking:
            prompt_ids = self.accelerator.gather(prompt_ids).cpu().numpy()
            prompts = np.asarray(self.sd_pipeline.tokenizer.batch_decode(prompt_ids, skip_special_tokens=True))
            tracker = self.stat_trackers[self._task_index]
        return normalize_rewards(rewards, prompts, tracker, f"epoch {epoch if epoch is not None else '?'}",
                                 reward_name(self.reward_fn))  # fmt: skip

    def _compute_advantages(self, rollout: Rollout, normalized_rewards: np.ndarray) -> tuple[Rollout, dict]:
        """The rollout with `advantages` (and `returns` in TDPO mode) `(n_local, k)`, reduced to its trained steps if
        they were drawn at sampling; and the advantage and critic metrics."""
        device, gather = self.accelerator.device, self.accelerator.gather
        rewards = torch.as_tensor(normalized_rewards, dtype=torch.float32, device=device)  # (N_all,)
        num_steps = rollout["timesteps"].shape[1]
        stats, step_rewards = {}, None
        if "kl_ref" in rollout:  # kl_penalty="reward": every step pays kl_coef * KL_t
            kl = gather(rollout.pop("kl_ref"))  # (N_all, T)
            step_rewards = -self.config.kl_coef * kl
            stats["policy/kl_ref"] = kl.mean().item()
        returns = discounted_returns(rewards, num_steps, self.config.gamma, step_rewards)  # (N_all, T)
        if self.critic is None:
            # DDPO: one advantage for every step, or the penalized return of each step
            advantages = rewards[:, None].expand(-1, num_steps) if step_rewards is None else returns
        else:
            values = gather(rollout["values"])  # (N_all, T) or (N_all, k), from sampling time
            if "trained_steps" in rollout:  # only the k drawn steps were valued: their returns, (N_all, k)
                returns = returns.gather(1, gather(rollout["trained_steps"]))
                rollout = self.trained_steps.keep_drawn(rollout)
            advantages = temporal_advantages(returns, values, normalized=self.config.normalize_temporal_advantages)
            rollout["returns"] = scoring.local_rows(self.accelerator, returns)
            stats["critic/value_mean"] = values.mean().item()
            stats["critic/value_std"] = values.std(unbiased=False).item()
            stats["critic/explained_variance"] = explained_variance(values, returns)
        clip = self.config.train_adv_clip_max
        if math.isfinite(clip):
            advantages = advantages.clamp(-clip, clip)
        rollout["advantages"] = scoring.local_rows(self.accelerator, advantages)
        stats["advantage/mean"] = advantages.mean().item()
        stats["advantage/std"] = advantages.std(unbiased=False).item()
        return rollout, stats

    # ------------------------------------------------------------------ one epoch

    def step(self, epoch: int, global_step: int) -> int:
        """Sample, score, and train on one epoch of trajectories (of every task). Returns the updated global step."""
        config = self.config
        call_event(self.callbacks, "on_epoch_begin", self, epoch=epoch, global_step=global_step)
        start = time.perf_counter()
        stats = {"epoch": epoch, "policy/learning_rate": self.learning_rate.set_epoch(epoch)}
        task_rollouts, times, train_info = [], defaultdict(float), defaultdict(list)
        # sequential (the paper's order): sample task 1, update on it, sample task 2 with the updated model, ...: each
        # task's update is on-policy. weighted (and a single task): sample every task, then one update over all.
        sequential = self.multi_task and config.multi_task_update == "sequential"
        for index in range(len(self.tasks)):
            rollout, task_stats = self._collect(index, epoch, global_step, times)
            task_rollouts.append(rollout)
            stats.update({self._task_key(index, k): v for k, v in task_stats.items()})
            if sequential:
                global_step = self._update(rollout, epoch, global_step, train_info, self.tasks[index].name, times)
        # every task's samples, as the callbacks see them (e.g. the critic features neuron reset scores)
        rollout = task_rollouts[0] if len(task_rollouts) == 1 else Rollout.cat(task_rollouts)
        if not sequential:  # the task being trained, for callbacks: None when minibatches mix tasks
            task_name = None if self.multi_task else self.tasks[0].name
            global_step = self._update(rollout, epoch, global_step, train_info, task_name, times)
        trained = time.perf_counter()

        grad_norms = {name: train_info.pop(f"{name}/_grad_norms", None) for name in ("policy", "critic")}
        stats.update(grad_norm_stats(grad_norms, epoch))
        stats.update(self._reduce_info(train_info))
        if config.eval_freq and (epoch + 1) % config.eval_freq == 0:  # the model as this epoch leaves it
            stats.update(self.evaluate_heldout(epoch))
        evaluated = time.perf_counter()
        call_event(
            self.callbacks, "on_epoch_end", self, epoch=epoch, global_step=global_step, samples=rollout, metrics=stats
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

    def _collect(self, index: int, epoch: int, global_step: int, times: dict) -> tuple[Rollout, dict]:
        """Sample task `index`, score it with its reward, normalize its rewards and compute its advantages.

        Returns the collated rollout (each entry `(n_local, ...)`, with `advantages` scaled by the task's weight in
        multi-task runs and `task_index`) and the task's metrics.
        """
        config, task = self.config, self.tasks[index]
        self._use_task(index)
        start = time.perf_counter()
        batches, prompt_image_data = self._generate_samples(
            config.sample_num_batches_per_epoch, config.sample_batch_size
        )
        rollout = Rollout.cat(batches)  # (num_batches_per_epoch * sample_batch_size, ...)
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
            conditioning = rollout.conditioning(self.negative_conditioning.keys())
            rollout["kl_ref"] = self.reference_kl.of_rollout(
                self.accelerator.unwrap_model(self.denoiser), rollout, conditioning, config.train_batch_size,
                self.guided_training,
            )  # (n, T)  # fmt: skip
        normalized = self._normalized_rewards(rewards, rollout.pop("prompt_ids"), epoch)
        when = f"epoch {epoch}" + (f" task {task.name!r}" if self.multi_task else "")
        stats = scoring.reward_stats(rewards, rewards_metadata, when)
        stats.update(scoring.reward_component_stats(self.accelerator, rewards_metadata))
        stats.update(scoring.eval_reward_stats(self.accelerator, self.eval_reward_functions, prompt_image_data))
        rollout, advantage_stats = self._compute_advantages(rollout, normalized)
        stats.update(advantage_stats)
        if self.multi_task:
            rollout["advantages"] = rollout["advantages"] * task.weight  # scales this task's policy loss
        rollout["task_index"] = torch.full((rollout.num_samples,), index, device=self.accelerator.device)
        return rollout, stats

    # ------------------------------------------------------------------ update

    def _update(self, rollout: Rollout, epoch: int, global_step: int, train_info, task_name, times: dict) -> int:
        """`train_num_inner_epochs` passes of minibatch updates over `rollout`. Returns the updated global step."""
        start = time.perf_counter()
        self.training_task = task_name
        for inner_epoch in range(self.config.train_num_inner_epochs):
            batched = self.trained_steps.shuffle_and_batch(rollout, self.config.train_batch_size)
            global_step = self._train_batched_samples(inner_epoch, epoch, global_step, batched, train_info)
            if not self.accelerator.sync_gradients:
                raise RuntimeError(
                    "an inner epoch ended between optimizer steps; check gradient accumulation settings"
                )
        self.training_task = None
        times["training"] += time.perf_counter() - start
        return global_step

    def _update_order(self, num_minibatches: int) -> list[tuple[int, int]]:
        """(timestep position, minibatch) pairs: timestep-major for TDPO, sample-major for DDPO (as TRL)."""
        positions, batches = range(self.num_train_timesteps), range(num_minibatches)
        if self.critic is not None:
            return [(j, i) for j in positions for i in batches]
        return [(j, i) for i in batches for j in positions]

    def _train_batched_samples(self, inner_epoch, epoch, global_step, batched_samples, info=None):
        """One pass over the minibatches; an optimizer step every time accelerate's accumulation syncs. Metrics stay
        tensors in `info` until the epoch ends (no host sync per step)."""
        info = info if info is not None else defaultdict(list)
        models = (self.denoiser, self.critic_head) if self.critic is not None else (self.denoiser,)
        for model in models:
            model.train()
        for j, i in self._update_order(len(batched_samples)):
            sample = batched_samples[i]
            with self.accelerator.accumulate(*models):
                pretrain, pretrain_weight = None, pretrain_weight_of(self.tasks, sample["task_index"])
                # a task with weight 0 skips the pretraining batch; minibatches that mix tasks (training_task None)
                # always take one, so every process logs the same metrics
                if self.pretraining is not None and (pretrain_weight > 0 or self.training_task is None):
                    images, captions = self.pretraining.next_batch()
                    pretrain = pretraining_inputs(
                        self.sd_pipeline, images, captions, self.pretraining.generator, self.accelerator.device
                    )
                loss, approx_kl, clipfrac, terms = self._step_loss(
                    sample["latents"][:, j],
                    sample["timesteps"][:, j],
                    sample["next_latents"][:, j],
                    sample["log_probs"][:, j],
                    sample["advantages"][:, j],
                    sample.conditioning(self.negative_conditioning.keys()),
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

    def calculate_loss(
        self, latents, timesteps, next_latents, log_probs, advantages, embeds: Union[torch.Tensor, dict]
    ):  # fmt: skip
        """TRL's contract: `(loss, approx_kl, clipfrac)` of one denoising step, the PPO-clipped policy loss (plus the
        KL to the base model with `kl_penalty="loss"`).

        `embeds` as TRL passes them: the prompts' embeddings `(B, L, D)`, or with guided training the negative
        prompt's then the prompts' `(2B, L, D)`; or, for any family, the conditioning dict (`encode_prompts`' keys
        and their `negative_` counterparts).
        """
        loss, approx_kl, clipfrac, _ = self._step_loss(
            latents,
            timesteps,
            next_latents,
            log_probs,
            advantages,
            self.sd_pipeline.conditioning_from_embeds(embeds, self.guided_training),
        )
        return loss, approx_kl, clipfrac

    def _step_loss(
        self, latents, timesteps, next_latents, log_probs, advantages, conditioning, pretrain_inputs=None,
        pretrain_weight=1.0,
    ):  # fmt: skip
        """`(loss, approx_kl, clipfrac, terms)` of one denoising step: the PPO-clipped policy loss through the
        prepared (all-reducing) denoiser and the pipeline's denoiser call and log-prob step, plus the regularizers
        that are on, each also in `terms` (`pretrain/loss`, `policy/kl_ref`). `advantages` is `(B,)`.

        `pretrain_inputs` = `(denoiser_inputs, target)` of a pretraining batch (`regularizers.pretraining_inputs`),
        denoised in the same call as the policy's minibatch (DDP allows one forward per backward); its loss is
        weighted by `pretrain_loss_coef * pretrain_weight`.
        """
        config, pipeline = self.config, self.sd_pipeline
        policy_inputs = pipeline.denoiser_inputs(latents, timesteps, conditioning, self.guided_training)
        inputs = policy_inputs
        if pretrain_inputs is not None:  # one batch: the policy's rows, then the pretraining rows
            inputs = {k: torch.cat([v, pretrain_inputs[0][k].to(v.dtype)]) for k, v in policy_inputs.items()}
        num_policy = len(policy_inputs["sample"])
        with self.autocast():
            prediction = pipeline.predict(self.denoiser, inputs)
            policy_prediction = self._guided(prediction[:num_policy])
            # log-prob of next_latents given latents under the current policy
            log_prob = pipeline.step_log_prob(
                policy_prediction, timesteps, latents, eta=config.sample_eta, next_latents=next_latents
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
            denoiser = self.accelerator.unwrap_model(self.denoiser)
            kl = self.reference_kl.of_prediction(denoiser, policy_prediction, policy_inputs, timesteps, latents)
            terms["policy/kl_ref"] = kl.mean()
            loss = loss + config.kl_coef * terms["policy/kl_ref"]
        return loss, approx_kl, clipfrac, terms

    def critic_loss(self, features, old_values, returns, task_index=None):
        """Clipped value loss of one denoising step from cached features `(B, D)` (each row valued for its task,
        `task_index` `(B,)`). Returns `(loss, clipfrac)`."""
        values = self.critic_head(features, task_index)  # (B,)
        return clipped_value_loss(values, old_values, returns, self.config.critic_value_clip_range)

    def _reduce_info(self, info: dict[str, list[torch.Tensor]]) -> dict[str, float]:
        """Each metric's mean over the epoch's steps and over processes: the epoch's one host sync."""
        means = self.accelerator.reduce({k: torch.stack(v).mean() for k, v in info.items()}, reduction="mean")
        return {k: v.item() for k, v in means.items()}

    # ------------------------------------------------------------------ held-out evaluation

    def evaluate_heldout(self, epoch: Optional[int] = None) -> dict[str, float]:
        """`heldout/<name>/mean|std` (`task/<task>/heldout/...` with several tasks; `target`: the task's reward) on the
        fixed, seeded held-out prompts (`HeldoutEvaluator`; the training RNG is untouched). The main process saves an
        image grid to `<project_dir>/heldout/epoch_<epoch>.png` (`<task>_epoch_<epoch>.png`)."""
        main = self.accelerator.is_main_process and epoch is not None
        grid_folder = f"{self.accelerator.project_dir}/heldout" if main else None
        results = self.heldout.evaluate(self.sd_pipeline, self.autocast, self.accelerator.device, grid_folder, epoch)
        return {self._task_key(index, k): v for index, task_stats in enumerate(results) for k, v in task_stats.items()}

    # ------------------------------------------------------------------ saving and sharing (`sharing`)

    def reward_names(self) -> list[str]:
        """The trained rewards, for the model card (with several tasks: `<task>: <reward>`)."""
        return trained_reward_names(self.tasks, self.multi_task)

    def base_model_id(self) -> Optional[str]:
        """The base model's Hub id, if the pipeline was loaded by id (not from a local folder or built in memory)."""
        return hub_base_model(self.sd_pipeline)

    def create_model_card(self, base_model: Optional[str] = None, repo_id: Optional[str] = None):
        """A `huggingface_hub.ModelCard` for the trained adapter (see `tdpo_trl.model_card`)."""
        return sharing.model_card_of(self, base_model=base_model, repo_id=repo_id)

    def save_pretrained(
        self, save_directory: str, *, merged_pipeline: bool = False, base_model: Optional[str] = None,
        repo_id: Optional[str] = None,
    ) -> str:  # fmt: skip
        """Write the trained LoRA (diffusers format; the whole denoiser under `unet/` or `transformer/` for full
        training), the critic head, the training config and a model card to `save_directory`. Every process may call
        it; the main process writes.

        Args:
            merged_pipeline: also write a full pipeline with the LoRA fused into the denoiser, in `merged_pipeline/`.
            base_model: Hub id of the base model for the card, if the pipeline was not loaded by id.
            repo_id: the Hub repo the card's usage snippet names.
        """
        return sharing.save_trained(self, save_directory, merged_pipeline, base_model=base_model, repo_id=repo_id)

    def push_to_hub(
        self, repo_id: str, *, private: Optional[bool] = None, token: Optional[str] = None,
        commit_message: str = "Upload TDPO-R fine-tune", local_dir: Optional[str] = None,
        merged_pipeline: bool = False, base_model: Optional[str] = None, revision: Optional[str] = None,
    ) -> Optional[str]:  # fmt: skip
        """Save locally (`local_dir`, default `<project_dir>/hub/<repo name>`), then create the repo and upload.

        Returns the commit URL on the main process (None on the others). If the Hub cannot be reached, a
        `tdpo_trl.hub.HubUploadError` says what failed and where the saved files are; they are kept.
        """
        return sharing.push_trained(
            self, repo_id, local_dir=local_dir, merged_pipeline=merged_pipeline, base_model=base_model,
            private=private, token=token, commit_message=commit_message, revision=revision,
        )  # fmt: skip

    def _guard(self) -> Optional[OverOptimizationGuard]:  # the run's guard, if any
        return sharing.guard_of(self)

    # ------------------------------------------------------------------ the loop

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
        warn_unsaved_epochs(epochs, self.config.save_freq)
        self.checkpointed.check_all_restored()  # callbacks added since construction have taken their state
        global_step = self.progress.global_step
        desc, shown = "TDPO" if self.critic is not None else "DDPO", self.accelerator.is_local_main_process
        bar = tqdm(range(self.progress.epoch, epochs), desc=desc, unit="epoch", disable=not shown)
        call_event(self.callbacks, "on_train_begin", self, epoch=self.progress.epoch, global_step=global_step)
        for epoch in bar:
            global_step = self.step(epoch, global_step)
            record = self.log_history[-1]
            keys = [scoring.shown_reward_key(record, self._task_key(i, "")) for i in range(len(self.tasks))]
            names = [task.name for task in self.tasks] if self.multi_task else ["reward"]
            bar.set_postfix({name: f"{record[key]:.4f}" for name, key in zip(names, keys)})
            if self.should_stop:
                logger.warning(f"training stopped by a callback after epoch {epoch}")
                break
        call_event(self.callbacks, "on_train_end", self, epoch=self.progress.epoch, global_step=global_step)
        self.accelerator.end_training()
        write_run_summary(self)  # <run>/summary.json, printed on the main process
        self.run_folder.release()
