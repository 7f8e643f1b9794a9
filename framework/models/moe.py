"""Mixture-of-Experts MLP for the transformer blocks: a router picks top_k of num_experts small MLPs per token.

Token-choice top-k routing (Switch Transformer, Fedus et al. 2021; Mixtral), router scores in float32 whatever the
compute dtype. The expert computation is grouped by expert: the (token, choice) pairs are sorted by expert so that each
expert runs one matmul over its contiguous rows (`torch._grouped_mm` does all of them in one kernel where the device
has it: CUDA, bf16, compute capability 9+). Dropless by default; with `capacity_factor` each expert takes at most
ceil(capacity_factor * tokens * top_k / num_experts) pairs and the rest are dropped (their output is zero, the
residual carries the token on).

Balancing is not computed here: each layer keeps the statistics of its last forward in `last_stats` (per-expert
probability sums and assignment counts, the router z term), and the task turns them into losses
(framework.objectives.moe) after gathering the counts over the data-parallel ranks. With `balance: bias`
(DeepSeek-V3's auxiliary-loss-free method), a per-expert bias (a buffer, saved in checkpoints) is added to the scores
for the choice of experts only; `update_bias` moves it once per optimizer step.

Expert parallelism (framework.distributed.expert_parallel) keeps `num_experts / ep_size` experts on each rank of an
expert-parallel group and sends each (token, choice) pair to the rank that holds its expert with all_to_all_single.
Parameter names and full shapes do not depend on it: checkpoints hold the full (num_experts, ...) tensors.

Shapes in comments: N tokens (B*T), C n_embd, E num_experts, El experts on this rank, k top_k, H expert hidden size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from framework.errors import UserError


class MoEConfigError(UserError, ValueError):
    """A bad `moe` config value (one line at the CLI, a ValueError for library callers)."""


@dataclass(frozen=True)
class MoEConfig:
    num_experts: int = 8
    top_k: int = 2
    every_n_layers: int = 1  # every n-th block (the n-th, 2n-th, ...) has an MoE MLP; the others stay dense
    shared_experts: int = 0  # experts every token goes through (DeepSeekMoE), as one dense MLP of that many experts
    # hidden size of one expert; None: 4 * n_embd / top_k, so a token's active MLP matches the dense block's 4 * n_embd
    expert_hidden: int | None = None
    router: str = "softmax"  # softmax over experts (Switch, Mixtral, OLMoE) or per-expert sigmoid (DeepSeek-V3)
    balance: str = "aux_loss"  # "aux_loss": Switch loss; "bias": DeepSeek-V3's bias on the choice, no loss
    aux_loss_coeff: float = 0.01  # Switch: 1e-2
    z_loss_coeff: float = 0.001  # ST-MoE: 1e-3
    capacity_factor: float | None = None  # None: dropless
    bias_update_rate: float = 0.001  # DeepSeek-V3's gamma: bias step per optimizer step, per unit of sign(load error)

    def __post_init__(self) -> None:
        for name in ("num_experts", "top_k", "every_n_layers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise MoEConfigError(f"moe.{name}={value!r} must be a positive integer")
        if self.top_k > self.num_experts:
            raise MoEConfigError(f"moe.top_k={self.top_k} is more than moe.num_experts={self.num_experts}: each token "
                                 f"picks top_k distinct experts; use top_k <= {self.num_experts}")
        if isinstance(self.shared_experts, bool) or not isinstance(self.shared_experts, int) or self.shared_experts < 0:
            raise MoEConfigError(f"moe.shared_experts={self.shared_experts!r} must be an integer >= 0")
        if self.expert_hidden is not None and (not isinstance(self.expert_hidden, int) or self.expert_hidden < 1):
            raise MoEConfigError(f"moe.expert_hidden={self.expert_hidden!r} must be a positive integer or null")
        if self.router not in ("softmax", "sigmoid"):
            raise MoEConfigError(f"moe.router={self.router!r} is not one of 'softmax', 'sigmoid'")
        if self.balance not in ("aux_loss", "bias"):
            raise MoEConfigError(f"moe.balance={self.balance!r} is not one of 'aux_loss', 'bias'")
        for name in ("aux_loss_coeff", "z_loss_coeff", "bias_update_rate"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise MoEConfigError(f"moe.{name}={value!r} must be a number >= 0")
        if self.capacity_factor is not None and (isinstance(self.capacity_factor, bool) or
                                                 not isinstance(self.capacity_factor, (int, float))
                                                 or self.capacity_factor <= 0):
            raise MoEConfigError(f"moe.capacity_factor={self.capacity_factor!r} must be a number > 0, or null for "
                                 "dropless routing")

    @classmethod
    def from_value(cls, value: Any) -> "MoEConfig | None":
        """A config field's value (None, a dict from YAML/JSON, or an MoEConfig) -> MoEConfig or None."""
        if value is None or isinstance(value, MoEConfig):
            return value
        if not isinstance(value, dict):
            raise MoEConfigError(f"moe must be a mapping like {{num_experts: 8, top_k: 2}} or null, got {value!r}")
        fields = cls.__dataclass_fields__
        unknown = [k for k in value if k not in fields]
        if unknown:
            raise MoEConfigError(f"unknown moe field {unknown[0]!r}; fields: {', '.join(fields)}")
        return cls(**value)

    def hidden(self, n_embd: int) -> int:
        return self.expert_hidden or max(1, 4 * n_embd // self.top_k)

    def is_moe_layer(self, layer: int) -> bool:
        """Whether block `layer` (0-based) has an MoE MLP: blocks n-1, 2n-1, ... (all of them for n = 1)."""
        return (layer + 1) % self.every_n_layers == 0


def grouped_mm_available(x: torch.Tensor) -> bool:
    """torch._grouped_mm runs on CUDA with bf16 inputs on compute capability 9.0+ (Hopper); elsewhere: a loop."""
    return (hasattr(torch, "_grouped_mm") and x.is_cuda and x.dtype == torch.bfloat16
            and torch.cuda.get_device_capability(x.device)[0] >= 9)


def expert_matmul(x: torch.Tensor, weight: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Rows of x (M, in), sorted by expert, `counts[e]` of them for expert e, times that expert's weight (El, in, out)
    -> (M, out). One matmul per expert (an expert with no rows still runs, on zero rows, so its weight always has a
    gradient: DDP and ZeRO never see an unused parameter)."""
    if grouped_mm_available(x) and x.size(0) > 0:
        offsets = torch.tensor(counts, device=x.device, dtype=torch.int32).cumsum(0, dtype=torch.int32)
        return torch._grouped_mm(x, weight.to(x.dtype), offs=offsets)
    return torch.cat([chunk @ w for chunk, w in zip(x.split(counts), weight.to(x.dtype).unbind(0))], dim=0)


class Router(nn.Module):
    """The gate's (E, C) matrix, applied in float32 with autocast off: a bf16 score rounds close experts together and
    the choice flips between ranks and runs. A module of its own so that ZeRO-3 gathers its weight for its forward."""

    def __init__(self, n_embd: int, num_experts: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, n_embd))  # (E, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x.float(), self.weight.float())  # (N, E) float32


class Experts(nn.Module):
    """num_experts GELU MLPs C -> H -> C stored as two stacked tensors, so one expert is a slice (and expert
    parallelism keeps a contiguous block of them). Biases are left out, as in Mixtral, OLMoE and DeepSeek."""

    def __init__(self, num_experts: int, n_embd: int, hidden: int) -> None:
        super().__init__()
        self.num_experts = num_experts  # in the whole model; `w_fc.size(0)` of them live here
        self.w_fc = nn.Parameter(torch.empty(num_experts, n_embd, hidden))  # (E, C, H)
        self.w_proj = nn.Parameter(torch.empty(num_experts, hidden, n_embd))  # (E, H, C)

    def forward(self, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """x (M, C), sorted by local expert, counts (El,) -> (M, C)."""
        return expert_matmul(F.gelu(expert_matmul(x, self.w_fc, counts), approximate="tanh"), self.w_proj, counts)


def dispatch_combine(rows: torch.Tensor, counts: torch.Tensor, experts: Experts, group: Any, ep_size: int
                     ) -> torch.Tensor:
    """Expert parallelism: send each row (M, C), sorted by global expert with counts (E,), to the rank of the group
    that holds its expert, run the local experts, send the outputs back -> (M, C) in the rows' order. Both
    all_to_all_single calls are differentiable (their backward is the reverse exchange), so the gradient of each
    expert collects the contributions of every rank's tokens."""
    import torch.distributed as dist
    from torch.distributed._functional_collectives import all_to_all_single_autograd, wait_tensor

    R = ep_size
    El = counts.numel() // R
    recv_counts = torch.empty_like(counts)  # (E,) as (R, El): what each source rank sends to each of my experts
    dist.all_to_all_single(recv_counts, counts, group=group)  # equal splits: El counts per rank
    send_splits = counts.view(R, El).sum(1).tolist()
    recv_counts = recv_counts.view(R, El)
    recv_splits = recv_counts.sum(1).tolist()
    received = wait_tensor(all_to_all_single_autograd(rows, recv_splits, send_splits, group)
                           )  # (M', C): by source rank, then by local expert
    local = torch.arange(El, device=rows.device).repeat(R).repeat_interleave(recv_counts.flatten())  # (M',)
    perm = local.argsort(stable=True)  # group the received rows by local expert
    out = experts(received[perm], recv_counts.sum(0).tolist())[perm.argsort()]  # (M', C) back in received order
    return wait_tensor(all_to_all_single_autograd(out, send_splits, recv_splits, group))  # (M, C)


class MoE(nn.Module):
    """The MoE MLP of one block: (B, T, C) -> (B, T, C), with `last_stats` of the routing it just did."""

    def __init__(self, n_embd: int, config: MoEConfig, dropout: float = 0.0) -> None:
        super().__init__()
        self.config = config
        E = config.num_experts
        self.router = Router(n_embd, E)
        self.experts = Experts(E, n_embd, config.hidden(n_embd))
        # DeepSeek-V3's per-expert bias on the choice, saved with the weights (balance "bias" only: no dead state)
        self.register_buffer("expert_bias", torch.zeros(E) if config.balance == "bias" else None)
        # every token's shared experts, fused into one wider MLP (DeepSeekMoE): held whole on every rank
        self.shared = Experts(1, n_embd, config.shared_experts * config.hidden(n_embd)) if config.shared_experts else None
        self.dropout = nn.Dropout(dropout)
        self.ep_group: Any = None  # set by framework.distributed.expert_parallel: this rank's expert-parallel group
        self.ep_size = 1
        self.last_stats: dict[str, torch.Tensor] = {}

    # ---------------------------------------------------------------- routing
    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """x (N, C) -> (expert ids (N, k), gates (N, k) float32, stats). Scores in float32: a bf16 softmax over
        experts rounds close scores together and the choice flips between ranks and runs."""
        cfg = self.config
        logits = self.router(x)  # (N, E) float32
        if cfg.router == "softmax":
            scores = logits.softmax(dim=-1)  # (N, E)
            probs = scores
        else:
            scores = torch.sigmoid(logits)  # (N, E), each in (0, 1)
            probs = scores / scores.sum(dim=-1, keepdim=True)  # what the balance loss sees: a distribution over experts
        choice = scores + self.expert_bias if cfg.balance == "bias" else scores  # the bias steers the choice only
        ids = choice.detach().topk(cfg.top_k, dim=-1).indices  # (N, k)
        gates = scores.gather(1, ids)  # (N, k)
        if cfg.top_k > 1:  # Mixtral / DeepSeek-V3: the chosen weights sum to 1 (with k=1 that would be 1: no gradient)
            gates = gates / gates.sum(dim=-1, keepdim=True)
        counts = torch.bincount(ids.flatten(), minlength=cfg.num_experts)  # (E,) assignments, before any drop
        stats = {"prob_sum": probs.sum(0), "counts": counts,
                 "z_sum": torch.logsumexp(logits, dim=-1).square().sum(), "tokens": torch.tensor(x.size(0))}
        return ids, gates, stats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        flat = x.reshape(B * T, C)  # (N, C)
        ids, gates, stats = self.route(flat)
        k, E = self.config.top_k, self.config.num_experts
        order = ids.flatten().argsort(stable=True)  # (N*k,) pairs sorted by expert, each expert's in token order
        counts = stats["counts"]
        keep = None
        if self.config.capacity_factor is not None:
            capacity = math.ceil(self.config.capacity_factor * B * T * k / E)
            first = torch.cumsum(counts, 0) - counts  # (E,) where each expert's rows start in the sorted order
            sorted_ids = ids.flatten()[order]
            rank_in_expert = torch.arange(order.numel(), device=x.device) - first[sorted_ids]
            keep = rank_in_expert < capacity  # (N*k,) in sorted order
            order = order[keep]  # the later pairs of a full expert are dropped
            counts = counts.clamp(max=capacity)
        stats["dropped"] = (stats["counts"].sum() - counts.sum()).detach()
        rows = flat[order // k]  # (M, C): each kept pair's token, grouped by expert
        out_rows = self._experts(rows, counts)  # (M, C)
        weighted = out_rows * gates.flatten()[order].unsqueeze(1).to(out_rows.dtype)  # (M, C)
        y = torch.zeros_like(flat).index_add(0, order // k, weighted)  # (N, C): sum of each token's chosen experts
        if self.shared is not None:
            y = y + self.shared(flat, [flat.size(0)])
        self.last_stats = stats
        return self.dropout(y.view(B, T, C))

    def _experts(self, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Rows sorted by (global) expert, counts (E,) -> their experts' outputs, here or through the expert-parallel
        group."""
        if self.ep_size == 1:
            return self.experts(rows, counts.tolist())
        return dispatch_combine(rows, counts, self.experts, self.ep_group, self.ep_size)

    @torch.no_grad()
    def update_bias(self, counts: torch.Tensor) -> None:
        """DeepSeek-V3: after an optimizer step, raise the bias of experts that got fewer than the mean share of the
        step's assignments (counts (E,), over the whole global batch) and lower it for those that got more."""
        counts = counts.float()
        self.expert_bias += self.config.bias_update_rate * torch.sign(counts.mean() - counts)
