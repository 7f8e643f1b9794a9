"""How well the reader's default train order mixes the corpus, against an ideal uniform shuffle of the same windows.

    python benchmarks/data_order.py [--shards DIR] [--seq-len 256] [--batch-size 16] [--steps 600]

Without --shards, the embedded corpus (the Python standard library, byte tokenizer) is prepared into a temp dir: the
README demo's data and settings (seq_len 256, batch 16, 600 steps). For rank 0 of 1 it prints, over the first --steps
batches of epoch 0:
- gap: mean distance in the corpus between a window of one batch and a window of the next, as a fraction of the
  corpus (corpus order = shards by name, documents as written; uniform sampling gives 1/3);
- docs/100: distinct documents (the one holding each window's first token) in 100 consecutive batches, averaged;
- span: the share of the corpus between the lowest and the highest position those batches reach;
- tenths: how many tenths of the corpus they draw from.
Rows: an ideal uniform shuffle (a random permutation of the epoch's windows), the default order for local shards,
and the fallback order for shards that cannot seek (the same shards read through `pipe:cat`).
"""

from __future__ import annotations

import argparse
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

from framework.data.cursor import shard_order
from framework.data.datamodule import ShardDataModule
from framework.data.stream import TokenStream


def doc_starts(shards) -> list[np.ndarray]:
    """Stream offset of every document of each shard (documents plus their end-of-document token), from the tars."""
    out = []
    for s in shards:
        with tarfile.open(s.url) as tf:
            lengths = [m.size // (2 if m.name.endswith(".u16") else 4) + 1 for m in tf if m.isfile()]
        out.append(np.concatenate([[0], np.cumsum(lengths)]))
    return out


def corpus_positions(ids: np.ndarray, shards, starts, window: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(corpus token offset, global document number) of the first token of each window id of epoch 0."""
    order = shard_order(seed, 0, len(shards), True)
    lens = np.array([s.stream_len for s in shards])
    epoch_starts = np.concatenate([[0], np.cumsum(lens[order])])
    corpus_starts = np.concatenate([[0], np.cumsum(lens)])
    doc_base = np.concatenate([[0], np.cumsum([len(d) - 1 for d in starts])])
    t = ids * window
    k = np.searchsorted(epoch_starts, t, side="right") - 1  # place in the epoch's shard order
    shard = order[k]
    within = t - epoch_starts[k]
    docs = np.array([doc_base[s] + np.searchsorted(starts[s], w, side="right") - 1 for s, w in zip(shard, within)])
    return corpus_starts[shard] + within, docs


def stats(batches: list[np.ndarray], shards, starts, window: int, seed: int, total: int) -> dict:
    pos, docs = zip(*(corpus_positions(b, shards, starts, window, seed) for b in batches))
    gap = np.mean([np.abs(a[:, None] - b[None, :]).mean() for a, b in zip(pos, pos[1:])]) / total
    per100 = [len(set(np.concatenate(docs[i:i + 100]).tolist())) for i in range(0, len(docs) - 99, 100)]
    every = np.concatenate(pos)
    return {"gap": gap, "docs/100": np.mean(per100), "span": (every.max() - every.min()) / total,
            "tenths": len(set((every * 10 // total).tolist()))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", help="a `pretrain prepare` output dir (default: prepare the stdlib corpus)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--seed", type=int, default=1234)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = args.shards
        if path is None:
            from framework.data.prepare import prepare

            path = str(Path(tmp) / "stdlib")
            prepare(None, path, tokenizer="bytes", progress=False)
        dm = ShardDataModule(path=path, seq_len=args.seq_len, batch_size=args.batch_size, seed=args.seed)
        dm.setup("fit")
        shards, window, B = dm._train, args.seq_len + 1, args.batch_size
        starts = doc_starts(shards)
        total = sum(s.stream_len for s in shards)

        def stream_ids(shard_list) -> list[np.ndarray]:
            stream = TokenStream(shard_list, seq_len=args.seq_len, batch_size=B, eod=dm.special_ids["eod"],
                                 vocab_size=dm.vocab_size, seed=args.seed)
            out = []
            for batch in stream:
                out.append(batch["sample_ids"].numpy())
                if len(out) == args.steps:
                    break
            return out

        n = sum(s.stream_len for s in shards) // window
        uniform = np.random.default_rng(0).permutation(n)[: args.steps * B].reshape(-1, B)
        rows = [("ideal uniform shuffle", list(uniform))]
        t0 = time.perf_counter()
        rows.append(("default order, local shards", stream_ids(shards)))
        if hasattr(TokenStream, "order"):  # readers that tell seekable shards from streams
            piped = [type(s)(f"pipe:cat {s.url}", s.name, s.samples, s.tokens, s.bytes) for s in shards]
            rows.append(("fallback order, pipe:cat shards", stream_ids(piped)))
        print(f"shards: {path}  ({len(shards)} train shards, {total / 1e6:.1f}M tokens, {n} windows of {window}, "
              f"batch {B}, first {args.steps} batches; read in {time.perf_counter() - t0:.1f} s)")
        print(f"{'order':<34} {'gap':>6} {'docs/100':>9} {'span':>6} {'tenths':>7}")
        for label, batches in rows:
            s = stats(batches, shards, starts, window, args.seed, total)
            print(f"{label:<34} {s['gap']:6.3f} {s['docs/100']:9.0f} {s['span']:6.1%} {s['tenths']:7d}")


if __name__ == "__main__":
    main()
