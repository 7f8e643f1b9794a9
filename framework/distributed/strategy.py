"""Lightning strategy from a strategy name: ddp, fsdp (FSDP2), DeepSpeed ZeRO 1/2/3 with offload; on CPU and on GPUs.

Lightning 2.6 refuses DeepSpeed and FSDP on a CPU accelerator, but both run there over gloo, and CPU runs are how
a config is smoke-tested before it goes to GPUs. So:

- `fsdp` is FSDP2 (`torch.distributed.fsdp.fully_shard`) through Lightning's `ModelParallelStrategy`, which has no CPU
  check (the refusal in `accelerator_connector.py:_check_strategy_and_fallback` is for the FSDP1 `FSDPStrategy`).
  The model side: the task's `configure_model` calls `parallelize(module, self.trainer.strategy, block_types)`.
- `deepspeed_*` use `DeepSpeedStrategy`, Lightning's with one method overridden, `setup_environment`: on a CPU
  accelerator it skips the CUDA-only check, numbers the CPU devices and selects DeepSpeed's CPU accelerator
  (see `DeepSpeedStrategy` below). On GPUs it is Lightning's, unchanged.
"""

from __future__ import annotations

import difflib
import importlib.util
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy, Strategy
from lightning.pytorch.strategies import DeepSpeedStrategy as _LightningDeepSpeedStrategy
from torch import nn

from framework.distributed.deepspeed_config import PRECISIONS, build_deepspeed_config
from framework.errors import UserError

# name -> (ZeRO stage, offload optimizer); None for the non-DeepSpeed strategies
STRATEGIES: dict[str, tuple[int, bool] | None] = {
    "auto": None,
    "ddp": None,
    "fsdp": None,
    "deepspeed_stage_1": (1, False),
    "deepspeed_stage_2": (2, False),
    "deepspeed_stage_2_offload": (2, True),
    "deepspeed_stage_3": (3, False),
    "deepspeed_stage_3_offload": (3, True),
}

# ModelParallelStrategy refuses the others (accelerator_connector.py:_validate_precision_choice)
_FSDP_PRECISIONS = ("32-true", "bf16-mixed", "bf16-true", "16-true")


def make_strategy(
    name: str,
    *,
    precision: str,
    accelerator: str = "auto",
    micro_batch_size: int,
    accumulate_grad_batches: int = 1,
    gradient_clip_val: float | None = None,
    deepspeed_config: Mapping[str, Any] | str | Path | None = None,
    offload_params: bool = False,
    expert_parallel: int = 1,
    timeout: float | None = None,
) -> Strategy | str:
    """The Lightning strategy for `name`; pass it and the same precision/accumulation/clipping to the Trainer.

    The process count and node count are the Trainer's (`devices`, `num_nodes`); the strategy reads them when the
    Trainer sets it up. `micro_batch_size`, `accumulate_grad_batches`, `gradient_clip_val` and `precision` feed the
    generated DeepSpeed JSON; `deepspeed_config` (a dict or a JSON path) is merged over it (user wins). `offload_params`
    keeps parameters in CPU memory between uses (`fsdp`: FSDP2 CPUOffloadPolicy; `deepspeed_stage_3_offload`).
    `expert_parallel` > 1 splits MoE experts over groups of that many ranks (framework.distributed.expert_parallel).
    `timeout`: seconds a collective waits for the other ranks before it fails (None: torch's 30 min); also the time
    the ranks have to meet at start-up.
    Raises UserError for an unknown name or a combination that cannot work.
    """
    if name not in STRATEGIES:
        close = difflib.get_close_matches(name, STRATEGIES, n=1, cutoff=0.5)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise UserError(f"unknown strategy '{name}'{hint}; choose one of: {', '.join(STRATEGIES)}")
    if precision not in PRECISIONS:
        raise UserError(f"precision '{precision}' is not supported; use one of: {', '.join(PRECISIONS)}")
    if offload_params and name not in ("fsdp", "deepspeed_stage_3_offload"):
        raise UserError(f"offload_params needs strategy 'fsdp' or 'deepspeed_stage_3_offload', not '{name}'")
    if deepspeed_config is not None and not name.startswith("deepspeed"):
        raise UserError(f"deepspeed_config is set but strategy is '{name}'; use a deepspeed_* strategy or drop it")

    if isinstance(expert_parallel, bool) or not isinstance(expert_parallel, int) or expert_parallel < 1:
        raise UserError(f"distributed.expert_parallel={expert_parallel!r} must be a positive integer")
    if expert_parallel > 1 and name == "auto":
        name = "ddp"  # the one strategy that holds experts split over ranks
    if expert_parallel > 1 and name != "ddp":
        raise UserError(f"distributed.expert_parallel={expert_parallel} needs --trainer.strategy ddp, not '{name}': "
                        "fsdp and deepspeed shard or all-reduce every parameter over all ranks and cannot hold experts "
                        "split across them")
    if timeout is not None and not timeout > 0:
        raise UserError(f"distributed.timeout={timeout} must be a number of seconds > 0 (or unset: 1800)")
    pg = {} if timeout is None else {"timeout": timedelta(seconds=timeout)}
    if name == "auto":
        return "auto"
    if name == "ddp":
        strategy = DDPStrategy(**pg)
        strategy.expert_parallel = expert_parallel  # read by parallelize's expert_parallel step (configure_model)
        return strategy
    if name == "fsdp":
        if precision not in _FSDP_PRECISIONS:
            choices = ", ".join(_FSDP_PRECISIONS)
            raise UserError(f"precision '{precision}' does not work with fsdp; use one of: {choices}")
        return FSDP2Strategy(offload_params=offload_params, **pg)

    if importlib.util.find_spec("deepspeed") is None:
        raise UserError(f"strategy '{name}' needs DeepSpeed: pip install deepspeed (or 'framework[deepspeed]')")
    stage, offload_optimizer = STRATEGIES[name]
    config = build_deepspeed_config(
        stage=stage,
        precision=precision,
        micro_batch_size=micro_batch_size,
        accumulate_grad_batches=accumulate_grad_batches,
        gradient_clip_val=gradient_clip_val,
        offload_optimizer=offload_optimizer,
        offload_params=offload_params,
        pin_memory=_uses_cuda(accelerator),
        user_config=deepspeed_config,
    )
    return DeepSpeedStrategy(config, **pg)


