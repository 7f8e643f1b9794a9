"""The data position: which packed windows of an epoch each rank and worker reads, and which were already consumed.

Vocabulary
- The *epoch stream* is every train document (each followed by the end-of-document token) concatenated in the epoch's
  shard order, a pure function of (seed, epoch, shard list). It is cut into *windows* of seq_len + 1 tokens, numbered
  0..N-1; window g covers stream tokens [g*(L+1), (g+1)*(L+1)). A window is the unit of delivery: every window of an
  epoch is delivered exactly once, except a tail of fewer than world*batch windows (plus < L+1 tokens) at the end.
- A *segment* is an ordered list of still-available windows (as ranges) plus the layout (world size, dataloader
  workers per rank, batch size) that divides them: rank r takes a contiguous run of `batches_per_rank * batch_size`
  windows, split between its workers by whole batches in the order the DataLoader consumes them (batch j of a rank
  comes from worker j % K). Each worker shuffles its run in blocks of `shuffle_block` windows, seeded.
- The position is (segment, batches consumed per rank). It holds no rank-specific state, so rank 0 can save it alone.
  Resuming with the same layout continues bit-exactly; with another layout (a different world size, worker count or
  batch size) the consumed windows are subtracted and the rest becomes a new segment, so nothing is lost or repeated.

Everything here is pure integer arithmetic on ranges: no I/O, no torch, no Lightning.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

import numpy as np

Range = tuple[int, int]  # [start, stop) of window indices


@dataclass(frozen=True)
class Layout:
    world: int  # ranks
    workers: int  # dataloader worker processes per rank (1 when loading in the main process)
    batch_size: int  # windows per batch, per rank

    def __post_init__(self) -> None:
        if min(self.world, self.workers, self.batch_size) < 1:
            raise ValueError(f"layout needs world, workers and batch_size >= 1, got {self}")


@dataclass
class Segment:
    epoch: int
    index: int  # 0 for a fresh epoch; +1 each time a resume changed the layout within the epoch
    avail: list[Range]  # windows still to deliver, in delivery order
    layout: Layout
    _starts: list[int] = field(init=False, repr=False)  # flat position where each range starts

    def __post_init__(self) -> None:
        self.avail = [(int(a), int(b)) for a, b in self.avail if b > a]
        self._starts = np.cumsum([0] + [b - a for a, b in self.avail]).tolist()

    @property
    def total(self) -> int:
        """Windows available in this segment."""
        return self._starts[-1]

    @property
    def batches_per_rank(self) -> int:
        """Every rank gets exactly this many batches; the remainder (< world*batch windows) is the dropped tail."""
        return self.total // (self.layout.world * self.layout.batch_size)

    def worker_batches(self, worker: int, start: int = 0, stop: int | None = None) -> int:
        """How many of a rank's batches [start, stop) come from `worker` (batch j comes from worker j % K)."""
        stop = self.batches_per_rank if stop is None else stop
        return len(range(worker, stop, self.layout.workers)) - len(range(worker, start, self.layout.workers))

    def piece(self, rank: int, worker: int) -> tuple[int, int]:
        """(flat offset, length) of the windows that (rank, worker) delivers this segment."""
        B = self.layout.batch_size
        offset = rank * self.batches_per_rank * B + B * sum(self.worker_batches(w) for w in range(worker))
        return offset, B * self.worker_batches(worker)

    def flat_to_ranges(self, start: int, stop: int) -> list[Range]:
        """Map flat positions [start, stop) of this segment to window ranges (a flat run may span several ranges)."""
        out: list[Range] = []
        i = bisect.bisect_right(self._starts, start) - 1
        while start < stop:
            a, b = self.avail[i]
            lo = a + (start - self._starts[i])
            hi = min(b, lo + (stop - start))
            out.append((lo, hi))
            start += hi - lo
            i += 1
        return out

    def state(self) -> dict:
        L = self.layout
        return {"epoch": self.epoch, "index": self.index, "avail": [list(r) for r in self.avail],
                "world": L.world, "workers": L.workers, "batch_size": L.batch_size}

    @classmethod
    def from_state(cls, s: dict) -> "Segment":
        return cls(s["epoch"], s["index"], [tuple(r) for r in s["avail"]],
                   Layout(s["world"], s["workers"], s["batch_size"]))


def block_permutation(seed: int, segment: Segment, rank: int, worker: int, block: int, n: int) -> np.ndarray:
    """The order in which a worker delivers the n windows of one shuffle block: seeded by everything that names it."""
    rng = np.random.default_rng([seed, segment.epoch, segment.index, rank, worker, block, 0x5EED])
    return rng.permutation(n)


def shard_order(seed: int, epoch: int, n_shards: int, shuffle: bool) -> np.ndarray:
    """Order of the shards in an epoch's stream: reshuffled every epoch."""
    if not shuffle:
        return np.arange(n_shards)
    return np.random.default_rng([seed, epoch, 0x5A4D]).permutation(n_shards)


def consumed_flat(segment: Segment, batches: int, seed: int, shuffle_block: int, shuffle: bool) -> list[Range]:
    """Flat positions of the windows delivered after every rank consumed `batches` batches (sorted, merged)."""
    B, S = segment.layout.batch_size, shuffle_block
    runs: list[Range] = []
    for rank in range(segment.layout.world):
        for worker in range(segment.layout.workers):
            offset, length = segment.piece(rank, worker)
            done = B * segment.worker_batches(worker, 0, batches)
            full = (done // S) * S if shuffle else done
            runs.append((offset, offset + full))
            if shuffle and done > full:
                n = min(S, length - full)
                perm = block_permutation(seed, segment, rank, worker, full // S, n)
                runs += [(offset + full + int(p), offset + full + int(p) + 1) for p in perm[: done - full]]
    return _merge(runs)


def remaining(segment: Segment, batches: int, seed: int, shuffle_block: int, shuffle: bool) -> list[Range]:
    """Window ranges of the segment not yet delivered (including the old layout's tail), in segment order."""
    gaps, cursor = [], 0
    for a, b in consumed_flat(segment, batches, seed, shuffle_block, shuffle):
        if a > cursor:
            gaps.append((cursor, a))
        cursor = max(cursor, b)
    if cursor < segment.total:
        gaps.append((cursor, segment.total))
    out: list[Range] = []
    for a, b in gaps:
        out += segment.flat_to_ranges(a, b)
    return _merge(out, keep_order=True)


def _merge(runs: list[Range], keep_order: bool = False) -> list[Range]:
    """Merge touching/overlapping ranges (sorting first unless the order is meaningful)."""
    out: list[list[int]] = []
    for a, b in (runs if keep_order else sorted(runs)):
        if b <= a:
            continue
        if out and a == out[-1][1]:
            out[-1][1] = b
        elif out and not keep_order and a < out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]
