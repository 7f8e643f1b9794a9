"""What a text prepare reads: input discovery, the embedded default corpus, documents, labels and the split.

- `resolve_inputs`: files, directories and globs -> sorted `SourceFile`s (none: the Python standard library, the
  embedded default corpus; `default_corpus`), without the output directory's files;
- `iter_documents`: the documents of those files in order (one per text file, one per .jsonl line, or one per
  function for the embedded labelled task `TASK`), with the binary/non-UTF-8 files skipped and counted in `Stats`;
- `is_val` / `seeded_hash`: the validation split, a seeded hash of each document's source (never its position);
- `plan_labels`: a labelled corpus's classes and its stratified split, from a first pass over the labels.

Decisions worth knowing are listed in framework.data.prepare's docstring.
"""

from __future__ import annotations

import dataclasses
import glob
import gzip
import hashlib
import io
import json
import os
import re
import sys
import sysconfig
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from framework.data.manifest import SPLITS
from framework.errors import UserError

STDLIB = "<stdlib>"
# The embedded labelled task (`--task stdlib-packages`): the functions of these standard-library packages, labelled by
# package. The default pre-training corpus leaves them out, so a pre-trained model has never read these texts.
TASK = "stdlib-packages"
HELD_OUT = ("asyncio", "email", "http", "multiprocessing", "unittest", "xml")


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
    files = sorted(f.path for f in walk(root, skip={"site-packages", "__pycache__"}) if f.path.suffix == ".py")
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
        files = walk(path)
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
            out += walk(m, root=root) if m.is_dir() else [SourceFile(m, m.relative_to(root).as_posix())]
        return out
    raise UserError(f"input '{spec}' does not exist; check the path (files, directories, globs and .jsonl work)")


def _literal_prefix(pattern: Path) -> Path:
    """The directory part of a glob before its first wildcard: sources are named relative to it."""
    parts = pattern.parts
    first_magic = next(i for i, p in enumerate(parts) if glob.has_magic(p))
    return Path(*parts[:first_magic]) if first_magic else Path(".")


def walk(top: Path, root: Path | None = None, skip: set[str] = frozenset()) -> list[SourceFile]:
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


# ---------------------------------------------------------------------------------------------------- split, labels

def is_val(seed: int, source: str, line: int, val_fraction: float) -> bool:
    """A stable, seeded coin for the validation split: independent of order, workers and the other documents."""
    return seeded_hash(seed, source, line) / 2.0 ** 64 < val_fraction


def seeded_hash(seed: int, source: str, line: int) -> int:
    """A seeded 64-bit hash of a sample's source: the split's coin, and the order of a stratified draw."""
    return int.from_bytes(hashlib.blake2b(f"{seed}:{source}:{line}".encode(), digest_size=8).digest(), "big")


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
    with file_bar(len(files), "reading labels", progress) as bar:
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
        docs.sort(key=lambda d: seeded_hash(seed, *d))
        val.update(docs[:round(val_fraction * len(docs))])
    return LabelPlan(labels, names, val)


def file_bar(total: int, desc: str, progress: bool) -> tqdm:
    """A progress bar on stderr (`progress` False: none), for any prepare's passes over its inputs."""
    # disable=None lets tqdm switch itself off when stderr is not a terminal (logs stay clean)
    return tqdm(total=total, desc=desc, unit="file", file=sys.stderr, disable=None if progress else True,
                dynamic_ncols=True)


def held_out_files(val_inputs: list[str], train: list[SourceFile], out: Path) -> list[SourceFile]:
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

