"""`pretrain generate`: sample text from a GPT's training checkpoint or exported model directory.

`load_model` is shared with `pretrain fill-mask`: it loads any family and checks it is the one the command needs.
"""

from __future__ import annotations

import argparse
import os

import torch

from framework.data.tokenizer import Tokenizer
from framework.checkpoint.formats import trust_checkpoint
from framework.errors import UserError
from framework.models import TIED, build_model, config_from_dict, model_type_of
from framework.models.gpt import GPT


def load_checkpoint_model(path: str, model_type: str | None = None) -> tuple[torch.nn.Module, str | None]:
    """The model and its tokenizer JSON (None if the checkpoint carries none) from any `pretrain fit` checkpoint: a
    .ckpt file, or a sharded FSDP2 / DeepSpeed directory, consolidated here on CPU (framework.checkpoint.consolidate).
    With `model_type`, a checkpoint of another family is one clear UserError, before any weight is read."""
    from framework.checkpoint.consolidate import checkpoint_meta, load_state_dict

    meta = checkpoint_meta(path)  # UserError for a missing path or a file that is not one of our checkpoints
    _check_type(model_type_of(meta["model_config"]), model_type, path)
    config = config_from_dict(meta["model_config"])
    tied = TIED[config.model_type]
    with torch.device("meta"):
        model = build_model(config)
    state = {k: v for k, v in load_state_dict(path).items() if k not in tied}  # tied to transformer.wte
    result = model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    missing = [k for k in result.missing_keys if k not in tied]
    if missing or result.unexpected_keys:
        raise UserError(f"the weights in '{path}' do not match its model_config (missing {missing[:3]}, unexpected "
                        f"{result.unexpected_keys[:3]}); the checkpoint is damaged")
    return model, meta.get("tokenizer_json")


COMMAND_OF = {"gpt": "generate", "bert": "fill-mask"}


def _check_type(found: str, expected: str | None, path: str) -> None:
    if expected is not None and found != expected:
        raise UserError(f"'{path}' holds a {found!r} model, but this command works with {expected!r} models; "
                        f"use `pretrain {COMMAND_OF.get(found, 'export')}` for it")


def load_model(ckpt: str | None, model_dir: str | None, tokenizer: str | None,
               model_type: str | None = None) -> tuple[torch.nn.Module, Tokenizer]:
    """The model and tokenizer named on the command line, of the family `model_type` when given; a missing tokenizer
    or another family is a UserError saying what to do."""
    if (ckpt is None) == (model_dir is None):
        raise UserError("pass exactly one of --ckpt CHECKPOINT or --model EXPORTED_DIR")
    if ckpt is not None:
        model, tok_json = load_checkpoint_model(ckpt, model_type)
    else:
        config_file = os.path.join(model_dir, "config.json")
        if not os.path.isfile(config_file):
            raise UserError(f"'{model_dir}' is not an exported model (no config.json); run `pretrain export` first")
        import json

        from framework.models import from_pretrained

        with open(config_file) as f:
            _check_type(model_type_of(json.load(f)), model_type, model_dir)
        model = from_pretrained(model_dir)
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


def add_model_arguments(p: argparse.ArgumentParser, of: str) -> None:
    """--ckpt, --model, --tokenizer and --trust-checkpoint: where a command's model (`of` what kind) comes from,
    as `load_model` takes them."""
    p.add_argument("--ckpt", help=f"a checkpoint of `pretrain fit` of {of}, any strategy "
                   "(e.g. runs/NAME/checkpoints/last.ckpt)")
    p.add_argument("--model", help="a directory written by `pretrain export` from such a checkpoint")
    p.add_argument("--tokenizer", help="tokenizer.json to use instead of the one the checkpoint carries")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="unpickle the checkpoint fully (only for files from a trusted source; default: weights-only)")


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
