"""The data position inside real Lightning checkpoints: resuming a fit continues with exactly the next batches."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

import shardkit as K
from framework.data.datamodule import ShardDataModule


class Recorder(L.LightningModule):
    """Trains one parameter and remembers every batch it trained on."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[np.ndarray] = []

    def training_step(self, batch, batch_idx):
        self.seen.append(batch["tokens"].numpy().copy())
        return (self.w * batch["tokens"].float().mean() * 1e-6).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(path, tmp, max_steps, ckpt_path=None, every=None, workers=2):
    dm = ShardDataModule(path=str(path), seq_len=15, batch_size=2, num_workers=workers, shuffle_block=3)
    model = Recorder()
    callbacks = [ModelCheckpoint(dirpath=tmp, every_n_train_steps=every, save_top_k=-1, filename="{step}")] \
        if every else []
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, max_epochs=-1, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
                        enable_checkpointing=bool(every), limit_val_batches=0)
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return model.seen, dm


@pytest.fixture
def data(tmp_path):
    docs = K.random_lengths(np.random.default_rng(5), 4, (2, 5), (5, 25))
    K.write_shards(tmp_path / "data", docs)
    return tmp_path / "data"


@pytest.mark.parametrize("resume_step", [3, 7], ids=["mid-epoch", "after-the-first-epoch"])
def test_resumed_fit_trains_on_the_same_batches_as_an_uninterrupted_one(data, tmp_path, resume_step):
    full, dm = fit(data, tmp_path / "a", max_steps=16)
    per_epoch = dm._segment.batches_per_rank
    assert per_epoch < 16 // 2 + 1, "the run must cross an epoch boundary"
    first, _ = fit(data, tmp_path / "b", max_steps=resume_step, every=resume_step)
    rest, _ = fit(data, tmp_path / "c", max_steps=16, ckpt_path=str(tmp_path / "b" / f"step={resume_step}.ckpt"))
    assert len(first) + len(rest) == len(full) == 16
    for a, b in zip(first + rest, full):
        np.testing.assert_array_equal(a, b)


def test_resume_from_a_checkpoint_taken_at_an_epoch_boundary(data, tmp_path):
    full, dm = fit(data, tmp_path / "a", max_steps=12, workers=0)
    per_epoch = dm._segment.batches_per_rank
    first, _ = fit(data, tmp_path / "b", max_steps=per_epoch, every=per_epoch, workers=0)
    rest, _ = fit(data, tmp_path / "c", max_steps=12, workers=0,
                  ckpt_path=str(tmp_path / "b" / f"step={per_epoch}.ckpt"))
    assert len(first) + len(rest) == 12
    for a, b in zip(first + rest, full):
        np.testing.assert_array_equal(a, b)


def test_default_workers_leaves_small_machines_their_cores(monkeypatch):
    """data.num_workers unset: no worker process when a rank has under 4 cores (it would take one from the model's
    threads), one worker from 4 cores per rank on."""
    import os

    from framework.data.base import default_workers

    monkeypatch.delenv("SLURM_NTASKS_PER_NODE", raising=False)
    for cores, ranks, expected in ((2, 1, 0), (4, 1, 1), (16, 8, 0), (16, 4, 1)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, n=cores: set(range(n)), raising=False)
        monkeypatch.setenv("LOCAL_WORLD_SIZE", str(ranks))
        assert default_workers() == expected, (cores, ranks)
