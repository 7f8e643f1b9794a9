"""What a pre-trained text model's features carry for a labelled task, in seconds instead of a transfer report's
half hour: the frozen backbone's pooled features of every document, then the transfer report's classical logistic
regression on them (framework.classical: C chosen on a held-out slice of each label subset, the report's stratified
subsets and slices, standardized features), scored on the whole val split. The same backbone with its random init
is measured beside it, so the gain over random features is what pre-training put there.

    python benchmarks/feature_probe.py --pretrained runs/bert-text-cpu/checkpoints/last.ckpt \\
        --data data/cr-bpe4096 --pooling mean --fractions 0.1,1 --seeds 3

A probe ranks checkpoints and recipes cheaply (and tells whether a task's signal is in the features at all); it is
not the report's figure: fine-tuning also changes the features.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def features(pretrained: str, data: str, pooling: str, random_init: bool, seq_len: int) -> dict[str, tuple]:
    """{"train", "val"}: (features (n, C), labels (n,)) of every document of that split, by the frozen backbone."""
    import lightning as L

    from framework.data.documents import ClassificationDataModule
    from framework.tasks.classification import ClassificationTask

    dm = ClassificationDataModule(path=data, seq_len=seq_len, batch_size=64, num_workers=0)
    task = ClassificationTask(init_from=pretrained, mode="linear", pooling=pooling, lr=1e-3, random_init=random_init)
    task.print_init_report = False
    trainer = L.Trainer(accelerator="cpu", max_steps=1, limit_train_batches=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(task, datamodule=dm)  # builds the model and loads the pre-trained weights; trains nothing
    model = task.model.eval()
    out = {}
    for split in ("train", "val"):
        index = dm._indexes[split]
        rows, X = [index.read(i, seq_len - 2) for i in range(len(index))], []
        with torch.no_grad():
            for s in range(0, len(rows), 128):
                chunk = rows[s:s + 128]
                lengths = torch.tensor([len(r) for r in chunk])
                tokens = torch.full((len(chunk), int(lengths.max())), dm.special_ids["pad"], dtype=torch.long)
                for i, r in enumerate(chunk):
                    tokens[i, :len(r)] = torch.from_numpy(r.astype(np.int64))
                X.append(model.features(tokens, lengths).float())
        out[split] = (torch.cat(X), index.label.copy())
    return out


def probe(feats: dict[str, tuple], fractions: list[float], seeds: int, holdout: float, classes: int) -> dict:
    """{fraction: [val accuracy per seed]}: the report's subsets, held-out slices and classical regression."""
    from framework import classical
    from framework.data.samples import holdout_split, stratified_subset

    (X, y), (X_val, y_val) = feats["train"], feats["val"]
    scores: dict[float, list[float]] = {}
    for f in fractions:
        for seed in range(seeds):
            fit, held = holdout_split(y, stratified_subset(y, f, seed), holdout, seed)
            X_fit, X_held, X_v = classical.standardize(X[fit], X[held], X_val)
            model = classical.select_and_fit(X_fit, y[fit], X_held, y[held], classes)
            scores.setdefault(f, []).append(classical.accuracy(model, X_v, y_val))
    return scores


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pretrained", required=True, help="checkpoints or exports, comma-separated")
    p.add_argument("--data", required=True, help="labelled shards tokenized as the models were")
    p.add_argument("--pooling", default="mean", help="mean, cls (encoder) or last (GPT) (default mean)")
    p.add_argument("--fractions", default="0.1,1")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--holdout", type=float, default=0.2)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    import logging
    import warnings

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.simplefilter("ignore")
    fractions = [float(x) for x in a.fractions.split(",")]
    print(f"probe of {a.pooling}-pooled features on {a.data}: val accuracy, mean ± std over {a.seeds} seeds")
    print("| model | " + " | ".join(f"{f:g} of the labels" for f in fractions) + " |")
    print("|---|" + "---:|" * len(fractions))
    checkpoints = [c for c in a.pretrained.split(",") if c]
    for i, ckpt in enumerate(checkpoints):
        for random_init in ((True, False) if i == 0 else (False,)):
            started = time.perf_counter()
            feats = features(ckpt, a.data, a.pooling, random_init, a.seq_len)
            classes = int(max(feats["train"][1].max(), feats["val"][1].max())) + 1
            scores = probe(feats, fractions, a.seeds, a.holdout, classes)
            cells = [f"{100 * np.mean(s):.1f} ± {100 * np.std(s, ddof=1 if len(s) > 1 else 0):.1f}"
                     for s in scores.values()]
            name = f"{ckpt} (random init)" if random_init else ckpt
            print(f"| {name} | " + " | ".join(cells) + f" |   ({time.perf_counter() - started:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
