"""Configuration for the TDPO-R trainer."""

import json
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Optional

from trl import DDPOConfig

from .loading import check_model_reference
from .modeling_critic import CRITIC_ENCODERS
from .neuron_reset import SCORING_MODES


class JSONDict(dict):
    """A `dict` that can also be built from a JSON string.

    `HfArgumentParser` calls a field's type on the command-line string, and plain `dict` rejects it ("invalid dict
    value"). Typing the dict-valued fields as `JSONDict` makes `--tracker_kwargs '{"wandb": {"entity": "me"}}'` work.
    """

    def __init__(self, value=(), **kwargs):
        if isinstance(value, str):
            try:
                parsed = json.loads(value)
            except json.JSONDecodeError as err:
                raise ValueError(f"expected a JSON object, got {value!r} ({err})") from None
            if not isinstance(parsed, dict):
                raise ValueError(f"expected a JSON object, got {value!r}")
            value = parsed
        super().__init__(value, **kwargs)


_DICT_FIELDS = ("tracker_kwargs", "accelerator_kwargs", "project_kwargs")
_CRITIC_ACTIVATIONS = ("none", "relu", "gelu", "silu", "tanh")
_RESET_TARGETS = ("active", "dormant", "all", "none")
_LORA_INITS = ("gaussian", "default")
KL_PENALTY_MODES = ("loss", "reward")
REWARD_NORMALIZATIONS = ("per_prompt", "batch")
MULTI_TASK_UPDATES = ("sequential", "weighted")
LR_SCHEDULERS = ("constant", "linear", "cosine")


def check_prompt_repeats(repeats: int, samples_per_epoch: int):
    """Each epoch must hold whole groups of `repeats` samples of one prompt."""
    if repeats > samples_per_epoch:
        raise ValueError(
            f"`prompt_repeats` ({repeats}) is larger than the samples of an epoch per process (sample_batch_size * "
            f"sample_num_batches_per_epoch = {samples_per_epoch}); lower it or sample more"
        )
    if samples_per_epoch % repeats:
        raise ValueError(
            f"`prompt_repeats` ({repeats}) must divide the samples of an epoch per process (sample_batch_size * "
            f"sample_num_batches_per_epoch = {samples_per_epoch}), so that no prompt group straddles two epochs"
        )


def script_name(path: str) -> str:
    """The file name of the script at `path` without `.py` (`train.py` -> `train`, `tdpo-trl` -> `tdpo-trl`)."""
    name = os.path.basename(path)
    return (name[: -len(".py")] if name.endswith(".py") else name) or "tdpo"


