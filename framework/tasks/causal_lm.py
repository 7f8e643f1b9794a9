"""Causal language modelling (GPT): batch of packed windows -> model -> next-token loss."""

from __future__ import annotations

from typing import Any

import torch

from framework.models.gpt import GPT
from framework.models.transformer import Block
from framework.objectives.causal_lm import causal_lm_loss, shift
from framework.tasks.base import Measures, PretrainTask


class CausalLMTask(PretrainTask):
    """Pre-trains a GPT on the packed token windows of a ShardDataModule.

    Args:
        preset: a named GPT size (`gpt-tiny`, `gpt-small-cpu`, `gpt2-124m`, ... `gpt-6.7b`).
        config: fields of GPTConfig that replace the preset's (e.g. `{n_layer: 6, dropout: 0.1}`). `vocab_size` defaults
            to the data's tokenizer; set it only to reserve a larger embedding.
        **kwargs: the optimizer, schedule, clipping, compile and MFU options of PretrainTask.
    """

    model_class = GPT
    block_types = (Block,)
    perplexity = True

    def __init__(self, preset: str = "gpt-small-cpu", config: dict[str, Any] | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.save_hyperparameters()
        self.set_model_config(preset, config)

    def scored_logits(self, model: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, targets = shift(batch["tokens"])  # (B, T) each
        return model(inputs).flatten(0, 1), targets.flatten()  # (B*T, V), (B*T,): every position is scored

    def measures(self, logits: torch.Tensor, targets: torch.Tensor, batch: dict[str, Any]) -> Measures:
        return {"loss": (causal_lm_loss(logits[None], targets[None]), targets.numel())}

    def batch_tokens(self, batch: dict[str, Any]) -> int:
        B, W = batch["tokens"].shape
        return B * (W - 1)

    def batch_flops(self, batch: dict[str, Any]) -> int:
        if self.model is None:
            return 0
        B, W = batch["tokens"].shape
        return B * (W - 1) * self.model.flops_per_token(W - 1)
