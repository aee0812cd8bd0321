"""Crash-safe, verified, rotated training checkpoints written with accelerate's `save_state`.

A checkpoint is first written to `checkpoints/.checkpoint_<i>.partial`; a `manifest.json` listing every file with its
size and SHA-256 (and the shape of the model that wrote it) is written last; then the folder is renamed to
`checkpoint_<i>`. A process killed while writing leaves a `.partial` folder, which is never resumed from and is
removed by the next save, so the previous `checkpoint_<i-1>` stays the latest valid one. On resume the manifest is
checked: a damaged checkpoint is named with the file at fault and the newest intact checkpoint beside it.
"""

import hashlib
import json
import logging
import os
import re
import shutil
from collections import deque
from typing import Optional

import numpy as np
import torch

from .disk_space import disk_full_error


logger = logging.getLogger(__name__)

_CHECKPOINT = re.compile(r"^checkpoint_(\d+)$")
MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1


class CheckpointError(ValueError):
    """A checkpoint is damaged, or does not fit the model it would be loaded into."""


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


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: str, structure: Optional[dict] = None) -> str:
    """List every file of `folder` with its size and SHA-256, plus `structure`, in `folder/manifest.json`."""
    files = {}
    for root, _, names in os.walk(folder):
        for name in sorted(names):
            path = os.path.join(root, name)
            relative = os.path.relpath(path, folder).replace(os.sep, "/")
            if relative != MANIFEST_NAME:
                files[relative] = {"bytes": os.path.getsize(path), "sha256": _sha256(path)}
    manifest = {"format": MANIFEST_FORMAT, "files": files, "structure": structure or {}}
    path = os.path.join(folder, MANIFEST_NAME)
    with open(path + ".tmp", "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
    os.replace(path + ".tmp", path)
    return path


def checkpoint_problem(folder: str) -> Optional[str]:
    """What is wrong with `folder` according to its manifest (None if intact). A folder without a manifest (written
    before tdpo-trl wrote them) counts as intact and is logged as unverified."""
    path = os.path.join(folder, MANIFEST_NAME)
    if not os.path.isfile(path):
        logger.warning(f"{folder!r} has no {MANIFEST_NAME} (an older checkpoint?); its files are not verified")
        return None
    try:
        with open(path) as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError) as err:
        return f"its {MANIFEST_NAME} is unreadable ({err})"
    for relative, expected in sorted(files.items()):
        file = os.path.join(folder, relative)
        if not os.path.isfile(file):
            return f"{relative} is missing"
        size = os.path.getsize(file)
        if size != expected["bytes"]:
            return f"{relative} has {size} bytes, the manifest says {expected['bytes']} (truncated or replaced)"
        if _sha256(file) != expected["sha256"]:
            return f"{relative} does not match its SHA-256 in the manifest (corrupted or replaced)"
    return None


def read_structure(folder: str) -> Optional[dict]:
    """The model structure recorded in a checkpoint's manifest (None without a manifest)."""
    path = os.path.join(folder, MANIFEST_NAME)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f).get("structure") or None


def check_structure(folder: str, current: dict):
    """Raise `CheckpointError` listing, field by field, where the model that wrote `folder` differs from `current`."""
    recorded = read_structure(folder)
    if recorded is None:
        return
    newer = {
        "tasks",
        "pretrain_loss_coef > 0",
    }  # not recorded by checkpoints written before tdpo-trl 0.2: not compared
    differences = [
        f"{name}: checkpoint {recorded.get(name)!r}, now {value!r}"
        for name, value in current.items()
        if recorded.get(name) != value and (name in recorded or name not in newer)
    ]
    if differences:
        raise CheckpointError(
            f"{folder!r} was written by a differently shaped model; nothing was loaded. Set these fields as the "
            f"checkpoint has them (or start a new run): " + "; ".join(differences)
        )


