"""What every transformer family shares: the config fields and their checks, the Block (attention + MLP, with a causal
flag and an optional padding mask), rotary positions, the init, the FLOP count and the weight files.

A family (framework.models.gpt, framework.models.encoder) is a config subclass with its presets and `model_type`,
plus the embedding and the head around a stack of these Blocks. Pure PyTorch: no Lightning, DeepSpeed or W&B.

Shapes in comments: B batch, T sequence length, C n_embd, nh n_head, hs head size (C // nh), V vocab (Vp padded).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, ContextManager, Literal, TypeVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from framework.errors import UserError
from framework.models.moe import Experts, MoE, MoEConfig, Router

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
ROPE_THETA = 10_000.0  # RoPE base frequency, as in RoFormer / LLaMA (Llama 3: 500,000)
INIT_STD = 0.02  # GPT-2 / BERT init


class ConfigError(UserError, ValueError):
    """A bad model config value. A ValueError for library callers; a UserError so the CLI prints one line, exit 2."""


# ----------------------------------------------------------------------------------------------------------- config
class PresetConfig:
    """What every family's config dataclass shares: named presets, the dict round trip (checkpoints and config.json)
    and unknown fields named with a suggestion. A subclass is a @dataclass that sets `model_type` and `PRESETS` and
    checks its values in `__post_init__` (the `check_*` helpers below give every family the same messages)."""

    model_type: ClassVar[str] = ""
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {}

    @classmethod
    def presets(cls) -> list[str]:
        return list(cls.PRESETS)

    @classmethod
    def from_preset(cls: type[C], name: str, **overrides: Any) -> C:
        """The named preset with some fields replaced, e.g. `GPTConfig.from_preset("gpt2-124m", vocab_size=32000)`."""
        if name not in cls.PRESETS:
            family = cls.__name__.removesuffix("Config")
            raise ConfigError(f"unknown {family} preset {name!r}{did_you_mean(name, cls.PRESETS)}; known presets: "
                              f"{', '.join(cls.PRESETS)}")
        cls._check_fields(overrides)
        return cls(**{**cls.PRESETS[name], **overrides})

    @classmethod
    def from_dict(cls: type[C], values: dict[str, Any]) -> C:
        values = dict(values)
        model_type = values.pop("model_type", cls.model_type)
        if model_type != cls.model_type:
            raise ConfigError(f"the config is of a {model_type!r} model, not a {cls.model_type!r} one")
        cls._check_fields(values)
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return {"model_type": self.model_type, **dataclasses.asdict(self)}

    @property
    def family(self) -> str:
        """The family whose pre-trained weights this model takes: its own (a classifier's: its backbone's)."""
        return self.model_type

    @classmethod
    def _check_fields(cls, values: dict[str, Any]) -> None:
        fields = [f.name for f in dataclasses.fields(cls)]
        for key in values:
            if key not in fields:
                raise ConfigError(f"unknown {cls.__name__} field {key!r}{did_you_mean(key, fields)}; "
                                  f"fields: {', '.join(fields)}")


C = TypeVar("C", bound=PresetConfig)


def check_positive_ints(config: Any, *fields: str) -> None:
    for field in fields:
        value = getattr(config, field)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{type(config).__name__}.{field}={value!r} must be a positive integer")


def check_dropout(config: Any, field: str = "dropout") -> None:
    value = getattr(config, field)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ConfigError(f"{type(config).__name__}.{field}={value!r} must be a number in [0, 1)")


def check_bool(config: Any, field: str) -> None:
    if not isinstance(getattr(config, field), bool):
        raise ConfigError(f"{type(config).__name__}.{field}={getattr(config, field)!r} must be true or false")


def check_choice(config: Any, field: str, choices: tuple[str, ...]) -> None:
    value = getattr(config, field)
    if value not in choices:
        raise ConfigError(f"{type(config).__name__}.{field}={value!r} is not one of "
                          f"{', '.join(repr(c) for c in choices)}" + did_you_mean(str(value), choices))


def check_heads(config: Any) -> None:
    """n_embd must split evenly into n_head heads; the message offers the nearest sizes that do."""
    if config.n_embd % config.n_head:
        lo = config.n_embd // config.n_head * config.n_head
        raise ConfigError(
            f"{type(config).__name__}.n_embd={config.n_embd} must be divisible by n_head={config.n_head}: "
            f"use n_embd={lo or config.n_head} or {lo + config.n_head}, or an n_head that divides {config.n_embd}"
        )


@dataclass
class TransformerConfig(PresetConfig):
    """Fields every transformer family has. Subclasses set `model_type`, `PRESETS` and their own defaults."""

    vocab_size: int = 50304
    seq_len: int = 1024  # the longest context the model sees
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0  # pre-training with lots of data needs none; fine-tuning may want 0.1
    bias: bool = True  # biases in Linear and LayerNorm (False is slightly faster and no worse)
    # "learned" reproduces GPT-2's / BERT's parameter counts and checkpoint shapes. "rope" (rotary, no position
    # parameters) extrapolates better to longer contexts and is what most recent models use.
    pos_embedding: Literal["learned", "rope"] = "learned"
    # The embedding table and logits matmul are padded to a multiple of this (nanoGPT: 50257 -> 50304 ran ~25% faster).
    # Padded rows are never predicted: the heads slice the logits back to vocab_size.
    vocab_multiple: int = 64
    # The block's parts. GPT-2 / BERT: layernorm, gelu, learned positions, biases. Llama (Touvron et al. 2023): rmsnorm
    # (Zhang & Sennrich 2019), swiglu (Shazeer 2020), rope, no biases, grouped-query attention (Ainslie et al. 2023).
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    norm_eps: float = 1e-5
    # "gelu" is GELU's tanh form (GPT-2's, and every CPU preset's); "gelu_exact" the erf GELU (BERT, Google's ViT);
    # "quick_gelu" x * sigmoid(1.702 x) (OpenAI's CLIP): the public checkpoints' own activations
    mlp: Literal["gelu", "gelu_exact", "quick_gelu", "swiglu"] = "gelu"
    # the MLP's hidden size; null: 4 * n_embd for gelu, and for swiglu 8 * n_embd / 3 rounded up to a multiple of 64
    # (the same parameters as gelu's 4x with its three matrices; Llama rounds to 256 and scales it, so its presets
    # give the size)
    mlp_hidden: int | None = None
    n_kv_head: int | None = None  # key/value heads (grouped-query attention); null: n_head (multi-head attention)
    rope_theta: float = ROPE_THETA  # RoPE base frequency
    # Llama 3.1's long-context RoPE frequencies: {"rope_type": "llama3", "factor", "low_freq_factor",
    # "high_freq_factor", "original_max_position_embeddings"}, as in Hugging Face's configs; null: plain RoPE
    rope_scaling: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        check_positive_ints(self, "vocab_size", "seq_len", "n_layer", "n_head", "n_embd", "vocab_multiple")
        check_heads(self)
        check_dropout(self)
        check_choice(self, "pos_embedding", ("learned", "rope"))
        check_choice(self, "norm", ("layernorm", "rmsnorm"))
        check_choice(self, "mlp", MLPS)
        if self.pos_embedding == "rope" and self.head_size % 2:
            raise ConfigError(f"{type(self).__name__}.pos_embedding='rope' needs an even head size, got "
                              f"n_embd/n_head={self.head_size}: change n_embd or n_head")
        check_bool(self, "bias")
        if self.mlp_hidden is not None:
            check_positive_ints(self, "mlp_hidden")
        if self.n_kv_head is not None:
            check_positive_ints(self, "n_kv_head")
            if self.n_head % self.n_kv_head:
                raise ConfigError(f"{type(self).__name__}.n_kv_head={self.n_kv_head} must divide n_head="
                                  f"{self.n_head}: each key/value head serves a whole group of query heads")
        for field in ("norm_eps", "rope_theta"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise ConfigError(f"{type(self).__name__}.{field}={value!r} must be a positive number")
        if self.rope_scaling is not None:
            check_rope_scaling(self)

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def mlp_hidden_size(self) -> int:
        return mlp_hidden_size(self)

    @property
    def padded_vocab_size(self) -> int:
        return math.ceil(self.vocab_size / self.vocab_multiple) * self.vocab_multiple


MLPS = ("gelu", "gelu_exact", "quick_gelu", "swiglu")
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_exact": F.gelu,
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
}
LLAMA3_SCALING = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def check_rope_scaling(config: Any) -> None:
    value, name = config.rope_scaling, f"{type(config).__name__}.rope_scaling"
    if not isinstance(value, dict) or value.get("rope_type", value.get("type")) != "llama3":
        raise ConfigError(f"{name}={value!r} is not supported: only null or Llama 3.1's "
                          f"{{rope_type: llama3, {', '.join(LLAMA3_SCALING)}}}")
    missing = [k for k in LLAMA3_SCALING if not isinstance(value.get(k), (int, float)) or value[k] <= 0]
    if missing:
        raise ConfigError(f"{name} needs positive numbers for {', '.join(missing)}")
    if value["high_freq_factor"] <= value["low_freq_factor"]:
        raise ConfigError(f"{name}: high_freq_factor must be larger than low_freq_factor")
    if config.pos_embedding != "rope":
        raise ConfigError(f"{name} is set but pos_embedding is {config.pos_embedding!r}: use pos_embedding=rope")


def mlp_hidden_size(config: Any) -> int:
    """The MLP's hidden size (see TransformerConfig.mlp_hidden); a config without the field (ViT) is GPT-2's 4x."""
    given = getattr(config, "mlp_hidden", None)
    if given:
        return given
    if getattr(config, "mlp", "gelu") == "swiglu":
        return math.ceil(8 * config.n_embd / 3 / 64) * 64
    return 4 * config.n_embd


def did_you_mean(name: str, choices: Any) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


# ----------------------------------------------------------------------------------------------------------- blocks
def rope_cos_sin(seq_len: int, head_size: int, device: torch.device | None = None, theta: float = ROPE_THETA,
                 scaling: dict[str, Any] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables for rotary embeddings, each (T, hs) float32. Computed per forward: it is tiny, needs no buffer
    (so meta-device init, dtype casts and state dicts never touch it) and torch.compile folds it."""
    inv_freq = theta ** -(torch.arange(0, head_size, 2, device=device, dtype=torch.float32) / head_size)  # (hs/2,)
    if scaling is not None:
        inv_freq = llama3_frequencies(inv_freq, scaling)
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)  # (T, hs/2)
    angles = torch.cat((angles, angles), dim=-1)  # (T, hs): "rotate half" layout (GPT-NeoX, LLaMA)
    return angles.cos(), angles.sin()


