"""Hugging Face `transformers` model directories, both ways.

Export (`pretrain export CKPT OUT_DIR --format hf`): a checkpoint -> a directory that `transformers` loads with its Auto
classes as it is: config.json (HF's config of the matching architecture), model.safetensors (or, above
`--max-shard-size`, model-0000i-of-0000N.safetensors shards and model.safetensors.index.json), generation_config.json
and the tokenizer files (tokenizer.json, tokenizer_config.json, special_tokens_map.json: a PreTrainedTokenizerFast
with our special tokens). The tensors are renamed and reshaped one at a time as they are written, so the host holds
at most one (fused) tensor of the model at once.

Import (`--model.init_from hf:DIR`, a teacher `hf:DIR`, `pretrain generate --model DIR`): a local directory of a
supported architecture (safetensors, sharded or not) read as one of our checkpoints: `config_from_hf` gives our
model config, `import_tensors` our tensors under our names, each read lazily (`safetensors.safe_open`) only when it
is asked for (framework.checkpoint.reader opens it: kind "hf").

An architecture is one `Architecture` entry (`register_architecture`): its HF class and model_type, our family, the
config maps both ways (`to_hf` / `from_hf`; `unfit` says why a config of ours has no HF equivalent) and a table of
tensor rules. A rule ties one of our tensors to one or more of HF's by a named transform (`TRANSFORMS`): a fused q/k/v
is three of HF's. Adding an architecture (ViT, CLIP) is one more entry.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from framework.checkpoint.consolidate import TensorSource
from framework.checkpoint import hf_vision
from framework.checkpoint.safetensors_stream import DTYPES, save_safetensors
from framework.errors import UserError
from framework.models.registry import build_model, config_from_dict, family, is_hf_directory
from framework.models.transformer import CONFIG_FILE, LLAMA3_SCALING, WEIGHTS_FILE

HF_PREFIX = "hf:"  # `--model.init_from hf:DIR`
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILE = "tokenizer.json"
DEFAULT_MAX_SHARD = "5GB"  # save_pretrained's default
_FROM_SAFETENSORS = {name: dtype for dtype, name in DTYPES.items()}


class Unmappable(ValueError):
    """An HF config that none of our models computes; the message says what and why."""


# ---------------------------------------------------------------- tensor transforms
# Each is a pair: ours (one tensor) -> HF's (a list of tensors), and HF's -> ours. `c` is our model config.
def _qkv_sizes(c: Any) -> list[int]:
    """Rows of q, k and v in our fused c_attn: (n_head + 2 * kv_heads) * head_size, heads contiguous."""
    return [c.n_head * c.head_size, c.kv_heads * c.head_size, c.kv_heads * c.head_size]


def _pad_vocab(t: torch.Tensor, c: Any) -> torch.Tensor:
    """(V, C) -> (Vp, C): our table is padded to vocab_multiple; padding rows are zeros (never predicted)."""
    pad = c.padded_vocab_size - t.shape[0]
    return torch.cat((t, t.new_zeros(pad, *t.shape[1:]))) if pad > 0 else t


TRANSFORMS: dict[str, tuple[Callable[[torch.Tensor, Any], list[torch.Tensor]],
                            Callable[[list[torch.Tensor], Any], torch.Tensor]]] = {
    "copy": (lambda t, c: [t], lambda ts, c: ts[0]),
    # GPT-2's Conv1D keeps its weight as (in, out): x @ W + b; nn.Linear's is (out, in)
    "transpose": (lambda t, c: [t.t()], lambda ts, c: ts[0].t()),
    # only the first vocab_size rows: HF's logits then have exactly our width
    "vocab": (lambda t, c: [t[: c.vocab_size]], lambda ts, c: _pad_vocab(ts[0], c)),
    "qkv": (lambda t, c: list(t.split(_qkv_sizes(c))), lambda ts, c: torch.cat(ts)),
    # SwiGLU's c_fc is (2H, C): rows [gate; up]
    "gate_up": (lambda t, c: list(t.chunk(2)), lambda ts, c: torch.cat(ts)),
}


@dataclass(frozen=True)
class Rule:
    ours: str  # our tensor name; a placeholder ("{i}") stands for a block index (Architecture.blocks)
    theirs: tuple[str, ...]  # HF's tensor names, in the order the transform splits / fuses them
    transform: str = "copy"  # a key of TRANSFORMS


@dataclass(frozen=True)
class Architecture:
    name: str  # HF's model class, config.json `architectures[0]`
    hf_type: str  # HF's config.json `model_type`
    family: str  # our model_type
    prefix: str  # HF's base model prefix ("transformer.", "model."): a base-model save lacks it
    rules: tuple[Rule, ...]
    unfit: Callable[[Any], list[str]]  # our config -> what keeps it from this architecture (empty: it maps)
    to_hf: Callable[[Any, dict[str, int | None]], dict[str, Any]]  # our config, token ids -> HF config.json
    from_hf: Callable[[dict[str, Any]], dict[str, Any]]  # HF config.json -> our config dict (Unmappable if not)
    # the config whose model has every tensor HF stores: ours may leave some out that HF keeps (GPT-2's biases
    # without `bias`), exported as zeros, which compute what ours does
    complete: Callable[[Any], Any] = lambda c: c
    ignore: tuple[str, ...] = ()  # regexes of HF tensors that are no weights of the model (old buffers)
    # our config -> the count of each placeholder's blocks (a two-tower model would have one per tower)
    blocks: Callable[[Any], dict[str, int]] = lambda c: {"i": c.n_layer}

    def expand(self, config: Any) -> list[Rule]:
        """The rules with every placeholder replaced by each of its block indices, block by block (as HF orders its
        files: a shard holds whole blocks), the rules before the first block rule first and those after it last."""
        keyed: list[tuple[tuple[int, int, int], Rule]] = []
        after = 0
        for pos, r in enumerate(self.rules):
            keys = [k for k in self.blocks(config) if "{" + k + "}" in r.ours]
            if not keys:
                keyed.append(((2 * after, 0, pos), r))
                continue
            after = 1
            for key in keys:
                for i in range(self.blocks(config)[key]):
                    put = lambda name: name.replace("{" + key + "}", str(i))  # noqa: E731
                    keyed.append(((1, i, pos), Rule(put(r.ours), tuple(map(put, r.theirs)), r.transform)))
        return [r for _, r in sorted(keyed, key=lambda kr: kr[0])]


ARCHITECTURES: dict[str, Architecture] = {}


def register_architecture(arch: Architecture) -> Architecture:
    ARCHITECTURES[arch.name] = arch
    return arch


# ---------------------------------------------------------------- config helpers
def _need(cond: bool, why: str) -> None:
    if not cond:
        raise Unmappable(why)


def _ids(tokens: dict[str, int | None]) -> dict[str, int | None]:
    return {"bos_token_id": tokens.get("eod"), "eos_token_id": tokens.get("eod"), "pad_token_id": tokens.get("pad")}


# ---------------------------------------------------------------- GPT-2
def _needs(c: Any, **required: Any) -> list[str]:
    """The fields of config `c` that differ from what an architecture requires, said as the fix; a dense MLP always."""
    why = [f"{k}={v!r}" for k, v in required.items() if getattr(c, k) != v]
    return why + (["a dense MLP (no moe)"] if c.moe is not None else [])


def _gpt2_unfit(c: Any) -> list[str]:
    why = _needs(c, pos_embedding="learned", norm="layernorm")
    if c.mlp not in GPT2_ACT:
        why.append(f"mlp one of {', '.join(GPT2_ACT)}")
    if c.kv_heads != c.n_head:
        why.insert(3, "n_kv_head=n_head (no grouped-query attention)")
    return why


# our `mlp` -> GPT-2's activation_function (gelu_new: GELU's tanh form, ours by default; HF also reads
# gelu_pytorch_tanh as it)
GPT2_ACT = {"gelu": "gelu_new", "gelu_exact": "gelu", "quick_gelu": "quick_gelu"}


def _gpt2_to_hf(c: Any, tokens: dict[str, int | None]) -> dict[str, Any]:
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": c.vocab_size,
            "n_positions": c.seq_len, "n_ctx": c.seq_len, "n_embd": c.n_embd, "n_layer": c.n_layer,
            "n_head": c.n_head, "n_inner": None if c.mlp_hidden_size == 4 * c.n_embd else c.mlp_hidden_size,
            "activation_function": GPT2_ACT[c.mlp],
            "resid_pdrop": c.dropout, "embd_pdrop": c.dropout, "attn_pdrop": c.dropout,
            "layer_norm_epsilon": c.norm_eps, "initializer_range": 0.02,
            "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
            "tie_word_embeddings": c.tie_embeddings, "use_cache": True, **_ids(tokens)}


def _gpt2_from_hf(h: dict[str, Any]) -> dict[str, Any]:
    act = {"gelu_pytorch_tanh": "gelu_new"}.get(h.get("activation_function", "gelu_new"), h.get("activation_function"))
    mlps = {v: k for k, v in GPT2_ACT.items()}
    _need(act in mlps, f"activation_function={act!r} (our blocks compute {', '.join(mlps)})")
    _need(h.get("scale_attn_weights", True), "scale_attn_weights=false (ours scales by 1/sqrt(head size))")
    _need(not h.get("scale_attn_by_inverse_layer_idx", False), "scale_attn_by_inverse_layer_idx=true")
    _need(not h.get("add_cross_attention", False), "add_cross_attention=true (a decoder of an encoder-decoder)")
    C, inner = h.get("n_embd", 768), h.get("n_inner")
    return {"model_type": "gpt", "vocab_size": h.get("vocab_size", 50257), "seq_len": h.get("n_positions", 1024),
            "n_layer": h.get("n_layer", 12), "n_head": h.get("n_head", 12), "n_embd": C,
            "dropout": h.get("resid_pdrop", 0.1), "bias": True, "pos_embedding": "learned",
            "norm_eps": h.get("layer_norm_epsilon", 1e-5), "mlp_hidden": None if inner in (None, 4 * C) else inner,
            "mlp": mlps[act],
            "tie_embeddings": h.get("tie_word_embeddings", True)}


_GPT2_BLOCK = "transformer.h.{i}."
GPT2 = register_architecture(Architecture(
    name="GPT2LMHeadModel", hf_type="gpt2", family="gpt", prefix="transformer.",
    rules=(
        Rule("transformer.wte.weight", ("transformer.wte.weight",), "vocab"),
        Rule("transformer.wpe.weight", ("transformer.wpe.weight",)),
        *(Rule(_GPT2_BLOCK + n, (_GPT2_BLOCK + n,), "transpose" if n.endswith("weight") and "ln_" not in n else "copy")
          for n in ("ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight",
                    "attn.c_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
                    "mlp.c_proj.weight", "mlp.c_proj.bias")),
        Rule("transformer.ln_f.weight", ("transformer.ln_f.weight",)),
        Rule("transformer.ln_f.bias", ("transformer.ln_f.bias",)),
        Rule("lm_head.weight", ("lm_head.weight",), "vocab"),  # untied only
    ),
    unfit=_gpt2_unfit, to_hf=_gpt2_to_hf, from_hf=_gpt2_from_hf,
    complete=lambda c: dataclasses.replace(c, bias=True),  # GPT-2 always has biases: ours without are zeros
    ignore=(r"\.attn\.(masked_)?bias$",),  # the causal-mask buffers older GPT-2 files carry
))


# ---------------------------------------------------------------- Llama
def _llama_unfit(c: Any) -> list[str]:
    return _needs(c, pos_embedding="rope", norm="rmsnorm", mlp="swiglu")


def _llama_to_hf(c: Any, tokens: dict[str, int | None]) -> dict[str, Any]:
    theta, scaling = c.rope_theta, c.rope_scaling
    rope = {"rope_type": "default", "rope_theta": theta} if scaling is None else {**scaling, "rope_theta": theta}
    out = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": c.vocab_size,
           "hidden_size": c.n_embd, "intermediate_size": c.mlp_hidden_size, "num_hidden_layers": c.n_layer,
           "num_attention_heads": c.n_head, "num_key_value_heads": c.kv_heads, "head_dim": c.head_size,
           "hidden_act": "silu", "max_position_embeddings": c.seq_len, "rms_norm_eps": c.norm_eps,
           # transformers >= 5 reads rope_parameters; older releases rope_theta and rope_scaling
           "rope_parameters": rope, "rope_theta": theta, "rope_scaling": scaling,
           "attention_bias": c.bias, "mlp_bias": c.bias, "attention_dropout": c.dropout,
           "tie_word_embeddings": c.tie_embeddings, "initializer_range": 0.02, "use_cache": True,
           "pretraining_tp": 1, **_ids(tokens)}
    return out


def _llama_from_hf(h: dict[str, Any]) -> dict[str, Any]:
    act = h.get("hidden_act", "silu")
    _need(act == "silu", f"hidden_act={act!r} (ours is SwiGLU: silu)")
    C, nh = h.get("hidden_size", 4096), h.get("num_attention_heads", 32)
    head_dim = h.get("head_dim") or C // nh
    _need(head_dim * nh == C, f"head_dim={head_dim} with {nh} heads of hidden_size {C} (ours: head size = "
          "hidden_size / heads)")
    _need(bool(h.get("attention_bias", False)) == bool(h.get("mlp_bias", False)),
          "attention_bias != mlp_bias (ours has one `bias` for both)")
    # transformers >= 5: rope_parameters {rope_type, rope_theta, ...}; older files: rope_theta + rope_scaling
    rope = dict(h.get("rope_parameters") or h.get("rope_scaling") or {})
    kind = rope.get("rope_type", rope.get("type", "default"))
    _need(kind in ("default", "llama3"), f"rope type {kind!r} (ours: default and llama3)")
    scaling = None
    if kind == "llama3":
        missing = [k for k in LLAMA3_SCALING if k not in rope]
        _need(not missing, f"llama3 rope scaling without {', '.join(missing)}")
        scaling = {"rope_type": "llama3", **{k: rope[k] for k in LLAMA3_SCALING}}
    kv = h.get("num_key_value_heads") or nh
    return {"model_type": "gpt", "vocab_size": h.get("vocab_size", 32000),
            "seq_len": h.get("max_position_embeddings", 2048), "n_layer": h.get("num_hidden_layers", 32),
            "n_head": nh, "n_embd": C, "dropout": h.get("attention_dropout", 0.0) or 0.0,
            "bias": bool(h.get("attention_bias", False)), "pos_embedding": "rope", "norm": "rmsnorm",
            "norm_eps": h.get("rms_norm_eps", 1e-6), "mlp": "swiglu", "mlp_hidden": h.get("intermediate_size", 11008),
            "n_kv_head": None if kv == nh else kv,
            "rope_theta": float(rope.get("rope_theta", h.get("rope_theta", 10000.0))),
            "rope_scaling": scaling, "tie_embeddings": bool(h.get("tie_word_embeddings", False))}


_LLAMA_BLOCK, _HF_LLAMA = "transformer.h.{i}.", "model.layers.{i}."
LLAMA = register_architecture(Architecture(
    name="LlamaForCausalLM", hf_type="llama", family="gpt", prefix="model.",
    rules=(
        Rule("transformer.wte.weight", ("model.embed_tokens.weight",), "vocab"),
        Rule(_LLAMA_BLOCK + "ln_1.weight", (_HF_LLAMA + "input_layernorm.weight",)),
        *(Rule(_LLAMA_BLOCK + f"attn.c_attn.{p}", tuple(_HF_LLAMA + f"self_attn.{x}_proj.{p}" for x in "qkv"), "qkv")
          for p in ("weight", "bias")),
        *(Rule(_LLAMA_BLOCK + f"attn.c_proj.{p}", (_HF_LLAMA + f"self_attn.o_proj.{p}",)) for p in ("weight", "bias")),
        Rule(_LLAMA_BLOCK + "ln_2.weight", (_HF_LLAMA + "post_attention_layernorm.weight",)),
        *(Rule(_LLAMA_BLOCK + f"mlp.c_fc.{p}", (_HF_LLAMA + f"mlp.gate_proj.{p}", _HF_LLAMA + f"mlp.up_proj.{p}"),
               "gate_up") for p in ("weight", "bias")),
        *(Rule(_LLAMA_BLOCK + f"mlp.c_proj.{p}", (_HF_LLAMA + f"mlp.down_proj.{p}",)) for p in ("weight", "bias")),
        Rule("transformer.ln_f.weight", ("model.norm.weight",)),
        Rule("lm_head.weight", ("lm_head.weight",), "vocab"),  # untied only
    ),
    unfit=_llama_unfit, to_hf=_llama_to_hf, from_hf=_llama_from_hf,
    ignore=(r"rotary_emb\.inv_freq$",),  # a buffer older Llama files carry
))

# families with no HF architecture here, and why (a one-line refusal names it)
NO_MATCH = {
    "bert": "every Hugging Face BERT-family encoder (BERT, RoBERTa, RobertaPreLayerNorm) normalizes the summed "
            "embeddings with a LayerNorm that ours does not have, and BERT and RoBERTa are post-LayerNorm where ours "
            "is pre-LayerNorm, so none computes our encoder",
    "classifier": "a fine-tuned classifier's head and pooling have no Hugging Face class here; export its backbone's "
                  "pre-trained checkpoint instead, or use this framework's format",
}


# ---------------------------------------------------------------- choosing an architecture
def _tied(config: Any) -> tuple[str, ...]:
    return family(config.model_type).tied_in(config)


def architecture_for(config: Any) -> Architecture | None:
    """The HF architecture that computes our model of `config`; UserError saying what does not map otherwise. The
    image families (ViT, CLIP) are mapped by framework.checkpoint.hf_vision: None for them."""
    if config.model_type in hf_vision.HF_CLASS:
        hf_vision.check_exportable(config)
        return None
    candidates = [a for a in ARCHITECTURES.values() if a.family == config.model_type]
    if not candidates:
        why = NO_MATCH.get(config.model_type, "no Hugging Face architecture is mapped for it")
        raise UserError(f"a {config.model_type!r} model cannot be exported with --format hf: {why}; export it "
                        "without --format hf")
    reasons = []
    for arch in candidates:
        unfit = arch.unfit(config)
        if not unfit:
            return arch
        reasons.append(f"{arch.name} needs {', '.join(unfit)}")
    raise UserError(f"this {config.model_type!r} model matches no Hugging Face architecture exactly "
                    f"({'; '.join(reasons)}), so transformers would compute another function; export it without "
                    "--format hf, or train with one of those configurations")


def architecture_of(hf_config: dict[str, Any], where: str) -> Architecture:
    names = hf_config.get("architectures") or []
    known = [ARCHITECTURES[n] for n in names if n in ARCHITECTURES]
    if not known:  # a base-model save (GPT2Model, LlamaModel): its model_type still says which
        known = [a for a in ARCHITECTURES.values() if a.hf_type == hf_config.get("model_type")]
    if not known:
        found = ", ".join(names) or f"model_type {hf_config.get('model_type')!r}"
        raise UserError(f"'{where}' holds a Hugging Face {found}, which this framework cannot load; supported: "
                        f"{', '.join(ARCHITECTURES)}")
    return known[0]


# ---------------------------------------------------------------- shapes without weights
def _meta_shapes(config: Any) -> dict[str, tuple[int, ...]]:
    """Our model's tensors (tied aliases left out) and their shapes, from a model built on the meta device."""
    with torch.device("meta"):
        state = build_model(config).state_dict()
    tied = _tied(config)
    return {k: tuple(v.shape) for k, v in state.items() if k not in tied}


