"""One reader for every checkpoint path: `open_checkpoint(path)` finds what the path holds once, then hands out its
metadata and its model's tensors to whoever needs them (resume, `pretrain export`, `--model.init_from`, the inspection
commands, `pretrain prepare --tokenizer CKPT`).

Kinds (framework.checkpoint.formats describes the three that `pretrain fit` writes):
- `file`, `dcp`, `deepspeed`: a training checkpoint; its metadata is Lightning's (global_step, model_config,
  tokenizer_json, hyper_parameters, the data position, ...), its tensors are streamed out of any layout by
  framework.checkpoint.consolidate without a process group;
- `export`: a directory of `pretrain export` or save_pretrained (config.json + model.safetensors [+ tokenizer.json]);
  its metadata is {"model_config": config.json, "tokenizer_json": tokenizer.json or None}, its tensors are read
  lazily with safetensors;
- `hf`: a Hugging Face model directory (`hf:DIR`, or a directory whose config.json is HF's) of an architecture
  framework.checkpoint.hf maps: its model_config is our config converted from HF's, its tensors are ours mapped from
  HF's, read lazily.

A fine-tune that freezes its backbone (modes `linear` and `lora`) need not save it again: its .ckpt files keep only
the trained tensors (the head, the adapters) and record, under `frozen_from`, where the rest comes from (the real
path of init_from) with a fingerprint of each frozen tensor (`frozen_record`). The reader gives every reader of such a
checkpoint the frozen tensors back from that source (`frozen_sources`), each checked against its fingerprint when it is
read, so a base that was overwritten or moved is one clear error, never a silently different model.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Callable

import torch
from torch import nn

from framework.checkpoint.consolidate import (MODEL_PREFIX, TensorSource, dcp_tensors, deepspeed_tensors,
                                              file_tensors)
from framework.checkpoint.formats import checkpoint_kind, read_meta
from framework.checkpoint import hf
from framework.checkpoint.hf import HF_PREFIX, hf_directory
from framework.errors import UserError
from framework.models.transformer import CONFIG_FILE, WEIGHTS_FILE

FROZEN_KEY = "frozen_from"  # a fine-tune's checkpoint without its frozen base tensors: where they are
TOKENIZER_FILE = "tokenizer.json"
# safetensors dtype name -> torch dtype
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


def is_export(path: str | os.PathLike) -> bool:
    """A directory written by `pretrain export` or save_pretrained (it has a config.json)."""
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, CONFIG_FILE))


class Checkpoint:
    """A checkpoint path of any kind, opened once: `kind`, `meta`, `model_config`, `tokenizer_json`, `step`, `task`,
    and the model's tensors (`tensors()`, `weights()`, `state_dict()`), each read only when it is asked for."""

    def __init__(self, path: str | os.PathLike, exports: bool = True) -> None:
        self.path = os.fspath(path)
        directory = hf_directory(self.path) if exports else None
        if directory is not None:
            self.path, self.kind = directory, "hf"
        else:
            # a missing path, or a directory that is no checkpoint: UserError (an export counts only with `exports`)
            self.kind = "export" if exports and is_export(self.path) else checkpoint_kind(self.path)
        self._meta: dict[str, Any] | None = None

    @property
    def meta(self) -> dict[str, Any]:
        """Every entry but the tensors (formats.read_meta); for an export, its config and tokenizer."""
        if self._meta is None:
            if self.kind == "hf":
                self._meta = {"model_config": hf.config_from_hf(self.path),
                              "tokenizer_json": hf.tokenizer_json(self.path)}
            elif self.kind == "export":
                with open(os.path.join(self.path, CONFIG_FILE)) as f:
                    config = json.load(f)
                file = os.path.join(self.path, TOKENIZER_FILE)
                tokenizer = open(file).read() if os.path.isfile(file) else None
                self._meta = {"model_config": config, "tokenizer_json": tokenizer}
            else:
                self._meta = read_meta(self.path, self.kind)
        return self._meta

    def checked_meta(self) -> dict[str, Any]:
        """The metadata, checked to be one of ours: it has a model config."""
        meta = self.meta
        if "model_config" not in meta:
            raise UserError(f"checkpoint '{self.path}' has no model_config: it was not written by `pretrain fit` of "
                            "this framework")
        return meta

    @property
    def model_config(self) -> dict[str, Any]:
        return dict(self.checked_meta()["model_config"])

    @property
    def tokenizer_json(self) -> str | None:
        return self.checked_meta().get("tokenizer_json")

    @property
    def step(self) -> int | None:
        """The optimizer steps a training checkpoint holds (None for an export)."""
        return self.meta.get("global_step")

    @property
    def task(self) -> str | None:
        """The task class that wrote a training checkpoint (None for an export)."""
        return self.meta.get("task")

    def tensors(self) -> list[TensorSource]:
        """Every tensor of the model as stored (tied aliases too, where the layout keeps them), named as in the model
        (the task's `model.` prefix dropped), with the frozen tensors a fine-tune left out read from its source."""
        if self.kind == "hf":
            return hf.import_tensors(self.path, self.model_config)
        if self.kind == "export":
            return _export_tensors(self.path)
        if self.kind == "file":
            sources = file_tensors(self.meta, self.path)
        elif self.kind == "dcp":
            sources = dcp_tensors(self.path)
        else:
            sources = deepspeed_tensors(self.path)
        out = []
        for s in sources:
            if s.name.startswith(MODEL_PREFIX):
                s.name = s.name[len(MODEL_PREFIX):]
                out.append(s)
        if not out:
            raise UserError(f"checkpoint '{self.path}' holds no model weights (no '{MODEL_PREFIX}*' tensors); is it a "
                            "checkpoint of this framework?")
        if self.kind == "file" and self.meta.get(FROZEN_KEY) is not None:
            out += frozen_sources(self.meta[FROZEN_KEY], {s.name for s in out}, self.path)
        return out

    def weights(self) -> dict[str, TensorSource]:
        """name -> tensor of the model, without the aliases of tied tensors (its family's `tied`)."""
        from framework.models.registry import config_from_dict, family_of

        tied = family_of(self.model_config).tied_in(config_from_dict(self.model_config))
        return {s.name: s for s in self.tensors() if s.name not in tied}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model state dict in memory (for small models and tests)."""
        return {s.name: s.load() for s in self.tensors()}


def open_checkpoint(path: str | os.PathLike, exports: bool = True) -> Checkpoint:
    """The checkpoint at `path` (a .ckpt file, an FSDP2 or DeepSpeed directory, or with `exports` an export
    directory or a Hugging Face one, `hf:DIR`); UserError when it is none of those."""
    return Checkpoint(path, exports)


def source_exists(path: str) -> bool:
    """Whether a model source path (a checkpoint, an export, `hf:DIR`) names something that exists."""
    return os.path.exists(path.removeprefix(HF_PREFIX))


def real_source(path: str) -> str:
    """The source path with its directory resolved (`last.ckpt` is a link that moves on), `hf:` kept."""
    if path.startswith(HF_PREFIX):
        return HF_PREFIX + os.path.realpath(path[len(HF_PREFIX):])
    return os.path.realpath(path)


def _export_tensors(path: str) -> list[TensorSource]:
    from safetensors import safe_open

    weights = os.path.join(path, WEIGHTS_FILE)
    if not os.path.isfile(weights):
        raise UserError(f"'{path}' has a config.json but no {WEIGHTS_FILE}; export the model again")

    def read(name: str) -> torch.Tensor:
        with safe_open(weights, framework="pt") as f:
            return f.get_tensor(name)

    with safe_open(weights, framework="pt") as f:
        slices = {name: f.get_slice(name) for name in f.keys()}
        return [TensorSource(name, tuple(s.get_shape()), _DTYPES[s.get_dtype()], lambda n=name: read(n))
                for name, s in slices.items()]


# ---------------------------------------------------------------- the functions this module replaces
def model_tensors(path: str | os.PathLike) -> list[TensorSource]:
    """Every tensor of a training checkpoint's model, to be read one by one (Checkpoint.tensors)."""
    return open_checkpoint(path, exports=False).tensors()


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The whole consolidated model state dict of a training checkpoint in memory (for small models and tests)."""
    return open_checkpoint(path, exports=False).state_dict()


def checkpoint_meta(path: str | os.PathLike) -> dict[str, Any]:
    """Lightning's metadata of a training checkpoint (formats.read_meta), checked to be one of ours."""
    return open_checkpoint(path, exports=False).checked_meta()


