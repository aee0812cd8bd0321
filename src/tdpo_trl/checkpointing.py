"""Crash-safe, rotated training checkpoints written with accelerate's `save_state`.

A checkpoint is first written to `checkpoints/.checkpoint_<i>.partial` and then renamed to `checkpoint_<i>`: a
process killed while writing leaves a `.partial` folder, which is never resumed from and is removed by the next save,
so the previous `checkpoint_<i-1>` stays the latest valid one.
"""

import os
import re
import shutil
from collections import deque

import numpy as np
import torch


_CHECKPOINT = re.compile(r"^checkpoint_(\d+)$")


class TrainingProgress:
    """Epoch, global step, next checkpoint number and the metrics logged so far; saved in every checkpoint."""

    def __init__(self):
        self.epoch = 0  # next epoch to run
        self.global_step = 0
        self.next_checkpoint = 0
        self.log_history: list[dict] = []

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "global_step": self.global_step,
            "next_checkpoint": self.next_checkpoint,
            "log_history": self.log_history,
        }

    def load_state_dict(self, state: dict):
        self.epoch, self.global_step = int(state["epoch"]), int(state["global_step"])
        self.next_checkpoint = int(state.get("next_checkpoint", 0))
        self.log_history[:] = state.get("log_history", [])


class StatTrackerState:
    """Makes TRL's `PerPromptStatTracker` checkpointable: its per-prompt reward buffers, dtype preserved."""

    def __init__(self, tracker):
        self.tracker = tracker

    def state_dict(self) -> dict:
        return {prompt: torch.from_numpy(np.asarray(list(buffer))) for prompt, buffer in self.tracker.stats.items()}

    def load_state_dict(self, state: dict):
        self.tracker.stats = {
            prompt: deque(list(values.numpy()), maxlen=self.tracker.buffer_size) for prompt, values in state.items()
        }


def list_checkpoints(checkpoint_dir: str) -> list[str]:
    """Complete checkpoints in `checkpoint_dir`, oldest first."""
    if not os.path.isdir(checkpoint_dir):
        return []
    numbered = [(int(m.group(1)), name) for name in os.listdir(checkpoint_dir) if (m := _CHECKPOINT.match(name))]
    return [os.path.join(checkpoint_dir, name) for _, name in sorted(numbered)]


def resolve_checkpoint(path: str) -> str:
    """`path` if it is a `checkpoint_<i>` folder, else the latest checkpoint in `path` or `path/checkpoints`."""
    path = os.path.normpath(os.path.expanduser(path))
    if not os.path.isdir(path):
        raise ValueError(f"`resume_from` {path!r} is not a directory")
    if _CHECKPOINT.match(os.path.basename(path)):
        return path
    folder = os.path.join(path, "checkpoints") if os.path.isdir(os.path.join(path, "checkpoints")) else path
    checkpoints = list_checkpoints(folder)
    if not checkpoints:
        raise ValueError(f"`resume_from` {path!r} holds no complete checkpoint_<i> folder")
    return checkpoints[-1]


def save_checkpoint(accelerator, checkpoint_dir: str, index: int, limit=None) -> str:
    """Write `checkpoint_<index>` atomically on every process, then keep the newest `limit` checkpoints."""
    final = os.path.join(checkpoint_dir, f"checkpoint_{index}")
    partial = os.path.join(checkpoint_dir, f".checkpoint_{index}.partial")
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)  # left by a process killed while saving
        os.makedirs(partial)
    accelerator.wait_for_everyone()
    accelerator.save_state(partial)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if os.path.exists(final):  # resumed from an older checkpoint: the newer ones are replaced
            shutil.rmtree(final)
        os.replace(partial, final)
        if limit:
            for old in list_checkpoints(checkpoint_dir)[:-limit]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final