def _uses_cuda(accelerator: str) -> bool:
    if accelerator in ("gpu", "cuda"):
        return True
    return accelerator == "auto" and torch.cuda.is_available()


class DeepSpeedStrategy(_LightningDeepSpeedStrategy):
    """Lightning's DeepSpeedStrategy, also on a CPU accelerator (gloo), as DeepSpeed itself supports.

    On CPU, Lightning stands in the way twice (lightning/pytorch/strategies/deepspeed.py, Lightning 2.6.6):
    1. `setup_environment` (lines 341-347) raises "The DeepSpeed strategy is only supported on CUDA GPUs" unless the
       accelerator is a CUDAAccelerator, then calls `DDPStrategy.setup_environment`. The check is all it adds, so on
       CPU we call the DDP one directly.
    2. `setup_distributed` (line 352, `_validate_device_index_selection`) requires device indices 0..n-1, and
       `deepspeed.initialize` gets `device_rank=root_device.index` (lines 448, 587), which DeepSpeed compares with 0
       (deepspeed/runtime/engine.py `_set_distributed_vars`). CPU devices have index None, which fails both. We number
       them `cpu:0`, `cpu:1`, ...: torch treats `cpu:N` as `cpu` (tensors moved there report `cpu`), and DeepSpeed's CPU
       accelerator ignores the index (`device_name(i) == "cpu"`), so the numbering only satisfies those two checks.
    The rest is device-agnostic: the process group backend follows the root device (gloo for CPU), and DeepSpeed is
    pointed at its own CPU accelerator (`deepspeed.accelerator.set_accelerator`, its documented override; on a GPU
    machine DeepSpeed would otherwise pick CUDA even when the Trainer runs on CPU).

    `config` is the full DeepSpeed JSON from `build_deepspeed_config`; `full_config` keeps it as generated.
    """

    def __init__(self, config: dict[str, Any], **kwargs: Any) -> None:
        self.full_config = config
        # Lightning refuses `gradient_accumulation_steps` in the JSON and sets it from Trainer(accumulate_grad_batches)
        # (DeepSpeedStrategy._format_batch_size_and_grad_accum_config); build_deepspeed_config checked they agree.
        lightning_config = {k: v for k, v in config.items() if k != "gradient_accumulation_steps"}
        super().__init__(config=lightning_config, **kwargs)

    def setup_environment(self) -> None:
        if not isinstance(self.accelerator, CPUAccelerator):
            super().setup_environment()
            return
        from deepspeed.accelerator import get_accelerator, set_accelerator
        from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

        if get_accelerator().device_name() != "cpu":
            set_accelerator(CPU_Accelerator())
        _skip_shm_allreduce_build()
        assert self.parallel_devices is not None
        self.parallel_devices = [torch.device("cpu", i) for i in range(len(self.parallel_devices))]
        DDPStrategy.setup_environment(self)

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        """Lightning's, on any world size: framework.checkpoint.reshard converts a checkpoint written by another
        number of ranks to a DeepSpeed universal checkpoint first (optimizer states included)."""
        from framework.checkpoint.reshard import deepspeed_load_checkpoint

        return deepspeed_load_checkpoint(self, checkpoint_path, lambda p: super(DeepSpeedStrategy, self)
                                         .load_checkpoint(p, weights_only))


