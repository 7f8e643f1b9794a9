"""`pretrain transfer-report`: what pre-training bought, measured. For every label fraction and fine-tuning mode,
the pre-trained model and the same architecture from random initialisation are trained with the same budget (steps,
batch size) over the same LR grid and the same seeds, on identical data subsets, and validated on the whole labelled
val split (never on the training subset).

    pretrain transfer-report --pretrained runs/bert-smoke/checkpoints/last.ckpt --data data/stdlib-packages \\
        --fractions 0.01,0.1,1.0 --modes full,linear,lora --seeds 3 --output reports/stdlib-packages

Writes OUTPUT/report.md (the table: mean ± std val accuracy per fraction and mode, pre-trained vs scratch, the gain),
OUTPUT/report.json (every run) and OUTPUT/transfer.png (accuracy vs label fraction, log x-axis, error bars), each
atomically. For each (fraction, mode, arm) the LR with the best mean val accuracy over the seeds is reported (the same
grid and rule for both arms); the seed picks the label subset (shared by both arms), the head's init and the order.

Molecule graph shards (`pretrain prepare-molecules` with labels) are measured by their task's metric instead: val
RMSE for regression (lower is better: the best LR is the lowest, and the gain is scratch minus pre-trained, so a
negative gain is pre-training that hurt, Hu et al.'s "negative transfer") or the mean ROC-AUC over tasks for
classification; the GIN is fine-tuned in full (`--modes full`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from framework.errors import UserError

ARMS = ("pretrained", "scratch")


@dataclass
class Run:
    fraction: float
    mode: str
    arm: str
    lr: float
    seed: int
    accuracy: float
    macro_f1: float
    train_docs: int
    seconds: float
    score: float = math.nan  # the reported metric: accuracy, or a graph task's RMSE / ROC-AUC


def train_one(pretrained: str, data: str, fraction: float, mode: str, arm: str, lr: float, seed: int,
              args: argparse.Namespace) -> Run:
    """One fine-tuning run in this process (no logger, no checkpoint) -> its final val accuracy and macro-F1."""
    import lightning as L

    started = time.perf_counter()
    L.seed_everything(seed, verbose=False)
    dm = datamodule(data, args, seed=seed, label_fraction=fraction)
    common = dict(init_from=pretrained, random_init=arm == "scratch", mode=mode, lr=lr, head_lr=lr * args.head_lr_ratio,
                  warmup_steps=max(1, args.steps // 10), weight_decay=0.01, betas=(0.9, 0.98), min_lr_ratio=0.1)
    graphs = modality(data) == "graphs"
    if graphs:
        from framework.tasks.graph import PropertyTask

        del common["mode"], common["betas"]
        task: Any = PropertyTask(config={"pooling": args.pooling} if args.pooling else None, **common)
    elif is_images(data):
        from framework.tasks.vision import ImageClassificationTask

        task = ImageClassificationTask(**common)
    else:
        from framework.tasks.classification import ClassificationTask

        task = ClassificationTask(pooling=args.pooling, **common)
    task.print_init_report = False  # the same lines every run: the report states where the weights come from
    from framework.callbacks.guard import Guard

    trainer = L.Trainer(accelerator=args.accelerator, devices=1, max_steps=args.steps, logger=False,
                        callbacks=[Guard()], enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, check_val_every_n_epoch=None, val_check_interval=args.steps)
    trainer.fit(task, datamodule=dm)  # validates once, after the last step
    metrics = trainer.callback_metrics
    if graphs:
        score = float(metrics["val/rmse"] if task.kind == "regression" else metrics["val/roc_auc"])
        return Run(fraction, mode, arm, lr, seed, math.nan, math.nan, len(dm.train_y()),
                   time.perf_counter() - started, score)
    accuracy = float(metrics["val/accuracy"])
    return Run(fraction, mode, arm, lr, seed, accuracy, float(metrics["val/macro_f1"]), len(dm.train_labels()),
               time.perf_counter() - started, accuracy)


def is_images(data: str) -> bool:
    """Whether `data` holds image shards (`pretrain prepare-images`) rather than labelled documents."""
    try:
        with open(os.path.join(data, "manifest.json")) as f:
            return "images" in json.load(f)
    except (OSError, ValueError):
        return False  # the datamodule reports a missing or broken manifest with its fix


def modality(data: str) -> str:
    """The manifest's modality ("" when it cannot be read: the datamodule reports that with its fix)."""
    try:
        with open(os.path.join(data, "manifest.json")) as f:
            return json.load(f).get("modality", "")
    except (OSError, ValueError):
        return ""


