"""Held-out evaluation during training: fixed, seeded prompts per task, sampled by the model as it stands and scored
by the task's own reward (`target`) and the out-of-domain judges."""

import os
from collections.abc import Callable
from typing import Optional

from .evaluation import mean_std, sample_images, save_image_grid, score_images
from .prompts import RepeatedPrompts, get_prompt_function


class HeldoutEvaluator:
    """Samples and scores each task's held-out prompts. Seeded on its own: the training RNG is untouched.

    Args:
        config: the run's `TDPOConfig` (`eval_prompts`, `eval_num_prompts`, `eval_seed` and the sampling settings).
        tasks: the run's `Task`s; a task's own `eval_prompts` replaces the config's.
        prompt_repeats: per task, how many consecutive samples each drawn prompt fills (as its training prompts).
        eval_rewards: the out-of-domain judges, by metric name.
    """

    def __init__(self, config, tasks: list, prompt_repeats: list[int], eval_rewards: dict[str, Callable]):
        self.config, self.tasks, self.prompt_repeats, self.eval_rewards = config, tasks, prompt_repeats, eval_rewards
        self._prompts: dict[int, list[str]] = {}  # per task, drawn once
        self.latest: tuple = (None, {})  # (epoch, {task name: (N, 3, H, W) images on the CPU}) of the last evaluation

    def prompts(self, index: int) -> list[str]:
        """Task `index`'s held-out prompts: its `eval_prompts` (a list, or a spec drawn `eval_num_prompts` times
        with `eval_seed`), else the config's `eval_prompts`. Repeated as the task's training prompts are."""
        if index not in self._prompts:
            config, task = self.config, self.tasks[index]
            spec = task.eval_prompts if task.eval_prompts is not None else config.eval_prompts
            if isinstance(spec, (list, tuple)):
                prompts = list(spec)
            else:
                repeats = self.prompt_repeats[index]
                source = RepeatedPrompts(get_prompt_function(spec, seed=config.eval_seed), repeats)
                prompts = [source()[0] for _ in range(max(config.eval_num_prompts, repeats))]
            self._prompts[index] = prompts
        return self._prompts[index]

    def evaluate(self, pipeline, autocast, device, grid_folder: Optional[str] = None, epoch=None) -> list:
        """Per task, `heldout/<name>/mean|std` (`target` for the task's reward). With `grid_folder`, also an image
        grid per task, `epoch_<epoch>.png` (`<task>_epoch_<epoch>.png` with several tasks)."""
        config, results, sampled = self.config, [], {}
        for index, task in enumerate(self.tasks):
            prompts = self.prompts(index)
            with pipeline.offloaded_modules_on(device), autocast():
                images = sample_images(
                    pipeline.diffusers_pipeline,
                    prompts,
                    seed=config.eval_seed,
                    num_inference_steps=config.sample_num_steps,
                    guidance_scale=config.sample_guidance_scale,
                    eta=config.sample_eta,
                    batch_size=config.sample_batch_size,
                    resolution=pipeline.image_resolution(),
                )
            scores = score_images({"target": task.reward_function, **self.eval_rewards}, images.to(device), prompts)
            if grid_folder is not None:
                name = f"{task.name}_epoch_{epoch}.png" if len(self.tasks) > 1 else f"epoch_{epoch}.png"
                save_image_grid(images, os.path.join(grid_folder, name))
            results.append(mean_std(scores, "heldout"))
            sampled[task.name] = images
        self.latest = (epoch, sampled)  # what `TrackerImageLogger` shows
        return results
