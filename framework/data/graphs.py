"""Molecule graphs (`pretrain prepare-molecules`, framework.data.molecules) for GNN pre-training and fine-tuning.

- `GraphIndex`: every graph of some local shards, read once into flat arrays (a molecule is a few hundred bytes: a
  million of them take a few hundred MB);
- `GraphStream`: batches of whole graphs collated into one disjoint-union graph, optionally with attribute masking
  (Hu et al. 2020): a share of each molecule's atoms, chosen by a generator seeded by (data seed, epoch, sample id),
  have every feature replaced by that feature's mask index, and so have the bonds that touch them; a resume or
  another world size masks each molecule as an uninterrupted run does. Order, exactly-once delivery, resume and the
  filled validation batches are samples.SampleStream's;
- augmented views for graph contrastive learning (You et al. 2020, GraphCL; Wang et al. 2022, MolCLR): `mask_atoms`,
  `drop_bonds` and `remove_subgraph`, pure functions of one molecule's arrays and a generator; `two_views` draws
  each of a molecule's two views' augmentation and applies it, seeded by (data seed, epoch, sample id, view), so a
  resume or another world size sees the views an uninterrupted run does;
- `GraphDataModule`: the above for Lightning: the vocabularies of the features and the targets come from the
  manifest; the label fraction of the train split; the baselines (the most frequent atom for masking, the train
  mean or prior for properties).

A batch (B graphs, N atoms, E directed edges: each bond in both directions):
  x (N, ATOM_FEATURES) int64, edge_index (2, E) int64 (source, target), edge_attr (E, BOND_FEATURES) int64,
  batch (N,) int64 (the graph of each atom), y (B, T) float32 (NaN: missing or a filler row; T = 0 unlabelled),
  sample_ids (B,) int64 (-1: filler), and with masking atom_index (M,) / atom_targets (M,) (the masked atoms and
  their atom types), bond_index (K, 2) / bond_targets (K,) (the bonds touching them, once each, and their types).
Filler rows (validation) are graphs without atoms. With augmented views (data.augment) a batch of B molecules holds
2B graphs: graph r is view 1 of row r, graph B + r its view 2 (x, edge_index, edge_attr, batch span both); y and
sample_ids keep one row per molecule.
"""

from __future__ import annotations

import os
from collections import deque
from typing import Any, Sequence

import numpy as np
import torch

from framework.data.molecules import ATOM_FEATURES, BOND_FEATURES, EMBEDDED, prepare_molecules
from framework.data.samples import SampleDataModule, SampleStream, ShardFiles, tar_entries
from framework.data.shards import Shard, ShardError
from framework.errors import UserError

MASK_SALT = 0x6A5C  # keeps the masking generator's seeds apart from the other per-sample generators
AUGMENT_SALT = 0x7C3B  # and the augmentations' apart from the masks'
AUGMENTATIONS = ("mask_atoms", "drop_bonds", "remove_subgraph")

# One molecule: atoms (n, ATOM_FEATURES), bonds (m, 2) local atom indices, each undirected bond once (the stream adds
# the reverse direction), bond_features (m, BOND_FEATURES); all int64.
Graph = tuple[np.ndarray, np.ndarray, np.ndarray]


