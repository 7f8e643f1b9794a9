"""`pretrain prepare`: a corpus of text files -> tokenized webdataset tar shards, `tokenizer.json` and `manifest.json`.

    pretrain prepare --input corpus/ --output data/ [--tokenizer bytes|bpe:VOCAB|FILE.json] [--val-fraction 0.01]
                     [--val-input heldout/]
    pretrain prepare --verify data/

Output format (the streaming reader in framework/data/shards.py depends on it):
  train-000000.tar ..., val-000000.tar ...   one member `{key}.u16` (`.u32` for vocabularies over 65536) per document:
                                             its little-endian token ids WITHOUT an end-of-document token
  tokenizer.json                             the HF tokenizer, special tokens included
  manifest.json                              per shard: samples, tokens, bytes, sha256; totals; tokenizer; sources

Everything is a pure function of (sorted inputs, arguments): the same corpus gives byte-identical output for any
--workers, so a manifest's sha256s identify a dataset. Documents go to the validation split by a seeded hash of
their source (file and line), never by position, so adding files does not reshuffle the split of the others.

Crash safety: shards are written as NAME.tar.tmp and renamed; manifest.json is written last (temp + rename), so a
directory with a manifest always holds exactly the shards it describes. --overwrite deletes the old manifest
first, then the old shards. A run that fails on bad input removes everything it wrote.

Decisions worth knowing:
  - Directories are walked sorted, skipping hidden entries (.git, .DS_Store); symlinked directories are not followed.
  - Files under the output directory are never inputs (so re-preparing `--input . --output ./data` is safe).
  - Binary (contains NUL) and non-UTF-8 files are skipped and counted; --strict fails on the first one instead.
  - A .jsonl line that is not JSON, not an object or lacks a string "text" is always an error naming file:line:
    dropping documents silently is data loss. Blank lines are allowed. A corrupt .gz is an error too.
  - Text is tokenized verbatim: no normalisation, BOMs and line endings are kept (the bytes tokenizer round-trips).
  - `bpe:VOCAB` trains on the train split only, so no validation text shapes the tokenizer.
  - Keys keep the END of a long source path (file name and line), since the start is the least specific part.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import gzip
import hashlib
import io
import json
import multiprocessing
import os
import re
import sys
import sysconfig
import tarfile
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from framework import __version__
from framework.data.tokenizer import Tokenizer, build_tokenizer, parse_spec
from framework.errors import UserError

SPLITS = ("train", "val")
SHARD_PATTERN = re.compile(r"(train|val)-\d{6}\.tar(\.tmp)?")
MANIFEST, TOKENIZER = "manifest.json", "tokenizer.json"
STDLIB = "<stdlib>"
# The embedded labelled task (`--task stdlib-packages`): the functions of these standard-library packages, labelled by
# package. The default pre-training corpus leaves them out, so a pre-trained model has never read these texts.
TASK = "stdlib-packages"
HELD_OUT = ("asyncio", "email", "http", "multiprocessing", "unittest", "xml")
MAX_KEY = 95  # "{key}.u16" stays under tar's 100-byte name field (USTAR, no long-name extension records)
BATCH_BYTES = 1 << 20  # text per tokenization task: large enough to amortise IPC, small enough to keep memory flat
BATCH_DOCS = 1000  # ...and documents per task, so a corpus of short lines still spreads over the workers
UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


# ---------------------------------------------------------------------------------------------------- inputs

@dataclass(frozen=True)
class SourceFile:
    path: Path  # where to read it
    source: str  # path relative to its input root (posix): names the document in keys and the split hash
    held_out: bool = False  # from --val-input: every document goes to the validation split


@dataclass(frozen=True)
class Doc:
    source: str
    line: int  # 1-based line of a .jsonl document; 0 for a whole-file document
    text: str
    held_out: bool = False
    label: str | None = None  # labelled corpora (--label-field, --task): the class name


@dataclass
class Stats:
    files: int = 0  # input files read
    documents: int = 0  # non-empty documents written
    skipped_binary: int = 0  # binary or non-UTF-8 files
    skipped_empty: int = 0  # documents with no tokens
    bytes: int = 0  # UTF-8 bytes of the documents read
    tokens: dict[str, int] = field(default_factory=lambda: {s: 0 for s in SPLITS})


def default_corpus(held_out: bool = False) -> list[Path]:
    """The embedded default corpus: the `.py` files of the running Python's standard library, sorted, without the
    packages of the embedded labelled task (HELD_OUT); held_out=True gives those packages' files instead."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(f.path for f in _walk(root, skip={"site-packages", "__pycache__"}) if f.path.suffix == ".py")
    if not held_out:
        return [p for p in files if p.relative_to(root).parts[0] not in HELD_OUT]
    # the task's documents: the packages' own code, not their test suites (unittest ships one inside it)
    return [p for p in files if p.relative_to(root).parts[0] in HELD_OUT
            and not {"test", "tests"} & set(p.relative_to(root).parts[1:])]


