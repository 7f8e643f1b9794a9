"""Supervised image classification: images -> a ResNet or ViT -> class logits -> cross-entropy.

Two uses, one task: supervised pre-training of an image backbone from scratch (the ImageNet -> ResNet/ViT tradition:
`preset`), and fine-tuning a pre-trained one (`init_from` a supervised checkpoint, or a CLIP checkpoint whose image
tower is taken): `mode: full` trains everything, `mode: linear` is a linear probe of the frozen features.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from framework.errors import UserError
from framework.models.registry import config_from_dict, family, image_models, image_tower
from framework.models.resnet import Stage
from framework.models.transformer import Block
from framework.tasks.base import Measures, PretrainTask
from framework.tasks.classification import ClassMetrics

MODES = ("full", "linear")
IGNORE_LABEL = -100  # filler rows and undecodable images


class ImageClassificationTask(ClassMetrics, PretrainTask):
    """Trains an image classifier; logs train/val `loss` (cross-entropy, with label smoothing when set),
    `accuracy` (top-1), `top5` and `macro_f1`; per-class F1 and the class-prior baseline in the run summary.
    Data: framework.data.images.ImageDataModule (`pretrain prepare-images`).

    Args:
        backbone: `resnet` or `vit`: the family of `backbone_preset`.
        backbone_preset: a named size of that family (resnet-cpu, resnet18, resnet50; vit-cpu, vit-tiny/16,
            vit-small/16, vit-base/16). Ignored with init_from: the backbone is then the pre-trained model's.
        config: fields that replace the preset's or the pre-trained model's (e.g. `{dropout: 0.1}`); the number of
            classes always comes from the data.
        label_smoothing: cross-entropy against (1 - e) on the true class and e spread over all classes (0 disables;
            0.1 is the ImageNet recipe of Szegedy et al. 2016).
        mode: `full` (every weight trains) or `linear` (the backbone is frozen, its BatchNorm statistics too, and
            only a new head trains: a linear probe of its features).
        head_lr: the head's own peak LR (default: lr), e.g. higher for a linear probe.
        random_init: with init_from, build the same architecture but keep its random init (the "scratch" baseline
            of `pretrain transfer-report`).
        **kwargs: the optimizer, schedule, clipping, compile, MFU and init_from options of PretrainTask. With
            init_from, the head is always new (its classes are this data's).
    """

    block_types = (Block, Stage)  # ViT blocks, ResNet stages: the units of FSDP sharding and recompute
    loss_per = "image"
    unit = "images"

    def __init__(self, backbone: str = "resnet", backbone_preset: str = "resnet-cpu",
                 config: dict[str, Any] | None = None, label_smoothing: float = 0.0, mode: str = "full",
                 head_lr: float | None = None, random_init: bool = False, **kwargs: Any):
        super().__init__(**kwargs)
        self.save_hyperparameters()
        if backbone not in image_models():
            raise UserError(f"model.backbone must be one of {', '.join(sorted(image_models()))}, got {backbone!r}")
        if mode not in MODES:
            raise UserError(f"model.mode must be one of {', '.join(MODES)}, got {mode!r}")
        if not 0 <= label_smoothing < 1 or (head_lr is not None and head_lr <= 0):
            raise UserError("model.label_smoothing must be in [0, 1) and model.head_lr > 0")
        if mode == "linear" and self.init_from is None:
            raise UserError("model.mode=linear probes a pre-trained backbone: set model.init_from")
        self.model_class = family(backbone).model_class
        self.backbone, self.mode = backbone, mode
        self.label_smoothing, self.head_lr, self.random_init = label_smoothing, head_lr, random_init
        if self.init_from is None:
            self.set_model_config(backbone_preset, config)
        else:
            self.overrides = dict(config or {})
        self._confusion: dict[str, torch.Tensor] = {}
        self.class_names: list[str] = []

    # ---------------------------------------------------------------- model
    def check_data(self, datamodule: Any) -> None:
        from framework.data.images import ImageDataModule

        if not isinstance(datamodule, ImageDataModule):
            raise UserError("ImageClassificationTask needs images: set data.class_path to "
                            "framework.data.images.ImageDataModule (see configs/vision/smoke.yaml)")
        datamodule.num_classes  # noqa: B018  # unlabelled shards fail here, with the fix

    def resolve_config(self) -> Any:
        dm = self.datamodule()
        if dm is None:
            raise UserError("ImageClassificationTask takes its classes from the data: run it with a datamodule")
        self.check_data(dm)
        overrides = {**self.overrides, "num_classes": dm.num_classes}
        if self.init_from is None:
            if self.backbone == "resnet":
                overrides.setdefault("image_size", dm.image_size)  # nominal for a ResNet (FLOPs): the data's
            config = self.model_class.config_class.from_preset(self.preset, **overrides)
        else:
            from framework.checkpoint.init_from import source_config

            values = image_tower(source_config(self.init_from))[0]
            if values.get("model_type") not in image_models():
                raise UserError(f"model.init_from '{self.init_from}' holds a {values.get('model_type')!r} model; "
                                "fine-tune a resnet, vit or clip checkpoint")
            self.model_class = family(values["model_type"]).model_class
            self.backbone = values["model_type"]
            config = config_from_dict({**values, **overrides})
        if self.backbone == "vit" and config.image_size != dm.image_size:
            raise UserError(f"data.image_size={dm.image_size} but the ViT takes {config.image_size} px images (its "
                            f"position embeddings are per patch); set data.image_size={config.image_size}")
        self.class_names = dm.class_names
        return config

    def build_model(self) -> torch.nn.Module:
        model = super().build_model()
        if self.mode == "linear":
            for name, p in model.named_parameters():
                p.requires_grad = name.startswith("head.")
        return model

    def _load_init_weights(self) -> None:
        from framework.checkpoint.init_from import load_weights

        assert self.model is not None and self.init_from is not None
        if self.random_init:
            return
        report = load_weights(self.model, self.init_from, self.trainer.strategy, (), prefix=self.init_prefix(),
                              skip=("head.",), layers=self.init_layers)
        if self.trainer.is_global_zero and self.print_init_report:
            print("\n".join(report.lines(self.init_from)), flush=True)

    def frozen_from_init(self) -> bool:
        return self.mode == "linear" and self.init_from is not None and not self.random_init

    def init_prefix(self) -> str:
        from framework.checkpoint.init_from import source_config

        assert self.init_from is not None
        return image_tower(source_config(self.init_from))[1]

    def train(self, mode: bool = True) -> "ImageClassificationTask":
        """A linear probe keeps the backbone in eval mode: its BatchNorm statistics and dropout stay as trained."""
        super().train(mode)
        if self.mode == "linear" and self.model is not None:
            for name, child in self.model.named_children():
                if name != "head":
                    child.eval()
        return self

    def lr_scale(self, name: str) -> float:
        if self.head_lr is not None and name.removeprefix("model.").startswith("head."):
            return self.head_lr / self.lr
        return 1.0

    # ---------------------------------------------------------------- measures
    def scored_logits(self, model: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        return model(batch["images"]), batch["labels"]  # (B, K); labels -100 for filler rows, undecodable images

    def measures(self, logits: torch.Tensor, labels: torch.Tensor, batch: dict[str, Any]) -> Measures:
        logits = logits.float()
        real = labels != IGNORE_LABEL
        count = real.sum()
        denominator = count.clamp(min=1)
        loss = F.cross_entropy(logits, labels, ignore_index=IGNORE_LABEL, reduction="sum",
                               label_smoothing=self.label_smoothing) / denominator
        with torch.no_grad():
            k = min(5, logits.size(-1))
            top = logits.topk(k, dim=-1).indices  # (B, k)
            hits = (top == labels[:, None]) & real[:, None]
            measures: Measures = {"loss": (loss, count), "accuracy": (hits[:, 0].sum() / denominator, count),
                                  f"top{k}": (hits.any(-1).sum() / denominator, count)}
            self._add_confusion("train" if self.training else "val", logits, labels, real)
        return measures

    def batch_tokens(self, batch: dict[str, Any]) -> int:
        return int(batch["images"].size(0))

    def batch_flops(self, batch: dict[str, Any]) -> int:
        if self.model is None:
            return 0
        flops = self.model.flops(int(batch["images"].size(0)))
        return flops // 3 if self.mode == "linear" else flops  # a frozen backbone runs forward only
