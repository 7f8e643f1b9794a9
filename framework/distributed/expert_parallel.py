"""Expert parallelism: the experts of each MoE layer split over groups of `expert_parallel` data-parallel ranks.

With world size W and expert-parallel size R (R divides W and num_experts), ranks [0..R-1], [R..2R-1], ... each form
an expert-parallel group; rank r of a group holds experts [r*E/R, (r+1)*E/R) of every MoE layer, and the layer sends
each (token, choice) pair to the rank holding its expert (framework.models.moe.dispatch_combine, all_to_all_single).
Ranks with the same position in different groups hold the same experts: an expert's replica group.

Gradients. The dense parameters stay under DDP (averaged over all W ranks). The expert parameters are kept out of
DDP's reducer (an all-reduce over all ranks would add up different experts, and averaging over W a gradient that
the all_to_all backward already summed over the group counts it wrongly: the doubled-gradient bug). Each rank's loss
is the mean over its own tokens, and the backward exchange sums into an expert's gradient the contributions of
every rank of its group, so `sync_expert_grads` adds those of the replica groups and divides by W: the gradient of
the mean of all W ranks' losses, as DDP gives the dense parameters. Gradient clipping adds the experts' squared
norms over the group (`clip_grad_norm`), so every rank clips with the same global norm.

Checkpoints hold each expert once, at full shape: `gather_experts` (on save, a collective) puts the full
(num_experts, ...) tensors and their optimizer states in the checkpoint; `slice_experts` (on load) keeps this rank's
block, so a checkpoint resumes on any expert-parallel size, and init_from/export read it as a dense-layout model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.distributed as dist
from torch import nn

from framework.errors import UserError
from framework.models.moe import MoE

EP_ATTR = "_expert_parallel"  # set on each expert parameter that lives split over ranks


@dataclass
class ExpertShard:
    """Where an expert parameter's rows live: this rank holds [start, start + local) of `total` experts."""

    group: Any  # the expert-parallel group (all_to_all, gathers for checkpoints, the experts' norm)
    replicas: Any  # the ranks holding the same experts (None when there is one group)
    start: int
    local: int
    total: int
    size: int  # ranks in the group


def expert_parallel_size(strategy: Any) -> int:
    return int(getattr(strategy, "expert_parallel", 1) or 1)


def check_expert_parallel(size: int, world: int, num_experts: int | None) -> None:
    """One line for each layout that cannot split the experts."""
    if num_experts is None:
        raise UserError(f"distributed.expert_parallel={size} but the model has no MoE layers: set "
                        "model.config.moe (e.g. preset gpt-moe-cpu) or drop distributed.expert_parallel")
    if world % size:
        raise UserError(f"distributed.expert_parallel={size} does not divide the world size {world}: use a divisor "
                        f"of {world} (or run on a multiple of {size} processes)")
    if num_experts % size:
        raise UserError(f"distributed.expert_parallel={size} does not divide moe.num_experts={num_experts}: use a "
                        f"divisor of {num_experts}")