def resolve_checkpoint(path: str) -> str:
    """`path` if it is a `checkpoint_<i>` folder, else the latest checkpoint in `path` or `path/checkpoints`; the
    checkpoint's files are verified against its manifest first (`CheckpointError` if damaged)."""
    path = os.path.normpath(os.path.expanduser(path))
    if not os.path.isdir(path):
        raise ValueError(f"`resume_from` {path!r} is not a directory")
    if _CHECKPOINT.match(os.path.basename(path)):
        checkpoint, candidates = path, list_checkpoints(os.path.dirname(path))
    else:
        folder = os.path.join(path, "checkpoints") if os.path.isdir(os.path.join(path, "checkpoints")) else path
        candidates = list_checkpoints(folder)
        if not candidates:
            raise ValueError(f"`resume_from` {path!r} holds no complete checkpoint_<i> folder")
        checkpoint = candidates[-1]
    problem = checkpoint_problem(checkpoint)
    if problem is None and not os.path.isfile(os.path.join(checkpoint, "random_states_0.pkl")):  # save_state writes it
        problem = (
            f"it holds neither a {MANIFEST_NAME} nor accelerate's files (found {sorted(os.listdir(checkpoint))[:4]})"
        )
    if problem is not None:
        older = [c for c in candidates if checkpoint_index(c) < checkpoint_index(checkpoint)]
        intact = next((c for c in reversed(older) if checkpoint_problem(c) is None), None)
        advice = f"resume from the newest intact one: resume_from={intact!r}" if intact else "no older one is intact"
        raise CheckpointError(f"checkpoint {checkpoint!r} is damaged: {problem}; {advice}")
    return checkpoint


def run_folder_of(checkpoint: str) -> Optional[str]:
    """The run folder `<run>` of `<run>/checkpoints/checkpoint_<i>`, or None for a checkpoint kept elsewhere."""
    parent = os.path.dirname(os.path.abspath(checkpoint))
    return os.path.dirname(parent) if os.path.basename(parent) == "checkpoints" else None


def checkpoint_index(checkpoint: str) -> int:
    """The `<i>` of a `checkpoint_<i>` folder."""
    return int(_CHECKPOINT.match(os.path.basename(checkpoint)).group(1))


def write_checkpoint(
    accelerator, checkpoint_dir: str, index: int, limit=None, structure: Optional[dict] = None
) -> str:
    """Write `checkpoint_<index>` atomically on every process (its manifest last), then keep the newest `limit`."""
    final = os.path.join(checkpoint_dir, f"checkpoint_{index}")
    partial = os.path.join(checkpoint_dir, f".checkpoint_{index}.partial")
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)  # left by a process killed while saving
        os.makedirs(partial)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(partial)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            write_manifest(partial, structure)
    except Exception as err:
        previous = list_checkpoints(checkpoint_dir)
        kept = f"the newest checkpoint, {previous[-1]!r}, is intact" if previous else "no checkpoint was written yet"
        disk_full = disk_full_error(err, checkpoint_dir, f"checkpoint_{index}", kept + "; the partial one is removed")
        shutil.rmtree(partial, ignore_errors=True)
        if disk_full is None:
            raise
        raise disk_full from err
    if accelerator.is_main_process:
        if os.path.exists(final):  # resumed from an older checkpoint: the newer ones are replaced
            shutil.rmtree(final)
        os.replace(partial, final)
        if limit:
            for old in list_checkpoints(checkpoint_dir)[:-limit]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def model_structure(use_lora: bool, denoiser, critic_head, config, tasks: list[str]) -> dict:
    """What a checkpoint's tensors and state must fit, by `TDPOConfig` field name: the LoRA's shape on `denoiser` (if
    it has one), the critic head's (if any), the task names (one critic output each) and whether the pretraining loss
    is on (its data position is checkpointed), as the manifest records them."""
    structure = {"use_lora": bool(use_lora), "use_critic": critic_head is not None}
    structure["tasks"], structure["pretrain_loss_coef > 0"] = list(tasks), config.pretrain_loss_coef > 0
    lora = denoiser.peft_config.get("default") if getattr(denoiser, "peft_config", None) else None
    if lora is not None:
        structure["lora_rank"] = int(lora.r)
        structure["lora_alpha"] = float(lora.lora_alpha)
        structure["lora_target_modules"] = sorted(lora.target_modules)
    if critic_head is not None:
        structure["critic_encoder"] = config.critic_encoder
        structure["critic_input_dim"] = int(critic_head.input_dim)
        structure["critic_hidden_sizes"] = [int(size) for size in critic_head.hidden_sizes]
        structure["critic_activation"] = critic_head.activation
    return structure


def register_denoiser_hooks(accelerator, pipeline, denoiser: torch.nn.Module):
    """Checkpoints hold the (prepared) `denoiser` as `pipeline` saves it (`save_denoiser`: the LoRA in diffusers
    format, or the whole denoiser) instead of accelerate's `model.safetensors`; the other models stay accelerate's."""

    def index_of(models) -> int:
        target = accelerator.unwrap_model(denoiser)
        return next(i for i, m in enumerate(models) if accelerator.unwrap_model(m) is target)

    def save(models, weights, output_dir):
        index = index_of(models)
        pipeline.save_denoiser(accelerator.unwrap_model(models[index]), output_dir)
        weights.pop(index)

    def load(models, input_dir):
        index = index_of(models)
        pipeline.load_denoiser(accelerator.unwrap_model(models[index]), input_dir)
        models.pop(index)

    accelerator.register_save_state_pre_hook(save)
    accelerator.register_load_state_pre_hook(load)


