"""The DeepSpeed JSON, generated from the run and overridden by the user's own JSON.

The run (micro-batch, accumulation, clipping, precision, ZeRO stage, offload) is the single source of truth for
the batch shape; a user JSON may change anything else (bucket sizes, offload buffers, ...), key by key (deep merge,
user wins).
No DeepSpeed import here: the config is plain data, so it can be built, recorded and tested without DeepSpeed installed.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from framework.errors import UserError

# Lightning precision flag -> DeepSpeed section. 32-bit needs no section (DeepSpeed then trains in fp32).
_BF16 = ("bf16-mixed", "bf16-true")
_FP16 = ("16-mixed", "16-true")
_FP32 = ("32-true",)
PRECISIONS = _FP32 + _BF16 + _FP16

# The batch shape comes from the run; a user JSON may repeat these keys only with the same values.
# (Lightning also refuses `gradient_accumulation_steps` in the JSON: it sets it from Trainer(accumulate_grad_batches).)
_RUN_OWNED = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of `base` with `override` merged in: nested dicts merge key by key, anything else in `override` wins."""
    out = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_user_config(config: Mapping[str, Any] | str | Path | None) -> dict[str, Any]:
    """A user-supplied DeepSpeed config as a dict: a dict as is, or a path to a JSON file."""
    if config is None:
        return {}
    if isinstance(config, Mapping):
        return copy.deepcopy(dict(config))
    path = Path(config)
    if not path.is_file():
        raise UserError(f"deepspeed_config: file '{path}' does not exist; pass a path to a DeepSpeed JSON file")
    try:
        loaded = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"deepspeed_config: '{path}' is not valid JSON ({e}); fix the file") from None
    if not isinstance(loaded, dict):
        raise UserError(f"deepspeed_config: '{path}' must hold a JSON object, not {type(loaded).__name__}")
    return loaded


def precision_section(precision: str) -> dict[str, Any]:
    """The bf16/fp16 part of a DeepSpeed config for a Lightning precision flag."""
    if precision in _BF16:
        return {"bf16": {"enabled": True}}
    if precision in _FP16:
        # dynamic loss scaling (loss_scale 0): DeepSpeed's and Lightning's defaults, written out for the record
        return {
            "fp16": {
                "enabled": True,
                "loss_scale": 0,
                "initial_scale_power": 16,
                "loss_scale_window": 1000,
                "hysteresis": 2,
                "min_loss_scale": 1,
            }
        }
    if precision in _FP32:
        return {}
    raise UserError(f"precision '{precision}' is not supported with DeepSpeed; use one of: {', '.join(PRECISIONS)}")


def build_deepspeed_config(
    *,
    stage: int,
    precision: str,
    micro_batch_size: int,
    accumulate_grad_batches: int,
    gradient_clip_val: float | None,
    offload_optimizer: bool = False,
    offload_params: bool = False,
    pin_memory: bool = False,
    user_config: Mapping[str, Any] | str | Path | None = None,
) -> dict[str, Any]:
    """The full DeepSpeed config for a run: generated fields, then the user's JSON merged over them (user wins).

    `pin_memory` pins the offloaded CPU buffers; it needs CUDA, so pass True only on GPUs.
    Raises UserError when the user JSON contradicts the run's batch shape.
    """
    if stage not in (1, 2, 3):
        raise UserError(f"DeepSpeed ZeRO stage must be 1, 2 or 3, got {stage}")
    if offload_params and stage != 3:
        raise UserError("offload_params needs ZeRO stage 3 (strategy 'deepspeed_stage_3_offload')")
    if offload_optimizer and stage == 1:
        raise UserError(
            "optimizer offload needs ZeRO stage 2 or 3 ('deepspeed_stage_2_offload', 'deepspeed_stage_3_offload')"
        )
    if micro_batch_size < 1 or accumulate_grad_batches < 1:
        raise UserError(
            f"micro_batch_size ({micro_batch_size}) and accumulate_grad_batches ({accumulate_grad_batches})"
            " must be >= 1"
        )

    zero: dict[str, Any] = {"stage": stage, "contiguous_gradients": True, "overlap_comm": True}
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pin_memory}
    if offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": pin_memory}

    generated: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": accumulate_grad_batches,
        "gradient_clipping": float(gradient_clip_val or 0.0),
        # The optimizer comes from the LightningModule (e.g. torch.optim.AdamW), not from this JSON: let ZeRO wrap
        # it, and let it run offloaded too (DeepSpeedCPUAdam is faster but is a C++ op that JIT-compiles on first use).
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "zero_optimization": zero,
        **precision_section(precision),
    }

    user = load_user_config(user_config)
    for key in _RUN_OWNED:
        if key in user and user[key] != generated[key]:
            raise UserError(
                f"deepspeed_config sets {key}={user[key]} but the run has {generated[key]}; "
                "remove it from the DeepSpeed JSON and set micro_batch_size / accumulate_grad_batches in the run config"
            )
    if "train_batch_size" in user:
        raise UserError(
            "deepspeed_config sets train_batch_size; remove it: the global batch is "
            "micro_batch_size x accumulate_grad_batches x world size from the run config"
        )
    return deep_merge(generated, user)
