"""Regularizers against reward over-optimization.

- Pretraining loss (Zhang et al., "Large-scale Reinforcement Learning for Diffusion Models", 2024): every policy
  update also takes the diffusion model's own denoising loss on a batch of image-caption pairs, through the same
  LoRA, weighted by `pretrain_loss_coef`. It pulls the model back towards the data it was trained on.
- KL to the reference policy: the per-step KL between the current and the base model's Gaussian transitions (the
  family's `transition`), in closed form, weighted by `kl_coef`. The reference is the base denoiser with the LoRA
  disabled (no second copy), or a frozen copy of it for full training.
"""

import logging
import os
from contextlib import contextmanager
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F

from .registry import Registry


logger = logging.getLogger(__name__)


class PretrainingData:
    """Seeded batches of `(images, captions)` for the pretraining loss; its position travels with checkpoints.

    Args:
        dataset: a `datasets.Dataset` (map-style) with an image column (PIL images or arrays) and a caption column.
        batch_size: image-caption pairs per batch.
        resolution: images are resized to `resolution` x `resolution` and scaled to [-1, 1].
        seed: seed of the data order (a new permutation per pass) and of the loss's noise and timesteps.
    """

    def __init__(
        self, dataset, batch_size: int, resolution: int, seed: int = 0, image_column="image", caption_column="text"
    ):
        missing = {image_column, caption_column} - set(dataset.column_names)
        if missing:
            raise ValueError(
                f"the pretraining dataset has columns {dataset.column_names}; {sorted(missing)} missing (set "
                "`pretrain_image_column` / `pretrain_caption_column`)"
            )
        if len(dataset) < 1:
            raise ValueError("the pretraining dataset is empty")
        self.dataset, self.batch_size, self.resolution, self.seed = dataset, batch_size, resolution, seed
        self.image_column, self.caption_column = image_column, caption_column
        self.epoch, self.position = 0, 0  # pass over the data, and the next index in its permutation
        self.generator = torch.Generator().manual_seed(seed)  # noise and timesteps of the loss
        self._order_of = (None, None)  # (pass, its permutation): drawn once per pass, not per batch

    def _order(self) -> np.ndarray:
        if self._order_of[0] != self.epoch:
            rng = np.random.default_rng([self.seed, self.epoch])
            self._order_of = (self.epoch, rng.permutation(len(self.dataset)))
        return self._order_of[1]

    def next_batch(self) -> tuple[torch.Tensor, list[str]]:
        """`(images (B, 3, R, R) in [-1, 1], captions)`, continuing where the last batch ended. A row whose image
        cannot be decoded (a corrupt file) is skipped with a warning; a dataset with none that can is an error."""
        images, captions, unreadable_in_a_row = [], [], 0
        while len(images) < self.batch_size:
            index = self._next_index()
            try:
                row = self.dataset[index]
                image = self._to_tensor(row[self.image_column])
            except (OSError, ValueError, SyntaxError) as err:  # PIL's UnidentifiedImageError is an OSError
                unreadable_in_a_row += 1
                if unreadable_in_a_row >= len(self.dataset):
                    raise ValueError(
                        f"no image of the pretraining dataset can be decoded (row {index}: {err})"
                    ) from err
                logger.warning(f"pretraining dataset row {index}: its image cannot be decoded ({err}); skipped")
                continue
            unreadable_in_a_row = 0
            images.append(image)
            captions.append(str(row[self.caption_column]))
        return torch.stack(images), captions

    def _next_index(self) -> int:
        """The next row of this pass's permutation (a new pass starts after the last)."""
        order = self._order()
        index = int(order[self.position])
        self.position += 1
        if self.position >= len(order):
            self.epoch, self.position = self.epoch + 1, 0
        return index

    def _to_tensor(self, image: Any) -> torch.Tensor:
        array = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image, dtype=np.float32)
        tensor = torch.from_numpy(array).permute(2, 0, 1) / 255.0  # (3, H, W) in [0, 1]
        if tensor.shape[1:] != (self.resolution, self.resolution):
            tensor = F.interpolate(tensor[None], size=(self.resolution,) * 2, mode="bilinear", antialias=True)[0]
        return tensor * 2 - 1

    @classmethod
    def from_config(cls, config, resolution: int) -> "PretrainingData":
        """The data a `TDPOConfig` names (`pretrain_dataset`, its split, columns and batch size), at `resolution`."""
        dataset = load_pretraining_dataset(config.pretrain_dataset, config.pretrain_dataset_split)
        return cls(
            dataset,
            config.pretrain_batch_size,
            resolution=resolution,
            seed=config.seed,
            image_column=config.pretrain_image_column,
            caption_column=config.pretrain_caption_column,
        )

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict):
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self.generator.set_state(state["generator"])


# name -> a function returning a map-style `datasets.Dataset` of image-caption pairs (e.g. the digits plugin's
# "digits": the shipped model's training digits)
PRETRAINING_DATASETS = Registry("pretraining dataset")


