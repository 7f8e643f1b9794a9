"""Masked language modelling (BERT): hide some tokens, predict them from both sides. Pure functions of arrays/tensors.

`mask_tokens` chooses what to hide. Its randomness is a function of (seed, epoch, sample id) only, never of a global
RNG's consumption: a resumed run, a run on another world size or worker count, and every validation pass mask each
sample exactly as before.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from framework.objectives.causal_lm import IGNORE_INDEX

MASK_SALT = 0x6D6C6D  # keeps the masking streams apart from any other stream seeded with the same numbers


def mask_tokens(tokens: torch.Tensor, *, rate: float, mask_id: int, special_ids: Sequence[int], vocab_size: int,
                seed: int, epoch: int, sample_ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking of token ids (B, T) -> (inputs (B, T), labels (B, T)).

    In each row, round(rate * n) of its n maskable tokens (never a special token: cls, sep, eod, pad, mask) are
    chosen, at least one when n > 0. Of those, 80% become `mask_id`, 10% a random non-special token, 10% stay as they
    are (Devlin et al. 2019). labels hold the original id at the chosen positions and IGNORE_INDEX elsewhere. Row i's
    choices come from a generator seeded by (seed, epoch, sample_ids[i]) alone.
    """
    if not 0 < rate < 1:
        raise ValueError(f"mask rate {rate} must be in (0, 1)")
    if tokens.dim() != 2 or len(sample_ids) != tokens.size(0):
        raise ValueError(f"mask_tokens expects ids (B, T) and B sample ids, got {tuple(tokens.shape)} and "
                         f"{len(sample_ids)} ids")
    ids = tokens.numpy() if isinstance(tokens, torch.Tensor) else np.asarray(tokens)
    special = np.zeros(vocab_size, dtype=bool)
    special[list(special_ids)] = True
    ordinary = np.flatnonzero(~special)  # the ids a random replacement is drawn from
    inputs, labels = ids.copy(), np.full_like(ids, IGNORE_INDEX)
    for i, sample in enumerate(sample_ids):
        rng = np.random.default_rng([seed, epoch, int(sample), MASK_SALT])
        candidates = np.flatnonzero(~special[ids[i]])
        if len(candidates) == 0:
            continue
        chosen = rng.choice(candidates, size=max(1, round(rate * len(candidates))), replace=False)
        labels[i, chosen] = ids[i, chosen]
        action = rng.random(len(chosen))
        inputs[i, chosen[action < 0.8]] = mask_id
        randomized = chosen[(action >= 0.8) & (action < 0.9)]
        inputs[i, randomized] = ordinary[rng.integers(0, len(ordinary), size=len(randomized))]
    return torch.from_numpy(inputs), torch.from_numpy(labels)


def masked_lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the scored positions: logits (M, V), targets (M,) -> scalar, in float32 whatever the
    logits dtype. No scored position gives 0 with zero gradients, not the NaN of an empty mean."""
    if logits.dim() != 2 or logits.size(0) != targets.numel():
        raise ValueError(f"masked_lm_loss expects logits (M, V) and targets (M,), got {tuple(logits.shape)} and "
                         f"{tuple(targets.shape)}")
    if targets.numel() == 0:
        return logits.float().sum() * 0.0
    return F.cross_entropy(logits.float(), targets)


def masked_accuracy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Fraction of scored positions whose most likely token is the original one (0 when none is scored)."""
    if targets.numel() == 0:
        return torch.zeros((), device=logits.device)
    return (logits.argmax(dim=-1) == targets).float().mean()
