"""Labelled documents for fine-tuning: whole documents (not packed windows) with their class, for a classifier.

`pretrain prepare --label-field NAME` (or `--task stdlib-packages`) writes, per document, `KEY.u16` (its tokens) and
`KEY.cls` (its class index) into the shards, and the class names and counts into the manifest. Here:
- `DocumentIndex`: where each document of local shards starts, how long it is and its class, from the tar headers
  (labels are read once, at start-up: a few bytes per document);
- `DocumentStream`: batches of documents truncated to `max_tokens`, padded to the longest in the batch. The unit of
  the data position is a document: the order, the exactly-once delivery and resume (on any world size) are
  framework.data.cursor's, as for packed windows. Validation delivers every document exactly once: the last batches
  are filled with dummy rows whose label is -100 (ignored), so every rank runs the same number of batches;
- `ClassificationDataModule`: the above for Lightning, with `label_fraction`: a seeded, stratified subset of the train
  split (the few-label regime; a smaller fraction's subset is inside a larger one's).

`SampleStream` and `SampleDataModule` are what does not depend on the kind of sample (the order, fillers, labels,
label fraction, the saved position); framework.data.images builds its image stream and datamodule on them.
"""

from __future__ import annotations

import os
import tarfile
from collections import OrderedDict
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from framework.data.cursor import Layout, Segment
from framework.data.datamodule import ShardDataModule
from framework.data.shards import DTYPES, Shard, ShardError, _ext, _local_path, _open_tar, _parse_header, seekable
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
                self._fds[s] = os.open(_local_path(self.shards[s].url), os.O_RDONLY)
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
    with open(_local_path(shard.url), "rb", buffering=0) as f:
        pos = 0
        while True:
            header = os.pread(f.fileno(), 512, pos)
            if not header or header == bytes(512):
                break
            name, size, kind = _parse_header(header, shard.url, pos)
            if kind in b"xgLK":
                return _tarfile_entries(shard)
            if kind in b"0\0":
                entries.append((name, pos + 512, size))
            pos += 512 + -(-size // 512) * 512
    return entries


def _tarfile_entries(shard: Shard) -> list[tuple[str, int, int]]:
    try:
        with _open_tar(shard.url) as tf:
            return [(m.name, m.offset_data, m.size) for m in tf if m.isfile()]
    except (tarfile.TarError, EOFError) as e:
        raise ShardError(f"shard '{shard.url}' is corrupt ({e}); re-run the prepare that wrote it") from None


class DocumentIndex:
    """Every document of a list of local labelled shards: shard, byte offset of its tokens, length, class."""

    def __init__(self, shards: list[Shard]):
        self.shards = shards
        parts = [_index_labelled(i, s) for i, s in enumerate(shards)]
        cat = (lambda k, dt: np.concatenate([p[k] for p in parts]).astype(dt) if parts else np.empty(0, dt))
        self.shard, self.offset = cat(0, np.int32), cat(1, np.int64)
        self.length, self.label = cat(2, np.int64), cat(3, np.int64)
        self.itemsize = [p[4] for p in parts]
        self.files = ShardFiles(shards)

    def __len__(self) -> int:
        return len(self.label)

    def read(self, doc: int, max_tokens: int) -> np.ndarray:
        """The first max_tokens tokens of document `doc` (int64)."""
        s = int(self.shard[doc])
        isz = self.itemsize[s]
        n = min(int(self.length[doc]), max_tokens)
        raw = self.files.read(s, n * isz, int(self.offset[doc]))
        return np.frombuffer(raw, DTYPES["u16" if isz == 2 else "u32"]).astype(np.int64)

    def close(self) -> None:
        self.files.close()


def _index_labelled(i: int, shard: Shard) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    """(shard ids, token offsets, lengths, labels, itemsize) of one shard, from its headers and `.cls` members."""
    offsets, lengths, labels, itemsizes = [], [], [], set()
    try:
        with open(_local_path(shard.url), "rb", buffering=0) as f:
            for name, offset, size in tar_entries(shard):
                ext = _ext(name)
                if ext in DTYPES:
                    offsets.append(offset)
                    lengths.append(size // DTYPES[ext].itemsize)
                    itemsizes.add(DTYPES[ext].itemsize)
                elif ext == "cls":
                    if len(labels) != len(offsets) - 1:
                        raise ShardError(f"shard '{shard.url}' has a label without tokens at '{name}'; re-run "
                                         "`pretrain prepare`")
                    labels.append(int(os.pread(f.fileno(), size, offset)))
    except (OSError, ValueError) as e:
        raise ShardError(f"cannot read shard '{shard.url}' ({e}); re-run `pretrain prepare`") from None
    if len(labels) != len(offsets):
        raise ShardError(f"shard '{shard.url}' has {len(offsets)} documents but {len(labels)} labels: it was not "
                         "prepared with --label-field (or is corrupt); re-run `pretrain prepare --label-field NAME`")
    if len(offsets) != shard.samples:
        raise ShardError(f"shard '{shard.url}' holds {len(offsets)} documents but the manifest says {shard.samples}; "
                         "re-run `pretrain prepare`")
    n = len(offsets)
    return (np.full(n, i), np.asarray(offsets, np.int64), np.asarray(lengths, np.int64),
            np.asarray(labels, np.int64), itemsizes.pop() if itemsizes else 2)


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


class DocumentStream(SampleStream):
    """Batches `{"tokens" (B, T) padded with `pad`, "lengths" (B,), "labels" (B,), "sample_ids" (B,), "position"}`
    of whole documents truncated to `max_tokens`; T is the longest document of the batch. Filler rows have label
    -100, sample id -1 and one pad token. The rest: see SampleStream."""

    def __init__(self, index: DocumentIndex, units: np.ndarray, *, max_tokens: int, batch_size: int, pad: int,
                 vocab_size: int, seed: int = 0, shuffle: bool = True, rank: int = 0, world: int = 1,
                 workers: int = 1, fill: bool = False):
        super().__init__(index, units, batch_size=batch_size, seed=seed, shuffle=shuffle, rank=rank, world=world,
                         workers=workers, fill=fill)
        self.max_tokens, self.pad, self.vocab_size = max_tokens, pad, vocab_size

    def _batch(self, docs: np.ndarray, fill: int = 0, epoch: int = 0) -> dict[str, Any]:
        rows = [self.index.read(int(d), self.max_tokens) for d in docs]
        rows += [np.full(1, self.pad, np.int64)] * fill
        lengths = np.array([len(r) for r in rows], np.int64)
        tokens = np.full((len(rows), max(1, int(lengths.max()))), self.pad, np.int64)
        for i, r in enumerate(rows):
            tokens[i, :len(r)] = r
        if ((tokens >= self.vocab_size) | (tokens < 0)).any():
            raise ShardError(f"the documents {docs.tolist()} hold token ids outside the vocabulary (size "
                             f"{self.vocab_size}); the shards are corrupt or from another tokenizer")
        labels = np.concatenate([self.index.label[docs], np.full(fill, IGNORE_LABEL, np.int64)])
        ids = np.concatenate([docs, np.full(fill, -1, np.int64)])
        return {"tokens": torch.from_numpy(tokens), "lengths": torch.from_numpy(lengths),
                "labels": torch.from_numpy(labels), "sample_ids": torch.from_numpy(ids)}


class SampleDataModule(ShardDataModule):
    """What a datamodule of whole labelled samples shares, whatever the sample: the class names from the manifest,
    the `label_fraction` subset of the train split, the labels trained on and validated, the class-prior baseline,
    and the label fraction in the saved position. Subclasses fill `_indexes` (split -> an index with a `label`
    array) and `_units` (split -> the sample ids delivered) in `setup`, with `_choose_units`."""

    prepare_hint = "`pretrain prepare --label-field NAME` (or --task stdlib-packages)"  # how to make labelled shards

    def __init__(self, label_fraction: float = 1.0, **kwargs: Any):
        super().__init__(**kwargs)
        if not 0 < label_fraction <= 1:
            raise UserError(f"data.label_fraction must be in (0, 1], got {label_fraction}")
        self.label_fraction = label_fraction
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
        self._units = {"train": stratified_subset(self._indexes["train"].label, self.label_fraction, self.seed),
                       "val": np.arange(len(self._indexes["val"]))}
        world = self._world()[1]
        if stage in (None, "fit") and len(self._units["train"]) < world * self.batch_size:
            raise UserError(f"data.label_fraction={self.label_fraction} leaves {len(self._units['train'])} train "
                            f"{unit}, fewer than one batch on every rank ({world} x data.batch_size="
                            f"{self.batch_size}); lower data.batch_size or raise data.label_fraction")

    def train_labels(self) -> np.ndarray:
        """Classes of the samples trained on (the label-fraction subset)."""
        return self._indexes["train"].label[self._units["train"]]

    def val_labels(self) -> np.ndarray:
        """Classes of the val split's samples (all of them are validated)."""
        return self._indexes["val"].label

    def unigram_baseline(self) -> dict[str, Any]:
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

    def _apply_loaded(self, stream: Any) -> None:
        assert self._loaded is not None
        saved = self._loaded.get("label_fraction", 1.0)
        if saved != self.label_fraction:
            raise UserError(f"the checkpoint was trained with data.label_fraction={saved} but this run has "
                            f"{self.label_fraction}; set data.label_fraction={saved} to resume its data position")
        super()._apply_loaded(stream)


class ClassificationDataModule(SampleDataModule):
    """Labelled documents (`pretrain prepare --label-field NAME` or `--task stdlib-packages`) for a classifier.

    Each example is one whole document, truncated to seq_len - 2 tokens (the classifier adds its framing tokens:
    `<|cls|>` and `<|sep|>` for an encoder, the end-of-document token for a GPT), padded per batch. The shards must
    be local files (each document is read by random access).

    Args:
        label_fraction: train on this seeded, stratified share of the train split's documents (1.0: all); at least
            one document per class. Validation always covers the whole val split.
        **the rest**: see ShardDataModule (seq_len, batch_size, num_workers, seed, shuffle, path, ...).
    """

    def __init__(self, label_fraction: float = 1.0, **kwargs: Any):
        super().__init__(label_fraction=label_fraction, **kwargs)
        if self.seq_len < 3:
            raise UserError(f"data.seq_len must be >= 3 for classification, got {self.seq_len}")

    def setup(self, stage: str | None = None) -> None:
        if self._indexes:
            return
        self.labels  # noqa: B018  # unlabelled shards fail here, with the fix
        self._train = self._shards("train", self.train_spec)
        self._val = self._shards("val", self.val_spec)
        if not seekable(self._train + self._val):
            raise UserError("labelled shards must be local files (documents are read by random access); copy them "
                            "to local disk")
        if stage in (None, "fit") and not self._train:
            raise UserError(f"no train shards found for '{self.train_spec or self.path}'")
        for split, shards in (("train", self._train), ("val", self._val)):
            index = self._indexes[split] = DocumentIndex(shards)
            if len(index) and int(index.label.max()) >= self.num_classes:
                raise ShardError(f"the {split} shards hold class {int(index.label.max())} but the manifest names "
                                 f"{self.num_classes} classes; re-run `pretrain prepare`")
        self._choose_units(stage, "documents")

    def _stream(self, shards: list[Shard], batch_size: int, shuffle: bool, train: bool) -> DocumentStream:
        rank, world = self._world()
        split = "train" if train else "val"
        return DocumentStream(self._indexes[split], self._units[split], max_tokens=self.seq_len - 2,
                              batch_size=batch_size, pad=self.special_ids["pad"], vocab_size=self.vocab_size,
                              seed=self.seed, shuffle=shuffle, rank=rank, world=world,
                              workers=max(1, self.num_workers), fill=not train)


__all__ = ["ClassificationDataModule", "DocumentIndex", "DocumentStream", "IGNORE_LABEL", "SampleDataModule",
           "SampleStream", "ShardFiles", "stratified_subset", "tar_entries"]
