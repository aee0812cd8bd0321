"""Samples in the tracker: each epoch's images with their prompts and rewards, and the held-out grid.

Reward hacking shows in the images before it shows in the numbers. `TrackerImageLogger` is a callback that also
serves as the trainer's `image_samples_hook` (it installs itself when training begins): every `every` epochs it sends
the tracker (tensorboard, wandb, ... through accelerate) a captioned grid of the epoch's samples under `samples` (or
`samples/<task>` with several tasks) and, whenever held-out evaluation runs, its grid under `heldout`.
"""

import textwrap

import numpy as np
import torch
from PIL import Image, ImageDraw

from .evaluation import image_grid
from .trainer_callback import TDPOCallback


CELL = 128  # pixels: small images are enlarged so that the caption below them is readable


def captioned_grid(images: torch.Tensor, captions: list[str], columns: int = 4) -> np.ndarray:
    """`(N, 3, H, W)` in [0, 1] and one caption per image -> an `(H', W', 3)` uint8 grid, each image enlarged to at
    least `CELL` pixels wide with its caption (wrapped, up to three lines) below it."""
    scale = max(1, CELL // images.shape[-1])
    cells = []
    for image, caption in zip(images, captions):
        picture = (image_grid(image[None].float().cpu(), 1, scale) * 255).round().to(torch.uint8)
        picture = Image.fromarray(picture.permute(1, 2, 0).numpy())
        lines = textwrap.wrap(caption, width=max(8, picture.width // 7))[:3]
        cell = Image.new("RGB", (picture.width, picture.height + 12 * len(lines) + 4), "white")
        cell.paste(picture, (0, 0))
        draw = ImageDraw.Draw(cell)
        for i, line in enumerate(lines):
            draw.text((2, picture.height + 2 + 12 * i), line, fill="black")
        cells.append(cell)
    width, height = max(c.width for c in cells), max(c.height for c in cells)
    rows = (len(cells) + columns - 1) // columns
    grid = Image.new("RGB", (min(len(cells), columns) * width, rows * height), "white")
    for i, cell in enumerate(cells):
        grid.paste(cell, ((i % columns) * width, (i // columns) * height))
    return np.asarray(grid)


def log_image(accelerator, tag: str, image: np.ndarray, step: int):
    """Send one `(H, W, 3)` uint8 image to every tracker that takes images."""
    for tracker in accelerator.trackers:
        if not hasattr(tracker, "log_images"):
            continue
        if tracker.name == "tensorboard":
            tracker.log_images({tag: image[None]}, step=step, dataformats="NHWC")
        else:  # wandb, comet, aim, ...: a list of images
            tracker.log_images({tag: [image]}, step=step)


class TrackerImageLogger(TDPOCallback):
    """Log each epoch's samples (prompt and reward under each image) and the held-out grid to the trackers.

    Args:
        every: log every `every` epochs (the first epoch always).
        max_images: samples per grid (the first of the epoch's main-process samples).
    """

    def __init__(self, every: int = 1, max_images: int = 16):
        if every < 1 or max_images < 1:
            raise ValueError(f"`every` and `max_images` must be >= 1, got {every} and {max_images}")
        self.every, self.max_images = every, max_images
        self._grids: list[np.ndarray] = []  # this epoch's sample grids, one per task
        self._epoch = 0

    def on_train_begin(self, trainer, *, epoch: int, **kwargs):
        if trainer.image_samples_callback is None:
            trainer.image_samples_callback = self
        self._epoch = epoch

    def on_epoch_begin(self, trainer, *, epoch: int, **kwargs):
        self._epoch, self._grids = epoch, []

    def _due(self) -> bool:
        return self._epoch % self.every == 0

    def __call__(self, prompt_image_data, global_step, tracker):
        """The `image_samples_hook`: `prompt_image_data` is `[[images, prompts, prompt_metadata, rewards,
        reward_metadata], ...]`, one entry per sampling batch of one task."""
        if not self._due():
            return
        images = torch.cat([batch[0] for batch in prompt_image_data])[: self.max_images]
        prompts = [prompt for batch in prompt_image_data for prompt in batch[1]][: self.max_images]
        rewards = torch.cat([torch.as_tensor(batch[3]).flatten().float().cpu() for batch in prompt_image_data])
        captions = [f"{reward:.3g} | {prompt}" for prompt, reward in zip(prompts, rewards.tolist())]
        self._grids.append(captioned_grid(images, captions))

    def on_log(self, trainer, *, logs: dict, step: int, **kwargs):
        """After the epoch's metrics, at their step: the sample grids (every `every` epochs) and the held-out grids of
        this epoch, whenever evaluation ran (`eval_freq`)."""
        if not trainer.accelerator.is_main_process:
            return
        names = [task.name for task in trainer.tasks]
        for name, grid in zip(names, self._grids):  # empty unless this epoch is due
            log_image(trainer.accelerator, f"samples/{name}" if len(names) > 1 else "samples", grid, step)
        evaluated, heldout = trainer.heldout.latest  # the held-out images, if evaluation ran this epoch
        for name, images in heldout.items() if evaluated == self._epoch else ():
            grid = Image.fromarray((image_grid(images) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy())
            scale = max(1, CELL // min(grid.size))  # at the model's resolution: enlarged to be seen
            grid = grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)
            log_image(trainer.accelerator, f"heldout/{name}" if len(names) > 1 else "heldout", np.asarray(grid), step)
        self._grids = []
