"""A model and its tokenizer from a training checkpoint (any strategy's layout), an exported model directory or a
Hugging Face one (framework.checkpoint.hf), checked to be of the family a caller needs: what `pretrain generate`,
`fill-mask` and `zero-shot` load."""

from __future__ import annotations

import os

import torch

from framework.checkpoint.hf import HF_PREFIX
from framework.checkpoint.reader import Checkpoint, is_export
from framework.data.tokenizer import Tokenizer
from framework.errors import UserError
from framework.models.registry import build_model, config_from_dict, family, from_pretrained, model_type_of


def load_checkpoint_model(path: str, model_type: str | None = None) -> tuple[torch.nn.Module, str | None]:
    """The model and its tokenizer JSON (None if the checkpoint carries none) from any `pretrain fit` checkpoint: a
    .ckpt file, or a sharded FSDP2 / DeepSpeed directory, consolidated here on CPU (framework.checkpoint.reader).
    With `model_type`, a checkpoint of another family is one clear UserError, before any weight is read."""
    checkpoint = Checkpoint(path, exports=False)  # UserError for a missing path or a file that is not a checkpoint
    values = checkpoint.model_config  # UserError for a checkpoint that is not one of ours
    _check_type(model_type_of(values), model_type, path)
    config = config_from_dict(values)
    tied = family(config.model_type).tied_in(config)
    with torch.device("meta"):
        model = build_model(config)
    state = {k: v for k, v in checkpoint.state_dict().items() if k not in tied}  # tied to transformer.wte
    result = model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    missing = [k for k in result.missing_keys if k not in tied]
    if missing or result.unexpected_keys:
        raise UserError(f"the weights in '{path}' do not match its model_config (missing {missing[:3]}, unexpected "
                        f"{result.unexpected_keys[:3]}); the checkpoint is damaged")
    return model, checkpoint.tokenizer_json


def hf_model(checkpoint: Checkpoint) -> torch.nn.Module:
    """Our model holding the weights of a Hugging Face directory (framework.checkpoint.hf maps them)."""
    with torch.device("meta"):
        model = build_model(config_from_dict(checkpoint.model_config))
    state = checkpoint.state_dict()
    want = model.state_dict()
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(want[k].shape)}" for k, v in state.items()
             if k in want and v.shape != want[k].shape]
    if wrong:
        raise UserError(f"the weights in '{checkpoint.path}' do not fit its config.json ({'; '.join(wrong[:3])})")
    result = model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()  # assign=True replaced the embedding: point a tied head at it again
    missing = [k for k in result.missing_keys if k not in model.tied_weights]
    if missing or result.unexpected_keys:  # framework.checkpoint.hf maps every tensor or refuses
        raise UserError(f"the weights in '{checkpoint.path}' do not match its config.json (missing {missing[:3]}, "
                        f"unexpected {result.unexpected_keys[:3]})")
    return model


def _check_type(found: str, expected: str | None, path: str) -> None:
    if expected is not None and found != expected:
        raise UserError(f"'{path}' holds a {found!r} model, but this command works with {expected!r} models; "
                        f"use `pretrain {family(found).command or 'export'}` for it")


def load_model(ckpt: str | None, model_dir: str | None, tokenizer: str | None,
               model_type: str | None = None) -> tuple[torch.nn.Module, Tokenizer]:
    """The model and tokenizer named on the command line, of the family `model_type` when given; a missing tokenizer
    or another family is a UserError saying what to do."""
    if (ckpt is None) == (model_dir is None):
        raise UserError("pass exactly one of --ckpt CHECKPOINT or --model EXPORTED_DIR")
    if ckpt is not None:
        model, tok_json = load_checkpoint_model(ckpt, model_type)
    else:
        if not model_dir.startswith(HF_PREFIX) and not is_export(model_dir):
            raise UserError(f"'{model_dir}' is not an exported model (no config.json); run `pretrain export` first")
        exported = Checkpoint(model_dir)
        _check_type(model_type_of(exported.model_config), model_type, model_dir)
        model = hf_model(exported) if exported.kind == "hf" else from_pretrained(model_dir)
        tok_json = exported.tokenizer_json
    if tokenizer is not None:
        if not os.path.isfile(tokenizer):
            raise UserError(f"tokenizer '{tokenizer}' does not exist; pass the tokenizer.json beside the shards")
        tok_json = open(tokenizer).read()
    if tok_json is None:
        raise UserError(f"'{ckpt or model_dir}' carries no tokenizer; pass --tokenizer DATA_DIR/tokenizer.json "
                        "(the one beside the shards it was trained on)")
    return model, Tokenizer.from_str(tok_json)
