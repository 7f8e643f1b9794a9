"""Molecule-graph tasks on a GIN (framework.models.gin) over GraphDataModule batches (framework.data.graphs).

- `AttributeMaskingTask`: self-supervised pre-training (Hu et al. 2020): predict the types of masked atoms and of the
  bonds that touch them (the data masks them: data.mask_rate);
- `ContrastiveTask`: self-supervised pre-training by graph contrastive learning (You et al. 2020, GraphCL; Wang et
  al. 2022, MolCLR): two augmented views of each molecule (the data makes them: data.augment) through the GIN and a
  projection head, NT-Xent over the global batch (negatives from every rank, gathered with their gradients as CLIP's);
- `PropertyTask`: fine-tuning, or training from scratch, on the shards' targets: multi-task classification with
  missing labels (masked BCE; val ROC-AUC) or regression (MSE of standardized targets; val RMSE and MAE in the data's
  units; the train split's mean and std go into the model config, so every checkpoint and export carries them).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from framework.errors import UserError
from framework.models.gin import GIN, GINLayer
from framework.objectives.contrastive import infonce, nt_xent_logits
from framework.objectives.graph import attribute_masking_loss, masked_bce, masked_mae, masked_mse, mean_roc_auc
from framework.tasks.base import Measures, PretrainTask


def _graph_data(datamodule: Any, task: str) -> Any:
    from framework.data.graphs import GraphDataModule

    if not isinstance(datamodule, GraphDataModule):
        raise UserError(f"{task} needs molecule graphs: set data.class_path to framework.data.graphs.GraphDataModule "
                        "(see configs/graph/smoke.yaml)")
    return datamodule


class GraphTask(PretrainTask):
    """What the graph tasks share: the GIN, its forward over a batch, and the throughput counts (molecules)."""

    model_class = GIN
    block_types = (GINLayer,)
    unit = "molecules"

    def run(self, batch: dict[str, Any], **kwargs: Any) -> dict[str, torch.Tensor]:
        return self(batch["x"], batch["edge_index"], batch["edge_attr"], batch["batch"], int(batch["y"].shape[0]),
                    **kwargs)

    def batch_tokens(self, batch: dict[str, Any]) -> int:
        return int((batch["sample_ids"] >= 0).sum())

    def batch_flops(self, batch: dict[str, Any]) -> int:
        if self.model is None:
            return 0
        return self.model.flops(int(batch["x"].shape[0]), int(batch["edge_index"].shape[1]))


class AttributeMaskingTask(GraphTask):
    """Pre-trains a GIN by attribute masking. Logs train/val `loss` (atom-type CE + bond_weight x bond-type CE),
    `accuracy` (of the masked atoms' types), `bond_accuracy`, `atom_loss`, `bond_loss`; the run summary compares val
    with the type priors (the train split's atom- and bond-type frequencies; the accuracy of always guessing the most
    frequent atom, carbon).

    Args:
        preset: a GIN size (gin-test, gin-cpu, gin-hu: Hu et al.'s 5 x 300).
        config: fields of GINConfig that replace the preset's (e.g. `{pooling: sum, dropout: 0.1}`).
        bond_weight: the weight of the bond-type loss (0: atoms only).
        **kwargs: the optimizer, schedule, clipping, compile and init_from options of PretrainTask.
    """

    loss_per = "masked atom"

    def __init__(self, preset: str = "gin-cpu", config: dict[str, Any] | None = None, bond_weight: float = 1.0,
                 **kwargs: Any):
        super().__init__(**kwargs)
        self.save_hyperparameters()
        if bond_weight < 0:
            raise UserError(f"model.bond_weight must be >= 0, got {bond_weight}")
        self.bond_weight = bond_weight
        self.set_model_config(preset, {**(config or {}), "masking_head": True, "num_tasks": 0, "projection_dim": 0})

    def check_data(self, datamodule: Any) -> None:
        dm = _graph_data(datamodule, "AttributeMaskingTask")
        if dm.mask_rate <= 0:
            raise UserError("AttributeMaskingTask predicts masked atoms: set data.mask_rate (Hu et al.: 0.15)")

    def compute_losses(self, batch: dict[str, Any]) -> Measures:
        out = self.run(batch, atom_index=batch["atom_index"], bond_index=batch["bond_index"])
        m = attribute_masking_loss(out["atom_logits"], batch["atom_targets"], out["bond_logits"],
                                   batch["bond_targets"], self.bond_weight)
        atoms, bonds = batch["atom_targets"].numel(), batch["bond_targets"].numel()
        return {"loss": (m["loss"], atoms), "atom_loss": (m["atom_loss"].detach(), atoms),
                "accuracy": (m["atom_accuracy"], atoms), "bond_loss": (m["bond_loss"].detach(), bonds),
                "bond_accuracy": (m["bond_accuracy"], bonds)}


class ContrastiveTask(GraphTask):
    """Pre-trains a GIN by graph contrastive learning: each molecule's two augmented views (data.augment, e.g.
    [mask_atoms, drop_bonds, remove_subgraph]) are pooled, projected by a 2-layer MLP and pulled together against
    the other molecules' views of the global batch by NT-Xent (SimCLR's loss, as GraphCL and MolCLR). Logs train/val
    `loss` and `accuracy` (the share of this rank's molecules whose view 1 is closest to their own view 2 among
    every view 2 of the global batch); the run summary compares val with chance (loss log(2N - 1), accuracy 1/N).
    The projection head is left behind by a fine-tune (`PropertyTask` with init_from reports it dropped).

    Args:
        preset: a GIN size (gin-test, gin-cpu, gin-hu).
        config: fields of GINConfig that replace the preset's.
        temperature: NT-Xent's temperature (0.1, MolCLR's; GraphCL used 0.2).
        projection_dim: the projection head's output size (default: the GIN's hidden size, as GraphCL).
        **kwargs: the optimizer, schedule, clipping, compile and init_from options of PretrainTask.
    """

    loss_per = "view"

    def __init__(self, preset: str = "gin-cpu", config: dict[str, Any] | None = None, temperature: float = 0.1,
                 projection_dim: int | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.save_hyperparameters()
        if temperature <= 0:
            raise UserError(f"model.temperature must be > 0, got {temperature} (MolCLR: 0.1)")
        if projection_dim is not None and projection_dim < 1:
            raise UserError(f"model.projection_dim must be >= 1, got {projection_dim}")
        self.temperature = temperature
        fields = {**(config or {}), "masking_head": False, "num_tasks": 0}
        self.set_model_config(preset, fields)  # a bad preset or field fails here
        self.overrides["projection_dim"] = projection_dim or GIN.config_class.from_preset(preset, **fields).hidden

    def check_data(self, datamodule: Any) -> None:
        dm = _graph_data(datamodule, "ContrastiveTask")
        if not dm.augment:
            raise UserError("ContrastiveTask contrasts two augmented views of each molecule: set data.augment (e.g. "
                            "[mask_atoms, drop_bonds, remove_subgraph])")

    def compute_losses(self, batch: dict[str, Any]) -> Measures:
        B = int(batch["sample_ids"].shape[0])
        # one pass over the union of both views: graph r is view 1 of row r, graph B + r its view 2
        z = self(batch["x"], batch["edge_index"], batch["edge_attr"], batch["batch"], 2 * B)["projection"]
        valid = batch["sample_ids"] >= 0  # (B,): False for validation's filler rows
        logits_1, logits_2, own, count = nt_xent_logits(z[:B].float(), z[B:].float(), self.temperature, valid)
        loss = infonce(logits_1, logits_2, own, count)
        n = logits_1.size(1) // 2  # the global batch: view 1 against every view 2 comes first
        correct = (logits_1.detach()[:, :n].argmax(-1) == own).sum()
        return {"loss": (loss, count), "accuracy": (correct / count.clamp(min=1), count)}


class PropertyTask(GraphTask):
    """Predicts the shards' targets from the pooled graph: classification (every target 0/1 with missing labels:
    masked BCE; val `roc_auc`, the mean over tasks) or regression (`loss` is the MSE of standardized targets; `mse`,
    `mae` and val `rmse` are in the data's units). The task kind and the targets come from the manifest.

    Args:
        preset: a GIN size, for a model trained from scratch; ignored with init_from (the pre-trained model's).
        config: fields of GINConfig that replace the preset's or the pre-trained model's (e.g. `{dropout: 0.5}`).
        head_lr: the head's own peak LR (default: lr).
        random_init: with init_from, keep the same architecture but its random init (the "scratch" arm of
            `pretrain transfer-report`).
        **kwargs: the optimizer, schedule, clipping, compile and init_from options of PretrainTask. With
            init_from, the head is new and the pre-training heads are dropped.
    """

    loss_per = "label"

    def __init__(self, preset: str = "gin-cpu", config: dict[str, Any] | None = None, head_lr: float | None = None,
                 random_init: bool = False, **kwargs: Any):
        super().__init__(**kwargs)
        self.save_hyperparameters()
        if head_lr is not None and head_lr <= 0:
            raise UserError("model.head_lr must be > 0")
        self.head_lr, self.random_init = head_lr, random_init
        if self.init_from is None:
            self.set_model_config(preset, config)
        else:
            self.overrides = dict(config or {})
        self.kind = ""  # "regression" or "classification", from the data
        self._val_outputs: list[tuple[torch.Tensor, torch.Tensor]] = []

    def check_data(self, datamodule: Any) -> None:
        _graph_data(datamodule, "PropertyTask").require_targets()

    def resolve_config(self) -> Any:
        from framework.models.gin import GINConfig

        dm = self.datamodule()
        if dm is None:
            raise UserError("PropertyTask takes its targets from the data: run it with a datamodule")
        self.check_data(dm)
        targets = dm.require_targets()
        self.kind = targets["task"]
        fields: dict[str, Any] = {**dm.model_fields(), "num_tasks": len(targets["names"]), "masking_head": False,
                                  "projection_dim": 0}
        if self.kind == "regression":  # standardize on the train molecules trained on (the label-fraction subset)
            y = dm.train_y().astype(np.float64)
            std = np.nanstd(y, 0)
            fields["target_mean"] = np.nan_to_num(np.nanmean(y, 0)).tolist()
            fields["target_std"] = np.where(std > 0, std, 1.0).tolist()
        else:
            fields["target_mean"], fields["target_std"] = [], []
        if self.init_from is None:
            return GINConfig.from_preset(self.preset, **{**fields, **self.overrides})
        from framework.checkpoint.init_from import source_config

        values = source_config(self.init_from)
        if values.get("model_type") != "gin":
            raise UserError(f"model.init_from '{self.init_from}' holds a {values.get('model_type')!r} model; "
                            "fine-tune a gin checkpoint (e.g. of configs/graph/smoke.yaml or contrastive.yaml)")
        if values.get("atom_vocab") != fields["atom_vocab"] or values.get("bond_vocab") != fields["bond_vocab"]:
            raise UserError(f"model.init_from '{self.init_from}' was trained on other atom/bond features than these "
                            "shards'; prepare both with the same framework version")
        return GINConfig.from_dict({**values, **fields, **self.overrides})

    def _load_init_weights(self) -> None:
        from framework.checkpoint.init_from import load_weights

        assert self.model is not None and self.init_from is not None
        if self.random_init:
            return
        report = load_weights(self.model, self.init_from, self.trainer.strategy, (), skip=("head.",))
        if self.trainer.is_global_zero and self.print_init_report:
            print("\n".join(report.lines(self.init_from)), flush=True)

    def lr_scale(self, name: str) -> float:
        if self.head_lr is not None and name.removeprefix("model.").startswith("head."):
            return self.head_lr / self.lr
        return 1.0

    def predict(self, batch: dict[str, Any]) -> torch.Tensor:
        """(B, T) predictions in the data's units (regression) or probabilities (classification)."""
        out = self.run(batch)["logits"].float()
        if self.kind == "classification":
            return torch.sigmoid(out)
        mean, std = self._scaler(out)
        return out * std + mean

    def _scaler(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.config is not None
        return (torch.tensor(self.config.target_mean, device=like.device, dtype=like.dtype),
                torch.tensor(self.config.target_std, device=like.device, dtype=like.dtype))

    def compute_losses(self, batch: dict[str, Any]) -> Measures:
        logits = self.run(batch)["logits"].float()  # (B, T)
        y = batch["y"]  # (B, T), NaN: missing or filler
        if self.kind == "classification":
            loss, count = masked_bce(logits, y)
            if not self.training:
                self._val_outputs.append((logits.detach(), y))
            return {"loss": (loss, count)}
        mean, std = self._scaler(logits)
        loss, count = masked_mse(logits, (y - mean) / std)
        with torch.no_grad():
            pred = logits * std + mean
            mse, _ = masked_mse(pred, y)
            mae, _ = masked_mae(pred, y)
        return {"loss": (loss, count), "mse": (mse, count), "mae": (mae, count)}

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        if self.kind == "regression":
            mse = self.trainer.callback_metrics.get("val/mse")
            if mse is not None:
                self.log("val/rmse", torch.sqrt(mse), rank_zero_only=True)
        elif self._val_outputs:
            logits = torch.cat([o[0] for o in self._val_outputs])  # every rank ran the same number of batches
            y = torch.cat([o[1] for o in self._val_outputs])
            self._val_outputs = []
            if self.trainer.world_size > 1:
                logits, y = self.all_gather(logits).flatten(0, 1), self.all_gather(y).flatten(0, 1)
            auc = mean_roc_auc(logits.cpu().numpy(), y.cpu().numpy())
            if not math.isnan(auc):
                self.log("val/roc_auc", auc, rank_zero_only=True)

    def summary_lines(self) -> list[str]:
        metrics = self.trainer.callback_metrics if self._trainer is not None else {}
        if self.kind == "regression" and "val/rmse" in metrics:
            return [f"val RMSE {float(metrics['val/rmse']):.4g}, MAE {float(metrics['val/mae']):.4g} (data units)"]
        if "val/roc_auc" in metrics:
            return [f"val ROC-AUC {float(metrics['val/roc_auc']):.4f} (mean over tasks)"]
        return []
