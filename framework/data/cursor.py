"""The data position: in which order an epoch's windows are delivered, by which rank and worker, and which are consumed.

Vocabulary
- The *epoch stream* is every train document (each followed by the end-of-document token) concatenated in the epoch's
  shard order, a pure function of (seed, epoch, shard list). It is cut into *windows* of seq_len + 1 tokens, numbered
  0..N-1; window g covers stream tokens [g*(L+1), (g+1)*(L+1)). A window is the unit of delivery: every window of an
  epoch is delivered exactly once, except a tail of fewer than world*batch windows (plus < L+1 tokens) at the end.
- A *segment* delivers a set of windows under one layout (world size, dataloader workers per rank, batch size). Its
  delivery positions are *slots* 0..total-1: rank r takes a contiguous run of `batches_per_rank * batch_size` slots,
  split between its workers by whole batches in the order the DataLoader consumes them (batch j of a rank comes from
  worker j % K); the slots past world * batches_per_rank * batch_size are the dropped tail.
- The segment's *order* maps each slot to a *flat* position in its `avail` ranges, and the value there names the window:
  - "global" (shuffled local shards): a keyed pseudo-random permutation of all non-tail slots (a Feistel network with
    cycle-walking), so every batch draws from the whole epoch, at O(1) memory whatever the corpus size;
  - "stream" (shuffled shards that cannot seek, e.g. `pipe:` or http): each worker reads its contiguous share of the
    epoch as STREAMS interleaved sequential streams and shuffles them in blocks of `block` windows;
  - "sequential": slot = flat position (shuffle off, validation).
- The position is (segment, batches consumed per rank). Each worker consumes a prefix of its slots, so it holds no
  rank-specific state and rank 0 can save it alone. Resuming with the same layout continues bit-exactly; with another
  layout the unconsumed slots (at most world*workers + 1 ranges) become the `avail` of a new segment whose *parent* is
  the old one: its values are the parent's slots. So nothing is lost or repeated, and the saved state stays small.

Everything here is pure integer arithmetic: no I/O, no torch, no Lightning.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

Range = tuple[int, int]  # [start, stop)
ORDERS = ("global", "stream", "sequential")
STREAMS = 8  # sequential streams interleaved per worker in the "stream" order
ROUNDS = 6  # Feistel rounds; 4 already make a keyed pseudo-random permutation (Luby-Rackoff), 6 leave a margin


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
    avail: list[Range]  # values still to deliver: window indices, or the parent's slots when there is a parent
    layout: Layout
    order: str = "global"
    seed: int = 0
    block: int = 1024  # windows per shuffle block of the "stream" order
    parent: "Segment | None" = None
    _starts: np.ndarray = field(init=False, repr=False)  # flat position where each range starts

    def __post_init__(self) -> None:
        if self.order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got {self.order!r}")
        self.avail = [(int(a), int(b)) for a, b in self.avail if b > a]
        self._starts = np.cumsum([0] + [b - a for a, b in self.avail], dtype=np.int64)

    @property
    def total(self) -> int:
        """Windows available in this segment."""
        return int(self._starts[-1])

    @property
    def batches_per_rank(self) -> int:
        """Every rank gets exactly this many batches; the remainder (< world*batch windows) is the dropped tail."""
        return self.total // (self.layout.world * self.layout.batch_size)

    @property
    def used(self) -> int:
        """Slots delivered by some rank; the slots from here on are the tail."""
        return self.batches_per_rank * self.layout.world * self.layout.batch_size

    def worker_batches(self, worker: int, start: int = 0, stop: int | None = None) -> int:
        """How many of a rank's batches [start, stop) come from `worker` (batch j comes from worker j % K)."""
        stop = self.batches_per_rank if stop is None else stop
        return len(range(worker, stop, self.layout.workers)) - len(range(worker, start, self.layout.workers))

    def piece(self, rank: int, worker: int) -> tuple[int, int]:
        """(first slot, number of slots) that (rank, worker) delivers this segment."""
        B = self.layout.batch_size
        offset = rank * self.batches_per_rank * B + B * sum(self.worker_batches(w) for w in range(worker))
        return offset, B * self.worker_batches(worker)

    # ------------------------------------------------------------------------------------------ slot -> window
    def windows(self, slots: np.ndarray) -> np.ndarray:
        """The window index delivered at each slot (int64 array in, int64 array out)."""
        values = self._value(self.flat(np.asarray(slots, dtype=np.int64)))
        return values if self.parent is None else self.parent.windows(values)

    def flat(self, slots: np.ndarray) -> np.ndarray:
        """Flat positions (into `avail`) of slots; tail slots map to themselves."""
        out = slots.copy()
        inner = slots < self.used
        if self.order == "global" and inner.any():
            out[inner] = feistel(slots[inner], self.used, self._keys())
        elif self.order == "stream" and inner.any():
            out[inner] = self._stream_flat(slots[inner])
        return out

    def _value(self, flat: np.ndarray) -> np.ndarray:
        i = np.searchsorted(self._starts, flat, side="right") - 1
        lo = np.array([a for a, _ in self.avail], dtype=np.int64)
        return lo[i] + (flat - self._starts[i])

    def _keys(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch, self.index, 0xFE15]).bit_generator.random_raw(ROUNDS)

    def _stream_flat(self, slots: np.ndarray) -> np.ndarray:
        """"stream" order: the position inside a worker's share is shuffled within its block, then de-interleaved."""
        W, K = self.layout.world, self.layout.workers
        pieces = [self.piece(r, w) + (r, w) for r in range(W) for w in range(K)]
        offsets = np.array([p[0] for p in pieces], dtype=np.int64)
        # an empty piece shares its offset with the next one; side="right" picks the last, the one holding the slot
        which = np.searchsorted(offsets, slots, side="right") - 1
        out = np.empty_like(slots)
        for i in np.unique(which):
            offset, length, rank, worker = pieces[i]
            sel = which == i
            pos = slots[sel] - offset
            blocks = pos // self.block
            shuffled = pos.copy()
            for b in np.unique(blocks):
                in_b = blocks == b
                n = min(self.block, length - int(b) * self.block)
                perm = block_permutation(self.seed, self, rank, worker, int(b), n)
                shuffled[in_b] = int(b) * self.block + perm[pos[in_b] - int(b) * self.block]
            out[sel] = offset + deinterleave(shuffled, length, STREAMS)
        return out

    # ------------------------------------------------------------------------------------------ saving
    def state(self) -> dict:
        L = self.layout
        return {"epoch": self.epoch, "index": self.index, "avail": [list(r) for r in self.avail],
                "world": L.world, "workers": L.workers, "batch_size": L.batch_size, "order": self.order,
                "seed": self.seed, "block": self.block,
                "parent": self.parent.state() if self.parent is not None else None}

    @classmethod
    def from_state(cls, s: dict) -> "Segment":
        parent = cls.from_state(s["parent"]) if s.get("parent") else None
        return cls(s["epoch"], s["index"], [tuple(r) for r in s["avail"]],
                   Layout(s["world"], s["workers"], s["batch_size"]), s["order"], s["seed"], s["block"], parent)