def load_pretraining_dataset(spec: str, split: str = "train"):
    """A map-style `datasets.Dataset` of image-caption pairs: a name in `PRETRAINING_DATASETS` (`"digits"`: the shipped
    model's training digits), `"imagefolder:<dir>"` (images with a `metadata.jsonl` holding a `text` column), a folder
    written by `Dataset.save_to_disk`, or a Hub id / local dataset."""
    if spec in PRETRAINING_DATASETS:
        return PRETRAINING_DATASETS[spec]()
    from datasets import load_dataset, load_from_disk

    try:
        if os.path.isfile(os.path.join(spec, "dataset_info.json")) or os.path.isfile(os.path.join(spec, "state.json")):
            return load_from_disk(spec)
        if spec.startswith("imagefolder:"):
            return load_dataset("imagefolder", data_dir=spec.split(":", 1)[1], split=split)
        return load_dataset(spec, split=split)
    except (FileNotFoundError, ValueError, OSError) as err:
        raise ValueError(
            f"`pretrain_dataset` {spec!r} could not be loaded: expected 'digits', 'imagefolder:<dir>', or a dataset "
            f"id or folder ({type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''})"
        ) from err


@torch.no_grad()
def pretraining_inputs(pipeline, images: torch.Tensor, captions: list[str], generator: torch.Generator, device):
    """What the diffusion model's own training loss needs for `images` `(B, 3, H, W)` in [-1, 1] and `captions`:
    `(denoiser_inputs, target)`, noised at uniformly drawn training timesteps; the target is what the model predicts
    (noise, or v for v-prediction models). The denoiser's MSE to `target` on these inputs is the pretraining loss.
    `pipeline` is a tdpo_trl pipeline wrapper: its family encodes the images and captions."""
    latents = pipeline.encode_images(images.to(device))
    _, conditioning = pipeline.encode_prompts(captions, device)
    noise = torch.randn(latents.shape, generator=generator).to(device, latents.dtype)
    timesteps = torch.randint(0, pipeline.scheduler.config.num_train_timesteps, (len(latents),), generator=generator)
    timesteps = timesteps.to(device)
    noisy, target = pipeline.training_target(latents, noise, timesteps)
    return pipeline.denoiser_inputs(noisy, timesteps, conditioning, cfg=False), target


def transition_kl(pipeline, output: torch.Tensor, reference_output: torch.Tensor, timesteps, sample, eta: float):
    """KL(p_theta(x_{t-1} | x_t) || p_ref(x_{t-1} | x_t)) per sample `(B,)`, averaged over latent dimensions (as
    DDPO averages log-probs). Both transitions share their standard deviation, so KL = (mu - mu_ref)^2 / (2 std^2).
    `pipeline`: a tdpo_trl pipeline wrapper (its `transition` gives each step's mean and standard deviation)."""
    mean, std = pipeline.transition(output, timesteps, sample, eta=eta)
    reference_mean, _ = pipeline.transition(reference_output, timesteps, sample, eta=eta)
    kl = (mean.float() - reference_mean.float()) ** 2 / (2 * std.float() ** 2)
    return kl.mean(dim=tuple(range(1, kl.ndim)))


@contextmanager
def reference_policy(unet, reference_unet: Optional[torch.nn.Module] = None):
    """The base model: `reference_unet` if given (full-UNet training keeps a frozen copy), else `unet` with its LoRA
    adapters disabled for the duration of the block."""
    if reference_unet is not None:
        yield reference_unet
        return
    unet.disable_adapters()
    try:
        yield unet
    finally:
        unet.enable_adapters()


class ReferenceKL:
    """The KL between the policy's and the base model's transitions, per denoising step (`kl_coef`).

    Args:
        pipeline: the `TDPOPipeline` (its `predict`, `denoiser_inputs` and `transition`).
        reference_denoiser: a frozen copy of the base denoiser (full training), or None (LoRA: the adapter is
            disabled instead).
        eta: the sampler's noise level.
        guided: `(2B, ...)` prediction -> `(B, ...)`: the guidance the update applies (identity when unguided).
        autocast: the trainer's autocast context.
    """

    def __init__(self, pipeline, reference_denoiser, eta: float, guided, autocast):
        self.pipeline, self.reference_denoiser, self.eta = pipeline, reference_denoiser, eta
        self.guided, self.autocast = guided, autocast

    def of_prediction(self, denoiser, prediction, inputs, timesteps, latents) -> torch.Tensor:
        """Per-sample KL `(B,)` between the transition `prediction` gives and the base model's on `inputs`."""
        with torch.no_grad(), reference_policy(denoiser, self.reference_denoiser) as reference, self.autocast():
            reference_prediction = self.guided(self.pipeline.predict(reference, inputs))
        return transition_kl(self.pipeline, prediction, reference_prediction, timesteps, latents, self.eta)

    @torch.no_grad()
    def of_rollout(self, denoiser, rollout, conditioning: dict, batch_size: int, cfg: bool) -> torch.Tensor:
        """KL to the base model of every sampled transition of `rollout`, `(N, T)` (`kl_penalty="reward"`)."""
        num_samples, num_steps = rollout["timesteps"].shape
        kl = torch.zeros(num_samples, num_steps, device=rollout["timesteps"].device)
        for start in range(0, num_samples, batch_size):
            rows = slice(start, start + batch_size)
            batch_conditioning = {k: v[rows] for k, v in conditioning.items()}
            for j in range(num_steps):
                latents, timesteps = rollout["latents"][rows, j], rollout["timesteps"][rows, j]
                inputs = self.pipeline.denoiser_inputs(latents, timesteps, batch_conditioning, cfg)
                with self.autocast():
                    prediction = self.guided(self.pipeline.predict(denoiser, inputs))
                kl[rows, j] = self.of_prediction(denoiser, prediction, inputs, timesteps, latents)
        return kl
