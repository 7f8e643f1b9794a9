"""A test callback that appends every training step's loss and a digest of its batch to a JSON-lines file."""

import json

import lightning as L


class StepRecorder(L.Callback):
    """stop_at: end the fit after this many steps, as a preempted job would, without changing the run's config."""

    def __init__(self, path: str, stop_at: int | None = None):
        self.path, self.stop_at = path, stop_at

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        record = {"step": trainer.global_step - 1, "loss": float(outputs["loss"])}
        for key in ("tokens", "input_ids", "labels"):  # causal-LM windows; masked-LM inputs and labels
            if key in batch:
                t = batch[key]
                record[key] = int((t * (1 + t.new_tensor(range(t.shape[1])))).sum())
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.stop_at is not None and trainer.global_step >= self.stop_at:
            trainer.should_stop = True
