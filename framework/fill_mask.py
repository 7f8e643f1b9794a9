"""`pretrain fill-mask`: what a masked-LM encoder predicts for each `<|mask|>` in a text, top-k per mask.

    pretrain fill-mask --ckpt runs/bert-smoke/checkpoints/last.ckpt --text "def __init__(self, <|mask|>):"
"""

from __future__ import annotations

import argparse

import torch

from framework.checkpoint.formats import trust_checkpoint
from framework.errors import UserError
from framework.generate import load_model
from framework.models.encoder import Encoder

MASK = "<|mask|>"


@torch.no_grad()
def fill_mask(model: Encoder, ids: list[int], mask_id: int, top_k: int) -> list[list[tuple[int, float]]]:
    """For each mask position of `ids` (in order): the top_k (token id, probability) pairs."""
    idx = torch.tensor([ids], dtype=torch.long, device=next(model.parameters()).device)
    predict = idx == mask_id  # (1, T)
    probs = model(idx, predict=predict).float().softmax(dim=-1)  # (M, V)
    top = probs.topk(min(top_k, probs.size(-1)), dim=-1)
    return [list(zip(i.tolist(), p.tolist())) for i, p in zip(top.indices, top.values)]


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="pretrain fill-mask", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", help="a checkpoint of `pretrain fit` of a masked-LM encoder (any strategy)")
    p.add_argument("--model", help="a directory written by `pretrain export` from such a checkpoint")
    p.add_argument("--tokenizer", help="tokenizer.json to use instead of the one the checkpoint carries")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="unpickle the checkpoint fully (only for files from a trusted source; default: weights-only)")
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
    # the text between masks is encoded piece by piece: a BPE tokenizer must not merge across a mask
    pieces = args.text.split(MASK)
    ids = [specials["cls"]]
    for i, piece in enumerate(pieces):
        ids += tok.encode(piece) if piece else []
        if i < len(pieces) - 1:
            ids.append(specials["mask"])
    if len(ids) > model.config.seq_len:
        raise UserError(f"--text is {len(ids)} tokens, longer than the model's context ({model.config.seq_len}); "
                        "shorten it")
    results = fill_mask(model, ids, specials["mask"], args.top_k)
    for n, candidates in enumerate(results, 1):
        shown = "   ".join(f"{tok.decode([t])!r} {p:.1%}" for t, p in candidates)
        print(f"mask {n}: {shown}")
    best = iter([c[0][0] for c in results])
    filled = [next(best) if t == specials["mask"] else t for t in ids[1:]]
    print(f"best: {tok.decode(filled)}")
