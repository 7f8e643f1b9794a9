"""A test callback that appends every training step's loss and a digest of its batch to a JSON-lines file."""

import json
import os
import random
import signal
import threading
import time

import lightning as L

from framework.tasks.causal_lm import CausalLMTask


class StepRecorder(L.Callback):
    """stop_at: end the fit after this many steps, as a preempted job would, without changing the run's config."""

    def __init__(self, path: str, stop_at: int | None = None):
        self.path, self.stop_at = path, stop_at

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        record = {"step": trainer.global_step - 1, "loss": float(outputs["loss"])}
        for key in ("tokens", "input_ids", "labels", "sample_ids"):  # windows; masked-LM inputs; images' samples
            if key in batch:
                t = batch[key].reshape(batch[key].shape[0], -1)  # (B, L); a vision batch's labels are (B,)
                record[key] = int((t * (1 + t.new_tensor(range(t.shape[1])))).sum())
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.stop_at is not None and trainer.global_step >= self.stop_at:
            trainer.should_stop = True


class KillSelf(L.Callback):
    """SIGKILL this process, as the OOM killer or a lost node would: `where="step"` right after optimizer step
    `at_step`; `where="save"` while the checkpoint of that step is being written (a timer thread fires a random
    0-`jitter` ms after the save begins, so the kill lands before, inside or just after the file's write)."""

    def __init__(self, at_step: int, where: str = "step", jitter_ms: float = 30.0, seed: int = 0):
        self.at_step, self.where, self.jitter, self.rng = at_step, where, jitter_ms / 1000, random.Random(seed)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.where == "step" and trainer.global_step == self.at_step:
            os.kill(os.getpid(), signal.SIGKILL)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        if self.where == "save" and trainer.global_step == self.at_step:
            delay = self.rng.uniform(0, self.jitter)
            threading.Thread(target=lambda: (time.sleep(delay), os.kill(os.getpid(), signal.SIGKILL)),
                             daemon=True).start()


class DivergingValidationTask(CausalLMTask):
    """A GPT whose second validation batch of every validation run has a NaN loss, as a diverging model would."""

    def on_validation_epoch_start(self) -> None:
        self._val_batches = 0

    def compute_losses(self, batch):
        measures = super().compute_losses(batch)
        if not self.training:
            self._val_batches += 1
            if self._val_batches == 2:
                loss, count = measures["loss"]
                measures["loss"] = (loss * float("nan"), count)
        return measures


class NonFiniteLossTask(CausalLMTask):
    """A GPT whose training loss is NaN (times the loss) on rank `rank` at the global steps in `nan_steps`."""

    def __init__(self, nan_steps: list[int], rank: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.nan_steps, self.nan_rank = list(nan_steps), rank

    def compute_losses(self, batch):
        measures = super().compute_losses(batch)
        if self.training and self.global_step in self.nan_steps and self.global_rank == self.nan_rank:
            loss, count = measures["loss"]
            measures["loss"] = (loss * float("nan"), count)
        return measures


class SpikeLossTask(CausalLMTask):
    """A GPT whose training loss is multiplied by `factor` on the batches `poison` of each rank's epoch (their index
    among the rank's batches), on rank `rank` only or on every rank: a poisoned data window, as real loss spikes are
    tied to data. Only the loss the guard sees grows; a rollback that skips those batches never meets them again.
    nan: make those losses NaN instead."""

    def __init__(self, poison: list[int], factor: float = 50.0, rank: int | None = None, nan: bool = False,
                 **kwargs):
        super().__init__(**kwargs)
        self.poison, self.factor, self.poison_rank = set(poison), float("nan") if nan else factor, rank

    def compute_losses(self, batch):
        measures = super().compute_losses(batch)
        where = self.trainer.datamodule.last_trained() if self.training else None
        if where is not None and where["batch"] in self.poison and self.poison_rank in (None, self.global_rank):
            loss, count = measures["loss"]
            measures["loss"] = (loss * self.factor, count)
        return measures
