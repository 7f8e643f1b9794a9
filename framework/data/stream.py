"""The streaming reader: shards -> packed windows of seq_len + 1 tokens -> a seeded order over the epoch -> batches.

`TokenStream` is a plain `IterableDataset`: iterate it directly (benchmarks, single process) or through a
`torch.utils.data.DataLoader(batch_size=None, num_workers=K)`. What each rank and worker delivers is decided by
`framework.data.cursor` from (seed, epoch, shard list, layout), so it needs no communication between processes.
"""

from __future__ import annotations

from typing import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from framework.data.cursor import Layout, Segment, shard_order
from framework.data.shards import EpochReader, Shard, seekable


class TokenStream(IterableDataset):
    """Batches `{"tokens": LongTensor (B, seq_len + 1), "sample_ids": LongTensor (B,), "position": LongTensor
    [epoch, segment, batch]}`. `sample_ids` names each window by its index in the epoch stream: the same window has
    the same id whatever the layout (world size, workers, batch size) and however the run was resumed, so anything
    random per sample (e.g. masked-LM masking) can be seeded by (seed, epoch, id). `transform(batch, epoch)`, when
    given, maps each batch dict to another one in the process that reads it (a DataLoader worker); it must keep
    "position" and be picklable.

    Documents are concatenated with the end-of-document token between them and cut into windows of seq_len + 1
    tokens (inputs are window[:-1], targets window[1:]), so no token is padding. Shuffled, the windows of an epoch
    come in a seeded pseudo-random permutation of the whole epoch when every shard is a local file (read by random
    access); when some shard cannot seek (`pipe:`, http) each worker interleaves sequential streams over its share
    of the epoch and shuffles them in blocks of `shuffle_block` windows (see `framework.data.cursor`).
    Set `segment` and `start_batch` before iterating to continue from a saved position; by default iteration covers
    epoch 0 from its start. It has no `__len__` on purpose: Lightning would combine a length with its own restored
    batch counters and end a resumed epoch early; without one it reads until the stream ends, which every rank
    reaches at the same batch.
    """

    def __init__(self, shards: list[Shard], *, seq_len: int, batch_size: int, eod: int, vocab_size: int,
                 seed: int = 0, shuffle: bool = True, shuffle_block: int = 1024, rank: int = 0, world: int = 1,
                 workers: int = 1, transform: Callable[[dict, int], dict] | None = None):
        if seq_len < 1 or batch_size < 1 or shuffle_block < 1:
            raise ValueError("seq_len, batch_size and shuffle_block must be >= 1")
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is outside world size {world}")
        self.shards, self.seq_len, self.eod, self.vocab_size = shards, seq_len, eod, vocab_size
        self.seed, self.shuffle, self.shuffle_block, self.rank = seed, shuffle, shuffle_block, rank
        self.transform = transform
        self.layout = Layout(world, workers, batch_size)
        self.segment: Segment | None = None
        self.start_batch = 0

    @property
    def window(self) -> int:
        return self.seq_len + 1

    @property
    def windows_per_epoch(self) -> int:
        """Windows in every epoch's stream (the shard order changes per epoch, the total does not)."""
        return sum(s.stream_len for s in self.shards) // self.window

    @property
    def order(self) -> str:
        """How a fresh epoch is ordered: see `framework.data.cursor`."""
        if not self.shuffle:
            return "sequential"
        return "global" if seekable(self.shards) else "stream"

    def fresh_segment(self, epoch: int) -> Segment:
        return Segment(epoch, 0, [(0, self.windows_per_epoch)], self.layout, self.order, self.seed,
                       self.shuffle_block)

    def _segment(self) -> Segment:
        return self.segment if self.segment is not None else self.fresh_segment(0)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        seg = self._segment()
        # The DataLoader takes batch i of an iteration from worker i % K, starting at worker 0 even when we resume at
        # batch b; batch j of the segment belongs to the piece of role j % K, so this worker plays role (id + b) % K.
        role = (worker + self.start_batch) % workers
        if workers != seg.layout.workers or seg.layout.world != self.layout.world:
            raise RuntimeError(f"stream laid out for {seg.layout} but running {workers} worker(s) "
                               f"in a world of {self.layout.world}")
        order = shard_order(self.seed, seg.epoch, len(self.shards), self.shuffle)
        reader = EpochReader([self.shards[i] for i in order], self.eod, self.vocab_size)
        try:
            yield from self._batches(seg, reader, role)
        finally:
            reader.close()

    def _batches(self, seg: Segment, reader: EpochReader, worker: int) -> Iterator[dict[str, torch.Tensor]]:
        B, K = seg.layout.batch_size, seg.layout.workers
        offset, length = seg.piece(self.rank, worker)
        done_batches = seg.worker_batches(worker, 0, self.start_batch)  # this worker's batches already consumed
        # Read a shuffle block at a time in the "stream" order (its windows are a few sequential runs, read in
        # ascending order); otherwise whole batches, ~256 windows at a time to amortise the permutation's numpy calls.
        chunk = seg.block if seg.order == "stream" else B * -(-256 // B)
        pos = done_batches * B
        rows: list[np.ndarray] = []
        row_ids: list[int] = []
        while pos < length:
            stop = min(length, (pos // chunk + 1) * chunk)  # a block may end mid-batch: rows carry over
            ids = seg.windows(np.arange(offset + pos, offset + stop))
            windows = reader.read_windows(ids, self.window)  # (n, L+1)
            for row, g in zip(windows, ids.tolist()):
                rows.append(row)
                row_ids.append(g)
                if len(rows) == B:
                    j = worker + K * done_batches  # this batch's index among the rank's batches
                    batch = {"tokens": torch.from_numpy(np.stack(rows)), "sample_ids": torch.tensor(row_ids),
                             "position": torch.tensor([seg.epoch, seg.index, j])}
                    yield self.transform(batch, seg.epoch) if self.transform is not None else batch
                    rows, row_ids, done_batches = [], [], done_batches + 1
            pos = stop