def llama3_frequencies(inv_freq: torch.Tensor, s: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1's RoPE for long contexts: frequencies whose wavelength is shorter than the original context divided
    by high_freq_factor are kept, those longer than it divided by low_freq_factor are divided by `factor`, and the
    ones between are interpolated smoothly between the two (Meta's Llama 3.1 reference code; Hugging Face's
    `rope_type: llama3`)."""
    context = s["original_max_position_embeddings"]
    wavelength = 2 * math.pi / inv_freq  # (hs/2,)
    smooth = ((context / wavelength - s["low_freq_factor"]) / (s["high_freq_factor"] - s["low_freq_factor"]))
    smooth = smooth.clamp(0.0, 1.0)  # 0: a long wavelength (scaled), 1: a short one (kept)
    return (1 - smooth) * inv_freq / s["factor"] + smooth * inv_freq


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, nh, T, hs) queries or keys by position, in float32 so bf16 does not blur the angles."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)  # (B, nh, T, hs/2) each
    return (xf * cos + torch.cat((-x2, x1), dim=-1) * sin).type_as(x)


def attention_bias(attention_mask: torch.Tensor | None, causal: bool, T: int, past: int = 0,
                   device: torch.device | None = None) -> tuple[torch.Tensor | None, bool]:
    """(attn_mask, is_causal) for F.scaled_dot_product_attention from a (B, T) padding mask (1/True = a real token).

    Without a padding mask, a causal model passes is_causal alone, which lets SDPA pick the flash kernel on GPU. With
    `past` cached positions before these T (KVCache), query i sits at position past + i: one new token sees every
    key, and several get a (T, past + T) causal mask (SDPA's is_causal aligns to the top left, which would be wrong).
    """
    if past:
        if attention_mask is not None:
            raise ValueError("a padding mask cannot be combined with a KV cache")
        if T == 1 or not causal:
            return None, False
        keep = torch.ones(T, past + T, dtype=torch.bool, device=device).tril(diagonal=past)  # (T, past + T)
        return keep, False
    if attention_mask is None:
        return None, causal
    keep = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T): which keys each query may attend to
    if causal:
        keep = keep & torch.ones(T, T, dtype=torch.bool, device=keep.device).tril()  # (B, 1, T, T)
    return keep, False


class LayerCache:
    """One attention layer's keys and values so far, (B, nkv, t, hs) each, grown by `append`."""

    def __init__(self) -> None:
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.k is not None and self.v is not None:
            k, v = torch.cat((self.k, k), dim=2), torch.cat((self.v, v), dim=2)
        self.k, self.v = k, v
        return k, v


class KVCache:
    """Keys and values of the tokens a causal trunk has already run, so that generation runs only the new token
    through the blocks (O(T) a token instead of O(T^2)). Positions continue from `length`; the cache holds at most
    config.seq_len positions (learned position tables and the trained context end there). Inference only."""

    def __init__(self, n_layer: int) -> None:
        self.layers = [LayerCache() for _ in range(n_layer)]

    @property
    def length(self) -> int:
        """Positions cached so far (every layer holds the same number)."""
        k = self.layers[0].k if self.layers else None
        return 0 if k is None else k.size(2)


@dataclass(frozen=True)
class LoRA:
    """Low-rank adapters (Hu et al. 2021) on a block's projections: y = W x + (alpha / rank) * B A x."""

    rank: int
    alpha: float = 16.0
    dropout: float = 0.0


class LoRALinear(nn.Linear):
    """An nn.Linear (same `weight` and `bias` names, so pre-trained weights load as they are) plus a low-rank update
    `lora_B @ lora_A`. B starts at zero: the layer first computes exactly the pre-trained function. `merged_weight`
    folds the update into W for export."""

    def __init__(self, in_features: int, out_features: int, bias: bool, lora: LoRA) -> None:
        super().__init__(in_features, out_features, bias=bias)
        if lora.rank < 1:
            raise ConfigError(f"the LoRA rank must be >= 1, got {lora.rank}")
        self.scale = lora.alpha / lora.rank
        self.lora_A = nn.Parameter(torch.empty(lora.rank, in_features))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(out_features, lora.rank))  # (out, r)
        self.lora_dropout = nn.Dropout(lora.dropout)
        self.reset_lora()

    def reset_lora(self) -> None:
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear's own init, so BA's scale is sane
            self.lora_B.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B)  # (..., out) through rank r
        return super().forward(x) + self.scale * update

    def merged_weight(self) -> torch.Tensor:
        return self.weight + self.scale * (self.lora_B @ self.lora_A)


