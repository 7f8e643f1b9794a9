"""The non-finite and loss-spike guard, as a Lightning callback (`Guard`), with its pure detector and file moves.

A *spike* is `patience` optimizer steps in a row whose loss (averaged over ranks and micro-batches, so every rank sees
the same number and decides alike) is above `median + sigmas * sigma` of the last `window` accepted losses, where
sigma is the median absolute deviation scaled to a normal's standard deviation (1.4826 MAD), floored at 1% of the
median so that a flat loss does not make a hair trigger. Losses above the threshold are kept out of the window, so a
spike does not raise its own bar. Nothing is checked before step `warmup` or before the window is full.

On a spike -- or on max_consecutive non-finite steps, or on a non-finite loss under DeepSpeed, whose optimizer step
cannot be skipped -- the fit rolls back (framework/commands/fit.py): it restarts from the newest checkpoint written
before the spike began, with the model, optimizer, schedule and RNG of that checkpoint and the data position of the
step that confirmed the spike, so the window of batches that led into the spike is skipped (and listed, never
silently lost). The checkpoints written after the spike began hold its effect: they are moved to
`checkpoints/rolled_back/` and `last.ckpt` is pointed at the good one, so a crash right after the rollback resumes
from good weights too.

The callback sees each optimizer step through the task's `on_step_measured` call (PretrainTask, after clipping and
before the update): the step's micro-batch losses and the pre-clip gradient norm, both still on the device. It
syncs the host once per step for both checks. Its state goes into the checkpoint under the key "guard".
`SpikeDetector` and the functions below it are pure Python apart from the file moves: no torch, no Lightning.
"""

from __future__ import annotations

import glob
import json
import math
import os
import re
import shutil
import statistics
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn

from framework.data.base import StreamDataModule
from framework.errors import UserError
from framework.tasks.base import StepObserver


@dataclass
class GuardOptions:
    """What happens to an optimizer step whose gradient norm is not finite (a NaN or inf loss on any rank, or an
    overflow in backward): with skip_nonfinite, no weight and no optimizer state changes on any rank (the norm is
    global after the gradient reduction, so every rank decides alike), the learning-rate schedule moves on, the step
    is counted (`guard/skipped_steps`), listed with its data position in the checkpoint and the run summary, and the
    run continues. After max_consecutive such steps in a row the run stops with one line: it has diverged.
    Not under DeepSpeed, which keeps its gradients to itself (its fp16 loss scaler skips overflowing steps).

    A loss spike (framework/callbacks/guard.py) -- spike_patience steps in a row whose loss, averaged over ranks, is
    above the median + spike_sigmas robust standard deviations of the last spike_window losses, from step
    spike_warmup on -- rolls the fit back to the newest checkpoint from before the spike and skips the batches that
    led into it (listed in the checkpoint and the run summary, and logged to W&B as the guard/events table). After
    max_rollbacks rollbacks the run stops with one line. spike_window=0 turns spike detection off (it costs one
    all-reduce of a scalar per step on several ranks)."""

    skip_nonfinite: bool = True
    max_consecutive: int = 10
    spike_window: int = 100
    spike_sigmas: float = 6.0
    spike_patience: int = 3
    spike_warmup: int = 100
    max_rollbacks: int = 3


def rolling_back(trainer: Any) -> bool:
    """Whether a Guard of this trainer has planned a rollback: the fit stops and restarts, so it neither saves a
    checkpoint nor prints the run summary."""
    return any(isinstance(cb, Guard) and cb.rollback is not None for cb in trainer.callbacks)


