"""Writes tiny token shards in the `pretrain prepare` format, with token ids that name their own position.

Every document token gets a distinct id (a running counter), so a delivered window says exactly which corpus tokens it
holds, and lost or repeated tokens show up directly.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np

VOCAB = 1 << 20
EOD = VOCAB - 5
SPECIALS = {"eod": EOD, "pad": VOCAB - 4, "mask": VOCAB - 3, "cls": VOCAB - 2, "sep": VOCAB - 1}


def write_shards(out: Path, docs_per_shard: list[list[int]], split: str = "train",
                 manifest: dict | None = None, start_id: int = 0) -> dict:
    """Write `split-NNNNNN.tar` shards; docs_per_shard[i] lists the document lengths of shard i. Returns the manifest."""
    out.mkdir(parents=True, exist_ok=True)
    manifest = manifest or {"format": "framework-shards", "version": 1, "dtype": "uint32",
                            "tokenizer": {"spec": "test", "vocab_size": VOCAB, "special_tokens": SPECIALS},
                            "splits": {}}
    entries, next_id = [], start_id
    for i, lengths in enumerate(docs_per_shard):
        name = f"{split}-{i:06d}.tar"
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
            for k, n in enumerate(lengths):
                data = np.arange(next_id, next_id + n, dtype="<u4").tobytes()
                next_id += n
                info = tarfile.TarInfo(f"{i:04d}{k:05d}_doc.u32")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
        raw = buf.getvalue()
        (out / name).write_bytes(raw)
        entries.append({"name": name, "samples": len(lengths), "tokens": int(sum(lengths)), "bytes": len(raw),
                        "sha256": hashlib.sha256(raw).hexdigest()})
    manifest["splits"][split] = {"shards": entries, "samples": sum(e["samples"] for e in entries),
                                 "tokens": sum(e["tokens"] for e in entries)}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def random_lengths(rng: np.random.Generator, shards: int, docs: tuple[int, int], length: tuple[int, int]) -> list:
    return [list(rng.integers(*length, size=int(rng.integers(*docs)))) for _ in range(shards)]


def epoch_stream(docs_per_shard: list[list[int]], order, start_id: int = 0) -> np.ndarray:
    """The token stream of an epoch whose shards are read in `order`: documents with EOD after each."""
    starts = np.cumsum([start_id] + [sum(s) for s in docs_per_shard])
    parts = []
    for i in order:
        nxt = starts[i]
        for n in docs_per_shard[i]:
            parts.append(np.arange(nxt, nxt + n))
            parts.append(np.array([EOD]))
            nxt += n
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
