"""`pretrain prepare-molecules`: SMILES (.smi/.txt, .csv, .sdf, each optionally .gz) or an embedded set -> graph
shards, one molecule per sample, with a manifest of modality "graphs".

    pretrain prepare-molecules --input zinc.smi --output data/zinc
    pretrain prepare-molecules --input esol.csv --smiles-column smiles --label-column logS --split scaffold --output data/esol
    pretrain prepare-molecules --embedded nci --output data/nci            # 4,999 NCI molecules shipped in RDKit
    pretrain prepare-molecules --embedded nci-tpsa --split scaffold --output data/tpsa   # the same, with their TPSA

Featurization (Hu et al. 2020, "Strategies for Pre-training Graph Neural Networks", with the atom and bond features
the Open Graph Benchmark's `smiles2graph` added to their two): every atom is ATOM_FEATURES small integers, every bond
BOND_FEATURES. Atom type and chirality are Hu et al.'s inputs; degree, formal charge, attached hydrogens,
hybridization and aromaticity let a model tell a carbonyl carbon from a methyl without learning it from the bonds
alone (OGB's choice), and they are cheap: one byte each. Bond type and stereo are Hu et al.'s (bond direction is only
meaningful for drawn wedges, so stereo replaces it); conjugation is OGB's. Values beyond a feature's list fall into its
last ("other") slot. Each feature's vocabulary has one more index, its mask index, used by attribute masking.

Output (framework.data.graphs reads it):
  train-000000.tar ..., val-000000.tar ...  per molecule `{key}.atoms` (uint8, atoms x ATOM_FEATURES),
                                            `{key}.bonds` (uint16, bonds x 2: the atom pair, each bond once),
                                            `{key}.bondf` (uint8, bonds x BOND_FEATURES), `{key}.smi` (canonical
                                            SMILES) and, when labelled, `{key}.y` (float32 per target, NaN = missing)
  manifest.json  modality "graphs"; "features" (each feature's name and vocabulary size), "targets" (names, task
                 "regression" or "classification", per-split label counts and, for regression, the train split's mean
                 and std), "invalid" (count and the first few, named by file and line), "split" (random or scaffold)

Splits: `random` (seeded; stratified on the label for a single classification target) or `scaffold` (Bemis-Murcko
scaffolds; groups from the largest down fill the train split, the rest is val: MoleculeNet's convention, so val
molecules have scaffolds train has never seen). Everything is a pure function of (inputs, arguments): reruns are
byte-identical. Crash safety, --overwrite and --verify are those of every prepare (framework.data.writer).
"""

from __future__ import annotations

import csv
import gzip
import io
import math
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from framework import __version__
from framework.data.manifest import header, split_entry
from framework.data.writer import make_key, output_transaction, parse_size
from framework.errors import UserError

# feature name -> its values; the index of a value is the feature; one extra index per feature: "other" is the last
# listed value where noted, and the mask index (len(values)) follows
ATOM_VALUES: dict[str, list[Any]] = {
    "atomic_num": list(range(1, 120)),  # 119 elements; index = atomic number - 1; "*" (0) and beyond: the last
    "chirality": ["CHI_UNSPECIFIED", "CHI_TETRAHEDRAL_CW", "CHI_TETRAHEDRAL_CCW", "CHI_OTHER"],
    "degree": list(range(11)),
    "formal_charge": list(range(-5, 6)),
    "num_hs": list(range(9)),
    "hybridization": ["S", "SP", "SP2", "SP3", "SP3D", "SP3D2", "OTHER"],
    "aromatic": [False, True],
}
BOND_VALUES: dict[str, list[Any]] = {
    # "SELF" is never in a molecule: the model's self-loops (Hu et al.'s GIN adds them with their own bond type)
    "bond_type": ["SINGLE", "DOUBLE", "TRIPLE", "AROMATIC", "OTHER", "SELF"],
    "stereo": ["STEREONONE", "STEREOZ", "STEREOE", "STEREOCIS", "STEREOTRANS", "STEREOANY"],
    "conjugated": [False, True],
}
ATOM_FEATURES, BOND_FEATURES = len(ATOM_VALUES), len(BOND_VALUES)
ATOM_VOCAB = [len(v) + 1 for v in ATOM_VALUES.values()]  # + the mask index
BOND_VOCAB = [len(v) + 1 for v in BOND_VALUES.values()]
MAX_ATOMS = 65535  # atom indices are stored as uint16
SPLIT_KINDS = ("random", "scaffold")
TASKS = ("auto", "regression", "classification")
EMBEDDED = ("nci", "nci-tpsa")
MISSING = ("", "na", "nan", "n/a", "none", "null", "?")  # label cells that mean "no label" (case-insensitive)
INVALID_EXAMPLES = 20  # invalid inputs named in the manifest


