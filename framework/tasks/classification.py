"""Sequence classification: labelled documents -> a GPT or encoder backbone -> pooled -> class logits.

The fine-tuning task: start it from a pre-trained checkpoint with `model.init_from` (the backbone's config and weights
come from there) and train on a ClassificationDataModule's labelled documents.
"""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.nn.functional as F

from framework.data.samples import IGNORE_LABEL, SampleDataModule
from framework.errors import UserError
from framework.models.classifier import ClassifierConfig, SequenceClassifier
from framework.models.registry import config_from_dict, family, text_backbones
from framework.models.transformer import Block
from framework.tasks.base import Measures, PretrainTask

MODES = ("full", "linear", "lora")


class ClassMetrics:
    """Per-class measures every classification task logs: macro-F1 (train: over the batches since the last log; val:
    over the whole val split, its confusion matrix summed over ranks) and, in the run summary, per-class precision,
    recall and F1. A task calls `_add_confusion` from compute_losses and sets `class_names`."""

    _confusion: dict[str, torch.Tensor]
    val_confusion: torch.Tensor | None = None  # of the last validation, for the run summary
    class_names: list[str]

    def _add_confusion(self, split: str, logits: torch.Tensor, labels: torch.Tensor, real: torch.Tensor) -> None:
        K = logits.size(-1)
        pairs = labels[real] * K + logits.argmax(-1)[real]
        counts = torch.bincount(pairs, minlength=K * K).view(K, K)  # [true, predicted]
        if split in self._confusion:
            self._confusion[split] = self._confusion[split] + counts
        else:
            self._confusion[split] = counts

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        if (self.trainer.global_step + 1) % max(1, self.trainer.log_every_n_steps) == 0 and "train" in self._confusion:
            self.log("train/macro_f1", macro_f1(self._confusion.pop("train")))
        return loss

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        confusion = self._confusion.pop("val", None)
        if confusion is None:
            return
        confusion = self.trainer.strategy.reduce(confusion.double(), reduce_op="sum")
        self.val_confusion = confusion.cpu()
        self.log("val/macro_f1", macro_f1(confusion).float(), rank_zero_only=True)

    def summary_lines(self) -> list[str]:
        """Per-class precision, recall and F1 of the last validation, for the run summary."""
        if self.val_confusion is None:
            return super().summary_lines()
        c = self.val_confusion
        lines = super().summary_lines() + [f"{'class':<24} {'support':>8} {'precision':>10} {'recall':>8} {'F1':>6}"]
        for k, (p, r, f) in enumerate(zip(*per_class(c))):
            name = self.class_names[k] if k < len(self.class_names) else str(k)
            lines.append(f"{name[:24]:<24} {int(c[k].sum()):>8} {p:>10.1%} {r:>8.1%} {f:>6.1%}")
        return lines