def _split(source: TensorSource, names: tuple[str, ...], transform: str, config: Any) -> list[TensorSource]:
    """HF's tensors `names` made from our `source`, read once for all of them (they are written one after the
    other: a fused q/k/v is read once, not three times)."""
    to_hf = TRANSFORMS[transform][0]
    shapes = [tuple(t.shape) for t in to_hf(torch.empty(source.shape, dtype=source.dtype, device="meta"), config)]
    cache: dict[str, Any] = {}

    def load(k: int) -> torch.Tensor:
        if "parts" not in cache:
            cache["parts"], cache["left"] = to_hf(source.load(), config), set(range(len(names)))
        part = cache["parts"][k].contiguous()
        cache["left"].discard(k)
        if not cache["left"]:
            cache.clear()
        return part

    return [TensorSource(n, s, source.dtype, lambda k=k: load(k)) for k, (n, s) in enumerate(zip(names, shapes))]


# ---------------------------------------------------------------- export
def export_tensors(arch: Architecture, config: Any, sources: list[TensorSource]) -> list[TensorSource]:
    """Our tensors (tied aliases left out) -> HF's, in HF's names and layouts, each read when it is written."""
    ours = {s.name: s for s in sources}
    full = arch.complete(config)
    shapes = _meta_shapes(full)
    dtype = next(iter(ours.values())).dtype
    out, used = [], set()
    for rule in arch.expand(config):
        if rule.ours not in shapes:
            continue
        source = ours.get(rule.ours)
        if source is None:  # HF stores it, ours computes it as zero (GPT-2's biases of a bias-free model)
            source = TensorSource(rule.ours, shapes[rule.ours], dtype,
                                  lambda s=shapes[rule.ours]: torch.zeros(s, dtype=dtype))
        used.add(rule.ours)
        out += _split(source, rule.theirs, rule.transform, full)
    left = sorted(set(ours) - used)
    if left:
        raise UserError(f"tensors {', '.join(left[:3])} have no place in a {arch.name}; export without --format hf")
    return out


