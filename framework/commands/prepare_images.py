"""`pretrain prepare-images`: a folder of images (a sub-folder per class) or the embedded synthetic shapes -> image
shards (framework.data.prepare_images does the work; its docstring describes the output)."""

from __future__ import annotations

import argparse

from framework.commands.common import ArgParser
from framework.data import prepare_images as lib
from framework.data.prepare_images import CLASS_BY, prepare_images
from framework.errors import UserError


def _parser() -> argparse.ArgumentParser:
    p = ArgParser(prog="pretrain prepare-images", description=lib.__doc__.split("\n\n")[0],
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", metavar="DIR", help="a folder with one sub-folder of images per class (jpg, png, "
                                                  "webp); a .txt beside an image is its caption")
    p.add_argument("--synthetic", type=int, default=0, metavar="N",
                   help="instead of --input: N images of the embedded synthetic shapes (no download)")
    p.add_argument("--output", metavar="DIR", help="directory for the shards, tokenizer.json and manifest.json")
    p.add_argument("--val-input", metavar="DIR", help="a held-out folder of the same layout: all of it is val")
    p.add_argument("--val-fraction", type=float, default=None, metavar="F",
                   help="share of each class for val (default 0.1 synthetic, 0.05 a folder, 0 with --val-input)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split, the shard order and the synthetic set")
    p.add_argument("--image-size", type=int, default=None, metavar="PX", help="synthetic images' side (default 64)")
    p.add_argument("--class-by", choices=CLASS_BY, default=None,
                   help="synthetic classes: shape-colour (36, default) or shape (6)")
    p.add_argument("--format", choices=("png", "jpg"), default=None, help="synthetic images' format (default png)")
    p.add_argument("--shard-size", default="64MB", metavar="SIZE", help="image bytes per shard (default 64MB)")
    p.add_argument("--overwrite", action="store_true", help="replace a previous prepare in --output")
    return p


def main(argv: list[str]) -> None:
    args = _parser().parse_args(argv)
    if not args.output:
        raise UserError("--output DIR is required; e.g. `pretrain prepare-images --synthetic 20000 --output "
                        "data/shapes`")
    synthetic_only = [f for f, v in (("--image-size", args.image_size), ("--class-by", args.class_by),
                                     ("--format", args.format)) if v is not None]
    if args.input is not None and synthetic_only:
        raise UserError(f"{synthetic_only[0]} is an option of --synthetic; a folder's images are stored as they are")
    prepare_images(args.input, args.output, synthetic=args.synthetic, val_input=args.val_input,
                   val_fraction=args.val_fraction, seed=args.seed, shard_size=args.shard_size,
                   image_size=args.image_size or 64, class_by=args.class_by or "shape-colour",
                   image_format=args.format or "png", overwrite=args.overwrite)
