"""`tdpo-trl demo`: TDPO-R with LoRA on the shipped digits model and its learned ink reward, on CPU in minutes.

    tdpo-trl demo                                  # 7 min on 2 CPU cores (two runs), writes outputs/demo
    tdpo-trl demo --use_critic false               # the same with DDPO
    tdpo-trl demo --num_epochs 2 --output_dir /tmp/demo

Trains TDPO-R with the pretraining loss (the digits recipe, `train.DIGITS_DEFAULTS`), then, with
`--compare_unregularized` (default), the same budget without the regularizers. Writes into `--output_dir`: `lora/`
(pytorch_lora_weights.safetensors, loadable by `pipe.load_lora_weights`, plus the critic and a model card),
`metrics.jsonl` and `tensorboard/` (per-epoch metrics), `checkpoints/`, `unregularized/` (the contrast run),
`before_after.png` (the same seeded samples before, after, and after without the regularizers), `cross_reward.png`
(the target reward against prompted-digit accuracy and realism, one curve per run) and `summary.json`; then prints a
table. The learned ink reward rises in both runs; the judges it was not trained on (does the image still show the
prompted digit? does it still look like a real digit?) tell whether that gain is real.
"""

import dataclasses
import importlib.util
import json
import os
import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from ..digits import eval_prompts, shared_judges
from ..digits.independent_judge import DigitAccuracyIndependent
from ..evaluation import image_grid, sample_images
from ..run_summary import format_change, write_run_summary
from ..validation import check_writable_folder
from . import train


JUDGE_NAMES = ("ink", "stroke_mass", "accuracy", "realism", "nearest_real")


@dataclass
class DemoArguments:
    output_dir: str = field(default="outputs/demo", metadata={"help": "Folder for every output of the demo."})
    samples_per_digit: int = field(
        default=10, metadata={"help": "Fixed-seed samples per digit scored and shown before and after training."}
    )
    compare_unregularized: bool = field(
        default=True,
        metadata={
            "help": "When the pretraining loss or the KL is on, also train the same budget without them and show it "
            "next to the regularized run (before_after.png, cross_reward.png, the table)."
        },
    )

    def __post_init__(self):
        if self.samples_per_digit < 1:
            raise ValueError(f"`samples_per_digit` must be >= 1, got {self.samples_per_digit}")


def parse_args(argv: Optional[list[str]] = None):
    """`(DemoArguments, TDPOConfig)`; every `TDPOConfig` field is a flag, on the digits defaults."""
    from transformers import HfArgumentParser

    from ..tdpo_config import TDPOConfig
    from .cli import one_line_errors

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
    means = {name: scores[name].mean().item() for name in JUDGE_NAMES}
    if importlib.util.find_spec("sklearn") is not None:  # the judge that shares nothing with the reward
        means["independent_accuracy"] = DigitAccuracyIndependent()(images, prompts)[0].mean().item()
    return images, means