def datamodule(data: str, args: argparse.Namespace, seed: int = 0, label_fraction: float = 1.0) -> Any:
    """The labelled data's datamodule: molecule graphs, images or documents."""
    if modality(data) == "graphs":
        from framework.data.graphs import GraphDataModule

        return GraphDataModule(path=data, batch_size=args.batch_size, num_workers=0, seed=seed,
                               label_fraction=label_fraction)
    if is_images(data):
        from framework.data.images import ImageDataModule

        return ImageDataModule(path=data, image_size=args.image_size, batch_size=args.batch_size, num_workers=0,
                               seed=seed, label_fraction=label_fraction)
    from framework.data.documents import ClassificationDataModule

    return ClassificationDataModule(path=data, seq_len=args.seq_len, batch_size=args.batch_size, num_workers=0,
                                    seed=seed, label_fraction=label_fraction)


def summarize(runs: list[Run], lower_is_better: bool = False) -> list[dict[str, Any]]:
    """Per (fraction, mode): for each arm the best LR by mean val score over seeds (accuracy; RMSE: the lowest), its
    mean and std; the gain (positive: pre-training helped)."""
    sign = -1 if lower_is_better else 1
    rows = []
    for fraction in sorted({r.fraction for r in runs}):
        for mode in sorted({r.mode for r in runs}, key=lambda m: ("full", "linear", "lora").index(m)):
            row: dict[str, Any] = {"fraction": fraction, "mode": mode}
            for arm in ARMS:
                by_lr: dict[float, list[Run]] = {}
                for r in runs:
                    if (r.fraction, r.mode, r.arm) == (fraction, mode, arm):
                        by_lr.setdefault(r.lr, []).append(r)
                if not by_lr:
                    continue
                lr, best = max(by_lr.items(), key=lambda kv: sign * mean([r.score for r in kv[1]]))
                row[arm] = {"lr": lr, "score_mean": mean([r.score for r in best]),
                            "score_std": std([r.score for r in best]), "seeds": len(best),
                            "train_docs": best[0].train_docs}
                if not math.isnan(best[0].accuracy):
                    row[arm].update(accuracy_mean=mean([r.accuracy for r in best]),
                                    accuracy_std=std([r.accuracy for r in best]),
                                    macro_f1_mean=mean([r.macro_f1 for r in best]))
            if all(a in row for a in ARMS):
                row["gain"] = sign * (row["pretrained"]["score_mean"] - row["scratch"]["score_mean"])
            rows.append(row)
    return rows


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def std(xs: list[float]) -> float:
    """Sample standard deviation (0 for one value)."""
    if len(xs) < 2:
        return 0.0
    m = mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def markdown(rows: list[dict[str, Any]], header: dict[str, Any]) -> str:
    metric = header.get("metric", "accuracy")
    if metric == "accuracy":
        about = f"{header['classes']} classes; majority class {header['majority']:.1%}"
    else:
        about = header["about"]
    lines = [f"# Transfer report: {header['data']}", "",
             f"Pre-trained: `{header['pretrained']}`. Scratch: the same architecture, randomly initialised. "
             f"Each cell: mean ± std val {metric} over {header['seeds']} seeds, on the whole val split "
             f"({header['val_docs']} {header['unit']}, {about}), with the best LR of {header['lrs']} for that cell; "
             f"{header['steps']} steps of batch {header['batch_size']}, {header['shape']}."
             + (" Lower is better; the gain is scratch minus pre-trained (negative: pre-training hurt)."
                if header.get("lower_is_better") else ""), "",
             f"| label fraction | train {header['unit']} | mode | pre-trained | scratch | gain |",
             "|---:|---:|---|---:|---:|---:|"]
    for r in rows:
        cells = []
        for arm in ARMS:
            a = r.get(arm)
            if a and metric == "accuracy":
                cells.append(f"{a['score_mean']:.1%} ± {a['score_std']:.1%} (lr {a['lr']:g})")
            else:
                cells.append(f"{a['score_mean']:.4g} ± {a['score_std']:.2g} (lr {a['lr']:g})" if a else "-")
        if "gain" not in r:
            gain = "-"
        else:
            gain = f"{r['gain'] * 100:+.1f} pts" if metric in ("accuracy", "ROC-AUC") else f"{r['gain']:+.4g}"
        docs = (r.get("pretrained") or r.get("scratch") or {}).get("train_docs", "")
        lines.append(f"| {r['fraction']:g} | {docs} | {r['mode']} | {cells[0]} | {cells[1]} | {gain} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path, metric: str = "accuracy", lower_is_better: bool = False) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for i, mode in enumerate(dict.fromkeys(r["mode"] for r in rows)):  # a colour per mode, a line style per arm
        for arm, style in (("pretrained", "-o"), ("scratch", "--s")):
            pts = [(r["fraction"], r[arm]) for r in rows if r["mode"] == mode and arm in r]
            if pts:
                ax.errorbar([f for f, _ in pts], [a["score_mean"] for _, a in pts], color=f"C{i}",
                            yerr=[a["score_std"] for _, a in pts], fmt=style, capsize=3, label=f"{arm} ({mode})")
    ax.set_xscale("log")
    ax.set_xlabel("label fraction (log scale)")
    ax.set_ylabel(f"val {metric}" + (" (lower is better)" if lower_is_better else ""))
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("pre-trained vs scratch")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _floats(text: str, what: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"bad --{what} '{text}'; give comma-separated numbers, e.g. 0.01,0.1,1.0") from None
    if not values:
        raise UserError(f"--{what} is empty")
    return values


def _parser() -> argparse.ArgumentParser:
    from framework.commands.common import ArgParser as _Parser

    p = _Parser(prog="pretrain transfer-report", description=__doc__.split("\n\n")[0],
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretrained", required=True, help="a checkpoint of `pretrain fit` (any strategy) or an export")
    p.add_argument("--data", required=True, help="labelled shards (`pretrain prepare --label-field` or --task), "
                                                 "image shards (`pretrain prepare-images`) or labelled molecule "
                                                 "graphs (`pretrain prepare-molecules --label-column`)")
    p.add_argument("--output", required=True, help="directory for report.md, report.json and transfer.png")
    p.add_argument("--fractions", default="0.01,0.1,1.0", help="label fractions (default 0.01,0.1,1.0)")
    p.add_argument("--modes", default="full", help="any of full,linear,lora (default full)")
    p.add_argument("--seeds", type=int, default=3, help="seeds per cell (default 3)")
    p.add_argument("--lrs", default="1e-3,3e-4", help="the LR grid, for both arms (default 1e-3,3e-4)")
    p.add_argument("--head-lr-ratio", type=float, default=10.0, help="head LR / LR (default 10)")
    p.add_argument("--steps", type=int, default=100, help="optimizer steps per run (default 100)")
    p.add_argument("--batch-size", type=int, default=16, help="documents per batch (default 16)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per document after framing (default 128)")
    p.add_argument("--pooling", default="",
                   help="cls or mean (encoder), last or mean (GPT), mean or sum (GIN); default cls / last / "
                        "the checkpoint's")
    p.add_argument("--image-size", type=int, default=64, help="image side in pixels, for image shards (default 64)")
    p.add_argument("--accelerator", default="auto", help="cpu, gpu or auto (default auto)")
    return p


def main(argv: list[str]) -> None:
    args = _parser().parse_args(argv)
    images, graphs = is_images(args.data), modality(args.data) == "graphs"
    if graphs:
        MODES = ("full",)  # noqa: N806  # a GIN is fine-tuned in full
    elif images:
        from framework.tasks.vision import MODES
    else:
        from framework.tasks.classification import MODES

    fractions, lrs = _floats(args.fractions, "fractions"), _floats(args.lrs, "lrs")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if any(not 0 < f <= 1 for f in fractions) or any(lr <= 0 for lr in lrs):
        raise UserError("--fractions must be in (0, 1] and --lrs > 0")
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise UserError(f"unknown --modes {bad}; choose from {', '.join(MODES)}")
    if args.seeds < 1 or args.steps < 1 or args.batch_size < 1:
        raise UserError("--seeds, --steps and --batch-size must be >= 1")
    if not os.path.exists(args.pretrained):
        raise UserError(f"--pretrained '{args.pretrained}' does not exist; pass a checkpoint or an export directory")
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    _quiet()

    probe = datamodule(args.data, args)
    probe.setup("fit")
    val_labels = probe.val_labels()
    if not len(val_labels):
        raise UserError(f"'{args.data}' has no val split; prepare it with a --val-fraction > 0")
    if graphs:
        header = graph_header(probe, args)
    else:
        header = text_or_image_header(probe, val_labels, images, args)
    header.update({"pretrained": args.pretrained, "data": args.data, "seeds": args.seeds, "lrs": lrs,
                   "steps": args.steps, "batch_size": args.batch_size, "modes": modes, "fractions": fractions})
    lower = bool(header.get("lower_is_better"))
    plan = [(f, m, a, lr, s) for f in fractions for m in modes for a in ARMS for lr in lrs for s in range(args.seeds)]
    runs: list[Run] = []
    started = time.perf_counter()
    print(f"transfer report: {len(plan)} runs ({len(fractions)} fractions x {len(modes)} modes x 2 arms x "
          f"{len(lrs)} LRs x {args.seeds} seeds), {args.steps} steps each", flush=True)
    for i, (f, m, a, lr, s) in enumerate(plan, 1):
        run = train_one(args.pretrained, args.data, f, m, a, lr, s, args)
        runs.append(run)
        elapsed = time.perf_counter() - started
        eta = elapsed / i * (len(plan) - i)
        result = (f"val {header['metric']} {run.score:.4g}" if graphs else
                  f"val accuracy {run.accuracy:.1%}  macro-F1 {run.macro_f1:.1%}")
        print(f"[{i}/{len(plan)}] fraction {f:g} ({run.train_docs} {header['unit']}) {m:<6} {a:<10} lr {lr:g} seed {s}: "
              f"{result}  ({run.seconds:.1f} s, eta {eta / 60:.1f} min)", flush=True)
    rows = summarize(runs, lower)
    header["seconds"] = round(time.perf_counter() - started, 1)
    _write(out / "report.json", json.dumps({**header, "rows": rows, "runs": [asdict(r) for r in runs]}, indent=2)
           + "\n")
    table = markdown(rows, header)
    plot(rows, out / "transfer.png", header["metric"], lower)
    _write(out / "report.md", table + f"\n![{header['metric']} vs label fraction](transfer.png)\n")
    print("\n" + table, flush=True)
    print(f"wrote {out / 'report.md'}, {out / 'report.json'}, {out / 'transfer.png'} "
          f"({header['seconds'] / 60:.1f} min)", flush=True)


def text_or_image_header(probe: Any, val_labels: Any, images: bool, args: argparse.Namespace) -> dict[str, Any]:
    counts = [int((val_labels == k).sum()) for k in range(probe.num_classes)]
    return {"val_docs": len(val_labels), "unit": "images" if images else "docs", "metric": "accuracy",
            "shape": f"{args.image_size} px images" if images else f"sequences of {args.seq_len} tokens",
            **({} if images else {"seq_len": args.seq_len}),
            "classes": probe.num_classes, "majority": max(counts) / len(val_labels)}


def graph_header(probe: Any, args: argparse.Namespace) -> dict[str, Any]:
    """What the report says about molecule graph data: its metric and what predicting the train mean (regression)
    would score."""
    import numpy as np

    targets = probe.require_targets()
    regression = targets["task"] == "regression"
    header: dict[str, Any] = {"val_docs": int(len(probe.val_labels())), "unit": "molecules", "shape": "molecule graphs",
                              "metric": "RMSE" if regression else "ROC-AUC", "lower_is_better": regression,
                              "targets": targets["names"], "task": targets["task"]}
    if regression:
        val, train = probe._indexes["val"].y, probe.train_y()
        rmse = float(np.sqrt(np.nanmean((val - np.nanmean(train, 0)) ** 2)))
        header["about"] = (f"{len(targets['names'])} target(s) {', '.join(targets['names'])}; the train mean scores "
                           f"RMSE {rmse:.4g}")
    else:
        header["about"] = f"{len(targets['names'])} classification task(s); chance ROC-AUC 0.5"
    return header


def _quiet() -> None:
    """Many short fits: keep Lightning's per-fit banners off the report's progress lines."""
    import logging
    import warnings

    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="lightning")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    if not sys.warnoptions:
        warnings.simplefilter("ignore", UserWarning)