def parse_size(text: str | int) -> int:
    """'5GB', '500MB', '2GiB', '1000' (bytes) -> bytes. As save_pretrained: GB = 10^9, GiB = 2^30."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise UserError(f"bad --max-shard-size {text!r}; use e.g. 5GB, 500MB or a number of bytes")
    unit = (m.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    size = int(float(m.group(1)) * scale)
    if size < 1:
        raise UserError(f"--max-shard-size {text!r} must be at least one byte")
    return size


def write_weights(out: Path, sources: list[TensorSource], max_shard_size: int) -> list[str]:
    """model.safetensors, or shards of at most `max_shard_size` bytes each (a larger tensor alone in one) and
    model.safetensors.index.json, as save_pretrained writes them; returns the file names."""
    shards: list[list[TensorSource]] = [[]]
    size = 0
    for s in sources:
        if shards[-1] and size + s.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += s.nbytes
    if len(shards) == 1:
        save_safetensors(out / WEIGHTS_FILE, shards[0], metadata={"format": "pt"})
        return [WEIGHTS_FILE]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        save_safetensors(out / name, shard, metadata={"format": "pt"})
    index = {"metadata": {"total_size": sum(s.nbytes for s in sources)},
             "weight_map": {s.name: name for name, shard in zip(names, shards) for s in shard}}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return [*names, INDEX_FILE]


def write_tokenizer(out: Path, tokenizer_json: str, specials: dict[str, str], seq_len: int) -> dict[str, int]:
    """tokenizer.json as it is, plus what makes AutoTokenizer load it as a PreTrainedTokenizerFast with our special
    tokens (`specials`: our name -> token, framework.data.tokenizer.SPECIAL_TOKENS); returns our name -> id."""
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_str(tokenizer_json).get_vocab(with_added_tokens=True)
    ids = {name: vocab[token] for name, token in specials.items() if token in vocab}
    roles = {"bos_token": "eod", "eos_token": "eod", "pad_token": "pad", "mask_token": "mask", "cls_token": "cls",
             "sep_token": "sep"}
    tokens = {role: specials[name] for role, name in roles.items() if name in ids}
    (out / TOKENIZER_FILE).write_text(tokenizer_json)
    # split_special_tokens: a literal "<|endoftext|>" in text is text, as our tokenizer encodes it
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **tokens, "model_max_length": seq_len,
              "split_special_tokens": True, "clean_up_tokenization_spaces": False, "add_bos_token": False,
              "add_eos_token": False}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(tokens, indent=2) + "\n")
    return ids


def write_export(out: Path, config: Any, sources: list[TensorSource], tokenizer_json: str | None,
                 specials: dict[str, str], max_shard_size: int) -> dict[str, Any]:
    """Write the HF directory into `out` (an empty directory); returns {architecture, files, tensors, bytes}.
    `specials`: our special tokens by name (eod, pad, mask, cls, sep)."""
    arch = architecture_for(config)
    if arch is None:  # an image model
        return _write_image_export(out, config, sources, tokenizer_json, specials, max_shard_size)
    hf_sources = export_tensors(arch, config, sources)
    files = write_weights(out, hf_sources, max_shard_size)
    tokens = write_tokenizer(out, tokenizer_json, specials, config.seq_len) if tokenizer_json is not None else {}
    # the dtype the weights are stored in (our checkpoints keep fp32 master weights: float32)
    dtypes = {str(s.dtype).removeprefix("torch.") for s in hf_sources}
    hf_config = {**arch.to_hf(config, tokens), "torch_dtype": dtypes.pop() if len(dtypes) == 1 else "float32"}
    (out / CONFIG_FILE).write_text(json.dumps(hf_config, indent=2) + "\n")
    generation = {k: hf_config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")
                  if hf_config.get(k) is not None}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    return {"architecture": arch.name, "files": files, "tensors": len(hf_sources),
            "bytes": sum(s.nbytes for s in hf_sources)}


def _write_image_export(out: Path, config: Any, sources: list[TensorSource], tokenizer_json: str | None,
                        specials: dict[str, str], max_shard_size: int) -> dict[str, Any]:
    """A ViTForImageClassification or CLIPModel directory (framework.checkpoint.hf_vision); a CLIP's caption
    tokenizer beside it."""
    hf_sources = hf_vision.export_tensors(config, sources)
    files = write_weights(out, hf_sources, max_shard_size)
    if tokenizer_json is not None and config.model_type == "clip":  # appends eod to a caption, as ours frames it
        write_tokenizer(out, hf_vision.caption_tokenizer_json(tokenizer_json, specials["eod"]), specials,
                        config.text["seq_len"])
    (out / CONFIG_FILE).write_text(json.dumps(hf_vision.hf_config(config), indent=2) + "\n")
    return {"architecture": hf_vision.HF_CLASS[config.model_type], "files": files, "tensors": len(hf_sources),
            "bytes": sum(s.nbytes for s in hf_sources)}


# ---------------------------------------------------------------- import
def hf_directory(path: str) -> str | None:
    """The directory `path` names when it is a Hugging Face model: `hf:DIR`, or a directory whose config.json is
    HF's (it names its `architectures`, which ours never does); None otherwise."""
    if path.startswith(HF_PREFIX):
        d = path[len(HF_PREFIX):]
        if not os.path.isfile(os.path.join(d, CONFIG_FILE)):
            raise UserError(f"'{d}' is not a Hugging Face model directory (it has no {CONFIG_FILE}); pass hf:DIR with "
                            "the directory save_pretrained wrote")
        return d
    return path if is_hf_directory(path) else None


