"""Multi-task joint training (Zhang et al. 2024, "Large-scale RL for diffusion models"): one model, several tasks,
each with its own prompts, reward (per-image or distribution-level) and weight.

Each epoch the trainer samples every task with its own prompts, scores each with its own reward, normalizes each
task's rewards on their own, and then updates task by task in turn (`multi_task_update="sequential"`, the paper's
order) or once on all tasks' samples with each task's loss scaled by its weight (`"weighted"`).
"""

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch

from .prompts import RepeatedPrompts, get_prompt_function
from .rewards import get_reward_function
from .tdpo_config import check_prompt_repeats
from .validation import CheckedPromptFunction, describe


@dataclass
class Task:
    """One task of a multi-task run.

    Args:
        name: unique; metrics are logged as `task/<name>/...`.
        reward_function: `(images, prompts, metadata) -> (rewards, metadata)`, or a distribution-level reward.
        prompt_function: `() -> (prompt, metadata)`, e.g. a `tdpo_trl.prompts.PromptSource`.
        weight: > 0; scales this task's policy loss.
        pretrain_loss_weight: >= 0; scales the pretraining loss (`pretrain_loss_coef`) on this task's updates, e.g.
            0 for a task that, trained alone, learns only without it. In a minibatch that mixes tasks
            (`multi_task_update="weighted"`) the minibatch's mean weight applies.
        eval_prompts: held-out prompts of this task: a list, or a prompt spec (built-in set, file); default: the
            config's `eval_prompts`.
    """

    name: str
    reward_function: Callable
    prompt_function: Callable
    weight: float = 1.0
    pretrain_loss_weight: float = 1.0
    eval_prompts: Optional[Union[str, list[str]]] = field(default=None)

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name.strip() or "/" in self.name:
            raise ValueError(f"a task's `name` must be a non-empty string without '/', got {self.name!r}")
        if not callable(self.reward_function):
            raise ValueError(
                f"task {self.name!r}: `reward_function` must be callable, got {describe(self.reward_function)}"
            )
        if self.prompt_function is None or not callable(self.prompt_function):
            raise ValueError(
                f"task {self.name!r} has no prompts: `prompt_function` must be callable, got "
                f"{describe(self.prompt_function)}"
            )
        if (
            isinstance(self.weight, bool)
            or not isinstance(self.weight, (int, float))
            or not math.isfinite(self.weight)
            or self.weight <= 0
        ):
            raise ValueError(f"task {self.name!r}: `weight` must be a finite number > 0, got {self.weight!r}")
        if (
            isinstance(self.pretrain_loss_weight, bool)
            or not isinstance(self.pretrain_loss_weight, (int, float))
            or not math.isfinite(self.pretrain_loss_weight)
            or self.pretrain_loss_weight < 0
        ):
            raise ValueError(
                f"task {self.name!r}: `pretrain_loss_weight` must be a finite number >= 0, got "
                f"{self.pretrain_loss_weight!r}"
            )
        if isinstance(self.eval_prompts, list) and not self.eval_prompts:
            raise ValueError(f"task {self.name!r}: `eval_prompts` is an empty list")


def check_tasks(tasks: Any) -> list[Task]:
    """The tasks as a list, checked: at least one, all `Task`s, names unique."""
    if isinstance(tasks, Task):
        tasks = [tasks]
    tasks = list(tasks or [])
    if not tasks:
        raise ValueError("`tasks` is empty; give at least one Task")
    for task in tasks:
        if not isinstance(task, Task):
            raise TypeError(f"every entry of `tasks` must be a tdpo_trl.Task, got {describe(task)}")
    names = [task.name for task in tasks]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"task names must be unique; {duplicates} appear more than once in {names}")
    return tasks


_TASK_KEYS = {
    "name", "reward", "prompts", "weight", "pretrain_loss_weight", "eval_prompts", "reward_kwargs", "template"
}  # fmt: skip


def _beside(tasks_file: str, value):
    """`value` (a prompts reference) as a path beside `tasks_file` when it names a file there; else unchanged."""
    if isinstance(value, str) and not os.path.isabs(value):
        candidate = os.path.join(os.path.dirname(os.path.abspath(tasks_file)), value)
        if os.path.isfile(candidate):
            return candidate
    return value


