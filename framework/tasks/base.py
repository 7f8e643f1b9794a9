"""What every objective shares: the optimizer, the LR schedule, gradient clipping, compile, logging and checkpoint extras.

A task subclass names its model family (`model_class`, whose config has presets) and says how a batch becomes named
measures (`compute_losses`: name -> (mean, count); "loss" is the one optimized) and how many tokens and FLOPs a batch
costs (`batch_tokens`, `batch_flops`, for throughput and MFU). The model is built in `configure_model`, after the data
is set up, so that its vocabulary comes from the shards and a sharding strategy can wrap it.
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import asdict, dataclass
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from framework.data.base import StreamDataModule
from framework.errors import UserError
from framework.models.transformer import TransformerConfig

# name -> (mean over the batch, how many items that mean is over): validation weights each batch by its count
Measures = dict[str, tuple[torch.Tensor, torch.Tensor | float]]


@dataclass
class GuardOptions:
    """What happens to an optimizer step whose gradient norm is not finite (a NaN or inf loss on any rank, or an
    overflow in backward): with skip_nonfinite, no weight and no optimizer state changes on any rank (the norm is
    global after the gradient reduction, so every rank decides alike), the learning-rate schedule moves on, the step
    is counted (`guard/skipped_steps`), listed with its data position in the checkpoint and the run summary, and the
    run continues. After max_consecutive such steps in a row the run stops with one line: it has diverged.
    Not under DeepSpeed, which keeps its gradients to itself (its fp16 loss scaler skips overflowing steps).

    A loss spike (framework/guard.py) -- spike_patience steps in a row whose loss, averaged over ranks, is above the
    median + spike_sigmas robust standard deviations of the last spike_window losses, from step spike_warmup on --
    rolls the fit back to the newest checkpoint from before the spike and skips the batches that led into it (listed
    in the checkpoint and the run summary, and logged to W&B as the guard/events table). After max_rollbacks
    rollbacks the run stops with one line. spike_window=0 turns spike detection off (it costs one all-reduce of a
    scalar per step on several ranks)."""

    skip_nonfinite: bool = True
    max_consecutive: int = 10
    spike_window: int = 100
    spike_sigmas: float = 6.0
    spike_patience: int = 3
    spike_warmup: int = 100
    max_rollbacks: int = 3


class PretrainTask(L.LightningModule):
    """Shared training logic. Args (all become `--model.NAME` options and YAML keys; subclasses take them as
    **kwargs, so they are declared here once):

    lr: peak learning rate, reached after `warmup_steps`.
    min_lr_ratio: the cosine decay ends at lr * min_lr_ratio, at trainer.max_steps.
    warmup_steps: linear warm-up from 0 to lr.
    weight_decay: AdamW decay, applied to matrices (dim >= 2) only; biases, norms and embeddings' 1-d params are exempt.
    betas, eps: AdamW moments.
    grad_clip: clip the global gradient norm to this (0 disables); the pre-clip norm is logged as grad_norm.
        Under DeepSpeed the same value goes into its JSON and DeepSpeed clips.
    activation_checkpointing: recompute each transformer block in backward instead of storing its activations.
    compile: wrap the model's forward in torch.compile (the saved weights are the uncompiled module's).
    peak_tflops: the accelerator's peak dense TFLOP/s per device for MFU; default: looked up from the device name.
    init_from: start from the weights of this checkpoint (any strategy's) or `pretrain export` directory; only the
        weights: optimizer, step, schedule, data position and W&B run start fresh (framework.checkpoint.init_from).
        Ignored when the run resumes (--ckpt_path), whose checkpoint has the weights.
    """

    def __init__(self, lr: float = 6e-4, min_lr_ratio: float = 0.1, warmup_steps: int = 100,
                 weight_decay: float = 0.1, betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                 grad_clip: float = 1.0, activation_checkpointing: bool = False, compile: bool = False,
                 peak_tflops: float | None = None, init_from: str | None = None):
        super().__init__()
        if lr <= 0 or not 0 <= min_lr_ratio <= 1 or warmup_steps < 0 or grad_clip < 0:
            raise UserError("model.lr must be > 0, model.min_lr_ratio in [0, 1], model.warmup_steps and "
                            "model.grad_clip >= 0")
        self.lr, self.min_lr_ratio, self.warmup_steps = lr, min_lr_ratio, warmup_steps
        self.weight_decay, self.betas, self.eps = weight_decay, tuple(betas), eps
        self.grad_clip, self.compile, self.peak_tflops = grad_clip, compile, peak_tflops
        self.activation_checkpointing = activation_checkpointing
        if init_from is not None and not os.path.exists(init_from):
            raise UserError(f"model.init_from '{init_from}' does not exist; pass a checkpoint of `pretrain fit` or a "
                            "directory of `pretrain export`")
        self.init_from = init_from
        self.model: nn.Module | None = None
        self._forward: Any = None  # the compiled forward, kept out of the module tree (and the state dict)
        self._val_sums: dict[str, list[torch.Tensor]] = {}  # name -> [sum of mean * count, sum of counts]
        self.preset: str = ""
        self.overrides: dict[str, Any] = {}
        self.config: TransformerConfig | None = None
        self.tokenizer_json: str | None = None
        self.guard = GuardOptions()  # `pretrain fit` sets it from --guard.*
        self.print_init_report = True  # init_from prints what it loaded (the transfer report turns it off)
        self._frozen: dict[str, Any] | None = None  # where checkpoints' frozen tensors come from (_leave_out_frozen)
        self.skipped: list[dict[str, int]] = []  # the steps the guard skipped: step and data position
        self._nonfinite_in_a_row = 0
        self.rollbacks: list[dict[str, Any]] = []  # the loss spikes rolled back (framework.guard.describe)
        self.rollback: dict[str, Any] | None = None  # set when this fit must restart from a checkpoint (train.run)
        self.resume_rollback: dict[str, Any] | None = None  # the rollback this fit restarts from (train.run sets it)
        self._detector: Any = None
        self._step_losses: list[torch.Tensor] = []  # this optimizer step's micro-batch losses, on the device
        self.corrupt_samples = 0  # on this rank, since the fit started

    # ---------------------------------------------------------------- for subclasses
    model_class: type[nn.Module]  # the model family; its `config_class` has the presets and the model_type
    block_types: tuple[type[nn.Module], ...] = ()  # the model's repeated blocks: units of sharding and recompute
    perplexity = False  # log val/ppl = exp(val/loss): only where the loss is a per-token log-likelihood of the data
    unit = "tokens"  # what batch_tokens counts: logged as {unit}_seen and {unit}_per_sec

    def set_model_config(self, preset: str, config: dict[str, Any] | None) -> None:
        """Remember the preset and its overrides; fail on a bad preset or field now, not after data setup."""
        self.preset, self.overrides = preset, dict(config or {})
        self.model_class.config_class.from_preset(preset, **self.overrides)

    def check_data(self, datamodule: Any) -> None:
        """Fail at start-up, with one line, when the datamodule does not deliver what this task needs."""

    def compute_losses(self, batch: dict[str, Any]) -> Measures:
        """Named measures of a batch: name -> (mean, count). "loss" is optimized; all are logged as train/NAME and,
        reduced over ranks as count-weighted means, val/NAME."""
        raise NotImplementedError

    def batch_tokens(self, batch: dict[str, Any]) -> int:
        """What the model processed for this batch, in `unit`s (tokens_seen, tokens_per_sec for a language model)."""
        raise NotImplementedError

    def batch_flops(self, batch: dict[str, Any]) -> int:
        """Training FLOPs (forward + backward) of this batch, for MFU; 0 when unknown. Must not sync the device."""
        return 0

    # ---------------------------------------------------------------- model
    def datamodule(self) -> Any:
        return self.trainer.datamodule if self._trainer is not None else None

    def resolve_config(self) -> TransformerConfig:
        """The preset with its overrides, sized to the data: vocabulary from the shards, context checked."""
        overrides = dict(self.overrides)
        dm = self.datamodule()
        if dm is not None:
            overrides.setdefault("vocab_size", dm.vocab_size)
        config = self.model_class.config_class.from_preset(self.preset, **overrides)
        if dm is not None:
            self.check_data(dm)
            dm.check_vocab(config.vocab_size)
            if dm.seq_len > config.seq_len:
                raise UserError(f"data.seq_len={dm.seq_len} is longer than the model's context "
                                f"(seq_len={config.seq_len}); lower data.seq_len or set model.config.seq_len")
        return config

    def build_model(self) -> nn.Module:
        self.config = self.resolve_config()
        dm = self.datamodule()
        if dm is not None and os.path.exists(dm.tokenizer_path):  # checkpoints carry their tokenizer
            with open(dm.tokenizer_path) as f:
                self.tokenizer_json = f.read()
        return self.model_class(self.config)

    def configure_model(self) -> None:
        if self.model is None:
            from framework.distributed import parallelize

            # sharding (FSDP2) and activation checkpointing are applied to the built model, before compile
            self.model = parallelize(self.build_model(), self.trainer.strategy, self.block_types,
                                     activation_checkpointing=self.activation_checkpointing)
            if self.init_from is not None and not self.trainer.ckpt_path:
                self._load_init_weights()
        if self.compile and self._forward is None:
            # object.__setattr__: as a plain attribute, not a submodule (its parameters would be saved twice)
            object.__setattr__(self, "_forward", torch.compile(self.model))

    def _load_init_weights(self) -> None:
        from framework.checkpoint.init_from import load_weights
        from framework.models import TIED

        assert self.model is not None and self.init_from is not None
        report = load_weights(self.model, self.init_from, self.trainer.strategy, TIED[self.model.config.model_type])
        if self.trainer.is_global_zero and self.print_init_report:
            print("\n".join(report.lines(self.init_from)), flush=True)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        assert self.model is not None, "the model is built in configure_model()"
        forward = self._forward if self._forward is not None else self.model  # a compiled module has no truth value
        return forward(*args, **kwargs)

    # ---------------------------------------------------------------- steps
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        measures = self.compute_losses(batch)
        if batch.get("corrupt"):  # undecodable samples the reader replaced by filler rows (a host int: no sync)
            self.corrupt_samples += int(batch["corrupt"])
            self.log("data/corrupt_samples", float(self.corrupt_samples), rank_zero_only=True)
        self._step_losses.append(measures["loss"][0].detach())
        for name, (value, _) in measures.items():
            self.log(f"train/{name}", value.detach(), prog_bar=name == "loss")
        self.log("lr", self.lr_at(self.global_step), prog_bar=False)
        return measures["loss"][0]

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        for name, (value, count) in self.compute_losses(batch).items():
            count = torch.as_tensor(count, dtype=torch.float64, device=self.device)
            total = value.detach().double() * count
            acc = self._val_sums.setdefault(name, [torch.zeros((), dtype=torch.float64, device=self.device)] * 2)
            self._val_sums[name] = [acc[0] + total, acc[1] + count]

    def on_validation_epoch_end(self) -> None:
        if not self._val_sums:  # nothing was validated (no val batches on this run)
            return
        names = sorted(self._val_sums)
        sums = torch.stack([torch.stack(self._val_sums[n]) for n in names])  # (names, 2): [weighted sum, count]
        self._val_sums = {}
        sums = self.trainer.strategy.reduce(sums, reduce_op="sum")  # every rank validated the same number of batches
        means = sums[:, 0] / sums[:, 1]  # a NaN or inf batch makes its measure NaN/inf: divergence must show
        for name, mean in zip(names, means.float()):
            self.log(f"val/{name}", mean, prog_bar=name == "loss", rank_zero_only=True)
        loss = means[names.index("loss")].float()
        if not torch.isfinite(loss):
            rank_zero_warn(f"val/loss is {float(loss)}: the model has diverged (or a val batch is broken)")
        if self.perplexity:
            self.log("val/ppl", torch.exp(loss.clamp(max=30)), rank_zero_only=True)

    # ---------------------------------------------------------------- optimization
    def configure_optimizers(self) -> dict[str, Any]:
        max_steps = self.trainer.max_steps
        if max_steps is None or max_steps < 1:
            raise UserError("set trainer.max_steps: the learning-rate schedule decays over it")
        self._max_steps = max_steps
        by_key: dict[tuple[bool, float], list[nn.Parameter]] = {}
        for name, p in self.named_parameters():
            if p.requires_grad:
                # ZeRO-3 partitions parameters as they are created (their local shape is empty): use the full shape
                decay = len(getattr(p, "ds_shape", p.shape)) >= 2
                by_key.setdefault((decay, self.lr_scale(name)), []).append(p)
        # DeepSpeed drops empty groups, which would desync the scheduler: only non-empty ones, in a fixed order
        groups = [{"params": ps, "weight_decay": self.weight_decay if decay else 0.0, "lr": self.lr * scale}
                  for (decay, scale), ps in sorted(by_key.items(), key=lambda kv: (not kv[0][0], kv[0][1]))]
        on_cuda = all(p.is_cuda for g in groups for p in g["params"])
        optimizer = torch.optim.AdamW(groups, lr=self.lr, betas=self.betas, eps=self.eps, fused=on_cuda or None)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: self.lr_at(step) / self.lr)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def lr_scale(self, name: str) -> float:
        """The multiple of the schedule's LR a parameter gets (e.g. a fine-tuning head's own LR); 1 by default."""
        return 1.0

    def lr_at(self, step: int) -> float:
        """Linear warm-up to lr, then cosine decay to lr * min_lr_ratio at max_steps (held there after)."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / (self.warmup_steps + 1)
        total = max(1, getattr(self, "_max_steps", self.trainer.max_steps) - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / total)
        floor = self.lr * self.min_lr_ratio
        return floor + (self.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Clip the global gradient norm (after unscaling), then the guard. DeepSpeed keeps gradients in its own
        buffers and clips them itself (gradient_clipping in its JSON); it reports the norm after its step."""
        norm = None
        if not _is_deepspeed(self.trainer.strategy):
            max_norm = self.grad_clip if self.grad_clip > 0 else float("inf")
            norm = torch.nn.utils.clip_grad_norm_([p for p in self.parameters() if p.grad is not None], max_norm)
            self.log("grad_norm", norm)
        self._guard(norm)

    @property
    def detector(self) -> Any:
        if self._detector is None:
            from framework.guard import SpikeDetector

            g = self.guard
            self._detector = SpikeDetector(g.spike_window, g.spike_sigmas, g.spike_patience, g.spike_warmup)
        return self._detector

    def _guard(self, norm: torch.Tensor | None) -> None:
        """One host sync per step for both checks: the price of never applying a NaN update or training on through
        a spike. The step's loss is averaged over ranks first, so every rank takes the same decision."""
        losses, self._step_losses = self._step_losses, []
        deepspeed = _is_deepspeed(self.trainer.strategy)
        # under DeepSpeed the loss is the only early sign of a NaN: its optimizer step cannot be skipped from here
        watch = (self.guard.spike_window > 0 or (deepspeed and self.guard.skip_nonfinite)) and bool(losses)
        check_norm = norm is not None and self.guard.skip_nonfinite
        if not (watch or check_norm):
            return
        values = []
        if watch:
            loss = torch.stack(losses).float().mean()
            values.append(self.trainer.strategy.reduce(loss, reduce_op="mean").reshape(()))
        if check_norm:
            if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor (every rank takes part, as every rank is here)
                norm = norm.full_tensor()
            values.append(norm.float().reshape(()))
        host = torch.stack(values).tolist()
        if check_norm and not math.isfinite(host[-1]):
            self._skip_step(host[-1])
            return
        self._nonfinite_in_a_row = 0
        if not watch:
            return
        step = int(self.global_step)
        if deepspeed and self.guard.skip_nonfinite and not math.isfinite(host[0]):
            self._roll_back(step, step, host[0], None, "a non-finite loss under DeepSpeed (whose optimizer step "
                            "cannot be skipped)")
            return
        spike = self.detector.update(step, host[0])
        if spike is not None:
            self._roll_back(int(spike[0]["step"]), step, max(s["loss"] for s in spike), spike[0]["threshold"],
                            "a loss spike")

    def _skip_step(self, norm: float) -> None:
        """Skip this optimizer step: optimizers leave parameters without a gradient untouched. After
        max_consecutive in a row, roll back (the model may be damaged in ways a finite norm does not show)."""
        for p in self.parameters():
            p.grad = None
        self._nonfinite_in_a_row += 1
        dm = self.datamodule()
        batch = dm.last_trained() if isinstance(dm, StreamDataModule) else None  # the batch that produced it
        self.skipped.append({"step": int(self.global_step), **(batch or {})})
        self.log("guard/skipped_steps", float(len(self.skipped)), rank_zero_only=True)
        rank_zero_warn(f"step {self.global_step}: the gradient norm is {norm}; the step was skipped on every "
                       f"rank ({len(self.skipped)} skipped so far)")
        self._log_guard_events()
        if self._nonfinite_in_a_row >= self.guard.max_consecutive:
            first = self.skipped[-self._nonfinite_in_a_row]["step"]
            self._roll_back(first, int(self.global_step), float("nan"), None,
                            f"{self._nonfinite_in_a_row} optimizer steps in a row with a non-finite loss or gradient")

    def _roll_back(self, first: int, step: int, loss: float, threshold: float | None, reason: str) -> None:
        """Plan a rollback to the newest checkpoint from before step `first` and stop this fit after this step;
        framework/commands/fit.py restarts it from there with the data position after this step. Every rank calls this
        at the same step (the decisions are on rank-averaged or global values); rank 0 chooses the checkpoint."""
        from framework.guard import checkpoint_before, describe, position, set_aside_after

        where = f"{reason} at steps {first}-{step}" if first != step else f"{reason} at step {step}"
        if len(self.rollbacks) >= self.guard.max_rollbacks:
            done = ", ".join(f"{r['first_step']}-{r['step']}" for r in self.rollbacks)
            raise UserError(f"{where} after {len(self.rollbacks)} rollback(s) already (at steps {done}): the run has "
                            "diverged; resume from an earlier checkpoint with a lower model.lr, or raise "
                            "guard.max_rollbacks")
        dirpath = getattr(self.trainer.checkpoint_callback, "dirpath", None)
        plan: dict[str, Any] = {"checkpoint": None}
        if self.trainer.is_global_zero and dirpath:  # rank 0 reads the disk; every rank follows its choice
            good = checkpoint_before(dirpath, first)
            if good is not None:
                from framework.checkpoint.formats import read_meta

                dm = self.datamodule()
                meta = read_meta(good)
                saved = meta.get(type(dm).__qualname__) if dm is not None else None
                plan = {"checkpoint": good, "to_step": int(meta["global_step"]), "from": position(saved),
                        "moved": set_aside_after(dirpath, good)}
        plan = self.trainer.strategy.broadcast(plan, src=0)
        if plan["checkpoint"] is None:
            raise UserError(f"{where}: the run has diverged, and there is no checkpoint from before step {first} to "
                            f"roll back to in '{dirpath}'; resume from an earlier checkpoint with a lower model.lr, "
                            "or checkpoint more often (checkpoint.every_n_steps)")
        dm = self.datamodule()
        data = dm.state_dict() if dm is not None else {}
        event = {"step": step, "first_step": first, "reason": reason, "loss": loss, "threshold": threshold,
                 "to_step": plan["to_step"], "checkpoint": plan["checkpoint"],
                 "skipped": {"from": plan["from"], "to": position(data)}, "set_aside": plan["moved"]}
        self.rollbacks.append(event)
        self.rollback = {"event": event, "data": data, "rollbacks": list(self.rollbacks)}
        for p in self.parameters():  # this step's update is not applied either (DeepSpeed's is, and rolled back)
            p.grad = None
        self.trainer.should_stop = True  # the same step on every rank
        if self.trainer.is_global_zero:
            print(f"guard: {describe(event)} (rollback {len(self.rollbacks)} of at most "
                  f"{self.guard.max_rollbacks})", file=sys.stderr, flush=True)
        self._log_guard_events()

    def _log_guard_events(self) -> None:
        """Every guard event so far as a W&B table (guard/events): step, loss, action, what was skipped."""
        from lightning.pytorch.loggers import WandbLogger

        loggers = [lg for lg in self.loggers if isinstance(lg, WandbLogger)] if self._trainer is not None else []
        if not loggers or not self.trainer.is_global_zero:
            return
        import wandb

        from framework.guard import describe

        rows = [[s["step"], None, "skipped step (non-finite gradient)", json.dumps(s)] for s in self.skipped]
        rows += [[r["step"], r["loss"], "rollback", describe(r)] for r in self.rollbacks]
        for logger in loggers:
            logger.experiment.log({"guard/events": wandb.Table(columns=["step", "loss", "action", "detail"],
                                                               data=sorted(rows, key=lambda r: r[0]))})

    def summary_lines(self) -> list[str]:
        """Lines for the run summary."""
        from framework.guard import describe

        lines = []
        if self.skipped:
            listed = ", ".join(str(s["step"]) for s in self.skipped[:10]) + (" ..." if len(self.skipped) > 10 else "")
            lines.append(f"guard: {len(self.skipped)} step(s) skipped for a non-finite gradient: {listed} (listed "
                         "with their data positions in the checkpoint, key 'guard')")
        lines += [f"guard: {describe(r)}" for r in self.rollbacks]
        return lines

    # ---------------------------------------------------------------- checkpoint extras
    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if _is_deepspeed(self.trainer.strategy):
            norm = self.trainer.strategy.deepspeed_engine.get_global_grad_norm()
            if norm is not None:
                self.log("grad_norm", float(norm))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["framework"] = run_metadata()
        checkpoint["task"] = f"{type(self).__module__}.{type(self).__qualname__}"
        assert self.config is not None
        checkpoint["model_config"] = self.config.to_dict()  # with its model_type: every reader dispatches on it
        if self.tokenizer_json is not None:
            checkpoint["tokenizer_json"] = self.tokenizer_json
        # Lightning does not checkpoint RNG states; dropout and sampling after a resume must continue the same streams.
        # Each rank's own: its CPU generator and its own CUDA device's (ranks' streams may differ, and a node may see
        # fewer GPUs on resume, so states are never kept per visible device). Gathered so that any rank's file has all.
        own = {"torch": torch.get_rng_state(),
               "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() and self.device.type == "cuda" else None}
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            per_rank: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(per_rank, own)
        else:
            per_rank = [own]
        checkpoint["rng_states"] = {"per_rank": per_rank}
        checkpoint["guard"] = {"options": asdict(self.guard), "skipped": list(self.skipped),
                               "rollbacks": list(self.rollbacks), "detector": self.detector.state_dict()}
        self._leave_out_frozen(checkpoint)

    # ---------------------------------------------------------------- checkpoints without a frozen backbone
    def frozen_from_init(self) -> bool:
        """Whether this fine-tune's frozen parameters are init_from's weights, unchanged (linear probes, LoRA): then
        its checkpoints need not store them again. The tasks with such modes override it."""
        return False

    def init_prefix(self) -> str:
        """The prefix of init_from's names for this model's tensors (a CLIP checkpoint's image tower: `visual.`)."""
        return ""

    def _leave_out_frozen(self, checkpoint: dict[str, Any]) -> None:
        """A single-file checkpoint (one process, DDP) of a frozen-backbone fine-tune keeps only what it trains: the
        frozen tensors are recorded with init_from's real path and a fingerprint each (init_from.frozen_record), and
        every reader gets them back from there. FSDP2 and DeepSpeed write every tensor through their own formats."""
        from lightning.pytorch.strategies import DeepSpeedStrategy, ModelParallelStrategy

        from framework.checkpoint.consolidate import FROZEN_KEY, MODEL_PREFIX
        from framework.checkpoint.init_from import frozen_record

        state = checkpoint.get("state_dict")
        if (state is None or not self.frozen_from_init()
                or isinstance(self.trainer.strategy, (DeepSpeedStrategy, ModelParallelStrategy))):
            return
        assert self.model is not None and self.init_from is not None
        if self._frozen is None:
            self._frozen = frozen_record(self.model, self.init_from, self.init_prefix())
        for name in self._frozen["tensors"]:
            state.pop(MODEL_PREFIX + name, None)
        checkpoint[FROZEN_KEY] = self._frozen

    def _restore_frozen(self, checkpoint: dict[str, Any]) -> None:
        """The frozen tensors a checkpoint left out, read back from its pre-trained source into its state dict."""
        from framework.checkpoint.consolidate import FROZEN_KEY, MODEL_PREFIX
        from framework.checkpoint.init_from import frozen_sources

        record, state = checkpoint.get(FROZEN_KEY), checkpoint.get("state_dict")
        if record is None or state is None:
            return
        if not os.path.exists(record["path"]) and self.init_from is not None and os.path.exists(self.init_from):
            record = {**record, "path": os.path.realpath(self.init_from)}  # moved: this run's init_from says where
        have = {k.removeprefix(MODEL_PREFIX) for k in state}
        for source in frozen_sources(record, have, str(self.trainer.ckpt_path)):
            state[MODEL_PREFIX + source.name] = source.load()
        self._frozen = record  # later checkpoints record the same source

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._restore_frozen(checkpoint)
        check_family(checkpoint.get("model_config"), self.model_class.config_class.model_type, type(self).__name__)
        guard = checkpoint.get("guard", {})
        self.skipped = list(guard.get("skipped", []))
        self.rollbacks = list(guard.get("rollbacks", []))
        self.detector.load_state_dict(guard.get("detector", {}))
        if self.resume_rollback is not None:  # restarting after a spike: the weights are from before it
            self.rollbacks = list(self.resume_rollback["rollbacks"])
        states = checkpoint.get("rng_states")
        if states is not None:
            self._rng_states = states  # applied at fit start: Lightning seeds again after loading the checkpoint

    def on_train_start(self) -> None:
        states = getattr(self, "_rng_states", None)
        if states is None:
            return
        self._rng_states = None
        per_rank = states.get("per_rank") or [{"torch": states["torch"], "cuda": None}]  # older: rank 0's CPU state
        rank, world = self.global_rank, self.trainer.world_size
        if len(per_rank) != world:
            rank_zero_warn(f"the checkpoint's RNG states are from {len(per_rank)} rank(s), this run has {world}: "
                           "every rank continues rank 0's streams")
        own = per_rank[rank] if len(per_rank) == world else per_rank[0]
        torch.set_rng_state(own["torch"])
        if own["cuda"] is not None and torch.cuda.is_available() and self.device.type == "cuda":
            torch.cuda.set_rng_state(own["cuda"])


def check_family(model_config: dict[str, Any] | None, expected: str, user: str) -> None:
    """One line when a checkpoint's model family is not the one `user` (a task or a command) works with."""
    from framework.models import model_type_of

    found = model_type_of(model_config or {})
    if found != expected:
        raise UserError(f"the checkpoint holds a {found!r} model but {user} needs a {expected!r} one; pass a "
                        f"checkpoint of a {expected!r} model (or a config whose model.class_path trains {found!r})")


def _is_deepspeed(strategy: Any) -> bool:
    return type(strategy).__name__ == "DeepSpeedStrategy" or "deepspeed" in type(strategy).__module__


def run_metadata() -> dict[str, Any]:
    """What ran: package versions and the git commit, for checkpoints and W&B."""
    import platform

    import lightning

    import framework

    meta = {"framework": framework.__version__, "torch": str(torch.__version__), "lightning": str(lightning.__version__),
            "python": platform.python_version(), "git_sha": git_sha()}
    return meta


def git_sha() -> str | None:
    """The commit of the working directory's repository (None outside git): cheap, no subprocess."""
    head = None
    d = os.path.abspath(os.getcwd())
    while True:
        if os.path.isdir(os.path.join(d, ".git")):
            head = os.path.join(d, ".git")
            break
        parent = os.path.dirname(d)
        if parent == d:
            return None
        d = parent
    try:
        ref = open(os.path.join(head, "HEAD")).read().strip()
        if ref.startswith("ref: "):
            path = os.path.join(head, ref[5:])
            if os.path.exists(path):
                return open(path).read().strip()
            for line in open(os.path.join(head, "packed-refs")).read().splitlines():
                if line.endswith(ref[5:]):
                    return line.split()[0]
            return None
        return ref
    except OSError:
        return None