def read_hf_config(directory: str) -> dict[str, Any]:
    try:
        with open(os.path.join(directory, CONFIG_FILE)) as f:
            return json.load(f)
    except ValueError as e:
        raise UserError(f"'{directory}/{CONFIG_FILE}' is not valid JSON ({e})") from None


def config_from_hf(directory: str) -> dict[str, Any]:
    """Our model config dict (a GPT's) of the HF model in `directory`; UserError when it does not map."""
    hf_config = read_hf_config(directory)
    if hf_config.get("model_type") in hf_vision.HF_CLASS:  # an image model
        try:
            return hf_vision.our_config(hf_config)
        except UserError as e:
            raise UserError(f"'{directory}': {e}") from None
    arch = architecture_of(hf_config, directory)
    try:
        values = arch.from_hf(hf_config)
        config_from_dict(values)  # our own checks, now: one line naming the field
    except (Unmappable, TypeError, ValueError) as e:
        raise UserError(f"the Hugging Face {arch.name} in '{directory}' does not map onto this framework's "
                        f"{arch.family!r} model: {e}") from None
    return values


def hf_files(directory: str) -> dict[str, TensorSource]:
    """HF's tensors in `directory` (model.safetensors, or the shards its index names), each read when asked for."""
    from safetensors import safe_open

    index = os.path.join(directory, INDEX_FILE)
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f).get("weight_map", {}).values()))
    elif os.path.isfile(os.path.join(directory, WEIGHTS_FILE)):
        files = [WEIGHTS_FILE]
    elif any(n.endswith(".bin") for n in os.listdir(directory)):
        raise UserError(f"'{directory}' holds pickled pytorch_model*.bin weights; only safetensors are read: re-save "
                        "it with save_pretrained (safetensors is its default)")
    else:
        raise UserError(f"'{directory}' has a config.json but no {WEIGHTS_FILE} or {INDEX_FILE}")
    out: dict[str, TensorSource] = {}
    for name in files:
        file = os.path.join(directory, name)
        if not os.path.isfile(file):
            raise UserError(f"'{directory}/{INDEX_FILE}' names shard {name}, which is missing; copy the whole "
                            "directory")

        def read(key: str, file: str = file) -> torch.Tensor:
            with safe_open(file, framework="pt") as f:
                return f.get_tensor(key)

        with safe_open(file, framework="pt") as f:
            for key in f.keys():
                s = f.get_slice(key)
                if key in out:
                    raise UserError(f"tensor {key} is in two shards of '{directory}'; the files are damaged")
                out[key] = TensorSource(key, tuple(s.get_shape()), _FROM_SAFETENSORS[s.get_dtype()],
                                        lambda k=key, read=read: read(k))
    return out


