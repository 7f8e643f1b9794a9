"""Hugging Face `transformers` image models, both ways: our ViT <-> `ViTForImageClassification`, our CLIP <->
`CLIPModel`. Pure mapping, no files: config dicts both ways (`hf_config`, `our_config`) and tensors both ways
(`export_tensors`, `import_tensors`) over consolidate.TensorSource, each tensor renamed and reshaped lazily when it is
read, so a writer holds one (fused) tensor at a time. framework.checkpoint.hf writes and reads the directories.

What maps, exactly (the same function in fp32, checked against transformers in tests/test_hf_vision.py):
- a ViT classifier with cls pooling and no ln_pre: HF's ViT is the same pre-LN encoder with a cls token and learned
  positions, classifying the final-LayerNorm'd cls token;
- a CLIP whose image tower is such a ViT with `ln_pre` (CLIPModel's `pre_layrnorm`) and whose text tower is a GPT
  (causal, learned positions, LayerNorm, GELU MLP): CLIPModel pools the text at the first `eos_token_id`, ours at the
  eod that ends the caption (caption tokens, then eod, then padding).
- The MLP activation and LayerNorm eps are config fields on both sides (`mlp`: our tanh GELU is HF's
  `gelu_pytorch_tanh`, `gelu_exact` its `gelu`, `quick_gelu` OpenAI's CLIP's), so public checkpoints (Google's ViT:
  erf GELU, eps 1e-12; OpenAI's CLIP: quick_gelu) import as they are. Where our model has no bias, HF's
  (always present) are zeros; our patch-projection bias, which CLIPModel lacks, is added to position rows 1..N (the
  same sum); our vocabulary-padded token table is cut to vocab_size rows (padded with zero rows on import); CLIP's
  logit scale is exported capped at log(max_logit_scale), the value our forward uses.

What does not map is refused in one line that says why (`UserError`): mean pooling (both HF classes pool the cls
token), a ViT without a head (ViTForImageClassification has one), a ViT with ln_pre, a ResNet image tower, an encoder
(bidirectional) or rope/RMSNorm/SwiGLU/GQA/MoE text tower; on import, an activation our blocks do not compute and an
MLP width other than 4x in a ViT.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any, Callable

import torch

from framework.checkpoint.consolidate import TensorSource
from framework.errors import UserError
from framework.models.registry import config_from_dict

HF_CLASS = {"vit": "ViTForImageClassification", "clip": "CLIPModel"}  # our model_type -> HF's architecture
# our `mlp` activation <-> HF's `hidden_act` (HF's "gelu_new" is the tanh GELU too)
TO_HF_ACT = {"gelu": "gelu_pytorch_tanh", "gelu_exact": "gelu", "quick_gelu": "quick_gelu"}
FROM_HF_ACT = {**{v: k for k, v in TO_HF_ACT.items()}, "gelu_new": "gelu"}
# transformers' defaults for the fields a config.json may leave out (ViTConfig, CLIPTextConfig, CLIPVisionConfig)
HF_VIT = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
              hidden_act="gelu", hidden_dropout_prob=0.0, layer_norm_eps=1e-12, image_size=224, patch_size=16,
              num_channels=3, qkv_bias=True)
HF_CLIP_TEXT = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                    num_attention_heads=8, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                    attention_dropout=0.0, pad_token_id=1, bos_token_id=49406, eos_token_id=49407)
HF_CLIP_VISION = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                      num_channels=3, image_size=224, patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                      attention_dropout=0.0)
LEGACY_EOS = 2  # CLIPTextTransformer pools at the largest token id, not at eos, when eos_token_id is 2


# ---------------------------------------------------------------- tensor tables
Fn = Callable[[list[torch.Tensor]], list[Any]]


def _same(ts: list[torch.Tensor]) -> list[torch.Tensor]:
    return list(ts)


@dataclass(frozen=True)
class Entry:
    """Our tensors `ours` <-> HF's `theirs`: `to_hf` maps the first list to the second, `from_hf` back (a None it
    returns is a tensor of ours that the imported model does not have)."""

    ours: tuple[str, ...]
    theirs: tuple[str, ...]
    to_hf: Fn = _same
    from_hf: Fn = _same


def _copies(*pairs: tuple[str, str]) -> list[Entry]:
    """One entry per (ours, theirs) name pair, for a module's weight and bias."""
    return [Entry((f"{o}.{p}",), (f"{t}.{p}",)) for o, t in pairs for p in ("weight", "bias")]


