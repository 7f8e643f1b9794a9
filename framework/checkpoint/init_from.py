"""`--model.init_from PATH`: start a run from the weights of a pre-trained model, and nothing else.

PATH is any checkpoint `pretrain fit` writes (a .ckpt file, an FSDP2 directory, a DeepSpeed ZeRO-1/2/3 directory,
on any number of ranks; `last.ckpt` too), a directory written by `pretrain export`, or `hf:DIR`, a Hugging Face
model directory of an architecture framework.checkpoint.hf maps (GPT-2, Llama), read as our model's tensors.
Only weights are taken: the optimizer, step, LR schedule, data position and W&B run of the new run start fresh.

The tensors are read one at a time (framework.checkpoint.reader opens any of them: it streams a training checkpoint's
out of any layout without a process group and reads an export's lazily with safetensors) and copied into the model
as the strategy has laid it out:
- unsharded (single process, DDP, ZeRO-1/2 before DeepSpeed wraps the model): every rank copies the tensor in;
- FSDP2: every rank keeps only its shard of each tensor (`distribute_tensor` with each rank's own copy, no
  communication), so no rank ever holds more than one full tensor beyond its shards;
- ZeRO-3: rank 0 reads the tensor and copies it into the gathered parameter; DeepSpeed re-partitions it on exit.
Names are matched exactly; a shape or model-family mismatch is one clear error. Tensors the model has and the source
lacks (e.g. a new head) keep their fresh init and are reported as new; tensors of the source the model lacks (e.g. a
pre-training head) are reported as dropped. The token tables alone may have more rows than the source's (a tokenizer
with added tokens, TOKEN_TABLES): the source fills the first rows, the others keep their fresh init ("grown").

A fine-tune that freezes its backbone (modes `linear` and `lora`) need not save it again: its .ckpt files keep only
the trained tensors and record where the rest comes from; framework.checkpoint.reader (`frozen_record`,
`frozen_sources`) writes that record and reads the frozen tensors back for every reader of such a checkpoint.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from framework.checkpoint.reader import Checkpoint, open_checkpoint, source_exists
from framework.errors import UserError
from framework.models.registry import image_tower, model_type_of


@dataclass
class InitReport:
    loaded: list[str] = field(default_factory=list)
    new: list[str] = field(default_factory=list)  # in the model, not in the source: fresh init kept
    dropped: list[str] = field(default_factory=list)  # in the source, not in the model
    parameters: int = 0  # elements loaded
    grown: list[str] = field(default_factory=list)  # token tables with more rows than the source's: "name a -> b"

    def lines(self, path: str) -> list[str]:
        def names(xs: list[str]) -> str:
            return ", ".join(xs[:6]) + (f", ... ({len(xs)} in all)" if len(xs) > 6 else "") if xs else "none"

        return [f"init_from {path}: loaded {len(self.loaded)} tensors ({self.parameters:,} values)",
                f"  new (fresh init): {names(self.new)}", f"  dropped (not in this model): {names(self.dropped)}",
                *([f"  grown (the added token rows keep their fresh init): {names(self.grown)}"] if self.grown else [])]


# Token tables, which may have more rows in the model than in the source: a tokenizer with tokens added to the
# pre-trained one's (this framework's special tokens on a Hugging Face tokenizer) gives a larger vocabulary; the
# source fills the first rows and the added ones keep their fresh init, as transformers' resize_token_embeddings.
TOKEN_TABLES = ("transformer.wte.weight", "lm_head.weight")


def _fits(name: str, target: tuple[int, ...], source: tuple[int, ...]) -> bool:
    return target == source or (name in TOKEN_TABLES and len(target) == len(source) == 2
                                and target[1] == source[1] and target[0] > source[0])


def _source(path: str) -> Checkpoint:
    if not source_exists(path):
        raise UserError(f"model.init_from '{path}' does not exist; pass a checkpoint of `pretrain fit`, a "
                        "directory of `pretrain export` or hf:DIR (a Hugging Face model directory)")
    return open_checkpoint(path)


def source_config(path: str) -> dict[str, Any]:
    """The model config dict of a checkpoint or an export directory (nothing else is read)."""
    return _source(path).model_config


def source_tokenizer(path: str) -> str | None:
    """The tokenizer.json text a checkpoint or an export directory carries (None when it has none)."""
    return _source(path).tokenizer_json


def load_weights(model: nn.Module, path: str, strategy: Any, tied: tuple[str, ...], prefix: str = "",
                 skip: tuple[str, ...] = (), layers: list[int] | None = None) -> InitReport:
    """Copy the weights at `path` into `model` (already laid out by `strategy`); see the module docstring.
    `prefix`: take only the source's tensors under it (e.g. `visual.`, a CLIP's image tower), without it.
    `skip`: name prefixes of the model's tensors that keep their fresh init (e.g. `head.`: a new head).
    `layers`: block i of the model takes the source's block layers[i] (a shallower student from its teacher,
    DistilBERT's one layer in two: [0, 2, 4, ...]); every other tensor by its own name."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    checkpoint = _source(path)
    config = checkpoint.model_config
    source = checkpoint.weights()
    if prefix:
        config = image_tower(config)[0]
        source = {n[len(prefix):]: v for n, v in source.items() if n.startswith(prefix)}
    if skip:
        source = {n: v for n, v in source.items() if not n.startswith(skip)}
    unmapped: list[str] = []
    if layers is not None:
        source, unmapped = _map_blocks(source, model, layers, path)
    # a classifier takes the weights of its backbone's family
    found, expected = model_type_of(config), model.config.family
    if found != expected:
        raise UserError(f"model.init_from '{path}' holds a {found!r} model but this task builds a {expected!r} one; "
                        f"pass a checkpoint or export of a {expected!r} model")
    targets = {n: p for n, p in [*model.named_parameters(), *model.named_buffers()] if n not in tied}
    report = InitReport(new=sorted(set(targets) - set(source)), dropped=sorted(set(source) - set(targets)) + unmapped)
    wrong = [f"{n} {tuple(_full_shape(targets[n]))} vs {source[n].shape}" for n in sorted(set(targets) & set(source))
             if not _fits(n, tuple(_full_shape(targets[n])), source[n].shape)]
    if wrong:
        raise UserError(f"model.init_from '{path}' does not fit this model's shapes ({'; '.join(wrong[:3])}); use "
                        "the same preset and config as the pre-trained model")
    zero3 = getattr(strategy, "zero_stage_3", False)
    rank = strategy.global_rank
    for name in sorted(set(targets) & set(source)):
        target, read = targets[name], source[name].load
        grown = tuple(_full_shape(target)) != source[name].shape  # a token table with added rows (TOKEN_TABLES)
        rows = source[name].shape[0] if grown else None  # copy into target[:rows]; None: the whole tensor
        if grown:
            report.grown.append(f"{name} {rows} -> {_full_shape(target)[0]} rows")
        with torch.no_grad():
            if zero3 and hasattr(target, "ds_id"):
                import deepspeed

                with deepspeed.zero.GatheredParameters([target], modifier_rank=0):
                    if rank == 0:
                        _rows(target, rows).copy_(read())
            elif isinstance(target, DTensor):  # FSDP2: keep this rank's shard only
                full = read().to(device=target.to_local().device, dtype=target.dtype)
                if grown:  # the added rows from the fresh init (a collective: every rank is here)
                    full = torch.cat((full, target.full_tensor()[rows:]))
                shard = distribute_tensor(full, target.device_mesh, target.placements, src_data_rank=None)
                target.to_local().copy_(shard.to_local())
                del full, shard
            else:
                _rows(target, rows).copy_(read())
        report.loaded.append(name)
        report.parameters += int(torch.Size(source[name].shape).numel())
    return report


