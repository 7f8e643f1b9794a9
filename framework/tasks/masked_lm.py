"""Masked language modelling (BERT-style encoder): masked windows -> encoder -> loss on the masked positions."""

from __future__ import annotations

from typing import Any

import torch

from framework.errors import UserError
from framework.models.encoder import Encoder
from framework.models.transformer import Block
from framework.objectives.causal_lm import IGNORE_INDEX
from framework.objectives.masked_lm import masked_accuracy, masked_lm_loss
from framework.tasks.base import Measures, PretrainTask


class MaskedLMTask(PretrainTask):
    """Pre-trains a bidirectional encoder with masked-LM on the batches of a MaskedLMDataModule
    (`data.class_path: framework.data.datamodule.MaskedLMDataModule`, which chooses and masks the tokens).

    Only the chosen positions go through the vocabulary projection (gathered first). Logs train/val `loss` (MLM
    cross-entropy over the chosen positions) and `accuracy` (the original token is the model's top guess).

    Args:
        preset: a named encoder size (`bert-test`, `bert-cpu`, `bert-tiny`, `bert-mini`, `bert-small`, `bert-medium`,
            `bert-base`, `bert-large`).
        config: fields of EncoderConfig that replace the preset's (e.g. `{pos_embedding: rope}`).
        **kwargs: the optimizer, schedule, clipping, compile and MFU options of PretrainTask.
    """

    model_class = Encoder
    block_types = (Block,)

    def __init__(self, preset: str = "bert-cpu", config: dict[str, Any] | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.save_hyperparameters()
        self.set_model_config(preset, config)

    def check_data(self, datamodule: Any) -> None:
        from framework.data.datamodule import MaskedLMDataModule

        if not isinstance(datamodule, MaskedLMDataModule):
            raise UserError("MaskedLMTask needs masked batches: set data.class_path to "
                            "framework.data.datamodule.MaskedLMDataModule (see configs/bert/smoke.yaml)")
        datamodule.check_specials()

    def scored_logits(self, model: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, labels = batch["input_ids"], batch["labels"]  # (B, T) each
        predict = labels != IGNORE_INDEX  # (B, T)
        return model(inputs, predict=predict), labels[predict]  # (M, V): only the chosen positions are projected

    def measures(self, logits: torch.Tensor, targets: torch.Tensor, batch: dict[str, Any]) -> Measures:
        count = targets.numel()
        return {"loss": (masked_lm_loss(logits, targets), count),
                "accuracy": (masked_accuracy(logits.detach(), targets), count)}

    def batch_tokens(self, batch: dict[str, Any]) -> int:
        return batch["input_ids"].numel()

    def batch_flops(self, batch: dict[str, Any]) -> int:
        if self.model is None:
            return 0
        B, T = batch["input_ids"].shape
        return self.model.flops(B, T, batch["predicted"])
