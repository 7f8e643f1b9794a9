"""`pretrain export CKPT OUT_DIR`: any training checkpoint -> a model directory for inference and fine-tuning
(framework.checkpoint.export does the work; its docstring describes the output)."""

from __future__ import annotations

import argparse

from framework.checkpoint import export as lib
from framework.checkpoint.export import TOKENIZER_FILE, export
from framework.checkpoint.formats import trust_checkpoint


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="pretrain export", description=lib.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt", metavar="CKPT", help="a checkpoint of `pretrain fit` (file or directory; last.ckpt works)")
    p.add_argument("out_dir", metavar="OUT_DIR", help="directory to write (must be empty or absent)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it is not empty")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="unpickle the checkpoint fully (only for files from a trusted source; default: weights-only)")
    args = p.parse_args(argv)
    trust_checkpoint(args.trust_checkpoint)
    summary = export(args.ckpt, args.out_dir, overwrite=args.overwrite)
    step = f" (step {summary['step']})" if summary["step"] is not None else ""
    print(f"exported a {summary['model_type']!r} model: {summary['parameters']:,} parameters "
          f"({_size(summary['bytes'])}) from the {summary['kind']} "
          f"checkpoint {args.ckpt}{step} to {summary['out']}")
    if not summary["tokenizer"]:
        print(f"note: the checkpoint carries no tokenizer; copy the {TOKENIZER_FILE} beside its training shards into "
              f"{summary['out']} (or pass --tokenizer to `pretrain generate`)")
    from framework.models.registry import family

    command = family(summary["model_type"]).command
    load = f"framework.models.from_pretrained('{summary['out']}')"
    print(f"use it: pretrain {command} --model {summary['out']}   or   {load}" if command else f"use it: {load}")
