"""Checkpoint policy: every N steps and at the end of training, keep the K newest, `last.ckpt` points at the newest.

Lightning writes local checkpoint files atomically (torch.save to memory, then an fsspec transaction that writes a
temporary file and moves it into place), so a killed job never leaves a half-written `step*.ckpt` file. FSDP2 and
DeepSpeed write a directory per checkpoint instead (framework/checkpoint/formats.py), rank by rank, which a killed
job can leave half-written; `last.ckpt` is re-linked only after a save completes, so it never points at one.
A sharded checkpoint resumes on any world size (framework/checkpoint/reshard.py).
"""

from __future__ import annotations

import glob
import os
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_warn

from framework.errors import UserError


class StepCheckpoint(ModelCheckpoint):
    """ModelCheckpoint keyed on the step: `step0000100.ckpt` ..., the K newest kept, `last.ckpt` a link to the newest."""

    def __init__(self, dirpath: str, every_n_steps: int, keep: int, resume: str | None = None):
        """resume: the checkpoint this fit resumes (find_checkpoint's answer on this rank), or None."""
        if every_n_steps < 1 or keep < 1:
            raise UserError("checkpoint.every_n_steps and checkpoint.keep must be >= 1")
        super().__init__(dirpath=dirpath, filename="step{step:07d}", auto_insert_metric_name=False,
                         every_n_train_steps=every_n_steps, save_top_k=keep, monitor="step", mode="max",
                         save_last="link", enable_version_counter=False, save_on_train_epoch_end=False)
        self.resume = resume
        self._state_key: str | None = None

    @property
    def state_key(self) -> str:
        """ModelCheckpoint's key, formatted once: Lightning reads it for every hook call, several times a step."""
        if self._state_key is None:
            self._state_key = super().state_key
        return self._state_key

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit":
            same_checkpoint_everywhere(self.resume, self.dirpath)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._step_before_batch = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        """Every N steps (ModelCheckpoint's); and the last step, as soon as the fit is about to end after it.

        The last step is saved here rather than in `on_train_end`: by then Lightning has counted the interrupted
        epoch as completed, and a resume would start the next epoch (current_epoch one ahead of the data, and a run
        with max_epochs ending early). Only at the end of an optimizer step (not inside gradient accumulation).
        `trainer.should_stop` is set alike on all ranks by whoever sets it (Preemption all-reduces its signal), as
        Lightning's loops require; other callbacks run before this one (Lightning orders checkpoint callbacks last).
        """
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        stepped = trainer.global_step != getattr(self, "_step_before_batch", None)
        max_steps = trainer.max_steps if trainer.max_steps is not None else -1
        if stepped and (trainer.should_stop or 0 <= max_steps <= trainer.global_step):
            self._save_now(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Also save the final step when it is not a multiple of every_n_steps (and was not saved above, e.g. the
        epoch ran out of data with max_epochs reached)."""
        self._save_now(trainer)

    def _should_skip_saving_checkpoint(self, trainer: L.Trainer) -> bool:
        """Also never after a loss spike that this fit is rolling back from: its weights hold the spike."""
        from framework.callbacks.guard import rolling_back

        return rolling_back(trainer) or super()._should_skip_saving_checkpoint(trainer)

    def _save_now(self, trainer: L.Trainer) -> None:
        if not self._should_skip_saving_checkpoint(trainer):  # skips a step that is already saved
            candidates = self._monitor_candidates(trainer)
            self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)


def same_checkpoint_everywhere(resume: str | None, dirpath: str) -> None:
    """Every rank resolved `--ckpt_path` (find_checkpoint, before the processes could talk) to the same checkpoint,
    or all of them to none; otherwise a UserError on every rank. A node that does not see the run directory of the
    others (a node-local disk at the same path) would start afresh, or from an older checkpoint, while the others
    resume: ranks at different steps and data positions, training on without an error. Called once the process
    group is up, before the checkpoint is restored."""
    import socket

    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    mine = (os.path.realpath(resume) if resume else None, socket.gethostname())
    views: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(views, mine)
    differ = [rank for rank, (path, _) in enumerate(views) if path != views[0][0]]
    if differ:
        def where(rank: int) -> str:
            path, host = views[rank]
            return f"rank {rank} (on {host}) {f'resumes {path}' if path else 'finds none'}"

        raise UserError(f"the ranks do not see the same checkpoints in '{dirpath}': {where(0)}, {where(differ[0])}; "
                        "trainer.default_root_dir must be one directory shared by every node (a shared file system, "
                        "at the same path on each)")


def find_checkpoint(ckpt_path: str | None, dirpath: str) -> str | None:
    """The file a `--ckpt_path` means: None for a fresh run, 'last' resolved in dirpath (None if the run has no
    checkpoint yet, so that a requeued job's first attempt starts fresh; a damaged newest checkpoint falls back to
    the previous one, see `usable_checkpoint`); a path that does not exist is a UserError."""
    if ckpt_path is None:
        return None
    if ckpt_path == "last":
        last = os.path.join(dirpath, "last.ckpt")
        steps = glob.glob(os.path.join(dirpath, "step*.ckpt"))
        return usable_checkpoint(last, steps) if os.path.lexists(last) or steps else None
    if not os.path.exists(ckpt_path):
        raise UserError(f"checkpoint '{ckpt_path}' does not exist; pass an existing step*.ckpt (file or directory), or "
                        "--ckpt_path last to resume the newest checkpoint of this run (if any)")
    return ckpt_path


def usable_checkpoint(last: str, steps: list[str]) -> str | None:
    """`last` when it reads as a checkpoint of this framework; otherwise (a link to a checkpoint deleted or damaged
    on disk, a sharded directory missing a rank's file) the newest step checkpoint that does, with a warning naming
    each one passed over. Resuming from an older checkpoint repeats the steps after it: nothing is lost, the data
    position is the checkpoint's. None usable: None (a fresh start) when every one is a sharded directory whose
    write never finished (no metadata: the job was killed while writing its first checkpoint, so nothing was saved
    yet), else one line naming them."""
    from framework.checkpoint.formats import checkpoint_problem

    target = os.path.realpath(last) if os.path.lexists(last) else None
    candidates = ([last] if target is not None else []) + sorted(
        (p for p in steps if os.path.realpath(p) != target), key=os.path.basename, reverse=True)
    bad = []
    for path in candidates:
        problem = checkpoint_problem(path)
        if problem is None:
            if bad:
                rank_zero_warn(f"resuming from '{path}': the newer checkpoint(s) cannot be read ("
                               + "; ".join(f"'{p}': {why}" for p, why in bad) + ")")
            return path
        bad.append((os.path.realpath(path) if path == last else path, problem))
    if all(_unfinished(p) for p, _ in bad):
        rank_zero_warn("starting afresh: no checkpoint of this run was written completely ("
                       + "; ".join(f"'{p}': {why}" for p, why in bad[:3]) + ")")
        return None
    raise UserError(f"no readable checkpoint to resume in '{os.path.dirname(last)}' ("
                    + "; ".join(f"'{p}': {why}" for p, why in bad[:3]) + "); remove them to start afresh, or pass "
                    "--ckpt_path PATH of a good one")


def _unfinished(path: str) -> bool:
    """A checkpoint directory without the metadata its strategy writes last (FSDP2's meta.pt, DeepSpeed's model
    states): a write that was cut off, not a damaged checkpoint."""
    from framework.checkpoint.formats import checkpoint_kind

    if not os.path.isdir(path):
        return False
    try:
        checkpoint_kind(path)
    except UserError:
        return True
    return False


def peek(path: str, key: str) -> Any:
    """One top-level entry of a checkpoint (a .ckpt file, a DeepSpeed or a torch.distributed.checkpoint directory),
    read without loading its tensors into memory."""
    from framework.checkpoint.reader import Checkpoint

    return Checkpoint(path, exports=False).meta.get(key)
