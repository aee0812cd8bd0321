# /// script
# requires-python = ">=3.10"
# dependencies = ["tdpo-trl"]
# ///
"""One LoRA, several rewards on several prompt sets at once (multi-task joint training, Zhang et al. 2024).

    python examples/multi_task.py --output_dir outputs/multi-task            # SD 1.5, a GPU
    python examples/multi_task.py --tiny --output_dir outputs/tiny-tasks     # CPU, 38 s: the same code, tiny models

Each `Task` pairs a reward with the prompts it is meant for (here: aesthetics on animals, text-image agreement on
scenes). Every epoch samples every task; rewards are normalized per task, so a reward on a larger scale does not
drown the others, and TDPO-R's critic has one value output per task. `weight` scales a task's policy loss.
Metrics are logged per task (`task/<name>/reward/mean`). The same tasks can be written as a YAML file for
`tdpo-trl train --tasks` (docs/multi_task.md).
`--tiny` swaps the Hub models for seeded tiny ones and the rewards for two tiny ones the tiny model can learn.
"""

import argparse
import os

import torch

from tdpo_trl import Task, TDPOConfig, TDPOStableDiffusionPipeline, TDPOTrainer
from tdpo_trl.prompts import PromptSource
from tdpo_trl.rewards import AestheticScore, CLIPScore


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="stable-diffusion-v1-5/stable-diffusion-v1-5")
    parser.add_argument("--output_dir", default="outputs/multi-task")
    parser.add_argument("--num_epochs", type=int, default=100)
    parser.add_argument("--tiny", action="store_true", help="tiny random models instead of the Hub's (tests, CPU)")
    return parser.parse_args()


def main():
    args = parse_args()
    if args.tiny:
        from tdpo_trl.tiny_models import left_minus_right_brightness, mean_brightness, tiny_stable_diffusion

        pipeline = TDPOStableDiffusionPipeline(tiny_stable_diffusion(), use_lora=True)
        rewards = {"bright": mean_brightness, "left": left_minus_right_brightness}
    else:
        pipeline = TDPOStableDiffusionPipeline(args.model, use_lora=True, torch_dtype=torch.float16)
        rewards = {"aesthetic": AestheticScore(), "agreement": CLIPScore()}

    # One task per reward, each with its own prompts (seeded, checkpointed) and a weight on its policy loss.
    first, second = rewards
    tasks = [
        Task(first, rewards[first], PromptSource.from_name("simple_animals", seed=1), weight=1.0),
        Task(
            second,
            rewards[second],
            PromptSource(["a red car on a bridge", "a lighthouse at night", "two cats on a sofa"], seed=2),
            weight=0.5,
        ),  # fmt: skip
    ]
    config = TDPOConfig(
        num_epochs=args.num_epochs,
        sample_num_steps=4 if args.tiny else 50,
        sample_batch_size=4 if args.tiny else 8,
        sample_num_batches_per_epoch=1 if args.tiny else 4,  # per task
        train_batch_size=4 if args.tiny else 2,
        train_learning_rate=3e-3 if args.tiny else 3e-4,
        mixed_precision="no" if args.tiny else "fp16",
        multi_task_update="weighted",  # one update on all tasks' samples ("sequential": task by task, the paper's)
        critic_encoder="latents",
        critic_hidden_sizes=[32, 8] if args.tiny else [256, 64, 16],
        critic_dropout=[0.0, 0.0] if args.tiny else [0.1, 0.1, 0.0],
        logdir=os.path.join(args.output_dir, "runs"),
        run_name="multi-task",
        save_freq=1 if args.tiny else 10,
    )
    trainer = TDPOTrainer(config, None, None, pipeline, tasks=tasks)  # tasks instead of one reward and prompt source
    trainer.train()  # prints each task's reward first -> last
    saved = trainer.save_pretrained(
        os.path.join(args.output_dir, "lora"), base_model=None if args.tiny else args.model
    )
    print(f"LoRA saved to {saved}; load it with pipe.load_lora_weights({saved!r})")


if __name__ == "__main__":
    main()