# a block's modules: ours (under `{prefix}{i}.`) -> HF's; three HF names split our fused c_attn (rows [q; k; v])
VIT_BLOCK = (("ln_1", ("layernorm_before",)),
             ("attn.c_attn", ("attention.attention.query", "attention.attention.key", "attention.attention.value")),
             ("attn.c_proj", ("attention.output.dense",)),
             ("ln_2", ("layernorm_after",)),
             ("mlp.c_fc", ("intermediate.dense",)),
             ("mlp.c_proj", ("output.dense",)))
CLIP_BLOCK = (("ln_1", ("layer_norm1",)),
              ("attn.c_attn", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
              ("attn.c_proj", ("self_attn.out_proj",)),
              ("ln_2", ("layer_norm2",)),
              ("mlp.c_fc", ("mlp.fc1",)),
              ("mlp.c_proj", ("mlp.fc2",)))


def _blocks(n_layer: int, ours: str, theirs: str, table: tuple[tuple[str, tuple[str, ...]], ...]) -> list[Entry]:
    out = []
    for i in range(n_layer):
        for module, hf_modules in table:
            for p in ("weight", "bias"):
                names = tuple(f"{theirs}{i}.{m}.{p}" for m in hf_modules)
                fused = len(names) > 1  # no grouped-query attention here: q, k, v have n_embd rows each
                out.append(Entry((f"{ours}{i}.{module}.{p}",), names,
                                 (lambda ts: list(ts[0].chunk(3))) if fused else _same,
                                 (lambda ts: [torch.cat(ts)]) if fused else _same))
    return out


def _vit_entries(c: Any) -> list[Entry]:
    return [Entry(("cls_token",), ("vit.embeddings.cls_token",)),  # (1, 1, C) both
            Entry(("pos_embed",), ("vit.embeddings.position_embeddings",)),  # (1, T, C) both
            *_copies(("patch_embed", "vit.embeddings.patch_embeddings.projection")),
            *_blocks(c.n_layer, "blocks.", "vit.encoder.layer.", VIT_BLOCK),
            *_copies(("ln_f", "vit.layernorm")),
            *(_copies(("head", "classifier")) if c.num_classes else [])]  # no head: a feature tower


def _fold_patch_bias(ts: list[torch.Tensor]) -> list[torch.Tensor]:
    """(1, T, C) positions, (C,) patch bias -> (T, C) positions with the bias added to the patch rows 1..N: the patch
    projection's bias and the position rows are summed into every patch token alike; the cls row 0 gets none."""
    pos, bias = ts
    return [torch.cat([pos[0, :1], pos[0, 1:] + bias])]


def _clip_entries(c: Any) -> list[Entry]:
    vision, text = c.image_config(), c.text_config()
    cap = math.log(c.max_logit_scale)
    return [
        Entry(("visual.cls_token",), ("vision_model.embeddings.class_embedding",),  # (1, 1, C) <-> (C,)
              lambda ts: [ts[0].reshape(-1)], lambda ts: [ts[0].reshape(1, 1, -1)]),
        Entry(("visual.patch_embed.weight",), ("vision_model.embeddings.patch_embedding.weight",)),
        # (1, T, C) + (C,) <-> (T, C); an imported model has no patch bias (patch_bias=false): None
        Entry(("visual.pos_embed", "visual.patch_embed.bias"), ("vision_model.embeddings.position_embedding.weight",),
              _fold_patch_bias, lambda ts: [ts[0][None], None]),
        *_copies(("visual.ln_pre", "vision_model.pre_layrnorm")),
        *_blocks(vision.n_layer, "visual.blocks.", "vision_model.encoder.layers.", CLIP_BLOCK),
        *_copies(("visual.ln_f", "vision_model.post_layernorm")),
        Entry(("image_proj.weight",), ("visual_projection.weight",)),
        # (Vp, C) <-> (V, C): our table is padded to vocab_multiple; the padding rows are never looked up
        Entry(("text.wte.weight",), ("text_model.embeddings.token_embedding.weight",),
              lambda ts: [ts[0][:text.vocab_size]], lambda ts: [_pad_rows(ts[0], text.padded_vocab_size)]),
        Entry(("text.wpe.weight",), ("text_model.embeddings.position_embedding.weight",)),
        *_blocks(text.n_layer, "text.h.", "text_model.encoder.layers.", CLIP_BLOCK),
        *_copies(("text.ln_f", "text_model.final_layer_norm")),
        Entry(("text_proj.weight",), ("text_projection.weight",)),
        # (1,) <-> (): ours is kept one element for FSDP2; our forward caps exp(scale) at max_logit_scale, HF does not
        Entry(("logit_scale",), ("logit_scale",),
              lambda ts: [ts[0].clamp(max=cap).reshape(())], lambda ts: [_uncapped(ts[0], c.max_logit_scale)]),
    ]


def _uncapped(scale: torch.Tensor, cap: float) -> torch.Tensor:
    """HF's () logit scale as ours (1,), refused when our forward would cap it (the logits would differ)."""
    if scale.device.type != "meta" and math.exp(float(scale)) > cap * (1 + 1e-6):
        raise UserError(f"this CLIPModel scales its logits by exp(logit_scale) = {math.exp(float(scale)):.6g}, above "
                        f"our cap max_logit_scale={cap:g}, which would change them; raise model.config.max_logit_scale "
                        "to at least that")
    return scale.reshape(1)


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])]) if rows > t.shape[0] else t


