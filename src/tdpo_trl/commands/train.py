"""`tdpo-trl train`: fine-tune a text-to-image diffusion model with TDPO-R (or DDPO with `--use_critic false`).

    # the embedded tiny random model, 16 s on 2 CPU cores, no download
    tdpo-trl train

    # the shipped digits model on the learned ink reward (what `tdpo-trl demo` runs, without its report)
    tdpo-trl train --pretrained_model digits --reward digit_ink --prompts digits

    # fairness: a uniform digit distribution for a prompt that names no digit (a distribution-level reward)
    echo "a handwritten digit" > prompts.txt
    tdpo-trl train --pretrained_model digits --reward digit_parity --prompts prompts.txt

    # Stable Diffusion on a GPU, LoRA, the paper's critic (CLIP ViT-L/14 features)
    tdpo-trl train --pretrained_model stable-diffusion-v1-5/stable-diffusion-v1-5 --use_lora \\
        --reward aesthetic --eval_reward_functions pickscore --num_epochs 100 --sample_batch_size 8 \\
        --train_batch_size 2 --train_gradient_accumulation_steps 2 --mixed_precision fp16

Every `TDPOConfig` field is a flag (`--help` lists them). `--pretrained_model tiny` and `digits` come with defaults
sized for them (`TINY_DEFAULTS`, `DIGITS_DEFAULTS`); any flag given on the command line still wins. Per-epoch
metrics are appended to `<project_dir>/metrics.jsonl`.
"""

import importlib.util
import json
import os
from dataclasses import dataclass, field
from typing import Optional

from transformers import HfArgumentParser

from ..guard import OverOptimizationGuard
from ..hub import check_repo_id
from ..image_logging import TrackerImageLogger
from ..loading import check_model_reference, load_pretrained
from ..pipelines import TDPOStableDiffusionPipeline, TDPOStableDiffusionXLPipeline, family_for
from ..prompts import check_template, get_prompt_function
from ..rewards import REWARD_FUNCTIONS, get_reward_function, is_distribution_reward
from ..run_summary import write_run_summary
from ..scoring import shown_reward_key
from ..tasks import load_tasks
from ..tdpo_config import JSONDict, TDPOConfig
from ..tdpo_trainer import TDPOTrainer
from ..tiny_models import (
    TINY_TRAINING_DEFAULTS,
    tiny_stable_diffusion,
    tiny_stable_diffusion_xl,
)
from ..trainer_callback import JSONLinesLoggerCallback
from ..validation import check_writable_folder, field_errors
from .cli import one_line_errors


# The tiny random model: the measured TINY_TRAINING_DEFAULTS, full-UNet training, on the reward it can learn.
TINY_DEFAULTS = dict(
    **TINY_TRAINING_DEFAULTS, num_epochs=8, save_freq=4, logdir="outputs", reward="left_minus_right", use_lora=False
)

# The shipped digits model (`tdpo_trl.digits`): LoRA r=4 at a high learning rate, DDIM 10 steps with eta 1, CFG 5,
# 32 samples per epoch, a critic on the 4x8x8 latents. Without regularizers these settings over-optimize the learned
# ink reward within minutes on 2 CPU cores (prompted digits turn into other digits, strokes thicken); the recipe
# below (the best found, docs/overoptimization.md) adds the pretraining loss on the training digits (beta 1, 4 pairs
# per update) and a clip range of 2e-3 (at the DDPO default 1e-4, 80-90% of the steps were clipped and the gain
# stalled). Per-prompt reward statistics are off: 30 prompts and 32 samples per epoch give about one sample per prompt
# per epoch, so the paper's 32-sample buffer would span ~30 epochs of a moving policy.
DIGITS_DEFAULTS = dict(
    reward="digit_ink",
    prompts="digits",
    prompt_template="{}",
    num_epochs=80,
    save_freq=20,
    logdir="outputs",
    use_lora=True,
    lora_rank=4,
    lora_alpha=4.0,
    train_learning_rate=5e-3,
    train_clip_range=2e-3,
    pretrain_loss_coef=1.0,
    pretrain_dataset="digits",
    pretrain_batch_size=4,
    per_prompt_stat_tracking=False,
    sample_num_steps=10,
    sample_eta=1.0,
    sample_guidance_scale=5.0,
    sample_batch_size=16,
    sample_num_batches_per_epoch=2,
    train_batch_size=16,
    mixed_precision="no",
    critic_encoder="latents",
    critic_hidden_sizes=[64, 16],
    critic_dropout=[0.0, 0.0],
    critic_learning_rate=1e-3,
    eval_reward_functions=["digit_accuracy", "digit_realism", "digit_nearest_real", "digit_stroke_mass"],
    eval_prompts="digits",
)
# the tiny SDXL learns the tiny reward without guidance and with a larger step (tests/test_sdxl.py)
TINY_SDXL_DEFAULTS = {**TINY_DEFAULTS, "sample_guidance_scale": 1.0, "train_learning_rate": 5e-3}
MODEL_DEFAULTS = {"tiny": TINY_DEFAULTS, "tiny-sdxl": TINY_SDXL_DEFAULTS, "digits": DIGITS_DEFAULTS}

