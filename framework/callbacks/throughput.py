"""Tokens seen, tokens per second and model FLOPs utilization, logged every `log_every_n_steps`.

What a batch costs comes from the task (`batch_tokens`, `batch_flops`), so every objective reports its own.
"""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch

# Peak dense bf16/fp16 tensor-core TFLOP/s per device (vendor datasheets, without sparsity). Matched by substring of
# torch.cuda.get_device_name(); the first match wins, so the more specific names come first.
PEAK_TFLOPS: list[tuple[str, float]] = [
    ("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("GH200", 989.0), ("B200", 2250.0),
    ("A100", 312.0), ("A10G", 125.0), ("A10", 125.0), ("L40S", 362.0), ("L4", 121.0), ("V100", 125.0),
    ("RTX 4090", 165.0), ("RTX 3090", 71.0), ("T4", 65.0),
]


def peak_tflops(device: torch.device) -> float | None:
    """Peak TFLOP/s of one device, or None when it is not a known GPU (CPU runs log no MFU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tf for key, tf in PEAK_TFLOPS if key in name), None)


class Throughput(L.Callback):
    """Counts the tokens trained on (all ranks) and times them over a window of steps.

    tokens_seen is checkpointed, so a resumed run keeps counting from where it was. Timing reads the clock only at
    window boundaries; on GPU that clock runs ahead of the device by at most the queued work of a step or two,
    which averages out over the window.
    """

    def __init__(self) -> None:
        self.tokens_seen = 0
        self._window_tokens = 0
        self._window_flops = 0
        self._window_start: float | None = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step_tokens = pl_module.batch_tokens(batch) * trainer.world_size  # every rank trains a batch like this one
        self.tokens_seen += step_tokens
        self._window_tokens += step_tokens
        self._window_flops += pl_module.batch_flops(batch)  # this rank's
        pl_module.log("tokens_seen", float(self.tokens_seen), rank_zero_only=True)
        now = time.perf_counter()
        if self._window_start is None:  # the first step includes compile and warm-up: start timing after it
            self._window_start, self._window_tokens, self._window_flops = now, 0, 0
            return
        if (trainer.global_step % max(1, trainer.log_every_n_steps)) != 0:
            return
        seconds = max(now - self._window_start, 1e-9)
        pl_module.log("tokens_per_sec", self._window_tokens / seconds, rank_zero_only=True)
        peak = getattr(pl_module, "peak_tflops", None) or peak_tflops(pl_module.device)
        if peak and self._window_flops:
            pl_module.log("mfu", self._window_flops / seconds / (peak * 1e12), rank_zero_only=True)
        self._window_start, self._window_tokens, self._window_flops = now, 0, 0

    def state_dict(self) -> dict[str, Any]:
        return {"tokens_seen": self.tokens_seen}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.tokens_seen = int(state_dict.get("tokens_seen", 0))
