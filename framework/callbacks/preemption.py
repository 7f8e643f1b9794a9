"""Preemption: on SIGUSR1 or SIGTERM, finish the current optimizer step, checkpoint it, and end the fit cleanly.

SLURM sends SIGUSR1 ahead of a job's time limit (`#SBATCH --signal=B:USR1@120`: to the batch script, which forwards
it to the tasks; see launch/slurm/pretrain.sbatch); anything else can send it too (`kill -USR1`, a Kubernetes preStop
hook). The job script then requeues the job, and the requeued job resumes with `--ckpt_path last`.
SIGTERM (`scancel`, a Kubernetes pod eviction, torchrun shutting down) is handled the same way, and `pretrain fit`
then exits with EXIT_REQUEUE (75, sysexits' EX_TEMPFAIL: "try again") so that whatever runs it knows to requeue.

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


EXIT_REQUEUE = 75  # `pretrain fit` stopped on SIGTERM after checkpointing: requeue it and resume with --ckpt_path last


class Preemption(L.Callback):
    """Stop after the current optimizer step when one of `signums` (SIGUSR1, SIGTERM) arrives; StepCheckpoint saves
    that step. `signal_received` names the signal once the fit has stopped because of it."""

    def __init__(self, signums: tuple[int, ...] = (signal.SIGUSR1, signal.SIGTERM)):
        self.signums = signums
        self.received: int | None = None  # set by the handler, in this process
        self.stopped_at: int | None = None  # the step the fit stopped after, once all ranks agreed
        self.signal_received: str | None = None
        self._previous: dict[int, Any] = {}
        self._last_step = -1

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum  # nothing else: this may interrupt anything, a collective included

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # before the Trainer registers its signal handlers (after `setup`), so it keeps its SLURM one off this signal;
        # and before DataLoader workers fork, so they inherit this handler instead of dying of the signal
        if stage == "fit" and threading.current_thread() is threading.main_thread():
            for signum in self.signums:
                self._previous[signum] = signal.signal(signum, self._handler)
        self.received, self.stopped_at, self.signal_received = None, None, None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_step = trainer.global_step
        # Lightning puts its own SIGTERM handler over ours when the fit starts (after `setup`); it ends the fit at the
        # next batch without a checkpoint. Ours again: stop after the step, with its checkpoint.
        if self._previous and threading.current_thread() is threading.main_thread():
            for signum in self.signums:
                signal.signal(signum, self._handler)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.global_step == self._last_step:  # inside an accumulation cycle: not a place to stop
            return
        self._last_step = trainer.global_step
        # every rank takes part in this reduction at every step, signalled or not
        if trainer.strategy.reduce_boolean_decision(self.received is not None, all=False):
            self.stopped_at = trainer.global_step
            # the ranks that saw no signal yet report SIGUSR1's behaviour unless one of them saw SIGTERM
            terminated = trainer.strategy.reduce_boolean_decision(self.received == signal.SIGTERM, all=False)
            self.signal_received = "SIGTERM" if terminated else "SIGUSR1"
            trainer.should_stop = True
            rank_zero_info(f"preemption signal {self.signal_received}: stopping after step "
                           f"{trainer.global_step}; its checkpoint is written as the fit ends")

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}
