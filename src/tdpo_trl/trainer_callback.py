"""Callbacks for `TDPOTrainer`.

TRL's `DDPOTrainer` is not a `transformers.Trainer`, so `transformers.TrainerCallback` hooks never fire on it.
`TDPOTrainer` calls the hooks of `TDPOCallback` itself. The event names are transformers'; every hook receives the
trainer (its `critic`, `critic_head`, `critic_optimizer`, `accelerator`, `config`, ...) and keyword arguments.
"""

import json
import math
import os
from typing import Any


class TDPOCallback:
    """Base class of `TDPOTrainer` callbacks; override the events you need. Order of events in `train()`:

    `on_train_begin`, then per epoch `on_epoch_begin`, `on_step_end` after every optimizer step, `on_epoch_end`
    after the inner epochs (before logging), `on_log`, `on_save` when a checkpoint was written; at last
    `on_train_end`.

    A callback with `state_dict()` and `load_state_dict()` is saved in every checkpoint and restored on resume.

    Example:
        ```python
        from tdpo_trl import TDPOCallback


        class PrintValueStd(TDPOCallback):
            def on_epoch_end(self, trainer, epoch, samples, metrics, **kwargs):
                values = samples["values"]  # (n_local, T): V(x_t) recorded at sampling time
                metrics["critic/my_value_std"] = values.std().item()  # logged with the epoch's metrics
        ```
    """

    def on_train_begin(self, trainer, *, epoch: int, global_step: int, **kwargs):
        """Before the first epoch of `train()`; `epoch` is the first epoch to run (> 0 after a resume)."""

    def on_epoch_begin(self, trainer, *, epoch: int, global_step: int, **kwargs):
        """Before sampling an epoch."""

    def on_step_end(self, trainer, *, epoch: int, inner_epoch: int, global_step: int, **kwargs):
        """After every optimizer step; `global_step` counts optimizer steps."""

    def on_epoch_end(self, trainer, *, epoch: int, global_step: int, samples: dict, metrics: dict, **kwargs):
        """After an epoch's inner epochs. `samples` holds this process's tensors of the epoch (`critic_features`
        `(n, T, D)`, `values`, `returns`, `advantages` `(n, T)`, ...); keys added to `metrics` are logged."""

    def on_log(self, trainer, *, logs: dict[str, float], step: int, **kwargs):
        """After metrics were sent to the trackers."""

    def on_save(self, trainer, *, output_dir: str, epoch: int, global_step: int, **kwargs):
        """After a checkpoint was written to `output_dir`."""

    def on_train_end(self, trainer, *, epoch: int, global_step: int, **kwargs):
        """After the last epoch of `train()`."""


EVENTS = tuple(name for name in vars(TDPOCallback) if name.startswith("on_"))


def check_callbacks(callbacks) -> list[TDPOCallback]:
    """Instances of `TDPOCallback` (classes are instantiated); anything else is rejected with a clear error."""
    checked = []
    for callback in callbacks or ():
        if isinstance(callback, type) and issubclass(callback, TDPOCallback):
            callback = callback()
        if not isinstance(callback, TDPOCallback):
            hint = ""
            if type(callback).__module__.startswith("transformers"):
                hint = (
                    " transformers.TrainerCallback hooks take (args, state, control) and cannot run on a DDPO "
                    "trainer; subclass tdpo_trl.TDPOCallback instead."
                )
            raise TypeError(f"callbacks must be TDPOCallback instances or subclasses, got {callback!r}.{hint}")
        checked.append(callback)
    return checked


def call_event(callbacks: list[TDPOCallback], event: str, trainer: Any, **kwargs):
    for callback in callbacks:
        getattr(callback, event)(trainer, **kwargs)


class JSONLinesLoggerCallback(TDPOCallback):
    """Appends every logged record (one per epoch) to `path` as a JSON line; non-finite numbers become `null`.

    A resumed run first drops the records of the epochs it runs again (those logged after its checkpoint was written,
    before an interruption), so the file holds each epoch once."""

    def __init__(self, path: str):
        self.path = path

    def on_train_begin(self, trainer, *, epoch: int, **kwargs):
        if not trainer.accelerator.is_main_process or not os.path.isfile(self.path):
            return
        with open(self.path, encoding="utf-8") as f:
            lines = f.readlines()
        kept = [line for line in lines if not line.strip() or json.loads(line).get("epoch", -1) < epoch]
        if len(kept) < len(lines):
            temporary = f"{self.path}.tmp"
            with open(temporary, "w", encoding="utf-8") as f:
                f.writelines(kept)
            os.replace(temporary, self.path)  # all or nothing: an interruption leaves the old file

    def on_log(self, trainer, *, logs: dict[str, float], step: int, **kwargs):
        if not trainer.accelerator.is_main_process:
            return
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        record = {k: v if not isinstance(v, float) or math.isfinite(v) else None for k, v in logs.items()}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