def linear(n_in: int, n_out: int, bias: bool, lora: LoRA | None) -> nn.Linear:
    return nn.Linear(n_in, n_out, bias=bias) if lora is None else LoRALinear(n_in, n_out, bias, lora)


class SelfAttention(nn.Module):
    """Multi-head attention, or grouped-query attention when n_kv_head < n_head: each key/value head serves
    n_head / n_kv_head query heads (smaller K/V projections and KV cache; Ainslie et al. 2023)."""

    def __init__(self, n_embd: int, n_head: int, bias: bool, dropout: float, lora: LoRA | None = None,
                 n_kv_head: int | None = None) -> None:
        super().__init__()
        self.n_head, self.n_kv_head = n_head, n_kv_head or n_head
        self.head_size = n_embd // n_head
        self.dropout = dropout
        kv = self.n_kv_head * self.head_size
        self.c_attn = linear(n_embd, n_embd + 2 * kv, bias, lora)  # rows [q of every head; k; v], one matmul
        self.c_proj = linear(n_embd, n_embd, bias, lora)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                attn_mask: torch.Tensor | None, is_causal: bool, cache: LayerCache | None = None) -> torch.Tensor:
        B, T, C = x.shape
        hs, kv = self.head_size, self.n_kv_head * self.head_size
        q, k, v = self.c_attn(x).split((C, kv, kv), dim=2)  # (B, T, C), (B, T, nkv*hs) x2
        q = q.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        k, v = (t.view(B, T, self.n_kv_head, hs).transpose(1, 2) for t in (k, v))  # (B, nkv, T, hs)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.append(k, v)  # (B, nkv, past + T, hs): the new tokens attend to every earlier one too
        grouped = {"enable_gqa": True} if self.n_kv_head != self.n_head else {}  # SDPA repeats the K/V heads
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                           dropout_p=self.dropout if self.training else 0.0, **grouped)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, nh, T, hs) -> heads side by side
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """GPT-2's MLP, C -> H -> C with a GELU (or another of ACTIVATIONS: each public checkpoint's own, so its weights
    reproduce its outputs); or with `swiglu`, c_proj(silu(gate) * up), where c_fc computes [gate; up] (2H rows) in one
    matmul (Shazeer 2020, "GLU Variants Improve Transformer"; Llama's MLP)."""

    def __init__(self, n_embd: int, bias: bool, dropout: float, lora: LoRA | None = None, hidden: int | None = None,
                 kind: str = "gelu") -> None:
        super().__init__()
        hidden = hidden or 4 * n_embd
        self.swiglu = kind == "swiglu"
        self.activation = None if self.swiglu else ACTIVATIONS[kind]
        self.c_fc = linear(n_embd, 2 * hidden if self.swiglu else hidden, bias, lora)
        self.c_proj = linear(hidden, n_embd, bias, lora)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c_fc(x)  # (B, T, H) or (B, T, 2H)
        if self.activation is None:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = self.activation(h)
        return self.dropout(self.c_proj(h))


