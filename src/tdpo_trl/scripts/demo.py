"""`tdpo-trl demo`: TDPO-R with LoRA on the shipped digits model and its learned ink reward, on CPU in minutes.

    tdpo-trl demo                                  # ~6 min on 2 CPU cores, writes outputs/demo
    tdpo-trl demo --use_critic false               # the same run as DDPO, to compare
    tdpo-trl demo --num_epochs 2 --output_dir /tmp/demo

Writes into `--output_dir`: `lora/` (pytorch_lora_weights.safetensors, loadable by `pipe.load_lora_weights`, plus
the critic and a model card), `metrics.jsonl` and `tensorboard/` (per-epoch metrics), `checkpoints/`,
`before_after.png` (the same seeded samples before and after training), `cross_reward.png` (the target reward
against prompted-digit accuracy and realism, one point per epoch) and `summary.json`; then prints a table.
The demo shows reward over-optimization: the learned ink reward rises, while the judges it was not trained on
(does the image still show the prompted digit? does it still look like a real digit?) tell whether that gain is real.
"""

import importlib.util
import json
import os
import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from ..digits import eval_prompts, shared_judges
from ..evaluation import image_grid, sample_images
from ..validation import check_writable_folder
from . import train


JUDGE_NAMES = ("ink", "stroke_mass", "accuracy", "realism", "nearest_real")


@dataclass
class DemoArguments:
    output_dir: str = field(default="outputs/demo", metadata={"help": "Folder for every output of the demo."})
    samples_per_digit: int = field(
        default=10, metadata={"help": "Fixed-seed samples per digit scored and shown before and after training."}
    )

    def __post_init__(self):
        if self.samples_per_digit < 1:
            raise ValueError(f"`samples_per_digit` must be >= 1, got {self.samples_per_digit}")


def parse_args(argv: Optional[list[str]] = None):
    """`(DemoArguments, TDPOConfig)`; every `TDPOConfig` field is a flag, on the digits defaults."""
    from transformers import HfArgumentParser

    from ..cli import one_line_errors
    from ..tdpo_config import TDPOConfig

    parser = one_line_errors(HfArgumentParser((DemoArguments, TDPOConfig)))
    parser.prog = "tdpo-trl demo"
    parser.set_defaults(**{k: v for k, v in train.DIGITS_DEFAULTS.items() if k in TDPOConfig.__dataclass_fields__})
    has_tensorboard = importlib.util.find_spec("tensorboard") is not None
    parser.set_defaults(log_with="tensorboard" if has_tensorboard else None, tracker_project_name="tensorboard")
    return parser.parse_args_into_dataclasses(argv)


def judge_fixed_samples(pipeline, config, prompts: list[str]) -> tuple[torch.Tensor, dict[str, float]]:
    """Seeded samples of `prompts` (the training sampler's settings) and the mean of every judge over them."""
    images = sample_images(
        pipeline, prompts, seed=config.eval_seed, num_inference_steps=config.sample_num_steps,
        guidance_scale=config.sample_guidance_scale, eta=config.sample_eta, batch_size=len(prompts),
    )  # fmt: skip
    scores = shared_judges().score(images, prompts)
    return images, {name: scores[name].mean().item() for name in JUDGE_NAMES}


def plot_before_after(before: torch.Tensor, after: torch.Tensor, scores: dict, path: str):
    """The same seeded samples before and after training, side by side, each with its judges' scores."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 5.6))
    for ax, images, name in zip(axes, (before, after), ("before", "after")):
        by_row = images.reshape(10, -1, *images.shape[1:]).transpose(0, 1).flatten(0, 1)  # one column per digit
        ax.imshow(image_grid(by_row, columns=10, scale=4).permute(1, 2, 0).numpy())
        s = scores[name]
        ax.set_title(
            f"{name}: ink {s['ink']:.3f}, accuracy {s['accuracy']:.2f}, realism {s['realism']:.2f}", fontsize=10
        )
        ax.axis("off")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    return figure


def plot_epoch_cross_reward(log_history: list[dict], path: str, window: int = 5):
    """Ink reward (x) against prompted-digit accuracy and realism (y) of each epoch's training samples: one point
    per epoch, coloured by epoch, and a `window`-epoch moving average through them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    epochs = np.array([r["epoch"] for r in log_history])
    target = np.array([r["reward/mean"] for r in log_history])
    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in zip(
        axes, ("eval/digit_accuracy/mean", "eval/digit_realism/mean"), ("prompted-digit accuracy", "realism")
    ):
        values = np.array([r[key] for r in log_history])
        points = ax.scatter(target, values, c=epochs, cmap="viridis", s=18)
        if len(values) >= window:
            kernel = np.ones(window) / window
            smooth_x, smooth_y = np.convolve(target, kernel, "valid"), np.convolve(values, kernel, "valid")
            ax.plot(smooth_x, smooth_y, color="black", linewidth=1.2, label=f"{window}-epoch moving average")
            ax.legend(fontsize=8)
        ax.set_xlabel("ink reward (target, trained on)")
        ax.set_ylabel(f"{label} (not trained on)")
        ax.grid(alpha=0.3)
    figure.colorbar(points, ax=axes, label="epoch")
    figure.suptitle("Over-optimization: the target rises; do the judges it was not trained on follow?")
    figure.savefig(path, dpi=110, bbox_inches="tight")
    return figure


