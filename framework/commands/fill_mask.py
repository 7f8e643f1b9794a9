"""`pretrain fill-mask`: what a masked-LM encoder predicts for each `<|mask|>` in a text, top-k per mask.

    pretrain fill-mask --ckpt runs/bert-smoke/checkpoints/last.ckpt --text "def __init__(self, <|mask|>):"
"""

from __future__ import annotations

import argparse

import torch

from framework.checkpoint.formats import trust_checkpoint
from framework.checkpoint.load import load_model
from framework.commands.common import add_model_arguments
from framework.errors import UserError
from framework.inference import MASK, encode_with_masks, show
from framework.models.encoder import Encoder


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="pretrain fill-mask", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p, "a masked-LM encoder")
    p.add_argument("--text", required=True, help=f"text with one or more {MASK} tokens")
    p.add_argument("--top-k", type=int, default=5, help="candidates shown per mask")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    trust_checkpoint(args.trust_checkpoint)
    if args.top_k < 1:
        raise UserError("--top-k must be >= 1")
    if MASK not in args.text:
        raise UserError(f"--text has no {MASK} token: put {MASK} where the model should fill in, e.g. "
                        f"--text \"def __init__(self, {MASK}):\"")
    model, tok = load_model(args.ckpt, args.model, args.tokenizer, model_type="bert")
    assert isinstance(model, Encoder)
    model.to(args.device).eval()
    specials = tok.special_ids
    if "mask" not in specials or "cls" not in specials:
        raise UserError("the model's tokenizer has no <|mask|> or <|cls|> token; pass --tokenizer with the "
                        "tokenizer.json of its training shards")
    if len(encode_with_masks(tok, args.text)) > model.config.seq_len:
        raise UserError(f"--text is longer than the model's context ({model.config.seq_len} tokens); shorten it")
    print("\n".join(show(model, tok, args.text, args.top_k)))
