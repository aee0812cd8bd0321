"""Cross-reward (over-optimization) evaluation: score the same images with the target and out-of-domain rewards.

Over-optimization shows as out-of-domain rewards flattening or falling while the target reward rises (TDPO-R paper,
Figs. 1 and 5). `evaluate_checkpoints` scores saved checkpoints on a fixed, seeded prompt set; `plot_cross_reward`
draws target reward (x) against each out-of-domain reward (y), one point per checkpoint and one line per run.
"""

import inspect
import json
import os
import re
from collections.abc import Callable
from typing import Optional

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from .checkpointing import CheckpointError, checkpoint_problem, list_checkpoints
from .pipelines import LORA_WEIGHT_NAME
from .rewards import call_reward_function, is_distribution_reward


@torch.no_grad()
def score_images(reward_functions: dict[str, Callable], images, prompts, metadata=None) -> dict[str, torch.Tensor]:
    """`{name: (B,) float32 scores}` of `images` under every reward function (each output checked).

    A distribution-level reward (`tdpo_trl.rewards`) is scored by its batch score (e.g. minus the
    total-variation distance to the target distribution), which every image of the batch shares.
    """
    metadata = metadata if metadata is not None else [{}] * len(images)
    scores = {}
    for name, function in reward_functions.items():
        if is_distribution_reward(function):
            scores[name] = torch.full((len(images),), function.batch_score(images, list(prompts)))
        else:
            scores[name] = call_reward_function(function, images, prompts, metadata)[0].cpu()
    return scores


def mean_std(scores: dict[str, torch.Tensor], prefix: str = "") -> dict[str, float]:
    """`{<prefix>/<name>/mean, <prefix>/<name>/std}` of `{name: (N,) scores}` (no prefix: `<name>/mean`).

    NaN scores mean "does not apply" (e.g. `digit_accuracy` for a prompt that names no digit) and are left out; a
    judge that applies to none of the images gets NaN.
    """
    stats = {}
    for name, values in scores.items():
        key = f"{prefix}/{name}" if prefix else name
        values = values[~values.isnan()]
        stats[f"{key}/mean"] = values.mean().item() if len(values) else float("nan")
        stats[f"{key}/std"] = values.std(unbiased=False).item() if len(values) else float("nan")
    return stats


@torch.no_grad()
def sample_images(pipeline, prompts: list[str], *, seed: int, num_inference_steps: int, guidance_scale: float,
                  eta: float, batch_size: int = 8, resolution: Optional[int] = None) -> torch.Tensor:  # fmt: skip
    """Images `(N, 3, H, W)` in [0, 1] from a diffusers pipeline, seeded; the global RNG is left as it was. `eta`
    goes to pipelines that take it (DDIM-sampled SD, SDXL); flow-matching ones (SD3, FLUX) sample their ODE.
    `resolution`: the image side (default: the pipeline's own)."""
    extra = {"eta": eta} if "eta" in inspect.signature(pipeline.__call__).parameters else {}
    if resolution is not None:
        extra.update(height=resolution, width=resolution)
    device = pipeline.device
    devices = [device] if device.type == "cuda" else []
    images = []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)  # DDIM noise with eta > 0 is drawn from the global RNG inside the fork
        generator = torch.Generator(device).manual_seed(seed)
        for i in range(0, len(prompts), batch_size):
            output = pipeline(
                prompts[i : i + batch_size],
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                generator=generator,
                output_type="pt",
                **extra,
            )
            images.append(output.images.float().cpu())
    return torch.cat(images)


def checkpoints_of(path: str) -> list[str]:
    """A run folder's checkpoints (oldest first), or the folder itself if it holds saved weights."""
    path = os.fspath(path)
    for folder in (os.path.join(path, "checkpoints"), path):
        found = list_checkpoints(folder)
        if found:
            return found
    if os.path.isfile(os.path.join(path, LORA_WEIGHT_NAME)) or any(
        os.path.isdir(os.path.join(path, name)) for name in DENOISER_NAMES
    ):
        return [path]
    raise ValueError(
        f"{path!r} holds no checkpoint_<i> folder, no {LORA_WEIGHT_NAME} and no {' or '.join(DENOISER_NAMES)} folder"
    )


DENOISER_NAMES = ("unet", "transformer")  # where a diffusers pipeline (and a full-denoiser checkpoint) keeps it