ENTRIES: dict[str, Callable[[Any], list[Entry]]] = {"vit": _vit_entries, "clip": _clip_entries}


# ---------------------------------------------------------------- what maps
def _unfit_vit(c: Any, where: str = "") -> list[str]:
    why = []
    if c.pooling != "cls":
        why.append(f"{where}pooling={c.pooling!r} (Hugging Face's ViT and CLIP pool the final cls token)")
    if where and not c.ln_pre:
        why.append(f"{where}ln_pre=false (CLIPModel normalizes the image embeddings before the first block: "
                   f"pre_layrnorm; train with {where}ln_pre=true)")
    if not where and c.ln_pre:
        why.append("ln_pre=true (ViTForImageClassification has no LayerNorm before its first block)")
    if not where and c.num_classes == 0:
        why.append("num_classes=0: a ViT without its head is a feature tower, and ViTForImageClassification has a "
                   "head; fine-tune it with one (configs/vision/linear-probe.yaml with init_from this checkpoint) "
                   "and export that, or export the CLIP checkpoint it is the image tower of")
    return why


def _unfit_clip(c: Any) -> list[str]:
    why = []
    if c.image["model_type"] != "vit":
        why.append(f"a {c.image['model_type']!r} image tower (CLIPModel's image tower is a ViT; transformers has no "
                   "class for OpenAI's ResNet CLIP)")
    else:
        why += _unfit_vit(c.image_config(), "image.")
    t = c.text_config()
    if t.model_type != "gpt":
        why.append(f"a {t.model_type!r} text tower (CLIPModel's text tower is causal and pooled at the eos token; "
                   "an encoder reads captions both ways and is pooled at cls)")
        return why
    wanted = dict(pos_embedding="learned", norm="layernorm")
    why += [f"text.{k}={getattr(t, k)!r} (CLIPModel's text tower has {v})" for k, v in wanted.items()
            if getattr(t, k) != v]
    if t.mlp == "swiglu":
        why.append("text.mlp='swiglu' (CLIPModel's text MLP has one activation and two matrices)")
    if t.kv_heads != t.n_head:
        why.append(f"text.n_kv_head={t.n_kv_head} (CLIPModel has no grouped-query attention)")
    if t.moe is not None:
        why.append("a mixture-of-experts text tower (CLIPModel's MLPs are dense)")
    if c.special_ids["eod"] == LEGACY_EOS:
        why.append(f"special_ids.eod={LEGACY_EOS} (transformers reads eos_token_id {LEGACY_EOS} as an old CLIP "
                   "config and pools at the largest token id instead)")
    return why