@dataclass
class TDPOConfig(DDPOConfig):
    r"""
    Configuration class for [`TDPOTrainer`]: every field of TRL's `DDPOConfig`, plus the TDPO-R critic.

    TDPO-R (Zhang et al., ICML 2024) trains a per-timestep critic V(x_t) next to the diffusion policy and uses
    temporal-difference advantages A_t = G_t - V(x_t) at every denoising step. With `use_critic=False` the same
    trainer runs plain DDPO.

    Every field can be set from the command line with [`~transformers.HfArgumentParser`]; dict-valued fields take a
    JSON string.

    Parameters:
        > Parameters whose DDPO defaults are changed

        train_adv_clip_max (`float` or `None`, *optional*, defaults to `None`):
            Clip advantages to `[-train_adv_clip_max, train_adv_clip_max]`. `None` means DDPO's 5.0 when
            `use_critic=False` and no clipping when `use_critic=True` (as the TDPO-R paper).

        > Parameters that control the policy's learning rate over the run

        train_lr_scheduler (`str`, *optional*, defaults to `"constant"`):
            How the policy's learning rate changes over the epochs: `"constant"`, `"linear"` or `"cosine"` (both decay
            to 0 at `num_epochs`), transformers' schedules (`transformers.get_scheduler`) counted in epochs: epoch `e`
            trains at `train_learning_rate` x schedule(e). Logged as `policy/learning_rate`. The critic's rate is
            constant.
        train_lr_warmup_epochs (`int`, *optional*, defaults to `0`):
            Epochs of linear warmup before the schedule.

        > Parameters that control which denoising steps are trained

        train_final_step (`bool` or `None`, *optional*, defaults to `None`):
            Train on the last denoising step. `None` is the pipeline family's choice: `True` for SD 1.x / SDXL (as
            TRL), `False` for SD3, whose last SDE step is nearly deterministic (as Flow-GRPO and DanceGRPO).
            `train_timestep_fraction` then draws from the other steps.

        > Parameters that control the policy's LoRA adapter

        use_lora (`bool` or `None`, *optional*, defaults to `None`):
            Train a LoRA adapter on the UNet (`True`) or the whole UNet (`False`). `None` keeps the pipeline's
            `use_lora` (TRL's convention: `TDPOStableDiffusionPipeline(..., use_lora=True)`).
        lora_rank (`int`, *optional*, defaults to `4`):
            Rank r of the adapter.
        lora_alpha (`float`, *optional*, defaults to `4.0`):
            LoRA scaling numerator: the update is scaled by `lora_alpha / lora_rank`.
        lora_dropout (`float`, *optional*, defaults to `0.0`):
            Dropout on the adapter's input.
        lora_target_modules (`list[str]`, *optional*, defaults to `["to_k", "to_q", "to_v", "to_out.0"]`):
            UNet module names that get an adapter (the attention projections, as TRL's DDPO).
        lora_init (`str`, *optional*, defaults to `"gaussian"`):
            `"gaussian"` (A ~ N(0, 1/r), B = 0, as TRL's DDPO) or `"default"` (PEFT's Kaiming-uniform A, B = 0).
            Either way the adapter starts as the identity.
        gradient_checkpointing (`bool`, *optional*, defaults to `False`):
            Recompute the denoiser's activations in the backward pass instead of keeping them (diffusers'
            `enable_gradient_checkpointing`): less activation memory for more compute, same gradients. For the large
            transformers (FLUX.1's 12 B).

        > Parameters that control resuming

        resume_as_new_run (`bool`, *optional*, defaults to `False`):
            With `resume_from`: write the continuation into the run folder that `run_name` (or
            `project_kwargs["project_dir"]`) names, which must hold no checkpoints, instead of the resumed run's own
            folder. Without it a resume that would write into another run's folder is refused.

        > Parameters that control the critic

        use_critic (`bool`, *optional*, defaults to `True`):
            Train a per-timestep critic and use temporal advantages (TDPO). `False` runs plain DDPO.
        critic_encoder (`str`, *optional*, defaults to `"openai/clip-vit-large-patch14"`):
            What the critic reads. A CLIP vision checkpoint id or local path: x_t is decoded by the VAE and embedded
            by that frozen image encoder (the paper's critic). `"latents"`: the flattened latent x_t itself, no
            decoding (cheap; for small models). Or a name a plugin registers in `modeling_critic.CRITIC_ENCODERS`
            (the digits demo: `"digit_classifier"`, the features its ink reward reads). Pass `critic=` to
            [`TDPOTrainer`] for any other encoder. When the reward holds the same checkpoint (the aesthetic score and
            CLIP score read `openai/clip-vit-large-patch14`), the critic shares the reward's copy: no second set of
            weights in memory, run in the reward's dtype.
        critic_decoder (`str`, *optional*, defaults to `""`):
            What decodes x_t for an image-reading critic: `""` the pipeline's VAE, or a diffusers `AutoencoderTiny`
            id or folder (TAESD: `"madebyollin/taesd"` for SD 1.x/2.x, `"madebyollin/taesdxl"` for SDXL), about
            as cheap as a few convolutions instead of the full VAE decoder at every step. Rewards still see the
            VAE's images.
        critic_hidden_sizes (`list[int]`, *optional*, defaults to `[1024, 128, 64, 16]`):
            Hidden layer widths of the critic's MLP head (the LAION aesthetic-predictor shape).
        critic_dropout (`list[float]`, *optional*, defaults to `[0.2, 0.2, 0.1, 0.0]`):
            Dropout after each hidden layer; one value per entry of `critic_hidden_sizes`.
        critic_activation (`str`, *optional*, defaults to `"none"`):
            Nonlinearity between hidden layers: `"none"` (as the paper), `"relu"`, `"gelu"`, `"silu"` or `"tanh"`.
        critic_learning_rate (`float`, *optional*, defaults to `1e-4`):
            Learning rate of the critic's AdamW optimizer.
        critic_adam_beta1 (`float`, *optional*, defaults to `0.9`):
            Critic AdamW beta1.
        critic_adam_beta2 (`float`, *optional*, defaults to `0.999`):
            Critic AdamW beta2.
        critic_adam_weight_decay (`float`, *optional*, defaults to `1e-4`):
            Critic AdamW weight decay.
        critic_adam_epsilon (`float`, *optional*, defaults to `1e-8`):
            Critic AdamW epsilon.
        critic_value_clip_range (`float`, *optional*, defaults to `0.2`):
            PPO2-style value clipping around the values recorded at sampling time; `0` turns it off.
        critic_loss_coef (`float`, *optional*, defaults to `1.0`):
            Weight of the critic loss in the total loss.
        critic_max_grad_norm (`float`, *optional*, defaults to `1.0`):
            Gradient-norm clip for the critic (the policy uses `train_max_grad_norm`).
        critic_encode_batch_size (`int`, *optional*, defaults to `32`):
            How many latents are VAE-decoded and embedded at once when caching critic features after sampling.

        > Parameters that control returns and advantages

        gamma (`float`, *optional*, defaults to `1.0`):
            Discount factor across denoising steps. With the default every step's return is the final reward.
        normalize_temporal_advantages (`bool`, *optional*, defaults to `True`):
            Normalize the temporal advantages over all (sample, step) entries of an epoch, across processes.

        > Parameters that control cross-reward (over-optimization) evaluation

        eval_reward_functions (`list[str]`, *optional*, defaults to `[]`):
            Out-of-domain rewards (names in `tdpo_trl.rewards.REWARD_FUNCTIONS` or dotted paths). Every epoch they
            score the training samples, logged as `eval/<name>/mean` and `eval/<name>/std`, as the paper does.
        eval_freq (`int`, *optional*, defaults to `0`):
            Every `eval_freq` epochs, sample a fixed, seeded held-out prompt set and score it with the target and the
            eval rewards (`heldout/<name>/mean`); an image grid goes to `<project_dir>/heldout/`. `0` turns it off.
        eval_prompts (`str`, *optional*, defaults to `"simple_animals"`):
            The held-out prompts: a built-in set, a text file, or `dataset:<id>` (see `tdpo_trl.prompts`).
        eval_num_prompts (`int`, *optional*, defaults to `8`):
            How many held-out prompts (drawn once, with `eval_seed`).
        eval_seed (`int`, *optional*, defaults to `0`):
            Seed of the held-out prompts and of their sampling noise; the training RNG is not touched.

        > Parameters that control the regularizers against over-optimization (`tdpo_trl.regularizers`)

        pretrain_loss_coef (`float`, *optional*, defaults to `0.0`):
            Weight beta of the pretraining (denoising) loss added to every policy update (the large-scale RL paper);
            `0` turns it off. Logged as `pretrain/loss`.
        pretrain_dataset (`str`, *optional*, defaults to `""`):
            Image-caption pairs for that loss: `"digits"` (the shipped model's training digits),
            `"imagefolder:<dir>"`, or a `datasets` id or folder.
        pretrain_dataset_split (`str`, *optional*, defaults to `"train"`):
            Split of `pretrain_dataset`.
        pretrain_image_column (`str`, *optional*, defaults to `"image"`):
            Column holding the images.
        pretrain_caption_column (`str`, *optional*, defaults to `"text"`):
            Column holding the captions.
        pretrain_batch_size (`int`, *optional*, defaults to `16`):
            Image-caption pairs per policy update, denoised in the same UNet call as the policy's minibatch.
        kl_coef (`float`, *optional*, defaults to `0.0`):
            Weight of the per-step KL between the current and the base model's DDIM transitions (closed form; the
            base is the UNet with its LoRA disabled, or a frozen copy for full-UNet training), added to the loss.
            Logged as `policy/kl_ref`.
        kl_penalty (`str`, *optional*, defaults to `"loss"`):
            Where the KL goes: `"loss"` adds `kl_coef` x KL to the policy loss (as Flow-GRPO); `"reward"` subtracts
            `kl_coef` x KL_t from the reward of every denoising step t (as the official TDPO code), computed once
            after sampling, so the returns, the critic's targets and the advantages carry it.

        > Parameters that control the critic's neuron reset (the "R" of TDPO-R)

        neuron_reset (`bool` or `None`, *optional*, defaults to `None`):
            Add an [`ActiveNeuronResetCallback`] that scores the critic's neurons every epoch and periodically resets
            some of them. `None` means on in TDPO mode and off in DDPO mode (there is no critic to reset).
        neuron_reset_frequency (`int`, *optional*, defaults to `10`):
            Reset after every `neuron_reset_frequency`-th epoch (`(epoch + 1) % frequency == 0`).
        neuron_reset_threshold (`float`, *optional*, defaults to `0.0`):
            A neuron is dormant when its normalized score (mean |activation| divided by its layer's mean) is at most
            this value; otherwise it is active.
        neuron_reset_target (`str`, *optional*, defaults to `"active"`):
            Which neurons a reset re-initializes: `"active"` (TDPO-R), `"dormant"` (ReDo), `"all"`, or `"none"`
            (measure and log the statistics, never reset).
        neuron_reset_scoring (`str`, *optional*, defaults to `"one_step_per_sample"`):
            Which cached critic features are scored each epoch: `"one_step_per_sample"` (each sample's features at
            one random denoising step, as many as the official code scores) or `"all_steps"` (every (sample, step)).
        neuron_reset_scoring_size (`int` or `None`, *optional*, defaults to `None`):
            At most this many of those features per process (a seeded random subset). `None`: no cap.

        > Parameters whose DDPO defaults follow the TDPO-R paper

        per_prompt_stat_tracking (`bool` or `None`, *optional*, defaults to `None`):
            Normalize rewards per prompt (DDPO's tracker). `None` means on in TDPO mode (as the paper) and off in DDPO
            mode (DDPO's default).
        per_prompt_stat_tracking_buffer_size (`int`, *optional*, defaults to `32`):
            Rewards kept per prompt (the paper's 32; DDPO's default is 16).

        > Parameters of large-scale RL (Zhang et al. 2024)

        reward_normalization (`str` or `None`, *optional*, defaults to `None`):
            `"per_prompt"` (DDPO's tracker) or `"batch"` (the large-scale RL paper: the epoch's rewards gathered over
            all processes, non-finite ones dropped and counted, `(r - mean) / (std + 1e-7)`; for prompt sets too large
            for per-prompt statistics). `None`: as `per_prompt_stat_tracking` says. Setting both inconsistently is
            an error.
        prompt_repeats (`int` or `None`, *optional*, defaults to `None`):
            Each drawn prompt is used for this many consecutive samples, so that a batch holds groups of images of
            one prompt (distribution-level rewards compare them). `None`: the reward's `default_prompt_repeats` (4 for
            `diversity`), else 1. Must divide `sample_batch_size * sample_num_batches_per_epoch`.
        multi_task_update (`str`, *optional*, defaults to `"sequential"`):
            With several tasks: `"sequential"` samples each task and updates on its samples in turn, each task
            sampled by the model the previous task's update left (the paper's order, on-policy); `"weighted"` samples
            every task, then updates once on all tasks' samples, each task's policy loss scaled by its weight.
    """

    exp_name: str = field(
        default_factory=lambda: script_name(sys.argv[0]),  # TRL's cuts 3 characters ("tdpo-trl" -> "tdpo-")
        metadata={"help": "Name of this experiment; default: the script's file name without `.py`."},
    )
    # Dict-valued DDPO fields, re-typed so that they accept JSON strings on the command line.
    tracker_kwargs: JSONDict = field(
        default_factory=JSONDict,
        metadata={"help": "Keyword arguments for the tracker (e.g. wandb_project), as a JSON object."},
    )
    accelerator_kwargs: JSONDict = field(
        default_factory=JSONDict,
        metadata={"help": "Keyword arguments for the accelerator, as a JSON object."},
    )
    project_kwargs: JSONDict = field(
        default_factory=JSONDict,
        metadata={
            "help": "Keyword arguments for accelerate's ProjectConfiguration, as a JSON object. Without "
            "`project_dir`, checkpoints go to `<logdir>/<run_name or exp_name>`."
        },
    )
    train_adv_clip_max: Optional[float] = field(
        default=None,
        metadata={
            "help": "Clip advantages to [-x, x]. None: 5.0 in DDPO mode (use_critic=False), no clipping in TDPO mode "
            "(as the paper)."
        },
    )
    train_lr_scheduler: str = field(
        default="constant",
        metadata={
            "help": "Policy learning rate over the epochs: 'constant', 'linear' or 'cosine' (decaying to 0 at "
            "num_epochs; transformers' schedules, stepped once per epoch)."
        },
    )
    train_lr_warmup_epochs: int = field(
        default=0, metadata={"help": "Epochs of linear learning-rate warmup before train_lr_scheduler."}
    )
    train_final_step: Optional[bool] = field(
        default=None,
        metadata={
            "help": "Train on the last denoising step. None: the pipeline family's default: True for SD 1.x / SDXL "
            "(DDIM, as TRL), False for SD3, whose last SDE step (sigma 0.009 -> 0, eta 0.7: std ~0.006, 10-100x below "
            "the other steps') is nearly deterministic (as Flow-GRPO's timestep_fraction 0.99 and DanceGRPO's "
            "ignore_last). "
            "`train_timestep_fraction` then draws from the other steps."
        },
    )

    use_lora: Optional[bool] = field(
        default=None,
        metadata={"help": "Train a LoRA adapter (True) or the whole UNet (False); None keeps the pipeline's setting."},
    )
    lora_rank: int = field(default=4, metadata={"help": "LoRA rank r."})
    lora_alpha: float = field(default=4.0, metadata={"help": "LoRA alpha; the update is scaled by alpha / r."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA adapter's input."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["to_k", "to_q", "to_v", "to_out.0"],
        metadata={"help": "UNet module names that get a LoRA adapter."},
    )
    lora_init: str = field(
        default="gaussian",
        metadata={"help": "LoRA init: 'gaussian' (as TRL's DDPO) or 'default' (PEFT's).", "choices": _LORA_INITS},
    )
    gradient_checkpointing: bool = field(
        default=False,
        metadata={"help": "Recompute the denoiser's activations in the backward pass (less memory, more compute)."},
    )

    resume_as_new_run: bool = field(
        default=False,
        metadata={
            "help": "With resume_from: continue into the run folder that run_name names (it must hold no checkpoints) "
            "instead of the resumed run's own folder."
        },
    )

    use_critic: bool = field(
        default=True,
        metadata={"help": "Train a per-timestep critic and use temporal advantages (TDPO). False runs plain DDPO."},
    )
    critic_encoder: str = field(
        default="openai/clip-vit-large-patch14",
        metadata={
            "help": "What the critic reads: a CLIP vision checkpoint id or path (x_t is VAE-decoded and embedded, as "
            "the paper; shared with the reward when it holds the same checkpoint), or 'latents' (the flattened "
            "latent x_t, no decoding)."
        },
    )
    critic_decoder: str = field(
        default="",
        metadata={
            "help": "Decoder of x_t for an image-reading critic: '' the pipeline's VAE, or an AutoencoderTiny id or "
            "folder (TAESD, e.g. madebyollin/taesd): far cheaper per step; rewards still see the VAE's images."
        },
    )
    critic_hidden_sizes: list[int] = field(
        default_factory=lambda: [1024, 128, 64, 16],
        metadata={"help": "Hidden layer widths of the critic's MLP head."},
    )
    critic_dropout: list[float] = field(
        default_factory=lambda: [0.2, 0.2, 0.1, 0.0],
        metadata={"help": "Dropout after each hidden layer of the critic head; one value per hidden layer."},
    )
    critic_activation: str = field(
        default="none",
        metadata={
            "help": "Nonlinearity between the critic's hidden layers ('none' as the paper).",
            "choices": list(_CRITIC_ACTIVATIONS),
        },
    )
    critic_learning_rate: float = field(default=1e-4, metadata={"help": "Critic AdamW learning rate."})
    critic_adam_beta1: float = field(default=0.9, metadata={"help": "Critic AdamW beta1."})
    critic_adam_beta2: float = field(default=0.999, metadata={"help": "Critic AdamW beta2."})
    critic_adam_weight_decay: float = field(default=1e-4, metadata={"help": "Critic AdamW weight decay."})
    critic_adam_epsilon: float = field(default=1e-8, metadata={"help": "Critic AdamW epsilon."})
    critic_value_clip_range: float = field(
        default=0.2,
        metadata={"help": "Clip new values to old values +- this range in the value loss; 0 turns clipping off."},
    )
    critic_loss_coef: float = field(default=1.0, metadata={"help": "Weight of the critic loss in the total loss."})
    critic_max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient-norm clip for the critic."})
    critic_encode_batch_size: int = field(
        default=32,
        metadata={"help": "Latents decoded and embedded at once when caching critic features after sampling."},
    )
    gamma: float = field(default=1.0, metadata={"help": "Discount factor across denoising steps."})
    normalize_temporal_advantages: bool = field(
        default=True,
        metadata={"help": "Normalize temporal advantages over all (sample, step) entries, across processes."},
    )

    eval_reward_functions: list[str] = field(
        default_factory=list,
        metadata={"help": "Out-of-domain rewards (names or dotted paths) that score every epoch's training samples."},
    )
    eval_freq: int = field(
        default=0, metadata={"help": "Score a fixed held-out prompt set every N epochs; 0 turns it off."}
    )
    eval_prompts: str = field(
        default="simple_animals", metadata={"help": "Held-out prompts: a built-in set, a text file or dataset:<id>."}
    )
    eval_num_prompts: int = field(default=8, metadata={"help": "Number of held-out prompts."})
    eval_seed: int = field(default=0, metadata={"help": "Seed of the held-out prompts and their sampling noise."})

    pretrain_loss_coef: float = field(
        default=0.0, metadata={"help": "Weight of the pretraining (denoising) loss in every policy update; 0: off."}
    )
    pretrain_dataset: str = field(
        default="",
        metadata={"help": "Image-caption data for the pretraining loss: 'digits', 'imagefolder:<dir>' or a dataset."},
    )
    pretrain_dataset_split: str = field(default="train", metadata={"help": "Split of pretrain_dataset."})
    pretrain_image_column: str = field(default="image", metadata={"help": "Image column of pretrain_dataset."})
    pretrain_caption_column: str = field(default="text", metadata={"help": "Caption column of pretrain_dataset."})
    pretrain_batch_size: int = field(default=16, metadata={"help": "Image-caption pairs per policy update."})
    kl_coef: float = field(
        default=0.0,
        metadata={"help": "Weight of the per-step KL to the base model's DDIM transitions; 0: off."},
    )
    kl_penalty: str = field(
        default="loss",
        metadata={
            "help": "'loss': kl_coef * KL added to the policy loss; 'reward': kl_coef * KL_t subtracted from the "
            "reward of every denoising step (computed after sampling).",
            "choices": list(KL_PENALTY_MODES),
        },
    )

    neuron_reset: Optional[bool] = field(
        default=None,
        metadata={
            "help": "Score and periodically reset the critic's neurons. None: on in TDPO mode, off in DDPO mode."
        },
    )
    neuron_reset_frequency: int = field(
        default=10, metadata={"help": "Reset after every N-th epoch (when epoch + 1 is a multiple of N)."}
    )
    neuron_reset_threshold: float = field(
        default=0.0,
        metadata={"help": "Dormant when mean |activation| / layer mean <= this value; active otherwise."},
    )
    neuron_reset_target: str = field(
        default="active",
        metadata={
            "help": "Neurons to reset: 'active' (TDPO-R), 'dormant' (ReDo), 'all', or 'none' (statistics only).",
            "choices": list(_RESET_TARGETS),
        },
    )
    neuron_reset_scoring: str = field(
        default="one_step_per_sample",
        metadata={
            "help": "Critic features scored each epoch: each sample's at one random step (as the official code) or "
            "'all_steps'.",
            "choices": list(SCORING_MODES),
        },
    )
    neuron_reset_scoring_size: Optional[int] = field(
        default=None,
        metadata={"help": "At most this many scored critic features per process (random subset); None: no cap."},
    )
    per_prompt_stat_tracking: Optional[bool] = field(
        default=None,
        metadata={"help": "Normalize rewards per prompt. None: on in TDPO mode (as the paper), off in DDPO mode."},
    )
    per_prompt_stat_tracking_buffer_size: int = field(
        default=32, metadata={"help": "Rewards kept per prompt for its statistics (the paper's 32)."}
    )

    reward_normalization: Optional[str] = field(
        default=None,
        metadata={
            "help": "'per_prompt' or 'batch' (gathered over processes, as the large-scale RL paper). None: as "
            "per_prompt_stat_tracking says.",
            "choices": list(REWARD_NORMALIZATIONS),
        },
    )
    prompt_repeats: Optional[int] = field(
        default=None,
        metadata={
            "help": "Samples per drawn prompt (groups for distribution-level rewards). None: the reward's "
            "default_prompt_repeats, else 1."
        },
    )
    multi_task_update: str = field(
        default="sequential",
        metadata={
            "help": "With several tasks: update task by task ('sequential', the paper) or once with weighted losses.",
            "choices": list(MULTI_TASK_UPDATES),
        },
    )

    def __post_init__(self):
        super().__post_init__()
        for name in _DICT_FIELDS:
            value = getattr(self, name)
            if not isinstance(value, (dict, str)):
                raise ValueError(f"`{name}` must be a dict or a JSON object string, got {value!r}")
            try:
                setattr(self, name, JSONDict(value))
            except ValueError as err:
                raise ValueError(f"`{name}`: {err}") from None

        self._check_accelerator_kwargs()
        if self.train_adv_clip_max is None:
            self.train_adv_clip_max = math.inf if self.use_critic else 5.0
        if self.reward_normalization is not None and self.reward_normalization not in REWARD_NORMALIZATIONS:
            raise ValueError(
                f"`reward_normalization` must be one of {REWARD_NORMALIZATIONS} or None, "
                f"got {self.reward_normalization!r}"
            )
        if self.per_prompt_stat_tracking is None:
            if self.reward_normalization is not None:
                self.per_prompt_stat_tracking = self.reward_normalization == "per_prompt"
            else:
                self.per_prompt_stat_tracking = self.use_critic
        elif self.reward_normalization is not None and self.per_prompt_stat_tracking != (
            self.reward_normalization == "per_prompt"
        ):
            raise ValueError(
                f"`reward_normalization={self.reward_normalization!r}` contradicts "
                f"`per_prompt_stat_tracking={self.per_prompt_stat_tracking}`; set only one of them"
            )
        self.reward_normalization = "per_prompt" if self.per_prompt_stat_tracking else "batch"
        if self.neuron_reset is None:
            self.neuron_reset = self.use_critic
        self._check_values()

    def _check_accelerator_kwargs(self):
        """Keys `accelerate.Accelerator` takes, other than those the trainer sets from other fields."""
        import inspect

        from accelerate import Accelerator

        from_fields = {
            "log_with": "log_with",
            "mixed_precision": "mixed_precision",
            "project_config": "project_kwargs",
        }
        from_fields.update(
            project_dir="project_kwargs", gradient_accumulation_steps="train_gradient_accumulation_steps"
        )
        accepted = set(inspect.signature(Accelerator.__init__).parameters) - {"self"} - set(from_fields)
        for key in self.accelerator_kwargs:
            if key in from_fields:
                raise ValueError(f"`accelerator_kwargs` sets {key!r}; set `{from_fields[key]}` instead")
            if key not in accepted:
                raise ValueError(
                    f"`accelerator_kwargs` has {key!r}, which accelerate.Accelerator does not take; it takes "
                    f"{sorted(accepted)}"
                )

    def _check_values(self):
        positive_ints = (
            "num_epochs",
            "save_freq",
            "sample_num_steps",
            "sample_batch_size",
            "sample_num_batches_per_epoch",
            "train_batch_size",
            "train_gradient_accumulation_steps",
            "train_num_inner_epochs",
            "critic_encode_batch_size",
            "neuron_reset_frequency",
            "lora_rank",
            "eval_num_prompts",
            "pretrain_batch_size",
            "per_prompt_stat_tracking_buffer_size",
            "per_prompt_stat_tracking_min_count",
        )
        for name in positive_ints:
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be >= 1, got {getattr(self, name)}")
        positive_floats = ("train_learning_rate", "critic_learning_rate", "train_clip_range", "train_adv_clip_max")
        for name in positive_floats:
            if not getattr(self, name) > 0:
                raise ValueError(f"`{name}` must be > 0, got {getattr(self, name)}")
        non_negative = ("critic_value_clip_range", "critic_loss_coef", "sample_eta", "pretrain_loss_coef", "kl_coef")
        for name in non_negative:
            if getattr(self, name) < 0:
                raise ValueError(f"`{name}` must be >= 0, got {getattr(self, name)}")
        finite = (*positive_floats, *non_negative, "train_max_grad_norm", "critic_max_grad_norm", "gamma",
                  "sample_guidance_scale", "train_adam_epsilon", "critic_adam_epsilon")  # fmt: skip
        for name in finite:
            value = float(getattr(self, name))
            if math.isnan(value) or (math.isinf(value) and name != "train_adv_clip_max"):
                raise ValueError(f"`{name}` must be a finite number, got {value}")
        if self.num_checkpoint_limit is not None and self.num_checkpoint_limit < 1:
            raise ValueError(
                f"`num_checkpoint_limit` must be None (keep every checkpoint) or >= 1, got {self.num_checkpoint_limit}"
            )
        if self.prompt_repeats is not None:
            per_epoch = self.sample_batch_size * self.sample_num_batches_per_epoch
            if self.prompt_repeats < 1:
                raise ValueError(f"`prompt_repeats` must be None or >= 1, got {self.prompt_repeats}")
            check_prompt_repeats(self.prompt_repeats, per_epoch)
        if self.multi_task_update not in MULTI_TASK_UPDATES:
            raise ValueError(
                f"`multi_task_update` must be one of {MULTI_TASK_UPDATES}, got {self.multi_task_update!r}"
            )
        if self.train_lr_scheduler not in LR_SCHEDULERS:
            raise ValueError(f"`train_lr_scheduler` must be one of {LR_SCHEDULERS}, got {self.train_lr_scheduler!r}")
        if not 0 <= self.train_lr_warmup_epochs < self.num_epochs:
            raise ValueError(
                f"`train_lr_warmup_epochs` must be in [0, num_epochs) = [0, {self.num_epochs}), got "
                f"{self.train_lr_warmup_epochs}"
            )
        if not 0.0 < self.train_timestep_fraction <= 1.0:
            raise ValueError(f"`train_timestep_fraction` must be in (0, 1], got {self.train_timestep_fraction}")
        self.check_num_train_timesteps(self.train_final_step is not False)  # None: the trainer checks the family's
        if not 0.0 <= self.gamma <= 1.0:
            raise ValueError(f"`gamma` must be in [0, 1], got {self.gamma}")
        if self.sample_batch_size % self.train_batch_size != 0:
            raise ValueError(
                f"`sample_batch_size` ({self.sample_batch_size}) must be a multiple of `train_batch_size` "
                f"({self.train_batch_size})"
            )
        num_minibatches = self.sample_batch_size * self.sample_num_batches_per_epoch // self.train_batch_size
        if num_minibatches % self.train_gradient_accumulation_steps != 0:
            raise ValueError(
                f"each process trains on {num_minibatches} minibatches per epoch (`sample_batch_size` "
                f"{self.sample_batch_size} * `sample_num_batches_per_epoch` {self.sample_num_batches_per_epoch} / "
                f"`train_batch_size` {self.train_batch_size}), which is not a multiple of "
                f"`train_gradient_accumulation_steps` ({self.train_gradient_accumulation_steps})"
            )
        if self.critic_activation not in _CRITIC_ACTIVATIONS:
            raise ValueError(
                f"`critic_activation` must be one of {_CRITIC_ACTIVATIONS}, got {self.critic_activation!r}"
            )
        if not self.critic_hidden_sizes or any(size < 1 for size in self.critic_hidden_sizes):
            raise ValueError(
                f"`critic_hidden_sizes` must be a non-empty list of sizes >= 1, got {self.critic_hidden_sizes}"
            )
        if len(self.critic_dropout) != len(self.critic_hidden_sizes):
            raise ValueError(
                f"`critic_dropout` needs one value per hidden layer: {len(self.critic_hidden_sizes)} hidden sizes "
                f"{self.critic_hidden_sizes} but {len(self.critic_dropout)} dropout values {self.critic_dropout}"
            )
        if any(not 0.0 <= p < 1.0 for p in self.critic_dropout):
            raise ValueError(f"`critic_dropout` values must be in [0, 1), got {self.critic_dropout}")
        if self.use_critic:  # no network: a built-in name, a local folder or a well-formed Hub id
            if self.critic_encoder not in CRITIC_ENCODERS:
                check_model_reference(self.critic_encoder, "critic_encoder", list(CRITIC_ENCODERS))
            if self.critic_decoder:
                check_model_reference(self.critic_decoder, "critic_decoder")
        if self.pretrain_loss_coef > 0 and not self.pretrain_dataset:
            raise ValueError(
                f"`pretrain_loss_coef` is {self.pretrain_loss_coef} but `pretrain_dataset` is empty; name the "
                "image-caption data ('digits', 'imagefolder:<dir>' or a dataset id)"
            )
        if self.kl_coef > 0 and self.sample_eta == 0:
            raise ValueError(
                "`kl_coef` > 0 needs stochastic sampling (`sample_eta` > 0): with eta 0 the KL is infinite"
            )
        if self.kl_penalty not in KL_PENALTY_MODES:
            raise ValueError(f"`kl_penalty` must be one of {KL_PENALTY_MODES}, got {self.kl_penalty!r}")
        if self.eval_freq < 0:
            raise ValueError(f"`eval_freq` must be >= 0 (0 turns held-out evaluation off), got {self.eval_freq}")
        if not self.lora_alpha > 0:
            raise ValueError(f"`lora_alpha` must be > 0, got {self.lora_alpha}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"`lora_dropout` must be in [0, 1), got {self.lora_dropout}")
        if not self.lora_target_modules:
            raise ValueError(f"`lora_target_modules` must name at least one module, got {self.lora_target_modules}")
        if self.lora_init not in _LORA_INITS:
            raise ValueError(f"`lora_init` must be one of {_LORA_INITS}, got {self.lora_init!r}")
        if self.neuron_reset and not self.use_critic:
            raise ValueError("`neuron_reset=True` needs a critic, but `use_critic` is False (DDPO mode)")
        if self.neuron_reset_target not in _RESET_TARGETS:
            raise ValueError(
                f"`neuron_reset_target` must be one of {_RESET_TARGETS}, got {self.neuron_reset_target!r}"
            )
        if not math.isfinite(self.neuron_reset_threshold) or self.neuron_reset_threshold < 0:
            raise ValueError(
                f"`neuron_reset_threshold` must be a finite number >= 0, got {self.neuron_reset_threshold}"
            )
        if self.neuron_reset_scoring not in SCORING_MODES:
            raise ValueError(
                f"`neuron_reset_scoring` must be one of {SCORING_MODES}, got {self.neuron_reset_scoring!r}"
            )
        if self.neuron_reset_scoring_size is not None and self.neuron_reset_scoring_size < 1:
            raise ValueError(f"`neuron_reset_scoring_size` must be None or >= 1, got {self.neuron_reset_scoring_size}")
        if self.log_with not in (None, "wandb", "tensorboard"):
            raise ValueError(f"`log_with` must be None, 'wandb' or 'tensorboard', got {self.log_with!r}")

    def lora_config(self):
        """The `peft.LoraConfig` these fields describe."""
        from peft import LoraConfig

        return LoraConfig(
            r=self.lora_rank,
            lora_alpha=self.lora_alpha,
            lora_dropout=self.lora_dropout,
            target_modules=list(self.lora_target_modules),
            init_lora_weights="gaussian" if self.lora_init == "gaussian" else True,
        )

    def num_trainable_steps(self, train_final_step: bool = True) -> int:
        """Denoising steps per trajectory that may be trained on: all, or all but the final one."""
        return self.sample_num_steps - (0 if train_final_step else 1)

    def num_train_timesteps(self, train_final_step: bool = True) -> int:
        """Number of denoising steps per trajectory that are trained on."""
        return int(self.num_trainable_steps(train_final_step) * self.train_timestep_fraction)

    def check_num_train_timesteps(self, train_final_step: bool):
        if self.num_train_timesteps(train_final_step) < 1:
            trainable = "`sample_num_steps`" + ("" if train_final_step else " - 1 (the final step untrained)")
            raise ValueError(
                f"{trainable} * `train_timestep_fraction` = {self.num_trainable_steps(train_final_step)} * "
                f"{self.train_timestep_fraction} trains on no timestep; raise one of them"
            )