def resolve_inputs(inputs: list[str] | None, exclude: Path | None = None, task: bool = False) -> list[SourceFile]:
    """Input files from paths, directories and globs, sorted by path so argument order does not matter (none: the
    default corpus, or with `task` the embedded task's files).

    A file reached twice (overlapping inputs) is read once. Files under `exclude` (the output dir) are left out.
    """
    if not inputs:
        root = Path(sysconfig.get_paths()["stdlib"])
        found = [SourceFile(p, p.relative_to(root).as_posix()) for p in default_corpus(held_out=task)]
    else:
        found = [f for spec in inputs for f in _resolve_one(spec)]
    skip = exclude.resolve() if exclude is not None else None
    unique: dict[Path, SourceFile] = {}
    for f in sorted(found, key=lambda f: (os.path.abspath(f.path), f.source)):
        real = f.path.resolve()  # symlinks and `a/../a` spellings of one file count once
        if real not in unique and not (skip is not None and real.is_relative_to(skip)):
            unique[real] = f
    return list(unique.values())


def _resolve_one(spec: str) -> list[SourceFile]:
    path = Path(spec).expanduser()
    if path.is_dir():
        files = _walk(path)
        if not files:
            raise UserError(f"input directory '{spec}' holds no files (hidden ones are skipped); add text files")
        return files
    if path.is_file():
        return [SourceFile(path, path.name)]
    if glob.has_magic(spec):
        matches = sorted(glob.glob(os.path.expanduser(spec), recursive=True))
        if not matches:
            raise UserError(f"no files match '{spec}'; check the pattern (and quote it so the shell leaves it alone)")
        root = _literal_prefix(Path(spec).expanduser())
        out: list[SourceFile] = []
        for m in map(Path, matches):
            out += _walk(m, root=root) if m.is_dir() else [SourceFile(m, m.relative_to(root).as_posix())]
        return out
    raise UserError(f"input '{spec}' does not exist; check the path (files, directories, globs and .jsonl work)")


def _literal_prefix(pattern: Path) -> Path:
    """The directory part of a glob before its first wildcard: sources are named relative to it."""
    parts = pattern.parts
    first_magic = next(i for i, p in enumerate(parts) if glob.has_magic(p))
    return Path(*parts[:first_magic]) if first_magic else Path(".")


def _walk(top: Path, root: Path | None = None, skip: set[str] = frozenset()) -> list[SourceFile]:
    """Files under `top` in sorted order, without hidden entries and without following symlinked directories."""
    root = top if root is None else root
    out = []
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in skip)
        for name in sorted(n for n in filenames if not n.startswith(".")):
            p = Path(dirpath, name)
            out.append(SourceFile(p, p.relative_to(root).as_posix()))
    return out


# ---------------------------------------------------------------------------------------------------- reading

def iter_documents(files: list[SourceFile], stats: Stats, strict: bool,
                   on_file: Callable[[int], None] | None = None, labels: str | None = None) -> Iterator[Doc]:
    """Documents of the input files in order: one per text file, one per line of a .jsonl (optionally .gz).

    labels: None (unlabelled), a .jsonl field name (a text file's label is then its folder: DIR/<label>/file.txt),
    or TASK (each function of a .py file is a document, labelled by its top-level package).
    """
    for f in files:
        stats.files += 1
        nbytes = 0
        inner = f.path.name[:-3] if f.path.name.endswith(".gz") else f.path.name
        if labels == TASK:
            docs = _function_docs(f, stats)
        elif inner.endswith(".jsonl"):
            docs = _jsonl_docs(f, labels)
        else:
            docs = _file_doc(f, stats, strict, labels is not None)
        for doc in docs:
            nbytes += len(doc.text.encode("utf-8")) if not doc.text.isascii() else len(doc.text)
            yield doc
        stats.bytes += nbytes
        if on_file is not None:
            on_file(nbytes)


def _file_doc(f: SourceFile, stats: Stats, strict: bool, labelled: bool = False) -> Iterator[Doc]:
    label = None
    if labelled:
        if "/" not in f.source:
            raise UserError(f"'{f.path}' is not in a class folder; with --label-field, text files are labelled by "
                            "their folder (INPUT/<label>/file.txt) and .jsonl lines by the field")
        label = f.source.split("/", 1)[0]
    try:
        text = _decode_text(_read_bytes(f.path))
    except ValueError as e:
        if strict:
            raise UserError(f"'{f.path}' is binary or not UTF-8 ({e}); remove it from the inputs, convert it to "
                            "UTF-8, or drop --strict to skip such files") from None
        stats.skipped_binary += 1
        return
    yield Doc(f.source, 0, text, f.held_out, label)