class Guard(StepObserver):
    """Skips non-finite optimizer steps and rolls a fit back over a loss spike (see the module docstring and
    GuardOptions). `resume`: the rollback this fit restarts from (framework/commands/fit.py sets it)."""

    def __init__(self, options: GuardOptions | None = None, resume: dict[str, Any] | None = None):
        self.options = options or GuardOptions()
        self.resume_rollback = resume
        self.skipped: list[dict[str, int]] = []  # the steps skipped: step and data position
        self.rollbacks: list[dict[str, Any]] = []  # the loss spikes rolled back (describe)
        self.rollback: dict[str, Any] | None = None  # set when this fit must restart from a checkpoint
        self._nonfinite_in_a_row = 0
        g = self.options
        self.detector = SpikeDetector(g.spike_window, g.spike_sigmas, g.spike_patience, g.spike_warmup)

    # ---------------------------------------------------------------- the step
    def on_step_measured(self, trainer: L.Trainer, pl_module: L.LightningModule, losses: list[torch.Tensor],
                         norm: torch.Tensor | None) -> None:
        """One host sync per step for both checks: the price of never applying a NaN update or training on through
        a spike. The step's loss is averaged over ranks first, so every rank takes the same decision."""
        from framework.distributed import is_deepspeed

        deepspeed = is_deepspeed(trainer.strategy)
        g = self.options
        # under DeepSpeed the loss is the only early sign of a NaN: its optimizer step cannot be skipped from here
        watch = (g.spike_window > 0 or (deepspeed and g.skip_nonfinite)) and bool(losses)
        check_norm = norm is not None and g.skip_nonfinite
        if not (watch or check_norm):
            return
        values = []
        if watch:
            loss = torch.stack(losses).float().mean()
            values.append(trainer.strategy.reduce(loss, reduce_op="mean").reshape(()))
        if check_norm:
            if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor (every rank takes part, as every rank is here)
                norm = norm.full_tensor()
            values.append(norm.float().reshape(()))
        host = torch.stack(values).tolist()
        if check_norm and not math.isfinite(host[-1]):
            self._skip_step(trainer, pl_module, host[-1])
            return
        self._nonfinite_in_a_row = 0
        if not watch:
            return
        step = int(trainer.global_step)
        if deepspeed and g.skip_nonfinite and not math.isfinite(host[0]):
            self._roll_back(trainer, pl_module, step, step, host[0], None, "a non-finite loss under DeepSpeed "
                            "(whose optimizer step cannot be skipped)")
            return
        spike = self.detector.update(step, host[0])
        if spike is not None:
            self._roll_back(trainer, pl_module, int(spike[0]["step"]), step, max(s["loss"] for s in spike),
                            spike[0]["threshold"], "a loss spike")

    def _skip_step(self, trainer: L.Trainer, pl_module: L.LightningModule, norm: float) -> None:
        """Skip this optimizer step: optimizers leave parameters without a gradient untouched. After
        max_consecutive in a row, roll back (the model may be damaged in ways a finite norm does not show)."""
        for p in pl_module.parameters():
            p.grad = None
        self._nonfinite_in_a_row += 1
        dm = trainer.datamodule
        batch = dm.last_trained() if isinstance(dm, StreamDataModule) else None  # the batch that produced it
        self.skipped.append({"step": int(trainer.global_step), **(batch or {})})
        pl_module.log("guard/skipped_steps", float(len(self.skipped)), rank_zero_only=True)
        rank_zero_warn(f"step {trainer.global_step}: the gradient norm is {norm}; the step was skipped on every "
                       f"rank ({len(self.skipped)} skipped so far)")
        self._log_events(trainer)
        if self._nonfinite_in_a_row >= self.options.max_consecutive:
            first = self.skipped[-self._nonfinite_in_a_row]["step"]
            self._roll_back(trainer, pl_module, first, int(trainer.global_step), float("nan"), None,
                            f"{self._nonfinite_in_a_row} optimizer steps in a row with a non-finite loss or gradient")

    def _roll_back(self, trainer: L.Trainer, pl_module: L.LightningModule, first: int, step: int, loss: float,
                   threshold: float | None, reason: str) -> None:
        """Plan a rollback to the newest checkpoint from before step `first` and stop this fit after this step;
        framework/commands/fit.py restarts it from there with the data position after this step. Every rank calls
        this at the same step (the decisions are on rank-averaged or global values); rank 0 chooses the checkpoint."""
        where = f"{reason} at steps {first}-{step}" if first != step else f"{reason} at step {step}"
        if len(self.rollbacks) >= self.options.max_rollbacks:
            done = ", ".join(f"{r['first_step']}-{r['step']}" for r in self.rollbacks)
            raise UserError(f"{where} after {len(self.rollbacks)} rollback(s) already (at steps {done}): the run has "
                            "diverged; resume from an earlier checkpoint with a lower model.lr, or raise "
                            "guard.max_rollbacks")
        dirpath = getattr(trainer.checkpoint_callback, "dirpath", None)
        dm = trainer.datamodule
        plan: dict[str, Any] = {"checkpoint": None}
        if trainer.is_global_zero and dirpath:  # rank 0 reads the disk; every rank follows its choice
            good = checkpoint_before(dirpath, first)
            if good is not None:
                from framework.checkpoint.formats import read_meta

                meta = read_meta(good)
                saved = meta.get(type(dm).__qualname__) if dm is not None else None
                plan = {"checkpoint": good, "to_step": int(meta["global_step"]), "from": position(saved),
                        "moved": set_aside_after(dirpath, good)}
        plan = trainer.strategy.broadcast(plan, src=0)
        if plan["checkpoint"] is None:
            raise UserError(f"{where}: the run has diverged, and there is no checkpoint from before step {first} to "
                            f"roll back to in '{dirpath}'; resume from an earlier checkpoint with a lower model.lr, "
                            "or checkpoint more often (checkpoint.every_n_steps)")
        data = dm.state_dict() if isinstance(dm, StreamDataModule) else {}
        event = {"step": step, "first_step": first, "reason": reason, "loss": loss, "threshold": threshold,
                 "to_step": plan["to_step"], "checkpoint": plan["checkpoint"],
                 "skipped": {"from": plan["from"], "to": position(data)}, "set_aside": plan["moved"]}
        self.rollbacks.append(event)
        self.rollback = {"event": event, "data": data, "rollbacks": list(self.rollbacks)}
        for p in pl_module.parameters():  # this step's update is not applied either (DeepSpeed's is, and rolled back)
            p.grad = None
        trainer.should_stop = True  # the same step on every rank
        if trainer.is_global_zero:
            print(f"guard: {describe(event)} (rollback {len(self.rollbacks)} of at most "
                  f"{self.options.max_rollbacks})", file=sys.stderr, flush=True)
        self._log_events(trainer)

    def _log_events(self, trainer: L.Trainer) -> None:
        """Every guard event so far as a W&B table (guard/events): step, loss, action, what was skipped."""
        from lightning.pytorch.loggers import WandbLogger

        loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        if not loggers or not trainer.is_global_zero:
            return
        import wandb

        rows = [[s["step"], None, "skipped step (non-finite gradient)", json.dumps(s)] for s in self.skipped]
        rows += [[r["step"], r["loss"], "rollback", describe(r)] for r in self.rollbacks]
        for logger in loggers:
            logger.experiment.log({"guard/events": wandb.Table(columns=["step", "loss", "action", "detail"],
                                                               data=sorted(rows, key=lambda r: r[0]))})

    def summary_lines(self) -> list[str]:
        """Lines for the run summary (RunSummary prints them before the task's own)."""
        lines = []
        if self.skipped:
            listed = ", ".join(str(s["step"]) for s in self.skipped[:10]) + (" ..." if len(self.skipped) > 10 else "")
            lines.append(f"guard: {len(self.skipped)} step(s) skipped for a non-finite gradient: {listed} (listed "
                         "with their data positions in the checkpoint, key 'guard')")
        lines += [f"guard: {describe(r)}" for r in self.rollbacks]
        return lines

    # ---------------------------------------------------------------- checkpoint
    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        checkpoint["guard"] = {"options": asdict(self.options), "skipped": list(self.skipped),
                               "rollbacks": list(self.rollbacks), "detector": self.detector.state_dict()}

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        guard = checkpoint.get("guard", {})
        self.skipped = list(guard.get("skipped", []))
        self.rollbacks = list(guard.get("rollbacks", []))
        self.detector.load_state_dict(guard.get("detector", {}))
        if self.resume_rollback is not None:  # restarting after a spike: the weights are from before it
            self.rollbacks = list(self.resume_rollback["rollbacks"])


