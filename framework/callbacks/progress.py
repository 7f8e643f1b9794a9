"""The console during `pretrain fit`: what runs and where its W&B run is, then progress (step, loss, tokens/s, ETA).

On a terminal that is Lightning's tqdm bar; in a log file (stdout not a TTY: SLURM, CI, `| tee`) a redrawn bar
becomes hundreds of lines, so there it is one plain line every `every_n_steps` optimizer steps and one per validation.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ProgressBar, TQDMProgressBar
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.model_summary import get_human_readable_count

from framework.callbacks.throughput import unit
from framework.callbacks.wandb_run import run_location


def describe_run(trainer: L.Trainer, pl_module: L.LightningModule) -> str:
    """One line in place of Lightning's model summary table (whose FLOPs column reads 0 without an example input),
    and one per W&B run (W&B's own lines are silenced)."""
    # ZeRO-3 keeps a partition of each parameter on a rank (ds_numel is the whole); FSDP2 DTensors count whole already
    params = sum(getattr(p, "ds_numel", p.numel()) for p in pl_module.parameters())
    model = getattr(pl_module, "model", None)
    name = type(model).__name__ if model is not None else type(pl_module).__name__
    preset = getattr(pl_module, "preset", "")
    ranks = str(trainer.num_devices)
    if trainer.num_nodes > 1:
        ranks = f"{trainer.num_nodes} node(s) x {ranks}"
    lines = [f"{name}{f' ({preset})' if preset else ''}: {get_human_readable_count(params)} parameters   "
             f"{trainer.precision} on {ranks} {trainer.strategy.root_device.type}   max_steps {trainer.max_steps}   "
             f"accumulate {trainer.accumulate_grad_batches}"]
    lines += [run_location(lg) for lg in trainer.loggers if isinstance(lg, WandbLogger)]
    return "\n".join(lines)


def _fmt_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class LineProgress(ProgressBar):
    """Plain progress lines for logs: `step 200/600  loss 2.3190  1,234 tokens/s  elapsed 0:01:10  eta 0:02:20`.

    every_n_steps: optimizer steps between lines (default: trainer.log_every_n_steps, when loss and tokens/s are new).
    """

    def __init__(self, every_n_steps: int | None = None) -> None:
        super().__init__()
        self.every_n_steps = every_n_steps
        self._enabled = True
        self._start: float | None = None
        self._start_step = 0
        self._last_printed = -1

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def _print(self, line: str) -> None:
        if self._enabled:
            print(line, flush=True)

    @rank_zero_only
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start, self._start_step = time.perf_counter(), trainer.global_step
        self._print(describe_run(trainer, pl_module))

    @rank_zero_only
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        every = self.every_n_steps or max(1, trainer.log_every_n_steps)
        # once per optimizer step (micro-batches of an accumulation share a global_step), and always at the last one
        if step == self._last_printed or (step % every and step != trainer.max_steps):
            return
        self._last_printed = step
        metrics = trainer.callback_metrics
        line = f"step {step}/{trainer.max_steps}" if trainer.max_steps > 0 else f"step {step}"
        if "train/loss" in metrics:
            line += f"  loss {float(metrics['train/loss']):.4f}"
        rate = f"{unit(pl_module)}_per_sec"
        if rate in metrics:
            line += f"  {float(metrics[rate]):,.0f} {unit(pl_module)}/s"
        elapsed = time.perf_counter() - (self._start or time.perf_counter())
        line += f"  elapsed {_fmt_duration(elapsed)}"
        done = step - self._start_step
        if done > 0 and trainer.max_steps > step:
            line += f"  eta {_fmt_duration(elapsed / done * (trainer.max_steps - step))}"
        self._print(line)

    @rank_zero_only
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return  # `pretrain validate` prints Lightning's results table instead
        metrics = trainer.callback_metrics
        values = "  ".join(f"{k} {float(v):.4f}" for k, v in sorted(metrics.items()) if k.startswith("val/"))
        if values:
            self._print(f"validation at step {trainer.global_step}: {values}")


class BarProgress(TQDMProgressBar):
    """Lightning's tqdm bar for terminals, after the one-line description of the run, without the logger's version."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            print(describe_run(trainer, pl_module), flush=True)
        super().on_train_start(trainer, pl_module)

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics


def progress_for(stream: Any = None) -> ProgressBar:
    """A tqdm bar on a terminal, plain lines otherwise."""
    stream = stream if stream is not None else sys.stdout
    return BarProgress() if getattr(stream, "isatty", lambda: False)() else LineProgress()
