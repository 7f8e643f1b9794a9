"""`pretrain transfer-report`: what pre-training bought, measured. For every label fraction and fine-tuning mode,
the pre-trained model and the same architecture from random initialisation are trained with the same budget over the
same LR grid and the same seeds, on identical data subsets, and validated on the whole labelled val split (never on
the training subset); a classical arm (TF-IDF + logistic regression for text, logistic regression on pixels for
images) is fitted on the same subsets and scored on the same split, so the report says whether a neural model is
worth it at each fraction (molecule graphs: Morgan fingerprints + a linear model per target).

    pretrain transfer-report --pretrained runs/bert-smoke/checkpoints/last.ckpt --data data/stdlib-packages \\
        --fractions 0.01,0.1,1.0 --modes full,linear,lora --seeds 3 --output reports/stdlib-packages

The budget adapts to the subset (`plan_budget`): at least --epochs passes and --min-steps steps (so small subsets get
many more epochs), at most --max-steps; a stratified --holdout share of each subset is held out of training and
scored about 10 times per run, --patience scores without a better one stop the run (never in its first half), and the
best-scoring weights are the ones validated. Where neither neural arm beats the majority class by two binomial
standard errors on the val split, the table says "nothing was learned: raise the budget" instead of a gain.

Writes OUTPUT/report.md (the table: mean ± std val accuracy per fraction and mode, pre-trained vs scratch vs
classical, the budget, the gain), OUTPUT/report.json (every run) and OUTPUT/transfer.png (accuracy vs label fraction,
log x-axis, error bars), each atomically. For each (fraction, mode, arm) the LR with the best mean val accuracy over
the seeds is reported (the same grid and rule for both arms); the seed picks the label subset and its held-out slice
(shared by every arm), the head's init and the order.

Molecule graph shards (`pretrain prepare-molecules` with labels) are measured by their task's metric instead: val
RMSE for regression (lower is better: the best LR is the lowest, and the gain is scratch minus pre-trained, so a
negative gain is pre-training that hurt, Hu et al.'s "negative transfer") or the mean ROC-AUC over tasks for
classification; the GIN is fine-tuned in full (`--modes full`); the classical arm is Morgan fingerprints + ridge
regression (or logistic regression) per target, scored by the same metric (it needs RDKit; without it the table says
so); the "nothing learned" rule is for accuracy only.
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

ARMS = ("pretrained", "scratch", "adapted")  # the neural arms (adapted: with --adapt-steps); classical beside them
MARGIN_SE = 2.0  # "learned": beats the majority class by this many binomial standard errors on the val split


@dataclass
class Budget:
    """What one run may train: `epochs` passes over the documents it trains on, capped at `max_steps` steps of
    `batch_size`; every `eval_every` steps the held-out slice is scored, and from half the budget on, `patience`
    scores in a row without a better one stop the run (the best-scoring weights are the ones validated)."""

    epochs: int
    max_steps: int
    eval_every: int
    batch_size: int
    patience: int


def plan_budget(fit_docs: int, batch_size: int, min_epochs: int, min_steps: int, max_steps: int,
                evals: int = 10, patience: int = 3) -> Budget:
    """The budget of a run on `fit_docs` documents: at least `min_epochs` epochs and at least `min_steps` steps (so a
    small subset gets many more epochs than a large one), at most `max_steps`; about `evals` held-out scores per
    run. The batch is cut to the subset when the subset is smaller."""
    batch = max(1, min(batch_size, fit_docs))
    per_epoch = max(1, fit_docs // batch)  # the last partial batch of an epoch is not trained on
    epochs = max(min_epochs, math.ceil(min_steps / per_epoch))
    steps = max(1, min(max_steps, epochs * per_epoch))
    return Budget(epochs, steps, max(1, math.ceil(steps / evals)), batch, patience)


@dataclass
class Run:
    fraction: float
    mode: str
    arm: str
    lr: float  # the classical arm: its C (inverse L2 strength), chosen on the held-out slice
    seed: int
    accuracy: float
    macro_f1: float
    train_docs: int  # the label subset: trained on + held out
    seconds: float
    score: float = math.nan  # the reported metric: accuracy, or a graph task's RMSE / ROC-AUC
    held_docs: int = 0  # of train_docs, held out for early stopping and the classical arm's C
    epochs: int = 0  # the budget (Budget)
    max_steps: int = 0
    batch_size: int = 0
    steps: int = 0  # what the run trained before it stopped
    best_step: int = 0  # the step of the weights validated
    capped: bool = False  # the step cap stopped it while its held-out score was still at its best: raise --max-steps


def adapt(pretrained: str, data: str, out: Path, args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """Task-adaptive pre-training (Gururangan et al. 2020, "Don't Stop Pretraining"): `pretrained` trained on for
    --adapt-steps more steps with its own objective (next token for a GPT, masked tokens for an encoder) on the
    texts of the labelled data's train split, without their labels (the val split is never read), packed into
    windows of --seq-len tokens, batch --batch-size; linear warm-up over the first tenth, cosine decay to a tenth of
    --adapt-lr. Saved as an export directory `out` (with the data's tokenizer) -> (its path, what was done)."""
    import shutil

    import lightning as L

    from framework.checkpoint.init_from import source_config

    config = source_config(pretrained)
    kind = config.get("model_type")
    if kind not in ("gpt", "bert"):
        raise UserError(f"--adapt-steps continues the pre-training of a GPT or encoder model; '{pretrained}' holds a "
                        f"{kind!r} model: drop --adapt-steps")
    started = time.perf_counter()
    L.seed_everything(0, verbose=False)
    seq_len = min(args.seq_len, int(config["seq_len"]))
    common = dict(config={k: v for k, v in config.items() if k != "model_type"}, init_from=pretrained,
                  lr=args.adapt_lr, warmup_steps=max(1, args.adapt_steps // 10), min_lr_ratio=0.1, weight_decay=0.01)
    data_args = dict(path=data, seq_len=seq_len, batch_size=args.batch_size, num_workers=0, seed=0)
    if kind == "gpt":
        from framework.data.datamodule import ShardDataModule
        from framework.tasks.causal_lm import CausalLMTask

        task: Any = CausalLMTask(**common)
        dm: Any = ShardDataModule(**data_args)
        objective = "next-token prediction"
    else:
        from framework.data.datamodule import MaskedLMDataModule
        from framework.tasks.masked_lm import MaskedLMTask

        task, dm = MaskedLMTask(**common), MaskedLMDataModule(**data_args)
        objective = f"masked-token prediction, {dm.mask_rate:.0%} masked"
    task.print_init_report = False
    trainer = L.Trainer(accelerator=args.accelerator, devices=1, max_steps=args.adapt_steps, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(task, datamodule=dm)
    loss = float(trainer.callback_metrics.get("train/loss", math.nan))
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    task.model.save_pretrained(tmp)
    shutil.copyfile(dm.tokenizer_path, tmp / "tokenizer.json")  # the fine-tunes check the data's tokenizer
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    about = {"steps": args.adapt_steps, "lr": args.adapt_lr, "batch_size": args.batch_size, "seq_len": seq_len,
             "objective": objective, "last_train_loss": loss, "seconds": round(time.perf_counter() - started, 1),
             "about": f"{objective}, {args.adapt_steps} steps of {args.batch_size} windows of {seq_len} tokens, "
                      f"peak lr {args.adapt_lr:g}"}
    print(f"continued pre-training: {about['about']}, last train loss {loss:.3f} ({about['seconds']} s) -> {out}",
          flush=True)
    return str(out), about


def train_one(pretrained: str, data: str, fraction: float, mode: str, arm: str, lr: float, seed: int,
              budget: Budget, args: argparse.Namespace) -> Run:
    """One fine-tuning run in this process (no logger, no checkpoint): trained on the label subset less its held-out
    slice, stopped early on that slice, then its best weights validated on the whole val split."""
    import lightning as L

    started = time.perf_counter()
    L.seed_everything(seed, verbose=False)
    dm = datamodule(data, args, seed=seed, label_fraction=fraction, holdout=args.holdout,
                    batch_size=budget.batch_size)
    dm.setup("fit")
    fit_docs, held_docs = len(dm.train_labels()), len(dm.val_labels())
    common = dict(init_from=pretrained, random_init=arm == "scratch", mode=mode, lr=lr, head_lr=lr * args.head_lr_ratio,
                  warmup_steps=max(1, budget.max_steps // 10), weight_decay=0.01, betas=(0.9, 0.98),
                  min_lr_ratio=0.1)
    graphs = modality(data) == "graphs"
    if graphs:
        from framework.tasks.graph import PropertyTask

        del common["mode"], common["betas"]
        task: Any = PropertyTask(config={"pooling": args.pooling} if args.pooling else None, **common)
        regression = dm.require_targets()["task"] == "regression"
        monitor, lower = ("val/rmse", True) if regression else ("val/roc_auc", False)
    elif is_images(data):
        from framework.tasks.vision import ImageClassificationTask

        task = ImageClassificationTask(**common)
        monitor, lower = "val/accuracy", False
    else:
        from framework.tasks.classification import ClassificationTask

        task = ClassificationTask(pooling=args.pooling, **common)
        monitor, lower = "val/accuracy", False
    task.print_init_report = False  # the same lines every run: the report states where the weights come from
    from framework.callbacks.keep_best import KeepBest

    keep = KeepBest(monitor, lower, budget.patience, min_steps=budget.max_steps // 2)
    trainer = L.Trainer(accelerator=args.accelerator, devices=1, max_steps=budget.max_steps, logger=False,
                        callbacks=[run_guard(), keep], enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, check_val_every_n_epoch=None,
                        val_check_interval=budget.eval_every, limit_val_batches=1.0 if held_docs else 0)
    trainer.fit(task, datamodule=dm)  # validates the held-out slice every eval_every steps
    steps = trainer.global_step
    keep.restore(task)  # without a held-out slice: the last weights
    final = datamodule(data, args, seed=seed, label_fraction=fraction)  # the whole val split
    trainer.validate(task, datamodule=final, verbose=False)
    metrics = trainer.callback_metrics
    spent = dict(held_docs=held_docs, epochs=budget.epochs, max_steps=budget.max_steps,
                 batch_size=budget.batch_size, steps=steps, best_step=keep.best_step if keep.best else steps,
                 capped=steps >= budget.max_steps and keep.bad == 0)
    train_docs = fit_docs + held_docs
    if graphs:
        score = float(metrics["val/rmse"] if task.kind == "regression" else metrics["val/roc_auc"])
        return Run(fraction, mode, arm, lr, seed, math.nan, math.nan, train_docs, time.perf_counter() - started,
                   score, **spent)
    accuracy = float(metrics["val/accuracy"])
    return Run(fraction, mode, arm, lr, seed, accuracy, float(metrics["val/macro_f1"]), train_docs,
               time.perf_counter() - started, accuracy, **spent)


def run_guard() -> Any:
    """The guard of a fine-tuning run: non-finite steps skipped, but no loss-spike rule. A run that fits its subset
    drives the train loss to ~0, where one harder batch is many times the median (the rule's floor is 1% of it) and
    would stop the whole report as "diverged"; the held-out score and KeepBest already judge the run."""
    from framework.callbacks.guard import Guard, GuardOptions

    return Guard(GuardOptions(spike_window=0))


def classical_one(data: str, fraction: float, seed: int, args: argparse.Namespace) -> Run:
    """The classical arm on one label subset (the neural arms' subset, held-out slice and val split): TF-IDF of word
    and character n-grams + logistic regression for documents, a logistic regression on pooled pixels for images,
    Morgan fingerprints + ridge or logistic regression per target for molecule graphs; its C (alpha) is chosen on
    the held-out slice."""
    import numpy as np
    import torch

    from framework import classical
    from framework.tasks.classification import macro_f1

    started = time.perf_counter()
    dm = datamodule(data, args, seed=seed, label_fraction=fraction, holdout=args.holdout, batch_size=1)
    dm.setup("fit")
    index = dm._indexes["train"]
    fit_ids, held_ids = dm._units["train"], dm._units["val"]
    final = datamodule(data, args, seed=seed, label_fraction=fraction, batch_size=1)
    final.setup("validate")
    val_index = final._indexes["val"]
    val_ids = np.arange(len(val_index))
    if modality(data) == "graphs":
        task = dm.require_targets()["task"]

        def prints(idx: Any, ids: Any) -> torch.Tensor:
            return classical.fingerprints([idx.smiles[int(i)] for i in ids])

        fitted = classical.select_per_target(prints(index, fit_ids), index.y[fit_ids], prints(index, held_ids),
                                             index.y[held_ids], task)
        score = classical.target_score(fitted, prints(val_index, val_ids), val_index.y, task)
        return Run(fraction, "", "classical", fitted.strength, seed, math.nan, math.nan, len(fit_ids) + len(held_ids),
                   time.perf_counter() - started, score, held_docs=len(held_ids))
    y_fit, y_held, y_val = index.label[fit_ids], index.label[held_ids], val_index.label
    if is_images(data):
        from framework.data.images import ImageTransform

        look = ImageTransform(args.image_size, train=False)  # the centre view the neural arms validate on
        rng = np.random.default_rng(0)  # unused by the val transform

        def pixels(idx: Any, ids: Any) -> torch.Tensor:
            if not len(ids):
                return torch.zeros(0, 3 * min(16, args.image_size) ** 2)
            return classical.pixel_features(torch.stack([look(idx.read_image(int(i)), rng) for i in ids]))

        X_fit, X_held, X_val = classical.standardize(pixels(index, fit_ids), pixels(index, held_ids),
                                                      pixels(val_index, val_ids))
    else:
        from framework.data.tokenizer import load_tokenizer

        tok = load_tokenizer(dm.tokenizer_path)
        cut = args.seq_len - 2  # the text the neural arms see

        def texts(idx: Any, ids: Any) -> list[str]:
            return [tok.decode(idx.read(int(i), cut).tolist()) for i in ids]

        X_fit, X_held, X_val = classical.text_features(texts(index, fit_ids), texts(index, held_ids),
                                                       texts(val_index, val_ids))
    model = classical.select_and_fit(X_fit, y_fit, X_held, y_held, dm.num_classes)
    predicted = model.predict(X_val)
    accuracy = float((predicted == y_val).mean())
    K = dm.num_classes
    confusion = torch.bincount(torch.as_tensor(y_val * K + predicted), minlength=K * K).view(K, K)
    index.close()
    val_index.close()
    return Run(fraction, "", "classical", model.C, seed, accuracy, float(macro_f1(confusion)),
               len(fit_ids) + len(held_ids), time.perf_counter() - started, accuracy, held_docs=len(held_ids))


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


def datamodule(data: str, args: argparse.Namespace, seed: int = 0, label_fraction: float = 1.0, holdout: float = 0.0,
               batch_size: int | None = None) -> Any:
    """The labelled data's datamodule: molecule graphs, images or documents (validating on the held-out slice of
    the label subset with holdout > 0, else on the val split)."""
    common = dict(path=data, batch_size=batch_size or args.batch_size, num_workers=0, seed=seed,
                  label_fraction=label_fraction, holdout=holdout)
    if modality(data) == "graphs":
        from framework.data.graphs import GraphDataModule

        return GraphDataModule(**common)
    if is_images(data):
        from framework.data.images import ImageDataModule

        return ImageDataModule(image_size=args.image_size, **common)
    from framework.data.documents import ClassificationDataModule

    return ClassificationDataModule(seq_len=args.seq_len, **common)


def learned_bar(majority: float, val_docs: int) -> float:
    """The accuracy a neural arm must beat to count as having learned: the majority class's val share plus
    MARGIN_SE binomial standard errors of an accuracy measured on val_docs documents (a model that only guesses the
    majority class, or guesses at random with its prior, lands below it about 97% of the time)."""
    return majority + MARGIN_SE * math.sqrt(majority * (1 - majority) / max(1, val_docs))


def summarize(runs: list[Run], lower_is_better: bool = False, bar: float | None = None) -> list[dict[str, Any]]:
    """Per (fraction, mode): for each neural arm the best LR by mean val score over seeds (accuracy; RMSE: the
    lowest), its mean and std, the steps it ran; the classical arm's mean and std (its C chosen per run on the
    held-out slice); the gain (positive: pre-training helped); with `bar` (accuracy), whether either neural arm's
    mean beat it ("learned")."""
    sign = -1 if lower_is_better else 1
    rows = []
    for fraction in sorted({r.fraction for r in runs}):
        classical = [r for r in runs if r.fraction == fraction and r.arm == "classical"]
        modes = sorted({r.mode for r in runs if r.arm != "classical"},
                       key=lambda m: ("full", "linear", "lora").index(m))
        for mode in modes:
            row: dict[str, Any] = {"fraction": fraction, "mode": mode}
            for arm in ARMS:
                by_lr: dict[float, list[Run]] = {}
                for r in runs:
                    if (r.fraction, r.mode, r.arm) == (fraction, mode, arm):
                        by_lr.setdefault(r.lr, []).append(r)
                if not by_lr:
                    continue
                lr, best = max(by_lr.items(), key=lambda kv: sign * mean([r.score for r in kv[1]]))
                row[arm] = {**_cell(best), "lr": lr, "steps": [r.steps for r in best],
                            "capped": sum(r.capped for r in best)}
                row.setdefault("budget", {k: getattr(best[0], k) for k in ("epochs", "max_steps", "batch_size")})
            if classical:
                row["classical"] = {**_cell(classical), "C": sorted({r.lr for r in classical})}
            if "adapted" in row and "pretrained" in row:  # what continued pre-training added
                adapted, pretrained = row["adapted"]["score_mean"], row["pretrained"]["score_mean"]
                row["adapted"]["vs_pretrained"] = sign * (adapted - pretrained)
            if "pretrained" in row and "scratch" in row:
                row["gain"] = sign * (row["pretrained"]["score_mean"] - row["scratch"]["score_mean"])
            if bar is not None and any(a in row for a in ARMS):
                row["learned"] = max(row[a]["score_mean"] for a in ARMS if a in row) > bar
            rows.append(row)
    return rows


def _cell(runs: list[Run]) -> dict[str, Any]:
    cell = {"score_mean": mean([r.score for r in runs]), "score_std": std([r.score for r in runs]),
            "seeds": len(runs), "train_docs": runs[0].train_docs, "held_docs": runs[0].held_docs}
    if not math.isnan(runs[0].accuracy):
        cell.update(accuracy_mean=mean([r.accuracy for r in runs]), accuracy_std=std([r.accuracy for r in runs]),
                    macro_f1_mean=mean([r.macro_f1 for r in runs]))
    return cell


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def std(xs: list[float]) -> float:
    """Sample standard deviation (0 for one value)."""
    if len(xs) < 2:
        return 0.0
    m = mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


NOTHING_LEARNED = "nothing was learned: raise the budget"


def markdown(rows: list[dict[str, Any]], header: dict[str, Any]) -> str:
    metric = header.get("metric", "accuracy")
    accuracy = metric == "accuracy"
    if accuracy:
        about = f"{header['classes']} classes; majority class {header['majority']:.1%}"
    else:
        about = header["about"]
    budget = (f"Budget per run: at least {header['epochs']} epochs and {header['min_steps']} steps over the documents "
              f"trained on, at most {header['max_steps']} steps; {header['holdout']:.0%} of each label subset (by "
              f"class) is held out of training and scored {header['evals']} times per run; from half the budget on, "
              f"{header['patience']} scores in a row without a better one stop the run; the best-scoring weights are "
              "validated. Steps: the fewest and most that a cell's seeds ran; \"still improving at the cap\": seeds "
              "whose best held-out score was their last when the step cap stopped them (raise --max-steps).")
    classical = header.get("classical") or ""
    lines = [f"# Transfer report: {header['data']}", "",
             f"Pre-trained: `{header['pretrained']}`. Scratch: the same architecture, randomly initialised. "
             f"Classical: {classical or 'none (the fingerprints need RDKit: `pip install rdkit`)'}. "
             f"Each cell: mean ± std val {metric} over {header['seeds']} seeds, on the whole val split "
             f"({header['val_docs']} {header['unit']}, {about}), with the best LR of {header['lrs']} for that cell; "
             f"batch {header['batch_size']}, {header['shape']}."
             + (" Lower is better; the gain is scratch minus pre-trained (negative: pre-training hurt)."
                if header.get("lower_is_better") else ""), "", budget]
    if accuracy:
        lines += ["", f"Learned: a neural arm's mean beats {header['learned_bar']:.1%} (the majority class plus "
                      f"{MARGIN_SE:g} binomial standard errors on {header['val_docs']} {header['unit']}); where "
                      f"neither does, the gain reads \"{NOTHING_LEARNED}\"."]
    arms = [a for a in ARMS if any(a in r for r in rows)]
    if "adapted" in arms:
        lines += ["", f"Adapted: the pre-trained model after more steps of its own objective on the train split's "
                      f"texts, without labels ({header['adapt']['about']}), then fine-tuned as the others; beside "
                      "it, its gain over the pre-trained arm."]
    names = {"pretrained": "pre-trained", "scratch": "scratch", "adapted": "adapted"}
    lines += ["", f"| label fraction | train {header['unit']} (held out) | mode | budget | "
                  + " | ".join(names[a] for a in arms) + " | classical | gain |",
              "|---:|---:|---|---|" + "---:|" * len(arms) + "---:|---:|"]
    for r in rows:
        cells = []
        for arm in arms:
            a = r.get(arm)
            if not a:
                cells.append("-")
                continue
            value = (f"{a['score_mean']:.1%} ± {a['score_std']:.1%}" if accuracy
                     else f"{a['score_mean']:.4g} ± {a['score_std']:.2g}")
            lo, hi = min(a["steps"]), max(a["steps"])
            versus = f"; {a['vs_pretrained'] * 100:+.1f} pts" if accuracy and "vs_pretrained" in a else ""
            capped = f", {a['capped']} of {a['seeds']} still improving at the cap" if a.get("capped") else ""
            cells.append(f"{value} (lr {a['lr']:g}, {lo}{'' if lo == hi else f'–{hi}'} steps{capped}{versus})")
        c = r.get("classical")
        if c:
            cs = "/".join(f"{x:g}" for x in c["C"])
            strength = "alpha" if header.get("task") == "regression" else "C"
            value = (f"{c['score_mean']:.1%} ± {c['score_std']:.1%}" if accuracy
                     else f"{c['score_mean']:.4g} ± {c['score_std']:.2g}")
            cells.append(f"{value} ({strength} {cs})")
        else:
            cells.append("none" if not classical else "-")
        if r.get("learned") is False:
            gain = NOTHING_LEARNED
        elif "gain" not in r:
            gain = "-"
        else:
            gain = f"{r['gain'] * 100:+.1f} pts" if metric in ("accuracy", "ROC-AUC") else f"{r['gain']:+.4g}"
        first = r.get("pretrained") or r.get("scratch") or {}
        docs = f"{first.get('train_docs', '')} ({first.get('held_docs', 0)})"
        b = r.get("budget")
        spend = f"{b['epochs']} epochs ≤ {b['max_steps']} steps of {b['batch_size']}" if b else "-"
        lines.append(f"| {r['fraction']:g} | {docs} | {r['mode']} | {spend} | {' | '.join(cells)} | {gain} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path, metric: str = "accuracy", lower_is_better: bool = False,
         majority: float | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for i, mode in enumerate(dict.fromkeys(r["mode"] for r in rows)):  # a colour per mode, a line style per arm
        for arm, style in (("pretrained", "-o"), ("scratch", "--s"), ("adapted", "-.D")):
            pts = [(r["fraction"], r[arm]) for r in rows if r["mode"] == mode and arm in r]
            if pts:
                ax.errorbar([f for f, _ in pts], [a["score_mean"] for _, a in pts], color=f"C{i}",
                            yerr=[a["score_std"] for _, a in pts], fmt=style, capsize=3, label=f"{arm} ({mode})")
    classical = {r["fraction"]: r["classical"] for r in rows if "classical" in r}  # the same for every mode
    if classical:
        fs = sorted(classical)
        ax.errorbar(fs, [classical[f]["score_mean"] for f in fs], yerr=[classical[f]["score_std"] for f in fs],
                    fmt=":^", color="black", capsize=3, label="classical")
    if majority is not None:
        ax.axhline(majority, color="grey", linewidth=0.8, linestyle="-.", label="majority class")
    ax.set_xscale("log")
    ax.set_xlabel("label fraction (log scale)")
    ax.set_ylabel(f"val {metric}" + (" (lower is better)" if lower_is_better else ""))
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("pre-trained vs scratch vs classical")
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
    p.add_argument("--epochs", type=int, default=3, help="the fewest passes over a run's documents (default 3)")
    p.add_argument("--min-steps", type=int, default=200,
                   help="the fewest optimizer steps of a run: small subsets get more epochs (default 200)")
    p.add_argument("--max-steps", type=int, default=1000, help="the most optimizer steps of a run (default 1000)")
    p.add_argument("--holdout", type=float, default=0.2,
                   help="share of each label subset held out of training, for early stopping and the classical "
                        "arm's C (default 0.2)")
    p.add_argument("--patience", type=int, default=3,
                   help="held-out scores in a row without a better one that stop a run, from half its budget on "
                        "(default 3; each run is scored about 10 times)")
    p.add_argument("--classical", action=argparse.BooleanOptionalAction, default=True,
                   help="the classical arm: TF-IDF of word and character n-grams + logistic regression "
                        "(documents), logistic regression on pixels (images), Morgan fingerprints + ridge or "
                        "logistic regression per target (molecule graphs) (default on)")
    p.add_argument("--adapt-steps", type=int, default=0,
                   help="an arm that first continues pre-training the model on the train split's texts without "
                        "labels for this many steps (task-adaptive pre-training), then fine-tunes; GPT and encoder "
                        "models (default 0: off)")
    p.add_argument("--adapt-lr", type=float, default=3e-4, help="peak LR of that continued pre-training (default 3e-4)")
    p.add_argument("--batch-size", type=int, default=16, help="documents per batch (default 16)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per document after framing (default 128)")
    p.add_argument("--pooling", default="",
                   help="cls or mean (encoder), last or mean (GPT), mean or sum (GIN); default cls / last / "
                        "the checkpoint's")
    p.add_argument("--image-size", type=int, default=64, help="image side in pixels, for image shards (default 64)")
    p.add_argument("--accelerator", default="auto", help="cpu, gpu or auto (default auto)")
    return p


EVALS = 10  # held-out scores per run


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
    if min(args.seeds, args.epochs, args.max_steps, args.batch_size, args.patience) < 1 or args.min_steps < 0:
        raise UserError("--seeds, --epochs, --max-steps, --batch-size and --patience must be >= 1, --min-steps >= 0")
    if args.adapt_steps < 0 or args.adapt_lr <= 0:
        raise UserError("--adapt-steps must be >= 0 (0: no adapted arm) and --adapt-lr > 0")
    if args.adapt_steps and (images or graphs):
        raise UserError("--adapt-steps continues pre-training on the labelled texts: it is for documents, not "
                        f"{'images' if images else 'molecule graphs'}; drop it")
    if not 0 <= args.holdout < 1:
        raise UserError(f"--holdout must be in [0, 1), got {args.holdout}; 0.2 holds a fifth of each subset out")
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
        header["learned_bar"] = learned_bar(header["majority"], header["val_docs"])
    header.update({"pretrained": args.pretrained, "data": args.data, "seeds": args.seeds, "lrs": lrs,
                   "epochs": args.epochs, "min_steps": args.min_steps, "max_steps": args.max_steps,
                   "holdout": args.holdout, "patience": args.patience, "evals": EVALS,
                   "batch_size": args.batch_size, "modes": modes, "fractions": fractions,
                   "classical": (classical_about(images, header.get("task")) if args.classical
                                 else "off (--no-classical)")})
    lower = bool(header.get("lower_is_better"))
    budgets = {}  # (fraction, seed) -> Budget: the subset's size fixes it, the same for every arm, mode and LR
    from framework.data.samples import holdout_split, stratified_subset

    labels = probe._indexes["train"].label
    for f in fractions:
        for s in range(args.seeds):
            fit, _ = holdout_split(labels, stratified_subset(labels, f, s), args.holdout, s)
            budgets[f, s] = plan_budget(len(fit), args.batch_size, args.epochs, args.min_steps, args.max_steps,
                                        EVALS, args.patience)
    arms = ["pretrained", "scratch"]
    init = {"pretrained": args.pretrained, "scratch": args.pretrained}
    if args.adapt_steps:
        init["adapted"], header["adapt"] = adapt(args.pretrained, args.data, out / "adapted", args)
        arms.append("adapted")
    plan = [(f, m, a, lr, s) for f in fractions for m in modes for a in arms for lr in lrs for s in range(args.seeds)]
    runs: list[Run] = []
    started = time.perf_counter()
    print(f"transfer report: {len(plan)} runs ({len(fractions)} fractions x {len(modes)} modes x {len(arms)} arms x "
          f"{len(lrs)} LRs x {args.seeds} seeds), at least {args.epochs} epochs and {args.min_steps} steps, at most "
          f"{args.max_steps} steps each, early stopping on {args.holdout:.0%} of each subset held out", flush=True)
    if args.classical and header["classical"]:
        for f in fractions:
            for s in range(args.seeds):
                run = classical_one(args.data, f, s, args)
                runs.append(run)
                result = (f"val {header['metric']} {run.score:.4g}" if graphs else
                          f"val accuracy {run.accuracy:.1%}  macro-F1 {run.macro_f1:.1%}")
                print(f"classical fraction {f:g} ({run.train_docs} {header['unit']}, {run.held_docs} held out) "
                      f"seed {s}: {result}  ({'alpha' if header.get('task') == 'regression' else 'C'} {run.lr:g}, "
                      f"{run.seconds:.1f} s)", flush=True)
    for i, (f, m, a, lr, s) in enumerate(plan, 1):
        b = budgets[f, s]
        run = train_one(init[a], args.data, f, m, a, lr, s, b, args)
        runs.append(run)
        elapsed = time.perf_counter() - started
        eta = elapsed / i * (len(plan) - i)
        result = (f"val {header['metric']} {run.score:.4g}" if graphs else
                  f"val accuracy {run.accuracy:.1%}  macro-F1 {run.macro_f1:.1%}")
        print(f"[{i}/{len(plan)}] fraction {f:g} ({run.train_docs} {header['unit']}, {run.held_docs} held out) "
              f"{m:<6} {a:<10} lr {lr:g} seed {s}: budget {b.epochs} epochs <= {b.max_steps} steps of "
              f"{b.batch_size}, ran {run.steps} (best at {run.best_step}{', still improving' if run.capped else ''}): "
              f"{result}  ({run.seconds:.1f} s, eta {eta / 60:.1f} min)", flush=True)
    rows = summarize(runs, lower, header.get("learned_bar"))
    header["seconds"] = round(time.perf_counter() - started, 1)
    _write(out / "report.json", json.dumps({**header, "rows": rows, "runs": [asdict(r) for r in runs]}, indent=2)
           + "\n")
    table = markdown(rows, header)
    plot(rows, out / "transfer.png", header["metric"], lower, header.get("majority"))
    _write(out / "report.md", table + f"\n![{header['metric']} vs label fraction](transfer.png)\n")
    print("\n" + table, flush=True)
    print(f"wrote {out / 'report.md'}, {out / 'report.json'}, {out / 'transfer.png'} "
          f"({header['seconds'] / 60:.1f} min)", flush=True)


def classical_about(images: bool, task: str | None) -> str:
    """What the classical arm is, for the report's header ("" when there is none here: the table says so)."""
    if task is not None:  # molecule graphs
        try:
            import rdkit  # noqa: F401
        except ImportError:
            print("no classical arm: Morgan fingerprints need RDKit; `pip install rdkit` adds it", flush=True)
            return ""
        model = ("ridge regression per target, alpha" if task == "regression" else
                 "logistic regression per task, C")
        return (f"Morgan count fingerprints (radius 2, 2048 slots) of each molecule's SMILES + {model} chosen on the "
                "held-out slice")
    if images:
        return "logistic regression on the pixels (pooled to 16 x 16, standardized), C chosen on the held-out slice"
    return ("TF-IDF of word 1-2-grams and in-word character 2-4-grams (sublinear tf, L2-normed) + logistic "
            "regression, C chosen on the held-out slice, on the text the neural arms see")


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
