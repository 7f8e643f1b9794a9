"""Strategy construction (DDP, FSDP2, DeepSpeed ZeRO 1/2/3 with offload, on CPU and GPUs) and the DeepSpeed JSON."""

from framework.distributed.deepspeed_config import build_deepspeed_config, deep_merge
from framework.distributed.strategy import (
    STRATEGIES,
    DeepSpeedStrategy,
    FSDP2Strategy,
    apply_activation_checkpointing,
    apply_fsdp2,
    is_deepspeed,
    make_strategy,
    parallelize,
)

__all__ = [
    "STRATEGIES",
    "DeepSpeedStrategy",
    "FSDP2Strategy",
    "apply_activation_checkpointing",
    "apply_fsdp2",
    "build_deepspeed_config",
    "deep_merge",
    "is_deepspeed",
    "make_strategy",
    "parallelize",
]
