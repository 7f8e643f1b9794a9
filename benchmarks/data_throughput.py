"""Tokens per second delivered by the streaming reader, against webdataset reading the same shards, in one run.

    python benchmarks/data_throughput.py [--shards DIR] [--seq-len 1024] [--batch-size 16] [--prepare]

Without --shards, the embedded corpus (the Python standard library, byte tokenizer) is prepared into a temp dir.
Figures are per rank: each configuration reads one rank's share of an epoch (rank 0 of --world) through a real
DataLoader with 0, 1 and 2 worker processes (index the shards, read each window of the default order by random
access, pack, batch to int64 tensors). Two more rows read the same shards through `pipe:cat`: a stream that cannot
seek, read in the fallback order (interleaved sequential streams + block shuffle).
With --prepare it also runs benchmarks/prepare_throughput.py (MB/s of `pretrain prepare`, bytes and bpe:32000).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from framework.data.datamodule import ShardDataModule


def webdataset_baseline(urls: list[str]) -> float:
    """webdataset alone: open the tars, split samples, np.frombuffer each document. tokens/s."""
    import webdataset as wds

    start, tokens = time.perf_counter(), 0
    for (data,) in wds.WebDataset(urls, shardshuffle=False, empty_check=False).to_tuple("u16"):
        tokens += len(np.frombuffer(data, dtype="<u2"))
    return tokens / (time.perf_counter() - start)


def reader(dm: ShardDataModule, workers: int, world: int, pipe: bool = False) -> tuple[float, int]:
    """The full reader for rank 0 of `world`: tokens/s and tokens delivered. `pipe`: the same shards read through
    `pipe:cat`, which cannot seek, so in the fallback order (interleaved streams + block shuffle)."""
    shards = [replace(s, url=f"pipe:cat {s.url}") for s in dm._train] if pipe else dm._train
    stream = dm._stream(shards, dm.batch_size, shuffle=True, train=True)
    stream.layout = type(stream.layout)(world, max(1, workers), dm.batch_size)
    stream.segment = stream.fresh_segment(0)
    loader = DataLoader(stream, batch_size=None, num_workers=workers, prefetch_factor=4 if workers else None)
    start, tokens = time.perf_counter(), 0
    for batch in loader:
        tokens += batch["tokens"].numel()
    return tokens / (time.perf_counter() - start), tokens


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", help="a `pretrain prepare` output dir (default: prepare the stdlib corpus)")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--prepare", action="store_true", help="also measure `pretrain prepare` throughput")
    args = p.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        path = args.shards
        if path is None:
            from framework.data.prepare import prepare

            path = str(Path(tmp) / "stdlib")
            prepare(None, path, tokenizer="bytes", progress=False)
        dm = ShardDataModule(path=path, seq_len=args.seq_len, batch_size=args.batch_size)
        dm.setup("fit")
        total = sum(s.tokens for s in dm._train)
        print(f"shards: {path}  ({len(dm._train)} train shards, {total / 1e6:.1f}M tokens, "
              f"seq_len {args.seq_len}, batch {args.batch_size})")
        base = webdataset_baseline([s.url for s in dm._train])
        print(f"{'webdataset alone (decode only, whole split)':<52} {base / 1e6:8.2f}M tokens/s   1.00x")
        for world in (1, 2):
            for workers in (0, 1, 2):
                rate, n = reader(dm, workers, world)
                label = f"reader, rank 0 of {world}, {workers} worker(s)"
                print(f"{label:<52} {rate / 1e6:8.2f}M tokens/s   {rate / base:4.2f}x   ({n / 1e6:.1f}M tokens)")
        for workers in (0, 2):
            rate, n = reader(dm, workers, 1, pipe=True)
            label = f"reader, pipe:cat shards (fallback), {workers} worker(s)"
            print(f"{label:<52} {rate / 1e6:8.2f}M tokens/s   {rate / base:4.2f}x   ({n / 1e6:.1f}M tokens)")
        if args.prepare:
            import prepare_throughput

            prepare_throughput.main()


if __name__ == "__main__":
    main()