def check_exportable(config: Any) -> None:
    """UserError, one line, naming everything that keeps this model from its HF class, when anything does."""
    kind = config.model_type
    if kind not in HF_CLASS:
        raise UserError(f"a {kind!r} model has no Hugging Face image class here (only {', '.join(HF_CLASS)})")
    why = _unfit_vit(config) if kind == "vit" else _unfit_clip(config)
    if why:
        raise UserError(f"this {kind} model cannot be exported as a Hugging Face {HF_CLASS[kind]}, which computes "
                        f"another function: {'; '.join(why)}; export it without --format hf")


# ---------------------------------------------------------------- config.json, ours -> HF
def _block_sizes(c: Any) -> dict[str, Any]:
    return {"hidden_size": c.n_embd, "num_hidden_layers": c.n_layer, "num_attention_heads": c.n_head,
            "hidden_act": TO_HF_ACT[c.mlp], "layer_norm_eps": c.norm_eps, "initializer_range": 0.02}


def _vision_sizes(c: Any) -> dict[str, Any]:
    return {**_block_sizes(c), "intermediate_size": 4 * c.n_embd, "image_size": c.image_size,
            "patch_size": c.patch_size, "num_channels": c.channels}


def hf_config(config: Any, labels: list[str] | None = None) -> dict[str, Any]:
    """HF's config.json for our ViT or CLIP config (UserError when it does not map). `labels`: the ViT's class names
    (id2label; default LABEL_i)."""
    check_exportable(config)
    if config.model_type == "vit":
        names = labels or [f"LABEL_{i}" for i in range(config.num_classes)]
        if len(names) != config.num_classes:
            raise UserError(f"{len(names)} class names for a ViT of {config.num_classes} classes")
        return {"architectures": [HF_CLASS["vit"]], "model_type": "vit", **_vision_sizes(config),
                "hidden_dropout_prob": config.dropout, "attention_probs_dropout_prob": config.dropout,
                "qkv_bias": True,  # zeros when ours has no bias
                "id2label": {str(i): n for i, n in enumerate(names)}, "label2id": {n: i for i, n in enumerate(names)}}
    vision, text, ids = config.image_config(), config.text_config(), config.special_ids
    E = config.embed_dim
    return {"architectures": [HF_CLASS["clip"]], "model_type": "clip", "projection_dim": E,
            "logit_scale_init_value": config.init_logit_scale, "initializer_factor": 1.0,
            "vision_config": {"model_type": "clip_vision_model", **_vision_sizes(vision),
                              "attention_dropout": vision.dropout, "projection_dim": E},
            "text_config": {"model_type": "clip_text_model", **_block_sizes(text), "vocab_size": text.vocab_size,
                            "intermediate_size": text.mlp_hidden_size, "max_position_embeddings": text.seq_len,
                            "attention_dropout": text.dropout, "projection_dim": E,
                            # captions end with eod (pooled there) and are padded with pad; no start token
                            "eos_token_id": ids["eod"], "bos_token_id": ids["eod"], "pad_token_id": ids["pad"]}}