def apply_expert_parallel(task: nn.Module, model: nn.Module, strategy: Any) -> None:
    """Keep this rank's experts of every MoE layer of `model` (a submodule of `task`, the module DDP wraps) and
    keep them out of DDP's all-reduce. Call once, after the full weights are in place (init_from included), on every
    rank. Nothing to do for expert_parallel 1."""
    size = expert_parallel_size(strategy)
    layers = [m for m in model.modules() if isinstance(m, MoE)]
    if size == 1 or (layers and layers[0].ep_size == size):
        return
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    check_expert_parallel(size, world, layers[0].config.num_experts if layers else None)
    rank = dist.get_rank()
    groups = [dist.new_group(list(range(g * size, (g + 1) * size))) for g in range(world // size)]  # every rank
    replicas = [dist.new_group(list(range(r, world, size))) for r in range(size)] if world > size else None
    group, replica = groups[rank // size], (replicas[rank % size] if replicas else None)
    for layer in layers:
        E = layer.config.num_experts
        local = E // size
        start = (rank % size) * local
        layer.ep_group, layer.ep_size = group, size
        for name in ("w_fc", "w_proj"):
            full = getattr(layer.experts, name)
            part = nn.Parameter(full.detach()[start:start + local].clone(), requires_grad=full.requires_grad)
            setattr(part, EP_ATTR, ExpertShard(group, replica, start, local, E, size))
            setattr(layer.experts, name, part)
    ignore = [name for name, p in task.named_parameters() if hasattr(p, EP_ATTR)]
    from torch.nn.parallel import DistributedDataParallel

    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(task, ignore)


def expert_params(params: Iterable[nn.Parameter]) -> list[nn.Parameter]:
    return [p for p in params if hasattr(p, EP_ATTR)]


@torch.no_grad()
def sync_expert_grads(params: Iterable[nn.Parameter]) -> None:
    """Make each split expert parameter's gradient that of the mean loss over all ranks (see the module doc). Call
    once per optimizer step, after the last backward, before clipping."""
    for p in expert_params(params):
        if p.grad is None:
            continue
        shard: ExpertShard = getattr(p, EP_ATTR)
        if shard.replicas is not None:
            dist.all_reduce(p.grad, group=shard.replicas)
        p.grad.div_(dist.get_world_size())


@torch.no_grad()
def clip_grad_norm(params: Iterable[nn.Parameter], max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_, with the norm over every expert of the group where experts are split."""
    params = [p for p in params if p.grad is not None]
    split = expert_params(params)
    if not split:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    dense = [p for p in params if not hasattr(p, EP_ATTR)]
    dense_sq = sum((p.grad.float().square().sum() for p in dense), torch.zeros((), device=params[0].grad.device))
    expert_sq = sum((p.grad.float().square().sum() for p in split), torch.zeros_like(dense_sq))
    dist.all_reduce(expert_sq, group=getattr(split[0], EP_ATTR).group)  # the other ranks hold the other experts
    norm = (dense_sq + expert_sq).sqrt()
    coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)  # as torch's clip_grad_norm_
    for p in params:
        p.grad.mul_(coef.to(p.grad.dtype))
    return norm


def _gather(t: torch.Tensor, shard: ExpertShard) -> torch.Tensor:
    parts = [torch.empty_like(t) for _ in range(shard.size)]
    dist.all_gather(parts, t.contiguous(), group=shard.group)
    return torch.cat(parts, dim=0)


def _param_index(optimizer: torch.optim.Optimizer) -> dict[int, int]:
    """id(parameter) -> its key in optimizer.state_dict()["state"] (the params of all groups, numbered in order)."""
    flat = [p for g in optimizer.param_groups for p in g["params"]]
    return {id(p): i for i, p in enumerate(flat)}


def gather_experts(checkpoint: dict[str, Any], task: nn.Module, optimizers: list[torch.optim.Optimizer]) -> None:
    """In a checkpoint being saved (on every rank: a collective), replace each split expert parameter and its
    optimizer state by the full tensors over all experts."""
    names = {id(p): n for n, p in task.named_parameters()}
    split = expert_params(task.parameters())
    if not split:
        return
    state = checkpoint.get("state_dict", {})
    for p in split:
        shard = getattr(p, EP_ATTR)
        if names[id(p)] in state:
            state[names[id(p)]] = _gather(p.detach(), shard)
    for optimizer, saved in zip(optimizers, checkpoint.get("optimizer_states", [])):
        index = _param_index(optimizer)
        for p in split:
            entry = saved["state"].get(index.get(id(p), -1), {})
            for key, value in entry.items():
                if torch.is_tensor(value) and value.dim() > 0 and value.shape == p.shape:
                    entry[key] = _gather(value, getattr(p, EP_ATTR))


def _local(value: torch.Tensor, shard: ExpertShard) -> torch.Tensor:
    """This rank's rows of a full (num_experts, ...) tensor; a tensor of the local shape already is returned as is."""
    if value.dim() > 0 and value.size(0) == shard.total and shard.total != shard.local:
        return value[shard.start:shard.start + shard.local].clone()
    return value


def slice_experts(checkpoint: dict[str, Any], task: nn.Module) -> None:
    """In a checkpoint being loaded (before the weights are), keep this rank's experts of each full expert tensor.
    Its optimizer states are restored after this hook, at full shape: `slice_optimizer_states` cuts them."""
    state = checkpoint.get("state_dict", {})
    for name, p in task.named_parameters():
        if hasattr(p, EP_ATTR) and name in state:
            state[name] = _local(state[name], getattr(p, EP_ATTR))


def slice_optimizer_states(task: nn.Module, optimizers: list[torch.optim.Optimizer]) -> None:
    """After a resume: keep this rank's rows of the optimizer states restored at full shape (Adam's moments)."""
    for optimizer in optimizers:
        for p in expert_params(task.parameters()):
            entry = optimizer.state.get(p, {})
            for key, value in entry.items():
                if torch.is_tensor(value) and value.dim() == p.dim() and value.shape[1:] == p.shape[1:]:
                    entry[key] = _local(value, getattr(p, EP_ATTR))
