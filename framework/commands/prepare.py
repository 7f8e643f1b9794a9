"""`pretrain prepare`: a corpus of text files -> tokenized webdataset tar shards, `tokenizer.json` and `manifest.json`
(framework.data.prepare does the work; its docstring describes the output and the decisions)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from framework.commands.common import ArgParser
from framework.data import prepare as lib
from framework.data.inputs import HELD_OUT, TASK
from framework.data.manifest import MANIFEST
from framework.data.prepare import prepare
from framework.data.writer import verify
from framework.errors import UserError


def _parser() -> argparse.ArgumentParser:
    p = ArgParser(prog="pretrain prepare", description=lib.__doc__.split("\n\n")[0],
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", action="extend", metavar="PATH_OR_GLOB",
                   help="text files, directories (recursed, hidden entries skipped), globs, .jsonl with a \"text\" "
                        "field, any of them .gz; default: the .py files of Python's standard library")
    p.add_argument("--output", metavar="DIR", help="directory for the shards, tokenizer.json and manifest.json")
    p.add_argument("--tokenizer", default="bytes", metavar="SPEC",
                   help="bytes (default), bpe:VOCAB (train a byte-level BPE) or FILE.json (a HF tokenizer)")
    p.add_argument("--val-input", nargs="+", action="extend", metavar="PATH_OR_GLOB",
                   help="a separate validation corpus (as --input), tokenized with the same tokenizer; every "
                        "document goes to the val split")
    p.add_argument("--val-fraction", type=float, default=None, metavar="F",
                   help="share of the --input documents for val, by a seeded hash (default 0.01; 0 with --val-input)")
    p.add_argument("--label-field", metavar="NAME",
                   help="a labelled corpus: each .jsonl line's class is in field NAME (a string or an integer); text "
                        "files are labelled by their folder (INPUT/<label>/*.txt). The split is stratified by class")
    p.add_argument("--task", choices=[TASK], default=None,
                   help=f"prepare the embedded labelled task instead of a corpus: the functions of the standard "
                        f"library's {', '.join(HELD_OUT)} packages (left out of the default corpus), labelled by "
                        "package; val fraction 0.2 unless given")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/val split (default 0)")
    p.add_argument("--shard-size", default="64MB", metavar="SIZE", help="token bytes per shard (default 64MB)")
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="tokenizer processes for bpe/file tokenizers (default 1; bytes is fastest in-process)")
    p.add_argument("--overwrite", action="store_true", help="replace a previous prepare in --output")
    p.add_argument("--strict", action="store_true", help="fail on binary/non-UTF-8 files instead of skipping them")
    p.add_argument("--verify", metavar="DIR", help="check the shards in DIR against its manifest, then exit")
    return p


def main(argv: list[str]) -> None:
    args = _parser().parse_args(argv)
    if args.verify is not None:
        if args.output or args.input:
            raise UserError("--verify DIR takes no --input/--output; run it on its own")
        check(args.verify)
        return
    if not args.output:
        raise UserError("--output DIR is required; e.g. `pretrain prepare --input corpus/ --output data/`")
    if args.task and args.label_field:
        raise UserError("--task and --label-field exclude each other: the task brings its own labels")
    val_fraction = 0.2 if args.task and args.val_fraction is None else args.val_fraction
    prepare(args.input, args.output, tokenizer=args.tokenizer, val_fraction=val_fraction, seed=args.seed,
            shard_size=args.shard_size, workers=args.workers, overwrite=args.overwrite, strict=args.strict,
            val_inputs=args.val_input, labels=args.task or args.label_field)


def check(directory: str | Path) -> None:
    """`--verify`: print OK or raise a UserError that names every bad shard."""
    problems = verify(directory)
    if problems:
        raise UserError(f"'{directory}' does not match its manifest: {'; '.join(problems)}; "
                        "re-run `pretrain prepare --overwrite` to rebuild it")
    manifest = json.loads((Path(directory) / MANIFEST).read_text(encoding="utf-8"))
    n = sum(len(s["shards"]) for s in manifest["splits"].values())
    print(f"OK: '{directory}': {n} shards and tokenizer.json match the manifest")
