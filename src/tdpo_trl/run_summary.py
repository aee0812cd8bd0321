"""The end of a run in one page: what changed, what the judges and the guard say, what it cost, where the weights
are and how to load or share them. Written to `<run>/summary.json` and printed by `train()` on the main process."""

import json
import math
import os
import statistics
from typing import Optional

import torch

from .checkpointing import list_checkpoints
from .pipelines import LORA_WEIGHT_NAME
from .scoring import shown_reward_key


SUMMARY_NAME = "summary.json"


def peak_memory() -> dict:
    """The accelerator's peak allocated memory (CUDA), else the process's peak resident set (Linux), in MiB."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return {"peak_memory_mib": torch.cuda.max_memory_allocated() / 2**20, "peak_memory_of": "cuda allocated"}
    try:
        with open("/proc/self/status") as f:
            peak = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
        return {"peak_memory_mib": peak, "peak_memory_of": "process RSS"}
    except (OSError, StopIteration):
        return {"peak_memory_mib": None, "peak_memory_of": None}


def first_and_last(history: list[dict], key: str) -> Optional[list[float]]:
    """`[first, last]` finite value of `key` over the epoch records, or None if it was never logged."""
    values = [r[key] for r in history if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return [values[0], values[-1]] if values else None


def run_summary(trainer, saved_to: Optional[str] = None) -> dict:
    """What a person wants at the end of `trainer`'s run (see the module docstring). `saved_to`: the folder
    `save_pretrained` wrote, if any (the CLI's `--save_dir`)."""
    history = trainer.log_history
    keys = sorted({k for r in history for k in r})
    prefixes = [f"task/{task.name}/" for task in trainer.tasks] if trainer.multi_task else [""]
    rewards = [shown_reward_key(history[-1], prefix) for prefix in prefixes] if history else []  # a group score
    judges = [k for k in keys if "heldout/" in k and k.endswith("/mean")]
    checkpoints = list_checkpoints(trainer.checkpoint_dir)
    latest = checkpoints[-1] if checkpoints else None
    weights = saved_to or latest
    guard = trainer._guard()
    lora = trainer.sd_pipeline.use_lora
    family = type(trainer.sd_pipeline.diffusers_pipeline).__name__
    base = trainer.sd_pipeline.pretrained_model or "<base model>"
    summary = {
        "run": trainer.accelerator.project_dir,
        "epochs": [history[0]["epoch"], history[-1]["epoch"]] if history else None,
        "reward": {k: first_and_last(history, k) for k in rewards},
        "heldout": {k: first_and_last(history, k) for k in judges},
        "guard": None,
        "epoch_seconds_median": statistics.median(r["time/epoch_s"] for r in history) if history else None,
        **peak_memory(),
        "latest_checkpoint": latest,
        "saved_to": saved_to,
        "lora_file": os.path.join(weights, LORA_WEIGHT_NAME) if lora and weights else None,
    }
    if guard is not None:
        summary["guard"] = {
            "flagged": guard.flagged,
            "kept_epoch": guard.kept_epoch,
            "explanation": guard.explanation(),
        }
    if weights:
        load = (
            f'pipe = {family}.from_pretrained("{base}"); pipe.load_lora_weights("{weights}", '
            f'weight_name="{LORA_WEIGHT_NAME}")'
            if lora
            else f"{type(trainer.sd_pipeline.denoiser).__name__}.from_pretrained"
            f'("{weights}", subfolder="{trainer.sd_pipeline.denoiser_name}")'
        )
        summary["load_in_diffusers"] = load
        summary["push"] = (
            f"hf upload <your-name>/<repo> {saved_to}"
            if saved_to
            else 'trainer.push_to_hub("<your-name>/<repo>")  # or save_pretrained(dir), then: hf upload <repo> dir'
        )
    return summary


def write_run_summary(trainer, saved_to: Optional[str] = None, show: bool = True) -> Optional[dict]:
    """On the main process: write `<run>/summary.json` and (`show`) print it as a short text; None on the others."""
    if not trainer.accelerator.is_main_process:
        return None
    summary = run_summary(trainer, saved_to)
    with open(os.path.join(trainer.accelerator.project_dir, SUMMARY_NAME), "w") as f:
        json.dump(summary, f, indent=2)
    if show:
        print(format_summary(summary))  # noqa: T201 (the run's last words, meant for the person who started it)
    return summary


def format_change(first: float, last: float, digits: int = 4) -> str:
    """`"0.283 -> 0.407 (+0.124)"`: a value before and after, as the summary and the demo's table print it."""
    return f"{first:.{digits}g} -> {last:.{digits}g} ({last - first:+.{digits - 1}g})"


def format_summary(summary: dict) -> str:
    """The summary as the lines `train()` prints."""

    def change(pair) -> str:
        return "not logged" if pair is None else format_change(*pair)

    lines = [f"Run {summary['run']}, epochs {summary['epochs']}:"]
    lines += [f"  {key}: {change(pair)}" for key, pair in summary["reward"].items()]
    lines += [f"  {key} (held out): {change(pair)}" for key, pair in summary["heldout"].items()]
    guard = summary["guard"]
    if guard is not None:
        kept = "the base model" if guard["kept_epoch"] == -1 else f"epoch {guard['kept_epoch']}"
        verdict = guard["explanation"] or f"no over-optimization flagged (best judged: {kept})"
        lines.append(f"  guard: {verdict}")
    seconds, memory = summary["epoch_seconds_median"], summary["peak_memory_mib"]
    if seconds is not None:
        lines.append(
            f"  {seconds:.2f} s per epoch (median)"
            + (f", peak memory {memory:.0f} MiB ({summary['peak_memory_of']})" if memory else "")
        )
    if summary.get("lora_file"):
        lines.append(f"  LoRA: {summary['lora_file']}")
    elif summary["latest_checkpoint"]:
        lines.append(f"  latest checkpoint: {summary['latest_checkpoint']}")
    if "load_in_diffusers" in summary:
        lines.append(f"  load: {summary['load_in_diffusers']}")
        lines.append(f"  share: {summary['push']}")
    lines.append(f"  (all of it in {os.path.join(summary['run'], SUMMARY_NAME)})")
    return "\n".join(lines)
