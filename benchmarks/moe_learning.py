"""Learning check for Mixture-of-Experts: does gpt-moe-cpu (8 experts, top-2) beat the dense GPT with the same active
parameters, on the same data and steps, and how does it compare with the dense GPT of the same total parameters?

    python benchmarks/moe_learning.py [--steps 300] [--seq-len 128] [--batch-size 8] [--seeds 1234]

Runs, each `pretrain fit` on the demo corpus (data/stdlib, byte tokens; prepared on first use), CPU, fp32, one
process, the same seed, data order, schedule and steps:
- moe-aux:    gpt-moe-cpu, Switch aux loss (0.01) + z-loss (0.001)          (0.83M active, 2.40M total)
- moe-bias:   gpt-moe-cpu, DeepSeek-V3 bias balancing, no aux loss, z-loss   (same sizes)
- dense-4L:   gpt-small-cpu, the same active parameters                      (0.83M)
- dense-12L:  gpt-small-cpu with 12 layers, about the same total parameters  (2.41M)
For each: the final val loss (20 val batches), wall time, and for the MoE runs the expert load (max/mean of tokens
per expert, per layer) over the last 20% of the steps, read back from the run's W&B offline log.
Prints a Markdown table; the figures in benchmarks/results/moe.md come from it (one process per run, started
together with OMP_NUM_THREADS=1 on a 2-core machine: `--runs NAME` picks one).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))
from fit_run import fit_val_loss  # noqa: E402

RUNS = {
    "moe-aux": ("gpt-moe-cpu", {}),
    "moe-bias": ("gpt-moe-cpu", {"moe": {"num_experts": 8, "top_k": 2, "balance": "bias"}}),
    "dense-4L": ("gpt-small-cpu", {}),
    "dense-12L": ("gpt-small-cpu", {"n_layer": 12}),
}


def fit(name: str, root: Path, steps: int, seq_len: int, batch: int, seed: int) -> dict:
    preset, config = RUNS[name]
    run = root / f"{name}-{seed}"
    args = ["--config", str(ROOT / "configs" / "moe" / "smoke.yaml"), "--seed_everything", str(seed),
            "--model.init_args.preset", preset, "--model.init_args.config", json.dumps(config),
            "--model.init_args.warmup_steps", str(max(1, steps // 20)),
            "--data.seq_len", str(seq_len), "--data.batch_size", str(batch),
            "--trainer.default_root_dir", str(run), "--trainer.max_steps", str(steps),
            "--trainer.val_check_interval", str(steps), "--trainer.limit_val_batches", "20",
            "--trainer.log_every_n_steps", "5", "--trainer.enable_progress_bar", "false",
            "--checkpoint.every_n_steps", str(steps), "--summary.sample_tokens", "0", "--wandb.mode", "offline"]
    val_loss, wall, _ = fit_val_loss(name, args, {"WANDB_MODE": "offline"})
    import torch

    from framework.models.gpt import GPT, GPTConfig

    with torch.device("meta"):
        model = GPT(GPTConfig.from_preset(preset, **config))
    out = {"name": name, "seed": seed, "val_loss": val_loss, "wall_s": wall,
           "params": f"{model.num_active_params() / 1e6:.2f}M / {model.num_params() / 1e6:.2f}M"}
    from wandb_records import history

    rows = history(next(run.rglob("*.wandb")))
    late = [row for row in rows if row.get("trainer/global_step", row.get("_step", 0)) >= 0.8 * steps]
    loads = [v for row in late for k, v in row.items() if k.startswith("moe/load_max_mean/")]
    if loads:
        out["load_max_mean_late"] = (sum(loads) / len(loads), max(loads))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seeds", default="1234")
    p.add_argument("--runs", default=",".join(RUNS))
    args = p.parse_args()
    import torch

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in [int(s) for s in args.seeds.split(",")]:
            for name in args.runs.split(","):
                results.append(fit(name, Path(tmp), args.steps, args.seq_len, args.batch_size, seed))
                print(json.dumps(results[-1]), flush=True)
    print(f"\n{args.steps} steps x {args.batch_size} x {args.seq_len} tokens, demo corpus, CPU fp32; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}\n")
    print("| run | seed | parameters active / total | val loss | wall s | expert load max/mean, last 20% (mean, worst) |")
    print("|---|---|---|---|---|---|")
    for r in results:
        load = r.get("load_max_mean_late")
        load_text = f"{load[0]:.2f}, {load[1]:.2f}" if load else "-"
        print(f"| {r['name']} | {r['seed']} | {r['params']} | {r['val_loss']:.4f} | {r['wall_s']:.0f} | {load_text} |")


if __name__ == "__main__":
    main()
