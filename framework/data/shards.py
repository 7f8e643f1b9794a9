"""Finding token shards and reading token ranges out of them.

A shard is a webdataset tar written by `pretrain prepare`: one member `KEY.u16` (or `.u32`) per document holding its
token ids, little-endian, without the end-of-document token; `manifest.json` beside the shards records each shard's
document and token counts. From those counts alone we know which shard holds every token of an epoch. A local shard
is then read by random access (`LocalShard`: an index of its documents from the tar headers, one `pread` per window);
a shard that cannot seek (`pipe:`, http) is read sequentially (`ShardReader`), skipping documents by their headers
without decoding their tokens.
"""

from __future__ import annotations

import bisect
import contextlib
import glob
import hashlib
import json
import os
import re
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


def is_local(url: str) -> bool:
    """Whether `url` is a file on this machine (a path or file:PATH), not a URL or a `pipe:` command."""
    return "://" not in url and not url.startswith("pipe:")


def seekable(shards: list[Shard]) -> bool:
    """Whether every shard is a local file, so windows can be read by random access."""
    return all(is_local(s.url) for s in shards)


def local_path(url: str) -> str:
    """The file path of a local shard url (without its `file:` prefix)."""
    return url[len("file:"):] if url.startswith("file:") else url


def expand(specs: str | list[str]) -> list[str]:
    """Shard URLs from paths, globs, brace patterns (`train-{000000..000127}.tar`) and URLs, in the order given."""
    import braceexpand  # webdataset's own dependency

    urls: list[str] = []
    for spec in [specs] if isinstance(specs, str) else specs:
        for item in braceexpand.braceexpand(spec):
            if is_local(item) and any(c in item for c in "*?["):
                matched = sorted(glob.glob(local_path(item)))
                if not matched:
                    raise UserError(f"no shards match '{item}'; check the path or run `pretrain prepare` first")
                urls += matched
            else:
                urls.append(item)
    return urls


def read_manifest(url: str) -> dict:
    """Load manifest.json from a path or URL; a missing or unreadable manifest is a UserError naming the fix."""
    try:
        if is_local(url):
            with open(local_path(url), "rb") as f:
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
        if not is_local(url):  # webdataset's pipe errors carry the whole Popen call: keep only the exit status
            reason = re.search(r"exit \d+", str(e))
            raise UserError(f"cannot read manifest '{url}' ({reason.group(0) if reason else e})") from None
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
    return str(Path(base) / name) if is_local(base) else base.rstrip("/") + "/" + name


def describe(urls: list[str], manifest: dict) -> list[Shard]:
    """Shard records for explicit URLs, with their counts from the manifest that lists them."""
    by_name = {}
    for split in manifest.get("splits", {}):
        by_name.update({s.name: s for s in manifest_shards(manifest, split, ".")})
    out = []
    for url in urls:
        name = shard_name(url)
        if name not in by_name:
            raise UserError(f"shard '{url}' is not in its manifest; point the data at shards of one `prepare` output "
                            "or pass the --data.manifest that lists them")
        s = by_name[name]
        out.append(Shard(url, name, s.samples, s.tokens, s.bytes))
    return out


_TAR_IN_COMMAND = re.compile(r"[^\s'\"]+\.tar\b")


def shard_name(url: str) -> str:
    """A shard's file name, also inside a `pipe:` command (`pipe:aws s3 cp s3://b/train-000001.tar -`)."""
    if url.startswith("pipe:"):
        tars = _TAR_IN_COMMAND.findall(url)
        if tars:
            return tars[-1].rsplit("/", 1)[-1]
    return url.rstrip("/").rsplit("/", 1)[-1]


def beside(url: str, name: str) -> str | None:
    """The file `name` in the same directory as the shard `url` (a path, a URL, or the .tar in a `pipe:` command);
    None when a `pipe:` command names no .tar."""
    if url.startswith("pipe:"):
        tars = list(_TAR_IN_COMMAND.finditer(url))
        if not tars:
            return None
        m = tars[-1]
        directory = m.group(0).rsplit("/", 1)[0] + "/" if "/" in m.group(0) else ""
        return url[:m.start()] + directory + name + url[m.end():]
    if is_local(url):
        prefix = "file:" if url.startswith("file:") else ""
        return prefix + os.path.join(os.path.dirname(local_path(url)), name)
    return url.rsplit("/", 1)[0] + "/" + name


