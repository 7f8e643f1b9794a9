"""The full (unsharded) tensors of any training checkpoint, one tensor at a time, without a process group.

Each layout's reader lists every tensor of the task (name, shape, dtype) with a function that reads just that tensor,
so an exporter holds one tensor in memory at a time, beyond what the OS pages in from the files (open a checkpoint
with framework.checkpoint.reader, which picks the layout's reader and adds what a fine-tune left out):

- `file` (.ckpt): torch.load with mmap=True; a tensor is read from disk when it is used.
- `dcp` (FSDP2): `torch.distributed.checkpoint.load` of one key into a preallocated full-size tensor (`no_dist=True`:
  no process group needed); DCP assembles it from every rank's chunks.
- `deepspeed` (ZeRO-1/2/3): the fp32 master weights from the per-rank optimizer-state files (memory-mapped), cut out
  per parameter. ZeRO-1/2 keep, per param group, one flat fp32 vector split evenly across ranks; the parameters lie
  in it back to back in `param_shapes` order (plus any `param_alignment_paddings`). ZeRO-3 gives each rank
  ceil(numel / world) elements of every parameter, parameters back to back in each rank's flat groups, the last
  rank's piece zero-padded. This is deepspeed/utils/zero_to_fp32.py's reconstruction, which loads every
  partition (ZeRO-1/2: concatenated, i.e. the whole model) first; here nothing is read before it is needed.
  Why not DeepSpeed's own `get_fp32_state_dict_from_zero_checkpoint(..., lazy_mode=True)` (checked in 0.19.8): its
  laziness covers ZeRO-3 only (ZeRO-1/2 still `torch.cat` every group's partitions into the full fp32 vector,
  "memory usage doubles here"), and it reads the optimizer files with `weights_only=False`, i.e. full unpickling,
  which our loader refuses for checkpoints not marked trusted (formats.torch_load). tests/test_export.py checks
  this reader against live ZeRO-2 and ZeRO-3 models.

Names are the task's (`model.transformer.wte.weight`, ...; the reader drops the `model.`); DeepSpeed's reader drops
the aliases of tied weights it records (`shared_params`: `lm_head.weight` is `transformer.wte.weight`).
"""

from __future__ import annotations

import contextlib
import math
import sys
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch

from framework.checkpoint.formats import deepspeed_files, torch_load
from framework.errors import UserError

MODEL_PREFIX = "model."  # PretrainTask keeps its nn.Module as `self.model`


@dataclass
class TensorSource:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    load: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


# ---------------------------------------------------------------- .ckpt file
def file_tensors(ckpt: dict[str, Any], path: str) -> list[TensorSource]:
    """The tensors of a .ckpt file's state_dict; `ckpt`: the file as loaded (formats.read_meta, memory-mapped)."""
    state = ckpt.get("state_dict")
    if not isinstance(state, dict):
        raise UserError(f"'{path}' has no state_dict: it is not a Lightning checkpoint written by `pretrain fit`")
    return [TensorSource(k, tuple(v.shape), v.dtype, lambda v=v: v) for k, v in state.items() if torch.is_tensor(v)]


# ---------------------------------------------------------------- torch.distributed.checkpoint directory
_DCP_MODEL = "state_dict."  # Lightning saves {"state_dict": model state, "optimizer_0": ...}


def dcp_tensors(path: str) -> list[TensorSource]:
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = FileSystemReader(path).read_metadata()
    out = []
    for key, md in metadata.state_dict_metadata.items():
        if key.startswith(_DCP_MODEL) and isinstance(md, TensorStorageMetadata):
            out.append(TensorSource(key[len(_DCP_MODEL):], tuple(md.size), md.properties.dtype,
                                    lambda key=key, md=md: _dcp_load_one(path, key, md)))
    return out


def _dcp_load_one(path: str, key: str, md: Any) -> torch.Tensor:
    from torch.distributed.checkpoint import FileSystemReader, load

    tensor = torch.empty(tuple(md.size), dtype=md.properties.dtype)
    with warnings.catch_warnings():  # "torch.distributed is ... uninitialized, assuming ... a single process": yes
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        load({key: tensor}, storage_reader=FileSystemReader(path), no_dist=True)
    return tensor