class GraphIndex:
    """Every graph of a list of local shards in flat arrays: atoms (total atoms, ATOM_FEATURES) uint8 with
    atom_ptr (n + 1) the start of each graph's, bonds (total bonds, 2) uint16 and bond_features with bond_ptr,
    y (n, T) float32, smiles (n,) and `label` (n,) int64: the class of a single classification target (-1
    missing), else 0, for the stratified label fraction."""

    def __init__(self, shards: list[Shard], num_targets: int, classification: bool):
        self.shards = shards
        atoms, bonds, bond_features, ys, smiles = [], [], [], [], []
        files = ShardFiles(shards)
        try:
            for s, shard in enumerate(shards):
                members: dict[str, dict[str, bytes]] = {}
                for name, offset, size in tar_entries(shard):
                    key, _, ext = name.partition(".")
                    members.setdefault(key, {})[ext] = files.read(s, size, offset)
                if len(members) != shard.samples:
                    raise ShardError(f"shard '{shard.url}' holds {len(members)} graphs but the manifest says "
                                     f"{shard.samples}; re-run `pretrain prepare-molecules`")
                for key, m in members.items():
                    if not {"atoms", "bonds", "bondf"} <= m.keys() or (num_targets and "y" not in m):
                        raise ShardError(f"graph '{key}' in shard '{shard.url}' lacks a member; re-run "
                                         "`pretrain prepare-molecules`")
                    atoms.append(np.frombuffer(m["atoms"], np.uint8).reshape(-1, ATOM_FEATURES))
                    bonds.append(np.frombuffer(m["bonds"], "<u2").reshape(-1, 2))
                    bond_features.append(np.frombuffer(m["bondf"], np.uint8).reshape(-1, BOND_FEATURES))
                    ys.append(np.frombuffer(m["y"], "<f4") if num_targets else np.zeros(0, np.float32))
                    smiles.append(m.get("smi", b"").decode())
        finally:
            files.close()
        self.atom_ptr = np.concatenate([[0], np.cumsum([len(a) for a in atoms])]).astype(np.int64)
        self.bond_ptr = np.concatenate([[0], np.cumsum([len(b) for b in bonds])]).astype(np.int64)
        self.atoms = np.concatenate(atoms) if atoms else np.zeros((0, ATOM_FEATURES), np.uint8)
        self.bonds = np.concatenate(bonds) if bonds else np.zeros((0, 2), np.uint16)
        self.bond_features = np.concatenate(bond_features) if bond_features else np.zeros((0, BOND_FEATURES), np.uint8)
        self.y = np.stack(ys).reshape(len(ys), num_targets).astype(np.float32) if ys else \
            np.zeros((0, num_targets), np.float32)
        self.smiles = smiles
        if classification and num_targets == 1:
            self.label = np.where(np.isnan(self.y[:, 0]), -1, self.y[:, 0]).astype(np.int64)
        else:
            self.label = np.zeros(len(ys), np.int64)

    def __len__(self) -> int:
        return len(self.y)

    def close(self) -> None:
        pass  # everything is in memory


