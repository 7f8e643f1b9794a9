"""The shard writer every `prepare-*` command uses: samples -> webdataset tar shards -> a manifest, all or nothing.

A prepare for a new modality needs nothing else:

    from framework.data.manifest import header, split_entry
    from framework.data.writer import make_key, output_transaction

    with output_transaction(out, overwrite) as output:          # checks `out`; on any failure removes what it wrote
        # ... read and check every input here: bad input fails before a previous output is touched ...
        output.remove_previous()                                 # --overwrite: the old manifest first, then shards
        writers = {split: output.writer(split, max_bytes=64 << 20) for split in ("train", "val")}
        for i, (split, source, sample) in enumerate(samples):   # sample: {ext: bytes}, e.g. {"smi": b"CCO"}
            writers[split].write(make_key(i, source, 0), sample)
        manifest = {**header("graphs"), "splits": {s: split_entry(w.finish()) for s, w in writers.items()}}
        output.commit(manifest)                                  # manifest.json, written last

Guarantees:
  - each shard is written as NAME.tar.tmp, fsynced, then renamed; `commit` writes manifest.json last (temp + rename),
    so a directory with a manifest always holds exactly the shards it describes;
  - a failure anywhere inside the transaction closes the open shards and removes every file the run created (and
    the output directory when the run created it); an OSError on the output side becomes one line naming the fix;
  - the tar members carry fixed metadata (mtime 0, uid 0, mode 644), so a shard is a pure function of the samples
    written to it, in order: a prepare that feeds its writers in input order (whatever its worker count) gives
    byte-identical shards, and the sha256s in the manifest identify the dataset;
  - `verify(directory)` recomputes every listed file's size and sha256.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import tarfile
from collections.abc import Iterator, Mapping
from pathlib import Path

from framework.data.manifest import MANIFEST, TOKENIZER
from framework.errors import UserError

SHARD_PATTERN = re.compile(r"(train|val)-\d{6}\.tar(\.tmp)?")
MAX_KEY = 95  # "{key}.u16" stays under tar's 100-byte name field (USTAR, no long-name extension records)
UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}

Members = Mapping[str, bytes] | list[tuple[str, bytes]]  # a sample's tar members: extension -> payload, in order


def make_key(index: int, source: str, line: int) -> str:
    """webdataset key: no dots (they start the extension) and no slashes; at most MAX_KEY characters. The index
    keeps keys unique and sorted; the end of the source (file name, line) names the sample."""
    prefix = f"{index:09d}_"
    name = re.sub(r"[^A-Za-z0-9_-]", "_", f"{source}:{line}" if line else source)
    budget = MAX_KEY - len(prefix)
    return prefix + (name[-budget:] if len(name) > budget else name)


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


# ---------------------------------------------------------------------------------------------------- shards

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
    """Writes one split's samples into `{split}-NNNNNN.tar` shards of about `max_bytes` payload bytes each.
    Get one from `ShardOutput.writer`; `finish()` returns the shard records for the manifest (`split_entry`)."""

    def __init__(self, out: Path, split: str, max_bytes: int, written: list[Path]):
        self.out, self.split, self.max_bytes = out, split, max_bytes
        self.written = written  # every path this run creates, for cleanup on failure
        self.shards: list[dict] = []
        self._tar: tarfile.TarFile | None = None  # the open shard, if any
        self._samples = self._tokens = self._payload = 0  # of the open shard

    def write(self, key: str, members: Members, tokens: int = 0, size: int | None = None) -> None:
        """One sample: a member `{key}.{ext}` per (ext, payload), in the order given. `size` counts towards the shard
        size (default: every payload); `tokens` towards the manifest's token count."""
        items = list(members.items()) if isinstance(members, Mapping) else members
        if self._tar is None:
            self._open()
        assert self._tar is not None
        for ext, payload in items:
            info = tarfile.TarInfo(f"{key}.{ext}")
            # fixed metadata: the archive is a pure function of the samples
            info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = \
                len(payload), 0, 0o644, 0, 0, "", ""
            self._tar.addfile(info, io.BytesIO(payload))
        self._samples += 1
        self._tokens += tokens
        self._payload += sum(len(p) for _, p in items) if size is None else size
        if self._payload >= self.max_bytes:
            self._close()

    def finish(self) -> list[dict]:
        """Close the last shard; the shard records {name, samples, tokens, bytes, sha256}, in order."""
        if self._tar is not None:
            self._close()
        return self.shards

    def abort(self) -> None:
        """Close the open shard's file without finishing it (the transaction then deletes it)."""
        if self._tar is not None:
            self._file.close()
            self._tar = None

    def _open(self) -> None:
        self._name = f"{self.split}-{len(self.shards):06d}.tar"
        self._tmp = self.out / (self._name + ".tmp")
        self.written += [self._tmp, self.out / self._name]
        self._file = open(self._tmp, "wb")  # stays open across write() calls
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


