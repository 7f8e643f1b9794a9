"""`pretrain export CKPT OUT_DIR`: any training checkpoint -> a model directory for inference and fine-tuning.

    OUT_DIR/model.safetensors   the full weights (fp32 master weights for DeepSpeed), tied output matrix stored once
    OUT_DIR/config.json         the model config, with its `model_type` (gpt, bert)
    OUT_DIR/tokenizer.json      the tokenizer the model was trained with (when the checkpoint carries it)

The same files as the models' `save_pretrained`, so `framework.models.from_pretrained(OUT_DIR)` (or
`GPT.from_pretrained`, `Encoder.from_pretrained`), `pretrain generate --model OUT_DIR` (GPT) and
`pretrain fill-mask --model OUT_DIR` (encoder) load them.
With `--format hf` OUT_DIR is instead a directory Hugging Face `transformers` loads with its Auto classes (GPT-2's
block as GPT2LMHeadModel, the Llama-style block as LlamaForCausalLM; framework.checkpoint.hf describes the files and
what maps), its weights sharded above `--max-shard-size`.
CKPT is any checkpoint `pretrain fit` writes: a .ckpt file (DDP, one process), a torch.distributed.checkpoint
directory (FSDP2) or a DeepSpeed ZeRO-1/2/3 directory, on any number of ranks; `last.ckpt` works too. No process group
and no GPU are needed, and the weights are streamed tensor by tensor from the (memory-mapped) checkpoint into the
output file (framework.checkpoint.reader), so the host never holds the whole model. A linear or LoRA fine-tune's
.ckpt holds only its trained tensors; the frozen rest is read from the pre-trained source it records
(framework.checkpoint.reader.frozen_sources). OUT_DIR appears complete or not at all: it is written under a
temporary name beside it and renamed into place.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from framework.checkpoint import hf
from framework.checkpoint.consolidate import TensorSource
from framework.checkpoint.reader import TOKENIZER_FILE, Checkpoint
from framework.checkpoint.safetensors_stream import save_safetensors, total_bytes
from framework.data.tokenizer import SPECIAL_TOKENS
from framework.errors import UserError
from framework.models.registry import build_model, config_from_dict, family
from framework.models.transformer import CONFIG_FILE, WEIGHTS_FILE, TransformerConfig

FORMATS = ("ours", "hf")


def export(ckpt: str | os.PathLike, out_dir: str | os.PathLike, overwrite: bool = False, format: str = "ours",
           max_shard_size: str | int = hf.DEFAULT_MAX_SHARD) -> dict:
    """Write OUT_DIR from CKPT (see the module docstring); returns a summary. UserError on bad input.
    `format` "hf": a Hugging Face transformers directory instead (framework.checkpoint.hf), its weights in shards of
    at most `max_shard_size` ("5GB", "500MB", bytes)."""
    if format not in FORMATS:
        raise UserError(f"unknown export format {format!r}; use one of {', '.join(FORMATS)}")
    shard_bytes = hf.parse_size(max_shard_size)
    ckpt, out = os.fspath(ckpt), Path(out_dir)
    checkpoint = Checkpoint(ckpt, exports=False)  # a missing path or a directory that is no checkpoint -> UserError
    meta = checkpoint.checked_meta()
    _check_out_dir(out, overwrite)
    try:
        config = config_from_dict(dict(meta["model_config"]))
    except (TypeError, ValueError) as e:
        raise UserError(f"checkpoint '{ckpt}' has a model_config this framework cannot read ({e})") from None
    sources = [s for s in checkpoint.tensors() if s.name not in family(config.model_type).tied_in(config)]
    _check_matches(ckpt, config, sources)
    if family(config.model_type).adapters and config.lora_rank:  # exported as a plain model: adapters merged in
        sources, config = _merge_lora(sources, config)
    if format == "hf":
        hf.architecture_for(config)  # one line now, before anything is read, when transformers has no match

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.export-tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        tokenizer = meta.get("tokenizer_json")
        if format == "hf":
            written = hf.write_export(tmp, config, sources, tokenizer, SPECIAL_TOKENS, shard_bytes)
        else:
            save_safetensors(tmp / WEIGHTS_FILE, sources, metadata={"format": "pt"})
            (tmp / CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=2) + "\n")
            if tokenizer is not None:
                (tmp / TOKENIZER_FILE).write_text(tokenizer)
            written = {"architecture": None, "files": [WEIGHTS_FILE], "bytes": total_bytes(sources)}
        _replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"kind": checkpoint.kind, "model_type": config.model_type, "step": meta.get("global_step"), "tensors": len(sources),
            "parameters": sum(int(torch.Size(s.shape).numel()) for s in sources), "bytes": written["bytes"],
            "tokenizer": tokenizer is not None, "out": str(out), "format": format,
            "architecture": written["architecture"], "files": written["files"]}


def _check_out_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"output '{out}' exists and is not a directory; pass a directory path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"output directory '{out}' is not empty; pass --overwrite to replace it, or another OUT_DIR")


def _check_matches(ckpt: str, config: TransformerConfig, sources: list[TensorSource]) -> None:
    """The weights must be exactly the parameters of the model that the checkpoint's model_config describes."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in build_model(config).state_dict().items()
                    if k not in family(config.model_type).tied_in(config)}
    got = {s.name: s.shape for s in sources}
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    wrong = sorted(k for k in set(got) & set(expected) if got[k] != expected[k])
    if missing or unexpected or wrong:
        detail = "; ".join(f"{what}: {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}" for what, names in
                           (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if names)
        raise UserError(f"the weights in '{ckpt}' do not match its model_config ({detail}); the checkpoint is "
                        f"damaged or was not written by `pretrain fit` of a {config.model_type!r} model")


def _merge_lora(sources: list[TensorSource], config: Any) -> tuple[list[TensorSource], Any]:
    """Each adapted weight becomes W + (alpha / r) B A, read one tensor (and its two adapters) at a time."""
    import dataclasses

    from framework.models.classifier import lora_scale, merged

    by_name = {s.name: s for s in sources}
    scale = lora_scale(config)

    def merge(s: TensorSource) -> TensorSource:
        base = s.name[: -len(".weight")]
        if base + ".lora_A" not in by_name:
            return s
        A, B = by_name[base + ".lora_A"], by_name[base + ".lora_B"]
        return TensorSource(s.name, s.shape, s.dtype, lambda: merged(s.load(), A.load(), B.load(), scale))

    out = [merge(s) for s in sources if ".lora_" not in s.name]
    return out, dataclasses.replace(config, lora_rank=0)


def _replace_dir(src: Path, dst: Path) -> None:
    """Move the finished directory `src` to `dst`, replacing whatever `dst` was only once `src` is in place."""
    old = None
    if dst.exists():
        old = dst.parent / f".{dst.name}.export-old-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)
    try:
        os.replace(src, dst)
    except BaseException:
        if old is not None:
            os.replace(old, dst)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
