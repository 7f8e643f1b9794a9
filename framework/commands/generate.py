"""`pretrain generate`: sample text from a GPT's training checkpoint or exported model directory."""

from __future__ import annotations

import argparse

import torch

from framework.checkpoint.formats import trust_checkpoint
from framework.checkpoint.load import load_model
from framework.commands.common import add_model_arguments
from framework.errors import UserError
from framework.models.gpt import GPT


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="pretrain generate", description=__doc__)
    add_model_arguments(p, "a GPT")
    p.add_argument("--prompt", default="", help="text to continue (default: start from an end-of-document token)")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=50, help="sample among the k most likely tokens (0 = all)")
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    trust_checkpoint(args.trust_checkpoint)
    if args.max_new_tokens < 1 or args.temperature < 0 or args.top_k < 0 or args.num_samples < 1:
        raise UserError("--max-new-tokens and --num-samples must be >= 1, --temperature and --top-k >= 0")
    model, tok = load_model(args.ckpt, args.model, args.tokenizer, model_type="gpt")
    assert isinstance(model, GPT)
    model.to(args.device).eval()
    torch.manual_seed(args.seed)
    ids = tok.encode(args.prompt) if args.prompt else [tok.special_ids["eod"]]
    idx = torch.tensor([ids] * args.num_samples, dtype=torch.long, device=args.device)
    out = model.generate(idx, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k or None,
                         eos_id=tok.special_ids["eod"])
    for i, row in enumerate(out.tolist()):
        if args.num_samples > 1:
            print(f"--- sample {i + 1}")
        print(tok.decode([t for t in row if t != tok.special_ids["eod"]]))