def caption_tokenizer_json(tokenizer_json: str, eod_token: str) -> str:
    """tokenizer.json for a CLIPModel export: our CLIP reads a caption's tokens then eod (`eod_token`, e.g.
    <|endoftext|>) and pools there, so the tokenizer appends it (a post-processor), and `tokenizer(captions,
    padding=True)` gives exactly the ids our text tower reads, padded with the tokenizer's pad token."""
    from tokenizers import Tokenizer, processors

    tok = Tokenizer.from_str(tokenizer_json)
    eod = tok.token_to_id(eod_token)
    if eod is None:
        raise UserError(f"the captions' tokenizer has no {eod_token} token; re-create it with `pretrain prepare`")
    tok.post_processor = processors.TemplateProcessing(single=f"$A {eod_token}", special_tokens=[(eod_token, eod)])
    return tok.to_str()


# ---------------------------------------------------------------- config.json, HF -> ours
def _get(h: dict[str, Any], defaults: dict[str, Any], key: str) -> Any:
    value = h.get(key)
    return defaults[key] if value is None else value


def _square(value: Any, name: str, why: list[str]) -> int:
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            why.append(f"{name}={list(value)} (ours are square)")
        return int(value[0])
    return int(value)


def _activation(act: str, where: str, why: list[str]) -> str:
    """Our `mlp` for HF's hidden_act; what we do not compute is appended to `why`."""
    if act not in FROM_HF_ACT:
        why.append(f"{where}hidden_act={act!r} is none of the activations our blocks compute "
                   f"({', '.join(FROM_HF_ACT)})")
    return FROM_HF_ACT.get(act, "gelu")


def _hf_vision(h: dict[str, Any], defaults: dict[str, Any], where: str, why: list[str]) -> dict[str, Any]:
    """Our ViT fields of an HF ViT / CLIP vision config; what we cannot compute is appended to `why`."""
    get = lambda k: _get(h, defaults, k)  # noqa: E731
    C, inner = get("hidden_size"), get("intermediate_size")
    mlp = _activation(get("hidden_act"), where, why)
    if inner != 4 * C:
        why.append(f"{where}intermediate_size={inner} (our ViT's MLP is 4 x hidden_size = {4 * C})")
    return {"model_type": "vit", "image_size": _square(get("image_size"), f"{where}image_size", why),
            "patch_size": _square(get("patch_size"), f"{where}patch_size", why), "channels": get("num_channels"),
            "n_layer": get("num_hidden_layers"), "n_head": get("num_attention_heads"), "n_embd": C,
            "bias": True, "pooling": "cls", "mlp": mlp, "norm_eps": get("layer_norm_eps")}


