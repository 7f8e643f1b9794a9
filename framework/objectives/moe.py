"""Balancing losses of Mixture-of-Experts routers. Pure functions of tensors.

Both take per-expert sums rather than per-token tensors, so that the statistics of the tokens a rank does not hold
can be added in (framework.tasks.causal_lm gathers the counts over the data-parallel ranks) without moving tokens.
"""

from __future__ import annotations

import torch


def switch_aux_loss(prob_sum: torch.Tensor, tokens: int | torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Switch Transformer's load-balancing loss (Fedus et al. 2021, eq. 4): E * sum_e f_e * P_e.

    prob_sum (E,): the sum over this rank's tokens of the router's probability for each expert (differentiable);
    tokens: how many tokens that sum is over; counts (E,): how many (token, choice) assignments each expert got,
    over the whole balancing group (no gradient: the fraction f is a count). f_e = counts_e / sum(counts) (with top-k
    each token counts k times, so f sums to 1), P_e = prob_sum_e / tokens.
    1.0 when routing is uniform (f = P = 1/E), up to E when every token goes to one expert with certainty.
    Since it is linear in P with f fixed, the mean of it over ranks that share the same f (same global counts) is the
    loss of their tokens together: data-parallel averaging gives the global batch's loss and gradient."""
    if prob_sum.dim() != 1 or counts.shape != prob_sum.shape:
        raise ValueError(f"switch_aux_loss expects prob_sum (E,) and counts (E,), got {tuple(prob_sum.shape)} and "
                         f"{tuple(counts.shape)}")
    E = prob_sum.numel()
    f = counts.float() / counts.float().sum().clamp(min=1)  # (E,)
    P = prob_sum.float() / max(float(tokens), 1.0)  # (E,)
    return E * (f.detach() * P).sum()


def router_z_loss(z_sum: torch.Tensor, tokens: int | torch.Tensor) -> torch.Tensor:
    """ST-MoE's router z-loss (Zoph et al. 2022, eq. 5): the mean over tokens of logsumexp(router logits)^2, given
    its sum over `tokens` tokens. Keeps the logits small, where float rounding does not flip the choice."""
    return z_sum.float() / max(float(tokens), 1.0)


def load_imbalance(counts: torch.Tensor) -> torch.Tensor:
    """max / mean of the assignments per expert (E,): 1.0 is perfectly balanced, E is everything on one expert."""
    counts = counts.float()
    return counts.max() / counts.mean().clamp(min=1e-9)