def norm(config: Any) -> nn.Module:
    """The block's normalization: LayerNorm (with a bias when the config has biases) or RMSNorm (weight only). A config
    without the fields (ViT) gets GPT-2's LayerNorm."""
    eps = getattr(config, "norm_eps", 1e-5)
    if getattr(config, "norm", "layernorm") == "rmsnorm":
        return nn.RMSNorm(config.n_embd, eps=eps)
    return nn.LayerNorm(config.n_embd, eps=eps, bias=config.bias)


class Block(nn.Module):
    """Pre-norm transformer block. The unit that FSDP shards and activation checkpointing recomputes.

    `causal` is fixed per model (a GPT's blocks are causal, an encoder's are not); the padding mask, when there is
    one, arrives per batch as the (attn_mask, is_causal) pair made by `attention_bias`.
    """

    def __init__(self, config: TransformerConfig, causal: bool, lora: LoRA | None = None, layer: int = 0) -> None:
        super().__init__()
        self.causal = causal
        self.ln_1 = norm(config)
        self.attn = SelfAttention(config.n_embd, config.n_head, config.bias, config.dropout, lora,
                                  getattr(config, "n_kv_head", None))
        self.ln_2 = norm(config)
        moe: MoEConfig | None = getattr(config, "moe", None)  # a family with a `moe` field may have sparse MLPs
        if moe is not None and moe.is_moe_layer(layer):
            self.mlp: nn.Module = MoE(config.n_embd, moe, config.dropout)
        else:
            self.mlp = MLP(config.n_embd, config.bias, config.dropout, lora, mlp_hidden_size(config),
                           kind=getattr(config, "mlp", "gelu"))

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                attn_mask: torch.Tensor | None = None, is_causal: bool | None = None,
                cache: LayerCache | None = None) -> torch.Tensor:
        is_causal = self.causal if is_causal is None else is_causal
        x = x + self.attn(self.ln_1(x), rope, attn_mask, is_causal, cache)  # pre-LN: the residual is never normalized
        return x + self.mlp(self.ln_2(x))


