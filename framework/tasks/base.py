"""What every objective shares: the model(s), the loss contract, the optimizer and LR schedule, the val reduction.

A task subclass names its model family (`model_class`, whose config has presets) and says how a batch becomes named
measures (`compute_losses`: name -> (mean, count); "loss" is the one optimized) and how many tokens and FLOPs a batch
costs (`batch_tokens`, `batch_flops`, for throughput and MFU). The model is built in `configure_model`, after the data
is set up, so that its vocabulary comes from the shards and a sharding strategy can wrap it. What checkpoints hold
beyond the weights is framework.checkpoint.extras; the non-finite/loss-spike guard is framework.callbacks.guard.
"""

from __future__ import annotations

import math
import os
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


class StepObserver(L.Callback):
    """A callback that sees every optimizer step's measures before the optimizer does (the guard)."""

    def on_step_measured(self, trainer: L.Trainer, task: "PretrainTask", losses: list[torch.Tensor],
                         norm: torch.Tensor | None) -> None:
        """`losses`: this step's micro-batch losses, on the device; `norm`: the global gradient norm before clipping
        (None under DeepSpeed, which keeps its gradients to itself)."""


def logged_step(trainer: L.Trainer) -> bool:
    """Whether the metrics of the current training step are logged: Lightning hands step metrics to the loggers
    only every `trainer.log_every_n_steps` optimizer steps and on the step the fit stops after (its logger
    connector's `should_update_logs`); we also log the last step, whose train/loss the run summary prints. On the
    other steps `self.log` would cost ~0.1-0.3 ms a call (its result collection) for values no logger receives; the
    only thing lost is a progress bar's loss between logged steps (it updates every log_every_n_steps steps)."""
    connector = getattr(trainer, "_logger_connector", None)
    if connector is None or getattr(trainer, "_active_loop", None) is None:
        return True
    max_steps = trainer.max_steps if trainer.max_steps is not None else -1
    return bool(connector.should_update_logs) or 0 <= max_steps <= trainer.global_step + 1


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
    init_layers: with init_from, block i of the model takes init_from's block init_layers[i] (a student from its
        teacher, one layer in two as DistilBERT: [0, 2, 4]); unset: the same blocks by name.

    Auxiliary frozen models (a distillation teacher, a reference model) are declared, not built by hand:
    `aux_models = {"teacher": "teacher_path"}` names each one and the __init__ argument whose value is its source
    (any checkpoint of `pretrain fit`, any strategy's, or a `pretrain export` directory). In `setup`, before the
    trained model is built, each is built from its source's config and weights (framework.tasks.aux.load_frozen) and
    put in `self.aux[name]`: frozen (no gradient, eval mode, its forward under no_grad), on the strategy's device in
    its precision, sharded by FSDP2 like the trained model (the task's `block_types`), partitioned by ZeRO-3 (an
    inference engine of its own), a full copy on every rank under DDP and ZeRO-1/2. It is not a submodule: it is
    not in `parameters()`, so neither in the optimizer nor in DDP's reducer or the trained model's DeepSpeed
    engine, and never in a checkpoint, which records its source path and tensor fingerprints instead (key
    "aux_models"); a resume whose source has changed since is refused in one line. `pretrain plan` counts it in
    the weights' memory, not in the optimizer's (framework.tasks.aux.aux_parameters). An optional source: leave
    its argument None and it is not built. framework/tasks/distill.py is the example (`aux_models = {"teacher":
    "teacher"}`, then `self.aux["teacher"](inputs)` in compute_losses: logits, no grad).
    """

    def __init__(self, lr: float = 6e-4, min_lr_ratio: float = 0.1, warmup_steps: int = 100,
                 weight_decay: float = 0.1, betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                 grad_clip: float = 1.0, activation_checkpointing: bool = False, compile: bool = False,
                 peak_tflops: float | None = None, init_from: str | None = None,
                 init_layers: list[int] | None = None):
        super().__init__()
        if lr <= 0 or not 0 <= min_lr_ratio <= 1 or warmup_steps < 0 or grad_clip < 0:
            raise UserError("model.lr must be > 0, model.min_lr_ratio in [0, 1], model.warmup_steps and "
                            "model.grad_clip >= 0")
        self.lr, self.min_lr_ratio, self.warmup_steps = lr, min_lr_ratio, warmup_steps
        self.weight_decay, self.betas, self.eps = weight_decay, tuple(betas), eps
        self.grad_clip, self.compile, self.peak_tflops = grad_clip, compile, peak_tflops
        self.activation_checkpointing = activation_checkpointing
        if init_from is not None and not _source_exists(init_from):
            raise UserError(f"model.init_from '{init_from}' does not exist; pass a checkpoint of `pretrain fit`, a "
                            "directory of `pretrain export` or hf:DIR (a Hugging Face model directory)")
        if init_layers is not None and init_from is None:
            raise UserError("model.init_layers maps blocks of model.init_from: set model.init_from too")
        self.init_from, self.init_layers = init_from, None if init_layers is None else list(init_layers)
        self.model: nn.Module | None = None
        self._forward: Any = None  # the compiled forward, kept out of the module tree (and the state dict)
        self._val_sums: dict[str, list[torch.Tensor]] = {}  # name -> [sum of mean * count, sum of counts]
        self.preset: str = ""
        self.overrides: dict[str, Any] = {}
        self.config: TransformerConfig | None = None
        self.tokenizer_json: str | None = None
        self.print_init_report = True  # init_from prints what it loaded (the transfer report turns it off)
        self._frozen: dict[str, Any] | None = None  # where checkpoints' frozen tensors come from (extras)
        self.aux: dict[str, nn.Module] = {}  # name -> frozen auxiliary model (aux_models); a dict, not a submodule
        self._aux_records: dict[str, dict[str, Any]] = {}  # name -> its source's path and tensor fingerprints
        self._rng_states: dict[str, Any] | None = None  # a checkpoint's RNG states, applied at fit start
        self._step_losses: list[torch.Tensor] = []  # this optimizer step's micro-batch losses, on the device
        self._step_metrics: dict[str, Any] = {}  # this batch's metrics, logged at its end on a logged step
        self._params: list[nn.Parameter] | None = None  # the trained parameters (_trained_params)
        self.corrupt_samples = 0  # on this rank, since the fit started

    # ---------------------------------------------------------------- for subclasses
    model_class: type[nn.Module]  # the model family; its `config_class` has the presets and the model_type
    block_types: tuple[type[nn.Module], ...] = ()  # the model's repeated blocks: units of sharding and recompute
    perplexity = False  # log val/ppl = exp(val/loss): only where the loss is a per-token log-likelihood of the data
    likelihood = "loss"  # the measure that is that log-likelihood (distillation optimizes a mix: its "task_loss")
    unit = "tokens"  # what batch_tokens counts: logged as {unit}_seen and {unit}_per_sec
    loss_per = "token"  # what val/loss is a mean over, for the run summary ("document", "image", "pair", ...)
    aux_models: dict[str, str] = {}  # auxiliary frozen model name -> the __init__ argument holding its source path

    def set_model_config(self, preset: str, config: dict[str, Any] | None) -> None:
        """Remember the preset and its overrides; fail on a bad preset or field now, not after data setup."""
        self.preset, self.overrides = preset, dict(config or {})
        self.model_class.config_class.from_preset(preset, **self.overrides)

    def check_data(self, datamodule: Any) -> None:
        """Fail at start-up, with one line, when the datamodule does not deliver what this task needs."""

    def compute_losses(self, batch: dict[str, Any]) -> Measures:
        """Named measures of a batch: name -> (mean, count). "loss" is optimized; all are logged as train/NAME and,
        reduced over ranks as count-weighted means, val/NAME. By default: `measures` of `scored_logits(self, ...)`;
        a task whose measures do not come from per-row logits (CLIP) overrides this instead."""
        logits, targets = self.scored_logits(self, batch)
        return self.measures(logits, targets, batch)

    def scored_logits(self, model: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """The logits a model gives for the rows the task scores, (N, V), and their targets (N,) (IGNORE_INDEX for a
        row that is not scored, e.g. a filler image). `model` is this task (its forward) or a model of the same
        output space (a distillation teacher, framework.tasks.distill): the split lets both be scored alike."""
        raise NotImplementedError

    def measures(self, logits: torch.Tensor, targets: torch.Tensor, batch: dict[str, Any]) -> Measures:
        """The named measures of `scored_logits`' output (the loss first among them)."""
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
        """The preset with its overrides, sized to the data (the fields its datamodule fixes, e.g. the vocabulary)
        and checked against it (e.g. the context)."""
        dm = self.datamodule()
        fields = dm.model_fields() if isinstance(dm, StreamDataModule) else {}
        config = self.model_class.config_class.from_preset(self.preset, **{**fields, **self.overrides})
        if dm is not None:
            self.check_data(dm)
            if isinstance(dm, StreamDataModule):
                dm.check_model(config)
        return config

    def build_model(self) -> nn.Module:
        self.config = self.resolve_config()
        dm = self.datamodule()
        if dm is not None and os.path.exists(dm.tokenizer_path):  # checkpoints carry their tokenizer
            with open(dm.tokenizer_path) as f:
                self.tokenizer_json = f.read()
        return self.model_class(self.config)

    def setup(self, stage: str) -> None:
        """Build the declared auxiliary models (before configure_model: outside DeepSpeed's zero.Init), under a
        forked RNG: their throw-away random init must not move the trained model's, which would then differ from
        the same run without them (a distilled student from its from-scratch baseline)."""
        from framework.tasks.aux import load_frozen

        device = self.trainer.strategy.root_device
        for name in self.aux_models:
            if name not in self.aux and self._aux_path(name) is not None:
                with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                    self.aux[name] = load_frozen(self._aux_path(name), self.trainer.strategy, self.block_types)

    def _aux_path(self, name: str) -> str | None:
        path = getattr(self, self.aux_models[name])
        if path is not None and not _source_exists(path):
            raise UserError(f"model.{self.aux_models[name]} '{path}' does not exist; pass a checkpoint of "
                            "`pretrain fit`, a directory of `pretrain export` or hf:DIR (a Hugging Face model)")
        return path

    def configure_model(self) -> None:
        if self.model is None:
            from framework.distributed import parallelize

            # sharding (FSDP2) and activation checkpointing are applied to the built model, before compile
            self.model = parallelize(self.build_model(), self.trainer.strategy, self.block_types,
                                     activation_checkpointing=self.activation_checkpointing)
            if self.init_from is not None and not self.trainer.ckpt_path:
                self._load_init_weights()
            from framework.distributed.expert_parallel import apply_expert_parallel

            apply_expert_parallel(self, self.model, self.trainer.strategy)  # with the full weights in place
        if self.compile and self._forward is None:
            # object.__setattr__: as a plain attribute, not a submodule (its parameters would be saved twice)
            object.__setattr__(self, "_forward", torch.compile(self.model))

    def _load_init_weights(self) -> None:
        from framework.checkpoint.init_from import load_weights

        assert self.model is not None and self.init_from is not None
        report = load_weights(self.model, self.init_from, self.trainer.strategy, self.model.tied_weights,
                              layers=self.init_layers)
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
        # logged in on_train_batch_end, on the steps whose metrics reach the loggers (logged_step)
        self._step_metrics = {f"train/{name}": value.detach() for name, (value, _) in measures.items()}
        self._step_metrics["lr"] = self.global_step  # the schedule's step for this batch; lr_at only if logged
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
        if self.perplexity and self.likelihood in names:
            nll = means[names.index(self.likelihood)].float()
            self.log("val/ppl", torch.exp(nll.clamp(max=30)), rank_zero_only=True)

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
        """Clip the global gradient norm (after unscaling), then hand the step's losses and pre-clip norm to the
        callbacks that watch steps (`on_step_measured`: the guard, which syncs the host once for both). DeepSpeed
        keeps gradients in its own buffers and clips them itself (gradient_clipping in its JSON); it reports the
        norm after its step. Lightning calls callbacks' on_before_optimizer_step before this hook, before clipping,
        hence this call."""
        from framework.distributed import is_deepspeed
        from framework.distributed.expert_parallel import clip_grad_norm, sync_expert_grads

        norm = None
        if not is_deepspeed(self.trainer.strategy):
            params = self._trained_params()
            sync_expert_grads(params)  # experts split over ranks are outside DDP (expert_parallel)
            max_norm = self.grad_clip if self.grad_clip > 0 else float("inf")
            norm = clip_grad_norm(params, max_norm)
            self._step_metrics["grad_norm"] = norm
        losses, self._step_losses = self._step_losses, []
        for callback in self.trainer.callbacks:
            if isinstance(callback, StepObserver):
                callback.on_step_measured(self.trainer, self, losses, norm)

    def _trained_params(self) -> list[nn.Parameter]:
        """The trained parameters, listed once per fit (on_train_start): a walk of the module tree costs ~0.3 ms a
        step at ~50 parameters, as much as a small model's clipping itself."""
        if self._params is None:
            self._params = [p for p in self.parameters() if p.requires_grad]
        return self._params

    def summary_lines(self) -> list[str]:
        """Lines for the run summary (the task's own; callbacks' come first)."""
        return []

    # ---------------------------------------------------------------- checkpoint extras
    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Log this batch's train/* measures, lr and grad_norm, on the steps whose metrics reach the loggers. After
        every callback's on_train_batch_end, so a step that Preemption or the guard makes the last one is logged."""
        from framework.distributed import is_deepspeed

        metrics, self._step_metrics = self._step_metrics, {}
        if not logged_step(self.trainer):
            return
        for key, value in metrics.items():
            if key == "lr":
                self.log("lr", self.lr_at(value), prog_bar=False)
            else:
                self.log(key, value, prog_bar=key == "train/loss")
        if is_deepspeed(self.trainer.strategy):
            norm = self.trainer.strategy.deepspeed_engine.get_global_grad_norm()
            if norm is not None:
                self.log("grad_norm", float(norm))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        from framework.checkpoint import extras

        checkpoint["framework"] = extras.run_metadata()
        checkpoint["task"] = f"{type(self).__module__}.{type(self).__qualname__}"
        assert self.config is not None
        checkpoint["model_config"] = self.config.to_dict()  # with its model_type: every reader dispatches on it
        if self.tokenizer_json is not None:
            checkpoint["tokenizer_json"] = self.tokenizer_json
        checkpoint["rng_states"] = extras.rng_states(self.device)  # a collective: every rank saves
        from framework.distributed.expert_parallel import gather_experts

        gather_experts(checkpoint, self, self.trainer.optimizers)  # a collective too: each expert once, at full size
        if self.frozen_from_init() and self._single_file():
            assert self.model is not None and self.init_from is not None
            self._frozen = extras.leave_out_frozen(checkpoint, self.model, self.init_from, self.init_prefix(),
                                                   self._frozen)
        if self.aux:  # never their weights (they are not submodules): where they came from, to check on resume
            for name in self.aux:
                if name not in self._aux_records:
                    self._aux_records[name] = extras.aux_record(self._aux_path(name))
            checkpoint[extras.AUX_KEY] = dict(self._aux_records)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        from framework.checkpoint import extras

        self._frozen = extras.restore_frozen(checkpoint, self.init_from, str(self.trainer.ckpt_path)) or self._frozen
        from framework.distributed.expert_parallel import slice_experts

        slice_experts(checkpoint, self)  # full expert tensors -> this rank's, under expert parallelism
        check_family(checkpoint.get("model_config"), self.model_class.config_class.model_type, type(self).__name__)
        for name, saved in (checkpoint.get(extras.AUX_KEY) or {}).items():
            if name in self.aux:
                current = extras.aux_record(self._aux_path(name))
                extras.check_aux(saved, name, current, str(self.trainer.ckpt_path))
                self._aux_records[name] = current
        self._rng_states = checkpoint.get("rng_states")  # applied at fit start: Lightning seeds again after loading

    def on_train_start(self) -> None:
        from framework.distributed.expert_parallel import slice_optimizer_states

        slice_optimizer_states(self, self.trainer.optimizers)  # restored at full size after on_load_checkpoint
        self._params = None  # listed again: a new fit may have a model built, sharded or split anew
        if self._rng_states is not None:
            from framework.checkpoint.extras import restore_rng

            states, self._rng_states = self._rng_states, None
            restore_rng(states, self.global_rank, self.trainer.world_size, self.device)

    # ---------------------------------------------------------------- checkpoints without a frozen backbone
    def frozen_from_init(self) -> bool:
        """Whether this fine-tune's frozen parameters are init_from's weights, unchanged (linear probes, LoRA): then
        its checkpoints need not store them again. The tasks with such modes override it."""
        return False

    def init_prefix(self) -> str:
        """The prefix of init_from's names for this model's tensors (a CLIP checkpoint's image tower: `visual.`)."""
        return ""

    def _single_file(self) -> bool:
        """Whether the strategy writes one .ckpt file with full tensors (one process, DDP): FSDP2 and DeepSpeed
        write every tensor through their own formats."""
        from lightning.pytorch.strategies import DeepSpeedStrategy, ModelParallelStrategy

        return not isinstance(self.trainer.strategy, (DeepSpeedStrategy, ModelParallelStrategy))


def check_family(model_config: dict[str, Any] | None, expected: str, user: str) -> None:
    """One line when a checkpoint's model family is not the one `user` (a task or a command) works with."""
    from framework.models.registry import model_type_of

    found = model_type_of(model_config or {})
    if found != expected:
        raise UserError(f"the checkpoint holds a {found!r} model but {user} needs a {expected!r} one; pass a "
                        f"checkpoint of a {expected!r} model (or a config whose model.class_path trains {found!r})")


def _source_exists(path: str) -> bool:
    """Whether a model source (a checkpoint, an export, a Hugging Face directory `hf:DIR`) exists."""
    from framework.checkpoint.reader import source_exists

    return source_exists(path)
