"""`pretrain fill-mask`: what a masked-LM encoder predicts for each `<|mask|>` in a text, top-k per mask.

    pretrain fill-mask --ckpt runs/bert-smoke/checkpoints/last.ckpt --text "def __init__(self, <|mask|>):"
"""

from __future__ import annotations

import argparse

import torch

from framework.checkpoint.formats import trust_checkpoint
from framework.data.tokenizer import Tokenizer
from framework.errors import UserError
from framework.generate import add_model_arguments, load_model
from framework.models.encoder import Encoder

MASK = "<|mask|>"


@torch.no_grad()
def fill_mask(model: Encoder, ids: list[int], mask_id: int, top_k: int) -> list[list[tuple[int, float]]]:
    """For each mask position of `ids` (in order): the top_k (token id, probability) pairs. Runs in eval mode (no
    dropout) and restores the model's mode."""
    was_training = model.training
    model.eval()
    try:
        idx = torch.tensor([ids], dtype=torch.long, device=next(model.parameters()).device)
        predict = idx == mask_id  # (1, T)
        probs = model(idx, predict=predict).float().softmax(dim=-1)  # (M, V)
    finally:
        model.train(was_training)
    top = probs.topk(min(top_k, probs.size(-1)), dim=-1)
    return [list(zip(i.tolist(), p.tolist())) for i, p in zip(top.indices, top.values)]


def encode_with_masks(tok: Tokenizer, text: str) -> list[int]:
    """`<|cls|>` + the text's ids with a mask id for each MASK. The text between masks is encoded piece by piece: a
    BPE tokenizer must not merge across a mask."""
    specials = tok.special_ids
    pieces = text.split(MASK)
    ids = [specials["cls"]]
    for i, piece in enumerate(pieces):
        ids += tok.encode(piece) if piece else []
        if i < len(pieces) - 1:
            ids.append(specials["mask"])
    return ids


def show(model: Encoder, tok: Tokenizer, text: str, top_k: int) -> list[str]:
    """Lines: the top_k guesses for each mask, then the text with the best guesses filled in."""
    ids = encode_with_masks(tok, text)
    mask_id = tok.special_ids["mask"]
    results = fill_mask(model, ids, mask_id, top_k)
    lines = [f"mask {n}: " + "   ".join(f"{tok.decode([t])!r} {p:.1%}" for t, p in candidates)
             for n, candidates in enumerate(results, 1)]
    best = iter([c[0][0] for c in results])
    lines.append(f"best: {tok.decode([next(best) if t == mask_id else t for t in ids[1:]])}")
    return lines


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