def make_trunk(config: TransformerConfig, causal: bool, lora: LoRA | None = None) -> nn.ModuleDict:
    """Token (+ learned position) embedding, the blocks and the final LayerNorm, under GPT-2's names
    (`transformer.{wte,wpe,h,ln_f}` in a family's state dict, so GPT-2 weights map across); `run_trunk` runs them.
    With `lora`, the blocks' four projections carry low-rank adapters (their base weights keep their names)."""
    layers: dict[str, nn.Module] = {"wte": nn.Embedding(config.padded_vocab_size, config.n_embd)}
    if config.pos_embedding == "learned":
        layers["wpe"] = nn.Embedding(config.seq_len, config.n_embd)
    layers["drop"] = nn.Dropout(config.dropout)
    layers["h"] = nn.ModuleList(Block(config, causal, lora, layer=i) for i in range(config.n_layer))
    layers["ln_f"] = norm(config)
    return nn.ModuleDict(layers)


def run_trunk(trunk: nn.ModuleDict, config: TransformerConfig, idx: torch.Tensor, causal: bool,
              attention_mask: torch.Tensor | None = None, cache: KVCache | None = None) -> torch.Tensor:
    """Token ids (B, T) [+ padding mask (B, T)] -> final hidden states (B, T, C), after ln_f. With a KVCache, idx
    holds the tokens after the cached ones (positions cache.length ...), and the cache grows by T."""
    if idx.dim() != 2:
        raise ValueError(f"expected token ids of shape (batch, time), got {tuple(idx.shape)}")
    B, T = idx.shape
    past = cache.length if cache is not None else 0
    if past + T > config.seq_len:
        raise ValueError(f"sequence length {past + T} exceeds {type(config).__name__}.seq_len={config.seq_len}: "
                         "crop the input")
    if attention_mask is not None and attention_mask.shape != idx.shape:
        raise ValueError(f"attention_mask {tuple(attention_mask.shape)} must have the shape of the ids {(B, T)}")
    x = trunk.wte(idx)  # (B, T, C)
    rope = None
    if config.pos_embedding == "learned":
        x = x + trunk.wpe(torch.arange(past, past + T, device=idx.device))  # (T, C) broadcast over B
    else:
        cos, sin = rope_cos_sin(past + T, config.head_size, idx.device, config.rope_theta, config.rope_scaling)
        rope = cos[past:], sin[past:]  # (T, hs) each
    attn_mask, is_causal = attention_bias(attention_mask, causal, T, past, idx.device)
    x = trunk.drop(x)
    layers = cache.layers if cache is not None else [None] * len(trunk.h)
    for block, layer in zip(trunk.h, layers):
        x = block(x, rope, attn_mask, is_causal, layer)
    return trunk.ln_f(x)


