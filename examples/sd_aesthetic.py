# /// script
# requires-python = ">=3.10"
# dependencies = ["tdpo-trl"]
# ///
"""Stable Diffusion 1.5 + LoRA, trained by TDPO-R to raise the LAION aesthetic score without over-optimizing it.

    python examples/sd_aesthetic.py --output_dir outputs/sd-aesthetic                    # a GPU, ~24 GB
    python examples/sd_aesthetic.py --output_dir outputs/sd-aesthetic --push_to_hub you/sd15-tdpo-aesthetic
    python examples/sd_aesthetic.py --tiny --output_dir outputs/tiny-aesthetic           # CPU, 36 s: the same code
                                                                                         # on tiny random models

Everything the run needs is built below in plain sight, in the order a reader meets it:
1. the pipeline (LoRA on the UNet's attention);
2. the reward (the paper's target: the aesthetic score on CLIP ViT-L/14) and the critic, which reads the reward's CLIP
   image tower instead of loading a second copy (the TDPO-R paper's critic);
3. prompts (the paper's 45 simple animals);
4. held-out judges that share nothing with the reward's head (PickScore, CLIP score), and the over-optimization guard
   that watches them;
5. the pretraining (denoising) loss on image-caption pairs, a regularizer from the large-scale RL paper;
6. training, saving in diffusers' LoRA format, and (optionally) the push to the Hub.
`--tiny` swaps the Hub models for seeded tiny ones (tdpo_trl.tiny_models) so that tests run this file end to end.
"""

import argparse
import os

import torch

from tdpo_trl import OverOptimizationGuard, TDPOConfig, TDPOStableDiffusionPipeline, TDPOTrainer, TrackerImageLogger
from tdpo_trl.prompts import PromptSource
from tdpo_trl.rewards import AestheticScore, CLIPScore, PickScore


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="stable-diffusion-v1-5/stable-diffusion-v1-5")
    parser.add_argument("--output_dir", default="outputs/sd-aesthetic")
    parser.add_argument("--num_epochs", type=int, default=100)
    parser.add_argument("--pretrain_dataset", default="", help="image-caption pairs for the pretraining loss ('' off)")
    parser.add_argument("--push_to_hub", default=None, help="a Hub repo id, e.g. you/sd15-tdpo-aesthetic")
    parser.add_argument("--tiny", action="store_true", help="tiny random models instead of the Hub's (tests, CPU)")
    return parser.parse_args()


def tiny_stand_ins(folder: str) -> dict:
    """The tiny models saved as a Hub model would be: SD, a CLIP model (reward and judge), image-caption pairs."""
    from datasets import Dataset
    from PIL import Image

    from tdpo_trl.tiny_models import save_tiny_clip, tiny_stable_diffusion

    tiny_stable_diffusion().save_pretrained(os.path.join(folder, "sd"))
    save_tiny_clip(os.path.join(folder, "clip"))
    images = [Image.new("RGB", (16, 16), (40 * i, 90, 200 - 40 * i)) for i in range(4)]
    Dataset.from_dict({"image": images, "text": ["a photo of a cat"] * 4}).save_to_disk(os.path.join(folder, "pairs"))
    return {
        "model": os.path.join(folder, "sd"),
        "clip": os.path.join(folder, "clip"),
        "pairs": os.path.join(folder, "pairs"),
    }


def main():
    args = parse_args()
    tiny = tiny_stand_ins(os.path.join(args.output_dir, "tiny-models")) if args.tiny else None

    # 1. The pipeline: LoRA (rank 4 on the attention projections) on a diffusers Stable Diffusion.
    pipeline = (
        TDPOStableDiffusionPipeline(tiny["model"], use_lora=True)
        if tiny
        else TDPOStableDiffusionPipeline(args.model, use_lora=True, torch_dtype=torch.float16)
    )

    # 2. The reward, and the critic's encoder: the same CLIP checkpoint, loaded once (the reward lends its tower).
    if tiny:  # a tiny CLIP model scoring image-text agreement stands in for the aesthetic predictor
        reward, clip = CLIPScore(model=tiny["clip"]), tiny["clip"]
    else:
        reward, clip = AestheticScore(), "openai/clip-vit-large-patch14"

    # 3. Prompts: the paper's simple animals, drawn with a seeded RNG (checkpointed: a resume draws the same ones).
    prompts = PromptSource.from_name("simple_animals", seed=0)

    # 4. Held-out judges that share nothing with the reward's head, and the guard that watches them: it keeps the
    #    weights of the last evaluation where no judge fell more than its tolerance, and says so at the end.
    judges = (
        {"clip_score": CLIPScore(model=tiny["clip"])}
        if tiny
        else {"pickscore": PickScore(), "clip_score": CLIPScore()}
    )
    guard = OverOptimizationGuard({name: 0.5 if tiny else 1.0 for name in judges}, action="mark")

    # 5. The configuration: TDPO-R's per-step critic, PPO clipping, the active-neuron reset, the pretraining loss.
    small = dict(sample_num_steps=4, sample_batch_size=4, sample_num_batches_per_epoch=1, train_batch_size=4)
    config = TDPOConfig(
        num_epochs=args.num_epochs,
        **(
            small
            if tiny
            else dict(
                sample_num_steps=50,
                sample_batch_size=8,
                sample_num_batches_per_epoch=4,
                train_batch_size=2,
                train_gradient_accumulation_steps=4,
            )
        ),
        train_learning_rate=3e-4,
        mixed_precision="no" if tiny else "fp16",
        use_critic=True,  # TDPO-R (False: DDPO)
        critic_encoder=clip,  # the reward's CLIP image tower, shared
        critic_hidden_sizes=[32, 8] if tiny else [1024, 128, 64, 16],
        critic_dropout=[0.0, 0.0] if tiny else [0.2, 0.2, 0.1, 0.0],
        neuron_reset=True,
        pretrain_loss_coef=0.1 if (tiny or args.pretrain_dataset) else 0.0,
        pretrain_dataset=tiny["pairs"] if tiny else args.pretrain_dataset,
        pretrain_batch_size=4,
        eval_freq=1 if tiny else 10,  # held-out prompts, sampled and judged every eval_freq epochs
        eval_num_prompts=2 if tiny else 32,
        save_freq=1 if tiny else 10,
        logdir=os.path.join(args.output_dir, "runs"),
        run_name="sd-aesthetic",
        log_with=None if tiny else "tensorboard",
    )

    # 6. Train, save in diffusers' format (pytorch_lora_weights.safetensors + a model card), push if asked.
    trainer = TDPOTrainer(
        config, reward, prompts, pipeline, eval_reward_functions=judges, callbacks=[guard, TrackerImageLogger(every=5)]
    )
    trainer.train()  # prints the run summary: rewards and judges first -> last, the guard's verdict, where things are
    saved = trainer.save_pretrained(os.path.join(args.output_dir, "lora"), base_model=None if tiny else args.model)
    print(f"LoRA saved to {saved}; load it with pipe.load_lora_weights({saved!r})")
    if args.push_to_hub:
        print(f"pushed: {trainer.push_to_hub(args.push_to_hub, base_model=None if tiny else args.model)}")


if __name__ == "__main__":
    main()