_MAPS: dict[str, dict[Any, int]] = {}  # feature -> {RDKit value: index}, built on first use (RDKit is imported lazily)


def _maps() -> dict[str, dict[Any, int]]:
    """Dictionaries from RDKit's values (enum members, ints) to feature indices: a lookup per atom instead of a
    list search and a str() of an enum (featurizing was 3x slower than parsing that way)."""
    if not _MAPS:
        from rdkit import Chem

        enum = lambda kind, names: {getattr(kind, n): i for i, n in enumerate(names) if hasattr(kind, n)}  # noqa: E731
        _MAPS.update({
            "atomic_num": {v: i for i, v in enumerate(ATOM_VALUES["atomic_num"])},
            "chirality": enum(Chem.ChiralType, ATOM_VALUES["chirality"]),
            "degree": {v: i for i, v in enumerate(ATOM_VALUES["degree"])},
            "formal_charge": {v: i for i, v in enumerate(ATOM_VALUES["formal_charge"])},
            "num_hs": {v: i for i, v in enumerate(ATOM_VALUES["num_hs"])},
            "hybridization": enum(Chem.HybridizationType, ATOM_VALUES["hybridization"]),
            "bond_type": enum(Chem.BondType, BOND_VALUES["bond_type"][:5]),
            "stereo": enum(Chem.BondStereo, BOND_VALUES["stereo"]),
        })
    return _MAPS


