"""What a checkpoint path holds, and its training metadata, read without loading (or even touching) its tensors.

`pretrain fit` writes three layouts, one per strategy family (each `step*.ckpt`; `last.ckpt` links to the newest):

- `file`: one torch.save'd dict (DDP, single process): Lightning's checkpoint, `state_dict` and `optimizer_states`
  included.
- `deepspeed`: a directory `step*.ckpt/{latest, checkpoint/...}` written by `DeepSpeedEngine.save_checkpoint` with
  tag "checkpoint" (lightning/pytorch/strategies/deepspeed.py `save_checkpoint`). The tag directory holds the model
  states (`mp_rank_00_model_states.pt` for ZeRO-1/2, `zero_pp_rank_R_mp_rank_00_model_states.pt` per rank for ZeRO-3;
  Lightning's own entries are merged into them as DeepSpeed "client state") and one `*zero_pp_rank_R_*optim_states.pt`
  per data-parallel rank with that rank's fp32 master-weight and Adam-moment partitions.
- `dcp`: a torch.distributed.checkpoint directory (FSDP2 via ModelParallelStrategy, lightning/pytorch/strategies/
  model_parallel.py `save_checkpoint`): `.metadata` + `__R_0.distcp` shards of `state_dict.*` and `optimizer_0.*`,
  and `meta.pt` with everything else Lightning checkpoints (loops, callbacks, schedulers, datamodule, ours).
"""

from __future__ import annotations

import glob
import os
import pickle
import re
from typing import Any, Literal

import torch

from framework.errors import UserError

Kind = Literal["file", "deepspeed", "dcp"]

DCP_META = "meta.pt"  # lightning.fabric.utilities.load._METADATA_FILENAME
DS_LATEST = "latest"
DS_TAG = "checkpoint"  # the tag Lightning saves DeepSpeed checkpoints under


def checkpoint_kind(path: str | os.PathLike) -> Kind:
    """The layout of a checkpoint path; a UserError when the path does not exist or is no checkpoint we know."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise UserError(f"checkpoint '{path}' does not exist; pass a step*.ckpt or last.ckpt written by `pretrain fit`")
    if os.path.isfile(path):
        return "file"
    if os.path.isfile(os.path.join(path, DCP_META)) and os.path.isfile(os.path.join(path, ".metadata")):
        return "dcp"
    if _deepspeed_tag_dir(path) is not None:
        return "deepspeed"
    raise UserError(f"'{path}' is a directory but not a checkpoint of this framework (neither a DeepSpeed checkpoint "
                    "with model/optimizer states nor a torch.distributed.checkpoint with meta.pt)")


def _deepspeed_tag_dir(path: str) -> str | None:
    """The directory of a DeepSpeed checkpoint's states: the tag named in `latest`, else "checkpoint"."""
    tags = []
    latest = os.path.join(path, DS_LATEST)
    if os.path.isfile(latest):
        with open(latest) as f:
            tags.append(f.read().strip())
    tags.append(DS_TAG)
    for tag in tags:
        d = os.path.join(path, tag)
        if tag and glob.glob(os.path.join(d, "*model_states.pt")):
            return d
    return None


def deepspeed_tag_dir(path: str | os.PathLike) -> str:
    d = _deepspeed_tag_dir(os.fspath(path))
    if d is None:
        raise UserError(f"'{path}' is not a DeepSpeed checkpoint (no */*model_states.pt)")
    return d


def natural_key(text: str) -> list[Any]:
    """Sort key that orders rank 10 after rank 9."""
    return [int(c) if c.isdigit() else c for c in re.split(r"(\d+)", text)]


def deepspeed_files(path: str | os.PathLike) -> tuple[list[str], list[str]]:
    """(model state files, optimizer state files) of a DeepSpeed checkpoint, in rank order."""
    tag_dir = deepspeed_tag_dir(path)
    model = sorted((f for f in glob.glob(os.path.join(tag_dir, "*model_states.pt"))
                    if not os.path.basename(f).startswith("layer_")), key=natural_key)
    optim = sorted(glob.glob(os.path.join(tag_dir, "*optim_states.pt")), key=natural_key)
    return model, optim


TRUST_ENV = "PRETRAIN_TRUST_CHECKPOINT"  # "1": unpickle checkpoints fully (only for files from a trusted source)

# The few non-tensor classes that DeepSpeed pickles into its checkpoint files (module, attribute). Everything else in
# our checkpoints is tensors, containers, numbers and strings, which torch's weights-only unpickler reads.
_DEEPSPEED_GLOBALS = [("deepspeed.runtime.zero.config", "ZeroStageEnum"),
                      ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
                      ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
                      ("deepspeed.utils.tensor_fragment", "fragment_address")]