def import_tensors(directory: str, values: dict[str, Any]) -> list[TensorSource]:
    """Our tensors (tied aliases left out) of the HF model in `directory`, whose our config is `values`: renamed,
    transposed, q/k/v and gate/up fused, the vocabulary padded with zero rows; each read when it is asked for."""
    hf_config = read_hf_config(directory)
    if hf_config.get("model_type") in hf_vision.HF_CLASS:  # an image model
        return hf_vision.import_tensors(hf_config, list(hf_files(directory).values()))
    arch = architecture_of(hf_config, directory)
    config = config_from_dict(values)
    theirs = hf_files(directory)
    if not any(n.startswith(arch.prefix) for n in theirs):  # a base-model save: names without the prefix
        theirs = {(n if n.startswith("lm_head.") else arch.prefix + n): s for n, s in theirs.items()}
    # No model is built to learn our names and shapes: this runs inside ZeRO-3's zero.Init, where building one would
    # partition it (with collectives). Our model has a rule's tensor unless it is tied to another, and has every bias
    # exactly when its config has `bias`; the shapes follow from HF's, and the reader's caller checks them against
    # the model it fills (init_from.load_weights, load.hf_model).
    tied = _tied(config)
    out, used = [], set()
    for rule in arch.expand(config):
        if rule.ours in tied or (rule.ours.endswith(".bias") and not config.bias):
            continue
        missing = [n for n in rule.theirs if n not in theirs]
        if missing:
            raise UserError(f"'{directory}' lacks tensor {missing[0]}, which its config.json implies; the files are "
                            "incomplete or of another model")
        parts = [theirs[n] for n in rule.theirs]
        from_hf = TRANSFORMS[rule.transform][1]
        try:
            shape = tuple(from_hf([torch.empty(p.shape, device="meta") for p in parts], config).shape)
        except RuntimeError:  # parts that do not fuse (q, k, v of other widths)
            raise UserError(f"tensors {', '.join(rule.theirs)} of '{directory}' have shapes "
                            f"{', '.join(str(p.shape) for p in parts)}, which do not fit together") from None
        used.update(rule.theirs)
        out.append(TensorSource(rule.ours, shape, parts[0].dtype,
                                lambda parts=parts, f=from_hf: f([p.load() for p in parts], config).contiguous()))
    ignore = [re.compile(p) for p in arch.ignore]
    # a file may keep the tied head's copy: the same matrix as the embedding
    left = sorted(n for n in set(theirs) - used if not any(p.search(n) for p in ignore)
                  and not ("lm_head.weight" in tied and n == "lm_head.weight"))
    if left:
        raise UserError(f"'{directory}' has tensors that its config.json's {arch.name} does not have "
                        f"({', '.join(left[:3])}{' ...' if len(left) > 3 else ''}); this framework cannot place them")
    return out


def tokenizer_json(directory: str) -> str | None:
    file = os.path.join(directory, TOKENIZER_FILE)
    return open(file).read() if os.path.isfile(file) else None