def plot_before_after(panels: dict[str, torch.Tensor], scores: dict, path: str):
    """The same seeded samples in each panel (before training, after, and optionally after the same budget without
    the regularizers), side by side, each titled with its judges' scores. `panels` maps a `scores` key to images."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 5.8), squeeze=False)
    for ax, (name, images) in zip(axes[0], panels.items()):
        by_row = images.reshape(10, -1, *images.shape[1:]).transpose(0, 1).flatten(0, 1)  # one column per digit
        ax.imshow(image_grid(by_row, columns=10, scale=4).permute(1, 2, 0).numpy())
        s = scores[name]
        ax.set_title(
            f"{PANEL_TITLES.get(name, name)}\nstroke mass {s['stroke_mass']:.3f}, accuracy {s['accuracy']:.2f}, "
            f"realism {s['realism']:.2f}",
            fontsize=10,
        )
        ax.axis("off")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    return figure


PANEL_TITLES = {"before": "before", "after": "after", "unregularized": "after, without the regularizers"}


def plot_epoch_cross_reward(histories: dict[str, list[dict]], path: str, window: int = 5):
    """Ink reward (x) against prompted-digit accuracy and realism (y) of each epoch's training samples, one point per
    epoch and a `window`-epoch moving average through them, one colour per run in `histories` (label -> records)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = ("tab:green", "tab:red", "tab:blue", "tab:orange")
    for (label, history), color in zip(histories.items(), colors):
        target = np.array([r["reward/mean"] for r in history])
        for ax, key in zip(axes, ("eval/digit_accuracy/mean", "eval/digit_realism/mean")):
            values = np.array([r[key] for r in history])
            ax.scatter(target, values, color=color, s=10, alpha=0.35)
            if len(values) >= window:
                kernel = np.ones(window) / window
                smooth_x, smooth_y = np.convolve(target, kernel, "valid"), np.convolve(values, kernel, "valid")
                ax.plot(smooth_x, smooth_y, color=color, linewidth=1.6, label=label)
                ax.annotate("end", (smooth_x[-1], smooth_y[-1]), color=color, fontsize=8)
    for ax, label in zip(axes, ("prompted-digit accuracy", "realism")):
        ax.set_xlabel("ink reward (target, trained on)")
        ax.set_ylabel(f"{label} (not trained on)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, title=f"{window}-epoch moving average", title_fontsize=8)
    figure.suptitle("Over-optimization: the target rises; do the judges it was not trained on follow? (per epoch)")
    figure.savefig(path, dpi=110, bbox_inches="tight")
    return figure


def method_name(config) -> str:
    """E.g. `"TDPO-R + pretraining loss (beta 0.3)"`."""
    name = ("TDPO-R" if config.neuron_reset else "TDPO (no reset)") if config.use_critic else "DDPO"
    if config.pretrain_loss_coef > 0:
        name += f" + pretraining loss (beta {config.pretrain_loss_coef:g})"
    if config.kl_coef > 0:
        name += f" + KL ({config.kl_penalty}, {config.kl_coef:g})"
    return name


def without_regularizers(config, output_dir: str):
    """The same run without the pretraining loss and the KL, written under `output_dir`."""
    return dataclasses.replace(
        config,
        pretrain_loss_coef=0.0,
        kl_coef=0.0,
        project_kwargs={**config.project_kwargs, "project_dir": output_dir},
    )


def train_and_judge(config, save_dir: str, prompts: list[str], before: bool = False) -> dict:
    """Train one demo run on the digits; judge the fixed samples after (and, if `before`, before) training."""
    start = time.perf_counter()
    script_args = train.ScriptArguments(pretrained_model="digits", reward="digit_ink", prompts="digits",
                                        prompt_template="{}", save_dir=save_dir)  # fmt: skip
    trainer = train.build_trainer(script_args, config)
    pipeline = trainer.sd_pipeline.diffusers_pipeline
    run = {"trainer": trainer, "images": {}, "scores": {}}
    if before:
        run["images"]["before"], run["scores"]["before"] = judge_fixed_samples(pipeline, config, prompts)
    trainer.train()
    trainer.save_pretrained(save_dir)
    run["summary"] = write_run_summary(trainer, saved_to=save_dir, show=False)  # now naming the saved LoRA
    run["images"]["after"], run["scores"]["after"] = judge_fixed_samples(pipeline, config, prompts)
    run["minutes"] = (time.perf_counter() - start) / 60
    return run


def main(demo_args: DemoArguments, config) -> dict:
    start = time.perf_counter()
    output_dir = check_writable_folder(demo_args.output_dir, "output_dir")
    config.project_kwargs = {**config.project_kwargs, "project_dir": output_dir}
    needed = {"digit_accuracy", "digit_realism"} - set(config.eval_reward_functions)
    config.eval_reward_functions = [*config.eval_reward_functions, *sorted(needed)]
    prompts = eval_prompts(demo_args.samples_per_digit)
    main_run = train_and_judge(config, os.path.join(output_dir, "lora"), prompts, before=True)
    images, scores = main_run["images"], main_run["scores"]
    histories = {method_name(config): main_run["trainer"].log_history}

    regularized = config.pretrain_loss_coef > 0 or config.kl_coef > 0
    contrast = None
    if demo_args.compare_unregularized and regularized:
        contrast_dir = os.path.join(output_dir, "unregularized")
        contrast_config = without_regularizers(config, contrast_dir)
        contrast = train_and_judge(contrast_config, os.path.join(contrast_dir, "lora"), prompts)
        images["unregularized"], scores["unregularized"] = contrast["images"]["after"], contrast["scores"]["after"]
        histories[method_name(contrast_config)] = contrast["trainer"].log_history
    if not main_run["trainer"].accelerator.is_main_process:
        return scores

    paths = {
        "lora": os.path.join(output_dir, "lora", "pytorch_lora_weights.safetensors"),
        "metrics": os.path.join(output_dir, "metrics.jsonl"),
        "tensorboard": os.path.join(output_dir, config.tracker_project_name) if config.log_with else None,
        "before_after": os.path.join(output_dir, "before_after.png"),
        "cross_reward": os.path.join(output_dir, "cross_reward.png"),
        "summary": os.path.join(output_dir, "summary.json"),
    }
    if contrast is not None:
        paths["unregularized"] = os.path.join(output_dir, "unregularized")
    plot_before_after(images, scores, paths["before_after"])
    plot_epoch_cross_reward(histories, paths["cross_reward"])
    summary = {
        "mode": method_name(config),
        "epochs": len(main_run["trainer"].log_history),
        "minutes": main_run["minutes"],
        "fixed_samples": len(prompts),
        **scores,
        "paths": paths,
        "runs": {method_name(config): main_run["summary"]},  # each run's own summary (`run_summary`)
    }
    if contrast is not None:
        summary["unregularized_mode"] = method_name(contrast_config)
        summary["unregularized_minutes"] = contrast["minutes"]
        summary["runs"][method_name(contrast_config)] = contrast["summary"]
    summary["total_minutes"] = (time.perf_counter() - start) / 60
    with open(paths["summary"], "w") as f:
        json.dump(summary, f, indent=2)
    print_summary(summary)
    return summary


JUDGE_LABELS = {
    "ink": "ink reward (target)",
    "stroke_mass": "true stroke mass",
    "accuracy": "prompted-digit accuracy",
    "independent_accuracy": "  by the sklearn judge",
    "realism": "realism (log-lik / pixel)",
    "nearest_real": "distance to nearest real",
}


def print_summary(summary: dict):
    """The fixed samples' judges before -> after in each run (`run_summary.format_change`), each run's training
    reward and cost from its own run summary, and where the outputs are."""
    columns = {"after": summary["mode"]}
    if "unregularized" in summary:
        columns["unregularized"] = f"the same budget, {summary['unregularized_mode']}"
    print(f"\n{summary['fixed_samples']} fixed-seed samples, the same in every column, before -> after training:")
    print(f"{'judge':<28}" + "".join(f"{title[:34]:>36}" for title in columns.values()))
    for key, label in JUDGE_LABELS.items():
        if key in summary["before"]:
            cells = [format_change(summary["before"][key], summary[c][key], 3) for c in columns]
            print(f"{label:<28}" + "".join(f"{cell:>36}" for cell in cells))
    print()
    for mode, run in summary["runs"].items():
        reward = run["reward"].get("reward/mean")
        trained = f"training reward {format_change(*reward, 3)}, " if reward else ""
        print(f"{mode}: epochs {run['epochs']}, {trained}{run['epoch_seconds_median']:.2f} s per epoch (median)")
    print(f"{summary['total_minutes']:.1f} min in all\n")
    for name, path in summary["paths"].items():
        if path:
            print(f"{name + ':':<15}{path}")


def cli(argv: Optional[list[str]] = None) -> dict:
    return main(*parse_args(argv))
