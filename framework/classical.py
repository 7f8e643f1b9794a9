"""Classical baselines: what a model with no pre-training and no deep network reaches on the same labelled subset, so
a transfer report says whether a neural model is worth it at each label fraction.

- text: bags of word n-grams (unigrams and bigrams) and of character n-grams inside words (2 to 4 characters of the
  word padded with a space each side, so prefixes and suffixes count: a stem seen in another form, a misspelling, a
  word of a byte-level task), each the `max_features` most frequent in the documents trained on, TF-IDF weighted
  (sublinear term frequency 1 + log tf, smoothed idf log((1 + n) / (1 + df)) + 1, each bag's rows L2-normed), side by
  side, then a multinomial logistic regression;
- images: a logistic regression on the pixels, average-pooled to `side` x `side` and standardized per feature;
- molecule graphs: Morgan count fingerprints (ECFP4 counts: how often each atom environment of radius <= 2 occurs,
  hashed to 2,048 slots; Rogers & Hahn 2010, the classical baseline of MoleculeNet) of each molecule's SMILES, then
  one linear model per target, fitted on the molecules where that target is present: ridge regression (the bias
  unpenalized) for regression, a logistic regression for classification.

The logistic regression is full-batch L-BFGS on mean cross-entropy + ||W||^2 / (2 C n) (the bias is not penalized),
which is the objective of the usual C-parameterized implementations; C (ridge: alpha) is chosen from a grid on a
held-out slice of the train subset (never the val split), and the model fitted with that value is the one scored.
All in numpy and torch: text features are a torch sparse matrix (n, V), so 10k documents x 50k n-grams stay small.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F

C_GRID = (0.1, 1.0, 10.0, 100.0)
ALPHA_GRID = (0.1, 1.0, 10.0, 100.0)  # ridge's penalty on fingerprints
WORD = re.compile(r"\w+")


class NgramTfidf:
    """N-gram TF-IDF of one kind ("word": n words; "char": n characters inside a word padded with spaces): `fit` on
    the documents trained on (vocabulary and document frequencies), `transform` any documents into a (n, V) sparse
    COO float32 matrix with L2-normed rows (an empty document is a zero row)."""

    def __init__(self, kind: str = "word", ngrams: tuple[int, int] = (1, 2), max_features: int = 50_000):
        if kind not in ("word", "char"):
            raise ValueError(f"kind must be word or char, got {kind!r}")
        self.kind, self.ngrams, self.max_features = kind, ngrams, max_features
        self.vocab: dict[str, int] = {}
        self.idf = np.zeros(0, np.float32)

    def grams(self, text: str) -> list[str]:
        words = WORD.findall(text.lower())
        lo, hi = self.ngrams
        if self.kind == "word":
            return [" ".join(words[i:i + n]) for n in range(lo, hi + 1) for i in range(len(words) - n + 1)]
        padded = [f" {w} " for w in words]
        return [w[i:i + n] for w in padded for n in range(lo, hi + 1) for i in range(len(w) - n + 1)]

    def fit(self, texts: Iterable[str]) -> NgramTfidf:
        df: Counter[str] = Counter()
        n = 0
        for text in texts:
            df.update(set(self.grams(text)))
            n += 1
        # the most frequent n-grams, ties broken by the n-gram itself so the vocabulary does not depend on hash order
        kept = sorted(df.items(), key=lambda kv: (-kv[1], kv[0]))[:self.max_features]
        self.vocab = {g: i for i, (g, _) in enumerate(kept)}
        counts = np.array([c for _, c in kept], np.float64)
        self.idf = (np.log((1 + n) / (1 + counts)) + 1).astype(np.float32)
        return self

    def transform(self, texts: Iterable[str]) -> torch.Tensor:
        crow, cols, vals = [0], [], []
        for text in texts:
            tf = Counter(self.vocab[g] for g in self.grams(text) if g in self.vocab)
            ids = np.fromiter(tf.keys(), np.int64, len(tf))
            order = np.argsort(ids)  # coalesced: sorted columns within a row
            ids, n = ids[order], np.fromiter(tf.values(), np.float64, len(tf))[order]
            w = (1 + np.log(n)) * self.idf[ids]
            norm = math.sqrt(float((w ** 2).sum())) or 1.0
            cols.append(ids)
            vals.append((w / norm).astype(np.float32))
            crow.append(crow[-1] + len(ids))
        col = np.concatenate(cols) if cols else np.zeros(0, np.int64)
        val = np.concatenate(vals) if vals else np.zeros(0, np.float32)
        rows = np.repeat(np.arange(len(crow) - 1), np.diff(crow))
        return torch.sparse_coo_tensor(torch.from_numpy(np.stack([rows, col])), torch.from_numpy(val),
                                       (len(crow) - 1, len(self.vocab)), is_coalesced=True,
                                       check_invariants=True)


def text_features(fit: list[str], *others: list[str]) -> list[torch.Tensor]:
    """Word 1-2-gram and in-word character 2-4-gram TF-IDF side by side (each block L2-normed), fitted on `fit`:
    the (n, V) sparse matrices of `fit` and of each of `others`."""
    bags = [NgramTfidf("word", (1, 2)).fit(fit), NgramTfidf("char", (2, 4)).fit(fit)]
    return [torch.cat([bag.transform(texts) for bag in bags], dim=1) for texts in (fit, *others)]


def pixel_features(images: torch.Tensor, side: int = 16) -> torch.Tensor:
    """(n, 3, S, S) images -> (n, 3 * side * side): average-pooled to side x side (no finer than the image)."""
    side = min(side, images.shape[-1])
    return F.adaptive_avg_pool2d(images.float(), side).flatten(1)


def standardize(train: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    """Every matrix scaled by the train rows' per-column mean and std (std 0 -> 1)."""
    mean, std = train.mean(0), train.std(0, unbiased=False)
    std = torch.where(std > 0, std, torch.ones_like(std))
    return [(x - mean) / std for x in (train, *others)]