def _skip_shm_allreduce_build() -> None:
    """Keep DeepSpeed's CPU backend from JIT-compiling its shared-memory allreduce op as its process group starts
    (deepspeed/comm/torch.py `build_shm_op`: a C++ build of 25-60 s on 2 cores the first time, with every rank racing
    for the build lock). Only its inference tensor-parallel path uses that op (`inference_all_reduce`); training's
    collectives are torch.distributed's (gloo). DeepSpeed skips the build where its probe found the op incompatible
    (no compiler), which is what this entry of its probe result says; the probe's dict is cached in the module, so
    the entry holds for the rest of the process."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


class FSDP2Strategy(ModelParallelStrategy):
    """FSDP2 over all processes: a 1-D data-parallel mesh of world size (no tensor parallelism).

    `ModelParallelStrategy` defaults to data_parallel = num_nodes, tensor_parallel = devices per node; pure FSDP wants
    data_parallel = world size, which is only known once the Trainer has set devices and nodes, so it is set here.
    The sharding itself is applied by the model (`configure_model` -> `parallelize`), with this strategy's mesh.
    """

    def __init__(self, *, offload_params: bool = False, reshard_after_forward: bool = True, **kwargs: Any) -> None:
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1, **kwargs)
        self.offload_params = offload_params
        self.reshard_after_forward = reshard_after_forward

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()


def apply_activation_checkpointing(module: nn.Module, block_types: tuple[type[nn.Module], ...]) -> None:
    """Recompute each block's activations in backward instead of storing them (non-reentrant).

    Uses torch's composable `checkpoint` (forward hooks) rather than `CheckpointWrapper` modules: parameter names stay
    the same with or without checkpointing (checkpoints stay interchangeable), and no module is constructed here,
    which matters under ZeRO-3, where Lightning runs `configure_model` inside `deepspeed.zero.Init` and building a
    `CheckpointWrapper` there recurses forever (its `__getattr__` vs DeepSpeed's patched `__init__`).
    """
    from torch.distributed._composable import checkpoint
    from torch.distributed._composable.contract import _get_registry

    for block in module.modules():
        # configure_model runs again for each Trainer entry point (fit, validate, ...): apply once
        if isinstance(block, block_types) and "checkpoint" not in (_get_registry(block) or {}):
            checkpoint(block)


def apply_fsdp2(
    module: nn.Module,
    block_types: tuple[type[nn.Module], ...],
    *,
    mesh: Any = None,
    reshard_after_forward: bool = True,
    offload_params: bool = False,
    mp_policy: Any = None,
) -> nn.Module:
    """Shard `module` with FSDP2: each block of `block_types` is one unit (gathered just for its forward/backward),
    then the root holds the rest (embeddings, head). Call it once, from `LightningModule.configure_model`.
    Idempotent: an already sharded module is returned as is.
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    if isinstance(module, FSDPModule):
        return module
    # pinned host memory needs CUDA; on a CPU mesh the "offloaded" params are where they were anyway
    on_cuda = (mesh.device_type if mesh is not None else ("cuda" if torch.cuda.is_available() else "cpu")) == "cuda"
    kwargs: dict[str, Any] = {
        "mesh": mesh,
        "offload_policy": CPUOffloadPolicy(pin_memory=on_cuda) if offload_params else OffloadPolicy(),
        "mp_policy": mp_policy or MixedPrecisionPolicy(),
    }
    blocks = [m for m in module.modules() if isinstance(m, block_types)]
    if not blocks:
        names = ", ".join(t.__name__ for t in block_types)
        raise ValueError(f"apply_fsdp2: no submodule of type {names} in {type(module).__name__}")
    for block in blocks:
        fully_shard(block, reshard_after_forward=reshard_after_forward, **kwargs)
    # the root's parameters are needed again right at the start of backward: keep them gathered
    fully_shard(module, reshard_after_forward=False, **kwargs)
    return module


def is_deepspeed(strategy: Any) -> bool:
    """Whether `strategy` is a DeepSpeed one (ours or Lightning's): it keeps gradients and clips them itself."""
    return type(strategy).__name__ == "DeepSpeedStrategy" or "deepspeed" in type(strategy).__module__


def parallelize(
    module: nn.Module,
    strategy: Strategy,
    block_types: tuple[type[nn.Module], ...],
    *,
    activation_checkpointing: bool = False,
) -> nn.Module:
    """Everything a strategy needs done to the model itself; call from `configure_model` for every strategy.

    Activation checkpointing of each block (any strategy), then FSDP2 sharding when the strategy is `FSDP2Strategy`.
    DDP and DeepSpeed wrap the model themselves after `configure_model`; under ZeRO-3 Lightning runs `configure_model`
    inside `deepspeed.zero.Init`, so a model built there is partitioned as it is created.
    Example (the task's hook): `parallelize(self.model, self.trainer.strategy, (Block,), activation_checkpointing=True)`
    """
    if isinstance(strategy, DeepSpeedStrategy) and strategy.zero_stage_3 and hasattr(module, "init_weights"):
        # Under ZeRO-3 each parameter is partitioned the moment its module is built, so the model's own init ran on
        # empty shards. Initialize again, one module at a time, with its parameters gathered (rank 0's values win).
        import deepspeed

        module.init_weights(gather=lambda m: deepspeed.zero.GatheredParameters(
            list(m.parameters(recurse=False)), modifier_rank=0))
    if activation_checkpointing:
        apply_activation_checkpointing(module, block_types)
    if isinstance(strategy, FSDP2Strategy):
        apply_fsdp2(
            module,
            block_types,
            mesh=strategy.device_mesh["data_parallel"],
            reshard_after_forward=strategy.reshard_after_forward,
            offload_params=strategy.offload_params,
        )
    return module
