"""A toy modality and objective built entirely outside framework/, through its public seams only: what adding the
next modality (molecule graphs, audio, ...) takes.

- data: 2-d points whose class is their quadrant, written by `prepare_points` with the public shard writer
  (framework.data.writer, framework.data.manifest: modality "points"), read by `PointDataModule`, a
  SampleDataModule (the shared order, exactly-once delivery, resume and filled validation batches) that only says
  how a shard is indexed and what a batch of points is;
- model: `PointMLP`, a family registered with one `register(Family(...))` call;
- objective: `PointTask`, a PretrainTask whose measures are a cross-entropy and an accuracy.
Used by tests/test_toy_modality.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from framework.data.manifest import header, split_entry
from framework.data.samples import IGNORE_LABEL, SampleDataModule, SampleStream, ShardFiles, tar_entries
from framework.data.shards import Shard, ShardError, member_ext
from framework.data.writer import make_key, output_transaction
from framework.errors import UserError
from framework.models.registry import Family, register
from framework.models.transformer import PresetConfig, Pretrained
from framework.tasks.base import Measures, PretrainTask

QUADRANTS = ["++", "-+", "--", "+-"]


# ---------------------------------------------------------------------------------------------------- prepare
def quadrant(x: float, y: float) -> int:
    return QUADRANTS.index(("+" if x >= 0 else "-") + ("+" if y >= 0 else "-"))


def prepare_points(out: Path, n: int, seed: int = 0, shard_bytes: int = 1024) -> dict:
    """n random points (float32 x, y as one `.f32` member) with their quadrant (`.cls`); every fifth to val."""
    rng = np.random.default_rng(seed)
    points = rng.uniform(-1, 1, size=(n, 2)).astype(np.float32)
    counts = {"train": [0] * 4, "val": [0] * 4}
    with output_transaction(out, overwrite=False) as output:
        writers = {s: output.writer(s, max_bytes=shard_bytes) for s in ("train", "val")}
        for i, p in enumerate(points):
            split, label = "val" if i % 5 == 4 else "train", quadrant(*p)
            counts[split][label] += 1
            writers[split].write(make_key(i, "points", i), {"f32": p.tobytes(), "cls": str(label).encode()})
        manifest = {**header("points"), "labels": {"names": QUADRANTS, "counts": counts},
                    "splits": {s: split_entry(w.finish()) for s, w in writers.items()}}
        return output.commit(manifest)


# ---------------------------------------------------------------------------------------------------- data
class PointIndex:
    """Every point of some local shards, read once from the tar members into memory (they are tiny)."""

    def __init__(self, shards: list[Shard]):
        self.shards = shards
        xy, labels = [], []
        files = ShardFiles(shards)
        for s, shard in enumerate(shards):
            for name, offset, size in tar_entries(shard):
                raw = files.read(s, size, offset)
                if member_ext(name) == "f32":
                    xy.append(np.frombuffer(raw, np.float32))
                elif member_ext(name) == "cls":
                    labels.append(int(raw))
        files.close()
        if len(xy) != len(labels):
            raise ShardError(f"the shards hold {len(xy)} points but {len(labels)} labels; prepare them again")
        self.xy = np.stack(xy) if xy else np.empty((0, 2), np.float32)
        self.label = np.asarray(labels, np.int64)

    def __len__(self) -> int:
        return len(self.label)

    def close(self) -> None:
        pass


class PointStream(SampleStream):
    def _batch(self, samples: np.ndarray, fill: int = 0, epoch: int = 0) -> dict[str, Any]:
        xy = np.concatenate([self.index.xy[samples], np.zeros((fill, 2), np.float32)])
        labels = np.concatenate([self.index.label[samples], np.full(fill, IGNORE_LABEL, np.int64)])
        ids = np.concatenate([samples, np.full(fill, -1, np.int64)])
        return {"xy": torch.from_numpy(xy), "labels": torch.from_numpy(labels), "sample_ids": torch.from_numpy(ids)}


class PointDataModule(SampleDataModule):
    modality = "points"
    prepare_hint = "tests/toy_points.py prepare_points"

    def setup(self, stage: str | None = None) -> None:
        if self._indexes:
            return
        self.labels  # noqa: B018  # unlabelled shards fail here
        self._train = self._shards("train", self.train_spec)
        self._val = self._shards("val", self.val_spec)
        for split, shards in (("train", self._train), ("val", self._val)):
            self._indexes[split] = PointIndex(shards)
        self._choose_units(stage, "points")

    def model_fields(self) -> dict[str, Any]:
        return {"num_classes": self.num_classes}  # the model's head is sized to the data's classes

    def _stream(self, shards: list[Shard], batch_size: int, shuffle: bool, train: bool) -> PointStream:
        rank, world = self._world()
        split = "train" if train else "val"
        return PointStream(self._indexes[split], self._units[split], batch_size=batch_size, seed=self.seed,
                           shuffle=shuffle, rank=rank, world=world, workers=max(1, self.num_workers),
                           fill=not train)


# ---------------------------------------------------------------------------------------------------- model
@dataclass
class PointConfig(PresetConfig):
    model_type: ClassVar[str] = "point-mlp"
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {"point-mlp-test": dict(hidden=16)}

    hidden: int = 16
    num_classes: int = 4


class PointMLP(Pretrained):
    config_class = PointConfig

    def __init__(self, config: PointConfig) -> None:
        super().__init__()
        self.config = config
        self.net = nn.Sequential(nn.Linear(2, config.hidden), nn.Tanh(), nn.Linear(config.hidden, config.num_classes))

    def forward(self, xy: torch.Tensor) -> torch.Tensor:
        return self.net(xy)  # (B, classes)


register(Family(PointMLP), replace=True)  # the family's one registry line (replace: a re-import is harmless)


# ---------------------------------------------------------------------------------------------------- objective
class PointTask(PretrainTask):
    """Classify each point's quadrant: cross-entropy (optimized) and accuracy, over the real rows of a batch."""

    model_class = PointMLP
    perplexity = False
    unit = "points"

    def __init__(self, preset: str = "point-mlp-test", config: dict[str, Any] | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.save_hyperparameters()
        self.set_model_config(preset, config)

    def check_data(self, datamodule: Any) -> None:
        if not isinstance(datamodule, PointDataModule):
            raise UserError("PointTask reads points: set data.class_path toy_points.PointDataModule")

    def compute_losses(self, batch: dict[str, Any]) -> Measures:
        logits = self(batch["xy"]).float()
        labels = batch["labels"]
        real = labels != IGNORE_LABEL
        loss = F.cross_entropy(logits, labels, ignore_index=IGNORE_LABEL)
        accuracy = (logits.argmax(-1)[real] == labels[real]).float().mean()
        return {"loss": (loss, real.sum()), "accuracy": (accuracy, real.sum())}

    def batch_tokens(self, batch: dict[str, Any]) -> int:
        return int(batch["labels"].shape[0])
