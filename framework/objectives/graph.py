"""Losses and metrics of molecule-graph tasks, pure functions of tensors.

- attribute masking (Hu et al. 2020): cross-entropy of the masked atoms' types and of the types of the bonds that
  touch them;
- property prediction: multi-task binary cross-entropy with missing labels (NaN: left out, as in Tox21), the MSE of
  standardized regression targets, and ROC-AUC per task.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def attribute_masking_loss(atom_logits: torch.Tensor, atom_targets: torch.Tensor, bond_logits: torch.Tensor,
                           bond_targets: torch.Tensor, bond_weight: float = 1.0) -> dict[str, torch.Tensor]:
    """atom_logits (M, A), atom_targets (M,), bond_logits (K, C), bond_targets (K,) -> {"loss": atom CE + bond_weight
    * bond CE (each a mean; a batch without masked bonds adds 0), "atom_loss", "bond_loss", "atom_accuracy",
    "bond_accuracy"}."""
    atom = F.cross_entropy(atom_logits.float(), atom_targets)
    bond = (F.cross_entropy(bond_logits.float(), bond_targets) if bond_targets.numel()
            else bond_logits.sum() * 0.0)  # keeps the head in the graph (DDP expects every parameter to be used)
    with torch.no_grad():
        atom_acc = (atom_logits.argmax(-1) == atom_targets).float().mean()
        bond_acc = ((bond_logits.argmax(-1) == bond_targets).float().mean() if bond_targets.numel()
                    else torch.zeros((), device=atom.device))
    return {"loss": atom + bond_weight * bond, "atom_loss": atom, "bond_loss": bond, "atom_accuracy": atom_acc,
            "bond_accuracy": bond_acc}


def masked_bce(logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Multi-task binary cross-entropy over the labels present: logits (B, T), y (B, T) with NaN for missing ->
    (mean over present labels, their count). No label at all: (0 with a gradient path, 0)."""
    present = ~torch.isnan(y)
    count = present.sum()
    target = torch.where(present, y, torch.zeros_like(y))
    losses = F.binary_cross_entropy_with_logits(logits.float(), target.float(), reduction="none")
    return (losses * present).sum() / count.clamp(min=1), count


def masked_mse(pred: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean squared error over the targets present: pred (B, T), y (B, T) with NaN for missing -> (mean, count)."""
    present = ~torch.isnan(y)
    count = present.sum()
    diff = torch.where(present, pred.float() - torch.nan_to_num(y.float()), torch.zeros_like(pred, dtype=torch.float))
    return (diff ** 2).sum() / count.clamp(min=1), count


def masked_mae(pred: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    present = ~torch.isnan(y)
    count = present.sum()
    diff = torch.where(present, pred.float() - torch.nan_to_num(y.float()), torch.zeros_like(pred, dtype=torch.float))
    return diff.abs().sum() / count.clamp(min=1), count


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve of one task (ties count half: the Mann-Whitney U statistic); NaN when the labels
    hold one class only."""
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels).astype(bool)
    pos, neg = int(labels.sum()), int((~labels).sum())
    if pos == 0 or neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    # average ranks over ties (1-based)
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    ranks[order] = np.repeat(first + (counts + 1) / 2, counts)
    return float((ranks[labels].sum() - pos * (pos + 1) / 2) / (pos * neg))


def mean_roc_auc(scores: np.ndarray, y: np.ndarray) -> float:
    """The mean ROC-AUC over tasks (columns) that have both classes among their present (non-NaN) labels, as
    MoleculeNet reports it; NaN when none has."""
    aucs = []
    for t in range(y.shape[1]):
        present = ~np.isnan(y[:, t])
        auc = roc_auc(scores[present, t], y[present, t])
        if not np.isnan(auc):
            aucs.append(auc)
    return float(np.mean(aucs)) if aucs else float("nan")