def gathered(module: nn.Module, gather: Callable[[nn.Module], ContextManager[Any]] | None) -> ContextManager[Any]:
    """`gather(module)` (e.g. ZeRO-3's GatheredParameters around the module's own parameters), or nothing."""
    return gather(module) if gather is not None else contextlib.nullcontext()


@torch.no_grad()
def init_weights(model: nn.Module, config: TransformerConfig, skip: tuple[nn.Module, ...] = (),
                 gather: Callable[[nn.Module], ContextManager[Any]] | None = None) -> None:
    """GPT-2 init: N(0, 0.02) for matrices and embeddings, zero biases, and the two projections each block adds to the
    residual stream scaled by 1/sqrt(2 * n_layer) so its variance does not grow with depth. `skip`: modules to leave
    alone (a tied output matrix is initialized as the embedding it is). `gather(module)` is entered around each
    module's own parameters (e.g. DeepSpeed's GatheredParameters under ZeRO-3)."""
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    residual = {id(b.attn.c_proj) for b in blocks} | {id(b.mlp.c_proj) for b in blocks if isinstance(b.mlp, MLP)}
    residual_std = INIT_STD / math.sqrt(2 * config.n_layer)
    for module in model.modules():
        if isinstance(module, Experts):  # each expert as a dense MLP: c_fc-like, then a residual projection
            with gathered(module, gather):
                nn.init.normal_(module.w_fc, mean=0.0, std=INIT_STD)
                nn.init.normal_(module.w_proj, mean=0.0, std=residual_std)
            continue
        if isinstance(module, Router):
            with gathered(module, gather):
                nn.init.normal_(module.weight, mean=0.0, std=INIT_STD)
            continue
        if any(module is s for s in skip) or not isinstance(module, (nn.Linear, nn.Embedding, nn.LayerNorm,
                                                                     nn.RMSNorm)):
            continue
        with gathered(module, gather):
            if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
                module.reset_parameters()
                continue
            nn.init.normal_(module.weight, mean=0.0, std=residual_std if id(module) in residual else INIT_STD)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
            if isinstance(module, LoRALinear):
                module.reset_lora()


