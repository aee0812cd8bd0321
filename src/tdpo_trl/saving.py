"""What `TDPOTrainer.save_pretrained` writes, and how to read it back. State-dict I/O only; no training logic.

A saved folder holds:
- `pytorch_lora_weights.safetensors`: the policy's LoRA in diffusers format (`pipe.load_lora_weights(folder)`), or
  `unet/` (`transformer/` for SD3: the diffusers model) when the whole denoiser was trained;
- `critic_head.safetensors` and `critic_config.json`: the critic's trained head (`load_critic_head`);
- `tdpo_config.json`: the training configuration;
- `README.md`: the model card.
"""

import copy
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .disk_space import disk_full_error
from .modeling_critic import ValueHead
from .pipelines import LORA_WEIGHT_NAME


CRITIC_WEIGHTS_NAME = "critic_head.safetensors"
CRITIC_CONFIG_NAME = "critic_config.json"
TRAINING_CONFIG_NAME = "tdpo_config.json"
MERGED_PIPELINE_DIR = "merged_pipeline"


def json_safe(value: Any) -> Any:
    """Config values as strict JSON: non-finite floats become None (for `train_adv_clip_max`, None means the same)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def save_training_config(config, save_directory: str) -> str:
    path = os.path.join(save_directory, TRAINING_CONFIG_NAME)
    with open(path, "w") as f:
        json.dump(json_safe(config.to_dict()), f, indent=2, sort_keys=True, allow_nan=False)
    return path


def save_critic_head(head: ValueHead, save_directory: str, encoder: str) -> None:
    """The head's weights (safetensors) and what rebuilds it (JSON: `ValueHead.config` plus the encoder name)."""
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in head.state_dict().items()}
    save_file(state, os.path.join(save_directory, CRITIC_WEIGHTS_NAME), metadata={"format": "pt"})
    with open(os.path.join(save_directory, CRITIC_CONFIG_NAME), "w") as f:
        json.dump({**head.config, "encoder": encoder}, f, indent=2)


def load_critic_head(directory: str) -> tuple[ValueHead, str]:
    """`(head, encoder_name)` from a folder written by `save_critic_head`."""
    config_path = os.path.join(directory, CRITIC_CONFIG_NAME)
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"no {CRITIC_CONFIG_NAME} in {directory!r}: was it saved with a critic (TDPO mode)?")
    with open(config_path) as f:
        config = json.load(f)
    encoder = config.pop("encoder")
    head = ValueHead(
        config["input_dim"],
        tuple(config["hidden_sizes"]),
        tuple(config["dropout"]),
        config["activation"],
        config.get("num_outputs", 1),  # one value per task of a multi-task run
    )
    head.load_state_dict(load_file(os.path.join(directory, CRITIC_WEIGHTS_NAME)))
    return head, encoder


def save_policy(pipeline, denoiser: torch.nn.Module, save_directory: str) -> str:
    """The LoRA in diffusers format (or `unet/` / `transformer/` for full-denoiser training), through the family's
    writer (`TDPOPipeline.save_denoiser`: `get_peft_model_state_dict` -> `convert_state_dict_to_diffusers` ->
    `save_lora_weights`). Returns the path."""
    pipeline.save_denoiser(denoiser, save_directory)
    return os.path.join(save_directory, LORA_WEIGHT_NAME if pipeline.use_lora else pipeline.denoiser_name)


def save_merged_pipeline(pipeline, denoiser: torch.nn.Module, save_directory: str) -> str:
    """A full diffusers pipeline with the LoRA fused into a copy of the denoiser; the training one is untouched."""
    diffusers_pipeline = pipeline.diffusers_pipeline
    merged = copy.deepcopy(denoiser)
    if pipeline.use_lora:
        merged.fuse_lora()
        merged.unload_lora()  # plain diffusers modules, loadable as a base model
    components = {**diffusers_pipeline.components, pipeline.denoiser_name: merged}
    path = os.path.join(save_directory, MERGED_PIPELINE_DIR)
    type(diffusers_pipeline)(**components).save_pretrained(path)
    return path


def write_folder_whole(save_directory: str, write: Callable[[str], None]) -> str:
    """Call `write(folder)` on a staging folder beside `save_directory`, then put it in place whole: a new or empty
    folder, or a previous save (it holds `tdpo_config.json`), which is replaced entirely, so no stale file of it
    remains. A folder holding anything else is refused, untouched; a failed write leaves `save_directory` as it was."""
    save_directory = os.path.abspath(save_directory)
    if os.path.isdir(save_directory) and os.listdir(save_directory):
        if not os.path.isfile(os.path.join(save_directory, TRAINING_CONFIG_NAME)):
            found = sorted(os.listdir(save_directory))[:4]
            raise FileExistsError(
                f"`save_directory` {save_directory!r} holds files that are not a tdpo-trl save ({found}); give a new "
                "or empty folder, or a previous save to replace"
            )
    parent, name = os.path.split(save_directory)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{name}.partial-", dir=parent)
    try:
        write(staging)
    except BaseException as err:
        kept = f"{save_directory!r} is as it was; the partial save is removed"
        disk_full = (
            disk_full_error(err, parent, f"a save to {save_directory!r}", kept) if isinstance(err, Exception) else None
        )
        shutil.rmtree(staging, ignore_errors=True)
        if disk_full is None:
            raise
        raise disk_full from err
    previous = None
    if os.path.isdir(save_directory):
        previous = tempfile.mkdtemp(prefix=f".{name}.previous-", dir=parent)
        os.replace(save_directory, os.path.join(previous, name))
    os.replace(staging, save_directory)
    if previous:
        shutil.rmtree(previous, ignore_errors=True)
    return save_directory