def _function_docs(f: SourceFile, stats: Stats) -> Iterator[Doc]:
    """The embedded task's documents: each function (or method) of a .py file, labelled by its top-level package."""
    import ast
    import textwrap

    try:
        text = _decode_text(_read_bytes(f.path))
        tree = ast.parse(text)
    except (ValueError, SyntaxError):
        stats.skipped_binary += 1
        return
    lines = text.splitlines(keepends=True)
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno is not None:
            start = min([node.lineno] + [d.lineno for d in node.decorator_list])
            body = textwrap.dedent("".join(lines[start - 1:node.end_lineno]))
            yield Doc(f.source, start, body, f.held_out, f.source.split("/", 1)[0])


def _decode_text(data: bytes) -> str:
    """The UTF-8 text of a file, or ValueError saying why it is binary."""
    nul = data.find(b"\0")
    if nul >= 0:  # valid UTF-8 may hold NUL, but text files never do; images, archives and objects nearly always
        raise ValueError(f"NUL byte at offset {nul}")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"invalid UTF-8 at byte {e.start}") from None


def _read_bytes(path: Path) -> bytes:
    try:
        with _open(path) as fh:
            return fh.read()
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise UserError(f"'{path}' is not a valid gzip file ({e}); re-create or remove it") from None
    except OSError as e:
        raise UserError(f"cannot read '{path}' ({e.strerror or e}); check its permissions") from None


def _open(path: Path) -> io.BufferedIOBase:
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")


def _jsonl_docs(f: SourceFile, label_field: str | None = None) -> Iterator[Doc]:
    """Streamed line by line, so a multi-GB .jsonl never sits in memory."""
    lineno = 0
    try:
        with _open(f.path) as fh:
            for lineno, raw in enumerate(fh, start=1):
                if raw.strip():  # blank lines separate nothing and are not documents
                    text, label = _jsonl_text(f.path, lineno, raw, label_field)
                    yield Doc(f.source, lineno, text, f.held_out, label)
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise UserError(f"'{f.path}' is not a valid gzip file ({e}, after line {lineno}); re-create it") from None
    except OSError as e:
        raise UserError(f"cannot read '{f.path}' ({e.strerror or e}); check its permissions") from None


def _jsonl_text(path: Path, lineno: int, raw: bytes, label_field: str | None = None) -> tuple[str, str | None]:
    where = f"{path}:{lineno}"
    try:
        obj = json.loads(raw)
    except UnicodeDecodeError:
        raise UserError(f"{where}: not UTF-8; JSON lines must be UTF-8 text: fix or remove the line") from None
    except ValueError as e:
        raise UserError(f"{where}: invalid JSON ({e}); fix or remove the line") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
        raise UserError(f'{where}: expected an object with a string "text" field; fix or remove the line')
    text = obj["text"]
    try:
        text.encode("utf-8")  # JSON escapes can smuggle in lone surrogates, which no tokenizer can encode
    except UnicodeEncodeError:
        raise UserError(f'{where}: "text" holds a lone surrogate escape (\\ud8xx); fix or remove the line') from None
    if label_field is None:
        return text, None
    label = obj.get(label_field)
    if isinstance(label, bool) or not isinstance(label, (str, int)) or label == "":
        raise UserError(f'{where}: expected a label (a string or an integer) in the "{label_field}" field; fix the '
                        "line or pass the right --label-field")
    return text, str(label)


# ---------------------------------------------------------------------------------------------------- split, keys

def is_val(seed: int, source: str, line: int, val_fraction: float) -> bool:
    """A stable, seeded coin for the validation split: independent of order, workers and the other documents."""
    return _hash(seed, source, line) / 2.0 ** 64 < val_fraction


def _hash(seed: int, source: str, line: int) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed}:{source}:{line}".encode(), digest_size=8).digest(), "big")


def make_key(index: int, source: str, line: int) -> str:
    """webdataset key: no dots (they start the extension) and no slashes; at most MAX_KEY characters."""
    prefix = f"{index:09d}_"
    name = re.sub(r"[^A-Za-z0-9_-]", "_", f"{source}:{line}" if line else source)
    budget = MAX_KEY - len(prefix)
    return prefix + (name[-budget:] if len(name) > budget else name)