# A distribution-level reward (`--reward digit_parity`, `diversity`, ...) is measured on the training prompts: they
# become the held-out prompts (unless `--eval_prompts` says otherwise), drawn often enough to estimate a distribution.
DISTRIBUTION_DEFAULTS = dict(eval_num_prompts=64, eval_freq=10)
# On digits each distribution reward is also judged by a metric that shares nothing with it (the scikit-learn
# classifier's class counts for parity, pixel-space variety for diversity); prompts that name digits (the built-in
# `digits` set) are judged for prompted-digit accuracy too, by both classifiers.
DIGITS_DISTRIBUTION_EVALS = ["digit_realism", "digit_nearest_real", "digit_stroke_mass"]
DIGITS_INDEPENDENT_JUDGES = {"digit_parity": "digit_parity_independent", "digit_diversity": "digit_pixel_diversity"}
DIGITS_SKLEARN_JUDGES = {"digit_parity_independent", "digit_accuracy_independent"}
# Per distribution reward on digits, what the measured recipe changes (docs/distribution_rewards.md). Parity: the
# pretraining loss off (it pulls towards the base model's 4s), 120 epochs and a cosine decay of the learning rate (at a
# constant rate the class shares kept overshooting: held-out TV swung between 0.08 and 0.35 from one evaluation to the
# next; independent-judge TV over seeds 0.12-0.29 with the decay, 0.25-0.33 without). Diversity: clip range 5e-3 (the
# reward itself brings its groups of 8 and its accuracy term, `DigitDiversity`).
DIGITS_DISTRIBUTION_RECIPES = {
    "digit_parity": dict(pretrain_loss_coef=0.0, num_epochs=120, train_lr_scheduler="cosine"),
    "digit_diversity": dict(train_clip_range=5e-3),
}


def digits_distribution_judges(reward: str, prompts: str) -> list[str]:
    """The held-out judges `tdpo-trl train --pretrained_model digits` sets for a distribution-level `reward`."""
    judges = [DIGITS_INDEPENDENT_JUDGES[reward]] if reward in DIGITS_INDEPENDENT_JUDGES else []
    if prompts == "digits":
        judges += ["digit_accuracy", "digit_accuracy_independent"]
    judges += DIGITS_DISTRIBUTION_EVALS
    if importlib.util.find_spec("sklearn") is None:
        judges = [judge for judge in judges if judge not in DIGITS_SKLEARN_JUDGES]
    return judges