@dataclass
class Logistic:
    """A multinomial logistic regression: logits = X W + b."""

    W: torch.Tensor  # (V, K)
    b: torch.Tensor  # (K,)
    C: float

    def logits(self, X: torch.Tensor) -> torch.Tensor:
        return X @ self.W + self.b  # (n, K); X dense or sparse

    def predict(self, X: torch.Tensor) -> np.ndarray:
        return self.logits(X).argmax(-1).numpy()


def fit_logistic(X: torch.Tensor, y: np.ndarray, classes: int, C: float, iterations: int = 200) -> Logistic:
    """Full-batch L-BFGS on mean cross-entropy + ||W||^2 / (2 C n); X (n, V) dense or sparse, y (n,) ints."""
    n, V = X.shape
    W = torch.zeros(V, classes, requires_grad=True)
    b = torch.zeros(classes, requires_grad=True)
    target = torch.as_tensor(y, dtype=torch.long)
    opt = torch.optim.LBFGS([W, b], lr=1, max_iter=iterations, tolerance_grad=1e-6, tolerance_change=1e-9,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(X @ W + b, target) + (W ** 2).sum() / (2 * C * n)
        loss.backward()
        return loss

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # thousands of small vector ops: on a busy machine, extra threads only wait on each other
    try:
        with torch.enable_grad():
            opt.step(closure)
    finally:
        torch.set_num_threads(threads)
    return Logistic(W.detach(), b.detach(), C)


def accuracy(model: Logistic, X: torch.Tensor, y: np.ndarray) -> float:
    return float((model.predict(X) == y).mean()) if len(y) else math.nan


def select_and_fit(X_fit: torch.Tensor, y_fit: np.ndarray, X_held: torch.Tensor, y_held: np.ndarray, classes: int,
                   grid: Iterable[float] = C_GRID) -> Logistic:
    """The logistic regression fitted on (X_fit, y_fit) with the C of `grid` that scores best on the held-out slice
    (accuracy, then cross-entropy); C = 1 when nothing is held out."""
    if not len(y_held):
        return fit_logistic(X_fit, y_fit, classes, 1.0)
    best, best_key = None, None
    target = torch.as_tensor(y_held, dtype=torch.long)
    for C in grid:
        model = fit_logistic(X_fit, y_fit, classes, C)
        key = (accuracy(model, X_held, y_held), -float(F.cross_entropy(model.logits(X_held), target)))
        if best_key is None or key > best_key:
            best, best_key = model, key
    assert best is not None
    return best


def fingerprints(smiles: list[str], radius: int = 2, bits: int = 2048) -> torch.Tensor:
    """Morgan count fingerprints of SMILES strings as (n, bits) float32 rows; a SMILES RDKit cannot read is a zero
    row. Counts, not bits: an additive property (TPSA, logP) grows with how often a group occurs (on RDKit's NCI
    molecules, ridge on counts predicts TPSA with a third of the error it makes on bits). Needs RDKit (the
    framework's `graphs` extra)."""
    from rdkit import Chem, RDLogger
    from rdkit.Chem import rdFingerprintGenerator

    RDLogger.DisableLog("rdApp.*")
    make = rdFingerprintGenerator.GetMorganGenerator(radius=radius, fpSize=bits)
    out = np.zeros((len(smiles), bits), np.float32)
    for i, text in enumerate(smiles):
        mol = Chem.MolFromSmiles(text) if text else None
        if mol is not None:
            out[i] = make.GetCountFingerprintAsNumPy(mol)
    return torch.from_numpy(out)


@dataclass
class PerTarget:
    """One linear model per target: scores X W + b, (n, T): the predictions (regression) or each task's log-odds of
    its positive class (classification). `strength`: ridge's alpha or the logistic regression's C."""

    W: torch.Tensor  # (V, T)
    b: torch.Tensor  # (T,)
    strength: float

    def scores(self, X: torch.Tensor) -> torch.Tensor:
        return X @ self.W + self.b


def fit_per_target(X: torch.Tensor, Y: np.ndarray, task: str, strength: float) -> PerTarget:
    """Each target's model fitted on the rows where it is present (Y: (n, T), NaN = missing): ridge regression with
    penalty `strength` * ||w||^2 on centred data (so the bias is the target's mean, unpenalized), solved in the
    dual when there are fewer rows than features; or a binary logistic regression with C = `strength`."""
    V, T = X.shape[1], Y.shape[1]
    W, b = torch.zeros(V, T), torch.zeros(T)
    for t in range(T):
        present = torch.from_numpy(~np.isnan(Y[:, t]))
        if not present.any():
            continue
        x, y = X[present].double(), torch.from_numpy(Y[present.numpy(), t]).double()
        if task == "classification":
            if len(torch.unique(y)) < 2:  # one class: its log-odds, no slope
                b[t] = 20.0 if bool(y[0]) else -20.0
                continue
            model = fit_logistic(x.float(), y.long().numpy(), 2, strength)
            W[:, t], b[t] = model.W[:, 1] - model.W[:, 0], model.b[1] - model.b[0]
            continue
        mx, my = x.mean(0), y.mean()
        xc, yc = x - mx, y - my
        if len(y) < V:
            w = xc.T @ torch.linalg.solve(xc @ xc.T + strength * torch.eye(len(y), dtype=x.dtype), yc)
        else:
            w = torch.linalg.solve(xc.T @ xc + strength * torch.eye(V, dtype=x.dtype), xc.T @ yc)
        W[:, t], b[t] = w.float(), float(my - mx @ w)
    return PerTarget(W, b, strength)


def target_score(model: PerTarget, X: torch.Tensor, Y: np.ndarray, task: str) -> float:
    """What a graph property task is scored by: regression, the RMSE over every present (molecule, target) value;
    classification, the mean ROC-AUC over tasks with both classes present (NaN when none has)."""
    from framework.objectives.graph import mean_roc_auc

    scores = model.scores(X).numpy().astype(np.float64)
    if task == "classification":
        return mean_roc_auc(scores, Y)
    present = ~np.isnan(Y)
    return float(np.sqrt(np.mean((scores[present] - Y[present]) ** 2))) if present.any() else math.nan


def select_per_target(X_fit: torch.Tensor, Y_fit: np.ndarray, X_held: torch.Tensor, Y_held: np.ndarray,
                      task: str) -> PerTarget:
    """The per-target models fitted on (X_fit, Y_fit) with the alpha (ridge) or C (logistic) of its grid that scores
    best on the held-out slice (lowest RMSE, highest mean ROC-AUC); 1.0 when nothing is held out or the slice
    cannot score (no target present, or no task with both classes)."""
    if not len(Y_held):
        return fit_per_target(X_fit, Y_fit, task, 1.0)
    fitted = {s: fit_per_target(X_fit, Y_fit, task, s) for s in (C_GRID if task == "classification" else ALPHA_GRID)}
    scores = {s: target_score(m, X_held, Y_held, task) for s, m in fitted.items()}
    if any(math.isnan(v) for v in scores.values()):
        return fitted.get(1.0) or fit_per_target(X_fit, Y_fit, task, 1.0)
    sign = 1 if task == "classification" else -1
    return fitted[max(scores, key=lambda s: sign * scores[s])]


__all__ = ["ALPHA_GRID", "C_GRID", "Logistic", "NgramTfidf", "PerTarget", "accuracy", "fingerprints",
           "fit_logistic", "fit_per_target", "pixel_features", "select_and_fit", "select_per_target", "standardize",
           "target_score", "text_features"]
