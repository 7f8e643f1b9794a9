"""Auxiliary frozen models of a task (a distillation teacher, a reference model): built, loaded, frozen, placed.

A task declares them in `PretrainTask.aux_models` (name -> the __init__ argument that holds the source path); see
PretrainTask's docstring for the contract. Here: building one from its source (any checkpoint of `pretrain fit` or
a `pretrain export` directory: its model config, then `init_from.load_weights`), and counting a source's
parameters for `pretrain plan` without loading anything.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class Frozen(nn.Module):
    """An auxiliary model: no gradient, never in training mode; call it like the model it holds (`.module`)."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module
        for p in module.parameters():
            p.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> Frozen:
        return super().train(False)  # dropout stays off whatever the trainer switches

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with torch.no_grad():
            return self.module(*args, **kwargs)


def load_frozen(path: str, strategy: Any, block_types: tuple[type[nn.Module], ...]) -> Frozen:
    """The model at `path`, frozen, on the strategy's device and in its precision, sharded over the ranks where the
    trained model is: under FSDP2 like the trained model (`block_types` are the units; the weights are read into
    each rank's shards), under ZeRO-3 partitioned as it is built and run by an inference-only DeepSpeed engine of its
    own (no optimizer), which gathers one module's parameters at a time in forward. So a teacher larger than one
    device's memory fits where the student does. Under DDP, ZeRO-1/2 and one process each rank holds a full copy,
    read from the same source (so all ranks agree without a broadcast). PretrainTask calls this from `setup`, outside
    the trained model's `deepspeed.zero.Init`."""
    from framework.checkpoint.init_from import load_weights, source_config
    from framework.distributed import FSDP2Strategy, apply_fsdp2, is_deepspeed
    from framework.models import build_model, config_from_dict

    config = config_from_dict(source_config(path))
    if is_deepspeed(strategy) and strategy.zero_stage_3:
        return Frozen(_zero3_engine(config, path, strategy))
    model = build_model(config)
    for p in model.parameters():
        p.requires_grad_(False)
    model = strategy.precision_plugin.convert_module(model).to(strategy.root_device)
    if isinstance(strategy, FSDP2Strategy):
        mesh = strategy.device_mesh["data_parallel"]
        types = tuple(t for t in block_types if any(isinstance(m, t) for m in model.modules()))
        if types:
            apply_fsdp2(model, types, mesh=mesh, reshard_after_forward=strategy.reshard_after_forward,
                        offload_params=strategy.offload_params)
        else:  # none of the trained model's block types: one unit
            from torch.distributed.fsdp import fully_shard

            fully_shard(model, mesh=mesh)
    load_weights(model, path, strategy, model.tied_weights)
    return Frozen(model)


def _zero3_engine(config: Any, path: str, strategy: Any) -> nn.Module:
    """A ZeRO-3 inference engine of the model at `path`: built inside `zero.Init` (each rank allocates its partition
    only), the weights copied in one tensor at a time (init_from.load_weights), then wrapped by
    `deepspeed.initialize` without an optimizer, which registers the hooks that gather each module's parameters
    for its forward and release them after (the run's stage-3 settings: prefetch, persistence, offload)."""
    import deepspeed

    from framework.checkpoint.init_from import load_weights
    from framework.models import build_model

    run = getattr(strategy, "full_config", strategy.config)  # ours keeps the whole JSON, batch shape included
    zero = {k: v for k, v in run.get("zero_optimization", {}).items() if k != "offload_optimizer"}
    keys = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "bf16", "fp16")
    ds_config = {**{k: run[k] for k in keys if k in run}, "zero_optimization": zero}
    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        model = build_model(config)
    for p in model.parameters():
        p.requires_grad_(False)
    load_weights(model, path, strategy, model.tied_weights)
    engine, *_ = deepspeed.initialize(model=model, config=ds_config)
    return engine


def source_parameters(path: str) -> int:
    """The parameter count of the model at `path` (a checkpoint or an export), built on the meta device."""
    from framework.checkpoint.init_from import source_config
    from framework.models import build_model, config_from_dict

    with torch.device("meta"):
        model = build_model(config_from_dict(source_config(path)))
    return sum(p.numel() for p in model.parameters())


def aux_parameters(task: type, init_args: dict[str, Any]) -> dict[str, int]:
    """name -> parameter count of each auxiliary model a task class declares, from its init args (a config's
    `model.init_args`); declared models whose path is not set are left out."""
    out = {}
    for name, arg in getattr(task, "aux_models", {}).items():
        if init_args.get(arg):
            out[name] = source_parameters(str(init_args[arg]))
    return out
