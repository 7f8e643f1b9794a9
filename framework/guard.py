"""The loss-spike guard: a robust detector over the trailing losses, and what a rollback does on disk.

A *spike* is `patience` optimizer steps in a row whose loss (averaged over ranks and micro-batches, so every rank sees
the same number and decides alike) is above `median + sigmas * sigma` of the last `window` accepted losses, where
sigma is the median absolute deviation scaled to a normal's standard deviation (1.4826 MAD), floored at 1% of the
median so that a flat loss does not make a hair trigger. Losses above the threshold are kept out of the window, so a
spike does not raise its own bar. Nothing is checked before step `warmup` or before the window is full.

On a spike -- or on max_consecutive non-finite steps, or on a non-finite loss under DeepSpeed, whose optimizer step
cannot be skipped -- the fit rolls back (framework/commands/fit.py): it restarts from the newest checkpoint written before the spike
began, with the model, optimizer, schedule and RNG of that checkpoint and the data position of the step that
confirmed the spike, so the window of batches that led into the spike is skipped (and listed, never silently lost).
The checkpoints written after the spike began hold its effect: they are moved to `checkpoints/rolled_back/` and
`last.ckpt` is pointed at the good one, so a crash right after the rollback resumes from good weights too.

Pure Python apart from the file moves: no torch, no Lightning.
"""

from __future__ import annotations

import glob
import math
import os
import re
import shutil
import statistics
from dataclasses import dataclass, field
from typing import Any

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
