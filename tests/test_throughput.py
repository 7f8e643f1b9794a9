"""Throughput: tokens/s and MFU cover whole optimizer steps (all micro-batches and the optimizer step), tokens_seen
counts every micro-batch, and the peak FLOP/s behind MFU depends on the precision."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers.logger import Logger

from framework.callbacks.throughput import Throughput, peak_flops
from framework.data.datamodule import ShardDataModule
from framework.tasks.causal_lm import CausalLMTask

ROOT = Path(__file__).parent.parent
ACCUMULATE, BATCH, SEQ = 4, 4, 32
SLOW_STEP_S = 0.15  # an optimizer step much slower than a micro-batch, as under ZeRO offload


@pytest.fixture(scope="module")
def shards(text_shards) -> Path:
    """test_fit's corpus (conftest.py, shared by the run)."""
    return text_shards("lines", 0.1)


class MetricsLog(Logger):
    """Keeps what Lightning hands its loggers, in memory."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[int, dict[str, float]]] = []

    name, version = "memory", "0"

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.rows.append((step, dict(metrics)))

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def values(self, key: str) -> list[float]:
        return [m[key] for _, m in self.rows if key in m]


class SlowOptimizerStep(L.Callback):
    """Sleeps before every optimizer step and in every validation batch; notes the clock when each optimizer step has
    finished and how long each validation took. Runs just before Throughput, so both read the clock at nearly the same
    moment (on this loaded 2-core machine, anything run between the two reads can stall for a tenth of a second)."""

    def __init__(self) -> None:
        self.step_ends: dict[int, float] = {}
        self.validations: list[tuple[float, float]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        time.sleep(SLOW_STEP_S)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.step_ends.setdefault(trainer.global_step, time.perf_counter())

    def on_validation_start(self, trainer, pl_module) -> None:
        self.validations.append((time.perf_counter(), 0.0))

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        time.sleep(SLOW_STEP_S)

    def on_validation_end(self, trainer, pl_module) -> None:
        self.validations[-1] = (self.validations[-1][0], time.perf_counter())

    def training_seconds(self, a: int, b: int) -> float:
        """Wall-clock seconds from the end of step a to the end of step b, less the validations in between."""
        start, end = self.step_ends[a], self.step_ends[b]
        return end - start - sum(v1 - v0 for v0, v1 in self.validations if start <= v0 and v1 <= end)


def fit(shards: Path, tmp: Path, max_steps: int, log_every: int, peak_tflops: float | None = None,
        **trainer_args) -> tuple[Throughput, SlowOptimizerStep, MetricsLog, CausalLMTask]:
    throughput, clock, log = Throughput(), SlowOptimizerStep(), MetricsLog()
    L.seed_everything(0)
    task = CausalLMTask(preset="gpt-tiny", warmup_steps=0, peak_tflops=peak_tflops)
    data = ShardDataModule(path=str(shards), seq_len=SEQ, batch_size=BATCH, num_workers=0, shuffle_block=8)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, accumulate_grad_batches=ACCUMULATE,
                        log_every_n_steps=log_every, logger=log, callbacks=[clock, throughput],
                        default_root_dir=str(tmp), enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, num_sanity_val_steps=0, **trainer_args)
    trainer.fit(task, datamodule=data)
    return throughput, clock, log, task


def test_tokens_per_sec_covers_whole_optimizer_steps(shards, tmp_path):
    """With 4 micro-batches per step and a slow optimizer step, each logged tokens/s equals the tokens of its steps
    over the wall-clock time from the end of the step before them to the end of the last one, within 5%. A (slow)
    validation after steps 2 and 4 is not training time: it is left out of both."""
    _, clock, log, _ = fit(shards, tmp_path, max_steps=6, log_every=2, limit_val_batches=1,
                        val_check_interval=2 * ACCUMULATE)  # counted in micro-batches
    assert len(clock.validations) == 3
    tokens_per_step = ACCUMULATE * BATCH * SEQ  # a window of SEQ + 1 tokens trains SEQ
    logged = log.values("tokens_per_sec")
    # timing starts after step 1 (compile and warm-up): the windows are step 2, steps 3-4, steps 5-6
    windows = [(1, 2), (2, 4), (4, 6)]
    true = [(b - a) * tokens_per_step / clock.training_seconds(a, b) for a, b in windows]
    assert len(logged) == len(true)
    for got, want in zip(logged, true):
        assert got == pytest.approx(want, rel=0.05)


def test_tokens_seen_counts_every_micro_batch(shards, tmp_path):
    """3 optimizer steps of 4 micro-batches: 12 batches counted, in the callback's state and in what was logged.
    MFU (here against a stated peak of 1 TFLOP/s, as on a device not in the table) covers the same window."""
    throughput, _, log, task = fit(shards, tmp_path, max_steps=3, log_every=1, peak_tflops=1.0, limit_val_batches=0)
    expected = 3 * ACCUMULATE * BATCH * SEQ  # a window of SEQ + 1 tokens trains SEQ
    assert throughput.state_dict() == {"tokens_seen": expected}
    assert log.values("tokens_seen")[-1] == expected
    rates, mfus = log.values("tokens_per_sec"), log.values("mfu")
    assert len(rates) == len(mfus) == 2  # steps 2 and 3: step 1 (warm-up) is not timed
    flops_per_token = task.model.flops_per_token(SEQ)
    for rate, mfu in zip(rates, mfus):
        assert mfu * 1e12 / rate == pytest.approx(flops_per_token, rel=1e-3)


def test_step_metrics_are_logged_on_logged_steps_and_the_last(shards, tmp_path):
    """Step metrics are logged only where Lightning hands them to the loggers (every log_every_n_steps steps), and
    at the last step, for the run summary: 5 steps logging every 2 give the loggers 2 rows, each with train/loss,
    lr, grad_norm and tokens_seen, and leave the last step's values in callback_metrics."""
    throughput, _, log, task = fit(shards, tmp_path, max_steps=5, log_every=2, limit_val_batches=0)
    rows = [m for _, m in log.rows if "train/loss" in m]
    assert len(rows) == 2, log.rows
    for m in rows:
        assert {"lr", "grad_norm", "tokens_seen"} <= set(m)
    assert rows[-1]["tokens_seen"] == 4 * ACCUMULATE * BATCH * SEQ
    last = task.trainer.callback_metrics
    assert float(last["tokens_seen"]) == throughput.tokens_seen == 5 * ACCUMULATE * BATCH * SEQ
    assert float(last["lr"]) == pytest.approx(task.lr_at(4))
    assert float(last["train/loss"]) != pytest.approx(rows[-1]["train/loss"])  # the fifth step's, not the fourth's


