"""Molecule property learning check: a GIN fine-tuned on TPSA (RDKit's embedded NCI set, scaffold split) against a
Morgan count-fingerprint + ridge baseline on the same train molecules, and attribute-masking (and, with
--contrastive-steps, graph contrastive) pre-training against training from scratch, at label fractions, over seeds,
on the same subsets for every arm. The ridge arm needs scikit-learn (`pip install -e '.[bench]'`).

    python benchmarks/graph_property.py --work /tmp/graph-bench --fractions 0.1,1 --seeds 2 \\
        --pretrain-steps 600 --steps 400 --out benchmarks/results/graph_property.md

1. `pretrain prepare-molecules --embedded nci` (pre-training set) and `--embedded nci-tpsa --split scaffold`
   (property set) into --work;
2. `pretrain fit --config configs/graph/smoke.yaml` for --pretrain-steps (attribute masking, gin-cpu), and
   `--config configs/graph/contrastive.yaml` for --contrastive-steps (GraphCL / MolCLR views, NT-Xent; 0: no such
   arm);
3. per fraction and seed: the ridge baseline (radius-2 Morgan count fingerprints in 2048 slots, the penalty chosen by
   5-fold CV on the train subset), then PropertyTask from each pre-trained checkpoint and from scratch (the same
   architecture, `random_init`), --steps each at batch 64, the configs/graph/finetune.yaml recipe; val RMSE and MAE
   on the whole val split (TPSA units, A^2).
Writes a markdown table of mean ± std per fraction and arm (lower is better) to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def prepare(work: Path) -> tuple[Path, Path]:
    from framework.data.molecules import prepare_molecules

    nci, tpsa = work / "nci", work / "nci-tpsa"
    if not (nci / "manifest.json").exists():
        prepare_molecules(None, nci, embedded="nci", overwrite=True, progress=False)
    if not (tpsa / "manifest.json").exists():
        prepare_molecules(None, tpsa, embedded="nci-tpsa", split="scaffold", overwrite=True, progress=False)
    return nci, tpsa


def pretrain(work: Path, nci: Path, steps: int, config: str = "smoke.yaml", name: str = "pretrain") -> tuple[Path, str]:
    ckpt = work / name / "checkpoints" / "last.ckpt"
    if ckpt.exists():
        return ckpt, "(reused)"
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "framework", "fit", "--config", str(ROOT / "configs/graph" / config),
                        "--data.init_args.path", str(nci), "--trainer.default_root_dir", str(work / name),
                        "--trainer.max_steps", str(steps), "--trainer.val_check_interval", str(steps),
                        "--checkpoint.every_n_steps", str(steps), "--wandb.mode", "disabled"],
                       capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if r.returncode:
        sys.exit(f"pre-training failed:\n{r.stderr[-3000:]}")
    summary = [line for line in r.stdout.splitlines() if line.startswith(("val/loss", "val/accuracy"))]
    return ckpt, f"{time.perf_counter() - t:.0f} s; " + "; ".join(summary)


def finetune(tpsa: Path, ckpt: Path, arm: str, fraction: float, seed: int, steps: int, lr: float) -> dict:
    import lightning as L

    from framework.data.graphs import GraphDataModule
    from framework.tasks.graph import PropertyTask

    L.seed_everything(seed, verbose=False)
    dm = GraphDataModule(path=str(tpsa), batch_size=64, num_workers=0, seed=seed, label_fraction=fraction)
    task = PropertyTask(init_from=str(ckpt), random_init=arm == "scratch", config={"pooling": "sum", "dropout": 0.1},
                        lr=lr, warmup_steps=20, weight_decay=0.0, betas=(0.9, 0.999), min_lr_ratio=0.05)
    task.print_init_report = False
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        check_val_every_n_epoch=None, val_check_interval=steps)
    t = time.perf_counter()
    trainer.fit(task, datamodule=dm)
    m = trainer.callback_metrics
    return {"rmse": float(m["val/rmse"]), "mae": float(m["val/mae"]), "train": len(dm._units["train"]),
            "seconds": time.perf_counter() - t}


def ridge(tpsa: Path, fraction: float, seed: int) -> dict:
    """Morgan count fingerprints (framework.classical.fingerprints, as the transfer report's classical arm) + ridge
    on the same train subset the GIN arms get (the datamodule's label fraction), the penalty by 5-fold CV."""
    from sklearn.linear_model import RidgeCV

    from framework.classical import fingerprints
    from framework.data.graphs import GraphDataModule

    dm = GraphDataModule(path=str(tpsa), batch_size=64, num_workers=0, seed=seed, label_fraction=fraction)
    dm.setup("fit")
    train, val = dm._indexes["train"], dm._indexes["val"]
    units = dm._units["train"]
    model = RidgeCV(alphas=(0.01, 0.1, 1, 10, 100, 1000), cv=5).fit(
        fingerprints([train.smiles[i] for i in units]).numpy(), train.y[units, 0])
    pred = model.predict(fingerprints(val.smiles).numpy())
    err = pred - val.y[:, 0]
    return {"rmse": float(np.sqrt(np.mean(err ** 2))), "mae": float(np.mean(np.abs(err))), "train": len(units),
            "alpha": float(model.alpha_)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default="/tmp/graph-bench")
    p.add_argument("--fractions", default="0.1,1")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--pretrain-steps", type=int, default=600)
    p.add_argument("--contrastive-steps", type=int, default=0, help="pre-train a contrastive arm too (0: none)")
    p.add_argument("--no-ridge", action="store_true", help="leave out the Morgan + ridge arm")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--out", default="")
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    nci, tpsa = prepare(work)
    ckpt, pre = pretrain(work, nci, args.pretrain_steps)
    print(f"pre-trained: {pre}", flush=True)
    checkpoints = {"masking-pretrained": ckpt, "scratch": ckpt}  # arm -> init_from (scratch: its architecture only)
    if args.contrastive_steps:
        checkpoints["contrastive-pretrained"], contrastive = pretrain(work, nci, args.contrastive_steps,
                                                                      "contrastive.yaml", "contrastive")
        print(f"contrastive pre-training: {contrastive}", flush=True)
        pre = f"attribute masking {pre}; contrastive {contrastive}"
    results: dict[tuple[float, str], list[dict]] = {}
    for fraction in [float(f) for f in args.fractions.split(",")]:
        for seed in range(args.seeds):
            if not args.no_ridge:
                results.setdefault((fraction, "Morgan + ridge"), []).append(ridge(tpsa, fraction, seed))
                print(f"fraction {fraction:g} seed {seed} ridge: "
                      f"{json.dumps(results[(fraction, 'Morgan + ridge')][-1])}", flush=True)
            for arm, source in checkpoints.items():
                r = finetune(tpsa, source, arm, fraction, seed, args.steps, args.lr)
                results.setdefault((fraction, f"GIN {arm}"), []).append(r)
                print(f"fraction {fraction:g} seed {seed} {arm}: {json.dumps(r)}", flush=True)
    val = json.loads((tpsa / "manifest.json").read_text())["splits"]["val"]["samples"]
    lines = [f"Val: the whole scaffold-split val set ({val} molecules); pre-training: {pre}", "",
             "| label fraction | train molecules | model | val RMSE (lower is better) | val MAE |",
             "|---:|---:|---|---:|---:|"]
    for (fraction, arm), rs in results.items():
        rmse, mae = [r["rmse"] for r in rs], [r["mae"] for r in rs]
        sd = lambda xs: statistics.stdev(xs) if len(xs) > 1 else 0.0  # noqa: E731
        lines.append(f"| {fraction:g} | {rs[0]['train']} | {arm} | {statistics.mean(rmse):.2f} ± {sd(rmse):.2f} | "
                     f"{statistics.mean(mae):.2f} ± {sd(mae):.2f} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")


if __name__ == "__main__":
    main()
