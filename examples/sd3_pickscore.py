# /// script
# requires-python = ">=3.10"
# dependencies = ["tdpo-trl"]
# ///
"""A flow-matching model (SD3, or FLUX.1 with --family flux) + LoRA, trained by TDPO-R on PickScore.

    python examples/sd3_pickscore.py --output_dir outputs/sd3-pickscore                  # a GPU, ~40 GB in bf16
    python examples/sd3_pickscore.py --family flux --output_dir outputs/flux-pickscore   # FLUX.1-dev, one 80 GB GPU
    python examples/sd3_pickscore.py --tiny --output_dir outputs/tiny-sd3                # CPU, 13 s: the same code
    python examples/sd3_pickscore.py --tiny --family flux --output_dir outputs/tiny-flux # 16 s, on tiny random models

Flow-matching models sample with an ODE, which has no log-probability; the wrappers sample each Euler step's SDE
counterpart instead (Flow-GRPO's Gaussian step, `sample_eta` its noise), so the PPO ratio and TDPO-R's per-step critic
work as for DDIM. What differs from `sd_aesthetic.py`, all of it visible below:
- the wrapper (`TDPOStableDiffusion3Pipeline` / `TDPOFluxPipeline`) and its text-encoder settings;
- `sample_eta` > 0 (the SDE's noise), and the last, nearly deterministic step left untrained (the families' default);
- FLUX.1-dev is guidance-distilled: `sample_guidance_scale` (3.5) is its transformer's guidance input, not CFG;
- bf16, gradient checkpointing and (FLUX) T5 kept on the CPU between prompt batches, for memory.
`--tiny` swaps the Hub models for seeded tiny ones (tdpo_trl.tiny_models) so that tests run this file end to end.
"""

import argparse
import os

import torch

from tdpo_trl import TDPOConfig, TDPOFluxPipeline, TDPOStableDiffusion3Pipeline, TDPOTrainer
from tdpo_trl.prompts import PromptSource
from tdpo_trl.rewards import CLIPScore, PickScore


MODELS = {"sd3": "stabilityai/stable-diffusion-3.5-medium", "flux": "black-forest-labs/FLUX.1-dev"}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=sorted(MODELS), default="sd3")
    parser.add_argument("--output_dir", default="outputs/sd3-pickscore")
    parser.add_argument("--num_epochs", type=int, default=100)
    parser.add_argument("--tiny", action="store_true", help="tiny random models instead of the Hub's (tests, CPU)")
    return parser.parse_args()


def build_pipeline(family: str, tiny: bool):
    """The family's wrapper around a diffusers pipeline: LoRA on the transformer's attention."""
    if tiny:
        from tdpo_trl.tiny_models import TINY_T5_LENGTH, tiny_flux, tiny_stable_diffusion_3

        if family == "flux":
            return TDPOFluxPipeline(tiny_flux(), max_sequence_length=TINY_T5_LENGTH)
        return TDPOStableDiffusion3Pipeline(tiny_stable_diffusion_3(), max_sequence_length=16)
    if family == "flux":  # T5-XXL (9.5 GB in bf16) waits on the CPU between prompt batches
        return TDPOFluxPipeline(MODELS["flux"], torch_dtype=torch.bfloat16, offload_text_encoders=True)
    return TDPOStableDiffusion3Pipeline(MODELS["sd3"], torch_dtype=torch.bfloat16)


def main():
    args = parse_args()
    pipeline = build_pipeline(args.family, args.tiny)
    if args.tiny:  # a tiny CLIP model scoring image-text agreement stands in for PickScore
        from tdpo_trl.tiny_models import save_tiny_clip

        folder = save_tiny_clip(os.path.join(args.output_dir, "tiny-clip"))
        reward, clip = CLIPScore(model=folder), folder
    else:
        reward = PickScore()  # human-preference reward: a CLIP-H fine-tuned on Pick-a-Pic
        clip = reward.model_name
    prompts = PromptSource.from_name("simple_animals", seed=0)

    steps = 4 if args.tiny else 28
    config = TDPOConfig(
        num_epochs=args.num_epochs,
        sample_num_steps=steps,
        sample_eta=0.7,  # the SDE's noise level (Flow-GRPO's); 0 would be the ODE, which has no log-prob
        sample_guidance_scale=3.5 if args.family == "flux" else (1.0 if args.tiny else 4.5),
        sample_batch_size=4,
        sample_num_batches_per_epoch=1 if args.tiny else 8,
        train_batch_size=4 if args.tiny else 1,
        train_gradient_accumulation_steps=1 if args.tiny else 8,
        train_learning_rate=3e-2 if args.tiny else 1e-4,
        mixed_precision="no" if args.tiny else "bf16",
        gradient_checkpointing=not args.tiny,
        use_critic=True,  # TDPO-R: a critic on every step's x_t, decoded and embedded by the reward's CLIP image tower
        critic_encoder=clip,  # the reward's checkpoint: its image tower is shared, not loaded twice
        critic_hidden_sizes=[32, 8] if args.tiny else [1024, 128, 64, 16],
        critic_dropout=[0.0, 0.0] if args.tiny else [0.2, 0.2, 0.1, 0.0],
        logdir=os.path.join(args.output_dir, "runs"),
        run_name=f"{args.family}-pickscore",
        save_freq=1 if args.tiny else 10,
    )
    trainer = TDPOTrainer(config, reward, prompts, pipeline)
    trainer.train()  # prints the run summary
    base_model = None if args.tiny else MODELS[args.family]
    saved = trainer.save_pretrained(os.path.join(args.output_dir, "lora"), base_model=base_model)
    print(f"LoRA saved to {saved}; load it with pipe.load_lora_weights({saved!r})")


if __name__ == "__main__":
    main()
