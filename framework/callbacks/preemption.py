"""Preemption: on SIGUSR1, finish the current optimizer step, checkpoint it, and end the fit cleanly.

SLURM sends SIGUSR1 ahead of a job's time limit (`#SBATCH --signal=B:USR1@120`: to the batch script, which forwards
it to the tasks; see launch/slurm/pretrain.sbatch); anything else can send it too (`kill -USR1`, a Kubernetes preStop
hook). The job script then requeues the job, and the requeued job resumes with `--ckpt_path last`.

The signal handler only sets a flag. At the end of each optimizer step (never inside a gradient-accumulation cycle,
whose partial gradients a checkpoint would not hold) the ranks agree on the flag with one all-reduce, so that all of
them stop after the same step even though the signal reaches them at different moments; then `trainer.should_stop`
ends the fit, and `StepCheckpoint` saves that step (at the end of the step) and points `last.ckpt` at it. The data position
saved with it is exactly the batches trained so far, as for any step checkpoint.

Why not Lightning's own SLURM auto-requeue (`SLURMEnvironment(auto_requeue=True)`): its handler saves from inside
the signal handler, wherever the main thread happens to be (mid-step, mid-collective), into `hpc_ckpt_*.ckpt` beside
our `checkpoints/`, which `--ckpt_path last` does not see; and it closes the W&B run as "finished". Installing our
handler before the Trainer registers its own makes Lightning leave SIGUSR1 alone (it only sets one on a free signal).
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_info


class Preemption(L.Callback):
    """Stop after the current optimizer step when `signum` (SIGUSR1) arrives; StepCheckpoint saves that step."""

    def __init__(self, signum: int = signal.SIGUSR1):
        self.signum = signum
        self.received = False  # set by the handler, in this process
        self.stopped_at: int | None = None  # the step the fit stopped after, once all ranks agreed
        self._previous: Any = None
        self._installed = False
        self._last_step = -1

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        self.received = True  # nothing else: this may interrupt anything, a collective included

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # before the Trainer registers its signal handlers (after `setup`), so it keeps its SLURM one off this signal;
        # and before DataLoader workers fork, so they inherit this handler instead of dying of the signal
        if stage == "fit" and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(self.signum, self._handler)
            self._installed = True
        self.received, self.stopped_at = False, None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_step = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.global_step == self._last_step:  # inside an accumulation cycle: not a place to stop
            return
        self._last_step = trainer.global_step
        # every rank takes part in this reduction at every step, signalled or not
        if trainer.strategy.reduce_boolean_decision(self.received, all=False):
            self.stopped_at = trainer.global_step
            trainer.should_stop = True
            rank_zero_info(f"preemption signal {signal.Signals(self.signum).name}: stopping after step "
                           f"{trainer.global_step}; its checkpoint is written as the fit ends")

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._installed:
            signal.signal(self.signum, self._previous)
            self._installed = False