class ClassificationTask(ClassMetrics, PretrainTask):
    """Fine-tunes (or trains from scratch) a sequence classifier; logs train/val `loss`, `accuracy` and `macro_f1`
    (val: over the whole val split; train: over the batches since the last log), per-class F1 in the run summary.

    Args:
        backbone: the backbone family when building from a preset: `gpt` or `bert`.
        backbone_preset: a preset of that family (e.g. `bert-cpu`) to train from scratch; leave unset with
            init_from: the backbone is then the pre-trained model's (its config is read from the checkpoint or export).
        config: backbone config fields that replace the preset's or the pre-trained model's (e.g. `{dropout: 0.1}`).
        mode: `full` (every weight trains), `linear` (the backbone is frozen and runs without dropout: a linear
            probe of its features) or `lora` (the backbone is frozen; low-rank adapters on every block's attention
            and MLP projections train, with the head).
        pooling: `cls` or `mean` for an encoder, `last` or `mean` for a GPT (default: cls / last).
        classifier_dropout: dropout on the pooled features, before the head.
        lora_rank, lora_alpha, lora_dropout: the adapters of mode lora (update scale alpha / rank).
        head_lr: the head's own peak LR (default: lr).
        layer_decay: layer-wise LR decay (ELECTRA, BEiT): block i of n gets lr * layer_decay ** (n - i), the
            embeddings lr * layer_decay ** (n + 1); 1.0 turns it off.
        random_init: with init_from, build the same architecture but keep its random init (the "scratch" baseline
            of `pretrain transfer-report`).
        **kwargs: the optimizer, schedule, clipping, compile, MFU and init_from options of PretrainTask.
    """

    model_class = SequenceClassifier
    block_types = (Block,)
    loss_per = "document"

    def __init__(self, backbone: str = "bert", backbone_preset: str | None = None, config: dict[str, Any] | None = None,
                 mode: str = "full", pooling: str = "", classifier_dropout: float = 0.1, lora_rank: int = 8,
                 lora_alpha: float = 16.0, lora_dropout: float = 0.0, head_lr: float | None = None,
                 layer_decay: float = 1.0, random_init: bool = False, **kwargs: Any):
        super().__init__(**kwargs)
        self.save_hyperparameters()
        if mode not in MODES:
            raise UserError(f"model.mode must be one of {', '.join(MODES)}, got {mode!r}")
        if backbone not in text_backbones():
            raise UserError(f"model.backbone must be one of {', '.join(text_backbones())}, got {backbone!r}")
        if backbone_preset is None and self.init_from is None:
            raise UserError("set model.init_from (a pre-trained checkpoint or export) or model.backbone_preset (to "
                            "train a classifier from scratch)")
        if not 0 < layer_decay <= 1 or (head_lr is not None and head_lr <= 0) or lora_rank < 1:
            raise UserError("model.layer_decay must be in (0, 1], model.head_lr > 0 and model.lora_rank >= 1")
        self.backbone, self.preset, self.overrides, self.mode = backbone, backbone_preset or "", dict(config or {}), mode
        self.pooling, self.classifier_dropout = pooling, classifier_dropout
        self.lora = (lora_rank, lora_alpha, lora_dropout)
        self.head_lr, self.layer_decay, self.random_init = head_lr, layer_decay, random_init
        if backbone_preset is not None:
            family(backbone).config_class.from_preset(backbone_preset, **self.overrides)  # a bad preset/field fails now
        self._confusion: dict[str, torch.Tensor] = {}
        self.class_names: list[str] = []

    # ---------------------------------------------------------------- model
    def check_data(self, datamodule: Any) -> None:
        if not isinstance(datamodule, SampleDataModule):
            raise UserError("ClassificationTask needs labelled documents: set data.class_path to "
                            "framework.data.documents.ClassificationDataModule (see configs/finetune/smoke.yaml)")

    def resolve_config(self) -> ClassifierConfig:
        dm = self.datamodule()
        if dm is None:
            raise UserError("ClassificationTask builds its model from the data's classes: run it with a datamodule")
        self.check_data(dm)
        if self.preset:
            backbone = family(self.backbone).config_class.from_preset(
                self.preset, **{"vocab_size": dm.vocab_size, **self.overrides}).to_dict()
        else:
            assert self.init_from is not None
            from framework.checkpoint.init_from import source_config

            backbone = {**source_config(self.init_from), **self.overrides}
        trunk = config_from_dict(backbone)
        if trunk.model_type not in text_backbones():
            raise UserError(f"model.init_from '{self.init_from}' holds a {trunk.model_type!r} model; fine-tune a "
                            f"pre-trained {' or '.join(text_backbones())} checkpoint")
        dm.check_vocab(trunk.vocab_size)
        if dm.seq_len > trunk.seq_len:
            raise UserError(f"data.seq_len={dm.seq_len} is longer than the backbone's context ({trunk.seq_len}); "
                            f"set data.seq_len <= {trunk.seq_len}")
        if self.init_from is not None:
            self._check_tokenizer(dm)
        self.class_names = dm.class_names
        specials = {k: v for k, v in dm.special_ids.items() if k in ("eod", "pad", "cls", "sep")}
        rank, alpha, dropout = self.lora
        return ClassifierConfig(backbone=trunk.to_dict(), num_classes=dm.num_classes, special_ids=specials,
                                pooling=self.pooling, classifier_dropout=self.classifier_dropout,
                                lora_rank=rank if self.mode == "lora" else 0, lora_alpha=alpha, lora_dropout=dropout,
                                class_names=dm.class_names)

    def _check_tokenizer(self, dm: Any) -> None:
        """The data must be tokenized as the pre-trained model was: otherwise every id means something else."""
        from framework.checkpoint.init_from import source_tokenizer
        from framework.data.tokenizer import Tokenizer, load_tokenizer, same_tokenizer

        text = source_tokenizer(self.init_from)
        if text is None:
            return
        if not same_tokenizer(Tokenizer.from_str(text), load_tokenizer(dm.tokenizer_path)):
            raise UserError(f"the data at '{dm.path}' was tokenized with another tokenizer than the model of "
                            f"'{self.init_from}'; prepare it with `pretrain prepare --tokenizer {self.init_from} ...`")

    def build_model(self) -> SequenceClassifier:
        model = super().build_model()
        assert isinstance(model, SequenceClassifier)
        if self.mode != "full":
            for name, p in model.transformer.named_parameters():
                p.requires_grad = self.mode == "lora" and ".lora_" in name
            model.frozen_trunk = self.mode == "linear"
        return model

    def _load_init_weights(self) -> None:
        if not self.random_init:
            super()._load_init_weights()

    def frozen_from_init(self) -> bool:
        return self.mode != "full" and self.init_from is not None and not self.random_init

    def lr_scale(self, name: str) -> float:
        name = name.removeprefix("model.")
        if name.startswith("head."):
            return (self.head_lr / self.lr) if self.head_lr is not None else 1.0
        if self.layer_decay == 1.0 or self.config is None:
            return 1.0
        n = self.config.backbone["n_layer"]
        block = re.match(r"transformer\.h\.(\d+)\.", name)
        if block:
            return self.layer_decay ** (n - int(block.group(1)))
        if name.startswith(("transformer.wte", "transformer.wpe")):
            return self.layer_decay ** (n + 1)
        return 1.0  # the final LayerNorm

    # ---------------------------------------------------------------- measures
    def scored_logits(self, model: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        return model(batch["tokens"], batch["lengths"]), batch["labels"]  # (B, K); labels -100 for filler rows

    def measures(self, logits: torch.Tensor, labels: torch.Tensor, batch: dict[str, Any]) -> Measures:
        real = labels != IGNORE_LABEL
        count = real.sum()
        loss = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_LABEL, reduction="sum") / count.clamp(min=1)
        correct = ((logits.detach().argmax(-1) == labels) & real).sum()
        self._add_confusion("train" if self.training else "val", logits.detach(), labels, real)
        return {"loss": (loss, count), "accuracy": (correct / count.clamp(min=1), count)}

    def batch_tokens(self, batch: dict[str, Any]) -> int:
        assert self.model is not None
        B, L = batch["tokens"].shape
        return B * self.model.framed_len(L)

    def batch_flops(self, batch: dict[str, Any]) -> int:
        if self.model is None:
            return 0
        B, L = batch["tokens"].shape
        return self.model.flops(B, self.model.framed_len(L))


def scores(confusion: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-class precision, recall and F1 from a confusion matrix [true, predicted] (0 where undefined)."""
    c = confusion.double()
    tp = c.diagonal()
    precision = tp / c.sum(0).clamp(min=1)
    recall = tp / c.sum(1).clamp(min=1)
    return precision, recall, 2 * precision * recall / (precision + recall).clamp(min=1e-12)


def per_class(confusion: torch.Tensor) -> tuple[list[float], list[float], list[float]]:
    precision, recall, f1 = scores(confusion)
    return precision.tolist(), recall.tolist(), f1.tolist()


def macro_f1(confusion: torch.Tensor) -> torch.Tensor:
    """Mean F1 over the classes that occur (as true or predicted labels) in the confusion matrix [true, predicted]."""
    f1 = scores(confusion)[2]
    present = (confusion.sum(0) + confusion.sum(1)) > 0
    return f1[present].mean() if bool(present.any()) else f1.sum()