def featurize(mol: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An RDKit molecule -> (atoms uint8 (N, ATOM_FEATURES), bonds uint16 (E, 2), bond features uint8
    (E, BOND_FEATURES)), hydrogens implicit (counted in num_hs), each bond once. A value a feature does not list
    takes its last ("other") index."""
    m = _maps()
    other = {name: len(values) - 1 for name, values in ATOM_VALUES.items()}
    atoms = np.array([[m["atomic_num"].get(a.GetAtomicNum(), other["atomic_num"]),
                       m["chirality"].get(a.GetChiralTag(), other["chirality"]),
                       m["degree"].get(a.GetDegree(), other["degree"]),
                       m["formal_charge"].get(a.GetFormalCharge(), other["formal_charge"]),
                       m["num_hs"].get(a.GetTotalNumHs(), other["num_hs"]),
                       m["hybridization"].get(a.GetHybridization(), other["hybridization"]),
                       int(a.GetIsAromatic())] for a in mol.GetAtoms()], np.uint8).reshape(-1, ATOM_FEATURES)
    bonds = mol.GetBonds()
    pairs = np.array([(b.GetBeginAtomIdx(), b.GetEndAtomIdx()) for b in bonds], np.uint16).reshape(-1, 2)
    bond_features = np.array([(m["bond_type"].get(b.GetBondType(), 4), m["stereo"].get(b.GetStereo(), 5),
                               int(b.GetIsConjugated())) for b in bonds], np.uint8).reshape(-1, BOND_FEATURES)
    return atoms, pairs, bond_features


def feature_manifest() -> dict[str, Any]:
    return {"atoms": [{"name": n, "vocab": v} for n, v in zip(ATOM_VALUES, ATOM_VOCAB)],
            "bonds": [{"name": n, "vocab": v} for n, v in zip(BOND_VALUES, BOND_VOCAB)],
            "self_loop_bond_type": BOND_VALUES["bond_type"].index("SELF")}


# ---------------------------------------------------------------------------------------------------- inputs
@dataclass
class Record:
    source: str  # file name
    line: int  # line (SMILES, CSV) or record number (SDF), from 1
    smiles: str | None  # None for an SDF record
    labels: list[str]  # raw label cells, one per --label-column
    mol: Any = None  # an SDF record's molecule (None when RDKit could not read it)


def _rdkit() -> Any:
    try:
        from rdkit import Chem, RDLogger
    except ImportError:
        raise UserError("prepare-molecules needs RDKit; install it with `pip install rdkit` (or the framework's "
                        "`graphs` extra)") from None
    RDLogger.DisableLog("rdApp.*")  # an invalid SMILES is counted and named here, not printed by RDKit
    return Chem


def _open_text(path: Path) -> io.TextIOBase:
    try:
        if path.name.endswith(".gz"):
            return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", errors="replace", newline="")
        return open(path, encoding="utf-8", errors="replace", newline="")
    except OSError as e:
        raise UserError(f"cannot read input '{path}' ({e.strerror or e}); check --input") from None


def _kind(path: Path) -> str:
    name = path.name.lower().removesuffix(".gz")
    if name.endswith((".csv", ".tsv")):
        return "csv"
    if name.endswith((".sdf", ".sd", ".mol")):
        return "sdf"
    return "smi"  # .smi, .smiles, .txt, anything else: one SMILES per line


def read_smiles_lines(path: Path) -> Iterator[Record]:
    """One SMILES per line (its first whitespace-separated field; a name may follow); blank lines, `#` comments and
    a first line whose first field is `smiles` (a header) are skipped."""
    with _open_text(path) as f:
        for n, line in enumerate(f, 1):
            fields = line.split()
            if not fields or fields[0].startswith("#") or (n == 1 and fields[0].lower() == "smiles"):
                continue
            yield Record(path.name, n, fields[0], [])


def _find_column(columns: list[str], name: str, path: Path, option: str) -> int:
    exact = [i for i, c in enumerate(columns) if c.strip() == name]
    folded = [i for i, c in enumerate(columns) if c.strip().lower() == name.lower()]
    if exact or folded:
        return (exact or folded)[0]
    shown = ", ".join(c.strip() for c in columns[:12]) + (", ..." if len(columns) > 12 else "")
    raise UserError(f"'{path}' has no column '{name}' (its columns: {shown}); pass {option} with one of them")


def read_csv(path: Path, smiles_column: str, label_columns: list[str]) -> Iterator[Record]:
    """A CSV (or TSV) with a header row: the SMILES and label columns by name (case-insensitive when not exact)."""
    with _open_text(path) as f:
        delimiter = "\t" if path.name.lower().removesuffix(".gz").endswith(".tsv") else ","
        rows = csv.reader((line for line in f if not line.startswith("#")), delimiter=delimiter)
        columns = next(rows, None)
        if columns is None:
            return
        s = _find_column(columns, smiles_column, path, "--smiles-column")
        labels = [_find_column(columns, c, path, "--label-column") for c in label_columns]
        for n, row in enumerate(rows, 2):
            if not any(cell.strip() for cell in row):
                continue
            cell = lambda i: row[i].strip() if i < len(row) else ""  # noqa: E731  # a short row: empty cells
            yield Record(path.name, n, cell(s), [cell(i) for i in labels])


def read_sdf(path: Path, label_columns: list[str]) -> Iterator[Record]:
    """An SD file: each record's molecule, and its labels from the record's properties (`> <NAME>` fields)."""
    Chem = _rdkit()
    try:
        stream = gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")
    except OSError as e:
        raise UserError(f"cannot read input '{path}' ({e.strerror or e}); check --input") from None
    with stream:
        for n, mol in enumerate(Chem.ForwardSDMolSupplier(stream, sanitize=True, removeHs=True), 1):
            labels = [mol.GetProp(c) if mol is not None and mol.HasProp(c) else "" for c in label_columns]
            yield Record(path.name, n, None, labels, mol)


def embedded_path(name: str) -> Path:
    """The file of an embedded set inside the installed RDKit (no download): NCI's first 5,000 molecules, as SMILES
    (`nci`, 4,999 lines) and with their topological polar surface area (`nci-tpsa`, Ertl's TPSA, a CSV without a
    header)."""
    _rdkit()
    from rdkit import RDConfig

    file = {"nci": "first_5K.smi", "nci-tpsa": "first_5k.tpsa.csv"}[name]
    path = Path(RDConfig.RDDataDir) / "NCI" / file
    if not path.is_file():
        raise UserError(f"the embedded set '{name}' is not in this RDKit install ({path} is missing); reinstall "
                        "rdkit from its wheel, or pass --input FILE")
    return path


def read_embedded(name: str) -> tuple[Iterator[Record], list[str]]:
    """(records, label names) of an embedded set."""
    path = embedded_path(name)
    if name == "nci":
        return read_smiles_lines(path), []

    def tpsa() -> Iterator[Record]:
        with _open_text(path) as f:
            for n, line in enumerate(f, 1):
                if line.startswith("#") or not line.strip():
                    continue
                smiles, _, value = line.strip().rpartition(",")
                yield Record(path.name, n, smiles, [value])
    return tpsa(), ["tpsa"]


def read_inputs(inputs: list[str], smiles_column: str, label_columns: list[str]) -> Iterator[Record]:
    for name in inputs:
        path = Path(name)
        if not path.is_file():
            raise UserError(f"input '{path}' is not a file; pass --input with a .smi, .csv or .sdf file (or .gz)")
        kind = _kind(path)
        if kind == "smi" and label_columns:
            raise UserError(f"--label-column needs a .csv or .sdf input, but '{path}' is read as one SMILES per "
                            "line; convert it to CSV with a header row")
        if kind == "csv":
            yield from read_csv(path, smiles_column, label_columns)
        elif kind == "sdf":
            yield from read_sdf(path, label_columns)
        else:
            yield from read_smiles_lines(path)


# ---------------------------------------------------------------------------------------------------- labels
def _label_value(cell: str, record: Record, column: str) -> float:
    if cell.strip().lower() in MISSING:
        return math.nan
    try:
        value = float(cell)
    except ValueError:
        raise UserError(f"label column '{column}' holds text '{cell[:40]}' at {record.source} line {record.line}; "
                        "label columns must be numbers (empty or NA for a missing label): check --label-column") \
            from None
    if not math.isfinite(value):
        raise UserError(f"label column '{column}' holds '{cell}' at {record.source} line {record.line}; use an empty "
                        "cell or NA for a missing label")
    return value


def resolve_task(y: np.ndarray, task: str) -> str:
    """`auto`: classification when every given label is 0 or 1, else regression."""
    given = y[~np.isnan(y)]
    if task == "auto":
        return "classification" if given.size and np.isin(given, (0.0, 1.0)).all() else "regression"
    if task == "classification" and not np.isin(given, (0.0, 1.0)).all():
        bad = given[~np.isin(given, (0.0, 1.0))][0]
        raise UserError(f"--task classification needs labels 0 or 1 (or missing), found {bad:g}; use --task "
                        "regression for continuous targets")
    return task


# ---------------------------------------------------------------------------------------------------- splits
def scaffold_of(smiles: str) -> str:
    """The Bemis-Murcko scaffold of a molecule as canonical SMILES ("" for acyclic molecules), chirality ignored."""
    from rdkit.Chem.Scaffolds import MurckoScaffold

    return MurckoScaffold.MurckoScaffoldSmiles(smiles=smiles, includeChirality=False)


def scaffold_split(smiles: list[str], val_fraction: float) -> np.ndarray:
    """bool (n,): True for val. Molecules are grouped by scaffold; the groups, largest first (ties: the one seen
    first), go to train while it holds fewer than (1 - val_fraction) * n molecules, the rest to val (MoleculeNet's
    deterministic scaffold split, with val in place of its valid + test)."""
    groups: dict[str, list[int]] = {}
    for i, s in enumerate(smiles):
        groups.setdefault(scaffold_of(s), []).append(i)
    ordered = sorted(groups.values(), key=lambda g: (-len(g), g[0]))
    val = np.zeros(len(smiles), bool)
    train_cap, taken = (1 - val_fraction) * len(smiles), 0
    for group in ordered:
        if taken + len(group) <= train_cap or taken == 0:
            taken += len(group)
        else:
            val[group] = True
    return val


def random_split(n: int, val_fraction: float, seed: int, strata: np.ndarray | None = None) -> np.ndarray:
    """bool (n,): True for val; round(f * n_c) molecules of each stratum (all one stratum without `strata`), the
    ones with the smallest seeded random keys."""
    keys = np.random.default_rng([seed, 0x6D01]).random(n)
    strata = np.zeros(n, np.int64) if strata is None else strata
    val = np.zeros(n, bool)
    for c in np.unique(strata):
        members = np.flatnonzero(strata == c)
        val[members[np.argsort(keys[members], kind="stable")[:round(val_fraction * len(members))]]] = True
    return val


# ---------------------------------------------------------------------------------------------------- prepare
@dataclass
class Molecule:
    source: str
    line: int
    smiles: str  # canonical
    atoms: np.ndarray
    bonds: np.ndarray
    bond_features: np.ndarray
    y: np.ndarray  # float64 (targets,), NaN = missing

    def members(self, labelled: bool) -> list[tuple[str, bytes]]:
        members = [("atoms", self.atoms.tobytes()), ("bonds", self.bonds.astype("<u2").tobytes()),
                   ("bondf", self.bond_features.tobytes()), ("smi", self.smiles.encode())]
        return members + [("y", self.y.astype("<f4").tobytes())] if labelled else members


def parse_molecules(records: Iterator[Record], label_names: list[str], strict: bool,
                    progress: bool = False) -> tuple[list[Molecule], dict[str, Any], int]:
    """Records -> featurized molecules, in input order; (molecules, the manifest's "invalid" entry, records read).
    An invalid molecule (RDKit cannot parse or sanitize it, no atoms, too many atoms) is skipped and counted;
    with `strict` the first one fails the run."""
    Chem = _rdkit()
    molecules: list[Molecule] = []
    invalid: list[dict[str, Any]] = []
    count = 0
    started = time.monotonic()
    for count, record in enumerate(records, 1):
        mol = record.mol if record.smiles is None else Chem.MolFromSmiles(record.smiles)
        reason = None
        if mol is None:
            reason = "RDKit cannot parse it"
        elif mol.GetNumAtoms() == 0:
            reason = "it has no atoms"
        elif mol.GetNumAtoms() > MAX_ATOMS:
            reason = f"it has more than {MAX_ATOMS} atoms"
        if reason is not None:
            shown = record.smiles if record.smiles is not None else f"SD record {record.line}"
            if strict:
                raise UserError(f"invalid molecule at {record.source} line {record.line} ('{shown[:60]}'): {reason}; "
                                "fix or remove it, or drop --strict to skip invalid molecules")
            invalid.append({"source": record.source, "line": record.line, "input": shown[:200], "reason": reason})
            continue
        y = np.array([_label_value(c, record, n) for c, n in zip(record.labels, label_names)], np.float64)
        atoms, bonds, bond_features = featurize(mol)
        molecules.append(Molecule(record.source, record.line, Chem.MolToSmiles(mol), atoms, bonds, bond_features, y))
        if progress and count % 10000 == 0:
            rate = count / max(1e-9, time.monotonic() - started)
            print(f"\r  {count:,} molecules read ({rate:,.0f}/s)", end="", file=sys.stderr, flush=True)
    if progress and count >= 10000:
        print(file=sys.stderr)
    return molecules, {"count": len(invalid), "examples": invalid[:INVALID_EXAMPLES]}, count


def prepare_molecules(inputs: list[str] | None, output: str | os.PathLike, *, embedded: str | None = None,
                      smiles_column: str = "smiles", label_columns: list[str] | None = None, task: str = "auto",
                      split: str = "random", val_fraction: float = 0.1, seed: int = 0, shard_size: str = "64MB",
                      strict: bool = False, overwrite: bool = False, progress: bool = True) -> dict:
    """Write graph shards of `inputs` (or the `embedded` set) to `output`; returns the manifest (see the module
    docstring)."""
    label_columns = list(label_columns or [])
    if split not in SPLIT_KINDS:
        raise UserError(f"--split must be one of {', '.join(SPLIT_KINDS)}, got '{split}'")
    if task not in TASKS:
        raise UserError(f"--task must be one of {', '.join(TASKS)}, got '{task}'")
    if not 0 <= val_fraction < 1:
        raise UserError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if bool(inputs) == bool(embedded):
        raise UserError("pass --input FILE (SMILES, .csv or .sdf) or --embedded "
                        f"{{{','.join(EMBEDDED)}}}, one of the two")
    if embedded is not None and embedded not in EMBEDDED:
        raise UserError(f"--embedded must be one of {', '.join(EMBEDDED)}, got '{embedded}'")
    if embedded is not None and label_columns:
        raise UserError("--label-column is for --input files; the embedded sets name their own labels")
    max_bytes = parse_size(shard_size)
    out = Path(output)
    with output_transaction(out, overwrite) as writer:
        # read and check everything first: bad input fails before a previous output is touched
        if embedded is not None:
            records, label_columns = read_embedded(embedded)
            sources = [f"rdkit:{embedded_path(embedded).name}"]
        else:
            assert inputs is not None
            records = read_inputs(inputs, smiles_column, label_columns)
            sources = [Path(i).name for i in inputs]
        molecules, invalid, read = parse_molecules(records, label_columns, strict, progress)
        where = f"--embedded {embedded}" if embedded else ", ".join(f"'{i}'" for i in inputs or [])
        if read == 0:
            raise UserError(f"{where} holds no molecules (empty, or only a header or comments); pass a file with "
                            "one SMILES per line, a CSV with a SMILES column, or an SD file")
        if not molecules:
            first = invalid["examples"][0]
            raise UserError(f"none of the {read} molecules in {where} is valid (first: {first['source']} line "
                            f"{first['line']} '{first['input'][:40]}': {first['reason']}); check the file and "
                            "--smiles-column")
        labelled = bool(label_columns)
        y = np.stack([m.y for m in molecules]) if labelled else np.zeros((len(molecules), 0))
        kind = resolve_task(y, task) if labelled else None
        if labelled and np.isnan(y).all(axis=0).any():
            empty = label_columns[int(np.flatnonzero(np.isnan(y).all(axis=0))[0])]
            raise UserError(f"label column '{empty}' has no labels at all in {where}; check --label-column")
        smiles = [m.smiles for m in molecules]
        if split == "scaffold":
            is_val = scaffold_split(smiles, val_fraction)
        else:
            strata = y[:, 0].astype(np.int64) if kind == "classification" and y.shape[1] == 1 else None
            is_val = random_split(len(molecules), val_fraction, seed, strata)
        writer.remove_previous()
        writers = {s: writer.writer(s, max_bytes=max_bytes) for s in ("train", "val")}
        # each split in a seeded order, so a shard is not one file region (or one scaffold)
        rng = np.random.default_rng([seed, 0x5EED])
        targets: dict[str, Any] | None = None
        if labelled:
            train_y = y[~is_val]
            targets = {"names": label_columns, "task": kind,
                       "counts": {"train": (~np.isnan(train_y)).sum(0).tolist(),
                                  "val": (~np.isnan(y[is_val])).sum(0).tolist()}}
            if kind == "regression":
                targets["mean"] = [float(np.nanmean(c)) if (~np.isnan(c)).any() else 0.0 for c in train_y.T]
                targets["std"] = [float(np.nanstd(c)) if (~np.isnan(c)).sum() > 1 else 1.0 for c in train_y.T]
            else:
                targets["positives"] = {s: np.nansum(part, 0).astype(int).tolist()
                                        for s, part in (("train", train_y), ("val", y[is_val]))}
        for name, members in (("train", np.flatnonzero(~is_val)), ("val", np.flatnonzero(is_val))):
            for i in members[rng.permutation(len(members))]:
                m = molecules[i]
                # the token count of a graph is its atom count
                writers[name].write(make_key(int(i), m.source, m.line), m.members(labelled), tokens=len(m.atoms))
        manifest = {**header("graphs"),
                    "splits": {s: split_entry(w.finish()) for s, w in writers.items()},
                    "features": feature_manifest(),
                    "split": {"kind": split, "val_fraction": val_fraction, "seed": seed},
                    "invalid": invalid,
                    "sources": sources,
                    "created_by": f"framework {__version__}"}
        if targets is not None:
            manifest["targets"] = targets
        return writer.commit(manifest)


__all__ = ["ATOM_FEATURES", "ATOM_VOCAB", "BOND_FEATURES", "BOND_VOCAB", "featurize", "prepare_molecules",
           "random_split", "scaffold_split"]