class GraphStream(SampleStream):
    """Batches of whole graphs as one disjoint-union graph (see the module docstring), masked when mask_rate > 0, as
    two augmented views of each molecule when `augment` names augmentations (AUGMENTATIONS; `augment_ratio` their
    share of atoms or bonds). Validation masks and augments with epoch 0 every time, so its numbers compare across
    evaluations."""

    def __init__(self, index: GraphIndex, units: np.ndarray, *, mask_rate: float = 0.0,
                 atom_mask: list[int] | None = None, bond_mask: list[int] | None = None,
                 augment: Sequence[str] = (), augment_ratio: float = 0.2, **kwargs: Any):
        super().__init__(index, units, **kwargs)
        self.mask_rate, self.augment, self.augment_ratio = mask_rate, tuple(augment), augment_ratio
        self.atom_mask = np.asarray(atom_mask if atom_mask is not None else [0] * ATOM_FEATURES, np.int64)
        self.bond_mask = np.asarray(bond_mask if bond_mask is not None else [0] * BOND_FEATURES, np.int64)

    def _batch(self, samples: np.ndarray, fill: int = 0, epoch: int = 0) -> dict[str, Any]:
        ix = self.index
        ids = np.concatenate([samples, np.full(fill, -1, np.int64)]).astype(np.int64)
        real = samples.astype(np.int64)
        if self.augment:
            return self._views_batch(real, ids, epoch)
        n_atoms = ix.atom_ptr[real + 1] - ix.atom_ptr[real]
        n_bonds = ix.bond_ptr[real + 1] - ix.bond_ptr[real]
        atom_rows = _ranges(ix.atom_ptr[real], n_atoms)
        bond_rows = _ranges(ix.bond_ptr[real], n_bonds)
        x = ix.atoms[atom_rows].astype(np.int64)  # (N, F)
        offsets = np.repeat(np.cumsum(n_atoms) - n_atoms, n_bonds)  # each bond's graph's first atom in the batch
        pairs = ix.bonds[bond_rows].astype(np.int64) + offsets[:, None]  # (Eu, 2): undirected, once each
        bond_attr = ix.bond_features[bond_rows].astype(np.int64)  # (Eu, BF)
        batch: dict[str, Any] = {}
        if self.mask_rate > 0:
            atom_index, bond_index = self._masks(real, n_atoms, pairs, epoch)
            batch["atom_index"] = torch.from_numpy(atom_index)
            batch["atom_targets"] = torch.from_numpy(x[atom_index, 0].copy())
            batch["bond_index"] = torch.from_numpy(pairs[bond_index].reshape(-1, 2))
            batch["bond_targets"] = torch.from_numpy(bond_attr[bond_index, 0].copy())
            x[atom_index] = self.atom_mask
            if self.bond_mask is not None:
                bond_attr[bond_index] = self.bond_mask
        edge_index = np.concatenate([pairs, pairs[:, ::-1]]).T  # (2, E): both directions
        graph_of = np.repeat(np.arange(len(real)), n_atoms)
        y = np.full((len(ids), ix.y.shape[1]), np.nan, np.float32)
        y[:len(real)] = ix.y[real]
        batch.update({"x": torch.from_numpy(x), "edge_index": torch.from_numpy(np.ascontiguousarray(edge_index)),
                      "edge_attr": torch.from_numpy(np.concatenate([bond_attr, bond_attr])),
                      "batch": torch.from_numpy(graph_of), "y": torch.from_numpy(y),
                      "sample_ids": torch.from_numpy(ids)})
        return batch

    def _views_batch(self, real: np.ndarray, ids: np.ndarray, epoch: int) -> dict[str, Any]:
        """The 2B graphs of B rows' two views (filler rows: graphs without atoms in both)."""
        ix = self.index
        empty: Graph = (np.zeros((0, ix.atoms.shape[1]), np.int64), np.zeros((0, 2), np.int64),
                        np.zeros((0, ix.bond_features.shape[1]), np.int64))
        first, second = [], []
        for i in real.tolist():
            a, b = slice(ix.atom_ptr[i], ix.atom_ptr[i + 1]), slice(ix.bond_ptr[i], ix.bond_ptr[i + 1])
            graph = (ix.atoms[a].astype(np.int64), ix.bonds[b].astype(np.int64), ix.bond_features[b].astype(np.int64))
            one, two = two_views(graph, self.augment, self.augment_ratio, self.seed, epoch, i, self.atom_mask)
            first.append(one)
            second.append(two)
        fill = [empty] * (len(ids) - len(real))
        x, pairs, bond_attr, graph_of = _union(first + fill + second + fill)
        edge_index = np.concatenate([pairs, pairs[:, ::-1]]).T  # (2, E): both directions
        y = np.full((len(ids), ix.y.shape[1]), np.nan, np.float32)
        y[:len(real)] = ix.y[real]
        return {"x": torch.from_numpy(x), "edge_index": torch.from_numpy(np.ascontiguousarray(edge_index)),
                "edge_attr": torch.from_numpy(np.concatenate([bond_attr, bond_attr])),
                "batch": torch.from_numpy(graph_of), "y": torch.from_numpy(y), "sample_ids": torch.from_numpy(ids)}

    def _masks(self, samples: np.ndarray, n_atoms: np.ndarray, pairs: np.ndarray,
               epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(masked atoms' rows in the batch, rows of `pairs` touching one): max(1, round(rate * atoms)) atoms of
        each molecule, drawn by a generator seeded by (seed, epoch, sample id)."""
        chosen, start = [], 0
        for i, n in zip(samples.tolist(), n_atoms.tolist()):
            rng = np.random.default_rng([self.seed, epoch, i, MASK_SALT])
            k = min(n, max(1, round(self.mask_rate * n)))
            chosen.append(start + np.sort(rng.choice(n, size=k, replace=False)))
            start += n
        atom_index = np.concatenate(chosen) if chosen else np.zeros(0, np.int64)
        is_masked = np.zeros(start, bool)
        is_masked[atom_index] = True
        bond_index = np.flatnonzero(is_masked[pairs[:, 0]] | is_masked[pairs[:, 1]]) if len(pairs) else \
            np.zeros(0, np.int64)
        return atom_index.astype(np.int64), bond_index.astype(np.int64)


# ---------------------------------------------------------------- augmentations (graph contrastive learning)
def mask_atoms(graph: Graph, ratio: float, rng: np.random.Generator, atom_mask: np.ndarray) -> Graph:
    """max(1, round(ratio * n)) atoms, drawn without replacement, get every feature's mask index (`atom_mask`, the
    index attribute masking uses); bonds unchanged. MolCLR's atom masking."""
    atoms, bonds, bond_features = graph
    n = len(atoms)
    if n == 0:
        return graph
    atoms = atoms.copy()
    atoms[rng.choice(n, size=min(n, max(1, round(ratio * n))), replace=False)] = atom_mask
    return atoms, bonds, bond_features


def drop_bonds(graph: Graph, ratio: float, rng: np.random.Generator) -> Graph:
    """round(ratio * m) of the m bonds deleted, each in both directions (a bond is stored once); atoms unchanged."""
    atoms, bonds, bond_features = graph
    m = len(bonds)
    keep = np.ones(m, bool)
    keep[rng.choice(m, size=min(m, round(ratio * m)), replace=False)] = False
    return atoms, bonds[keep], bond_features[keep]


def remove_subgraph(graph: Graph, ratio: float, rng: np.random.Generator) -> Graph:
    """A connected subgraph of k = min(n - 1, round(ratio * n)) atoms removed with every bond that touches it, the
    other atoms renumbered in their order: breadth-first from a random atom, each atom's neighbours in a random order
    (MolCLR's subgraph removal). When the start atom's fragment (a salt's ion) has k atoms or fewer, that fragment is
    removed. At least one atom always remains."""
    atoms, bonds, bond_features = graph
    n = len(atoms)
    k = min(n - 1, round(ratio * n))
    if k < 1:
        return graph
    neighbours: list[list[int]] = [[] for _ in range(n)]
    for u, v in bonds.tolist():
        neighbours[u].append(v)
        neighbours[v].append(u)
    start = int(rng.integers(n))
    removed, queue = {start}, deque([start])
    while queue and len(removed) < k:
        for v in rng.permutation(neighbours[queue.popleft()]).tolist():
            if v not in removed:
                removed.add(v)
                queue.append(v)
                if len(removed) == k:
                    break
    keep = np.ones(n, bool)
    keep[list(removed)] = False
    renumber = np.cumsum(keep) - 1  # (n,): an atom's index among those kept
    kept = keep[bonds[:, 0]] & keep[bonds[:, 1]] if len(bonds) else np.zeros(0, bool)
    return atoms[keep], renumber[bonds[kept]].reshape(-1, 2), bond_features[kept]


def two_views(graph: Graph, augment: Sequence[str], ratio: float, seed: int, epoch: int, sample: int,
              atom_mask: np.ndarray) -> tuple[Graph, Graph]:
    """The molecule's two views: view v (0, 1) applies one of `augment`'s augmentations, drawn uniformly, with a
    generator seeded by (seed, epoch, sample, v): a pure function of those, not of the batch the molecule is in."""
    views = []
    for view in (0, 1):
        rng = np.random.default_rng([seed, epoch, sample, view, AUGMENT_SALT])
        name = augment[int(rng.integers(len(augment)))]
        if name == "mask_atoms":
            views.append(mask_atoms(graph, ratio, rng, atom_mask))
        elif name == "drop_bonds":
            views.append(drop_bonds(graph, ratio, rng))
        elif name == "remove_subgraph":
            views.append(remove_subgraph(graph, ratio, rng))
        else:
            raise ValueError(f"unknown augmentation {name!r}; one of {', '.join(AUGMENTATIONS)}")
    return views[0], views[1]


def _union(graphs: list[Graph]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Graphs -> their disjoint union: x (N, F), bond pairs (Eu, 2) renumbered into it, bond features (Eu, BF),
    the graph of each atom (N,)."""
    sizes = np.array([len(g[0]) for g in graphs], np.int64)
    starts = np.cumsum(sizes) - sizes
    x = np.concatenate([g[0] for g in graphs])
    pairs = np.concatenate([g[1] + s for g, s in zip(graphs, starts.tolist())])
    attr = np.concatenate([g[2] for g in graphs])
    return x, pairs, attr, np.repeat(np.arange(len(graphs)), sizes)


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenated arange(start, start + length) for each pair, without a Python loop."""
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, np.int64)
    offsets = np.repeat(starts - (np.cumsum(lengths) - lengths), lengths)
    return offsets + np.arange(total)


class GraphDataModule(SampleDataModule):
    """Molecule graph shards (`pretrain prepare-molecules`) for GNN tasks. Args, beyond StreamDataModule's
    (path, batch_size: graphs per batch, seed, ...) and label_fraction (the seeded share of the train split's
    molecules trained on, stratified for one classification target; the same subsets for pre-trained and scratch):

        mask_rate: attribute masking: share of each molecule's atoms masked (Hu et al.: 0.15; 0 for fine-tuning);
            validation masks the same atoms every time.
        augment: graph contrastive learning: each molecule comes as two views, each made by one of these
            augmentations drawn at random (mask_atoms, drop_bonds, remove_subgraph; [] or null: none).
        augment_ratio: the share of atoms masked, of bonds deleted or of atoms removed by an augmentation (GraphCL:
            0.2, MolCLR: 0.25).
        embedded: the set `prepare_if_missing` writes at data.path when it has no manifest: nci (unlabelled,
            random split) or nci-tpsa (TPSA regression, scaffold split).
    """

    modality = "graphs"
    prepare_hint = "`pretrain prepare-molecules --input FILE.csv --label-column NAME`"

    def __init__(self, mask_rate: float = 0.0, augment: list[str] | None = None, augment_ratio: float = 0.2,
                 embedded: str = "nci", **kwargs: Any):
        super().__init__(**kwargs)
        if not 0 <= mask_rate < 1:
            raise UserError(f"data.mask_rate must be in [0, 1), got {mask_rate}; Hu et al. masked 0.15")
        augment = list(augment or [])
        unknown = [a for a in augment if a not in AUGMENTATIONS]
        if unknown:
            raise UserError(f"data.augment names {unknown[0]!r}; the augmentations are {', '.join(AUGMENTATIONS)}")
        if not 0 < augment_ratio < 1:
            raise UserError(f"data.augment_ratio must be in (0, 1), got {augment_ratio}; GraphCL used 0.2")
        if augment and mask_rate > 0:
            raise UserError("data.mask_rate (attribute masking) and data.augment (contrastive views) feed different "
                            "tasks; set one of them (use the mask_atoms augmentation to mask atoms in views)")
        self.augment, self.augment_ratio = augment, augment_ratio
        if embedded not in EMBEDDED:
            raise UserError(f"data.embedded must be one of {', '.join(EMBEDDED)}, got {embedded!r}")
        self.mask_rate, self.embedded = mask_rate, embedded

    def _prepare_embedded(self) -> None:
        prepare_molecules(None, self.path, embedded=self.embedded, overwrite=os.path.isdir(self.path),
                          split="scaffold" if self.embedded == "nci-tpsa" else "random", progress=False)

    # ---------------------------------------------------------------- what the data fixes
    @property
    def features(self) -> dict[str, Any]:
        return self.manifest["features"]

    @property
    def targets(self) -> dict[str, Any] | None:
        return self.manifest.get("targets")

    def require_targets(self) -> dict[str, Any]:
        if not self.targets:
            raise UserError(f"the graph shards at '{self.train_spec or self.path}' have no labels; prepare them with "
                            f"{self.prepare_hint}")
        return self.targets  # type: ignore[return-value]

    @property
    def labels(self) -> dict:
        return self.require_targets()

    def model_fields(self) -> dict[str, Any]:
        f = self.features
        return {"atom_vocab": [a["vocab"] for a in f["atoms"]], "bond_vocab": [b["vocab"] for b in f["bonds"]],
                "self_loop_bond_type": f["self_loop_bond_type"]}

    def setup(self, stage: str | None = None) -> None:
        if self._indexes:
            return
        targets = self.targets or {}
        self._train = self._shards("train", self.train_spec)
        self._val = self._shards("val", self.val_spec)
        for split, shards in (("train", self._train), ("val", self._val)):
            self._indexes[split] = GraphIndex(shards, len(targets.get("names", [])),
                                              targets.get("task") == "classification")
        self._choose_units(stage, "molecules")

    def position_settings(self) -> dict[str, Any]:
        return {**super().position_settings(), "mask_rate": self.mask_rate, "augment": self.augment,
                "augment_ratio": self.augment_ratio}

    def _stream(self, shards: list[Shard], batch_size: int, shuffle: bool, train: bool) -> GraphStream:
        rank, world = self._world()
        split = "train" if train else "val"
        mask = [v - 1 for v in self.model_fields()["atom_vocab"]], [v - 1 for v in self.model_fields()["bond_vocab"]]
        return GraphStream(self._indexes[split], self._units[split], mask_rate=self.mask_rate, atom_mask=mask[0],
                           bond_mask=mask[1], augment=self.augment, augment_ratio=self.augment_ratio,
                           batch_size=batch_size, seed=self.seed, shuffle=shuffle, rank=rank,
                           world=world, workers=max(1, self.num_workers), fill=not train)

    # ---------------------------------------------------------------- baselines
    def train_y(self) -> np.ndarray:
        """(n, T) targets of the train molecules trained on (the label-fraction subset)."""
        return self._indexes["train"].y[self._units["train"]]

    def _baseline(self) -> dict[str, Any] | None:
        if self.mask_rate > 0:
            return self._atom_baseline()
        if self.augment:  # embeddings that ignore the molecule: every candidate alike
            _, world = self._world()
            n = world * self.val_batch_size
            return {"name": "chance", "loss": float(np.log(2 * n - 1)), "accuracy": 1 / n}
        targets = self.targets
        if not targets:
            return None
        train = self.train_y().astype(np.float64)
        val = self._indexes["val"].y[self._units["val"]].astype(np.float64)
        if targets["task"] == "regression":
            mean, std = np.nanmean(train, 0), np.where(np.nanstd(train, 0) > 0, np.nanstd(train, 0), 1.0)
            err = (val - mean) / std  # the task's loss is the MSE of standardized targets
            rmse = np.sqrt(np.nanmean(((val - mean) ** 2), 0))
            return {"name": "train mean", "loss": float(np.nanmean(err ** 2)), "rmse": float(rmse.mean())}
        p = np.clip(np.nanmean(train, 0), 1e-6, 1 - 1e-6)
        bce = -(val * np.log(p) + (1 - val) * np.log(1 - p))
        return {"name": "train prior", "loss": float(np.nanmean(bce))}

    def _atom_baseline(self) -> dict[str, Any]:
        """Guessing masked atoms' and bonds' types from the train split's type frequencies, scored on the val split:
        the cross-entropy of the atom-type prior plus that of the bond-type prior (the masking loss with
        bond_weight 1; bonds of masked atoms are taken to be typed as bonds at large), and the accuracy of always
        guessing the most frequent atom type (carbon)."""
        fields = self.model_fields()
        train, val = self._indexes["train"], self._indexes["val"]
        atoms = _prior(train.atoms[:, 0], val.atoms[:, 0], fields["atom_vocab"][0])
        bonds = _prior(train.bond_features[:, 0], val.bond_features[:, 0], fields["bond_vocab"][0])
        return {"name": "type priors", "loss": atoms[0] + bonds[0], "accuracy": atoms[1]}


def _prior(train: np.ndarray, val: np.ndarray, vocab: int) -> tuple[float, float]:
    """(cross-entropy on `val` of the add-one prior of `train`'s categories, accuracy of its most frequent one)."""
    t = np.bincount(train, minlength=vocab).astype(np.float64)
    v = np.bincount(val, minlength=vocab).astype(np.float64)
    p = (t + 1) / (t.sum() + vocab)
    return float(-(v * np.log(p)).sum() / max(1.0, v.sum())), float(v[int(t.argmax())] / max(1.0, v.sum()))


__all__ = ["AUGMENTATIONS", "GraphDataModule", "GraphIndex", "GraphStream", "drop_bonds", "mask_atoms",
           "remove_subgraph", "two_views"]