def check_same_tokenizer(a: dict, b: dict, where_a: str, where_b: str) -> None:
    """Shards from two `prepare` outputs can be mixed only when their token ids mean the same thing."""
    keys = ("vocab_size", "special_tokens", "sha256")
    ta, tb = ({k: m.get("tokenizer", {}).get(k) for k in keys} for m in (a, b))
    if ta != tb:
        diff = next(k for k in keys if ta[k] != tb[k])
        raise UserError(f"the shards described by '{where_b}' use another tokenizer than those of '{where_a}' "
                        f"({diff} differs); prepare both with the same tokenizer (e.g. `pretrain prepare --tokenizer "
                        f"{os.path.join(os.path.dirname(where_a) or '.', 'tokenizer.json')}`)")


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
        if is_local(s.url):
            path = local_path(s.url)
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
        with open_tar(shard.url) as tf:
            for m in _members(tf, shard.url):
                samples += 1
                tokens += m.size // DTYPES[member_ext(m.name)].itemsize
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


def member_ext(name: str) -> str:
    """The extension of a tar member of our text shards (`KEY.u16` -> `u16`)."""
    return name.rsplit(".", 1)[-1]


def open_tar(url: str) -> tarfile.TarFile:
    """Open a shard: seekable for local files (skipping a document is a seek), streaming for everything else."""
    try:
        if is_local(url):
            return tarfile.open(local_path(url), mode="r:")
        from webdataset.gopen import gopen

        stream: IO[bytes] = gopen(url, "rb")
        tf = tarfile.open(fileobj=stream, mode="r|")
        tf.source = stream  # type: ignore[attr-defined]  # tarfile leaves a given fileobj open: ShardReader closes it
        return tf
    except (OSError, tarfile.TarError) as e:
        raise ShardError(f"cannot open shard '{url}': {e}") from None


def _members(tf: tarfile.TarFile, url: str) -> Iterator[tarfile.TarInfo]:
    """Token members of a tar, in order; tar-level corruption becomes a ShardError naming the shard."""
    try:
        for m in tf:
            if m.isfile() and member_ext(m.name) in DTYPES:
                yield m
    except (tarfile.TarError, EOFError, OSError) as e:
        raise ShardError(f"shard '{url}' is corrupt ({e}); re-run `pretrain prepare` or check it with "
                         "`pretrain prepare --verify DIR`") from None


class LocalShard:
    """Random access to a local shard's token stream: an index of its documents, built once from the tar headers.

    The index holds two int64 per document (where its tokens start in the shard's stream and in the file), so a
    window is one `pread` however far it is from the last one. Headers are parsed directly (a few microseconds each,
    against tens in `tarfile`); a tar with pax or GNU long-name records falls back to `tarfile` for the index.
    """

    def __init__(self, shard: Shard):
        self.shard = shard
        self._fd: int | None = None
        offsets, sizes, itemsize = _index_tar(shard)
        self.dtype = np.dtype(f"<u{itemsize}")
        self.data = np.asarray(offsets, dtype=np.int64)  # file offset of each document's tokens
        lengths = np.asarray(sizes, dtype=np.int64) // itemsize
        self.starts = np.concatenate([[0], np.cumsum(lengths + 1)])  # stream offset of each document (+ its EOD)
        if (len(lengths), int(lengths.sum())) != (shard.samples, shard.tokens):
            raise ShardError(f"shard '{shard.url}' holds {len(lengths)} documents / {int(lengths.sum())} tokens but "
                             f"the manifest says {shard.samples} / {shard.tokens}; it is truncated or replaced: "
                             "re-run `pretrain prepare`")

    def read(self, offset: int, out: np.ndarray, eod: int) -> None:
        """Fill `out` with the shard's stream tokens [offset, offset + len(out)): one read covers every document."""
        end = offset + len(out)
        first = int(np.searchsorted(self.starts, offset, side="right")) - 1
        last = int(np.searchsorted(self.starts, end, side="left"))  # documents first..last-1 overlap
        isz = self.dtype.itemsize
        docs = []
        for i in range(first, last):
            s0, s1 = int(self.starts[i]), int(self.starts[i + 1])
            a, b = max(offset, s0) - s0, min(end, s1) - s0  # this document's part, in its own token offsets
            docs.append((i, min(a, s1 - s0 - 1), min(b, s1 - s0 - 1), b == s1 - s0))
        base = int(self.data[docs[0][0]]) + docs[0][1] * isz
        stop = int(self.data[docs[-1][0]]) + docs[-1][2] * isz
        raw = os.pread(self.fd, stop - base, base) if stop > base else b""
        if len(raw) != stop - base:
            raise ShardError(f"shard '{self.shard.url}' is truncated (a read at byte {base} came back short); "
                             "re-run `pretrain prepare`")
        filled = 0
        for i, a, b, with_eod in docs:
            if b > a:
                at = int(self.data[i]) + a * isz - base
                out[filled:filled + b - a] = np.frombuffer(raw, self.dtype, b - a, at)
                filled += b - a
            if with_eod:
                out[filled] = eod
                filled += 1

    @property
    def fd(self) -> int:
        if self._fd is None:
            try:
                self._fd = os.open(local_path(self.shard.url), os.O_RDONLY)
            except OSError as e:
                raise ShardError(f"cannot open shard '{self.shard.url}': {e}") from None
        return self._fd

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


