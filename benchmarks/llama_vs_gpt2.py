"""Learning check for the Llama block: does llama-cpu (RMSNorm, SwiGLU, RoPE, grouped-query attention, no biases) learn
at least as well as the GPT-2 block (gpt-small-cpu) at equal block weights, FLOPs and steps on the demo corpus?

    python benchmarks/llama_vs_gpt2.py [--steps 600] [--seeds 1234,1235,1236] [--runs gpt2,llama]

Each run is `pretrain fit` of the demo recipe (configs/gpt/smoke.yaml, configs/llama/smoke.yaml: the same data, seed,
data order, optimizer, learning rate, schedule and steps; only the preset differs), CPU, fp32, one process; the runs
alternate (gpt2, llama, gpt2, llama, ...) so a machine that slows down mid-benchmark slows both. Prints each run's
final val loss (20 val batches) and wall time, then the mean and spread per model. The figures in
benchmarks/results/llama.md come from it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from fit_run import fit_val_loss  # noqa: E402

RUNS = {"gpt2": "configs/gpt/smoke.yaml", "llama": "configs/llama/smoke.yaml"}


def fit(name: str, root: Path, steps: int, seed: int) -> dict:
    run = root / f"{name}-{seed}"
    args = ["--config", str(ROOT / RUNS[name]), "--seed_everything", str(seed),
            "--trainer.default_root_dir", str(run), "--trainer.max_steps", str(steps),
            "--trainer.val_check_interval", str(steps), "--trainer.enable_progress_bar", "false",
            "--checkpoint.every_n_steps", str(steps), "--summary.sample_tokens", "0", "--wandb.mode", "disabled"]
    val_loss, wall, _ = fit_val_loss(name, args)
    return {"name": name, "seed": seed, "val_loss": val_loss, "wall_s": round(wall, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--seeds", default="1234,1235,1236")
    p.add_argument("--runs", default=",".join(RUNS))
    args = p.parse_args()
    import torch

    sys.path.insert(0, str(ROOT))
    from framework.models.gpt import GPT, GPTConfig

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in [int(s) for s in args.seeds.split(",")]:
            for name in args.runs.split(","):
                results.append(fit(name, Path(tmp), args.steps, seed))
                print(json.dumps(results[-1]), flush=True)
    print(f"\n{args.steps} steps x 16 x 256 tokens, demo corpus, CPU fp32; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, torch {torch.__version__}\n")
    print("| model | preset | parameters | val loss per seed | mean | spread (max - min) | wall s (mean) |")
    print("|---|---|---|---|---|---|---|")
    for name in args.runs.split(","):
        rows = [r for r in results if r["name"] == name]
        preset = "gpt-small-cpu" if name == "gpt2" else "llama-cpu"
        with torch.device("meta"):
            params = GPT(GPTConfig.from_preset(preset)).num_params(non_embedding=False)
        losses = [r["val_loss"] for r in rows]
        print(f"| {name} | {preset} | {params / 1e6:.3f}M | {', '.join(f'{v:.4f}' for v in losses)} | "
              f"{statistics.mean(losses):.4f} | {max(losses) - min(losses):.4f} | "
              f"{statistics.mean(r['wall_s'] for r in rows):.0f} |")


if __name__ == "__main__":
    main()
