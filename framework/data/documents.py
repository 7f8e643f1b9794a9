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

The order, the position, the label fraction and the filler rows are framework.data.samples' (SampleStream,
SampleDataModule), shared with images.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from framework.data.datamodule import ShardDataModule
from framework.data.samples import IGNORE_LABEL, SampleDataModule, SampleStream, ShardFiles, tar_entries
from framework.data.shards import DTYPES, Shard, ShardError, member_ext, local_path, seekable
from framework.errors import UserError


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
        with open(local_path(shard.url), "rb", buffering=0) as f:
            for name, offset, size in tar_entries(shard):
                ext = member_ext(name)
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


class ClassificationDataModule(SampleDataModule):
    """Labelled documents (`pretrain prepare --label-field NAME` or `--task stdlib-packages`) for a classifier.

    Each example is one whole document, truncated to seq_len - 2 tokens (the classifier adds its framing tokens:
    `<|cls|>` and `<|sep|>` for an encoder, the end-of-document token for a GPT), padded per batch. The shards must
    be local files (each document is read by random access).

    Args:
        label_fraction: train on this seeded, stratified share of the train split's documents (1.0: all); at least
            one document per class. Validation always covers the whole val split.
        holdout: validate on this held-out share of that subset instead of the val split (early stopping without
            touching the val split; see SampleDataModule).
        seq_len: tokens per example, framing included: each document is cut to seq_len - 2 tokens.
        shuffle_block, tokenizer: as ShardDataModule's, so that one config's data section serves both (documents are
            always read by random access; `tokenizer` is the one `prepare_if_missing` prepares the default corpus
            with).
        **the rest**: see StreamDataModule (path, batch_size, num_workers, seed, shuffle, train_shards, ...).
    """

    modality = "text"
    # a missing data.path and prepare_if_missing behave as for token windows
    _missing_data_message = ShardDataModule._missing_data_message
    _prepare_embedded = ShardDataModule._prepare_embedded

    def __init__(self, label_fraction: float = 1.0, seq_len: int = 256, shuffle_block: int = 1024,
                 tokenizer: str = "bytes", **kwargs: Any):
        for name, value in (("seq_len", seq_len), ("shuffle_block", shuffle_block)):
            if value < 1:
                raise UserError(f"data.{name} must be >= 1, got {value}")
        super().__init__(label_fraction=label_fraction, **kwargs)
        if seq_len < 3:
            raise UserError(f"data.seq_len must be >= 3 for classification, got {seq_len}")
        self.seq_len, self.shuffle_block, self.tokenizer_spec = seq_len, shuffle_block, tokenizer

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

    def position_settings(self) -> dict[str, Any]:
        # as ShardDataModule's, so positions saved before the split into modules still resume
        return {"seq_len": self.seq_len, **super().position_settings(), "shuffle_block": self.shuffle_block}


__all__ = ["ClassificationDataModule", "DocumentIndex", "DocumentStream"]
