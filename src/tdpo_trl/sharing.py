"""What a trained run hands to users: the saved folder (`save_trained`), its model card (`model_card_of`) and the
Hub upload (`push_trained`). The trainer's `save_pretrained`, `create_model_card` and `push_to_hub` call these."""

import contextlib
import os
from typing import Optional

from accelerate.logging import get_logger

from . import saving
from .guard import OverOptimizationGuard
from .hub import check_repo_id, push_folder
from .model_card import create_model_card, hub_base_model, trained_reward_names
from .validation import check_finite_weights
from .version import __version__


logger = get_logger(__name__)


def guard_of(trainer) -> Optional[OverOptimizationGuard]:
    """The run's over-optimization guard, if it has one."""
    return next((c for c in trainer.callbacks if isinstance(c, OverOptimizationGuard)), None)


def model_card_of(trainer, base_model: Optional[str] = None, repo_id: Optional[str] = None):
    """A `huggingface_hub.ModelCard` for `trainer`'s adapter (see `tdpo_trl.model_card`)."""
    denoiser = trainer.accelerator.unwrap_model(trainer.denoiser)
    lora_config = denoiser.peft_config.get("default") if getattr(denoiser, "peft_config", None) else None
    guard = guard_of(trainer)
    history = trainer.log_history
    return create_model_card(
        config=trainer.config,
        base_model=base_model or hub_base_model(trainer.sd_pipeline),
        repo_id=repo_id,
        reward_names=trained_reward_names(trainer.tasks, trainer.multi_task),
        use_lora=trainer.sd_pipeline.use_lora,
        lora_config=lora_config,
        start_metrics=history[0] if history else None,
        final_metrics=history[-1] if history else None,
        note=guard.explanation() if guard else None,
        version=__version__,
        pipeline_class=type(trainer.sd_pipeline.diffusers_pipeline).__name__,
        denoiser=(trainer.sd_pipeline.denoiser_name, type(denoiser).__name__),
    )


def save_trained(
    trainer, save_directory: str, merged_pipeline: bool = False, base_model: Optional[str] = None,
    repo_id: Optional[str] = None,
) -> str:  # fmt: skip
    """Write `trainer`'s LoRA (or denoiser), critic head, training config and model card to `save_directory` (the
    guard's kept weights, if it kept any), whole: a previous save there is replaced, not mixed with
    (`saving.write_folder_whole`). Every process calls it; the main process writes."""
    if os.path.isfile(save_directory):
        raise ValueError(f"`save_directory` {save_directory!r} is a file; give a folder")
    accelerator, guard = trainer.accelerator, guard_of(trainer)
    with guard.kept_weights_applied(trainer) if guard else contextlib.nullcontext():
        check_finite_weights(trainer.trained_parameters(), "the trained weights", save_directory)
        if accelerator.is_main_process:
            denoiser = accelerator.unwrap_model(trainer.denoiser)

            def write(folder: str):
                saving.save_policy(trainer.sd_pipeline, denoiser, folder)
                if trainer.critic is not None:
                    head = accelerator.unwrap_model(trainer.critic_head)
                    saving.save_critic_head(head, folder, encoder=trainer.config.critic_encoder)
                saving.save_training_config(trainer.config, folder)
                if merged_pipeline:
                    saving.save_merged_pipeline(trainer.sd_pipeline, denoiser, folder)
                model_card_of(trainer, base_model=base_model, repo_id=repo_id).save(os.path.join(folder, "README.md"))

            saving.write_folder_whole(save_directory, write)  # all or nothing; a previous save is replaced whole
        accelerator.wait_for_everyone()
    return save_directory


def push_trained(trainer, repo_id: str, *, local_dir: Optional[str] = None, merged_pipeline: bool = False,
                 base_model: Optional[str] = None, **upload) -> Optional[str]:  # fmt: skip
    """Save locally (`local_dir`, default `<project_dir>/hub/<repo name>`), then create the repo and upload
    (`upload`: `private`, `token`, `commit_message`, `revision`). Returns the commit URL on the main process."""
    check_repo_id(repo_id)  # before anything is written
    if local_dir is None:
        local_dir = os.path.join(trainer.accelerator.project_dir, "hub", repo_id.split("/")[-1])
    local_dir = os.fspath(local_dir)
    save_trained(trainer, local_dir, merged_pipeline=merged_pipeline, base_model=base_model, repo_id=repo_id)
    url = None
    if trainer.accelerator.is_main_process:
        url = push_folder(local_dir, repo_id, **upload)
        logger.info(f"Pushed {local_dir} to {url}")
    trainer.accelerator.wait_for_everyone()
    return url