def _safe_globals(path: str) -> list[Any]:
    """The allowlisted classes a file may name: DeepSpeed's, for DeepSpeed's state files (importing DeepSpeed only
    for those: it is slow to import)."""
    if not os.path.basename(path).endswith("_states.pt") and "universal" not in path:
        return []
    import contextlib
    import importlib
    import sys

    found = []
    # DeepSpeed's logger writes to stdout on import (an accelerator warning on a machine without GPUs); keep stdout
    # the command's own output (`pretrain generate` prints the generated text there)
    with contextlib.redirect_stdout(sys.stderr):
        for module, name in _DEEPSPEED_GLOBALS:
            try:
                found.append(getattr(importlib.import_module(module), name))
            except (ImportError, AttributeError):
                pass  # not installed (or another version): a file naming it is then refused, naming the class
    return found


def trust_checkpoint(trusted: bool) -> None:
    """`--trust-checkpoint`: full unpickling for the rest of this process (see torch_load)."""
    if trusted:
        os.environ[TRUST_ENV] = "1"


def torch_load(path: str, what: str) -> Any:
    """torch.load on CPU, memory-mapped (tensors are read from disk only when used); unreadable -> UserError.

    Loads with torch's weights-only unpickler plus an allowlist of DeepSpeed's classes, so a checkpoint from someone
    else cannot run code when it is read (a pickle can name any callable). Full unpickling is an explicit opt-in:
    PRETRAIN_TRUST_CHECKPOINT=1 (or `--trust-checkpoint` where a command has it).
    """
    trusted = os.environ.get(TRUST_ENV) == "1"
    try:
        if trusted:
            return torch.load(path, map_location="cpu", mmap=True, weights_only=False)
        with torch.serialization.safe_globals(_safe_globals(path)):
            return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as e:
        offending = re.search(r"(?:[Uu]nsupported global:? GLOBAL|unsupported GLOBAL) ([\w.]+)", str(e))
        detail = f"it names {offending.group(1)}, which is not on the allowlist" if offending else str(e)[:200]
        raise UserError(f"refusing to unpickle {what} '{path}': {detail}; if you trust where it comes from, set "
                        f"{TRUST_ENV}=1 (or pass --trust-checkpoint)") from None
    except ModuleNotFoundError as e:  # DeepSpeed's files pickle some of its own classes
        raise UserError(f"reading {what} '{path}' needs the package '{e.name}': pip install {e.name}") from None
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user problem
        raise UserError(f"cannot read {what} '{path}' ({type(e).__name__}: {e}); it is not a checkpoint of this "
                        "framework or is damaged") from None


def read_meta(path: str | os.PathLike, kind: Kind | None = None) -> dict[str, Any]:
    """Lightning's checkpoint entries other than weights and optimizer states (global_step, loops, callbacks,
    the datamodule's data position, wandb_run_id, model_config, tokenizer_json, ...), for any layout.

    DeepSpeed keeps them as client state in the (rank 0) model states file, beside its own entries (`module`,
    `param_shapes`, `dp_world_size`, `ds_config`, ...), which are returned too. Tensors stay on disk (mmap).
    `kind`: the path's checkpoint_kind, when the caller knows it already.
    """
    path = os.fspath(path)
    kind = kind or checkpoint_kind(path)
    if kind == "file":
        meta = torch_load(path, "checkpoint")
    elif kind == "dcp":
        meta = torch_load(os.path.join(path, DCP_META), "checkpoint metadata")
    else:
        model_files, _ = deepspeed_files(path)
        meta = torch_load(model_files[0], "DeepSpeed model states")
    if not isinstance(meta, dict):
        raise UserError(f"'{path}' holds a {type(meta).__name__}, not a checkpoint of this framework")
    return meta


def checkpoint_problem(path: str | os.PathLike) -> str | None:
    """Why a checkpoint cannot be resumed from (unreadable, not ours, a sharded one missing a rank's files), or None.
    Reads only the metadata (tensors stay on disk) and lists the shard files."""
    try:
        kind = checkpoint_kind(path)
        meta = read_meta(path, kind)
        if "model_config" not in meta or "global_step" not in meta:
            return "it was not written by `pretrain fit` of this framework"
        if kind == "deepspeed":
            _, optim = deepspeed_files(path)
            world = int(meta.get("dp_world_size", 1))
            if len(optim) < world or any(os.path.getsize(f) == 0 for f in optim):
                return f"it has the optimizer states of {len(optim)} of its {world} ranks"
    except UserError as e:
        return str(e)
    return None


def saved_world_size(path: str | os.PathLike) -> int | None:
    """How many data-parallel ranks wrote a sharded checkpoint (None for a single file, which any world can load)."""
    path = os.fspath(path)
    kind = checkpoint_kind(path)
    if kind == "deepspeed":
        return int(read_meta(path, kind)["dp_world_size"])
    if kind == "dcp":
        return len(glob.glob(os.path.join(path, "*.distcp")))
    return None