def feistel(x: np.ndarray, n: int, keys: np.ndarray) -> np.ndarray:
    """A keyed bijection of [0, n) applied to x: a balanced Feistel network on the smallest even bit width that holds
    n - 1, cycle-walking (re-encrypting) any value that lands at or past n. The domain is < 4n, so a value walks
    fewer than 4 times on average, and no permutation is ever stored."""
    if n <= 1:
        return x.astype(np.int64)
    bits = max(2, (n - 1).bit_length())
    half = np.uint64((bits + 1) // 2)
    mask = np.uint64((1 << int(half)) - 1)
    y = _encrypt(x.astype(np.uint64), half, mask, keys)
    out_of_range = y >= np.uint64(n)
    while out_of_range.any():
        y[out_of_range] = _encrypt(y[out_of_range], half, mask, keys)
        out_of_range = y >= np.uint64(n)
    return y.astype(np.int64)


def _encrypt(y: np.ndarray, half: np.uint64, mask: np.uint64, keys: np.ndarray) -> np.ndarray:
    left, right = y >> half, y & mask
    for k in keys:
        left, right = right, left ^ (_mix(right ^ k) & mask)
    return (left << half) | right


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: every input bit flips about half of the output bits (uint64 arithmetic wraps)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def deinterleave(q: np.ndarray, length: int, streams: int) -> np.ndarray:
    """Position q of a round-robin over `streams` contiguous, nearly equal parts of [0, length) -> its place in
    [0, length). Parts differ by at most one; the longer ones come first, so only the last round is partial."""
    size, extra = divmod(length, streams)
    full = streams * size  # positions in complete rounds
    stream = np.where(q < full, q % streams, q - full)
    k = np.where(q < full, q // streams, size)
    return stream * size + np.minimum(stream, extra) + k


def block_permutation(seed: int, segment: Segment, rank: int, worker: int, block: int, n: int) -> np.ndarray:
    """The order in which a worker delivers the n windows of one shuffle block: seeded by everything that names it."""
    rng = np.random.default_rng([seed, segment.epoch, segment.index, rank, worker, block, 0x5EED])
    return rng.permutation(n)


def shard_order(seed: int, epoch: int, n_shards: int, shuffle: bool) -> np.ndarray:
    """Order of the shards in an epoch's stream: reshuffled every epoch."""
    if not shuffle:
        return np.arange(n_shards)
    return np.random.default_rng([seed, epoch, 0x5A4D]).permutation(n_shards)


def consumed(segment: Segment, batches: int) -> list[Range]:
    """Slots delivered after every rank consumed `batches` batches: one prefix of each worker's piece (sorted)."""
    B = segment.layout.batch_size
    runs = []
    for rank in range(segment.layout.world):
        for worker in range(segment.layout.workers):
            offset, _ = segment.piece(rank, worker)
            done = B * segment.worker_batches(worker, 0, batches)
            if done:
                runs.append((offset, offset + done))
    return sorted(runs)


def remaining(segment: Segment, batches: int) -> list[Range]:
    """Slots of the segment not yet delivered (including the old layout's tail), as sorted ranges."""
    gaps, cursor = [], 0
    for a, b in consumed(segment, batches):
        if a > cursor:
            gaps.append((cursor, a))
        cursor = max(cursor, b)
    if cursor < segment.total:
        gaps.append((cursor, segment.total))
    return gaps


def continue_on(segment: Segment, batches: int, layout: Layout) -> Segment:
    """The segment that delivers what is left of `segment` (after `batches` per rank) under another layout."""
    return Segment(segment.epoch, segment.index + 1, remaining(segment, batches), layout, segment.order,
                   segment.seed, segment.block, parent=segment)
