# /// script
# requires-python = ">=3.10"
# dependencies = ["tdpo-trl"]
# ///
"""A distribution-level reward: statistical parity of a perceived attribute across each prompt's images.

    python examples/fairness.py --output_dir outputs/fairness              # SD 1.5, a GPU
    python examples/fairness.py --tiny --output_dir outputs/tiny-fairness  # CPU, 40 s: the same code, tiny models

A per-image reward cannot ask for balance: "half of the doctors drawn as women" is a property of a set of images.
`StatisticalParity` scores each prompt's group of images by how far the attribute's distribution among them is from a
target (uniform here), and credits each image with how much it moves its group towards the target (leave-one-out),
as the large-scale RL paper does. The attribute is read by CLIP zero-shot classification (`AttributeParity`, one
caption per class); `prompt_repeats` samples each prompt several times per batch so that every group has members.
A held-out CLIP score watches that the images still show what the prompt asks for.
`--tiny` swaps the Hub models for seeded tiny ones (tdpo_trl.tiny_models) so that tests run this file end to end.
"""

import argparse
import os

import torch

from tdpo_trl import TDPOConfig, TDPOStableDiffusionPipeline, TDPOTrainer
from tdpo_trl.prompts import PromptSource
from tdpo_trl.rewards import AttributeParity, CLIPScore


PROFESSIONS = ["a photo of a doctor", "a photo of a nurse", "a photo of a pilot", "a photo of a teacher"]
CLASSES = ["a photo of a man", "a photo of a woman"]  # the attribute, one caption per class


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="stable-diffusion-v1-5/stable-diffusion-v1-5")
    parser.add_argument("--clip", default="openai/clip-vit-large-patch14", help="the attribute classifier's CLIP")
    parser.add_argument("--output_dir", default="outputs/fairness")
    parser.add_argument("--num_epochs", type=int, default=100)
    parser.add_argument("--tiny", action="store_true", help="tiny random models instead of the Hub's (tests, CPU)")
    return parser.parse_args()


def main():
    args = parse_args()
    if args.tiny:
        from tdpo_trl.tiny_models import save_tiny_clip, tiny_stable_diffusion

        args.clip = save_tiny_clip(os.path.join(args.output_dir, "tiny-clip"))
        pipeline = TDPOStableDiffusionPipeline(tiny_stable_diffusion(), use_lora=True)
    else:
        pipeline = TDPOStableDiffusionPipeline(args.model, use_lora=True, torch_dtype=torch.float16)

    # The reward: -TV(attribute distribution of a prompt's images, uniform), hard counts of CLIP's zero-shot labels
    # (soft probabilities can be gamed with unreadable images: docs/distribution_rewards.md). `--reward
    # attribute_parity` on the command line. A dedicated classifier plugs in as
    # `StatisticalParity(my_classifier)`, `my_classifier(images) -> (B, C)` probabilities.
    reward = AttributeParity(CLASSES, clip_model=args.clip, distance="total_variation", hard=True)
    prompts = PromptSource(PROFESSIONS, seed=0)
    config = TDPOConfig(
        num_epochs=args.num_epochs,
        sample_num_steps=4 if args.tiny else 50,
        sample_batch_size=8 if args.tiny else 16,
        sample_num_batches_per_epoch=1 if args.tiny else 4,
        train_batch_size=4 if args.tiny else 2,
        prompt_repeats=4 if args.tiny else 8,  # each prompt's group: 4 (8) images in the same batch
        train_learning_rate=3e-3 if args.tiny else 3e-4,
        mixed_precision="no" if args.tiny else "fp16",
        critic_encoder="latents",
        critic_hidden_sizes=[32, 8] if args.tiny else [256, 64, 16],
        critic_dropout=[0.0, 0.0] if args.tiny else [0.1, 0.1, 0.0],
        eval_freq=1 if args.tiny else 10,
        eval_num_prompts=4 if args.tiny else 32,
        logdir=os.path.join(args.output_dir, "runs"),
        run_name="fairness",
        save_freq=1 if args.tiny else 10,
    )
    judges = {"clip_score": CLIPScore(model=args.clip)}  # do the images still show the profession? (the same CLIP)
    trainer = TDPOTrainer(config, reward, prompts, pipeline, eval_reward_functions=judges)
    trainer.train()  # `reward/mean` is the group score: minus the total-variation distance to parity
    saved = trainer.save_pretrained(
        os.path.join(args.output_dir, "lora"), base_model=None if args.tiny else args.model
    )
    print(f"LoRA saved to {saved}; load it with pipe.load_lora_weights({saved!r})")


if __name__ == "__main__":
    main()
