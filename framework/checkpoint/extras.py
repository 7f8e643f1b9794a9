"""What a checkpoint holds beyond Lightning's weights, optimizer and loops: called from PretrainTask's hooks.

- run metadata: package versions and the git commit (key "framework"), also logged to W&B;
- RNG states (key "rng_states"): each rank's own CPU and CUDA generator, gathered so that any rank's file has all;
- frozen-backbone records (key "frozen_from"): a linear/LoRA fine-tune's single-file checkpoint leaves out the
  frozen tensors that came unchanged from init_from, and records where they are (framework.checkpoint.reader);
- auxiliary-model records (key "aux_models"): the frozen models a task holds beside its trained one (a teacher)
  are never saved; the checkpoint records each one's source path and tensor fingerprints, and a resume refuses a
  source that has changed since (see PretrainTask.aux_models).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from framework.errors import UserError

AUX_KEY = "aux_models"


# ---------------------------------------------------------------- run metadata
def run_metadata() -> dict[str, Any]:
    """What ran: package versions and the git commit, for checkpoints and W&B."""
    import platform

    import lightning

    import framework

    return {"framework": framework.__version__, "torch": str(torch.__version__),
            "lightning": str(lightning.__version__), "python": platform.python_version(), "git_sha": git_sha()}


def git_sha() -> str | None:
    """The commit of the working directory's repository (None outside git): cheap, no subprocess."""
    head = None
    d = os.path.abspath(os.getcwd())
    while True:
        if os.path.isdir(os.path.join(d, ".git")):
            head = os.path.join(d, ".git")
            break
        parent = os.path.dirname(d)
        if parent == d:
            return None
        d = parent
    try:
        ref = open(os.path.join(head, "HEAD")).read().strip()
        if ref.startswith("ref: "):
            path = os.path.join(head, ref[5:])
            if os.path.exists(path):
                return open(path).read().strip()
            for line in open(os.path.join(head, "packed-refs")).read().splitlines():
                if line.endswith(ref[5:]):
                    return line.split()[0]
            return None
        return ref
    except OSError:
        return None


# ---------------------------------------------------------------- RNG states
def rng_states(device: torch.device) -> dict[str, Any]:
    """Every rank's RNG states, for checkpoint["rng_states"] (a collective when a process group is up: call it on
    every rank). Lightning does not checkpoint RNG states; dropout and sampling after a resume must continue the same
    streams. Each rank's own: its CPU generator and its own CUDA device's (ranks' streams may differ, and a node may
    see fewer GPUs on resume, so states are never kept per visible device)."""
    own = {"torch": torch.get_rng_state(),
           "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() and device.type == "cuda" else None}
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        per_rank: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(per_rank, own)
    else:
        per_rank = [own]
    return {"per_rank": per_rank}


def restore_rng(states: dict[str, Any], rank: int, world: int, device: torch.device) -> None:
    """Set this rank's generators from checkpoint["rng_states"] (at fit start: Lightning seeds again after it loads
    the checkpoint). On another world size every rank continues rank 0's streams, with a warning."""
    from lightning.pytorch.utilities import rank_zero_warn

    per_rank = states.get("per_rank") or [{"torch": states["torch"], "cuda": None}]  # older: rank 0's CPU state
    if len(per_rank) != world:
        rank_zero_warn(f"the checkpoint's RNG states are from {len(per_rank)} rank(s), this run has {world}: "
                       "every rank continues rank 0's streams")
    own = per_rank[rank] if len(per_rank) == world else per_rank[0]
    torch.set_rng_state(own["torch"])
    if own["cuda"] is not None and torch.cuda.is_available() and device.type == "cuda":
        torch.cuda.set_rng_state(own["cuda"])


# ---------------------------------------------------------------- checkpoints without a frozen backbone
def leave_out_frozen(checkpoint: dict[str, Any], model: nn.Module, init_from: str, prefix: str,
                     record: dict[str, Any] | None) -> dict[str, Any] | None:
    """A single-file checkpoint (one process, DDP) of a frozen-backbone fine-tune keeps only what it trains: the
    frozen tensors are recorded with init_from's real path and a fingerprint each (reader.frozen_record), and
    every reader gets them back from there. Call only for single-file strategies (FSDP2 and DeepSpeed write every
    tensor through their own formats). `record`: the one made before in this run (None: made here). Returns it."""
    from framework.checkpoint.consolidate import MODEL_PREFIX
    from framework.checkpoint.reader import FROZEN_KEY, frozen_record

    state = checkpoint.get("state_dict")
    if state is None:
        return record
    if record is None:
        record = frozen_record(model, init_from, prefix)
    for name in record["tensors"]:
        state.pop(MODEL_PREFIX + name, None)
    checkpoint[FROZEN_KEY] = record
    return record


def restore_frozen(checkpoint: dict[str, Any], init_from: str | None, ckpt_path: str) -> dict[str, Any] | None:
    """The frozen tensors a checkpoint left out, read back from its pre-trained source into its state dict (a
    source that moved is looked for at this run's `init_from`). Returns the record (None: nothing left out), which
    later checkpoints of the run reuse."""
    from framework.checkpoint.consolidate import MODEL_PREFIX
    from framework.checkpoint.reader import FROZEN_KEY, frozen_sources, real_source, source_exists

    record, state = checkpoint.get(FROZEN_KEY), checkpoint.get("state_dict")
    if record is None or state is None:
        return None
    if not source_exists(record["path"]) and init_from is not None and source_exists(init_from):
        record = {**record, "path": real_source(init_from)}  # moved: this run's init_from says where
    have = {k.removeprefix(MODEL_PREFIX) for k in state}
    for source in frozen_sources(record, have, ckpt_path):
        state[MODEL_PREFIX + source.name] = source.load()
    return record


# ---------------------------------------------------------------- auxiliary frozen models
def aux_record(path: str) -> dict[str, Any]:
    """What a checkpoint keeps of an auxiliary model instead of its weights: the source's real path and each tensor's
    shape, dtype and fingerprint, read from the source itself (no process group, any strategy)."""
    from framework.checkpoint.reader import fingerprint, open_checkpoint, real_source

    tensors = open_checkpoint(path).weights()
    out = {}
    for name in sorted(tensors):
        t = tensors[name].load()
        out[name] = {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."), **fingerprint(t)}
        del t
    return {"path": real_source(path), "tensors": out}


def check_aux(saved: dict[str, Any], name: str, current: dict[str, Any], ckpt: str) -> None:
    """One line when the auxiliary model `name` of this run is not the one checkpoint `ckpt` trained with."""
    from framework.checkpoint.reader import same_fingerprint

    old, new = saved["tensors"], current["tensors"]
    differs = sorted(set(old) ^ set(new)) or [n for n in sorted(old) if old[n]["shape"] != new[n]["shape"]
                                              or not same_fingerprint(new[n], old[n])]
    if differs:
        raise UserError(f"the auxiliary model '{name}' at '{current['path']}' differs from the one checkpoint '{ckpt}' "
                        f"was trained with (from '{saved['path']}'; tensor {differs[0]} differs): resume with the "
                        "same weights, or start a new run")
