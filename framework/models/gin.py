"""Graph Isomorphism Network with edge features (Xu et al. 2019, "How Powerful are Graph Neural Networks?"; the
edge-feature variant of Hu et al. 2020, "Strategies for Pre-training Graph Neural Networks": 5 layers x 300, the
standard backbone of molecule pre-training).

Each layer: h_v <- MLP( sum over u in N(v) + {v} of (h_u + e_uv) ), then BatchNorm, ReLU (not after the last
layer) and dropout; e_uv is the sum of the layer's own embeddings of the bond's features, and every atom has a
self-loop with its own bond type (Hu et al.). Atoms enter as the sum of one embedding per atom feature. The graph's
representation is the mean (Hu et al.) or sum of its atoms' last-layer representations (the "last" jumping
knowledge).

Message passing is written here with `index_add_` (a scatter-sum over the edge list) rather than taken from PyTorch
Geometric: the GIN layer needs one gather and one scatter, which is four lines of torch; PyG would add a dependency
(and its optional compiled extensions) for them, and our batches (framework.data.graphs) are already the
disjoint-union graphs PyG's `Batch` would build. The layout is the one PyG and OGB use (edge_index (2, E) of
source, target; a batch vector), so PyG models can read the same batches.

Heads: `num_tasks` > 0 adds `head`, a linear map of the pooled graph to T property logits or values (fine-tuning);
`masking_head` adds `atom_head` and `bond_head`, which predict a masked atom's type from its representation and a
masked bond's type from the sum of its two atoms' (Hu et al.'s attribute masking); `projection_dim` > 0 adds
`projection`, the 2-layer MLP (H -> H -> P) that maps the pooled graph to the space of the contrastive loss (You et
al. 2020, GraphCL; Wang et al. 2022, MolCLR). A fine-tune from a pre-trained checkpoint keeps its layers, gets a new
`head` and drops the pre-training heads.

Shapes in comments: N atoms, E directed edges, B graphs, H hidden, F / BF atom / bond features, T tasks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from framework.models.transformer import (ConfigError, PresetConfig, Pretrained, check_bool, check_choice,
                                          check_positive_ints, num_params)

POOLINGS = ("mean", "sum")
# The vocabularies of framework.data.molecules' features (each with its mask index); the data sets them at run time
# (GraphDataModule.model_fields), these defaults only let a model be built without data.
ATOM_VOCAB = [120, 5, 12, 12, 10, 8, 3]
BOND_VOCAB = [7, 7, 3]
SELF_LOOP_BOND_TYPE = 5

PRESETS: dict[str, dict[str, Any]] = {
    "gin-test": dict(num_layers=2, hidden=16),  # CPU unit tests: a step in milliseconds
    # the CPU smoke run: Hu et al.'s depth at a third of the width (~0.2M parameters)
    "gin-cpu": dict(num_layers=5, hidden=96),
    "gin-hu": dict(num_layers=5, hidden=300),  # Hu et al. 2020 (~1.9M parameters)
}


@dataclass
class GINConfig(PresetConfig):
    model_type: ClassVar[str] = "gin"
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = PRESETS

    num_layers: int = 5
    hidden: int = 300
    dropout: float = 0.0  # after every layer (Hu et al.: 0 for pre-training, 0.5 for fine-tuning)
    pooling: str = "mean"  # "mean" or "sum" of a graph's atoms
    num_tasks: int = 0  # outputs of the graph-level head (0: no head)
    masking_head: bool = False  # the attribute-masking heads (atom type, bond type)
    projection_dim: int = 0  # output of the contrastive projection head (0: no head)
    atom_vocab: list[int] = field(default_factory=lambda: list(ATOM_VOCAB))  # per atom feature, mask index included
    bond_vocab: list[int] = field(default_factory=lambda: list(BOND_VOCAB))  # per bond feature, mask index included
    self_loop_bond_type: int = SELF_LOOP_BOND_TYPE  # the bond-type index of the self-loops
    # regression targets are learnt standardized: the head predicts (y - mean) / std of the train split; kept here so
    # every checkpoint and export can turn predictions back into the data's units (empty: no scaling)
    target_mean: list[float] = field(default_factory=list)
    target_std: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        check_positive_ints(self, "num_layers", "hidden")
        check_choice(self, "pooling", POOLINGS)
        check_bool(self, "masking_head")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ConfigError(f"GINConfig.dropout={self.dropout!r} must be a number in [0, 1)")
        for name in ("num_tasks", "projection_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"GINConfig.{name}={value!r} must be an integer >= 0 (0: no head)")
        for name in ("atom_vocab", "bond_vocab"):
            value = getattr(self, name)
            if not isinstance(value, (list, tuple)) or not value or any(
                    isinstance(v, bool) or not isinstance(v, int) or v < 2 for v in value):
                raise ConfigError(f"GINConfig.{name}={value!r} must be a list of vocabulary sizes >= 2")
            setattr(self, name, list(value))
        self.target_mean, self.target_std = [float(v) for v in self.target_mean], [float(v) for v in self.target_std]
        if len(self.target_mean) != len(self.target_std) or any(v <= 0 for v in self.target_std):
            raise ConfigError("GINConfig.target_mean and target_std must have one value per task, std > 0")
        if not 0 <= self.self_loop_bond_type < self.bond_vocab[0]:
            raise ConfigError(f"GINConfig.self_loop_bond_type={self.self_loop_bond_type} must index bond_vocab[0]="
                              f"{self.bond_vocab[0]}")


class FeatureEmbedding(nn.Module):
    """Integer features (.., F) -> the sum of one embedding per feature (.., H)."""

    def __init__(self, vocab: list[int], hidden: int):
        super().__init__()
        self.tables = nn.ModuleList(nn.Embedding(v, hidden) for v in vocab)
        for t in self.tables:
            nn.init.xavier_uniform_(t.weight)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        out = self.tables[0](features[..., 0])
        for i in range(1, len(self.tables)):
            out = out + self.tables[i](features[..., i])
        return out


class GINLayer(nn.Module):
    """One GIN layer with edge features, BatchNorm, activation and dropout: the unit of FSDP sharding and
    activation checkpointing."""

    def __init__(self, config: GINConfig, last: bool):
        super().__init__()
        H = config.hidden
        self.edges = FeatureEmbedding(config.bond_vocab, H)
        self.mlp = nn.Sequential(nn.Linear(H, 2 * H), nn.ReLU(), nn.Linear(2 * H, H))
        self.norm = nn.BatchNorm1d(H)
        self.last, self.dropout = last, config.dropout
        self.self_loop_bond_type = config.self_loop_bond_type

    def forward(self, h: torch.Tensor, edge_index: torch.Tensor, edge_attr: torch.Tensor) -> torch.Tensor:
        src, dst = edge_index  # (E,), (E,)
        messages = h[src] + self.edges(edge_attr)  # (E, H)
        # the self-loop of every atom: its own representation plus the embedding of a bond of type "self" (other
        # bond features 0), read from the tables directly (a constant index tensor would be a buffer to checkpoint)
        tables = self.edges.tables
        loop = tables[0].weight[self.self_loop_bond_type]
        for table in tables[1:]:
            loop = loop + table.weight[0]
        aggregated = (h + loop).index_add(0, dst, messages)  # (N, H): sum over in-edges
        out = self.norm(self.mlp(aggregated))
        if not self.last:
            out = F.relu(out)
        return F.dropout(out, self.dropout, self.training)


class GIN(Pretrained):
    config_class = GINConfig

    def __init__(self, config: GINConfig) -> None:
        super().__init__()
        self.config = config
        H = config.hidden
        self.atoms = FeatureEmbedding(config.atom_vocab, H)
        self.layers = nn.ModuleList(GINLayer(config, last=i == config.num_layers - 1)
                                    for i in range(config.num_layers))
        if config.num_tasks:
            self.head = nn.Linear(H, config.num_tasks)
        if config.masking_head:
            self.atom_head = nn.Linear(H, config.atom_vocab[0] - 1)  # every atom type but the mask
            self.bond_head = nn.Linear(H, config.bond_vocab[0] - 1)
        if config.projection_dim:
            self.projection = nn.Sequential(nn.Linear(H, H), nn.ReLU(), nn.Linear(H, config.projection_dim))

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor, edge_attr: torch.Tensor, batch: torch.Tensor,
                num_graphs: int, atom_index: torch.Tensor | None = None,
                bond_index: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """x (N, F), edge_index (2, E), edge_attr (E, BF), batch (N,) -> {"nodes" (N, H), "graphs" (B, H), and
        "logits" (B, T) with a head; "projection" (B, P) with the projection head; with the masking heads,
        "atom_logits" (M, atom types) of the atoms at atom_index (M,) and "bond_logits" (K, bond types) of the bonds
        bond_index (K, 2)}."""
        h = self.atoms(x)  # (N, H)
        for layer in self.layers:
            h = layer(h, edge_index, edge_attr)
        graphs = self.pool(h, batch, num_graphs)
        out = {"nodes": h, "graphs": graphs}
        if self.config.num_tasks:
            out["logits"] = self.head(graphs)  # (B, T)
        if self.config.projection_dim:
            out["projection"] = self.projection(graphs)  # (B, P)
        if self.config.masking_head and atom_index is not None:
            out["atom_logits"] = self.atom_head(h[atom_index])  # (M, atom types)
        if self.config.masking_head and bond_index is not None:
            out["bond_logits"] = self.bond_head(h[bond_index[:, 0]] + h[bond_index[:, 1]])  # (K, bond types)
        return out

    def pool(self, h: torch.Tensor, batch: torch.Tensor, num_graphs: int) -> torch.Tensor:
        """(N, H) atoms -> (B, H) graphs: the sum or mean of each graph's atoms (zeros for a graph without atoms)."""
        total = h.new_zeros(num_graphs, h.size(1)).index_add(0, batch, h)
        if self.config.pooling == "sum":
            return total
        counts = torch.bincount(batch, minlength=num_graphs).clamp(min=1).to(h.dtype)  # (B,)
        return total / counts[:, None]

    def num_params(self) -> int:
        return num_params(self)

    def flops(self, atoms: int, edges: int) -> int:
        """Training FLOPs (3x forward, 2 per multiply-add) of a batch: each layer's MLP (H -> 2H -> H) on every
        atom dominates; the gathers and scatter-adds add ~2 (E + N) H."""
        H = self.config.hidden
        per_layer = 2 * atoms * 4 * H * H + 2 * (edges + atoms) * H
        return 3 * self.config.num_layers * per_layer