def load_tasks(path: str, *, seed: int = 0) -> list[Task]:
    """Tasks from a JSON or YAML file: a list (or `{"tasks": [...]}`) of entries

    ```yaml
    - name: ink
      reward: digit_ink          # a registered name or a dotted path, as `--reward`
      prompts: digits            # a built-in set, a text file or dataset:<id>, as `--prompts`
      weight: 1.0                # optional
      pretrain_loss_weight: 1.0  # optional, scales pretrain_loss_coef on this task's updates
      eval_prompts: digits       # optional
      reward_kwargs: {}          # optional, passed to the reward's constructor
      template: "{}"             # optional prompt template
    ```

    Each task's prompt source is seeded with `seed + its position`, so tasks draw independent streams. A relative
    prompts file is looked up beside the tasks file first, then in the working directory.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"tasks file {path!r} does not exist")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if path.endswith((".yaml", ".yml")):
        import yaml

        try:
            entries = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ValueError(f"tasks file {path!r} is not valid YAML ({' '.join(str(err).split())})") from None
    else:
        try:
            entries = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"tasks file {path!r} is not valid JSON ({err}); use .yaml/.yml for YAML") from None
    if isinstance(entries, dict):
        entries = entries.get("tasks")
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"tasks file {path!r} must hold a non-empty list of tasks (or {{'tasks': [...]}})")
    tasks = []
    for position, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise ValueError(f"tasks file {path!r}: entry {position} must be a mapping, got {describe(entry)}")
        unknown = set(entry) - _TASK_KEYS
        if unknown:
            raise ValueError(f"tasks file {path!r}: entry {position} has unknown keys {sorted(unknown)}; "
                             f"expected some of {sorted(_TASK_KEYS)}")  # fmt: skip
        for key in ("name", "reward", "prompts"):
            if not entry.get(key):
                raise ValueError(f"tasks file {path!r}: entry {position} ({entry.get('name', '?')!r}) has no {key!r}")
        where = f"tasks file {path!r}: entry {position} ({entry['name']!r})"
        reward_kwargs = entry.get("reward_kwargs", {})
        if not isinstance(reward_kwargs, dict):
            raise ValueError(f"{where}: `reward_kwargs` must be a mapping, got {describe(reward_kwargs)}")
        try:
            reward_function = get_reward_function(entry["reward"], **reward_kwargs)
            prompt_function = get_prompt_function(
                _beside(path, entry["prompts"]), template=entry.get("template", "{}"), seed=seed + position
            )
        except (ValueError, FileNotFoundError) as err:
            raise ValueError(f"{where}: {err}") from None
        tasks.append(
            Task(
                name=entry["name"],
                reward_function=reward_function,
                prompt_function=prompt_function,
                weight=entry.get("weight", 1.0),
                pretrain_loss_weight=entry.get("pretrain_loss_weight", 1.0),
                eval_prompts=_beside(path, entry.get("eval_prompts")),
            )
        )
    return check_tasks(tasks)


__all__ = ["Task", "check_tasks", "load_tasks"]


class TaskPrompts:
    """Per task of a run: how many consecutive samples each drawn prompt fills (`repeats`: `config.prompt_repeats`,
    or the reward's `default_prompt_repeats` for distribution-level rewards, else 1), its prompt source grouped
    that way (`sources`, whose state checkpoints hold) and the same with every `(prompt, metadata)` checked
    (`checked`)."""

    def __init__(self, tasks: list[Task], config):
        batch = config.sample_batch_size * config.sample_num_batches_per_epoch
        self.repeats = []
        for task in tasks:
            repeats = config.prompt_repeats or getattr(task.reward_function, "default_prompt_repeats", 1)
            check_prompt_repeats(repeats, batch)
            self.repeats.append(repeats)
        self.sources = [
            RepeatedPrompts(task.prompt_function, k) if k > 1 else task.prompt_function
            for task, k in zip(tasks, self.repeats)
        ]
        self.checked = [CheckedPromptFunction(source) for source in self.sources]


def pretrain_weight_of(tasks: list[Task], task_index: torch.Tensor) -> float:
    """The pretraining loss's weight on a minibatch: the mean `pretrain_loss_weight` of its samples' tasks
    (`task_index` `(B,)`)."""
    weights = [task.pretrain_loss_weight for task in tasks]
    if all(w == weights[0] for w in weights):
        return float(weights[0])
    return float(torch.tensor(weights)[task_index.cpu()].mean())
