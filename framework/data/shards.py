"""Finding token shards and reading token ranges out of them.

A shard is a webdataset tar written by `pretrain prepare`: one member `KEY.u16` (or `.u32`) per document holding its
token ids, little-endian, without the end-of-document token; `manifest.json` beside the shards records each shard's
document and token counts. From those counts alone we know where every token of an epoch lives, so a reader can jump
to any token offset by skipping whole shards without opening them and skipping documents by their tar headers
(a seek on local files) without reading or decoding their tokens.
"""

from __future__ import annotations

import bisect
import glob
import hashlib
import json
import os
import tarfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterator

import numpy as np

from framework.errors import UserError

DTYPES = {"u16": np.dtype("<u2"), "u32": np.dtype("<u4")}


class ShardError(UserError):
    """A shard that cannot be read as the manifest describes it (truncated, corrupt, or out of vocabulary)."""


@dataclass(frozen=True)
class Shard:
    url: str  # a local path or any URL webdataset's gopen opens (pipe:, file:, http(s):)
    name: str  # basename, the key into the manifest
    samples: int  # documents
    tokens: int  # tokens without end-of-document markers
    bytes: int | None = None  # file size, for a cheap truncation check on local files

    @property
    def stream_len(self) -> int:
        """Tokens this shard contributes to the epoch stream: each document plus its end-of-document token."""
        return self.tokens + self.samples


def _is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def _local_path(url: str) -> str:
    return url[len("file:"):] if url.startswith("file:") else url


def expand(specs: str | list[str]) -> list[str]:
    """Shard URLs from paths, globs, brace patterns (`train-{000000..000127}.tar`) and URLs, in the order given."""
    import braceexpand  # webdataset's own dependency

    urls: list[str] = []
    for spec in [specs] if isinstance(specs, str) else specs:
        for item in braceexpand.braceexpand(spec):
            if _is_local(item) and any(c in item for c in "*?["):
                matched = sorted(glob.glob(_local_path(item)))
                if not matched:
                    raise UserError(f"no shards match '{item}'; check the path or run `pretrain prepare` first")
                urls += matched
            else:
                urls.append(item)
    return urls


def read_manifest(url: str) -> dict:
    """Load manifest.json from a path or URL; a missing or unreadable manifest is a UserError naming the fix."""
    try:
        if _is_local(url):
            with open(_local_path(url), "rb") as f:
                raw = f.read()
        else:
            from webdataset.gopen import gopen

            with gopen(url, "rb") as f:
                raw = f.read()
        manifest = json.loads(raw)
    except FileNotFoundError:
        raise UserError(f"no manifest at '{url}': the shards are incomplete or were not made by `pretrain prepare`; "
                        "run `pretrain prepare --output DIR` (a killed prepare leaves no manifest)") from None
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read manifest '{url}' ({e}); re-run `pretrain prepare --overwrite`") from None
    if manifest.get("format") != "framework-shards":
        raise UserError(f"'{url}' is not a shard manifest written by `pretrain prepare`")
    return manifest


def manifest_shards(manifest: dict, split: str, base: str) -> list[Shard]:
    """The shards of one split listed in a manifest, located relative to `base` (the manifest's directory or URL)."""
    entries = manifest.get("splits", {}).get(split, {}).get("shards", [])
    return [Shard(url=_join(base, e["name"]), name=e["name"], samples=int(e["samples"]), tokens=int(e["tokens"]),
                  bytes=e.get("bytes")) for e in entries]


def _join(base: str, name: str) -> str:
    return str(Path(base) / name) if _is_local(base) else base.rstrip("/") + "/" + name


def describe(urls: list[str], manifest: dict | None) -> list[Shard]:
    """Shard records for explicit URLs: counts from the manifest, or from a header scan when there is none."""
    by_name = {}
    if manifest is not None:
        for split in manifest.get("splits", {}):
            by_name.update({s.name: s for s in manifest_shards(manifest, split, ".")})
    out = []
    for url in urls:
        name = url.rstrip("/").rsplit("/", 1)[-1]
        if name in by_name:
            s = by_name[name]
            out.append(Shard(url, name, s.samples, s.tokens, s.bytes))
        elif manifest is not None:
            raise UserError(f"shard '{url}' is not in the manifest; point the data at shards of one `prepare` output")
        else:
            out.append(scan(url))
    return out


