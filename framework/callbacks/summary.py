"""The end-of-run summary: where the checkpoint and the W&B run are, how the loss compares, and a sample."""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only

from framework.callbacks.guard import Guard
from framework.callbacks.throughput import unit
from framework.callbacks.wandb_run import offline_dir, run_location
from framework.data.base import StreamDataModule
from framework.tasks.base import PretrainTask


class RunSummary(L.Callback):
    """Prints a one-screen summary when fit ends (rank 0) and logs the data's baseline (`baseline()`) next to val/loss.

    prompt / sample_tokens: the text the sample continues, and its length in tokens (0: no sample; sampling needs the
    whole model on rank 0, so it is skipped for strategies that shard parameters or split experts). The sample stays
    within the trained context (prompt + sample <= seq_len), where the KV cache makes each token cheap. For a
    masked-LM encoder the prompt is a text with `<|mask|>` tokens, and the sample is its top guesses for each (as
    `pretrain fill-mask`).
    """

    def __init__(self, prompt: str = "def ", sample_tokens: int = 200, temperature: float = 0.8, top_k: int = 50,
                 baseline: bool = True):
        self.prompt, self.sample_tokens, self.temperature, self.top_k = prompt, sample_tokens, temperature, top_k
        self.baseline = baseline

    @rank_zero_only
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from framework.callbacks.guard import rolling_back

        if rolling_back(trainer):  # the fit restarts from a checkpoint: not the end
            return
        lines = ["", "=" * 30 + " run summary " + "=" * 30]
        metrics = trainer.callback_metrics
        seen = unit(pl_module)
        lines.append(f"steps: {trainer.global_step}   {seen} seen: {int(metrics.get(f'{seen}_seen', 0)):,}")
        if "train/loss" in metrics:
            lines.append(f"train/loss: {float(metrics['train/loss']):.4f}")
        dm = trainer.datamodule
        # the data's log-likelihood: val/loss, or the task's own part of a mixed loss (distillation's task_loss)
        key = f"val/{getattr(pl_module, 'likelihood', 'loss')}"
        key = key if key in metrics else "val/loss"
        if key in metrics:
            loss = float(metrics[key])
            ppl = f" (ppl {float(metrics['val/ppl']):.2f})" if "val/ppl" in metrics else ""
            per = pl_module.loss_per if isinstance(pl_module, PretrainTask) else "token"
            lines.append(f"{key + ':':<11} {loss:.4f} nats/{per}{ppl}")
            # the best guess that ignores the input, on the same val split (None: no val split, or none for the data)
            base = dm.baseline() if self.baseline and isinstance(dm, StreamDataModule) else None
            if base is not None:
                name = base.pop("name", "unigram")
                lines[-1] += f"   {name} baseline: {base['loss']:.4f} ({loss / base['loss']:.0%} of it)"
                if "val/accuracy" in metrics and "accuracy" in base:
                    of = " of masked tokens" if per == "token" else ""
                    lines.append(f"val/accuracy: {float(metrics['val/accuracy']):.2%}{of}   {name} "
                                 f"baseline: {base['accuracy']:.2%}")
                for logger in trainer.loggers:
                    logger.log_metrics({f"val/{name.replace(' ', '_')}_baseline_{k}": v for k, v in base.items()},
                                       step=trainer.global_step)
            elif "val/accuracy" in metrics:
                lines.append(f"val/accuracy: {float(metrics['val/accuracy']):.2%}")
        if "val/macro_f1" in metrics:
            lines.append(f"val/macro_f1: {float(metrics['val/macro_f1']):.2%}")
        for callback in trainer.callbacks:  # the guard's, then the task's
            if isinstance(callback, Guard):
                lines += callback.summary_lines()
        if isinstance(pl_module, PretrainTask):
            lines += pl_module.summary_lines()
        ckpt = trainer.checkpoint_callback
        if ckpt is not None and getattr(ckpt, "last_model_path", ""):
            lines.append(f"checkpoint: {ckpt.last_model_path} -> {ckpt.best_model_path}")
            lines.append("resume with: pretrain fit --config ... --ckpt_path last")
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                lines.append(run_location(logger))
                if getattr(logger, "_offline", False):
                    lines.append(f"  upload it with: wandb sync {offline_dir(logger)}")
        sample = self._sample(trainer, pl_module)
        if sample is not None:
            lines += ["sample:", "-" * 73, sample, "-" * 73]
        print("\n".join(lines), flush=True)

    def _sample(self, trainer: L.Trainer, pl_module: L.LightningModule) -> str | None:
        if not isinstance(pl_module, PretrainTask) or pl_module.model is None or pl_module.config is None:
            return None
        model, text = pl_module.model, pl_module.tokenizer_json
        shards_params = type(trainer.strategy).__name__.lower()
        if not self.sample_tokens or text is None or getattr(trainer.strategy, "expert_parallel", 1) > 1 or \
                any(k in shards_params for k in ("fsdp", "deepspeed", "modelparallel")):
            return None
        from framework.data.tokenizer import Tokenizer
        from framework.models.registry import family

        tok = Tokenizer.from_str(text)
        command = family(pl_module.config.model_type).command  # what inspects this family shows its sample
        if command == "fill-mask":
            from framework.inference import MASK, show

            if MASK not in self.prompt or "mask" not in tok.special_ids:
                return None
            return "\n".join([self.prompt, *show(model, tok, self.prompt, top_k=3)])
        if command != "generate":
            return None
        idx = torch.tensor([tok.encode(self.prompt)], dtype=torch.long, device=pl_module.device)
        idx = idx[:, -(model.config.seq_len - 1):]  # room for one sampled token at least
        n = min(self.sample_tokens, model.config.seq_len - idx.size(1))
        out = model.generate(idx, n, temperature=self.temperature, top_k=self.top_k, eos_id=tok.special_ids["eod"])
        return tok.decode(out[0].tolist())
