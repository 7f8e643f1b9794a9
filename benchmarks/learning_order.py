"""Learning check for the data order: a small character-level GPT trained on a corpus whose topics are sorted, fed by
the reader's default order, against the same model fed by a plain loop that samples windows uniformly at random.

    python benchmarks/learning_order.py [--steps 1500] [--topics 12]

The corpus: `--topics` synthetic topics, each a character Markov chain of its own, written topic after topic (so a
reader that walks through the corpus in file order trains on one topic at a time: a curriculum). Validation
documents are drawn from every topic. Both arms share the model's initialisation, the optimiser, the schedule and
the number of steps; only the order of the training windows differs. A good order ends within 0.02 nats of the
uniform loop. `--sequential` adds the corpus read in order (shuffle off) as a control that shows what a walk costs.
Run it under another checkout's PYTHONPATH to measure that reader's default order with the same script.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from framework.data.datamodule import ShardDataModule
from framework.data.prepare import prepare
from framework.models.gpt import GPT, GPTConfig

ALPHABET = "abcdefghijklmnopqrstuvwxyz ,."


def write_corpus(out: Path, topics: int, docs_per_topic: int, val_per_topic: int, seed: int = 0,
                 chars: int = 1000) -> tuple[Path, Path]:
    """train.jsonl (topics in order) and val.jsonl (every topic). A topic is a character Markov chain with its own
    sparse transition table: learnable gradually (no memorisation cliff), and useless for the other topics."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    n = len(ALPHABET)
    for t in range(topics):
        table = rng.dirichlet(np.full(n, 0.05), size=n)  # row a: the next-character distribution after a

        def doc() -> str:
            state, text = int(rng.integers(n)), []
            for u in rng.random(chars):
                state = min(int(np.searchsorted(np.cumsum(table[state]), u)), n - 1)
                text.append(ALPHABET[state])
            return "".join(text)

        train += [doc() for _ in range(docs_per_topic)]
        val += [doc() for _ in range(val_per_topic)]
    out.mkdir(parents=True, exist_ok=True)
    for name, docs in (("train.jsonl", train), ("val.jsonl", val)):
        (out / name).write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return out / "train.jsonl", out / "val.jsonl"


def windows(dm: ShardDataModule, split: str) -> torch.Tensor:
    """Every window of a split, in stream order: (N, seq_len + 1)."""
    stream = dm._stream(dm._train if split == "train" else dm._val, 64, shuffle=False, train=False)
    return torch.cat([b["tokens"] for b in stream])


def train(batches, steps: int, vocab: int, seq_len: int, val: torch.Tensor, lr: float = 3e-3) -> float:
    """Train a fresh small GPT (seeded init) for `steps` batches; the val loss (nats/token) at the end."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=vocab, seq_len=seq_len, n_layer=2, n_head=4, n_embd=96))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = steps // 20
    for step in range(steps):
        scale = (step + 1) / warmup if step < warmup else 0.1 + 0.45 * (1 + math.cos(math.pi * step / steps))
        for group in opt.param_groups:
            group["lr"] = lr * scale
        tokens = next(batches)
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), tokens[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        losses = [F.cross_entropy(model(v[:, :-1]).flatten(0, 1), v[:, 1:].flatten()) for v in val.split(64)]
    return float(torch.stack(losses).mean())


def uniform_batches(train_windows: torch.Tensor, batch: int, seed: int = 0):
    """The reference: each batch is `batch` windows drawn uniformly at random, with replacement."""
    g = torch.Generator().manual_seed(seed)
    while True:
        yield train_windows[torch.randint(len(train_windows), (batch,), generator=g)]


def reader_batches(dm: ShardDataModule, shuffle: bool):
    """The framework's reader, epoch after epoch, in its default order (or in corpus order without shuffle)."""
    stream = dm._stream(dm._train, dm.batch_size, shuffle=shuffle, train=True)
    epoch = 0
    while True:
        stream.segment = stream.fresh_segment(epoch)
        for b in stream:
            yield b["tokens"]
        epoch += 1


def run(workdir: Path, steps: int, topics: int, docs_per_topic: int, seq_len: int = 64, batch: int = 16,
        sequential: bool = False, lr: float = 3e-3, seed: int = 1234) -> dict[str, float]:
    """Val losses after `steps` steps: uniform sampling, the reader's default order (and corpus order)."""
    train_file, val_file = write_corpus(workdir / "corpus", topics, docs_per_topic, val_per_topic=4)
    shards = workdir / "shards"
    prepare([str(train_file)], shards, tokenizer="bytes", val_inputs=[str(val_file)], progress=False)
    dm = ShardDataModule(path=str(shards), seq_len=seq_len, batch_size=batch, num_workers=0, seed=seed)
    dm.setup("fit")
    val = windows(dm, "val")
    train_windows = windows(dm, "train")
    out = {"uniform": train(uniform_batches(train_windows, batch, seed), steps, dm.vocab_size, seq_len, val, lr),
           "reader": train(reader_batches(dm, True), steps, dm.vocab_size, seq_len, val, lr)}
    if sequential:
        out["sequential"] = train(reader_batches(dm, False), steps, dm.vocab_size, seq_len, val, lr)
    out["epochs"] = steps * batch / len(train_windows)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--topics", type=int, default=8)
    p.add_argument("--docs-per-topic", type=int, default=60)
    p.add_argument("--sequential", action="store_true", help="also train on the corpus read in order")
    args = p.parse_args()
    torch.set_num_threads(1)  # 2 threads were 3x slower per step for this small model on 2 shared cores
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        r = run(Path(tmp), args.steps, args.topics, args.docs_per_topic, sequential=args.sequential)
    print(f"{args.steps} steps ({r['epochs']:.2f} epochs of the train windows), {args.topics} sorted topics, "
          f"{time.perf_counter() - start:.0f} s")
    for name in ("uniform", "reader", "sequential"):
        if name in r:
            print(f"  val loss, {name:<10} {r[name]:.4f} nats/token   ({r[name] - r['uniform']:+.4f} vs uniform)")


if __name__ == "__main__":
    main()
