"""Images per second of the image pipeline, per DataLoader worker (everything runs in this one process).

    python benchmarks/image_throughput.py [--images 300] [--size 224]

- decode + augment (ImageTransform, train and val) at --size px, from JPEGs of about 256 px (256 x 192..320, photo-like
  noise on the synthetic shapes, quality 90) that it writes into a temp dir first;
- the same at the smoke size: 64 px PNGs of the synthetic set, to 64 px;
- the whole reader at the smoke size: ImageStream batches of 64 (pread from the shards, decode, augment, collate)
  over a `prepare_images --synthetic` output;
- the synthetic generator alone, and `prepare_images --synthetic` (generate + PNG + write shards);
- for reference, one rank's ImageDataModule through a real DataLoader with 0, 1 and 2 workers at --size px (the
  JPEGs prepared as a two-class folder): what a training step sees, float32 batches moved between processes included.
A rank with K DataLoader workers delivers up to K times the per-worker figure while it has K free cores.
"""

from __future__ import annotations

import argparse
import io
import json
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from framework.data.images import ImageDataModule, ImageIndex, ImageStream, ImageTransform
from framework.data.prepare_images import encode, prepare_images, synthetic_sample
from framework.data.shards import manifest_shards


def rate(n: int, fn: Callable[[int], object], repeat: int = 2) -> float:
    """Best of `repeat` passes of fn(0..n-1): items per second."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        for i in range(n):
            fn(i)
        best = min(best, time.perf_counter() - start)
    return n / best


def photo_jpegs(n: int) -> list[bytes]:
    """JPEGs of about 256 px with photo-like noise (a flat synthetic image compresses far better than a photo)."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        image, _, _ = synthetic_sample(i, seed=0, size=256)
        height = int(rng.integers(192, 321))
        pixels = np.asarray(image.resize((256, height)), np.float32) + rng.normal(0, 10, (height, 256, 3))
        buf = io.BytesIO()
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def transforms(images: list[bytes], size: int) -> dict[str, float]:
    rngs = [np.random.default_rng([0, i]) for i in range(len(images))]
    out = {}
    for name, train in (("train", True), ("val", False)):
        t = ImageTransform(size, train)
        out[name] = rate(len(images), lambda i, t=t: t(images[i], rngs[i]))
    return out


def loader_rate(path: Path, size: int, workers: int) -> float:
    """Images/s of one epoch of rank 0's train loader (the first batch, worker start-up included, is not timed)."""
    dm = ImageDataModule(path=str(path), image_size=size, batch_size=32, num_workers=workers)
    it = iter(dm.train_dataloader())
    next(it)
    start, n = time.perf_counter(), 0
    for batch in it:
        n += int(batch["valid"].sum())
    return n / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=300, help="images per measurement")
    p.add_argument("--size", type=int, default=224, help="the large image size")
    args = p.parse_args()
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        jpegs = photo_jpegs(args.images)
        for j, data in enumerate(jpegs):  # they live on disk like a real dataset's files
            (Path(tmp) / f"{j}.jpg").write_bytes(data)
        jpegs = [(Path(tmp) / f"{j}.jpg").read_bytes() for j in range(args.images)]
        kb = sum(map(len, jpegs)) / len(jpegs) / 1024
        big = transforms(jpegs, args.size)
        rows += [(f"decode + train augment (RRC + flip), ~256 px JPEG ({kb:.0f} KB) -> {args.size}", big["train"]),
                 (f"decode + val (resize {round(args.size / 0.875)} + centre crop), ~256 px JPEG -> {args.size}",
                  big["val"])]
        pngs = [encode(synthetic_sample(i, seed=0, size=64)[0], "png") for i in range(args.images)]
        small = transforms(pngs, 64)
        rows += [("decode + train augment, 64 px PNG -> 64", small["train"]),
                 ("decode + val (kept at 64 + centre crop), 64 px PNG -> 64", small["val"])]

        out = Path(tmp) / "shapes"
        n = 4 * args.images
        start = time.perf_counter()
        m = prepare_images(None, out, synthetic=n, image_size=64, progress=False)
        prepare_rate = n / (time.perf_counter() - start)
        index = ImageIndex(manifest_shards(m, "train", str(out)))
        stream = ImageStream(index, np.arange(len(index)), transform=ImageTransform(64, True), batch_size=64)
        start, delivered = time.perf_counter(), 0
        for batch in stream:
            delivered += int(batch["valid"].sum())
        rows.append(("ImageStream, 64 px: pread + decode + augment + batch of 64 (one worker's share)",
                     delivered / (time.perf_counter() - start)))
        rows.append(("synthetic generator, 64 px (draw only)", rate(args.images, lambda i: synthetic_sample(i, 0, 64))))
        rows.append((f"synthetic generator, {args.size} px (draw only)",
                     rate(args.images // 3, lambda i: synthetic_sample(i, 0, args.size))))
        rows.append(("`prepare_images --synthetic`, 64 px (draw + PNG + shards + manifest)", prepare_rate))
        summary = json.dumps(m["images"])
        for j, data in enumerate(jpegs):
            folder = Path(tmp) / "photos" / ("even" if j % 2 == 0 else "odd")
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{j}.jpg").write_bytes(data)
        prepare_images(str(Path(tmp) / "photos"), Path(tmp) / "photo-shards", val_fraction=0.1, progress=False)
        for workers in (0, 1, 2):
            rows.append((f"for reference, per rank: ImageDataModule train loader, {args.size} px, batch 32, "
                         f"{workers} DataLoader worker(s)", loader_rate(Path(tmp) / "photo-shards", args.size,
                                                                        workers)))
    print(f"images: {args.images} per measurement; synthetic set {summary}")
    print("| per worker (one process, torch threads 1) | images/s |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value:,.0f} |")


if __name__ == "__main__":
    main()
