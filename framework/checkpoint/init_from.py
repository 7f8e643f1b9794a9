"""`--model.init_from PATH`: start a run from the weights of a pre-trained model, and nothing else.

PATH is any checkpoint `pretrain fit` writes (a .ckpt file, an FSDP2 directory, a DeepSpeed ZeRO-1/2/3 directory,
on any number of ranks; `last.ckpt` too) or a directory written by `pretrain export`. Only weights are taken: the
optimizer, step, LR schedule, data position and W&B run of the new run start fresh.

The tensors are read one at a time (framework.checkpoint.consolidate streams them out of any layout without a process
group; exports are read lazily with safetensors) and copied into the model as the strategy has laid it out:
- unsharded (single process, DDP, ZeRO-1/2 before DeepSpeed wraps the model): every rank copies the tensor in;
- FSDP2: every rank keeps only its shard of each tensor (`distribute_tensor` with each rank's own copy, no
  communication), so no rank ever holds more than one full tensor beyond its shards;
- ZeRO-3: rank 0 reads the tensor and copies it into the gathered parameter; DeepSpeed re-partitions it on exit.
Names are matched exactly; a shape or model-family mismatch is one clear error. Tensors the model has and the source
lacks (e.g. a new head) keep their fresh init and are reported as new; tensors of the source the model lacks (e.g. a
pre-training head) are reported as dropped.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from framework.errors import UserError


@dataclass
class InitReport:
    loaded: list[str] = field(default_factory=list)
    new: list[str] = field(default_factory=list)  # in the model, not in the source: fresh init kept
    dropped: list[str] = field(default_factory=list)  # in the source, not in the model
    parameters: int = 0  # elements loaded

    def lines(self, path: str) -> list[str]:
        def names(xs: list[str]) -> str:
            return ", ".join(xs[:6]) + (f", ... ({len(xs)} in all)" if len(xs) > 6 else "") if xs else "none"

        return [f"init_from {path}: loaded {len(self.loaded)} tensors ({self.parameters:,} values)",
                f"  new (fresh init): {names(self.new)}", f"  dropped (not in this model): {names(self.dropped)}"]


def source_tensors(path: str) -> tuple[dict[str, Any], dict[str, tuple[tuple[int, ...], Callable[[], torch.Tensor]]]]:
    """(model config dict, name -> (shape, load)) of a checkpoint or an export directory; tied aliases left out."""
    from framework.models import TIED, model_type_of

    config = source_config(path)
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json")):
        from safetensors import safe_open

        from framework.models.transformer import WEIGHTS_FILE

        weights = os.path.join(path, WEIGHTS_FILE)
        if not os.path.isfile(weights):
            raise UserError(f"'{path}' has a config.json but no {WEIGHTS_FILE}; export the model again")
        with safe_open(weights, framework="pt") as f:
            names = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}

        def read(name: str) -> torch.Tensor:
            with safe_open(weights, framework="pt") as f:
                return f.get_tensor(name)

        tensors = {n: (shape, lambda n=n: read(n)) for n, shape in names.items()}
    else:
        from framework.checkpoint.consolidate import model_tensors

        tensors = {s.name: (tuple(s.shape), s.load) for s in model_tensors(path)}
    tied = TIED[model_type_of(config)]
    return config, {n: v for n, v in tensors.items() if n not in tied}


def source_config(path: str) -> dict[str, Any]:
    """The model config dict of a checkpoint or an export directory (nothing else is read)."""
    if not os.path.exists(path):
        raise UserError(f"model.init_from '{path}' does not exist; pass a checkpoint of `pretrain fit` or a "
                        "directory of `pretrain export`")
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json")):
        with open(os.path.join(path, "config.json")) as f:
            return json.load(f)
    from framework.checkpoint.consolidate import checkpoint_meta

    return dict(checkpoint_meta(path)["model_config"])


def source_tokenizer(path: str) -> str | None:
    """The tokenizer.json text a checkpoint or an export directory carries (None when it has none)."""
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json")):
        file = os.path.join(path, "tokenizer.json")
        return open(file).read() if os.path.isfile(file) else None
    from framework.checkpoint.consolidate import checkpoint_meta

    return checkpoint_meta(path).get("tokenizer_json")


def image_tower(config: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """(the image model's config, the prefix of its tensors) in a source: a CLIP's image tower is `visual.*`."""
    if config.get("model_type") == "clip":
        return dict(config["image"]), "visual."
    return config, ""


def load_weights(model: nn.Module, path: str, strategy: Any, tied: tuple[str, ...], prefix: str = "",
                 skip: tuple[str, ...] = ()) -> InitReport:
    """Copy the weights at `path` into `model` (already laid out by `strategy`); see the module docstring.
    `prefix`: take only the source's tensors under it (e.g. `visual.`, a CLIP's image tower), without it.
    `skip`: name prefixes of the model's tensors that keep their fresh init (e.g. `head.`: a new head)."""
    from framework.models import model_type_of

    config, source = source_tensors(path)
    if prefix:
        config = image_tower(config)[0]
        source = {n[len(prefix):]: v for n, v in source.items() if n.startswith(prefix)}
    if skip:
        source = {n: v for n, v in source.items() if not n.startswith(skip)}
    # a classifier takes the weights of its backbone's family
    found, expected = model_type_of(config), getattr(model.config, "family", model.config.model_type)
    if found != expected:
        raise UserError(f"model.init_from '{path}' holds a {found!r} model but this task builds a {expected!r} one; "
                        f"pass a checkpoint or export of a {expected!r} model")
    targets = {n: p for n, p in [*model.named_parameters(), *model.named_buffers()] if n not in tied}
    report = InitReport(new=sorted(set(targets) - set(source)), dropped=sorted(set(source) - set(targets)))
    wrong = [f"{n} {tuple(_full_shape(targets[n]))} vs {source[n][0]}" for n in sorted(set(targets) & set(source))
             if tuple(_full_shape(targets[n])) != source[n][0]]
    if wrong:
        raise UserError(f"model.init_from '{path}' does not fit this model's shapes ({'; '.join(wrong[:3])}); use "
                        "the same preset and config as the pre-trained model")
    zero3 = getattr(strategy, "zero_stage_3", False)
    rank = getattr(strategy, "global_rank", 0)
    for name in sorted(set(targets) & set(source)):
        target = targets[name]
        with torch.no_grad():
            if zero3 and hasattr(target, "ds_id"):
                import deepspeed

                with deepspeed.zero.GatheredParameters([target], modifier_rank=0):
                    if rank == 0:
                        target.copy_(source[name][1]())
            elif hasattr(target, "device_mesh"):  # an FSDP2 DTensor: keep this rank's shard only
                from torch.distributed.tensor import distribute_tensor

                full = source[name][1]().to(device=target.to_local().device, dtype=target.dtype)
                shard = distribute_tensor(full, target.device_mesh, target.placements, src_data_rank=None)
                target.to_local().copy_(shard.to_local())
                del full, shard
            else:
                target.copy_(source[name][1]())
        report.loaded.append(name)
        report.parameters += int(torch.Size(source[name][0]).numel())
    return report


def _full_shape(t: torch.Tensor) -> torch.Size:
    """The unsharded shape of a parameter (ZeRO-3 keeps it in ds_shape; a DTensor's shape is the full one)."""
    return getattr(t, "ds_shape", t.shape)