def block_flops(config: TransformerConfig, tokens: int, seq_len: int) -> int:
    """Training FLOPs (forward + backward) of the blocks for `tokens` tokens in sequences of `seq_len`.

    Only matrix multiplies count (elementwise ops, norms and biases are a rounding error at scale and are not what
    MFU measures). Per token and layer, forward: 2 FLOPs per weight of the attention projections (q and output C^2
    each, k and v C*kv_width each: 4*C^2 without grouped-query attention) and of the MLP (2*C*H, or 3*C*H with
    swiglu: 8*C^2 for GPT-2's 4x), plus 4*T*C for attention (QK^T and the weighted sum of V over the full T:
    causal-mask savings are not subtracted, as in the PaLM paper, appendix B). Backward costs twice the forward.
    """
    c = config
    kv_width = getattr(c, "kv_heads", c.n_head) * (c.n_embd // c.n_head)
    attention = 2 * c.n_embd * c.n_embd + 2 * c.n_embd * kv_width
    dense_mlp = (3 if getattr(c, "mlp", "gelu") == "swiglu" else 2) * c.n_embd * mlp_hidden_size(c)
    forward = c.n_layer * (2 * (attention + dense_mlp) + 4 * seq_len * c.n_embd)
    moe: MoEConfig | None = getattr(c, "moe", None)
    if moe is not None:  # a sparse layer's token runs top_k + shared experts of 2*C*H weights and the router
        sparse = sum(moe.is_moe_layer(i) for i in range(c.n_layer))
        active = 2 * c.n_embd * moe.hidden(c.n_embd) * (moe.top_k + moe.shared_experts) + c.n_embd * moe.num_experts
        forward += sparse * 2 * (active - dense_mlp)
    return 3 * forward * tokens


def num_params(model: nn.Module, exclude: tuple[str, ...] = ()) -> int:
    """Parameters counted once (tied ones too), at full size under ZeRO-3 (whose local shards are empty)."""
    numel = lambda p: getattr(p, "ds_numel", p.numel())  # noqa: E731
    return sum(numel(p) for name, p in model.named_parameters() if not name.endswith(exclude))


# ----------------------------------------------------------------------------------------------------------- files
def _safetensors() -> Any:
    try:
        import safetensors.torch
    except ImportError as e:
        raise ImportError("saving and loading weights needs safetensors: pip install safetensors") from e
    return safetensors.torch


def save_pretrained(out_dir: str | os.PathLike, config: TransformerConfig, state_dict: dict[str, torch.Tensor],
                    tied: tuple[str, ...] = ()) -> None:
    """Write config.json (with the model_type) and model.safetensors, each atomically. A function, not only a method,
    so export code can pass a state dict consolidated from FSDP or DeepSpeed shards. `tied` names are stored once,
    under the name of the tensor they are tied to."""
    save_file = _safetensors().save_file
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items() if k not in tied}
    # weights first: a directory with a config.json has its weights
    write_atomic(out_dir / WEIGHTS_FILE, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    text = json.dumps(config.to_dict(), indent=2) + "\n"
    write_atomic(out_dir / CONFIG_FILE, lambda tmp: tmp.write_text(text))


def load_pretrained_files(path: str | os.PathLike, map_location: str | torch.device = "cpu"
                          ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config.json as a dict, the state dict) of a directory written by save_pretrained or `pretrain export`."""
    path = Path(path)
    config_file, weights_file = path / CONFIG_FILE, path / WEIGHTS_FILE
    for f in (config_file, weights_file):
        if not f.is_file():
            raise FileNotFoundError(f"{f} not found: expected a directory written by save_pretrained or "
                                    "`pretrain export`")
    return json.loads(config_file.read_text()), _safetensors().load_file(str(weights_file), device=str(map_location))


class Pretrained(nn.Module):
    """What every family's model shares: its files (save_pretrained / from_pretrained) and the tensors its weights file
    leaves out because they are tied to another one. A family sets `config_class` and, if it ties weights,
    `tied_weights` and `tie_weights`."""

    config_class: ClassVar[type]
    tied_weights: tuple[str, ...] = ()  # stored once, under the name of the tensor they are tied to

    @classmethod
    def tied_in(cls, config: Any) -> tuple[str, ...]:
        """The tensors a model of `config` ties to another one (a family whose ties depend on its config overrides)."""
        return cls.tied_weights

    def tie_weights(self) -> None:
        """Point tied tensors at the one they share (after a load replaced it); nothing is tied by default."""

    def save_pretrained(self, out_dir: str | os.PathLike) -> None:
        """Write config.json and model.safetensors to out_dir (created if needed), each atomically."""
        save_pretrained(out_dir, self.config, self.state_dict(), tied=self.tied_weights)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, map_location: str | torch.device = "cpu",
                        **overrides: Any) -> Any:
        """Load a directory written by save_pretrained or `pretrain export` that holds a model of this family.
        overrides replace config fields that do not change shapes, e.g. dropout=0.1 for fine-tuning."""
        values, state = load_pretrained_files(path, map_location)
        found, expected = values.get("model_type", "gpt"), cls.config_class.model_type  # older files: GPTs
        if found != expected:
            raise ConfigError(f"'{path}' holds a {found!r} model, not a {expected!r} one")
        return cls.from_state(cls.config_class.from_dict({**values, **overrides}), state, path)

    @classmethod
    def from_state(cls, config: Any, state: dict[str, torch.Tensor], where: str | os.PathLike) -> Any:
        """The model of `config` holding exactly the weights `state` (tied tensors may be left out)."""
        with torch.device("meta"):  # no init work for weights that are about to be replaced
            model = cls(config)
        result = model.load_state_dict(state, strict=False, assign=True)
        model.tie_weights()  # assign=True replaced the embedding with a new Parameter; point the head at it again
        missing = [k for k in result.missing_keys if k not in cls.tied_in(config)]
        if missing or result.unexpected_keys:
            raise ValueError(f"the weights in {where} do not match its config.json: missing {missing}, unexpected "
                             f"{result.unexpected_keys}")
        return model


def write_atomic(path: Path, write: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