STEP_FILE = re.compile(r"step(\d+)\.ckpt$")


@dataclass
class SpikeDetector:
    window: int = 100
    sigmas: float = 6.0
    patience: int = 3
    warmup: int = 100
    history: list[float] = field(default_factory=list)  # the accepted losses, oldest first
    run: list[dict[str, float]] = field(default_factory=list)  # the steps above the threshold so far, in a row

    def update(self, step: int, loss: float) -> list[dict[str, float]] | None:
        """Feed one optimizer step's loss; the steps of a confirmed spike (step, loss, threshold), else None."""
        if self.window <= 0 or not math.isfinite(loss):  # a non-finite step is the other guard's
            return None
        threshold = self.threshold() if step >= self.warmup else None
        if threshold is not None and loss > threshold:
            self.run.append({"step": step, "loss": loss, "threshold": threshold})
            if len(self.run) >= self.patience:
                spike, self.run = self.run, []
                return spike
            return None
        self.run = []
        self.history = (self.history + [loss])[-self.window:]
        return None

    def threshold(self) -> float | None:
        """The loss above which a step counts towards a spike; None while the window is not full."""
        if len(self.history) < self.window:
            return None
        median = statistics.median(self.history)
        mad = statistics.median(abs(x - median) for x in self.history)
        return median + self.sigmas * max(1.4826 * mad, 0.01 * abs(median))

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history), "run": list(self.run)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history, self.run = list(state.get("history", [])), list(state.get("run", []))


