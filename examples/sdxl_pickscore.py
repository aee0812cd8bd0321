# /// script
# requires-python = ">=3.10"
# dependencies = ["tdpo-trl"]
# ///
"""SDXL + LoRA, trained by TDPO-R on PickScore (human preference), judged by the CLIP score it does not train on.

    python examples/sdxl_pickscore.py --output_dir outputs/sdxl-pickscore          # a GPU, ~40 GB in fp16
    python examples/sdxl_pickscore.py --tiny --output_dir outputs/tiny-sdxl         # CPU, 42 s: the same code

SDXL's wrapper adds its second text encoder's pooled embedding and the size/crop time ids to the conditioning; the
rest is the SD 1.x recipe: DDIM steps with a log-prob, classifier-free guidance recomputed in the update
(`train_cfg`), TDPO-R's per-step critic. The critic reads PickScore's own image tower (`critic_encoder` is the reward's
checkpoint: shared, not loaded twice).
`--tiny` swaps the Hub models for seeded tiny ones (tdpo_trl.tiny_models) so that tests run this file end to end.
"""

import argparse
import os

import torch

from tdpo_trl import TDPOConfig, TDPOStableDiffusionXLPipeline, TDPOTrainer
from tdpo_trl.prompts import PromptSource
from tdpo_trl.rewards import CLIPScore, PickScore


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="stabilityai/stable-diffusion-xl-base-1.0")
    parser.add_argument("--output_dir", default="outputs/sdxl-pickscore")
    parser.add_argument("--num_epochs", type=int, default=100)
    parser.add_argument("--tiny", action="store_true", help="tiny random models instead of the Hub's (tests, CPU)")
    return parser.parse_args()


def main():
    args = parse_args()
    if args.tiny:  # tiny SDXL; a tiny CLIP model stands in for PickScore (the reward) and for CLIP-L (the judge)
        from tdpo_trl.tiny_models import save_tiny_clip, tiny_stable_diffusion_xl

        folder = save_tiny_clip(os.path.join(args.output_dir, "tiny-clip"))
        pipeline = TDPOStableDiffusionXLPipeline(tiny_stable_diffusion_xl(), use_lora=True)
        reward, judges = CLIPScore(model=folder), {"clip_score": CLIPScore(model=folder)}
    else:
        pipeline = TDPOStableDiffusionXLPipeline(args.model, use_lora=True, torch_dtype=torch.float16)
        reward, judges = PickScore(), {"clip_score": CLIPScore()}
    prompts = PromptSource.from_name("simple_animals", seed=0)

    config = TDPOConfig(
        num_epochs=args.num_epochs,
        sample_num_steps=4 if args.tiny else 40,
        sample_guidance_scale=5.0,  # classifier-free guidance, recomputed the same way in the update
        sample_batch_size=4,
        sample_num_batches_per_epoch=1 if args.tiny else 8,
        train_batch_size=4 if args.tiny else 1,
        train_gradient_accumulation_steps=1 if args.tiny else 4,
        train_learning_rate=3e-3 if args.tiny else 3e-4,
        mixed_precision="no" if args.tiny else "fp16",
        use_critic=True,
        critic_encoder=reward.model_name,  # PickScore's image tower, shared with the reward
        critic_hidden_sizes=[32, 8] if args.tiny else [1024, 128, 64, 16],
        critic_dropout=[0.0, 0.0] if args.tiny else [0.2, 0.2, 0.1, 0.0],
        eval_freq=1 if args.tiny else 10,
        eval_num_prompts=2 if args.tiny else 32,
        logdir=os.path.join(args.output_dir, "runs"),
        run_name="sdxl-pickscore",
        save_freq=1 if args.tiny else 10,
    )
    trainer = TDPOTrainer(config, reward, prompts, pipeline, eval_reward_functions=judges)
    trainer.train()  # prints the run summary
    saved = trainer.save_pretrained(
        os.path.join(args.output_dir, "lora"), base_model=None if args.tiny else args.model
    )
    print(f"LoRA saved to {saved}; load it with pipe.load_lora_weights({saved!r})")


if __name__ == "__main__":
    main()
