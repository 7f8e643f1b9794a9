"""Resuming a sharded checkpoint on a different number of ranks.

What each library supports (torch 2.13, Lightning 2.6.6, DeepSpeed 0.19.8):

- DDP / one process: the `.ckpt` file holds the full model and optimizer state; any world size loads it.
- FSDP2 (ModelParallelStrategy): torch.distributed.checkpoint stores every tensor with its global shape and each
  rank's piece of it; `dcp.load` plans reads for the *loading* mesh, so the parameters and the AdamW moments are
  resharded on load (lightning/fabric/strategies/model_parallel.py `_load_checkpoint`, which uses
  `get_optimizer_state_dict` / `set_optimizer_state_dict`). Nothing to do here.
- DeepSpeed ZeRO-1/2/3: `DeepSpeedEngine._load_zero_checkpoint` (deepspeed/runtime/engine.py) refuses optimizer
  states saved by another data-parallel world size ("Automatic adjustment of ZeRO's optimizer state partitioning with
  a new world size is not currently supported"); Lightning loads with `load_optimizer_states=True` when fitting
  (lightning/pytorch/strategies/deepspeed.py `load_checkpoint`). DeepSpeed's answer is the *universal checkpoint*:
  `deepspeed.checkpoint.ds_to_universal` rewrites the per-rank flat partitions as one folder per parameter
  (`zero/NAME/{fp32,exp_avg,exp_avg_sq,step}.pt`, full shapes), and an engine with `checkpoint.load_universal`
  cuts its own partitions out of them (stage_1_and_2.py / stage3.py `_load_universal_checkpoint`). So on a world
  size change we convert once (rank 0, into `STEP.ckpt/universal`, beside DeepSpeed's `checkpoint` tag) and load
  that: weights, Adam moments and step counts all survive; Lightning's own state (loops, LR schedulers, data
  position, W&B run id) is in the client state as before.

  Two DeepSpeed slips are patched after the ZeRO-3 universal load (stage3.py
  `load_hp_checkpoint_state_from_checkpoint_dir_stage3`): it gives every param group the hyperparameters of group 0,
  which would put weight decay on the biases and norms of our no-decay group, so each group's saved ones are put
  back; and it shares one Adam `step` tensor between all sub-groups, which torch's AdamW then increments once per
  sub-group per step (a wrong bias correction from the second sub-group on), so each gets its own copy.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
from typing import Any, Callable

import torch
from lightning.pytorch.utilities import rank_zero_warn

from framework.checkpoint.formats import checkpoint_kind, deepspeed_tag_dir, saved_world_size, torch_load
from framework.errors import UserError

UNIVERSAL_TAG = "universal"
LATEST_UNIVERSAL = "latest_universal"


def deepspeed_load_checkpoint(strategy: Any, checkpoint_path: str, load: Callable[[str], dict[str, Any]]) -> dict:
    """`DeepSpeedStrategy.load_checkpoint` on any world size: `load(path)` is Lightning's loader; when the
    checkpoint was written by another data-parallel world size, it first becomes a universal checkpoint and the
    engine loads that instead. Returns Lightning's checkpoint dict (DeepSpeed's client state)."""
    path = strategy.broadcast(os.fspath(checkpoint_path))
    fitting = strategy.lightning_module.trainer.state.fn == "fit"
    if strategy.load_full_weights:  # Lightning's option to start ZeRO-3 from one consolidated file
        return load(path)
    if checkpoint_kind(path) != "deepspeed":
        raise UserError(f"'{path}' is not a DeepSpeed checkpoint; a DeepSpeed run resumes only from a checkpoint "
                        "directory written by a deepspeed_* strategy (use `pretrain export` to take the weights "
                        "of another checkpoint into a new run)")
    engine = strategy.deepspeed_engine
    if not fitting and engine.zero_optimization_partition_weights():
        return _load_zero3_weights(strategy, path)
    saved, now = saved_world_size(path), strategy.world_size
    if saved == now or not fitting:  # without optimizer states DeepSpeed reads the weights on any world size
        return load(path)
    if engine.zero_optimization_stage() == 0:
        return load(path)
    rank_zero_warn(f"resuming a DeepSpeed checkpoint written by {saved} ranks on {now}: converting it to a DeepSpeed "
                   f"universal checkpoint ({os.path.join(path, UNIVERSAL_TAG)}); weights, optimizer states, step and "
                   "data position are all restored")
    error = None
    if strategy.is_global_zero:  # one writer; the directory must be shared by all nodes, as for any DeepSpeed resume
        try:
            to_universal(path)
        except Exception as e:  # noqa: BLE001 - every rank must learn of it, not wait for rank 0 forever
            error = str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}"
    error = strategy.broadcast(error)  # also the barrier: the universal checkpoint is complete after this
    if error is not None:
        raise UserError(f"cannot resume '{path}' on {now} ranks: converting it to a DeepSpeed universal checkpoint "
                        f"failed ({error})")
    engine._config.load_universal_checkpoint = True
    try:
        state = load(path)
    finally:
        engine._config.load_universal_checkpoint = False
    if engine.zero_optimization_partition_weights():
        _fix_zero3_universal_load(engine.optimizer.optimizer, _saved_param_groups(path))
    return state


def _load_zero3_weights(strategy: Any, path: str) -> dict[str, Any]:
    """Weights only (validate/test/predict) into a ZeRO-3 engine: DeepSpeed's own path ends in
    `DeepSpeedZeRoOffload._restore_from_bit16_weights`, which that class lacks (deepspeed/runtime/engine.py
    `load_checkpoint`, 0.19). Rank 0 reads the consolidated fp32 weights one tensor at a time; each module's
    parameters are gathered, set on rank 0 and re-partitioned from it (as Lightning's `_restore_zero_state`)."""
    import deepspeed

    from framework.checkpoint.consolidate import MODEL_PREFIX
    from framework.checkpoint.reader import Checkpoint

    module = strategy.lightning_module
    checkpoint = Checkpoint(path, exports=False)
    sources = {MODEL_PREFIX + s.name: s for s in checkpoint.tensors()} if strategy.is_global_zero else {}
    loaded: set[int] = set()
    for prefix, sub in module.named_modules():
        params = list(sub.named_parameters(prefix=prefix, recurse=False))
        if not params:
            continue
        with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=0):
            for name, p in params:
                if strategy.is_global_zero and id(p) not in loaded and name in sources:
                    with torch.no_grad():
                        p.data.copy_(sources[name].load().view_as(p.data))
                    loaded.add(id(p))
    if strategy.is_global_zero:
        missing = sorted(n for n, p in module.named_parameters() if id(p) not in loaded)
        if missing:
            raise UserError(f"checkpoint '{path}' has no weights for {', '.join(missing[:3])}; it does not belong "
                            "to this model")
    return checkpoint.meta