def our_config(h: dict[str, Any]) -> dict[str, Any]:
    """Our config dict for HF's config.json `h` of a ViTForImageClassification or a CLIPModel; UserError naming
    what we cannot compute, when anything."""
    kind, names = h.get("model_type"), h.get("architectures") or []
    if kind not in HF_CLASS or (names and HF_CLASS[kind] not in names):  # no names: the model_type's class
        found = ", ".join(names) if names else repr(kind)
        raise UserError(f"a Hugging Face {found} is not one of the image models this framework loads "
                        f"({', '.join(HF_CLASS.values())})")
    why: list[str] = []
    if kind == "vit":
        values = {**_hf_vision(h, HF_VIT, "", why), "dropout": _get(h, HF_VIT, "hidden_dropout_prob"),
                  "num_classes": len(h["id2label"]) if "id2label" in h else h.get("num_labels", 2)}
    else:
        hv, ht = h.get("vision_config") or {}, h.get("text_config") or {}
        image = {**_hf_vision(hv, HF_CLIP_VISION, "vision_config.", why),
                 "dropout": _get(hv, HF_CLIP_VISION, "attention_dropout"), "num_classes": 0, "ln_pre": True,
                 "patch_bias": False}
        get = lambda k: _get(ht, HF_CLIP_TEXT, k)  # noqa: E731
        mlp = _activation(get("hidden_act"), "text_config.", why)
        eos = get("eos_token_id")
        if eos == LEGACY_EOS:
            why.append(f"text_config.eos_token_id={LEGACY_EOS} (an old CLIP config: transformers then pools at the "
                       "largest token id; set it to the tokenizer's end-of-text id)")
        C, inner = get("hidden_size"), get("intermediate_size")
        text = {"model_type": "gpt", "vocab_size": get("vocab_size"), "seq_len": get("max_position_embeddings"),
                "n_layer": get("num_hidden_layers"), "n_head": get("num_attention_heads"), "n_embd": C,
                "dropout": get("attention_dropout"), "bias": True, "norm_eps": get("layer_norm_eps"), "mlp": mlp,
                "mlp_hidden": None if inner == 4 * C else inner}
        pad = ht.get("pad_token_id", HF_CLIP_TEXT["pad_token_id"])
        values = {"model_type": "clip", "image": image, "text": text, "embed_dim": h.get("projection_dim", 512),
                  "special_ids": {"eod": eos, "pad": eos if pad is None else pad},
                  "init_logit_scale": h.get("logit_scale_init_value", 2.6592)}
    if why:
        raise UserError(f"this Hugging Face {HF_CLASS[kind]} computes what no {kind} model of this framework does: "
                        f"{'; '.join(why)}")
    try:
        config_from_dict(values)
    except ValueError as e:  # ConfigError: our own checks, one line naming the field
        raise UserError(f"this Hugging Face {HF_CLASS[kind]} does not fit a {kind} model of this framework: {e}"
                        ) from None
    return values


# ---------------------------------------------------------------- tensors, both ways
def _zeros(name: str, shape: tuple[int, ...], dtype: torch.dtype) -> TensorSource:
    return TensorSource(name, shape, dtype, lambda: torch.zeros(shape, dtype=dtype))


def _derive(inputs: list[TensorSource], names: tuple[str, ...], fn: Fn) -> list[TensorSource]:
    """Tensors `names` = fn(inputs), each read when asked for; the inputs are read once for all of them (a fused q/k/v
    once, not three times) and dropped when the last one has been handed out."""
    metas = fn([torch.empty(s.shape, dtype=s.dtype, device="meta") for s in inputs])
    cache: dict[str, Any] = {}

    def load(k: int) -> torch.Tensor:
        if "out" not in cache:
            cache["out"] = fn([s.load() for s in inputs])
            cache["left"] = {i for i, m in enumerate(metas) if m is not None}
        t = cache["out"][k].contiguous()
        cache["left"].discard(k)
        if not cache["left"]:
            cache.clear()
        return t

    return [TensorSource(n, tuple(m.shape), m.dtype, lambda k=k: load(k))
            for k, (n, m) in enumerate(zip(names, metas)) if m is not None]


def _biasless(config: Any, name: str) -> bool:
    """Whether our model of `config` lacks `name` because it has no bias there (HF always has one: zeros then)."""
    if not name.endswith(".bias") or name.startswith("head."):  # the head is always biased
        return False
    if config.model_type == "clip":
        tower, name = name.split(".", 1)
        config = config.image_config() if tower == "visual" else config.text_config()
    return not config.bias or (name == "patch_embed.bias" and not config.patch_bias)


