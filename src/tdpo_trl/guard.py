"""`OverOptimizationGuard`: watch out-of-domain judges on the held-out prompts and stop (or keep the best weights)
when they fall while the target reward rises."""

import math
from contextlib import contextmanager
from typing import Optional

import torch

from .trainer_callback import TDPOCallback


class OverOptimizationGuard(TDPOCallback):
    """Stops training, or marks the best weights, when the reward is being over-optimized.

    Before the first epoch the guard scores the base model on the fixed held-out prompts
    (`TDPOTrainer.evaluate_heldout`); at every held-out evaluation (`eval_freq`) it compares. An evaluation is
    *flagged* when the target reward is above its start while some judge fell more than its tolerance below its
    start. Among the evaluations that are not flagged, the one with the highest target is *kept*: its trained weights
    are copied (to CPU), and `save_pretrained` / `push_to_hub` write them, naming the kept epoch and why in the
    model card, when a later evaluation was flagged.

    Args:
        tolerances: `{judge: allowed drop}`; judges are names of `eval_reward_functions` (held-out metric
            `heldout/<judge>/mean`), e.g. `{"digit_accuracy": 0.05, "digit_realism": 0.3}`.
        action: `"stop"` ends training after the first flagged evaluation; `"mark"` trains on.
        lower_is_better: judges for which lower is better (e.g. a distance); their rise is the drop.
        task: in a multi-task run, the task whose held-out evaluation is watched (`task/<task>/heldout/...`); needed
            there, since each task has its own target. Its kept weights are the whole model's, as all tasks share it.

    Logged at each held-out evaluation: `guard/flagged` (0/1), `guard/kept_epoch`, `guard/<judge>/drop`.
    """

    def __init__(
        self,
        tolerances: dict[str, float],
        action: str = "stop",
        lower_is_better: tuple[str, ...] = (),
        task: Optional[str] = None,
    ):
        if not tolerances:
            raise ValueError("OverOptimizationGuard needs at least one judge in `tolerances`")
        for name, tolerance in tolerances.items():
            if not (isinstance(tolerance, (int, float)) and math.isfinite(tolerance) and tolerance >= 0):
                raise ValueError(f"tolerance of {name!r} must be a finite number >= 0, got {tolerance!r}")
        if action not in ("stop", "mark"):
            raise ValueError(f"`action` must be 'stop' or 'mark', got {action!r}")
        if isinstance(lower_is_better, str):
            lower_is_better = (lower_is_better,)
        unknown = sorted(set(lower_is_better) - set(tolerances))
        if unknown:
            raise ValueError(
                f"`lower_is_better` names {unknown}, which the guard does not watch; expected some of its judges "
                f"{sorted(tolerances)}"
            )
        self.tolerances, self.action, self.lower_is_better = dict(tolerances), action, tuple(lower_is_better)
        self.task = task
        self.prefix = ""  # the watched metrics' prefix: `task/<task>/` in a multi-task run
        self.start: Optional[dict[str, float]] = None  # held-out target and judges of the base model
        self.kept_epoch: Optional[int] = None  # -1: the base model
        self.kept_target = -math.inf
        self.kept_weights: dict[str, torch.Tensor] = {}
        self.flagged: Optional[dict] = None  # the first flagged evaluation: epoch and drops

    def on_train_begin(self, trainer, **kwargs):
        if not trainer.config.eval_freq:
            raise ValueError("OverOptimizationGuard reads the held-out evaluation: set `eval_freq` > 0")
        unknown = set(self.tolerances) - set(trainer.eval_reward_functions)
        if unknown:
            raise ValueError(
                f"OverOptimizationGuard judges {sorted(unknown)} are not among the eval rewards "
                f"{sorted(trainer.eval_reward_functions)}; add them to `eval_reward_functions`"
            )
        names = [task.name for task in trainer.tasks]
        if self.task is not None and self.task not in names:
            raise ValueError(f"OverOptimizationGuard task {self.task!r} is not among the trainer's tasks {names}")
        if trainer.multi_task:
            if self.task is None:
                raise ValueError(f"OverOptimizationGuard in a multi-task run needs `task`, one of {names}")
            self.prefix = f"task/{self.task}/"
        if self.start is None:  # not on resume: the start is the base model, checkpointed
            scores = trainer.evaluate_heldout()
            self.start = {name: scores[self._key(name)] for name in ("target", *self.tolerances)}
            self._keep(trainer, epoch=-1, target=self.start["target"])

    def _key(self, name: str) -> str:
        return f"{self.prefix}heldout/{name}/mean"

    def drops(self, metrics: dict) -> dict[str, float]:
        """How far each judge fell below its start (positive = worse)."""
        drops = {}
        for name in self.tolerances:
            change = metrics[self._key(name)] - self.start[name]
            drops[name] = change if name in self.lower_is_better else -change
        return drops

    def assess(self, epoch: int, metrics: dict) -> tuple[bool, bool]:
        """Judge one held-out evaluation (`heldout/<name>/mean` metrics) against the start; no weights involved, so
        a recorded history can be replayed. Returns `(flagged, keep)`: whether it is flagged, and whether it is the
        new best unflagged evaluation (recorded as `kept_epoch`)."""
        target, drops = metrics[self._key("target")], self.drops(metrics)
        flagged = target > self.start["target"] and any(drops[n] > self.tolerances[n] for n in drops)
        if flagged and self.flagged is None:
            self.flagged = {"epoch": epoch, "target": target, "drops": drops}
        keep = not flagged and target > self.kept_target
        if keep:
            self.kept_epoch, self.kept_target = epoch, target
        metrics["guard/flagged"] = int(flagged)
        metrics["guard/kept_epoch"] = self.kept_epoch
        metrics.update({f"guard/{name}/drop": drop for name, drop in drops.items()})
        return flagged, keep

    def on_epoch_end(self, trainer, *, epoch: int, metrics: dict, **kwargs):
        if self._key("target") not in metrics:
            return
        flagged, keep = self.assess(epoch, metrics)
        if flagged and self.action == "stop":
            trainer.should_stop = True
        if keep:  # `assess` recorded the epoch and target
            self._copy_weights(trainer)

    def _keep(self, trainer, epoch: int, target: float):
        self.kept_epoch, self.kept_target = epoch, target
        self._copy_weights(trainer)

    def _copy_weights(self, trainer):
        self.kept_weights = {name: p.detach().to("cpu", copy=True) for name, p in trainer.trained_parameters()}

    def explanation(self) -> Optional[str]:
        """Why the kept weights are the ones saved, for the model card; None if nothing was flagged."""
        if self.flagged is None:
            return None
        drops = ", ".join(
            f"`{name}` fell {drop:.3g} (tolerance {self.tolerances[name]:g})"
            for name, drop in self.flagged["drops"].items()
            if drop > self.tolerances[name]
        )
        kept = "the base model" if self.kept_epoch == -1 else f"epoch {self.kept_epoch}"
        return (
            f"The over-optimization guard flagged epoch {self.flagged['epoch']}: the target rose to "
            f"{self.flagged['target']:.4g} (start {self.start['target']:.4g}) while {drops}. These weights are "
            f"those of {kept}, the best held-out target ({self.kept_target:.4g}) with every judge within tolerance."
        )

    @contextmanager
    def kept_weights_applied(self, trainer):
        """Inside the block the trainer's weights are the kept ones if an evaluation was flagged; restored after."""
        if self.flagged is None or not self.kept_weights:
            yield
            return
        parameters = dict(trainer.trained_parameters())
        current = {name: p.detach().clone() for name, p in parameters.items()}
        with torch.no_grad():
            for name, p in parameters.items():
                p.copy_(self.kept_weights[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for name, p in parameters.items():
                    p.copy_(current[name])

    def state_dict(self) -> dict:
        return {
            "start": self.start,
            "kept_epoch": self.kept_epoch,
            "kept_target": self.kept_target,
            "kept_weights": self.kept_weights,
            "flagged": self.flagged,
        }

    def load_state_dict(self, state: dict):
        self.start, self.kept_epoch, self.kept_target = state["start"], state["kept_epoch"], state["kept_target"]
        self.kept_weights, self.flagged = state["kept_weights"], state["flagged"]
