"""`pretrain generate`: sample text from a training checkpoint or an exported model directory."""

from __future__ import annotations

import argparse
import os

import torch

from framework.data.tokenizer import Tokenizer
from framework.errors import UserError
from framework.models.gpt import GPT, GPTConfig


def load_checkpoint_model(path: str) -> tuple[GPT, str | None]:
    """A GPT and its tokenizer JSON (None if the checkpoint carries none) from a `pretrain fit` checkpoint file."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint '{path}' does not exist; pass a .ckpt file written by `pretrain fit`")
    try:
        ckpt = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user problem
        raise UserError(f"cannot read checkpoint '{path}' ({type(e).__name__}); is it a `pretrain fit` checkpoint?") \
            from None
    if "model_config" not in ckpt:
        raise UserError(f"checkpoint '{path}' has no model_config: it was not written by `pretrain fit`")
    config = GPTConfig.from_dict(ckpt["model_config"])
    with torch.device("meta"):
        model = GPT(config)
    state = {k[len("model."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    model.load_state_dict(state, assign=True)
    model.tie_weights()
    return model, ckpt.get("tokenizer_json")


def load_model(ckpt: str | None, model_dir: str | None, tokenizer: str | None) -> tuple[GPT, Tokenizer]:
    """The model and tokenizer named on the command line; a missing tokenizer is a UserError saying where to find one."""
    if (ckpt is None) == (model_dir is None):
        raise UserError("pass exactly one of --ckpt CHECKPOINT.ckpt or --model EXPORTED_DIR")
    if ckpt is not None:
        model, tok_json = load_checkpoint_model(ckpt)
    else:
        if not os.path.isfile(os.path.join(model_dir, "config.json")):
            raise UserError(f"'{model_dir}' is not an exported model (no config.json); run `pretrain export` first")
        model = GPT.from_pretrained(model_dir)
        exported = os.path.join(model_dir, "tokenizer.json")
        tok_json = open(exported).read() if os.path.isfile(exported) else None
    if tokenizer is not None:
        if not os.path.isfile(tokenizer):
            raise UserError(f"tokenizer '{tokenizer}' does not exist; pass the tokenizer.json beside the shards")
        tok_json = open(tokenizer).read()
    if tok_json is None:
        raise UserError(f"'{ckpt or model_dir}' carries no tokenizer; pass --tokenizer DATA_DIR/tokenizer.json "
                        "(the one beside the shards it was trained on)")
    return model, Tokenizer.from_str(tok_json)


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="pretrain generate", description=__doc__)
    p.add_argument("--ckpt", help="a checkpoint written by `pretrain fit` (e.g. runs/NAME/checkpoints/last.ckpt)")
    p.add_argument("--model", help="a directory written by `pretrain export` (config.json, model.safetensors)")
    p.add_argument("--tokenizer", help="tokenizer.json to use instead of the one the checkpoint carries")
    p.add_argument("--prompt", default="", help="text to continue (default: start from an end-of-document token)")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=50, help="sample among the k most likely tokens (0 = all)")
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    if args.max_new_tokens < 1 or args.temperature < 0 or args.top_k < 0 or args.num_samples < 1:
        raise UserError("--max-new-tokens and --num-samples must be >= 1, --temperature and --top-k >= 0")
    model, tok = load_model(args.ckpt, args.model, args.tokenizer)
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