def scan(url: str) -> Shard:
    """Count a shard's documents and tokens from its tar headers (used only when no manifest is available)."""
    warnings.warn(f"no manifest for '{url}': counting its tokens from the tar headers", stacklevel=2)
    samples = tokens = 0
    with _open_tar(url) as tf:
        for m in _members(tf, url):
            samples += 1
            tokens += m.size // DTYPES[_ext(m.name)].itemsize
    return Shard(url, url.rsplit("/", 1)[-1], samples, tokens)


def check_shards(shards: list[Shard], skip_corrupt: bool) -> list[Shard]:
    """Pre-flight on local shards: a file whose size differs from the manifest's is truncated or replaced.

    Fails naming the shard, or with `skip_corrupt` drops it with a warning; then the tar headers are read too, so a
    shard with a corrupt header is also dropped before reading starts. Every rank runs the same checks on the same
    files, so all ranks agree on the shard list and hence on the number of batches. Corruption found later, while
    reading, always fails (naming the shard): skipping then would desynchronise the ranks.
    """
    good = []
    for s in shards:
        problem = None
        if _is_local(s.url):
            path = _local_path(s.url)
            if not os.path.exists(path):
                problem = "is missing"
            elif s.bytes is not None and os.path.getsize(path) != s.bytes:
                problem = f"has {os.path.getsize(path)} bytes but the manifest says {s.bytes} (truncated or replaced)"
            elif skip_corrupt:
                problem = _header_problem(s)
        if problem is None:
            good.append(s)
        elif skip_corrupt:
            warnings.warn(f"skipping shard '{s.url}': it {problem}", stacklevel=2)
        else:
            raise ShardError(f"shard '{s.url}' {problem}; re-run `pretrain prepare`, check with "
                             "`pretrain prepare --verify DIR`, or set data.skip_corrupt=true to skip it with a warning")
    return good


def _header_problem(shard: Shard) -> str | None:
    """Read a shard's tar headers: None when its document and token counts match the manifest."""
    samples = tokens = 0
    try:
        with _open_tar(shard.url) as tf:
            for m in _members(tf, shard.url):
                samples += 1
                tokens += m.size // DTYPES[_ext(m.name)].itemsize
    except ShardError as e:
        return f"cannot be read ({e})"
    if (samples, tokens) != (shard.samples, shard.tokens):
        return f"holds {samples} documents / {tokens} tokens but the manifest says {shard.samples} / {shard.tokens}"
    return None


def fingerprint(shards: list[Shard]) -> str:
    """Identity of a shard list for the data position: names and token counts, order-sensitive."""
    h = hashlib.sha256()
    for s in shards:
        h.update(f"{s.name}:{s.samples}:{s.tokens};".encode())
    return h.hexdigest()[:16]