def _rows(t: torch.Tensor, rows: int | None) -> torch.Tensor:
    return t if rows is None else t[:rows]


_BLOCK = re.compile(r"^((?:.+\.)?(?:h|blocks))\.(\d+)\.")  # transformer.h.3.attn... (GPT, encoder), blocks.3. (ViT)


def _map_blocks(source: dict[str, Any], model: nn.Module, layers: list[int],
                path: str) -> tuple[dict[str, Any], list[str]]:
    """The source's tensors renamed so that the model's block i reads the source's block layers[i], and the names
    of the source's blocks the map leaves out (reported as dropped)."""
    def blocks(names: Any) -> set[int]:
        return {int(m.group(2)) for n in names if (m := _BLOCK.match(n))}

    ours, theirs = blocks(n for n, _ in model.named_parameters()), blocks(source)
    if len(layers) != len(ours):
        raise UserError(f"model.init_layers names {len(layers)} blocks but the model has {len(ours)}; give one block "
                        f"of '{path}' per block of the model")
    missing = sorted(set(layers) - theirs)
    if missing:
        raise UserError(f"model.init_layers names blocks {missing} that '{path}' does not have (it has "
                        f"{len(theirs)}: 0..{len(theirs) - 1})")
    out, unused = {n: v for n, v in source.items() if not _BLOCK.match(n)}, []
    for name, value in source.items():
        m = _BLOCK.match(name)
        if m:
            if int(m.group(2)) not in layers:
                unused.append(name)
            for i, j in enumerate(layers):
                if j == int(m.group(2)):
                    out[f"{m.group(1)}.{i}.{name[m.end():]}"] = value
    return out, sorted(unused)


def _full_shape(t: torch.Tensor) -> torch.Size:
    """The unsharded shape of a parameter (ZeRO-3 keeps it in ds_shape; a DTensor's shape is the full one)."""
    return getattr(t, "ds_shape", t.shape)
