"""Whole samples (a document, an image, ...) with their class: what every such modality shares, whatever the sample.

- `ShardFiles` / `tar_entries`: random access to local tar shards (`pread`), and their members from the headers;
- `stratified_subset`: the seeded, stratified `label_fraction` of a split (subsets nest across fractions);
- `holdout_split`: a seeded, stratified share of such a subset set aside for early stopping and model selection;
- `SampleStream`: batches of whole samples in the global order, exactly once per epoch over ranks x workers, with
  resume on any world size (framework.data.cursor) and validation batches topped up with filler rows; a modality
  says what a batch of its samples is (`_batch`);
- `SampleDataModule`: the StreamDataModule of labelled samples (class names from the manifest, the label fraction,
  the class-prior baseline, the label fraction in the saved position).

Specialised by framework.data.documents (token documents) and framework.data.images (images with captions).
"""

from __future__ import annotations

import os
import tarfile
from collections import OrderedDict
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from framework.data.base import StreamDataModule
from framework.data.cursor import Layout, Segment
from framework.data.shards import Shard, ShardError, local_path, open_tar, parse_header
from framework.errors import UserError

IGNORE_LABEL = -100  # the label of a filler row


class ShardFiles:
    """Random access to local shard files by `pread`: one descriptor per shard, at most MAX_OPEN open at once (the
    least recently used is closed first). Descriptors stay behind when this is sent to DataLoader workers."""

    MAX_OPEN = 64

    def __init__(self, shards: list[Shard]):
        self.shards = shards
        self._fds: OrderedDict[int, int] = OrderedDict()

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fds": OrderedDict()}

    def read(self, s: int, size: int, offset: int) -> bytes:
        """`size` bytes of shard `s` from byte `offset`; a short read means the shard was truncated."""
        if s in self._fds:
            self._fds.move_to_end(s)
        else:
            try:
                self._fds[s] = os.open(local_path(self.shards[s].url), os.O_RDONLY)
            except OSError as e:
                raise ShardError(f"cannot open shard '{self.shards[s].url}': {e}") from None
            if len(self._fds) > self.MAX_OPEN:
                os.close(self._fds.popitem(last=False)[1])
        raw = os.pread(self._fds[s], size, offset)
        if len(raw) != size:
            raise ShardError(f"shard '{self.shards[s].url}' is truncated (a read at byte {offset} came back short); "
                             "re-run the prepare that wrote it")
        return raw

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def tar_entries(shard: Shard) -> list[tuple[str, int, int]]:
    """(name, data offset, size) of every regular file of a local tar, in order, from its headers alone. A tar with
    pax or GNU long-name records (other writers use them for long names) is listed by `tarfile` instead."""
    entries = []
    with open(local_path(shard.url), "rb", buffering=0) as f:
        pos = 0
        while True:
            header = os.pread(f.fileno(), 512, pos)
            if not header or header == bytes(512):
                break
            name, size, kind = parse_header(header, shard.url, pos)
            if kind in b"xgLK":
                return _tarfile_entries(shard)
            if kind in b"0\0":
                entries.append((name, pos + 512, size))
            pos += 512 + -(-size // 512) * 512
    return entries


def _tarfile_entries(shard: Shard) -> list[tuple[str, int, int]]:
    try:
        with open_tar(shard.url) as tf:
            return [(m.name, m.offset_data, m.size) for m in tf if m.isfile()]
    except (tarfile.TarError, EOFError) as e:
        raise ShardError(f"shard '{shard.url}' is corrupt ({e}); re-run the prepare that wrote it") from None


def stratified_subset(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Sorted document ids of a seeded, stratified `fraction` of the documents: in each class the
    max(1, round(fraction * n)) documents with the smallest seeded random keys, so subsets are nested across
    fractions and every class keeps at least one document."""
    if fraction >= 1:
        return np.arange(len(labels))
    keys = np.random.default_rng([seed, 0x5AB5E7]).random(len(labels))
    chosen = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        chosen.append(members[np.argsort(keys[members], kind="stable")[:max(1, round(fraction * len(members)))]])
    return np.sort(np.concatenate(chosen)) if chosen else np.empty(0, np.int64)


def holdout_split(labels: np.ndarray, subset: np.ndarray, share: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(trained on, held out): the ids of `subset` split by class, round(share * n) of each class's n held out (at
    least one where the class has two or more, never its last one), by seeded random keys of their own, so the
    held-out slice is not the smallest fraction's subset. Both sorted."""
    if share <= 0 or not len(subset):
        return subset, subset[:0]
    keys = np.random.default_rng([seed, 0x40D0]).random(len(subset))
    held = []
    for c in np.unique(labels[subset]):
        members = np.flatnonzero(labels[subset] == c)
        k = min(len(members) - 1, max(1, round(share * len(members))))
        held.append(members[np.argsort(keys[members], kind="stable")[:k]])
    out = np.zeros(len(subset), bool)
    out[np.concatenate(held)] = True
    return subset[~out], subset[out]


class SampleStream(IterableDataset):
    """Batches of whole samples: the order, the exactly-once delivery over ranks x workers, resume and the filled
    validation batches; a subclass says what a batch of samples is (`_batch`). `units` are the sample ids this stream
    delivers (e.g. a label-fraction subset); the position counts units, as TokenStream's counts windows. Each batch
    carries "position" [epoch, segment, batch].

    fill=True (validation): every unit is delivered exactly once, in order, split over the ranks batch by batch; the
    last batches are topped up with filler rows (`_batch(..., fill=k)`), so every rank runs the same number."""

    def __init__(self, index: Any, units: np.ndarray, *, batch_size: int, seed: int = 0, shuffle: bool = True,
                 rank: int = 0, world: int = 1, workers: int = 1, fill: bool = False):
        self.index, self.units = index, units
        self.seed, self.shuffle, self.rank, self.fill = seed, shuffle, rank, fill
        self.shards = index.shards
        self.layout = Layout(world, workers, batch_size)
        self.segment: Segment | None = None
        self.start_batch = 0

    @property
    def order(self) -> str:
        return "global" if self.shuffle else "sequential"

    def fresh_segment(self, epoch: int) -> Segment:
        return Segment(epoch, 0, [(0, len(self.units))], self.layout, self.order, self.seed)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        try:
            if self.fill:
                yield from self._filled(worker, workers)
            else:
                yield from self._segment_batches(worker, workers)
        finally:
            self.index.close()

    def _segment_batches(self, worker: int, workers: int) -> Iterator[dict[str, Any]]:
        seg = self.segment if self.segment is not None else self.fresh_segment(0)
        if workers != seg.layout.workers or seg.layout.world != self.layout.world:
            raise RuntimeError(f"stream laid out for {seg.layout} but running {workers} worker(s)")
        role = (worker + self.start_batch) % workers  # as TokenStream: the DataLoader restarts at worker 0
        B = seg.layout.batch_size
        offset, _ = seg.piece(self.rank, role)
        done = seg.worker_batches(role, 0, self.start_batch)
        for k in range(done, done + seg.worker_batches(role, self.start_batch)):
            slots = np.arange(offset + k * B, offset + (k + 1) * B)
            batch = self._batch(self.units[seg.windows(slots)], epoch=seg.epoch)
            batch["position"] = torch.tensor([seg.epoch, seg.index, role + workers * k])
            yield batch

    def _filled(self, worker: int, workers: int) -> Iterator[dict[str, Any]]:
        W, B = self.layout.world, self.layout.batch_size
        batches = -(-len(self.units) // (W * B))
        for j in range(worker, batches, workers):
            slots = np.arange((j * W + self.rank) * B, (j * W + self.rank + 1) * B)
            samples = self.units[slots[slots < len(self.units)]]
            batch = self._batch(samples, fill=B - len(samples))
            batch["position"] = torch.tensor([0, 0, j])
            yield batch

    def _batch(self, samples: np.ndarray, fill: int = 0, epoch: int = 0) -> dict[str, Any]:
        """The batch of `samples` (sample ids), then `fill` filler rows; `epoch` seeds anything random per sample."""
        raise NotImplementedError


class SampleDataModule(StreamDataModule):
    """What a datamodule of whole labelled samples shares, whatever the sample: the class names from the manifest,
    the `label_fraction` subset of the train split, the labels trained on and validated, the class-prior baseline,
    and the label fraction in the saved position. Subclasses fill `_indexes` (split -> an index with a `label`
    array) and `_units` (split -> the sample ids delivered) in `setup`, with `_choose_units`.

    holdout > 0 sets that stratified share of the label-fraction subset aside (`holdout_split`): it is not trained on,
    and validation reads it instead of the val split, for early stopping and choosing hyper-parameters without
    touching the val split (`pretrain transfer-report` validates on the val split afterwards, with holdout 0)."""

    prepare_hint = "`pretrain prepare --label-field NAME` (or --task stdlib-packages)"  # how to make labelled shards

    def __init__(self, label_fraction: float = 1.0, holdout: float = 0.0, **kwargs: Any):
        super().__init__(**kwargs)
        if not 0 < label_fraction <= 1:
            raise UserError(f"data.label_fraction must be in (0, 1], got {label_fraction}")
        if not 0 <= holdout < 1:
            raise UserError(f"data.holdout must be in [0, 1), got {holdout}")
        self.label_fraction, self.holdout = label_fraction, holdout
        self._indexes: dict[str, Any] = {}
        self._units: dict[str, np.ndarray] = {}

    @property
    def labels(self) -> dict:
        labels = self.manifest.get("labels")
        if not labels:
            raise UserError(f"the shards at '{self.train_spec or self.path}' have no labels; prepare them with "
                            f"{self.prepare_hint}")
        return labels

    @property
    def class_names(self) -> list[str]:
        return list(self.labels["names"])

    @property
    def num_classes(self) -> int:
        return len(self.labels["names"])

    def _choose_units(self, stage: str | None, unit: str) -> None:
        """Units of both splits: the label-fraction subset of train (refused when it fills no batch on every rank)
        and all of val."""
        labels = self._indexes["train"].label
        subset = stratified_subset(labels, self.label_fraction, self.seed)
        self._units = {"train": subset, "val": np.arange(len(self._indexes["val"]))}
        if self.holdout > 0:  # validation reads the held-out slice of the train split instead of the val split
            self._units["train"], self._units["val"] = holdout_split(labels, subset, self.holdout, self.seed)
            self._indexes["val"] = self._indexes["train"]
        world = self._world()[1]
        if stage in (None, "fit") and len(self._units["train"]) < world * self.batch_size:
            raise UserError(f"data.label_fraction={self.label_fraction} leaves {len(self._units['train'])} train "
                            f"{unit}, fewer than one batch on every rank ({world} x data.batch_size="
                            f"{self.batch_size}); lower data.batch_size or raise data.label_fraction")

    def train_labels(self) -> np.ndarray:
        """Classes of the samples trained on (the label-fraction subset)."""
        return self._indexes["train"].label[self._units["train"]]

    def val_labels(self) -> np.ndarray:
        """Classes of the samples validated: the whole val split (or the held-out slice with `holdout`)."""
        return self._indexes["val"].label[self._units["val"]]

    def _baseline(self) -> dict[str, Any]:
        """The best guess without looking at the sample: the train subset's class prior, scored on the val split
        (cross-entropy in nats, and the accuracy of always guessing the most frequent class)."""
        train = np.bincount(self.train_labels(), minlength=self.num_classes)
        val = np.bincount(self.val_labels(), minlength=self.num_classes)
        p = (train + 1) / (train.sum() + self.num_classes)
        return {"name": "class prior", "loss": float(-(val * np.log(p)).sum() / max(1, val.sum())),
                "accuracy": float(val[int(train.argmax())] / max(1, val.sum()))}

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        return {**state, "label_fraction": self.label_fraction} if state else state

    def position_settings(self) -> dict[str, Any]:
        # the held-out slice changes which samples are trained on, as the label fraction does
        return {**super().position_settings(), **({"holdout": self.holdout} if self.holdout else {})}

    def _apply_loaded(self, stream: Any) -> None:
        assert self._loaded is not None
        saved = self._loaded.get("label_fraction", 1.0)
        if saved != self.label_fraction:
            raise UserError(f"the checkpoint was trained with data.label_fraction={saved} but this run has "
                            f"{self.label_fraction}; set data.label_fraction={saved} to resume its data position")
        super()._apply_loaded(stream)


__all__ = ["IGNORE_LABEL", "SampleDataModule", "SampleStream", "ShardFiles", "holdout_split", "stratified_subset",
           "tar_entries"]
