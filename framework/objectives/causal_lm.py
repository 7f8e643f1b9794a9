"""Causal language modelling: predict token t+1 from tokens <= t. Pure functions of tensors."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # PyTorch's cross_entropy default; HF uses the same for padding and masked-out prompt tokens


def shift(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A packed window (B, T+1) -> model inputs (B, T) and next-token targets (B, T)."""
    if tokens.dim() != 2 or tokens.size(1) < 2:
        raise ValueError(f"shift expects token ids of shape (batch, time+1) with time >= 1, got {tuple(tokens.shape)}")
    return tokens[:, :-1], tokens[:, 1:]


def causal_lm_loss(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Mean cross-entropy over positions whose target is not ignore_index: logits (B, T, V), targets (B, T) -> scalar.

    Computed in float32 whatever the logits dtype: a bf16 log-softmax over 50k classes loses ~2 digits of the loss.
    A batch with every target ignored gives 0 (with zero gradients), not the NaN that 0/0 would give.
    """
    if logits.dim() != 3 or logits.shape[:2] != targets.shape:
        raise ValueError(
            f"causal_lm_loss expects logits (B, T, V) and targets (B, T), got {tuple(logits.shape)} and "
            f"{tuple(targets.shape)}"
        )
    flat_logits = logits.float().reshape(-1, logits.size(-1))  # (B*T, V)
    flat_targets = targets.reshape(-1)  # (B*T,)
    total = F.cross_entropy(flat_logits, flat_targets, ignore_index=ignore_index, reduction="sum")
    count = (flat_targets != ignore_index).sum().clamp(min=1)
    return total / count
