"""Throughput of `pretrain prepare` on the embedded corpus (the stdlib's .py files, ~30 MB).

    python benchmarks/prepare_throughput.py [--input PATH ...]

Each configuration is a full prepare into a fresh temp dir (reading, bpe training where asked, tokenizing, writing
and hashing shards), timed end to end. MB/s counts the UTF-8 text read; tokens/s the tokens written.
`run()` returns the rows for other benchmark scripts. Call it under `if __name__ == "__main__":` since
workers > 1 start processes with spawn.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

# (tokenizer spec, workers)
CONFIGS: list[tuple[str, int]] = [("bytes", 1), ("bytes", 2), ("bpe:32000", 1), ("bpe:32000", 2)]


def run(inputs: list[str] | None = None, configs: list[tuple[str, int]] = CONFIGS) -> list[dict]:
    """Prepare `inputs` (None: the stdlib corpus) once per (tokenizer, workers); one result row per configuration."""
    from framework.data.prepare import prepare

    rows = []
    for spec, workers in configs:
        with tempfile.TemporaryDirectory(prefix="prepare-bench-") as tmp:
            start = time.perf_counter()
            manifest = prepare(inputs, Path(tmp) / "out", tokenizer=spec, workers=workers, progress=False)
            seconds = time.perf_counter() - start
        splits = manifest["splits"]
        tokens = splits["train"]["tokens"] + splits["val"]["tokens"]
        mb = manifest["sources"]["bytes"] / 1e6
        rows.append({"tokenizer": spec, "workers": workers, "files": manifest["sources"]["files"],
                     "documents": manifest["sources"]["documents"], "mb": round(mb, 2), "tokens": tokens,
                     "seconds": round(seconds, 2), "mb_per_s": round(mb / seconds, 2),
                     "tokens_per_s": round(tokens / seconds)})
    return rows


def format_rows(rows: list[dict]) -> str:
    lines = [f"{'tokenizer':<11} {'workers':>7} {'MB':>7} {'tokens':>12} {'seconds':>8} {'MB/s':>7} {'tokens/s':>12}"]
    lines += [f"{r['tokenizer']:<11} {r['workers']:>7} {r['mb']:>7.1f} {r['tokens']:>12,} {r['seconds']:>8.2f} "
              f"{r['mb_per_s']:>7.2f} {r['tokens_per_s']:>12,}" for r in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", nargs="+", help="corpus to prepare instead of the stdlib")
    args = parser.parse_args()
    print(format_rows(run(args.input)))