def _ext(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def _open_tar(url: str) -> tarfile.TarFile:
    """Open a shard: seekable for local files (skipping a document is a seek), streaming for everything else."""
    try:
        if _is_local(url):
            return tarfile.open(_local_path(url), mode="r:")
        from webdataset.gopen import gopen

        stream: IO[bytes] = gopen(url, "rb")
        return tarfile.open(fileobj=stream, mode="r|")
    except (OSError, tarfile.TarError) as e:
        raise ShardError(f"cannot open shard '{url}': {e}") from None


def _members(tf: tarfile.TarFile, url: str) -> Iterator[tarfile.TarInfo]:
    """Token members of a tar, in order; tar-level corruption becomes a ShardError naming the shard."""
    try:
        for m in tf:
            if m.isfile() and _ext(m.name) in DTYPES:
                yield m
    except (tarfile.TarError, EOFError, OSError) as e:
        raise ShardError(f"shard '{url}' is corrupt ({e}); re-run `pretrain prepare` or check it with "
                         "`pretrain prepare --verify DIR`") from None


class ShardReader:
    """Sequential reader of one shard's token stream (documents with end-of-document tokens), from any offset."""

    def __init__(self, shard: Shard, eod: int, start: int = 0):
        self.shard, self.eod, self.pos = shard, eod, 0
        self._tf = _open_tar(shard.url)
        self._docs = _members(self._tf, shard.url)
        self._pending = np.empty(0, dtype=np.int64)
        self._skip_to(start)

    def _skip_to(self, start: int) -> None:
        while self.pos < start:
            m = self._next_member()
            n = m.size // DTYPES[_ext(m.name)].itemsize + 1
            if self.pos + n <= start:  # the whole document is before `start`: skip it unread
                self.pos += n
                continue
            doc = self._load(m)
            self._pending = doc[start - self.pos:]
            self.pos = start

    def _next_member(self) -> tarfile.TarInfo:
        m = next(self._docs, None)
        if m is None:
            raise ShardError(f"shard '{self.shard.url}' ends after {self.pos} tokens but the manifest says "
                             f"{self.shard.stream_len}; it is truncated: re-run `pretrain prepare`")
        return m

    def _load(self, m: tarfile.TarInfo) -> np.ndarray:
        dtype = DTYPES[_ext(m.name)]
        try:
            f = self._tf.extractfile(m)
            data = f.read() if f is not None else b""
        except (tarfile.TarError, EOFError, OSError) as e:
            raise ShardError(f"shard '{self.shard.url}' is corrupt at '{m.name}' ({e}); re-run `pretrain prepare`") \
                from None
        if len(data) != m.size or m.size % dtype.itemsize:
            raise ShardError(f"shard '{self.shard.url}' is truncated at '{m.name}'; re-run `pretrain prepare`")
        doc = np.empty(m.size // dtype.itemsize + 1, dtype=np.int64)
        doc[:-1] = np.frombuffer(data, dtype=dtype)
        doc[-1] = self.eod
        return doc

    def read_into(self, out: np.ndarray) -> None:
        """Fill `out` with the next len(out) tokens of the stream."""
        filled, n = 0, len(out)
        while filled < n:
            if not len(self._pending):
                self._pending = self._load(self._next_member())
            k = min(len(self._pending), n - filled)
            out[filled:filled + k] = self._pending[:k]
            self._pending = self._pending[k:]
            filled += k
        self.pos += n

    def close(self) -> None:
        self._tf.close()


class EpochReader:
    """Reads token ranges [t0, t1) of an epoch stream (shards in epoch order), continuing sequentially when it can."""

    def __init__(self, shards: list[Shard], eod: int, vocab_size: int):
        self.shards, self.eod, self.vocab_size = shards, eod, vocab_size
        self._starts = np.cumsum([0] + [s.stream_len for s in shards]).tolist()
        self._cur: ShardReader | None = None
        self._cur_index = -1

    @property
    def total(self) -> int:
        return self._starts[-1]

    def read(self, t0: int, t1: int, out: np.ndarray) -> None:
        """Fill out[: t1 - t0] with stream tokens [t0, t1)."""
        filled = 0
        while t0 < t1:
            i = bisect.bisect_right(self._starts, t0) - 1
            offset = t0 - self._starts[i]
            if self._cur is None or self._cur_index != i or self._cur.pos != offset:
                self.close()  # not a continuation: reopen and skip to the offset
                self._cur, self._cur_index = ShardReader(self.shards[i], self.eod, offset), i
            k = min(t1, self._starts[i + 1]) - t0
            self._cur.read_into(out[filled:filled + k])
            filled, t0 = filled + k, t0 + k
        if filled and (out[:filled].max() >= self.vocab_size or out[:filled].min() < 0):
            raise ShardError(f"shard '{self.shards[self._cur_index].url}' holds token ids outside the vocabulary "
                             f"(size {self.vocab_size}); it is corrupt or from another tokenizer")

    def close(self) -> None:
        if self._cur is not None:
            self._cur.close()
            self._cur = None


def unigram_counts(shards: list[Shard], eod: int, vocab_size: int, max_tokens: int = 50_000_000) -> np.ndarray:
    """How often each id occurs in the epoch stream of `shards` (eod after each document), over at most max_tokens."""
    reader = EpochReader(shards, eod, vocab_size)
    n = min(reader.total, max_tokens)
    total = np.zeros(vocab_size, dtype=np.int64)
    buf = np.empty(1 << 20, dtype=np.int64)
    try:
        for t0 in range(0, n, len(buf)):
            k = min(len(buf), n - t0)
            reader.read(t0, t0 + k, buf[:k])
            total += np.bincount(buf[:k], minlength=vocab_size)
    finally:
        reader.close()
    return total


def unigram_cross_entropy(train: list[Shard], val: list[Shard], eod: int, vocab_size: int,
                          max_tokens: int = 50_000_000) -> float:
    """Cross-entropy (nats/token) of the val stream under the train split's unigram distribution (add-one smoothed).

    The loss of a model that ignores context entirely: a language model must get far below it. At most `max_tokens` of
    each split are read (from the start of the stream) to keep this cheap on large corpora.
    """
    train_counts = unigram_counts(train, eod, vocab_size, max_tokens)
    val_counts = unigram_counts(val, eod, vocab_size, max_tokens)
    p = (train_counts + 1) / (train_counts.sum() + vocab_size)
    return float(-(val_counts * np.log(p)).sum() / max(1, val_counts.sum()))
