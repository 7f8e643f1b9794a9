"""Causal language modelling (GPT): batch of packed windows -> model -> next-token loss."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from framework.models.gpt import GPT
from framework.models.transformer import Block
from framework.objectives.causal_lm import causal_lm_loss, shift
from framework.objectives.moe import load_imbalance, router_z_loss, switch_aux_loss
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
        measures: Measures = {"loss": (causal_lm_loss(logits[None], targets[None]), targets.numel())}
        if self.model is not None and getattr(self.model.config, "moe", None) is not None:
            measures = self.moe_measures(measures)
        return measures

    # ---------------------------------------------------------------- Mixture-of-Experts balancing
    def moe_measures(self, measures: Measures) -> Measures:
        """Add the routers' balancing losses to "loss" (in training; val/loss stays the language-model loss).

        The balancing group is one micro-batch of the whole data-parallel world: each layer's per-expert counts are
        summed over the ranks (one all-reduce of (layers, E) integers per micro-batch) and each rank's loss uses
        them with its own tokens' probabilities, so the ranks' mean loss and DDP's mean gradient are those of the
        micro-batch of all ranks together, whatever the number of ranks or the expert-parallel size. Under
        accumulation each micro-batch is balanced on its own (a loss over the whole optimizer step would need the
        counts of micro-batches that have not run yet); a single process accumulating the same micro-batches gets
        the same losses and gradients. The terms are averaged over the MoE layers, so their coefficients do not
        scale with depth."""
        cfg = self.model.config.moe
        aux, z, counts, dropped = balance_terms(self.model.moe_layers())
        lm, n = measures["loss"]
        if self.training:
            measures = {"loss": (with_balance(lm, aux, z, cfg), n), "lm_loss": (lm, n)}
            self._moe_step_counts = counts if self._moe_step_counts is None else self._moe_step_counts + counts
            for i, (c, d) in enumerate(zip(counts, dropped) if self._trainer is not None else ()):
                self.log(f"moe/load_max_mean/layer{i}", load_imbalance(c))
                if cfg.capacity_factor is not None:
                    self.log(f"moe/dropped/layer{i}", d.float() / c.sum().clamp(min=1))
        return {**measures, "moe_aux": (aux.detach(), n), "moe_z": (z.detach(), n)}

    _moe_step_counts: torch.Tensor | None = None  # (L, E) the optimizer step's global assignments so far

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        super().on_before_optimizer_step(optimizer)
        counts, self._moe_step_counts = self._moe_step_counts, None
        if counts is not None and self.model.config.moe.balance == "bias":
            for layer, c in zip(self.model.moe_layers(), counts):  # the same global counts on every rank
                layer.update_bias(c)

    def batch_tokens(self, batch: dict[str, Any]) -> int:
        B, W = batch["tokens"].shape
        return B * (W - 1)

    def batch_flops(self, batch: dict[str, Any]) -> int:
        if self.model is None:
            return 0
        B, W = batch["tokens"].shape
        return B * (W - 1) * self.model.flops_per_token(W - 1)


def balance_terms(layers: list[Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Switch aux loss, router z-loss, each averaged over the layers; per-layer global counts (L, E) and dropped
    assignments (L,)) of the MoE layers' last forward, the counts summed over the data-parallel ranks."""
    counts = torch.stack([m.last_stats["counts"] for m in layers])  # (L, E) this rank's assignments
    dropped = torch.stack([m.last_stats["dropped"] for m in layers])  # (L,)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        both = torch.cat([counts, dropped[:, None]], dim=1)  # (L, E+1): one collective for both
        dist.all_reduce(both)
        counts, dropped = both[:, :-1], both[:, -1]
    aux = torch.stack([switch_aux_loss(m.last_stats["prob_sum"], m.last_stats["tokens"], c)
                       for m, c in zip(layers, counts)]).mean()
    z = torch.stack([router_z_loss(m.last_stats["z_sum"], m.last_stats["tokens"]) for m in layers]).mean()
    return aux, z, counts, dropped


def with_balance(lm: torch.Tensor, aux: torch.Tensor, z: torch.Tensor, cfg: Any) -> torch.Tensor:
    """The optimized loss: the LM loss plus the z-loss and, under balance "aux_loss", the Switch loss."""
    loss = lm + cfg.z_loss_coeff * z
    return loss + cfg.aux_loss_coeff * aux if cfg.balance == "aux_loss" else loss