def denoiser_name(pipeline) -> str:
    """`"transformer"` for SD3-like pipelines, else `"unet"`."""
    return "transformer" if getattr(pipeline, "transformer", None) is not None else "unet"


def _load_into(pipeline, checkpoint: str, base_denoiser):
    """Put a checkpoint's weights into `pipeline`: its LoRA, or its full denoiser; verified against its manifest first,
    as a resume verifies it, and checked to fit the base model (`CheckpointError` naming what is wrong)."""
    problem = checkpoint_problem(checkpoint)
    name = denoiser_name(pipeline)
    lora = os.path.join(checkpoint, LORA_WEIGHT_NAME)
    if problem is None:
        fit = lora_fit_problem if os.path.isfile(lora) else denoiser_fit_problem
        problem = fit(checkpoint, name, base_denoiser)
    if problem:
        raise CheckpointError(f"{checkpoint!r} cannot be evaluated: {problem}; nothing of it was loaded")
    setattr(pipeline, name, base_denoiser)
    if os.path.isfile(lora):
        pipeline.load_lora_weights(checkpoint, weight_name=LORA_WEIGHT_NAME)
    else:
        try:
            denoiser = type(base_denoiser).from_pretrained(checkpoint, subfolder=name)
        except Exception as err:  # no weights file, or a truncated or corrupt one (OSError, SafetensorError, ...)
            cause = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
            raise CheckpointError(
                f"{checkpoint!r} cannot be evaluated: its {name}/ weights cannot be loaded ({type(err).__name__}: "
                f"{cause})"
            ) from err
        setattr(pipeline, name, denoiser.to(device=pipeline.device, dtype=base_denoiser.dtype))


def lora_fit_problem(folder: str, name: str, denoiser: torch.nn.Module) -> Optional[str]:
    """What keeps `folder`'s diffusers-format LoRA (keys `<name>.<module>.lora_A.weight`, ...) from fitting
    `denoiser` (a module it names is missing, or has other sizes: trained on another base model), else None."""
    try:
        weights = load_file(os.path.join(folder, LORA_WEIGHT_NAME))
    except Exception as err:  # safetensors' own error for a truncated or corrupt file
        return f"its {LORA_WEIGHT_NAME} cannot be read ({type(err).__name__}: {err})"
    modules, misfits = dict(denoiser.named_modules()), []
    for key, tensor in sorted(weights.items()):
        if not key.startswith(f"{name}."):
            continue  # another component's LoRA (e.g. the text encoder's)
        match = re.fullmatch(rf"{name}\.(.+)\.lora(?:\.|_)(down|up|A|B)\.weight", key)
        module = modules.get(match.group(1)) if match else None
        if module is None:
            misfits.append(f"{key!r} names no module of the base {name}")
        elif match.group(2) in ("down", "A") and tensor.shape[1:] != module.weight.shape[1:]:
            misfits.append(
                f"{match.group(1)!r} takes {tuple(module.weight.shape[1:])}, the LoRA {tuple(tensor.shape[1:])}"
            )
        elif match.group(2) in ("up", "B") and tensor.shape[0] != module.weight.shape[0]:
            misfits.append(f"{match.group(1)!r} gives {module.weight.shape[0]}, the LoRA {tensor.shape[0]}")
    if not weights or misfits:
        found = "; ".join(misfits[:2]) + (f" (and {len(misfits) - 2} more)" if len(misfits) > 2 else "")
        return (
            f"its LoRA does not fit this base model ({found or 'it holds no tensor'}): trained on another base model?"
        )
    return None


def denoiser_fit_problem(folder: str, name: str, denoiser: torch.nn.Module) -> Optional[str]:
    """What keeps `folder/<name>` (a whole saved denoiser) from loading in place of `denoiser`: its config missing or
    unreadable, or of another architecture, else None (the weights themselves are checked as they load)."""
    try:
        config = type(denoiser).load_config(os.path.join(folder, name))
    except Exception as err:  # diffusers raises OSError/EnvironmentError for a missing or unparsable config.json
        return f"its {name}/ folder holds no loadable config.json ({str(err).splitlines()[0][:200]})"
    differences = [
        f"{key}: {config.get(key)!r} here, {value!r} in the base model"
        for key, value in denoiser.config.items()
        if not key.startswith("_") and key in config and _as_json(config[key]) != _as_json(value)
    ]
    if differences:
        return f"its {name} is another architecture than the base model's ({'; '.join(differences[:3])})"
    return None


