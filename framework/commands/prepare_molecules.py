"""`pretrain prepare-molecules`: SMILES, CSV or SD files (or an embedded set) -> graph shards with a manifest
(framework.data.molecules does the work; its docstring describes the featurization and the output)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from framework.commands.common import ArgParser
from framework.data import molecules as lib
from framework.data.manifest import MANIFEST
from framework.data.writer import verify
from framework.errors import UserError


def _parser() -> argparse.ArgumentParser:
    p = ArgParser(prog="pretrain prepare-molecules", description=lib.__doc__.split("\n\n")[0],
                  formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", action="append", metavar="FILE",
                   help="a .smi/.txt (one SMILES per line), .csv/.tsv (header row) or .sdf file, each optionally "
                        ".gz; repeat for several")
    p.add_argument("--embedded", choices=lib.EMBEDDED,
                   help="instead of --input: a set shipped inside RDKit (no download): nci (4,999 NCI molecules, "
                        "unlabelled) or nci-tpsa (the same with their polar surface area, a regression target)")
    p.add_argument("--output", metavar="DIR", help="directory for the shards and manifest.json")
    p.add_argument("--smiles-column", default="smiles", metavar="NAME", help="the CSV's SMILES column (default smiles)")
    p.add_argument("--label-column", action="append", metavar="NAME",
                   help="a CSV column or SD property holding a target; repeat, or give a comma list, for several "
                        "tasks (an empty cell or NA: missing)")
    p.add_argument("--task", choices=lib.TASKS, default="auto",
                   help="what the labels are: auto (classification when every label is 0 or 1), regression, "
                        "classification")
    p.add_argument("--split", choices=lib.SPLIT_KINDS, default="random",
                   help="random (seeded; stratified for one classification target) or scaffold (Bemis-Murcko, "
                        "largest scaffold groups to train)")
    p.add_argument("--val-fraction", type=float, default=0.1, metavar="F", help="share of molecules for val "
                                                                                 "(default 0.1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random split and the order in the shards")
    p.add_argument("--shard-size", default="64MB", metavar="SIZE", help="graph bytes per shard (default 64MB)")
    p.add_argument("--strict", action="store_true", help="fail on the first invalid molecule instead of skipping it")
    p.add_argument("--overwrite", action="store_true", help="replace a previous prepare in --output")
    p.add_argument("--verify", metavar="DIR", help="check the shards in DIR against its manifest, then exit")
    return p


def main(argv: list[str]) -> None:
    args = _parser().parse_args(argv)
    if args.verify is not None:
        if args.output or args.input or args.embedded:
            raise UserError("--verify DIR takes no --input/--embedded/--output; run it on its own")
        check(args.verify)
        return
    if not args.output:
        raise UserError("--output DIR is required; e.g. `pretrain prepare-molecules --embedded nci --output data/nci`")
    labels = [c.strip() for spec in args.label_column or [] for c in spec.split(",") if c.strip()]
    manifest = lib.prepare_molecules(args.input, args.output, embedded=args.embedded,
                                     smiles_column=args.smiles_column, label_columns=labels, task=args.task,
                                     split=args.split, val_fraction=args.val_fraction, seed=args.seed,
                                     shard_size=args.shard_size, strict=args.strict, overwrite=args.overwrite)
    splits = manifest["splits"]
    line = (f"wrote {splits['train']['samples']:,} train and {splits['val']['samples']:,} val molecules "
            f"({manifest['split']['kind']} split) to '{args.output}'")
    if manifest["invalid"]["count"]:
        first = manifest["invalid"]["examples"][0]
        line += (f"; skipped {manifest['invalid']['count']} invalid (first: {first['source']} line {first['line']}; "
                 "all named in manifest.json)")
    print(line)


def check(directory: str | Path) -> None:
    """`--verify`: print OK or raise a UserError that names every bad shard."""
    problems = verify(directory)
    if problems:
        raise UserError(f"'{directory}' does not match its manifest: {'; '.join(problems)}; "
                        "re-run `pretrain prepare-molecules --overwrite` to rebuild it")
    manifest = json.loads((Path(directory) / MANIFEST).read_text(encoding="utf-8"))
    n = sum(len(s["shards"]) for s in manifest["splits"].values())
    print(f"OK: '{directory}': {n} shards match the manifest")
