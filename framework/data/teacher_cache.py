"""Offline teacher outputs for distillation: a teacher's top-k next-token log-probabilities for every train window.

`pretrain distill-cache` runs the teacher once over the windows of each epoch (framework.data.stream: the epoch
stream is a pure function of seed, epoch and shard list, and window g is the same tokens whatever the layout) and
stores, per window and position, the ids of the teacher's k most likely next tokens and their log-probabilities at
the distillation temperature. Training then needs no teacher in memory: `data.teacher_cache DIR` makes each
DataLoader worker attach the rows of the windows it delivers (`teacher_ids`, `teacher_logprobs`, (B, T, k)) to the
batch, so the cache is read by the same exactly-once, resumable reader as the tokens, on any world size.

Layout: `DIR/epoch{E}.ids.npy` (uint16 when the vocabulary fits, else int32) and `DIR/epoch{E}.logprobs.npy`
(float32), both (windows, seq_len, k), and `DIR/teacher_cache.json` (written last: what the cache is for, checked
against the run). A cache is written to a temporary directory and renamed into place, so an interrupted one never
looks complete.

The bias of a top-k cache (Sparse Logit Sampling, ACL 2025): the teacher's mass outside its top k is kept only as one
"rest" bucket (1 - the top-k mass, derived from the stored log-probabilities), so the loss is the KL between the
teacher and the student both coarsened to k + 1 outcomes, a lower bound of the full KL; the student is not told how
the rest is spread. With k = 16 on a byte vocabulary the rest is small; on a 50k vocabulary it is not, and the bias
grows as the teacher's distribution flattens (a higher temperature makes it worse).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from framework.data.cursor import shard_order
from framework.data.shards import EpochReader, Shard
from framework.errors import UserError
from framework.objectives.distill import top_k_of

META = "teacher_cache.json"


def describe_data(shards: list[Shard], *, seed: int, shuffle: bool, seq_len: int) -> dict[str, Any]:
    """What fixes the windows of every epoch: the cache is valid only for a run with the same description."""
    return {"shards": [[s.name, s.samples, s.tokens] for s in shards], "seed": seed, "shuffle": shuffle,
            "seq_len": seq_len}


def write_cache(output: str | os.PathLike, forward: Callable[[torch.Tensor], torch.Tensor], shards: list[Shard], *,
                seed: int, shuffle: bool, seq_len: int, eod: int, vocab_size: int, epochs: int, top_k: int,
                temperature: float, teacher: dict[str, Any], batch_size: int = 16,
                progress: Callable[[str], None] | None = None) -> Path:
    """Run `forward` (token ids (B, T) -> logits (B, T, V)) over every window of `epochs` epochs and write the cache
    at `output` (which must not exist). `teacher` is recorded as it is (its path and fingerprint)."""
    out = Path(output)
    if out.exists():
        raise UserError(f"'{out}' already exists; pass a new --output (or delete it)")
    if top_k < 1 or top_k > vocab_size or epochs < 1 or temperature <= 0:
        raise UserError(f"--top-k must be in 1..{vocab_size}, --epochs >= 1 and --temperature > 0")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        window = seq_len + 1
        n = sum(s.stream_len for s in shards) // window
        id_dtype = np.uint16 if vocab_size <= 65536 else np.int32
        for epoch in range(epochs):
            reader = EpochReader([shards[i] for i in shard_order(seed, epoch, len(shards), shuffle)], eod,
                                 vocab_size)
            ids = np.lib.format.open_memmap(tmp / f"epoch{epoch}.ids.npy", "w+", id_dtype, (n, seq_len, top_k))
            logprobs = np.lib.format.open_memmap(tmp / f"epoch{epoch}.logprobs.npy", "w+", np.float32,
                                                 (n, seq_len, top_k))
            try:
                for g0 in range(0, n, batch_size):
                    g1 = min(n, g0 + batch_size)
                    tokens = torch.from_numpy(reader.read_windows(np.arange(g0, g1), window).astype(np.int64))
                    with torch.no_grad():
                        logits = forward(tokens[:, :-1])  # (b, T, V)
                    top_ids, top_logprobs = top_k_of(logits, top_k, temperature)
                    ids[g0:g1] = top_ids.cpu().numpy().astype(id_dtype)
                    logprobs[g0:g1] = top_logprobs.cpu().numpy()
                    if progress is not None and (g1 == n or (g0 // batch_size) % 100 == 0):
                        progress(f"epoch {epoch}: {g1:,}/{n:,} windows")
                ids.flush(), logprobs.flush()
            finally:
                reader.close()
                del ids, logprobs
        meta = {"data": describe_data(shards, seed=seed, shuffle=shuffle, seq_len=seq_len), "epochs": epochs,
                "windows": n, "top_k": top_k, "temperature": temperature, "vocab_size": vocab_size,
                "teacher": teacher}
        (tmp / META).write_text(json.dumps(meta, indent=1))
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    meta = Path(path) / META
    if not meta.is_file():
        raise UserError(f"'{path}' is not a teacher cache (no {META}); write one with `pretrain distill-cache`")
    return json.loads(meta.read_text())


def check_cache(meta: dict[str, Any], path: str, data: dict[str, Any]) -> None:
    """One line when the cache was written for other windows than this run's."""
    for key in ("seq_len", "seed", "shuffle"):
        if meta["data"][key] != data[key]:
            raise UserError(f"the teacher cache '{path}' was written for data.{key}={meta['data'][key]!r} but this "
                            f"run has {data[key]!r}; use the same setting or write a cache for it")
    if meta["data"]["shards"] != data["shards"]:
        raise UserError(f"the teacher cache '{path}' was written for other train shards than this run's; write a "
                        "cache for these shards with `pretrain distill-cache`")


class CacheLookup:
    """A batch transform (run in the DataLoader worker) that adds the cached teacher rows of the batch's windows:
    `teacher_ids` (B, T, k) int64 and `teacher_logprobs` (B, T, k) float32. Picklable; opens the arrays lazily."""

    def __init__(self, path: str, epochs: int, inner: Callable[[dict, int], dict] | None = None):
        self.path, self.epochs, self.inner = path, epochs, inner
        self._arrays: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_arrays": {}}

    def __call__(self, batch: dict, epoch: int) -> dict:
        if self.inner is not None:
            batch = self.inner(batch, epoch)
        if epoch >= self.epochs:
            raise UserError(f"the teacher cache '{self.path}' holds {self.epochs} epoch(s) but the run reached epoch "
                            f"{epoch}; write it with --epochs {epoch + 1} or more, or lower trainer.max_steps")
        if epoch not in self._arrays:
            self._arrays[epoch] = (np.load(Path(self.path) / f"epoch{epoch}.ids.npy", mmap_mode="r"),
                                   np.load(Path(self.path) / f"epoch{epoch}.logprobs.npy", mmap_mode="r"))
        ids, logprobs = self._arrays[epoch]
        rows = batch["sample_ids"].numpy()
        order = np.argsort(rows)  # ascending reads from the memory map, then back to the batch's order
        back = np.argsort(order)
        batch["teacher_ids"] = torch.from_numpy(ids[rows[order]][back].astype(np.int64))
        batch["teacher_logprobs"] = torch.from_numpy(np.ascontiguousarray(logprobs[rows[order]][back]))
        return batch