def export_tensors(config: Any, sources: list[TensorSource]) -> list[TensorSource]:
    """Our ViT / CLIP tensors -> HF's, in HF's names (what save_pretrained writes) and layouts, each read when it is
    written. UserError when the model does not map (check_exportable). No model is built: the names come from the
    entries, the shapes from our tensors (which the exporter has checked against the config)."""
    check_exportable(config)
    ours = {s.name: s for s in sources}
    entries = ENTRIES[config.model_type](config)
    for name in (n for e in entries for n in e.ours if n not in ours):
        weight = ours.get(name.removesuffix("bias") + "weight")
        if weight is None or not _biasless(config, name):
            raise UserError(f"the checkpoint lacks {name}, which its {config.model_type} config has; it is "
                            "incomplete or of another model")
        ours[name] = _zeros(name, weight.shape[:1], weight.dtype)  # HF's bias where ours has none
    out: list[TensorSource] = []
    for e in entries:
        out += _derive([ours[n] for n in e.ours], e.theirs, e.to_hf)
    left = sorted(set(ours) - {n for e in entries for n in e.ours})
    if left:
        raise UserError(f"tensors {', '.join(left[:3])} have no place in a {HF_CLASS[config.model_type]}; export "
                        "without --format hf")
    return out


# transformers >= 5 names a ViT's modules anew in memory (save_pretrained still writes the names above): a file
# written from a state_dict has these; they are read as the saved names
_VIT_V5_NAMES = ((r"^vit\.layers\.(\d+)\.", r"vit.encoder.layer.\1."),
                 (r"\.attention\.q_proj\.", ".attention.attention.query."),
                 (r"\.attention\.k_proj\.", ".attention.attention.key."),
                 (r"\.attention\.v_proj\.", ".attention.attention.value."),
                 (r"\.attention\.o_proj\.", ".attention.output.dense."), (r"\.mlp\.fc1\.", ".intermediate.dense."),
                 (r"\.mlp\.fc2\.", ".output.dense."))
_IGNORED = re.compile(r"embeddings\.position_ids$")  # a buffer older transformers saved: arange, not a weight


def import_tensors(h: dict[str, Any], hf_sources: list[TensorSource]) -> list[TensorSource]:
    """HF's tensors of the model whose config.json is `h` -> ours, under our names (tied aliases: none), each read when
    it is asked for. UserError when the config does not map or a tensor is missing, left over or does not fuse.

    No model is built (not even on the meta device): this runs inside ZeRO-3's zero.Init, where building one would
    partition it. Our names follow from the config (the entries), the shapes from HF's tensors; the caller checks them
    against the model it fills."""
    config = config_from_dict(our_config(h))
    theirs: dict[str, TensorSource] = {}
    for s in hf_sources:
        name = s.name
        if config.model_type == "vit":
            for pattern, repl in _VIT_V5_NAMES:
                name = re.sub(pattern, repl, name)
        if not _IGNORED.search(name):
            theirs[name] = dataclasses.replace(s, name=name)
    if config.model_type == "vit" and not _get(h, HF_VIT, "qkv_bias"):  # HF computes q, k, v without a bias
        dtype = next(iter(theirs.values())).dtype
        qkv = [f"vit.encoder.layer.{i}.attention.attention.{x}.bias" for i in range(config.n_layer)
               for x in ("query", "key", "value")]
        theirs.update({n: _zeros(n, (config.n_embd,), dtype) for n in qkv})
    out: list[TensorSource] = []
    entries = ENTRIES[config.model_type](config)
    for e in entries:
        lacking = [n for n in e.theirs if n not in theirs]
        if lacking:
            raise UserError(f"the Hugging Face files lack tensor {lacking[0]}, which their config.json implies; they "
                            "are incomplete or of another model")
        parts = [theirs[n] for n in e.theirs]
        try:
            out += _derive(parts, e.ours, e.from_hf)
        except RuntimeError:  # q, k, v of different widths
            raise UserError(f"tensors {', '.join(e.theirs)} have shapes {', '.join(str(p.shape) for p in parts)}, "
                            "which do not fit together") from None
    left = sorted(set(theirs) - {n for e in entries for n in e.theirs})
    if left:
        raise UserError(f"the Hugging Face files have tensors that their config.json's {HF_CLASS[config.model_type]} "
                        f"does not ({', '.join(left[:3])}{' ...' if len(left) > 3 else ''}); this framework cannot "
                        "place them")
    return out