@dataclass
class LabelPlan:
    """A labelled corpus's classes and its stratified split, decided by a first pass over the documents."""

    source: str  # the --label-field, or TASK
    names: list[str]  # class index -> name
    val: set[tuple[str, int]]  # (source, line) of the documents drawn for validation
    counts: dict[str, list[int]] = field(default_factory=dict)  # split -> documents per class (filled while writing)

    def index(self, doc: Doc) -> int:
        assert doc.label is not None
        return self.names.index(doc.label)


def plan_labels(files: list[SourceFile], labels: str, seed: int, val_fraction: float, strict: bool,
                progress: bool) -> LabelPlan:
    """Read the labels (not the tokens) of every document: the class names (integers sorted as numbers, otherwise
    as strings) and a stratified validation split: in each class, the round(val_fraction * n) documents with the
    smallest seeded hash of their source, so every class has its share and adding documents moves few others."""
    by_class: dict[str, list[tuple[str, int]]] = {}
    with _file_bar(len(files), "reading labels", progress) as bar:
        for doc in iter_documents(files, Stats(), strict, on_file=lambda _: bar.update(), labels=labels):
            if doc.text and not doc.held_out:
                assert doc.label is not None
                by_class.setdefault(doc.label, []).append((doc.source, doc.line))
    if not by_class:
        raise UserError("the corpus has no labelled documents; point --input at .jsonl files with the --label-field "
                        "or at a folder per class")
    names = sorted(by_class, key=lambda n: (0, int(n), "") if re.fullmatch(r"-?\d+", n) else (1, 0, n))
    val: set[tuple[str, int]] = set()
    for docs in by_class.values():
        docs.sort(key=lambda d: _hash(seed, *d))
        val.update(docs[:round(val_fraction * len(docs))])
    return LabelPlan(labels, names, val)


# ---------------------------------------------------------------------------------------------------- tokenization

_WORKER_TOKENIZER: Tokenizer | None = None


def _init_worker(tokenizer_json: str) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = Tokenizer.from_str(tokenizer_json)


def _encode_in_worker(texts: list[str]) -> list[bytes]:
    assert _WORKER_TOKENIZER is not None
    return _encode(_WORKER_TOKENIZER, texts)


def _encode(tok: Tokenizer, texts: list[str]) -> list[bytes]:
    return [tok.encode_array(t).tobytes() for t in texts]


def _batches(docs: Iterable[Doc]) -> Iterator[list[Doc]]:
    batch: list[Doc] = []
    size = 0
    for doc in docs:
        batch.append(doc)
        size += len(doc.text)
        if size >= BATCH_BYTES or len(batch) >= BATCH_DOCS:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def tokenize(docs: Iterable[Doc], tok: Tokenizer, workers: int) -> Iterator[tuple[Doc, bytes]]:
    """(document, little-endian token bytes) in input order, tokenized by `workers` processes.

    The bytes tokenizer always runs in-process: it is a memory copy, and shipping text to workers and tokens back
    made it slower (stdlib corpus, 2 cores: 96 MB/s in-process, 54 MB/s with 2 workers).
    """
    if workers <= 1 or tok.is_bytes:
        for batch in _batches(docs):
            yield from zip(batch, _encode(tok, [d.text for d in batch]), strict=True)
        return
    # spawn, not fork: a parent that has trained a BPE holds HF's thread pool, which fork does not survive cleanly.
    # ProcessPoolExecutor, not Pool: a worker killed (e.g. by the OOM killer) fails the run instead of hanging it.
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(tok.to_str(),)) as pool:
        # At most 2 batches per worker in flight, so memory stays bounded however large the corpus (Pool.imap's
        # feeder would read ahead without limit). Results are taken in submission order: deterministic.
        pending: deque[tuple[list[Doc], Future]] = deque()
        for batch in _batches(docs):
            pending.append((batch, pool.submit(_encode_in_worker, [d.text for d in batch])))
            if len(pending) >= 2 * workers:
                yield from _results(*pending.popleft())
        while pending:
            yield from _results(*pending.popleft())


def _results(batch: list[Doc], future: Future) -> Iterator[tuple[Doc, bytes]]:
    try:
        return zip(batch, future.result(), strict=True)
    except BrokenProcessPool:
        raise RuntimeError("a tokenizer worker process died: out of memory, or the calling script lacks "
                           "`if __name__ == '__main__':` (needed to start workers); try --workers 1") from None


# ---------------------------------------------------------------------------------------------------- writing

class _HashingFile:
    """Write-through file wrapper that hashes and counts the bytes (tarfile needs only write and tell)."""

    def __init__(self, f: io.BufferedWriter):
        self.f, self.sha, self.size = f, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.f.write(data)
        self.sha.update(data)
        self.size += len(data)
        return len(data)

    def tell(self) -> int:
        return self.size


