"""The transfer report's classical arm alone (framework/classical.py through transfer_report.classical_one) on
labelled shards: val accuracy per label fraction and seed, on the report's own subsets, held-out slices and val split.

    python benchmarks/transfer_classical.py data/subj --fractions 0.01,0.1,1 --seeds 3 [--seq-len 128]

Prints one line per run and a mean ± std per fraction (markdown).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from framework.commands import transfer_report as tr  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("data")
    p.add_argument("--fractions", default="0.01,0.1,1")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--seq-len", default="128")
    p.add_argument("--holdout", default="0.2")
    a = p.parse_args()
    args = tr._parser().parse_args(["--pretrained", "-", "--data", a.data, "--output", "-", "--seq-len", a.seq_len,
                                    "--holdout", a.holdout])
    rows = []
    for f in (float(x) for x in a.fractions.split(",")):
        runs = []
        for s in range(a.seeds):
            t0 = time.perf_counter()
            run = tr.classical_one(a.data, f, s, args)
            assert run is not None
            runs.append(run)
            print(f"fraction {f:g} seed {s}: {run.train_docs} docs ({run.held_docs} held out), C {run.lr:g}, "
                  f"val accuracy {run.accuracy:.1%}, macro-F1 {run.macro_f1:.1%} ({time.perf_counter() - t0:.1f} s)",
                  flush=True)
        acc = [r.accuracy for r in runs]
        rows.append(f"| {f:g} | {runs[0].train_docs} | {tr.mean(acc):.1%} ± {tr.std(acc):.1%} | "
                    f"{'/'.join(f'{r.lr:g}' for r in runs)} |")
    print("\n| label fraction | train docs | classical val accuracy | C per seed |\n|---:|---:|---:|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