def test_peak_flops_depend_on_the_precision():
    h100 = "NVIDIA H100 80GB HBM3"
    assert peak_flops(h100, "bf16-mixed") == pytest.approx(989.4e12)
    assert peak_flops(h100, "16-mixed") == pytest.approx(989.4e12)
    default = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert peak_flops(h100, "32-true") == pytest.approx(66.9e12)  # plain fp32: 1/15 of the bf16 peak
        torch.set_float32_matmul_precision("high")  # fp32 matmuls on TF32 tensor cores
        assert peak_flops(h100, "32-true") == pytest.approx(494.7e12)
        assert peak_flops("Tesla V100-SXM2-16GB", "32-true") == pytest.approx(15.7e12)  # no TF32 units
    finally:
        torch.set_float32_matmul_precision(default)
    assert peak_flops("NVIDIA H100 PCIe", "bf16-mixed") == pytest.approx(756e12)
    assert peak_flops("NVIDIA H200", "bf16-mixed") == pytest.approx(989.4e12)  # dense, not the sparsity figure
    assert peak_flops("NVIDIA A100-SXM4-80GB", "bf16-true") == pytest.approx(312e12)
    assert peak_flops("Tesla V100-SXM2-16GB", "bf16-mixed") is None  # no bf16 units: no MFU rather than a wrong one
    assert peak_flops("Some Future GPU", "bf16-mixed") is None
    assert peak_flops(h100, "64-true") is None


# ---------------------------------------------------------------------------------------------------- console

def run_fit(shards: Path, tmp: Path, *extra: str, **env: str) -> subprocess.CompletedProcess:
    """`pretrain fit` as a user runs it, stdout and stderr to pipes (not a terminal), W&B offline."""
    config = {"model": {"class_path": "framework.tasks.causal_lm.CausalLMTask",
                        "init_args": {"preset": "gpt-tiny", "warmup_steps": 0}},
              "data": {"path": str(shards), "seq_len": SEQ, "batch_size": BATCH, "num_workers": 0},
              "trainer": {"default_root_dir": str(tmp / "run"), "accelerator": "cpu", "max_steps": 8,
                          "log_every_n_steps": 4, "val_check_interval": 8, "check_val_every_n_epoch": None,
                          "limit_val_batches": 2},
              "summary": {"sample_tokens": 0}}
    (tmp / "config.json").write_text(json.dumps(config))
    env = {**{k: v for k, v in os.environ.items() if k != "PRETRAIN_VERBOSE"}, "WANDB_MODE": "offline",
           "PYTHONPATH": str(ROOT), **env}
    r = subprocess.run([sys.executable, "-m", "framework", "fit", "--config", str(tmp / "config.json"), *extra],
                       capture_output=True, text=True, env=env, cwd=tmp, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


NOISE = ["litlogger", "LeafSpec", "Total Flops", "wandb:", "srun", "GPU available"]


def test_console_is_one_line_per_n_steps_and_ends_with_our_summary(shards, tmp_path):
    r = run_fit(shards, tmp_path)
    out = r.stdout + r.stderr
    assert [n for n in NOISE if n in out] == []
    assert "\r" not in out  # no redrawn bar in a log file
    lines = r.stdout.splitlines()
    assert lines[0].startswith("GPT (gpt-tiny): ") and lines[1].startswith("W&B (offline) run ")
    progress = [line for line in lines if line.startswith("step ")]
    assert [p.split()[1] for p in progress] == ["4/8", "8/8"] and "tokens/s" in progress[-1]
    assert any(line.startswith("validation at step 8: val/loss") for line in lines)
    assert r.stdout.rstrip().splitlines()[-1].startswith("  upload it with: wandb sync")  # our summary is last
    assert r.stderr.strip() == ""


def test_verbose_shows_third_party_output(shards, tmp_path):
    r = run_fit(shards, tmp_path, "--verbose", "--trainer.max_steps", "1", "--wandb.mode", "disabled")
    out = r.stdout + r.stderr
    # Lightning's info lines and its model summary (a rich table when rich is installed: transformers brings it)
    assert "GPU available" in out and ("Total Flops" in out or "FLOPs" in out)