def checkpoint_before(dirpath: str, step: int) -> str | None:
    """The newest readable step checkpoint in `dirpath` holding at most `step` optimizer steps (its weights have
    not seen the steps from `step` on); None when there is none."""
    from framework.checkpoint.formats import checkpoint_problem

    found = []
    for path in glob.glob(os.path.join(dirpath, "step*.ckpt")):
        m = STEP_FILE.search(os.path.basename(path))
        if m and int(m.group(1)) <= step:
            found.append((int(m.group(1)), path))
    for _, path in sorted(found, reverse=True):
        if checkpoint_problem(path) is None:
            return path
    return None


def set_aside_after(dirpath: str, good: str) -> list[str]:
    """Move the step checkpoints newer than `good` into `dirpath/rolled_back/` (they hold the spike's effect) and point
    `last.ckpt` at `good`, atomically. Returns the moved paths (their new names). Run on one rank."""
    m = STEP_FILE.search(os.path.basename(good))
    assert m, good
    keep_step = int(m.group(1))
    moved = []
    aside = os.path.join(dirpath, "rolled_back")
    for path in glob.glob(os.path.join(dirpath, "step*.ckpt")):
        found = STEP_FILE.search(os.path.basename(path))
        if found and int(found.group(1)) > keep_step:
            os.makedirs(aside, exist_ok=True)
            target = os.path.join(aside, os.path.basename(path))
            if os.path.lexists(target):  # set aside by an earlier rollback: the newer one replaces it
                shutil.rmtree(target) if os.path.isdir(target) and not os.path.islink(target) else os.remove(target)
            os.replace(path, target)
            moved.append(target)
    last = os.path.join(dirpath, "last.ckpt")
    tmp = last + ".tmp-link"
    if os.path.lexists(tmp):
        os.remove(tmp)
    os.symlink(os.path.basename(good), tmp)
    os.replace(tmp, last)
    return moved


def position(state: dict[str, Any] | None) -> dict[str, int] | None:
    """A datamodule's saved data position, in short: epoch, segment, batches consumed per rank."""
    if not state or "segment" not in state:
        return None
    return {"epoch": int(state["segment"]["epoch"]), "segment": int(state["segment"]["index"]),
            "batches": int(state["batches"])}


def describe(event: dict[str, Any]) -> str:
    """One line for the console and the run summary."""
    steps = f"{event['first_step']}-{event['step']}" if event["first_step"] != event["step"] else str(event["step"])
    skipped = event.get("skipped") or {}
    start, stop = skipped.get("from"), skipped.get("to")
    if start and stop and (start["epoch"], start["segment"]) == (stop["epoch"], stop["segment"]):
        window = f"batches {start['batches']}-{stop['batches'] - 1} of epoch {stop['epoch']} skipped"
    elif stop:
        window = f"data skipped up to batch {stop['batches'] - 1} of epoch {stop['epoch']}"
    else:
        window = "no data position to skip"
    reason = event.get("reason", "a loss spike")
    what = f"{reason} at steps {steps}" if "-" in steps else f"{reason} at step {steps}"
    if event.get("threshold") is not None:
        what += f" (loss {event['loss']:.4g} > threshold {event['threshold']:.4g})"
    return f"{what}: rolled back to step {event['to_step']} ({os.path.basename(event['checkpoint'])}), {window}"