def warn_unsaved_epochs(epochs: int, save_freq: int):
    """Warn when checkpointing every `save_freq` epochs leaves the last epochs of `epochs` unsaved."""
    unsaved = epochs % save_freq
    if unsaved and epochs >= save_freq:
        logger.warning(
            f"num_epochs {epochs} is not a multiple of save_freq {save_freq}: the last {unsaved} epoch(s) are not "
            "checkpointed, so a resume cannot continue from them; save the result with save_pretrained "
            "(`--save_dir`) or choose a save_freq that divides the epochs"
        )


class CheckpointedState:
    """Every piece of state a checkpoint holds besides models and optimizers, saved as one dict keyed by name (so a
    callback added after construction, or in another order, gets its own state back).

    `add(key, obj)` registers an object with `state_dict` / `load_state_dict`; a state loaded before its object was
    added (e.g. a callback added after `resume_from`) is handed to it when it is added. Resuming without an object
    the checkpoint expects, or with one it holds no state for, is refused, naming them.
    """

    FORMAT = 2  # 1: one accelerate custom object per piece of state, in registration order

    def __init__(self):
        self.objects: dict[str, object] = {}
        self.pending: dict[str, dict] = {}  # loaded states whose object is not added yet

    def add(self, key: str, obj):
        if key in self.objects:
            raise ValueError(f"two pieces of checkpointed state are named {key!r}")
        self.objects[key] = obj
        if key in self.pending:
            obj.load_state_dict(self.pending.pop(key))

    def add_callback(self, callback):
        """A callback with `state_dict` and `load_state_dict`, keyed by its class (and rank among its class)."""
        if not (hasattr(callback, "state_dict") and hasattr(callback, "load_state_dict")):
            return
        name = f"callback/{type(callback).__name__}"
        same = sum(key == name or key.startswith(f"{name}/") for key in self.objects)
        self.add(name if not same else f"{name}/{same}", callback)

    def state_dict(self) -> dict:
        return {"format": self.FORMAT, "states": {key: obj.state_dict() for key, obj in self.objects.items()}}

    def load_state_dict(self, state: dict):
        if not (isinstance(state, dict) and state.get("format") == self.FORMAT):  # a format-1 file of one object
            return self.load_in_order([state])
        states = state["states"]
        missing = [key for key in self.objects if key not in states]
        if missing:
            raise CheckpointError(
                f"the checkpoint holds no state for {missing} (it holds {sorted(states)}); resume with the same "
                "callbacks, tasks and regularizers it was written with"
            )
        for key, obj in self.objects.items():
            obj.load_state_dict(states[key])
        self.pending = {key: value for key, value in states.items() if key not in self.objects}

    def check_all_restored(self):
        """Refuse to train on while the checkpoint holds state that no object of this run took back."""
        if self.pending:
            raise CheckpointError(
                f"the checkpoint holds state for {sorted(self.pending)}, which this run does not have; resume with "
                "the same callbacks, tasks and regularizers it was written with"
            )

    def load_in_order(self, states: list):
        """Format 1 (checkpoints written before the state was named): one state per object, in registration order."""
        if len(states) != len(self.objects):
            raise CheckpointError(
                f"the checkpoint holds {len(states)} pieces of state, this run has {len(self.objects)} "
                f"({list(self.objects)}); resume with the same callbacks, tasks and regularizers it was written with"
            )
        for obj, state in zip(self.objects.values(), states):
            obj.load_state_dict(state)


class _LoadedState:
    """Receives one custom state from accelerate's `load_state`."""

    state = None

    def load_state_dict(self, state):
        self.state = state


def load_checkpoint(accelerator, path: str, state: CheckpointedState):
    """`accelerator.load_state(path)` with `state` registered as the checkpoint's one custom object; a format-1
    checkpoint (several `custom_checkpoint_<i>.pkl`, written before the state was named) loads in order."""
    files = [name for name in os.listdir(path) if re.fullmatch(r"custom_checkpoint_\d+\.pkl", name)]
    if len(files) <= 1:
        accelerator.load_state(path)
        return
    registered, receivers = accelerator._custom_objects, [_LoadedState() for _ in files]
    accelerator._custom_objects = receivers
    try:
        accelerator.load_state(path)
    finally:
        accelerator._custom_objects = registered
    state.load_in_order([receiver.state for receiver in receivers])
