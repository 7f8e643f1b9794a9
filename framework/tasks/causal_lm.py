"""Causal language modelling (GPT): batch of packed windows -> model -> next-token loss."""

from __future__ import annotations

import os
from typing import Any

import torch

from framework.errors import UserError
from framework.models.gpt import GPT, Block, GPTConfig
from framework.objectives.causal_lm import causal_lm_loss, shift
from framework.tasks.base import PretrainTask


class CausalLMTask(PretrainTask):
    """Pre-trains a GPT on the packed token windows of a ShardDataModule.

    Args:
        preset: a named GPT size (`gpt-tiny`, `gpt-small-cpu`, `gpt2-124m`, ... `gpt-6.7b`).
        config: fields of GPTConfig that replace the preset's (e.g. `{n_layer: 6, dropout: 0.1}`). `vocab_size` defaults
            to the data's tokenizer; set it only to reserve a larger embedding.
        **the rest**: see PretrainTask (optimizer, schedule, clipping, compile, MFU).
    """

    def __init__(self, preset: str = "gpt-small-cpu", config: dict[str, Any] | None = None, lr: float = 6e-4,
                 min_lr_ratio: float = 0.1, warmup_steps: int = 100, weight_decay: float = 0.1,
                 betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8, grad_clip: float = 1.0,
                 activation_checkpointing: bool = False, compile: bool = False, peak_tflops: float | None = None):
        super().__init__(lr=lr, min_lr_ratio=min_lr_ratio, warmup_steps=warmup_steps, weight_decay=weight_decay,
                         betas=betas, eps=eps, grad_clip=grad_clip, activation_checkpointing=activation_checkpointing,
                         compile=compile, peak_tflops=peak_tflops)
        self.save_hyperparameters()
        self.preset, self.overrides = preset, dict(config or {})
        GPTConfig.from_preset(preset, **self.overrides)  # fail on a bad preset or field now, not after data setup
        self.config: GPTConfig | None = None
        self.tokenizer_json: str | None = None

    block_types = (Block,)

    def resolve_config(self) -> GPTConfig:
        """The preset with its overrides, sized to the data: vocabulary from the shards, context checked."""
        overrides = dict(self.overrides)
        dm = self.trainer.datamodule if self._trainer is not None else None
        if dm is not None:
            overrides.setdefault("vocab_size", dm.vocab_size)
        config = GPTConfig.from_preset(self.preset, **overrides)
        if dm is not None:
            dm.check_vocab(config.vocab_size)
            if dm.seq_len > config.seq_len:
                raise UserError(f"data.seq_len={dm.seq_len} is longer than the model's context "
                                f"(seq_len={config.seq_len}); lower data.seq_len or set model.config.seq_len")
        return config

    def build_model(self) -> GPT:
        self.config = self.resolve_config()
        dm = self.trainer.datamodule if self._trainer is not None else None
        if dm is not None and os.path.exists(dm.tokenizer_path):  # checkpoints carry their tokenizer
            with open(dm.tokenizer_path) as f:
                self.tokenizer_json = f.read()
        return GPT(self.config)

    def compute_losses(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        inputs, targets = shift(batch["tokens"])  # (B, T) each
        logits = self(inputs)  # (B, T, V)
        return {"loss": causal_lm_loss(logits, targets), "tokens": torch.tensor(targets.numel(), dtype=torch.float32)}

    @property
    def flops_per_token(self) -> int:
        if self.model is None:
            return 0
        dm = self.trainer.datamodule if self._trainer is not None else None
        return self.model.flops_per_token(dm.seq_len if dm is not None else None)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        assert self.config is not None
        checkpoint["model_config"] = self.config.to_dict()
        if self.tokenizer_json is not None:
            checkpoint["tokenizer_json"] = self.tokenizer_json