def to_universal(path: str) -> str:
    """Convert the DeepSpeed checkpoint directory `path` to a universal checkpoint in `path/universal` (once; written
    under a temporary name and renamed, so a killed conversion is redone, never half-used). Returns its folder."""
    out = os.path.join(path, UNIVERSAL_TAG)
    if not os.path.isdir(out):
        from deepspeed.checkpoint import ds_to_universal

        tmp = os.path.join(path, f".{UNIVERSAL_TAG}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        args = argparse.Namespace(input_folder=deepspeed_tag_dir(path), output_folder=tmp, num_extract_workers=1,
                                  num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
        try:
            # it narrates every step and draws progress bars
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                ds_to_universal.main(args)
            os.replace(tmp, out)
        except OSError as e:
            raise UserError(f"cannot write the universal checkpoint into '{path}' ({e}); resuming on another world "
                            "size needs a writable checkpoint directory (copy it somewhere writable)") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    # ds_to_universal names its output folder in `latest_universal`; ours was renamed, so write it ourselves
    _write_text(os.path.join(path, LATEST_UNIVERSAL), UNIVERSAL_TAG)
    return out


def _write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _saved_param_groups(path: str) -> list[dict[str, Any]] | None:
    """The optimizer's param groups as saved by rank 0 (hyperparameters only)."""
    # memory-mapped: it also holds rank 0's partitions, which stay on disk
    state = torch_load(os.path.join(path, UNIVERSAL_TAG, "zero", "optimizer_state.pt"), "universal optimizer state")
    groups = state.get("param_groups")
    return [{k: v for k, v in g.items() if k != "params"} for g in groups] if groups else None


def _fix_zero3_universal_load(optimizer: torch.optim.Optimizer, groups: list[dict[str, Any]] | None) -> None:
    """Undo two slips of DeepSpeed's ZeRO-3 universal loader (stage3.py `load_hp_checkpoint_state_from_checkpoint_dir_
    stage3`): it gives every param group group 0's hyperparameters (weight decay on our no-decay group), and it puts
    one and the same `step` tensor into the Adam state of every sub-group, which torch's Adam increments in place
    once per sub-group per step (so from the second sub-group on, the bias correction runs ahead)."""
    if groups is not None and len(groups) == len(optimizer.param_groups):
        for group, saved in zip(optimizer.param_groups, groups):
            group.update(saved)
    for state in optimizer.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()