@dataclass
class ScriptArguments:
    pretrained_model: str = field(
        default="tiny",
        metadata={
            "help": "A diffusers Stable Diffusion (1.x/2.x), SDXL or SD3 model id or folder (the family is read from "
            "its model_index.json); 'digits' for the shipped 16x16 digits model; 'tiny' / 'tiny-sdxl' for the "
            "embedded tiny random SD / SDXL models."
        },
    )
    pretrained_revision: str = field(default="main", metadata={"help": "Hub revision of the model."})
    reward: str = field(
        default="brightness",
        metadata={
            "help": "Reward: a name in tdpo_trl.rewards (aesthetic, pickscore, hpsv2, imagereward, clip_score, "
            "jpeg_compressibility, digit_ink, ...), 'brightness' or 'left_minus_right' (tiny-model rewards), or a "
            "dotted path ('my_package.rewards:my_reward')."
        },
    )
    reward_kwargs: JSONDict = field(
        default_factory=JSONDict,
        metadata={
            "help": "Keyword arguments for the reward's constructor, as JSON: "
            "--reward_kwargs '{\"min_confidence\": 0.9}'."
        },
    )
    prompts: str = field(
        default="simple_animals",
        metadata={"help": "Prompts: a built-in set (simple_animals, digits), a text file, or dataset:<id>."},
    )
    prompt_template: str = field(default="a photo of a {}", metadata={"help": "Format string for each prompt."})
    tasks: Optional[str] = field(
        default=None,
        metadata={
            "help": "A JSON or YAML tasks file for multi-task joint training (tdpo_trl.tasks.load_tasks); replaces "
            "--reward and --prompts."
        },
    )
    save_dir: Optional[str] = field(
        default=None,
        metadata={"help": "Where to save the final LoRA (diffusers format), critic and model card; None: skip."},
    )
    hub_model_id: Optional[str] = field(
        default=None,
        metadata={
            "help": "With --push_to_hub true: the Hub repo (user/name) the trained LoRA, critic and model card go to "
            "after training (saved first to --save_dir, or <run folder>/hub/<name>)."
        },
    )
    guard: JSONDict = field(
        default_factory=JSONDict,
        metadata={
            "help": "Over-optimization guard (tdpo_trl.OverOptimizationGuard), as JSON {judge: allowed drop below its "
            "start}, judges among --eval_reward_functions, e.g. --guard '{\"digit_accuracy\": 0.05}'; needs "
            "--eval_freq > 0. The saved weights are then those of the best held-out evaluation within tolerance."
        },
    )
    guard_action: str = field(
        default="mark",
        metadata={"help": "What the guard does on a flagged evaluation: 'mark' (train on) or 'stop'."},
    )
    guard_lower_is_better: list[str] = field(
        default_factory=list, metadata={"help": "Guard judges for which lower is better (e.g. a distance)."}
    )
    guard_task: Optional[str] = field(
        default=None,
        metadata={"help": "With --tasks: the task whose held-out evaluation the guard watches (its name)."},
    )
    log_images_every: int = field(
        default=1,
        metadata={
            "help": "With --log_with: every N epochs, send the tracker a grid of the epoch's samples (prompt and "
            "reward under each) and the held-out grid (TrackerImageLogger); 0 logs no images."
        },
    )

    def __post_init__(self):
        check_model_reference(self.pretrained_model, "pretrained_model", tuple(MODEL_DEFAULTS))
        check_template(self.prompt_template, "prompt_template")
        if self.log_images_every < 0:
            raise ValueError(f"`log_images_every` must be >= 0 (0: no images), got {self.log_images_every}")
        unknown = sorted(set(self.guard_lower_is_better) - set(self.guard))
        if unknown:
            raise ValueError(
                f"`guard_lower_is_better` names {unknown}, which `guard` does not watch; expected some of "
                f"{sorted(self.guard)}"
            )
        with field_errors("guard"):  # the guard checks its tolerances and action
            self.over_optimization_guard()
        if self.hub_model_id is not None:
            with field_errors("hub_model_id"):
                check_repo_id(self.hub_model_id)

    def over_optimization_guard(self) -> Optional[OverOptimizationGuard]:
        """The `OverOptimizationGuard` that `--guard` describes; None without one."""
        if not self.guard:
            return None
        return OverOptimizationGuard(
            self.guard, self.guard_action, tuple(self.guard_lower_is_better), task=self.guard_task
        )


