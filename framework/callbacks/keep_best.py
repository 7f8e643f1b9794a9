"""Early stopping that keeps the best weights: for runs that validate on a held-out slice of their train data
(`data.holdout`), as `pretrain transfer-report` does."""

from __future__ import annotations

import math
from typing import Any

import lightning as L
from lightning.pytorch.trainer.states import TrainerFn


class KeepBest(L.Callback):
    """After each validation it keeps a copy of the weights (in memory: for models that fit twice) when `monitor`
    improved (ties: when val/loss did), and stops the fit after `patience` validations in a row without, but never
    before step `min_steps` (a model often sits at the class prior for a while before it starts to learn: stopping
    it there would report "nothing learned" for a budget it was not given); `restore(task)` puts the best weights
    back. One process: the copy is of this rank's `task.model`."""

    def __init__(self, monitor: str = "val/accuracy", lower_is_better: bool = False, patience: int = 3,
                 min_steps: int = 0):
        self.monitor, self.sign, self.patience = monitor, -1.0 if lower_is_better else 1.0, patience
        self.min_steps = min_steps
        self.best: dict[str, Any] | None = None
        self.best_key: tuple[float, float] | None = None
        self.best_step, self.bad = 0, 0

    def on_validation_end(self, trainer: L.Trainer, task: L.LightningModule) -> None:
        metrics = trainer.callback_metrics
        # only the fit's validations: a later trainer.validate (of another split) must not move the best weights
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING or self.monitor not in metrics:
            return
        value, loss = self.sign * float(metrics[self.monitor]), -float(metrics.get("val/loss", math.nan))
        key = (value if math.isfinite(value) else -math.inf, loss if math.isfinite(loss) else -math.inf)
        if self.best_key is None or key > self.best_key:
            self.best_key, self.bad, self.best_step = key, 0, trainer.global_step
            self.best = {k: v.detach().clone() for k, v in task.model.state_dict().items()}
        else:
            self.bad += 1
            if self.bad >= self.patience and trainer.global_step >= self.min_steps:
                trainer.should_stop = True

    def restore(self, task: L.LightningModule) -> None:
        if self.best is not None:
            task.model.load_state_dict(self.best)