# ---------------------------------------------------------------- frozen tensors a fine-tune left out
def frozen_record(model: nn.Module, path: str, prefix: str = "") -> dict[str, Any]:
    """What a checkpoint without `model`'s frozen parameters (which came from init_from `path`, named there with
    `prefix`) keeps to get them back: the source's real path (`last.ckpt` is a link that moves on) and each tensor's
    shape, dtype and fingerprint. Full (unsharded) tensors only: the single-file strategies."""
    return {"path": real_source(path), "prefix": prefix,
            "tensors": {name: {"shape": list(p.shape), "dtype": str(p.dtype).removeprefix("torch."),
                               **fingerprint(p)}
                        for name, p in model.named_parameters() if not p.requires_grad}}


def frozen_sources(record: dict[str, Any], have: set[str], ckpt: str) -> list[TensorSource]:
    """The frozen tensors a checkpoint (`ckpt`) left out, read from the source it records; each is checked against
    its fingerprint when it is read. `have`: the names the checkpoint holds itself."""
    path = record["path"]
    if not source_exists(path):
        raise UserError(f"checkpoint '{ckpt}' keeps only the tensors its fine-tune trained; the frozen rest comes "
                        f"from '{path}', which no longer exists: put that checkpoint or export back there "
                        "(or pass it as --model.init_from when resuming)")
    prefix = record.get("prefix", "")
    source = {n[len(prefix):]: s for n, s in open_checkpoint(path).weights().items() if n.startswith(prefix)}
    out = []
    for name, want in record["tensors"].items():
        if name in have:
            continue
        if name not in source or tuple(source[name].shape) != tuple(want["shape"]):
            raise UserError(f"'{path}' is not the model checkpoint '{ckpt}' was fine-tuned from (tensor {name} is "
                            "missing or has another shape); pass the original pre-trained checkpoint")
        dtype = getattr(torch, want["dtype"])

        def load(name: str = name, read: Callable[[], torch.Tensor] = source[name].load, want: dict = want,
                 dtype: torch.dtype = dtype) -> torch.Tensor:
            t = read().to(dtype)
            if not same_fingerprint(fingerprint(t), want):
                raise UserError(f"'{path}' has changed since checkpoint '{ckpt}' was fine-tuned from it (tensor "
                                f"{name} differs); the checkpoint keeps only the trained tensors and needs the "
                                "exact pre-trained weights: restore them, or fine-tune again")
            return t

        out.append(TensorSource(name, tuple(want["shape"]), dtype, load))
    return out


def fingerprint(t: torch.Tensor) -> dict[str, float]:
    t = t.detach().double()
    return {"sum": float(t.sum()), "sumsq": float((t * t).sum())}


def same_fingerprint(a: dict[str, float], b: dict[str, float]) -> bool:
    """Equal up to summation order (another device or thread count adds in another order)."""
    scale = math.sqrt(b["sumsq"])
    return (abs(a["sumsq"] - b["sumsq"]) <= 1e-6 * b["sumsq"] + 1e-12
            and abs(a["sum"] - b["sum"]) <= 1e-6 * scale + 1e-12)