_ZERO_BLOCK = bytes(512)


def _index_tar(shard: Shard) -> tuple[list[int], list[int], int]:
    """(data offsets, byte sizes, itemsize) of the token members of a local tar, from its headers."""
    offsets, sizes, itemsizes = [], [], set()
    try:
        with open(local_path(shard.url), "rb", buffering=0) as f:
            pos = 0
            while True:
                header = os.pread(f.fileno(), 512, pos)
                if not header or header == _ZERO_BLOCK:
                    break
                name, size, kind = parse_header(header, shard.url, pos)
                if kind in b"xgLK":  # pax or GNU long-name records: let tarfile resolve them
                    return _index_with_tarfile(shard)
                ext = member_ext(name)
                if kind in b"0\0" and ext in DTYPES:
                    offsets.append(pos + 512)
                    sizes.append(size)
                    itemsizes.add(DTYPES[ext].itemsize)
                pos += 512 + -(-size // 512) * 512
    except OSError as e:
        raise ShardError(f"cannot read shard '{shard.url}': {e}") from None
    return offsets, sizes, _one_itemsize(itemsizes, shard)


def parse_header(header: bytes, url: str, pos: int) -> tuple[str, int, bytes]:
    """(name, size, type flag) of one 512-byte tar header; a bad one is a ShardError naming the shard."""
    problem = f"shard '{url}' is corrupt (bad tar header at byte {pos}); re-run `pretrain prepare` or check it " \
              "with `pretrain prepare --verify DIR`"
    if len(header) < 512:
        raise ShardError(problem)
    try:
        checksum = int(header[148:156].split(b"\0", 1)[0].strip() or b"-1", 8)
        field_ = header[124:136]
        size = (int.from_bytes(field_[1:], "big") if field_[0] & 0x80
                else int(field_.split(b"\0", 1)[0].strip() or b"0", 8))
    except ValueError:
        raise ShardError(problem) from None
    if checksum != sum(header[:148]) + 256 + sum(header[156:]):  # the checksum field counts as 8 spaces
        raise ShardError(problem)
    return header[:100].split(b"\0", 1)[0].decode("utf-8", "replace"), size, header[156:157] or b"0"


def _index_with_tarfile(shard: Shard) -> tuple[list[int], list[int], int]:
    offsets, sizes, itemsizes = [], [], set()
    with open_tar(shard.url) as tf:
        for m in _members(tf, shard.url):
            offsets.append(m.offset_data)
            sizes.append(m.size)
            itemsizes.add(DTYPES[member_ext(m.name)].itemsize)
    return offsets, sizes, _one_itemsize(itemsizes, shard)


def _one_itemsize(itemsizes: set[int], shard: Shard) -> int:
    if len(itemsizes) > 1:
        raise ShardError(f"shard '{shard.url}' mixes .u16 and .u32 documents; re-run `pretrain prepare`")
    return itemsizes.pop() if itemsizes else 2


class ShardReader:
    """Sequential reader of one shard's token stream (documents with end-of-document tokens), from any offset: for
    shards that cannot seek (`pipe:`, http). Skipping forward skips whole documents by their tar headers."""

    def __init__(self, shard: Shard, eod: int, start: int = 0):
        self.shard, self.eod, self.pos = shard, eod, 0
        self._tf = open_tar(shard.url)
        self._docs = _members(self._tf, shard.url)
        self._pending = np.empty(0, dtype=np.int64)
        self.skip_to(start)

    def skip_to(self, start: int) -> None:
        k = min(len(self._pending), start - self.pos)
        self._pending, self.pos = self._pending[k:], self.pos + k
        while self.pos < start:
            m = self._next_member()
            n = m.size // DTYPES[member_ext(m.name)].itemsize + 1
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
        dtype = DTYPES[member_ext(m.name)]
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

    def read(self, offset: int, out: np.ndarray, eod: int) -> None:
        """Fill `out` with the next len(out) tokens of the stream, which must start at `offset`."""
        assert offset == self.pos, (offset, self.pos)
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
        source = getattr(self._tf, "source", None)
        if source is not None:  # a pipe closed before its end stops its command by SIGPIPE: not an error here
            with contextlib.suppress(OSError, ValueError):
                source.close()


class EpochReader:
    """Reads token ranges of an epoch stream (shards in epoch order).

    Local shards are read by random access (`LocalShard`; at most MAX_OPEN files open at once). Shards that cannot
    seek are read by a pool of sequential readers: a read continues the reader that stopped at or before its offset,
    or opens the shard again and skips to it, so interleaved sequential streams cost one open reader each.
    """

    MAX_OPEN = 64  # open local files
    POOL = 2 * 8 + 2  # open sequential readers: the "stream" order's interleaved streams, plus boundary crossings

    def __init__(self, shards: list[Shard], eod: int, vocab_size: int):
        self.shards, self.eod, self.vocab_size = shards, eod, vocab_size
        self._starts = np.cumsum([0] + [s.stream_len for s in shards]).tolist()
        self._local: dict[int, LocalShard] = {}  # insertion order = least recently opened first
        self._open: list[int] = []
        self._streams: list[tuple[int, ShardReader]] = []  # (shard index, reader), least recently used first

    @property
    def total(self) -> int:
        return self._starts[-1]

    def read(self, t0: int, t1: int, out: np.ndarray) -> None:
        """Fill out[: t1 - t0] with stream tokens [t0, t1)."""
        self._fill(t0, t1, out)
        self._check_vocab(out[: t1 - t0], t0, max(1, t1 - t0))

    def read_windows(self, windows: np.ndarray, size: int) -> np.ndarray:
        """Windows (stream tokens [g*size, (g+1)*size) for each g) as an int64 array (n, size), read in ascending
        order so that sequential readers only ever move forward."""
        out = np.empty((len(windows), size), dtype=np.int64)
        for row in np.argsort(windows, kind="stable"):
            g = int(windows[row])
            self._fill(g * size, (g + 1) * size, out[row])
        self._check_vocab(out, 0, size, windows)
        return out

    def _fill(self, t0: int, t1: int, out: np.ndarray) -> None:
        filled = 0
        while t0 < t1:
            i = bisect.bisect_right(self._starts, t0) - 1
            k = min(t1, self._starts[i + 1]) - t0
            self._shard(i, t0 - self._starts[i]).read(t0 - self._starts[i], out[filled:filled + k], self.eod)
            filled, t0 = filled + k, t0 + k

    def _shard(self, i: int, offset: int) -> "LocalShard | ShardReader":
        shard = self.shards[i]
        if is_local(shard.url):
            if i not in self._local:
                self._local[i] = LocalShard(shard)
            if i in self._open:
                self._open.remove(i)
            self._open.append(i)
            if len(self._open) > self.MAX_OPEN:
                self._local[self._open.pop(0)].close()
            return self._local[i]
        behind = [(r.pos, n) for n, (j, r) in enumerate(self._streams) if j == i and r.pos <= offset]
        if behind:
            reader = self._streams.pop(max(behind)[1])[1]
            reader.skip_to(offset)
        else:
            reader = ShardReader(shard, self.eod, offset)
        self._streams.append((i, reader))
        if len(self._streams) > self.POOL:
            self._streams.pop(0)[1].close()
        return reader

    def _check_vocab(self, tokens: np.ndarray, t0: int, size: int, windows: np.ndarray | None = None) -> None:
        """Out-of-vocabulary ids mean a corrupt shard or one from another tokenizer: name the shard that holds them."""
        bad = (tokens >= self.vocab_size) | (tokens < 0)
        if not bad.any():
            return
        row, col = divmod(int(np.argmax(bad)), size)
        at = (int(windows[row]) * size if windows is not None else t0 + row * size) + col
        url = self.shards[bisect.bisect_right(self._starts, at) - 1].url
        raise ShardError(f"shard '{url}' holds token ids outside the vocabulary (size {self.vocab_size}); it is "
                         "corrupt or from another tokenizer")

    def close(self) -> None:
        for s in self._local.values():
            s.close()
        self._open.clear()
        for _, r in self._streams:
            r.close()
        self._streams.clear()


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