# ---------------------------------------------------------------- DeepSpeed ZeRO directory
def deepspeed_tensors(path: str) -> list[TensorSource]:
    model_files, optim_files = deepspeed_files(path)
    _import_deepspeed_quietly()
    if not optim_files:
        raise UserError(f"DeepSpeed checkpoint '{path}' has no *optim_states.pt files (written without ZeRO?); "
                        "export reads the fp32 master weights from them")
    models = [torch_load(f, "DeepSpeed model states") for f in model_files]
    optims = [torch_load(f, "DeepSpeed optimizer states")["optimizer_state_dict"] for f in optim_files]
    stage = int(optims[0].get("zero_stage", 1))  # BF16_Optimizer (bf16 + ZeRO-1) does not record it
    world = len(optims)
    partition_count = optims[0]["partition_count"]
    expected = max(partition_count) if isinstance(partition_count, list) else int(partition_count)
    if expected != world:
        raise UserError(f"DeepSpeed checkpoint '{path}' was written by {expected} ranks but has {world} optimizer "
                        "state files: it is incomplete (a rank did not finish saving?)")
    ms = models[0]
    shared = set(ms.get("shared_params", {}))  # alias name -> the name it shares storage with
    out: list[TensorSource] = []
    if stage <= 2:
        out += _zero12_params(ms["param_shapes"], [o["single_partition_of_fp32_groups"] for o in optims],
                              optims[0].get("param_alignment_paddings"))
        frozen = ms.get("frozen_param_shapes") or {}
        out += [TensorSource(n, tuple(s), ms["module"][n].dtype, lambda n=n: ms["module"][n]) for n, s in
                frozen.items()]
    else:
        out += _zero3_params(ms["param_shapes"], [o["fp32_flat_groups"] for o in optims])
        out += _zero3_frozen(ms.get("frozen_param_shapes") or {}, [m.get("frozen_param_fragments") for m in models])
    module = ms.get("module") or {}
    for name in ms.get("buffer_names", []):
        if name in module:
            out.append(TensorSource(name, tuple(module[name].shape), module[name].dtype, lambda n=name: module[n]))
    return [s for s in out if s.name not in shared]


def _import_deepspeed_quietly() -> None:
    """Unpickling DeepSpeed's files imports deepspeed, whose logger writes to stdout (an accelerator warning on a
    machine without GPUs): in a process that has not imported it yet, point that logger at stderr, so that stdout
    stays the command's own output (`pretrain generate` prints the generated text there)."""
    if "deepspeed" not in sys.modules:
        with contextlib.redirect_stdout(sys.stderr):
            try:
                import deepspeed  # noqa: F401
            except ImportError:
                pass  # torch.load then names the missing module; reported as an unreadable checkpoint


def _narrow_chunks(chunks: list[torch.Tensor], start: int, length: int) -> list[torch.Tensor]:
    """Elements [start, start + length) of the concatenation of flat `chunks`, as slices of them (no copy)."""
    parts, pos = [], 0
    for c in chunks:
        n = c.numel()
        lo, hi = max(start, pos), min(start + length, pos + n)
        if lo < hi:
            parts.append(c[lo - pos:hi - pos])
        pos += n
        if pos >= start + length:
            break
    return parts


def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0].clone() if len(parts) == 1 else torch.cat(parts)


def _zero12_params(param_shapes: list[dict[str, Any]], rank_groups: list[list[torch.Tensor]],
                   paddings: list[list[int]] | None) -> list[TensorSource]:
    """ZeRO-1/2: group g's full flat vector is the concatenation of every rank's partition g."""
    out = []
    for g, shapes in enumerate(param_shapes):
        chunks = [groups[g] for groups in rank_groups]
        offset = 0
        for i, (name, shape) in enumerate(shapes.items()):
            numel = math.prod(shape)

            def load(chunks=chunks, offset=offset, numel=numel, shape=tuple(shape)) -> torch.Tensor:
                return _cat(_narrow_chunks(chunks, offset, numel)).view(shape)

            out.append(TensorSource(name, tuple(shape), chunks[0].dtype, load))
            offset += numel + (paddings[g][i] if paddings else 0)
        if offset > sum(c.numel() for c in chunks):
            raise UserError(f"DeepSpeed checkpoint: parameter group {g} needs {offset} elements but its partitions "
                            f"hold {sum(c.numel() for c in chunks)}; the checkpoint is damaged")
    return out


def _zero3_params(param_shapes: list[dict[str, Any]], rank_groups: list[list[torch.Tensor]]) -> list[TensorSource]:
    """ZeRO-3: each rank holds ceil(numel / world) elements of every parameter, parameters back to back."""
    world = len(rank_groups)
    out, offset = [], 0
    for shapes in param_shapes:
        for name, shape in shapes.items():
            numel = math.prod(shape)
            part = math.ceil(numel / world)

            def load(offset=offset, part=part, numel=numel, shape=tuple(shape)) -> torch.Tensor:
                parts = [p for groups in rank_groups for p in _narrow_chunks(groups, offset, part)]
                return torch.cat(parts)[:numel].view(shape)

            out.append(TensorSource(name, tuple(shape), rank_groups[0][0].dtype, load))
            offset += part
    if offset != sum(t.numel() for t in rank_groups[0]):
        raise UserError(f"DeepSpeed ZeRO-3 checkpoint: its parameters need {offset} elements per rank but each rank "
                        f"holds {sum(t.numel() for t in rank_groups[0])}; it is damaged")
    return out


def _zero3_frozen(shapes: dict[str, Any], fragments: list[dict[str, torch.Tensor] | None]) -> list[TensorSource]:
    out = []
    for name, shape in shapes.items():
        numel = math.prod(shape)

        def load(name=name, numel=numel, shape=tuple(shape)) -> torch.Tensor:
            return torch.cat([f[name].reshape(-1) for f in fragments if f is not None])[:numel].view(shape)

        dtype = next(f[name].dtype for f in fragments if f is not None)
        out.append(TensorSource(name, tuple(shape), dtype, load))
    return out
