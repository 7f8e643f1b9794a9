"""What each rank runs in tests/test_moe_parallel.py: an MoE GPT under expert parallelism and DDP over gloo, checked
against the same model trained by one process on the global batch (computed in the rank itself, before the process
group exists, so nothing is reduced). Writes its findings to `{out}/rank{R}.json` for the test to assert on."""

from __future__ import annotations

import json
import os
import types
import traceback

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from framework.distributed.expert_parallel import (
    EP_ATTR, _gather, apply_expert_parallel, clip_grad_norm, sync_expert_grads)
from framework.models.gpt import GPT, GPTConfig
from framework.objectives.causal_lm import causal_lm_loss, shift
from framework.tasks.causal_lm import balance_terms, with_balance


class Holder(nn.Module):
    """Stands for the task: the module DDP wraps, with the model under `model.`."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        inputs, targets = shift(tokens)
        lm = causal_lm_loss(self.model(inputs), targets)
        aux, z, _, _ = balance_terms(self.model.moe_layers())
        return with_balance(lm, aux, z, self.model.config.moe)


def setup_case(world: int, top_k: int, accum: int, steps: int) -> dict:
    """Two copies of the same MoE GPT (the reference and the parallel one) and `steps` x `accum` global micro-batches
    of 2 windows per rank."""
    cfg = GPTConfig.from_preset("gpt-moe-test", moe=dict(num_experts=4, top_k=top_k, aux_loss_coeff=0.1,
                                                         z_loss_coeff=0.01))
    data = torch.randint(0, 256, (steps, accum, 2 * world, 17), generator=torch.Generator().manual_seed(top_k))
    torch.manual_seed(0)
    ref = Holder(GPT(cfg))
    torch.manual_seed(0)
    par = Holder(GPT(cfg))
    return {"ref": ref, "par": par, "data": data}


def main(rank: int, world: int, port: int, out: str) -> None:
    result: dict = {"rank": rank, "cases": []}
    try:
        cases = [(1, 1), (2, 1), (1, 2), (2, 2)]  # (top_k, accumulation)
        setups = [setup_case(world, k, a, steps=3) | {"top_k": k, "accum": a} for k, a in cases]
        # the single-process runs on the global batch, before any process group exists
        ref_runs = [train(s["ref"], s["data"], s["accum"], lambda m, b: b, ddp=None) for s in setups]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
        for s, ref_run in zip(setups, ref_runs):
            par = s["par"]
            apply_expert_parallel(par, par.model, types.SimpleNamespace(expert_parallel=world))
            ddp = DistributedDataParallel(par)
            rows = slice(2 * rank, 2 * rank + 2)  # this rank's half of each global micro-batch
            run = train(par, s["data"], s["accum"], lambda m, b: b[rows], ddp=ddp)
            case = {"top_k": s["top_k"], "accum": s["accum"], "loss_diff": [], "grad_diff": [], "param_diff": 0.0}
            for (ref_loss, ref_grads), (loss, grads) in zip(ref_run["steps"], run["steps"]):
                mean = loss.clone()
                dist.all_reduce(mean)
                case["loss_diff"].append(abs(float(mean / world) - float(ref_loss)))
                case["grad_diff"].append(max((grads[n] - g).abs().max().item() for n, g in ref_grads.items()))
            full = full_params(par)
            case["param_diff"] = max((full[n] - p).abs().max().item() for n, p in s["ref"].named_parameters())
            routers = torch.cat([p.detach().flatten() for n, p in par.named_parameters() if "router" in n])
            every = [torch.empty_like(routers) for _ in range(world)]
            dist.all_gather(every, routers)
            case["routers_identical"] = all(torch.equal(every[0], r) for r in every)
            case["expert_split"] = [tuple(p.shape) for n, p in par.named_parameters() if hasattr(p, EP_ATTR)][:1]
            result["cases"].append(case)
        dist.destroy_process_group()
    except Exception:
        result["error"] = traceback.format_exc()
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)


def full_params(holder: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter at full size (the split experts gathered over the group)."""
    return {n: _gather(p.detach(), getattr(p, EP_ATTR)) if hasattr(p, EP_ATTR) else p.detach()
            for n, p in holder.named_parameters()}


def full_grads(holder: nn.Module) -> dict[str, torch.Tensor]:
    return {n: _gather(p.grad, getattr(p, EP_ATTR)) if hasattr(p, EP_ATTR) else p.grad.clone()
            for n, p in holder.named_parameters()}


def train(holder: Holder, data: torch.Tensor, accum: int, pick, ddp) -> dict:
    """`steps` AdamW steps of `accum` micro-batches each (the loss of each divided by accum, as Lightning does),
    clipping to 0.05; records each step's mean micro-batch loss and the gradients after the sync and clip."""
    optimizer = torch.optim.AdamW(holder.parameters(), lr=1e-2, weight_decay=0.1)
    record = []
    for step in range(data.size(0)):
        total = torch.zeros(())
        for m in range(accum):
            batch = pick(m, data[step, m])
            if ddp is not None and m < accum - 1:
                with ddp.no_sync():
                    loss = ddp(batch)
            else:
                loss = (ddp or holder)(batch)
            (loss / accum).backward()
            total += loss.detach() / accum
        if ddp is not None:
            sync_expert_grads(holder.parameters())
        clip_grad_norm(holder.parameters(), 0.05)  # plain torch clipping for the single process (nothing split)
        record.append((total, full_grads(holder) if ddp is not None else dict(
            (n, p.grad.clone()) for n, p in holder.named_parameters())))
        optimizer.step()
        optimizer.zero_grad()
    return {"steps": record}


if __name__ == "__main__":
    import sys

    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
