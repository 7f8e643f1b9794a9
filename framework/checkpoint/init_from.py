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

A fine-tune that freezes its backbone (modes `linear` and `lora`) need not save it again: its .ckpt files keep only
the trained tensors (the head, the adapters) and record, under `frozen_from`, where the rest comes from (the real
path of init_from) with a fingerprint of each frozen tensor (`frozen_record`). Every reader of such a checkpoint
(a resume, `pretrain export`, another init_from) gets the frozen tensors back from that source (`frozen_sources`),
each checked against its fingerprint, so a base that was overwritten or moved is one clear error, never a silently
different model.
"""

from __future__ import annotations

import json
import math
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
    from framework.models.registry import family_of

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
    tied = family_of(config).tied
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


def load_weights(model: nn.Module, path: str, strategy: Any, tied: tuple[str, ...], prefix: str = "",
                 skip: tuple[str, ...] = ()) -> InitReport:
    """Copy the weights at `path` into `model` (already laid out by `strategy`); see the module docstring.
    `prefix`: take only the source's tensors under it (e.g. `visual.`, a CLIP's image tower), without it.
    `skip`: name prefixes of the model's tensors that keep their fresh init (e.g. `head.`: a new head)."""
    from framework.models.registry import image_tower, model_type_of

    config, source = source_tensors(path)
    if prefix:
        config = image_tower(config)[0]
        source = {n[len(prefix):]: v for n, v in source.items() if n.startswith(prefix)}
    if skip:
        source = {n: v for n, v in source.items() if not n.startswith(skip)}
    # a classifier takes the weights of its backbone's family
    found, expected = model_type_of(config), model.config.family
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


def frozen_record(model: nn.Module, path: str, prefix: str = "") -> dict[str, Any]:
    """What a checkpoint without `model`'s frozen parameters (which came from init_from `path`, named there with
    `prefix`) keeps to get them back: the source's real path (`last.ckpt` is a link that moves on) and each tensor's
    shape, dtype and fingerprint. Full (unsharded) tensors only: the single-file strategies."""
    return {"path": os.path.realpath(path), "prefix": prefix,
            "tensors": {name: {"shape": list(p.shape), "dtype": str(p.dtype).removeprefix("torch."),
                               **_fingerprint(p)}
                        for name, p in model.named_parameters() if not p.requires_grad}}


def frozen_sources(record: dict[str, Any], have: set[str], ckpt: str) -> list[Any]:
    """The frozen tensors a checkpoint (`ckpt`) left out, as TensorSources read from the source it records; each is
    checked against its fingerprint when it is read. `have`: the names the checkpoint holds itself."""
    from framework.checkpoint.consolidate import TensorSource

    path = record["path"]
    if not os.path.exists(path):
        raise UserError(f"checkpoint '{ckpt}' keeps only the tensors its fine-tune trained; the frozen rest comes "
                        f"from '{path}', which no longer exists: put that checkpoint or export back there "
                        "(or pass it as --model.init_from when resuming)")
    _, source = source_tensors(path)
    prefix = record.get("prefix", "")
    source = {n[len(prefix):]: v for n, v in source.items() if n.startswith(prefix)}
    out = []
    for name, want in record["tensors"].items():
        if name in have:
            continue
        if name not in source or tuple(source[name][0]) != tuple(want["shape"]):
            raise UserError(f"'{path}' is not the model checkpoint '{ckpt}' was fine-tuned from (tensor {name} is "
                            "missing or has another shape); pass the original pre-trained checkpoint")
        dtype = getattr(torch, want["dtype"])

        def load(name: str = name, read: Callable[[], torch.Tensor] = source[name][1], want: dict = want,
                 dtype: torch.dtype = dtype) -> torch.Tensor:
            t = read().to(dtype)
            if not _same_fingerprint(_fingerprint(t), want):
                raise UserError(f"'{path}' has changed since checkpoint '{ckpt}' was fine-tuned from it (tensor "
                                f"{name} differs); the checkpoint keeps only the trained tensors and needs the "
                                "exact pre-trained weights: restore them, or fine-tune again")
            return t

        out.append(TensorSource(name, tuple(want["shape"]), dtype, load))
    return out


def _fingerprint(t: torch.Tensor) -> dict[str, float]:
    t = t.detach().double()
    return {"sum": float(t.sum()), "sumsq": float((t * t).sum())}


def _same_fingerprint(a: dict[str, float], b: dict[str, float]) -> bool:
    """Equal up to summation order (another device or thread count adds in another order)."""
    scale = math.sqrt(b["sumsq"])
    return (abs(a["sumsq"] - b["sumsq"]) <= 1e-6 * b["sumsq"] + 1e-12
            and abs(a["sum"] - b["sum"]) <= 1e-6 * scale + 1e-12)