def default_config(model: str = "digits", **overrides) -> TDPOConfig:
    """The `TDPOConfig` that `tdpo-trl train --pretrained_model <model>` starts from, with `overrides`."""
    fields = {k: v for k, v in MODEL_DEFAULTS[model].items() if k in TDPOConfig.__dataclass_fields__}
    return TDPOConfig(**{**fields, **overrides})


def parse_args(argv: Optional[list[str]] = None, defaults: Optional[dict] = None):
    """`(ScriptArguments, TDPOConfig)` from the command line, on the defaults of `--pretrained_model`."""
    parser = one_line_errors(HfArgumentParser((ScriptArguments, TDPOConfig)))
    parser.prog = "tdpo-trl train"
    known, _ = parser.parse_known_args(argv)
    parser.set_defaults(**MODEL_DEFAULTS.get(known.pretrained_model, {}), **(defaults or {}))
    known, _ = parser.parse_known_args(argv)  # the reward and prompts the model's defaults name
    if is_distribution_reward(REWARD_FUNCTIONS.get(known.reward)):
        parser.set_defaults(eval_prompts=known.prompts, **DISTRIBUTION_DEFAULTS)
        if known.pretrained_model == "digits":
            parser.set_defaults(
                eval_reward_functions=digits_distribution_judges(known.reward, known.prompts),
                **DIGITS_DISTRIBUTION_RECIPES.get(known.reward, {}),
            )
    return parser.parse_args_into_dataclasses(argv)


def model_family(reference: str, revision: str = "main"):
    """The wrapper class that trains the diffusers pipeline `reference` names in its model_index.json."""
    from diffusers import DiffusionPipeline

    config = load_pretrained(DiffusionPipeline.load_config, reference, "pretrained_model", revision=revision)
    try:
        return family_for(config.get("_class_name"))
    except ValueError as err:
        raise ValueError(f"`pretrained_model` {reference!r}: {err}") from None


def load_pipeline(script_args: ScriptArguments, config: TDPOConfig) -> TDPOStableDiffusionPipeline:
    # LoRA or full UNet, and the adapter's shape, come from the config (`--use_lora`, `--lora_rank`, ...)
    if script_args.pretrained_model == "tiny":
        return TDPOStableDiffusionPipeline(tiny_stable_diffusion(seed=config.seed))
    if script_args.pretrained_model == "tiny-sdxl":
        return TDPOStableDiffusionXLPipeline(tiny_stable_diffusion_xl(seed=config.seed))
    if script_args.pretrained_model == "digits":
        from ..digits import load_digits_pipeline

        return TDPOStableDiffusionPipeline(load_digits_pipeline())
    revision = script_args.pretrained_revision
    family = model_family(script_args.pretrained_model, revision)
    return family(script_args.pretrained_model, pretrained_model_revision=revision)


def build_trainer(script_args: ScriptArguments, config: TDPOConfig, pipeline=None) -> TDPOTrainer:
    if script_args.tasks:
        with field_errors("tasks"):
            tasks = load_tasks(script_args.tasks, seed=config.seed)
        if script_args.save_dir:
            check_writable_folder(script_args.save_dir, "save_dir")
        trainer = TDPOTrainer(config, None, None, pipeline or load_pipeline(script_args, config), tasks=tasks)
        return add_callbacks(trainer, script_args, config)
    with field_errors("reward"):
        reward_function = get_reward_function(script_args.reward, **script_args.reward_kwargs)
    with field_errors("prompts"):
        prompt_function = get_prompt_function(
            script_args.prompts, template=script_args.prompt_template, seed=config.seed
        )
    if script_args.save_dir:
        check_writable_folder(script_args.save_dir, "save_dir")
    trainer = TDPOTrainer(
        config,
        reward_function=reward_function,
        prompt_function=prompt_function,
        sd_pipeline=pipeline or load_pipeline(script_args, config),
    )
    return add_callbacks(trainer, script_args, config)


