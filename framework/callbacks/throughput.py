"""Tokens seen, tokens per second and model FLOPs utilization, logged every `log_every_n_steps` optimizer steps.

What a batch costs comes from the task (`batch_tokens`, `batch_flops`), so every objective reports its own.
"""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch

# Peak dense TFLOP/s per device by the math the matmuls run in (vendor datasheets, without sparsity; fp32 is the
# non-tensor-core rate, tf32 what fp32 matmuls get when torch allows TF32). Matched by substring of
# torch.cuda.get_device_name(); the first match wins, so the more specific names come first ("GH200" contains "H200",
# "A100" contains "A10"). A device without a math (V100 and T4 have no bf16) gets no MFU rather than a wrong one.
PEAK_TFLOPS: list[tuple[str, dict[str, float]]] = [
    ("GH200", {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4, "fp16": 989.4}),
    ("H200 NVL", {"fp32": 60.0, "tf32": 417.5, "bf16": 835.5, "fp16": 835.5}),
    ("H200", {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4, "fp16": 989.4}),
    ("H100 NVL", {"fp32": 60.0, "tf32": 417.5, "bf16": 835.5, "fp16": 835.5}),
    ("H100 PCIe", {"fp32": 51.2, "tf32": 378.0, "bf16": 756.0, "fp16": 756.0}),
    ("H100", {"fp32": 66.9, "tf32": 494.7, "bf16": 989.4, "fp16": 989.4}),
    ("B200", {"fp32": 75.0, "tf32": 1125.0, "bf16": 2250.0, "fp16": 2250.0}),
    ("A100", {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0, "fp16": 312.0}),
    ("A10", {"fp32": 31.2, "tf32": 62.5, "bf16": 125.0, "fp16": 125.0}),  # A10 and A10G
    ("L40S", {"fp32": 91.6, "tf32": 183.0, "bf16": 362.0, "fp16": 362.0}),
    ("L40", {"fp32": 90.5, "tf32": 90.5, "bf16": 181.0, "fp16": 181.0}),
    ("L4", {"fp32": 30.3, "tf32": 60.0, "bf16": 121.0, "fp16": 121.0}),
    ("V100", {"fp32": 15.7, "fp16": 125.0}),
    ("RTX 4090", {"fp32": 82.6, "tf32": 82.6, "bf16": 165.2, "fp16": 165.2}),
    ("RTX 3090", {"fp32": 35.6, "tf32": 35.6, "bf16": 71.0, "fp16": 71.0}),
    ("T4", {"fp32": 8.1, "fp16": 65.0}),
]


def matmul_math(precision: str) -> str | None:
    """The math a Lightning precision setting runs the matmuls in: fp32, tf32, bf16 or fp16 (None: fp64)."""
    p = str(precision)
    if p.startswith("bf16"):
        return "bf16"
    if p.startswith("16") or p.startswith("transformer-engine"):
        return "fp16"
    if p.startswith("64"):
        return None
    # "high" and "medium" let fp32 matmuls run on TF32 tensor cores (8x the fp32 rate on an A100)
    return "fp32" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def peak_flops(device_name: str, precision: str) -> float | None:
    """Peak FLOP/s of one device named `device_name` (torch.cuda.get_device_name) at `precision`, or None when the
    device or its math is not in the table."""
    math = matmul_math(precision)
    peaks = next((p for key, p in PEAK_TFLOPS if key in device_name), None)
    if math is None or peaks is None:
        return None
    tflops = peaks.get(math, peaks["fp32"] if math == "tf32" else None)  # no TF32 units: fp32 matmuls stay fp32
    return tflops * 1e12 if tflops else None


def peak_tflops(device: torch.device, precision: str = "bf16-mixed") -> float | None:
    """Peak TFLOP/s of one device at `precision`, or None when it is not a known GPU (CPU runs log no MFU)."""
    if device.type != "cuda":
        return None
    flops = peak_flops(torch.cuda.get_device_name(device), precision)
    return flops / 1e12 if flops else None


def unit(pl_module: L.LightningModule) -> str:
    """What a task's batches are counted in (its `unit`: tokens for language models, images for vision)."""
    from framework.tasks.base import PretrainTask

    return pl_module.unit if isinstance(pl_module, PretrainTask) else "tokens"


class Throughput(L.Callback):
    """Counts the tokens trained on (all ranks) and times them over windows of whole optimizer steps.

    Every micro-batch counts towards tokens_seen. A window starts when an optimizer step has finished and ends when the
    step that reaches a multiple of log_every_n_steps has finished, so it holds every micro-batch of its steps and
    their optimizer steps (global_step moves only at an optimizer step; under gradient accumulation several
    micro-batches share one). The first step of a fit (compile, warm-up) and validation runs are left out.

    tokens_seen is checkpointed, so a resumed run keeps counting from where it was. Timing reads the clock only at
    step boundaries and never syncs the device; on GPU that clock runs ahead of the device by at most the queued work
    of a step or two, which averages out over the window.
    """

    def __init__(self) -> None:
        self.tokens_seen = 0
        self._window_tokens = 0
        self._window_flops = 0
        self._window_start: float | None = None
        self._last_step = -1  # global_step at the previous micro-batch's end
        self._val_start: float | None = None
        self._peak: float | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_step, self._window_start = trainer.global_step, None
        self._peak = getattr(pl_module, "peak_tflops", None)
        self._peak = self._peak * 1e12 if self._peak else None
        if self._peak is None and pl_module.device.type == "cuda":
            self._peak = peak_flops(torch.cuda.get_device_name(pl_module.device), str(trainer.precision))

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        now = time.perf_counter()  # first: what follows (logging, a garbage collection) belongs to the next window
        tokens = pl_module.batch_tokens(batch) * trainer.world_size  # every rank trains a batch like this one
        self.tokens_seen += tokens
        self._window_tokens += tokens
        self._window_flops += pl_module.batch_flops(batch)  # this rank's
        from framework.tasks.base import logged_step

        if logged_step(trainer):  # a log call per step costs more than the rest of this hook
            pl_module.log(f"{unit(pl_module)}_seen", float(self.tokens_seen), rank_zero_only=True)
        if trainer.global_step == self._last_step:  # accumulating: this micro-batch's optimizer step is still to come
            return
        self._last_step = trainer.global_step
        if self._window_start is None:  # the first step includes compile and warm-up: start timing after it
            self._restart(now)
            return
        if trainer.global_step % max(1, trainer.log_every_n_steps) != 0:
            return
        seconds = max(now - self._window_start, 1e-9)
        pl_module.log(f"{unit(pl_module)}_per_sec", self._window_tokens / seconds, prog_bar=True, rank_zero_only=True)
        if self._peak and self._window_flops:
            pl_module.log("mfu", self._window_flops / seconds / self._peak, rank_zero_only=True)
        self._restart(now)

    def _restart(self, now: float) -> None:
        self._window_start, self._window_tokens, self._window_flops = now, 0, 0

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._val_start = time.perf_counter()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # validation inside fit is not training time: move the window's start past it
        if self._val_start is not None and self._window_start is not None:
            self._window_start += time.perf_counter() - self._val_start
        self._val_start = None

    def state_dict(self) -> dict[str, Any]:
        return {"tokens_seen": self.tokens_seen}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.tokens_seen = int(state_dict.get("tokens_seen", 0))
