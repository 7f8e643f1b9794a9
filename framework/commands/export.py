"""`pretrain export CKPT OUT_DIR`: any training checkpoint -> a model directory for inference and fine-tuning
(framework.checkpoint.export does the work; its docstring describes the output)."""

from __future__ import annotations

import argparse

from framework.checkpoint import export as lib
from framework.checkpoint import hf
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
    p.add_argument("--format", choices=lib.FORMATS, default="ours",
                   help="ours (default): this framework's files; hf: a directory Hugging Face transformers loads "
                        "(GPT2LMHeadModel, LlamaForCausalLM)")
    p.add_argument("--max-shard-size", default=hf.DEFAULT_MAX_SHARD,
                   help=f"with --format hf: the largest weights file (default {hf.DEFAULT_MAX_SHARD}, GB = 10^9 "
                        "bytes); above it the weights are sharded with an index, as save_pretrained does")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="unpickle the checkpoint fully (only for files from a trusted source; default: weights-only)")
    args = p.parse_args(argv)
    trust_checkpoint(args.trust_checkpoint)
    summary = export(args.ckpt, args.out_dir, overwrite=args.overwrite, format=args.format,
                     max_shard_size=args.max_shard_size)
    step = f" (step {summary['step']})" if summary["step"] is not None else ""
    what = f"a {summary['model_type']!r} model" + (f" as a Hugging Face {summary['architecture']}"
                                                   if summary["architecture"] else "")
    print(f"exported {what}: {summary['parameters']:,} parameters ({_size(summary['bytes'])}, "
          f"{len([f for f in summary['files'] if f.endswith('.safetensors')])} weights file(s)) from the "
          f"{summary['kind']} checkpoint {args.ckpt}{step} to {summary['out']}")
    if summary["architecture"]:
        if not summary["tokenizer"]:
            print("note: the checkpoint carries no tokenizer; the directory has none (AutoTokenizer cannot load it)")
        print(f"use it: transformers.AutoModelForCausalLM.from_pretrained('{summary['out']}')   or   "
              f"pretrain generate --model {summary['out']}")
        return
    if not summary["tokenizer"]:
        print(f"note: the checkpoint carries no tokenizer; copy the {TOKENIZER_FILE} beside its training shards into "
              f"{summary['out']} (or pass --tokenizer to `pretrain generate`)")
    from framework.models.registry import family

    command = family(summary["model_type"]).command
    load = f"framework.models.from_pretrained('{summary['out']}')"
    print(f"use it: pretrain {command} --model {summary['out']}   or   {load}" if command else f"use it: {load}")
