"""Checkpoint policy: every N steps and at the end of training, keep the K newest, `last.ckpt` points at the newest.

Lightning writes local checkpoint files atomically (torch.save to memory, then an fsspec transaction that writes a
temporary file and moves it into place), so a killed job never leaves a half-written `step*.ckpt`.
"""

from __future__ import annotations

import os
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from framework.errors import UserError


class StepCheckpoint(ModelCheckpoint):
    """ModelCheckpoint keyed on the step: `step0000100.ckpt` ..., the K newest kept, `last.ckpt` a link to the newest."""

    def __init__(self, dirpath: str, every_n_steps: int, keep: int):
        if every_n_steps < 1 or keep < 1:
            raise UserError("checkpoint.every_n_steps and checkpoint.keep must be >= 1")
        super().__init__(dirpath=dirpath, filename="step{step:07d}", auto_insert_metric_name=False,
                         every_n_train_steps=every_n_steps, save_top_k=keep, monitor="step", mode="max",
                         save_last="link", enable_version_counter=False, save_on_train_epoch_end=False)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Also save the final step when it is not a multiple of every_n_steps."""
        if not self._should_skip_saving_checkpoint(trainer):
            candidates = self._monitor_candidates(trainer)
            self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)


def find_checkpoint(ckpt_path: str | None, dirpath: str) -> str | None:
    """The file a `--ckpt_path` means: None for a fresh run, 'last' resolved in dirpath (None if there is none yet,
    so that a requeued job's first attempt starts fresh); a path that does not exist is a UserError."""
    if ckpt_path is None:
        return None
    if ckpt_path == "last":
        last = os.path.join(dirpath, "last.ckpt")
        return last if os.path.exists(last) else None
    if not os.path.exists(ckpt_path):
        raise UserError(f"checkpoint '{ckpt_path}' does not exist; pass an existing .ckpt file, or "
                        "--ckpt_path last to resume the newest checkpoint of this run (if any)")
    return ckpt_path


def peek(path: str, key: str) -> Any:
    """One top-level entry of a checkpoint file, read without loading its tensors into memory."""
    try:
        ckpt = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user problem
        raise UserError(f"cannot read checkpoint '{path}' ({type(e).__name__}: {e}); it is not a checkpoint "
                        "of this framework or is damaged") from None
    return ckpt.get(key)
