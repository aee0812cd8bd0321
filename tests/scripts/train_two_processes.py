"""Train the tiny pipeline on every process and save each rank's trainable weights, for comparison across ranks.

Run: ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 tests/scripts/train_two_processes.py OUT_DIR \
        {tdpo,ddpo,multitask,sdxl,sd3,flux} [EPOCHS] [RUN_NAME] [--resume]
Writes OUT_DIR/<RUN_NAME>_rank<i>.safetensors (RUN_NAME defaults to the mode). `multitask`: TDPO-R on two tasks, a
per-image reward and a distribution-level one (diversity, its prompt groups gathered over the ranks). `sdxl`, `sd3`:
TDPO-R on the tiny SDXL / SD3 pipeline.
"""

import os
import sys

import torch
from safetensors.torch import save_file

from tdpo_trl import (
    Diversity,
    Task,
    TDPOConfig,
    TDPOStableDiffusion3Pipeline,
    TDPOStableDiffusionPipeline,
    TDPOStableDiffusionXLPipeline,
    TDPOTrainer,
)
from tdpo_trl.prompts import PromptSource
from tdpo_trl.tiny_models import (
    left_minus_right_brightness,
    tiny_stable_diffusion,
    tiny_stable_diffusion_3,
    tiny_stable_diffusion_xl,
)


def pixels(images):  # a frozen "encoder" for the diversity reward: the flattened 4x4-pooled image
    return torch.nn.functional.adaptive_avg_pool2d(images, 4).flatten(1)


def two_tasks():
    return [
        Task("left", left_minus_right_brightness, PromptSource(["a photo of a cat", "a photo of a dog"], seed=1)),
        Task("diverse", Diversity(pixels), PromptSource(["a cow", "a pig"], seed=2), weight=0.5),
    ]


def main(out_dir: str, mode: str, epochs: int = 2, run_name: str = "", resume: bool = False):
    torch.set_num_threads(1)
    run_name = run_name or mode
    config = TDPOConfig(
        num_epochs=epochs,
        sample_num_steps=4,
        sample_batch_size=4,
        sample_num_batches_per_epoch=1,
        train_batch_size=2,
        train_learning_rate=3e-3,
        mixed_precision="no",
        use_critic=mode != "ddpo",
        critic_encoder="latents",
        critic_hidden_sizes=[32, 8],
        critic_dropout=[0.1, 0.0],  # dropout draws differ per rank; the all-reduced gradients must not
        logdir=os.path.join(out_dir, "logs"),
        run_name=run_name,
        resume_from=os.path.join(out_dir, "logs", run_name) if resume else "",
        save_freq=1,  # checkpoint on every rank every epoch: TRL's rank-0-only save_state deadlocks here
        neuron_reset_frequency=1,  # reset the critic's active neurons after every epoch (TDPO mode only)
        neuron_reset_threshold=0.8,  # masks that depend on the data: each rank sees other samples
        prompt_repeats=2 if mode == "multitask" else None,  # prompts in pairs; groups span ranks
        eval_reward_functions=["jpeg_compressibility"],  # gathered over ranks every epoch
        eval_freq=2,  # held-out sampling after epoch 1: must neither deadlock nor change training
        eval_num_prompts=2,
        seed=0,
    )
    if mode == "sdxl":
        pipeline = TDPOStableDiffusionXLPipeline(tiny_stable_diffusion_xl())
    elif mode == "sd3":
        pipeline = TDPOStableDiffusion3Pipeline(tiny_stable_diffusion_3(), max_sequence_length=16)
    elif mode == "flux":
        from tdpo_trl import TDPOFluxPipeline
        from tdpo_trl.tiny_models import TINY_T5_LENGTH, tiny_flux

        pipeline = TDPOFluxPipeline(tiny_flux(), max_sequence_length=TINY_T5_LENGTH)
    else:
        pipeline = TDPOStableDiffusionPipeline(tiny_stable_diffusion())
    if mode == "multitask":
        trainer = TDPOTrainer(config, None, None, pipeline, tasks=two_tasks())
    else:
        trainer = TDPOTrainer(config, left_minus_right_brightness, lambda: ("a photo of a cat", {}), pipeline)
    trainer.train()
    weights = {
        f"unet.{n}": p.detach().contiguous() for n, p in trainer.sd_pipeline.unet.named_parameters() if "lora" in n
    }
    if trainer.critic is not None:
        weights.update({f"critic.{n}": p.detach().contiguous() for n, p in trainer.critic.head.named_parameters()})
        (reset,) = trainer.callbacks
        weights.update({f"dormant_mask.{k}": mask for k, mask in enumerate(reset.dormant_masks)})
        weights["reset_count"] = torch.tensor([reset.reset_count])
    rank = trainer.accelerator.process_index
    save_file(weights, os.path.join(out_dir, f"{run_name}_rank{rank}.safetensors"))
    with open(os.path.join(out_dir, f"{run_name}_rank{rank}.txt"), "w") as f:
        record = trainer.log_history[-1]
        if mode == "multitask":  # per-task rewards and held-out judges, both tasks
            keys = [f"task/{t}/{k}" for t in ("left", "diverse") for k in ("reward/mean", "heldout/target/mean")]
            f.write(f"{trainer.accelerator.num_processes} " + " ".join(str(record[k]) for k in keys) + "\n")
        else:
            reward, jpeg = record["reward/mean"], record["eval/jpeg_compressibility/mean"]
            f.write(f"{trainer.accelerator.num_processes} {reward} {jpeg}\n")


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--resume"]
    main(
        args[0],
        args[1],
        int(args[2]) if len(args) > 2 else 2,
        args[3] if len(args) > 3 else "",
        "--resume" in sys.argv,
    )