def _as_json(value):
    return json.loads(json.dumps(value))  # tuples and lists compare equal, as config.json stores both as lists


def evaluate_checkpoints(
    pipeline,
    runs: dict[str, str],
    target_reward: Callable,
    eval_rewards: dict[str, Callable],
    prompts: list[str],
    *,
    seed: int = 0,
    num_inference_steps: int = 20,
    guidance_scale: float = 5.0,
    eta: float = 1.0,
    output_dir: Optional[str] = None,
    include_base: bool = True,
    resolution: Optional[int] = None,
) -> dict[str, list[dict]]:
    """Score every checkpoint of every run on the same seeded prompts: `{run: [{"checkpoint", "target", name: mean,
    ...}, ...]}`. With `output_dir`, also writes `cross_reward.json` and an image grid per checkpoint in `grids/`.
    `resolution`: the image side (default: the pipeline's own)."""
    rewards = {"target": target_reward, **eval_rewards}
    attr = denoiser_name(pipeline)
    base_denoiser = getattr(pipeline, attr)
    pipeline.set_progress_bar_config(disable=True)
    results: dict[str, list[dict]] = {}
    for run, path in runs.items():
        checkpoints = (["base"] if include_base else []) + checkpoints_of(path)
        results[run] = []
        for checkpoint in tqdm(checkpoints, desc=f"evaluate {run}", unit="checkpoint"):
            if checkpoint == "base":
                setattr(pipeline, attr, base_denoiser)
            else:
                _load_into(pipeline, checkpoint, base_denoiser)
            images = sample_images(
                pipeline, prompts, seed=seed, num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale, eta=eta, resolution=resolution,
            )  # fmt: skip
            if checkpoint != "base" and getattr(getattr(pipeline, attr), "peft_config", None):
                pipeline.unload_lora_weights()
            scores = score_images(rewards, images, prompts)
            name = os.path.basename(os.path.normpath(checkpoint))
            record = {"checkpoint": name, **{k: v.mean().item() for k, v in scores.items()}}
            record.update({f"{k}/std": v.std(unbiased=False).item() for k, v in scores.items()})
            results[run].append(record)
            if output_dir:
                save_image_grid(images, os.path.join(output_dir, "grids", f"{run}_{name}.png"))
    setattr(pipeline, attr, base_denoiser)
    if output_dir:
        os.makedirs(output_dir, exist_ok=True)
        with open(os.path.join(output_dir, "cross_reward.json"), "w") as f:
            json.dump({"prompts": prompts, "seed": seed, "runs": results}, f, indent=2)
    return results


def image_grid(images: torch.Tensor, columns: Optional[int] = None, scale: int = 1) -> torch.Tensor:
    """`(N, 3, H, W)` in [0, 1] -> one `(3, rows * (H*scale + 2), columns * (W*scale + 2))` grid on white;
    `scale` enlarges small images (nearest neighbour)."""
    if scale > 1:
        images = torch.nn.functional.interpolate(images.float(), scale_factor=scale, mode="nearest")
    n, _, height, width = images.shape
    columns = columns or min(n, 8)
    rows = (n + columns - 1) // columns
    grid = torch.ones(3, rows * (height + 2), columns * (width + 2))
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        grid[:, r * (height + 2) : r * (height + 2) + height, c * (width + 2) : c * (width + 2) + width] = image
    return grid.clamp(0, 1)


def save_image_grid(images: torch.Tensor, path: str, columns: Optional[int] = None, scale: int = 1):
    """`(N, 3, H, W)` in [0, 1] as one PNG grid (see `image_grid`)."""
    from PIL import Image

    grid = image_grid(images, columns, scale)
    array = (grid * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    Image.fromarray(array).save(path)


def plot_cross_reward(results: dict[str, list[dict]], eval_names: list[str], path: str, target_name: str = "target"):
    """Target reward (x) against each out-of-domain reward (y); one line per run, one point per checkpoint."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(eval_names), figsize=(4.2 * len(eval_names), 3.6), squeeze=False)
    for ax, name in zip(axes[0], eval_names):
        for run, records in results.items():
            ax.plot([r["target"] for r in records], [r[name] for r in records], marker="o", label=run)
            ax.annotate(records[-1]["checkpoint"], (records[-1]["target"], records[-1][name]), fontsize=7)
        ax.set_xlabel(f"{target_name} (target)")
        ax.set_ylabel(f"{name} (out-of-domain)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    figure.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    figure.savefig(path, dpi=120)
    return figure