def add_callbacks(trainer: TDPOTrainer, script_args: ScriptArguments, config: TDPOConfig) -> TDPOTrainer:
    """The per-epoch JSONL log, the tracker's images (with `--log_with`), and the guard `--guard` asks for (checked
    against the evaluation it reads)."""
    trainer.add_callback(JSONLinesLoggerCallback(os.path.join(trainer.accelerator.project_dir, "metrics.jsonl")))
    if config.log_with and script_args.log_images_every:
        trainer.add_callback(TrackerImageLogger(every=script_args.log_images_every))
    guard = script_args.over_optimization_guard()
    if guard is None:
        return trainer
    names = [task.name for task in trainer.tasks]
    if trainer.multi_task and script_args.guard_task not in names:
        raise ValueError(
            f"--guard {json.dumps(script_args.guard)} watches one task's held-out evaluation: set --guard_task to "
            f"one of {names}, got {script_args.guard_task!r}"
        )
    if not config.eval_freq:
        raise ValueError(f"--guard {json.dumps(script_args.guard)} reads the held-out evaluation: set --eval_freq > 0")
    unknown = sorted(set(script_args.guard) - set(trainer.eval_reward_functions))
    if unknown:
        raise ValueError(
            f"--guard judges {unknown} are not among --eval_reward_functions {sorted(trainer.eval_reward_functions)}"
        )
    trainer.add_callback(guard)
    return trainer


def print_history(trainer: TDPOTrainer):
    nan = float("nan")
    if trainer.multi_task:
        names = [task.name for task in trainer.tasks]
        print(f"\n{'epoch':>5} " + " ".join(f"{name[:14]:>14}" for name in names) + "  (reward per task)")
        for record in trainer.log_history:
            rewards = [record[shown_reward_key(record, f"task/{name}/")] for name in names]
            print(f"{record['epoch']:>5} " + " ".join(f"{reward:>14.4f}" for reward in rewards))
        return
    key = shown_reward_key(trainer.log_history[0]) if trainer.log_history else "reward/mean"
    header = "group_score" if key == "reward/group_score" else key
    print(
        f"\n{'epoch':>5} {header:>12} {'reward/std':>11} {'policy/approx_kl':>17} {'critic/loss':>12} "
        f"{'dormant':>8} {'resets':>7}"
    )
    for record in trainer.log_history:
        print(
            f"{record['epoch']:>5} {record[key]:>12.4f} {record['reward/std']:>11.4f} "
            f"{record['policy/approx_kl']:>17.2e} {record.get('critic/loss', nan):>12.4f} "
            f"{record.get('neurons/dormant_fraction', nan):>8.3f} {record.get('neurons/reset_count', 0):>7}"
        )


def main(script_args: ScriptArguments, config: TDPOConfig) -> TDPOTrainer:
    if config.push_to_hub and not script_args.hub_model_id:
        raise ValueError("`push_to_hub` is true but no `hub_model_id` names the repo to push to (e.g. user/my-lora)")
    if script_args.hub_model_id and not config.push_to_hub:
        raise ValueError(f"`hub_model_id` is {script_args.hub_model_id!r} but `push_to_hub` is false; set it true")
    trainer = build_trainer(script_args, config)
    trainer.train()
    if script_args.save_dir:
        trainer.save_pretrained(script_args.save_dir)
        write_run_summary(trainer, saved_to=script_args.save_dir, show=False)  # the summary names the saved folder
    if config.push_to_hub:  # saves again (into --save_dir if given), then uploads; a failure keeps the files
        url = trainer.push_to_hub(script_args.hub_model_id, local_dir=script_args.save_dir)
        if trainer.accelerator.is_main_process:
            print(f"pushed:      {url}")
    if trainer.accelerator.is_main_process:
        print_history(trainer)
        project_dir = trainer.accelerator.project_dir
        print(f"checkpoints: {project_dir}/checkpoints\nmetrics:     {project_dir}/metrics.jsonl")
        if script_args.save_dir:
            print(f"saved:       {script_args.save_dir}")
        print(f"summary:     {project_dir}/summary.json")
    return trainer


def cli(argv: Optional[list[str]] = None) -> TDPOTrainer:
    return main(*parse_args(argv))