class ShardWriter:
    """Writes one split's samples into `{split}-NNNNNN.tar` shards of about `max_bytes` payload bytes each (token
    bytes for `add`). `ext` and `itemsize` are those of `add`'s token members; `add_sample` writes any members."""

    def __init__(self, out: Path, split: str, max_bytes: int, ext: str, itemsize: int, written: list[Path]):
        self.out, self.split, self.max_bytes, self.ext, self.itemsize = out, split, max_bytes, ext, itemsize
        self.written = written  # every path this run creates, for cleanup on failure
        self.shards: list[dict] = []
        self._tar: tarfile.TarFile | None = None  # the open shard, if any
        self._samples = self._tokens = self._payload = 0  # of the open shard

    def add(self, key: str, data: bytes, label: int | None = None) -> None:
        """One document: `{key}.u16` (its tokens) and, for a labelled corpus, `{key}.cls` (its class index, ASCII,
        webdataset's convention)."""
        members = [(self.ext, data)] + ([("cls", str(label).encode())] if label is not None else [])
        self.add_sample(key, members, tokens=len(data) // self.itemsize, size=len(data))

    def add_sample(self, key: str, members: list[tuple[str, bytes]], tokens: int = 0, size: int | None = None) -> None:
        """One sample: a member `{key}.{ext}` per (ext, payload), in the order given. `size` counts towards the shard
        size (default: every payload); `tokens` towards the manifest's token count."""
        if self._tar is None:
            self._open()
        assert self._tar is not None
        for ext, payload in members:
            info = tarfile.TarInfo(f"{key}.{ext}")
            # fixed metadata: the archive is a pure function of the samples
            info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = \
                len(payload), 0, 0o644, 0, 0, "", ""
            self._tar.addfile(info, io.BytesIO(payload))
        self._samples += 1
        self._tokens += tokens
        self._payload += sum(len(p) for _, p in members) if size is None else size
        if self._payload >= self.max_bytes:
            self._close()

    def finish(self) -> list[dict]:
        if self._tar is not None:
            self._close()
        return self.shards

    def _open(self) -> None:
        self._name = f"{self.split}-{len(self.shards):06d}.tar"
        self._tmp = self.out / (self._name + ".tmp")
        self.written += [self._tmp, self.out / self._name]
        self._file = open(self._tmp, "wb")  # stays open across add() calls
        self._hashing = _HashingFile(self._file)
        self._tar = tarfile.open(fileobj=self._hashing, mode="w", format=tarfile.USTAR_FORMAT)
        self._samples = self._tokens = self._payload = 0

    def _close(self) -> None:
        assert self._tar is not None
        self._tar.close()  # writes the end-of-archive blocks; leaves our file open
        self._file.flush()
        os.fsync(self._file.fileno())  # the rename below must not land before the data does
        self._file.close()
        os.replace(self._tmp, self.out / self._name)
        self.shards.append({"name": self._name, "samples": self._samples, "tokens": self._tokens,
                            "bytes": self._hashing.size, "sha256": self._hashing.sha.hexdigest()})
        self._tar = None

    def abort(self) -> None:
        if self._tar is not None:
            self._file.close()
            self._tar = None


def _atomic_write(path: Path, text: str, written: list[Path]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    written += [tmp, path]
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------- output dir

def _prepare_output_dir(out: Path, overwrite: bool) -> bool:
    """Check the output dir is usable before any work; returns True when this run created it."""
    if out.exists() and not out.is_dir():
        raise UserError(f"output '{out}' exists and is not a directory; choose another --output")
    created = False
    if out.is_dir():
        if any(out.iterdir()) and not overwrite:
            raise UserError(f"output directory '{out}' is not empty; pass --overwrite to replace a previous "
                            "prepare there, or choose an empty --output")
    else:
        try:
            out.mkdir(parents=True)
            created = True
        except OSError as e:
            raise UserError(f"cannot create output directory '{out}' ({e.strerror or e}); choose a writable "
                            "--output") from None
    probe = out / ".prepare-write-test"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(f"output directory '{out}' is not writable ({e.strerror or e}); fix its permissions or "
                        "choose another --output") from None
    return created


def _remove_previous(out: Path) -> None:
    """--overwrite: manifest first, so a kill from here on never leaves a manifest describing missing shards."""
    (out / MANIFEST).unlink(missing_ok=True)
    (out / (MANIFEST + ".tmp")).unlink(missing_ok=True)
    for p in sorted(out.iterdir()):
        if SHARD_PATTERN.fullmatch(p.name) or p.name in (TOKENIZER, TOKENIZER + ".tmp"):
            p.unlink()  # only our own files: anything else in the directory belongs to the user


def _cleanup(written: list[Path], out: Path, created: bool) -> None:
    for p in reversed(written):
        p.unlink(missing_ok=True)
    if created:
        with contextlib.suppress(OSError):
            out.rmdir()  # only if empty: never remove something we did not write


@contextlib.contextmanager
def output_transaction(out: Path, overwrite: bool) -> Iterator[list[Path]]:
    """Check `out` is usable, then yield the list in which the run records every path it creates: on any failure
    they are all removed again (and `out` itself when this run created it); an OSError (disk full, I/O error) becomes
    one line naming the fix. The run commits by writing its manifest last."""
    created = _prepare_output_dir(out, overwrite)
    written: list[Path] = []
    try:
        yield written
    except OSError as e:  # reading errors are UserErrors already: this is the output side (disk full, I/O error)
        _cleanup(written, out, created)
        raise UserError(f"writing to '{out}' failed ({e.strerror or e}); free space or choose another --output, "
                        "then run again") from None
    except BaseException:
        _cleanup(written, out, created)
        raise


# ---------------------------------------------------------------------------------------------------- prepare

def parse_size(size: str | int) -> int:
    """`64MB`, `1GB`, `500KB`, `1.5G`, `4096` -> bytes (K/M/G/T are powers of 1024)."""
    if isinstance(size, int) and not isinstance(size, bool):
        n = size
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", str(size), re.IGNORECASE)
        if not m:
            raise UserError(f"bad --shard-size '{size}'; use bytes or a size like 500KB, 64MB, 1GB")
        n = int(float(m.group(1)) * UNITS[m.group(2).upper()])
    if n < 1:
        raise UserError(f"bad --shard-size '{size}': it must be at least 1 byte; use e.g. 64MB")
    return n


def _check_args(val_fraction: float, workers: int) -> None:
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"bad --val-fraction {val_fraction}: it must be in [0, 1), e.g. 0.01")
    if workers < 1:
        raise UserError(f"bad --workers {workers}: it must be at least 1")


def _file_bar(total: int, desc: str, progress: bool) -> tqdm:
    # disable=None lets tqdm switch itself off when stderr is not a terminal (logs stay clean)
    return tqdm(total=total, desc=desc, unit="file", file=sys.stderr, disable=None if progress else True,
                dynamic_ncols=True)


def _make_tokenizer(spec: str, files: list[SourceFile], seed: int, val_fraction: float, strict: bool,
                    progress: bool) -> tuple[Tokenizer, str]:
    if parse_spec(spec)[0] != "bpe":
        return build_tokenizer(spec)
    with _file_bar(len(files), "reading for bpe", progress) as bar:
        docs = iter_documents(files, Stats(), strict, on_file=lambda _: bar.update())
        train_texts = (d.text for d in docs if not is_val(seed, d.source, d.line, val_fraction))
        return build_tokenizer(spec, train_texts, progress)


def _write_shards(files: list[SourceFile], tok: Tokenizer, out: Path, seed: int, val_fraction: float,
                  shard_size: int, workers: int, strict: bool, progress: bool,
                  written: list[Path], plan: LabelPlan | None = None) -> tuple[Stats, dict[str, list[dict]]]:
    ext = "u16" if tok.dtype.itemsize == 2 else "u32"
    writers = {s: ShardWriter(out, s, shard_size, ext, tok.dtype.itemsize, written) for s in SPLITS}
    stats = Stats()
    start = time.perf_counter()
    with _file_bar(len(files), "tokenizing", progress) as bar:
        def on_file(_: int) -> None:
            rate = sum(stats.tokens.values()) / max(time.perf_counter() - start, 1e-9)
            bar.set_postfix_str(f"{stats.bytes / 1e6:.1f} MB, {rate / 1e6:.2f}M tok/s", refresh=False)
            bar.update()

        try:
            docs = iter_documents(files, stats, strict, on_file, labels=plan.source if plan else None)
            if plan is not None:
                plan.counts = {s: [0] * len(plan.names) for s in SPLITS}
            # closing(): on an error, shut the worker processes down now, not when the traceback is collected
            with contextlib.closing(tokenize(docs, tok, workers)) as tokenized:
                for doc, data in tokenized:
                    if not data:
                        stats.skipped_empty += 1
                        continue
                    if plan is None:
                        val = is_val(seed, doc.source, doc.line, val_fraction)
                    else:
                        val = (doc.source, doc.line) in plan.val
                    split = "val" if doc.held_out or val else "train"
                    label = None
                    if plan is not None:
                        if doc.label not in plan.names:
                            raise UserError(f"{doc.source}: class '{doc.label}' has no training documents (it "
                                            "occurs only in --val-input); add training documents of that class")
                        label = plan.index(doc)
                        plan.counts[split][label] += 1
                    writers[split].add(make_key(stats.documents, doc.source, doc.line), data, label)
                    stats.documents += 1
                    stats.tokens[split] += len(data) // tok.dtype.itemsize
        except BaseException:
            for w in writers.values():
                w.abort()  # close the open .tmp files; prepare() then deletes them
            raise
    return stats, {s: w.finish() for s, w in writers.items()}


def _check_result(stats: Stats, splits: dict[str, list[dict]]) -> None:
    read = f"{stats.files} files read, {stats.skipped_binary} binary/non-UTF-8 skipped, {stats.skipped_empty} empty"
    if stats.documents == 0:
        raise UserError(f"the corpus has no non-empty documents ({read}); point --input at UTF-8 text files")
    if not splits["train"]:
        raise UserError(f"all {stats.documents} documents fell into the validation split; lower --val-fraction "
                        "or add documents")


def _split_entry(shards: list[dict]) -> dict:
    return {"shards": shards, "samples": sum(s["samples"] for s in shards), "tokens": sum(s["tokens"] for s in shards)}


def build_manifest(tok: Tokenizer, spec: str, tokenizer_text: str, inputs: list[str] | None, stats: Stats,
                   splits: dict[str, list[dict]], seed: int, val_fraction: float, shard_size: int,
                   strict: bool, val_inputs: list[str] | None = None, plan: LabelPlan | None = None) -> dict:
    """The manifest: no timestamps or absolute output paths, so reruns are byte-identical."""
    manifest = {
        "format": "framework-shards",
        "version": 1,
        "dtype": tok.dtype.name,
        "tokenizer": {
            "spec": spec,
            "vocab_size": tok.vocab_size,
            "special_tokens": tok.special_ids,
            "sha256": hashlib.sha256(tokenizer_text.encode("utf-8")).hexdigest(),
        },
        "splits": {s: _split_entry(splits[s]) for s in SPLITS},
        "sources": {
            "inputs": list(inputs) if inputs else [STDLIB],
            "files": stats.files,
            "documents": stats.documents,
            "skipped_binary": stats.skipped_binary,
            "skipped_empty": stats.skipped_empty,
            "bytes": stats.bytes,
        },
        "args": {"seed": seed, "val_fraction": val_fraction, "shard_size": shard_size, "strict": strict},
        "created_by": f"framework {__version__}",
    }
    if val_inputs:  # only then, so that the manifests of earlier runs stay byte-identical
        manifest["sources"]["val_inputs"] = list(val_inputs)
    if plan is not None:
        if not inputs:
            manifest["sources"]["inputs"] = [f"<{TASK}>"]
        manifest["labels"] = {"source": plan.source, "names": plan.names, "counts": plan.counts}
    return manifest


def _held_out(val_inputs: list[str], train: list[SourceFile], out: Path) -> list[SourceFile]:
    """The --val-input files; one that is also a train input would leak validation text into training."""
    val = resolve_inputs(val_inputs, exclude=out)
    if not val:
        raise UserError(f"--val-input {' '.join(val_inputs)} holds no files; point it at text files")
    train_paths = {f.path.resolve() for f in train}
    both = [f.path for f in val if f.path.resolve() in train_paths]
    if both:
        raise UserError(f"'{both[0]}' is both an --input and a --val-input ({len(both)} such files); validation "
                        "text must not be trained on: keep the two apart")
    return [dataclasses.replace(f, held_out=True) for f in val]


def prepare(inputs: list[str] | None, output: str | Path, tokenizer: str = "bytes", val_fraction: float | None = None,
            seed: int = 0, shard_size: int | str = 64 << 20, workers: int = 1, overwrite: bool = False,
            strict: bool = False, progress: bool = True, val_inputs: list[str] | None = None,
            labels: str | None = None) -> dict:
    """Tokenize `inputs` (None: the stdlib corpus) into shards under `output`; returns the manifest.

    `labels`: a .jsonl field holding each document's class (text files: their folder), or TASK for the embedded
    labelled task (inputs None: the functions of the HELD_OUT packages). Labelled shards carry a `.cls` member per
    document, the split is stratified, and the manifest lists the classes and their counts.

    `val_inputs` (files, directories, globs, .jsonl, as `inputs`) all go to the validation split, tokenized with the
    same tokenizer (a trained BPE never sees them); `val_fraction` then defaults to 0 instead of 0.01.

    Raises UserError on bad input, after removing whatever this run wrote. `workers` > 1 starts processes with
    spawn (safe after HF's threads have run), so a script calling this must guard its entry point with
    `if __name__ == "__main__":`.
    """
    started = time.perf_counter()
    out = Path(output).expanduser()
    shard_size = parse_size(shard_size)
    val_fraction = (0.0 if val_inputs else 0.01) if val_fraction is None else val_fraction
    _check_args(val_fraction, workers)
    parse_spec(tokenizer)  # a bad spec fails now, not after reading the corpus
    if labels == TASK and inputs:
        raise UserError(f"--task {TASK} builds its documents from the standard library; drop --input")
    files = resolve_inputs(inputs, exclude=out, task=labels == TASK)
    if not files:
        raise UserError("no input files found; pass --input PATH (files, directories, globs, .jsonl)")
    val_files = _held_out(val_inputs, files, out) if val_inputs else []
    with output_transaction(out, overwrite) as written:
        # before touching a previous output: a BPE pass that meets bad input leaves the old dataset intact
        tok, spec = _make_tokenizer(tokenizer, files, seed, val_fraction, strict, progress)
        plan = plan_labels(files + val_files, labels, seed, val_fraction, strict, progress) if labels else None
        if overwrite:
            _remove_previous(out)
        tokenizer_text = tok.to_str()
        _atomic_write(out / TOKENIZER, tokenizer_text, written)
        stats, splits = _write_shards(files + val_files, tok, out, seed, val_fraction, shard_size, workers, strict,
                                      progress, written, plan)
        _check_result(stats, splits)
        manifest = build_manifest(tok, spec, tokenizer_text, inputs, stats, splits, seed, val_fraction, shard_size,
                                  strict, val_inputs, plan)
        _atomic_write(out / MANIFEST, json.dumps(manifest, indent=2) + "\n", written)  # last: commits the run
    if progress:
        print(summary(manifest, out, time.perf_counter() - started), file=sys.stderr)
    return manifest


def summary(manifest: dict, out: Path, seconds: float) -> str:
    src, tr, va = manifest["sources"], manifest["splits"]["train"], manifest["splits"]["val"]
    tokens = tr["tokens"] + va["tokens"]
    tk = manifest["tokenizer"]
    return "\n".join([
        f"prepared {src['files']:,} files -> {out}",
        f"  documents  train {tr['samples']:,}  val {va['samples']:,}   "
        f"(skipped: {src['skipped_binary']:,} binary/non-UTF-8, {src['skipped_empty']:,} empty)",
        f"  tokens     train {tr['tokens']:,}  val {va['tokens']:,}   "
        f"tokenizer {tk['spec']} (vocab {tk['vocab_size']:,}, {manifest['dtype']})",
        f"  shards     train {len(tr['shards'])}  val {len(va['shards'])}   "
        f"(up to {manifest['args']['shard_size'] / 2**20:g} MiB of tokens each)",
        f"  speed      {src['bytes'] / 1e6:.1f} MB in {seconds:.1f} s: {src['bytes'] / 1e6 / seconds:.1f} MB/s, "
        f"{tokens / seconds / 1e6:.2f}M tokens/s",
    ] + ([f"  classes    {len(manifest['labels']['names'])}: " + ", ".join(
        f"{n} ({t}/{v})" for n, t, v in zip(manifest["labels"]["names"], *manifest["labels"]["counts"].values()))
        + "   (train/val documents)"] if "labels" in manifest else []))


# ---------------------------------------------------------------------------------------------------- verify

def verify(directory: str | Path) -> list[str]:
    """Recompute size and sha256 of every file the manifest lists; returns the problems (empty: all good)."""
    d = Path(directory)
    try:
        manifest = json.loads((d / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"no {MANIFEST} in '{d}': not a finished `pretrain prepare` output; run prepare again "
                        "with --overwrite") from None
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read '{d / MANIFEST}' ({e}); run `pretrain prepare --overwrite` again") from None
    problems = []
    for split in manifest.get("splits", {}).values():
        for shard in split.get("shards", []):
            problems += _file_problems(d / shard["name"], shard.get("bytes"), shard["sha256"])
    problems += _file_problems(d / TOKENIZER, None, manifest.get("tokenizer", {}).get("sha256"))
    return problems


def _file_problems(path: Path, size: int | None, sha256: str | None) -> list[str]:
    if not path.is_file():
        return [f"{path.name} is missing"]
    actual = path.stat().st_size
    if size is not None and actual != size:
        return [f"{path.name} has {actual} bytes, the manifest says {size}"]
    if sha256 is not None and _sha256_file(path) != sha256:
        return [f"{path.name} has a different sha256 than the manifest (corrupt or replaced)"]
    return []


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()
