"""Contrastive image-text pre-training (CLIP): image-caption pairs -> two towers -> symmetric InfoNCE.

The loss is framework.objectives.contrastive.clip_loss: this rank's pairs against every rank's (features all-gathered
with their gradients), so the negatives of a step are the whole global batch. Gradient accumulation keeps them too:
`accum_freq` splits each rank's batch into micro-batches whose features are computed without storing activations and
recomputed one micro-batch at a time in backward (model.chunks), so memory is one micro-batch's while the loss sees
the whole batch. Lightning's accumulate_grad_batches would shrink the negatives to one micro-batch: it is refused.
"""

from __future__ import annotations

from typing import Any

import torch

from framework.errors import UserError
from framework.models.clip import CLIP
from framework.models.resnet import Stage
from framework.models.transformer import Block
from framework.objectives.contrastive import (contrastive_logits, infonce, retrieval_recall, zero_shot_accuracy,
                                              zero_shot_classifier)
from framework.tasks.base import Measures, PretrainTask
from framework.inference import DEFAULT_TEMPLATES, check_templates, encode_prompts


class CLIPTask(PretrainTask):
    """Pre-trains an image tower and a text tower together; logs train/val `loss` (symmetric InfoNCE over the global
    batch), `logit_scale` (the learned inverse temperature, capped at 100), `accuracy` (share of this rank's images
    whose own caption scores highest in the global batch), and on val: image->text and text->image recall@1/5/10 over
    the whole val split and, when the val images carry classes, zero-shot top-1/top-5 accuracy with prompts.
    Data: framework.data.images.ImageDataModule with `captions: true`.

    Args:
        preset: a named CLIP (clip-test, clip-cpu, clip-vit-b-16).
        config: fields that replace the preset's; `image` and `text` are merged key by key (e.g.
            `{text: {n_layer: 6}}`). The text vocabulary and special tokens always come from the data's tokenizer.
        accum_freq: micro-batches per rank batch (data.batch_size must be a multiple); the loss still contrasts the
            whole global batch (see the module docstring). 1: no accumulation.
        zero_shot_templates: prompts with `{}` for the class name; a class's text embedding is the mean over them.
        **kwargs: the optimizer, schedule, clipping, compile, MFU and init_from options of PretrainTask.
    """

    model_class = CLIP
    block_types = (Block, Stage)
    loss_per = "pair"
    unit = "images"

    def __init__(self, preset: str = "clip-cpu", config: dict[str, Any] | None = None, accum_freq: int = 1,
                 zero_shot_templates: list[str] | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.save_hyperparameters()
        if accum_freq < 1:
            raise UserError(f"model.accum_freq must be >= 1, got {accum_freq}")
        self.accum_freq = accum_freq
        self.templates = check_templates(list(zero_shot_templates or DEFAULT_TEMPLATES), "model.zero_shot_templates")
        self.set_model_config(preset, config)
        self._val_outputs: list[tuple[torch.Tensor, ...]] = []
        self.zero_shot: dict[str, float] = {}  # of the last validation, for the run summary
        self.class_names: list[str] = []

    # ---------------------------------------------------------------- model
    def check_data(self, datamodule: Any) -> None:
        from framework.data.images import ImageDataModule

        if not (isinstance(datamodule, ImageDataModule) and datamodule.captions):
            raise UserError("CLIPTask needs image-caption pairs: set data.class_path to "
                            "framework.data.images.ImageDataModule with data.captions=true (see "
                            "configs/clip/smoke.yaml)")
        if datamodule.batch_size % self.accum_freq:
            raise UserError(f"data.batch_size={datamodule.batch_size} is not a multiple of model.accum_freq="
                            f"{self.accum_freq}; each micro-batch must be the same size")

    def resolve_config(self) -> Any:
        dm = self.datamodule()
        overrides = dict(self.overrides)
        if dm is not None:
            self.check_data(dm)
            text = {**overrides.get("text", {}), "vocab_size": dm.vocab_size}
            specials = {k: v for k, v in dm.special_ids.items() if k in ("eod", "pad", "cls", "sep")}
            overrides = {**overrides, "text": text, "special_ids": specials}
        config = self.model_class.config_class.from_preset(self.preset, **overrides)
        if dm is not None:
            image_size = config.image.get("image_size")
            if config.image.get("model_type") == "vit" and image_size != dm.image_size:
                raise UserError(f"data.image_size={dm.image_size} but the image tower takes {image_size} px images; "
                                f"set data.image_size={image_size}")
            longest = config.text["seq_len"] - 2  # room for the framing tokens
            if dm.max_caption_tokens > longest:
                raise UserError(f"data.max_caption_tokens={dm.max_caption_tokens} is longer than the text tower's "
                                f"context allows ({longest}); lower it or raise model.config.text.seq_len")
            self.class_names = dm.class_names if dm.has_labels else []
        return config

    def on_fit_start(self) -> None:
        if self.trainer.accumulate_grad_batches > 1:
            raise UserError("trainer.accumulate_grad_batches shrinks CLIP's negatives to one micro-batch; set it to 1 "
                            f"and use model.accum_freq={self.trainer.accumulate_grad_batches} instead (same memory, "
                            "every negative kept)")

    # ---------------------------------------------------------------- measures
    def compute_losses(self, batch: dict[str, Any]) -> Measures:
        chunks = self.accum_freq if self.training and torch.is_grad_enabled() else 1
        images, texts, scale = self(batch["images"], batch["tokens"], batch["lengths"], chunks=chunks)
        valid = batch["valid"]
        # clip_loss, with its logits kept for the accuracy: one feature gather per step
        logits_i2t, logits_t2i, own, count = contrastive_logits(images.float(), texts.float(), scale.float(), valid)
        loss = infonce(logits_i2t, logits_t2i, own, count)
        # this rank's images whose own caption wins among the global batch's
        correct = (logits_i2t.detach().argmax(-1) == own).sum()
        if not self.training:
            labels = batch.get("labels", torch.full_like(valid, -100, dtype=torch.long))
            self._val_outputs.append((images.detach().float(), texts.detach().float(), valid, labels))
        return {"loss": (loss, count), "accuracy": (correct / count.clamp(min=1), count),
                "logit_scale": (scale.detach().float(), 1)}

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        if not self._val_outputs:
            return
        images, texts, valid, labels = (torch.cat(t) for t in zip(*self._val_outputs))
        self._val_outputs = []
        if self.trainer.world_size > 1:  # every rank validated the same number of full-size batches
            images, texts, valid, labels = (self.trainer.strategy.all_gather(t).flatten(0, 1)
                                            for t in (images, texts, valid, labels))
        images, texts, labels = images[valid], texts[valid], labels[valid]
        for name, value in retrieval_recall(images, texts).items():
            self.log(f"val/{name}", float(value), rank_zero_only=True)
        if self.class_names and bool((labels >= 0).all()) and len(labels):
            classifier = self.class_embeddings(self.class_names)  # every rank: the towers may be sharded
            scores = zero_shot_accuracy(images, classifier, labels)
            self.zero_shot = {k: float(v) for k, v in scores.items()}
            for name, value in self.zero_shot.items():
                self.log(f"val/zero_shot_{name}", value, rank_zero_only=True)

    @torch.no_grad()
    def class_embeddings(self, class_names: list[str]) -> torch.Tensor:
        """(K, E) zero-shot classifier: each class's prompts encoded by the text tower, averaged, normalized."""
        from framework.data.tokenizer import Tokenizer

        if self.tokenizer_json is None:
            raise UserError("zero-shot classification needs the captions' tokenizer; the data has no tokenizer.json")
        assert self.model is not None
        tokens, lengths = encode_prompts(Tokenizer.from_str(self.tokenizer_json), class_names, self.templates,
                                         self.model.config.text["seq_len"] - 2)
        _, texts, _ = self(None, tokens.to(self.device), lengths.to(self.device))  # (K*T, E)
        return zero_shot_classifier(texts.float().view(len(class_names), len(self.templates), -1))

    def summary_lines(self) -> list[str]:
        lines = super().summary_lines()
        if self.zero_shot and self.class_names:
            chance = 1 / len(self.class_names)
            top1 = self.zero_shot.get("top1", 0.0)
            lines.append(f"zero-shot top-1: {top1:.2%} over {len(self.class_names)} classes (chance {chance:.2%}, "
                         f"{top1 / chance:.1f}x)")
        return lines

    def batch_tokens(self, batch: dict[str, Any]) -> int:
        return int(batch["images"].size(0))

    def batch_flops(self, batch: dict[str, Any]) -> int:
        if self.model is None:
            return 0
        return self.model.flops(int(batch["images"].size(0)), int(batch["tokens"].numel()))
