"""One `pretrain fit` run for a benchmark: a fresh process (python -m framework fit), timed, its final val loss read
from the run summary. Shared by the learning benchmarks (llama_vs_gpt2.py, moe_learning.py)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def fit_val_loss(name: str, args: list[str], env: dict[str, str] | None = None) -> tuple[float, float, str]:
    """(final val loss, wall seconds, stdout) of `pretrain fit ARGS` run from the repository root; SystemExit naming
    `name` when the run fails or prints no val loss."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "framework", "fit", *args], capture_output=True, text=True, env=env,
                       cwd=ROOT)
    wall = time.perf_counter() - t0
    if r.returncode:
        raise SystemExit(f"{name} failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
    val = re.findall(r"val/loss:?\s+([0-9.]+)", r.stdout)
    if not val:
        raise SystemExit(f"{name}: no val/loss in its output:\n{r.stdout[-2000:]}")
    return float(val[-1]), wall, r.stdout