# ---------------------------------------------------------------------------------------------------- output dir

class ShardOutput:
    """An output directory inside `output_transaction`: every file written through it is removed again if the
    run fails before `commit`."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.written: list[Path] = []  # every path this run creates, in order
        self._writers: list[ShardWriter] = []

    def writer(self, split: str, max_bytes: int) -> ShardWriter:
        """A writer of `{split}-NNNNNN.tar` shards of about max_bytes payload bytes each."""
        w = ShardWriter(self.directory, split, max_bytes, self.written)
        self._writers.append(w)
        return w

    def write_text(self, name: str, text: str) -> None:
        """`name` in the output directory, atomically (temp + fsync + rename), e.g. tokenizer.json."""
        path = self.directory / name
        tmp = path.with_name(path.name + ".tmp")
        self.written += [tmp, path]
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def remove_previous(self) -> None:
        """--overwrite: the old manifest first, so a kill from here on never leaves a manifest describing missing
        shards; then the old shards and tokenizer. Only our own files: anything else there belongs to the user."""
        out = self.directory
        (out / MANIFEST).unlink(missing_ok=True)
        (out / (MANIFEST + ".tmp")).unlink(missing_ok=True)
        for p in sorted(out.iterdir()):
            if SHARD_PATTERN.fullmatch(p.name) or p.name in (TOKENIZER, TOKENIZER + ".tmp"):
                p.unlink()

    def commit(self, manifest: dict) -> dict:
        """Write manifest.json, last: from here on the directory is a finished dataset. Returns the manifest."""
        self.write_text(MANIFEST, json.dumps(manifest, indent=2) + "\n")
        return manifest

    def _abort(self) -> None:
        for w in self._writers:
            w.abort()


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


def _cleanup(written: list[Path], out: Path, created: bool) -> None:
    for p in reversed(written):
        p.unlink(missing_ok=True)
    if created:
        with contextlib.suppress(OSError):
            out.rmdir()  # only if empty: never remove something we did not write


@contextlib.contextmanager
def output_transaction(out: Path, overwrite: bool) -> Iterator[ShardOutput]:
    """Check `out` is usable (empty, or `overwrite`), then yield the ShardOutput the run writes through: on any
    failure its open shards are closed and every path it created is removed (and `out` itself when this run created
    it); an OSError (disk full, I/O error) becomes one line naming the fix. The run commits with `output.commit`."""
    created = _prepare_output_dir(out, overwrite)
    output = ShardOutput(out)
    try:
        yield output
    except OSError as e:  # reading errors are UserErrors already: this is the output side (disk full, I/O error)
        output._abort()
        _cleanup(output.written, out, created)
        raise UserError(f"writing to '{out}' failed ({e.strerror or e}); free space or choose another --output, "
                        "then run again") from None
    except BaseException:
        output._abort()
        _cleanup(output.written, out, created)
        raise


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
    if "tokenizer" in manifest:  # a modality without a tokenizer has no tokenizer.json to check
        problems += _file_problems(d / TOKENIZER, None, manifest["tokenizer"].get("sha256"))
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