def main(demo_args: DemoArguments, config) -> dict:
    start = time.perf_counter()
    output_dir = check_writable_folder(demo_args.output_dir, "output_dir")
    config.project_kwargs = {**config.project_kwargs, "project_dir": output_dir}
    needed = {"digit_accuracy", "digit_realism"} - set(config.eval_reward_functions)
    config.eval_reward_functions = [*config.eval_reward_functions, *sorted(needed)]
    script_args = train.ScriptArguments(pretrained_model="digits", reward="digit_ink", prompts="digits",
                                        prompt_template="{}", save_dir=os.path.join(output_dir, "lora"))  # fmt: skip
    trainer = train.build_trainer(script_args, config)
    pipeline = trainer.sd_pipeline.sd_pipeline
    prompts = eval_prompts(demo_args.samples_per_digit)
    scores = {}
    before, scores["before"] = judge_fixed_samples(pipeline, config, prompts)

    trainer.train()
    trainer.save_pretrained(script_args.save_dir)
    after, scores["after"] = judge_fixed_samples(pipeline, config, prompts)
    if not trainer.accelerator.is_main_process:
        return scores

    paths = {
        "lora": os.path.join(script_args.save_dir, "pytorch_lora_weights.safetensors"),
        "metrics": os.path.join(output_dir, "metrics.jsonl"),
        "tensorboard": os.path.join(output_dir, config.tracker_project_name) if config.log_with else None,
        "before_after": os.path.join(output_dir, "before_after.png"),
        "cross_reward": os.path.join(output_dir, "cross_reward.png"),
        "summary": os.path.join(output_dir, "summary.json"),
    }
    plot_before_after(before, after, scores, paths["before_after"])
    plot_epoch_cross_reward(trainer.log_history, paths["cross_reward"])
    summary = {
        "mode": ("TDPO-R" if config.neuron_reset else "TDPO (no reset)") if config.use_critic else "DDPO",
        "epochs": len(trainer.log_history),
        "minutes": (time.perf_counter() - start) / 60,
        "fixed_samples": len(prompts),
        **scores,
        "paths": paths,
    }
    with open(paths["summary"], "w") as f:
        json.dump(summary, f, indent=2)
    print_summary(summary)
    return summary


def print_summary(summary: dict):
    before, after = summary["before"], summary["after"]
    print(f"\n{summary['mode']} on the learned ink reward: {summary['epochs']} epochs in {summary['minutes']:.1f} min")
    print(f"{summary['fixed_samples']} fixed-seed samples, the same before and after:")
    print(f"{'judge':<28} {'before':>8} {'after':>8} {'change':>8}")
    labels = {
        "ink": "ink reward (target)",
        "stroke_mass": "true stroke mass",
        "accuracy": "prompted-digit accuracy",
        "realism": "realism (log-lik / pixel)",
        "nearest_real": "distance to nearest real",
    }
    for key, label in labels.items():
        print(f"{label:<28} {before[key]:>8.3f} {after[key]:>8.3f} {after[key] - before[key]:>+8.3f}")
    print()
    for name, path in summary["paths"].items():
        if path:
            print(f"{name + ':':<14}{path}")


def cli(argv: Optional[list[str]] = None) -> dict:
    return main(*parse_args(argv))
