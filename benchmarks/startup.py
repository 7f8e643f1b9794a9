"""Start-up cost of `pretrain fit`: seconds from launching the process to importing torch, torch + lightning, and to
the end of the first training step of a tiny GPT (W&B offline, and W&B disabled). Each figure is the median over
`--reps` fresh processes, taken in turn so that a busy machine slows all of them alike.

    python benchmarks/startup.py [--reps 3]

Also lists which of deepspeed, wandb and tokenizers the fit imported (each should be imported only when used).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L

ROOT = Path(__file__).resolve().parents[1]
WATCHED = ("deepspeed", "wandb", "tokenizers")


class FirstStep(L.Callback):
    """Writes the wall-clock time at the end of the first training step, and the watched modules imported by then."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not os.path.exists(self.path):
            imported = [m for m in WATCHED if m in sys.modules]
            Path(self.path).write_text(json.dumps({"time": time.time(), "imported": imported}))


def timed(cmd: list[str], env: dict[str, str]) -> float:
    start = time.time()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.time() - start


def first_step(tmp: Path, shards: Path, wandb_mode: str, env: dict[str, str]) -> tuple[float, float, list[str]]:
    """(seconds to the end of the first step, seconds for the whole 1-step fit, watched modules imported by then)."""
    mark = tmp / "first_step.json"
    mark.unlink(missing_ok=True)
    config = {"model": {"class_path": "framework.tasks.causal_lm.CausalLMTask",
                        "init_args": {"preset": "gpt-tiny", "warmup_steps": 0}},
              "data": {"path": str(shards), "seq_len": 32, "batch_size": 4, "num_workers": 0},
              "trainer": {"default_root_dir": str(tmp / "run"), "accelerator": "cpu", "max_steps": 1,
                          "limit_val_batches": 0,
                          "callbacks": [{"class_path": "startup.FirstStep", "init_args": {"path": str(mark)}}]},
              "summary": {"sample_tokens": 0}, "wandb": {"mode": wandb_mode}}
    (tmp / "config.json").write_text(json.dumps(config))
    start = time.time()
    subprocess.run([sys.executable, "-m", "framework", "fit", "--config", str(tmp / "config.json")], env=env,
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp)
    total = time.time() - start
    record = json.loads(mark.read_text())
    return record["time"] - start, total, record["imported"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'benchmarks'}"}
    results: dict[str, list[float]] = {}
    imported: set[str] = set()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        src = tmp / "corpus"
        src.mkdir()
        (src / "a.txt").write_text("".join(f"line {i} of a small corpus\n" for i in range(3000)))
        from framework.data.prepare import prepare

        prepare([str(src)], tmp / "shards", tokenizer="bytes", val_fraction=0.1, progress=False)
        for _ in range(args.reps):
            results.setdefault("import torch", []).append(timed([sys.executable, "-c", "import torch"], env))
            results.setdefault("import torch + lightning", []).append(
                timed([sys.executable, "-c", "import torch, lightning"], env))
            for mode in ("offline", "disabled"):
                step, total, mods = first_step(tmp, tmp / "shards", mode, env)
                results.setdefault(f"first step, W&B {mode}", []).append(step)
                results.setdefault(f"whole 1-step fit, W&B {mode}", []).append(total)
                imported.update(mods)
    base = statistics.median(results["import torch + lightning"])
    print(f"median of {args.reps} fresh processes, {os.cpu_count()} CPU(s), python {sys.version.split()[0]}")
    for name, values in results.items():
        median = statistics.median(values)
        extra = f"   (+{median - base:.2f} s after torch + lightning)" if name.startswith("first step") else ""
        print(f"{name:<30} {median:6.2f} s{extra}")
    print(f"imported by the first step: {', '.join(sorted(imported)) or 'none'} (watched: {', '.join(WATCHED)})")


if __name__ == "__main__":
    main()
