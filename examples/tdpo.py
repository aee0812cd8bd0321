# /// script
# dependencies = ["tdpo-trl"]
# ///
"""Fine-tune a text-to-image diffusion model with TDPO-R (or DDPO with --use_critic false).

Usage:

    # the embedded default: a tiny random Stable-Diffusion-shaped model, ~1 minute on 2 CPU cores, no download
    python examples/tdpo.py

    # Stable Diffusion on a GPU, LoRA, the paper's critic (CLIP ViT-L/14 features)
    python examples/tdpo.py --pretrained_model stable-diffusion-v1-5/stable-diffusion-v1-5 --use_lora \
        --reward aesthetic --eval_reward_functions pickscore --num_epochs 100 --sample_batch_size 8 \
        --train_batch_size 2 --train_gradient_accumulation_steps 2 --mixed_precision fp16

    # two processes on one machine (CPU or GPU)
    torchrun --nproc_per_node 2 examples/tdpo.py     # add ACCELERATE_USE_CPU=1 on CPU

Every `TDPOConfig` field is a flag (`--help` lists them). With `--pretrained_model tiny` the defaults are sized for the
tiny model (see TINY_DEFAULTS); any flag given on the command line still wins.
"""

import sys
from dataclasses import dataclass, field

from transformers import HfArgumentParser

from tdpo_trl import TDPOConfig, TDPOStableDiffusionPipeline, TDPOTrainer
from tdpo_trl.prompts import get_prompt_function
from tdpo_trl.rewards import get_reward_function
from tdpo_trl.tiny_models import (
    TINY_TRAINING_DEFAULTS,
    left_minus_right_brightness,
    mean_brightness,
    tiny_stable_diffusion,
)


TINY_REWARDS = {"brightness": mean_brightness, "left_minus_right": left_minus_right_brightness}

# The tiny model's defaults: the measured TINY_TRAINING_DEFAULTS, full-UNet training, on the reward it can learn.
TINY_DEFAULTS = dict(
    **TINY_TRAINING_DEFAULTS,
    num_epochs=8,
    save_freq=4,
    logdir="outputs",
    reward="left_minus_right",
    use_lora=False,
)


@dataclass
class ScriptArguments:
    pretrained_model: str = field(
        default="tiny",
        metadata={"help": "A diffusers Stable Diffusion model id or folder, or 'tiny' for the embedded tiny model."},
    )
    pretrained_revision: str = field(default="main", metadata={"help": "Hub revision of the model."})
    reward: str = field(
        default="brightness",
        metadata={
            "help": "Reward: 'brightness' or 'left_minus_right' (tiny-model rewards), a name in tdpo_trl.rewards "
            "(aesthetic, pickscore, hpsv2, imagereward, clip_score, jpeg_compressibility, ...), or a dotted path."
        },
    )
    prompts: str = field(
        default="simple_animals",
        metadata={"help": "Prompts: a built-in set, a text file, or dataset:<id> (see tdpo_trl.prompts)."},
    )
    prompt_template: str = field(default="a photo of a {}", metadata={"help": "Format string for each prompt."})


def parse_args(argv=None):
    parser = HfArgumentParser((ScriptArguments, TDPOConfig))
    known, _ = parser.parse_known_args(argv)
    if known.pretrained_model == "tiny":
        parser.set_defaults(**TINY_DEFAULTS)
    return parser.parse_args_into_dataclasses(argv)


def main(script_args: ScriptArguments, config: TDPOConfig) -> TDPOTrainer:
    if script_args.pretrained_model == "tiny":
        model = tiny_stable_diffusion(seed=config.seed)
    else:
        model = script_args.pretrained_model
    # LoRA or full UNet, and the adapter's shape, come from the config (`--use_lora`, `--lora_rank`, ...)
    pipeline = TDPOStableDiffusionPipeline(model, pretrained_model_revision=script_args.pretrained_revision)
    trainer = TDPOTrainer(
        config,
        reward_function=TINY_REWARDS.get(script_args.reward) or get_reward_function(script_args.reward),
        prompt_function=get_prompt_function(
            script_args.prompts, template=script_args.prompt_template, seed=config.seed
        ),
        sd_pipeline=pipeline,
    )
    trainer.train()

    if trainer.accelerator.is_main_process:
        nan = float("nan")
        print(
            f"\n{'epoch':>5} {'reward/mean':>12} {'reward/std':>11} {'policy/approx_kl':>17} {'critic/loss':>12} "
            f"{'dormant':>8} {'resets':>7}"
        )
        for record in trainer.log_history:
            print(
                f"{record['epoch']:>5} {record['reward/mean']:>12.4f} {record['reward/std']:>11.4f} "
                f"{record['policy/approx_kl']:>17.2e} {record.get('critic/loss', nan):>12.4f} "
                f"{record.get('neurons/dormant_fraction', nan):>8.3f} {record.get('neurons/reset_count', 0):>7}"
            )
        print(f"checkpoints: {trainer.accelerator.project_configuration.project_dir}/checkpoints")
    return trainer


if __name__ == "__main__":
    main(*parse_args(sys.argv[1:]))
