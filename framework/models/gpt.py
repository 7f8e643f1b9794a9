"""A GPT (decoder-only transformer) in plain PyTorch: config dataclass with named presets, the model, and its files.

Architecture follows GPT-2 / nanoGPT: pre-LayerNorm blocks, GELU MLP (4x), tied input/output embeddings, GPT-2 init,
causal attention through `F.scaled_dot_product_attention` (flash / memory-efficient kernels on GPU). Module names match
nanoGPT and the GPT-2 checkpoints (`transformer.wte`, `h.0.attn.c_attn`, ...) so weights map across by name.

This file holds only the architecture. Sharding, precision, torch.compile and optimizer grouping are applied from
outside (framework.distributed, framework.tasks), activation checkpointing included
(`framework.distributed.apply_activation_checkpointing` hooks each `Block`).

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
from typing import Any, Callable, ContextManager, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from framework.errors import UserError

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
ROPE_THETA = 10_000.0  # RoPE base frequency, as in RoFormer / LLaMA
INIT_STD = 0.02  # GPT-2 init


class ConfigError(UserError, ValueError):
    """A bad model config value. A ValueError for library callers; a UserError so the CLI prints one line, exit 2."""


# ----------------------------------------------------------------------------------------------------------- config
@dataclass
class GPTConfig:
    vocab_size: int = 50304
    seq_len: int = 1024  # block size: the longest context the model sees
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0  # pre-training with lots of data needs none; fine-tuning may want 0.1
    bias: bool = True  # biases in Linear and LayerNorm, as GPT-2 (False is slightly faster and no worse)
    # "learned" by default: it is what GPT-2/GPT-3 used, so the gpt2-* presets reproduce their parameter counts and
    # checkpoint shapes (and the MFU baselines measured for them). "rope" (rotary, no position parameters) extrapolates
    # better to longer contexts and is what most recent LMs use; it costs a few elementwise ops per layer.
    pos_embedding: Literal["learned", "rope"] = "learned"
    # The embedding table and logits matmul are padded to a multiple of this (nanoGPT: 50257 -> 50304 ran ~25% faster).
    # Padded rows are never predicted: forward slices the logits back to vocab_size.
    vocab_multiple: int = 64

    def __post_init__(self) -> None:
        for name in ("vocab_size", "seq_len", "n_layer", "n_head", "n_embd", "vocab_multiple"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"GPTConfig.{name}={value!r} must be a positive integer")
        if self.n_embd % self.n_head:
            lo = self.n_embd // self.n_head * self.n_head
            raise ConfigError(
                f"GPTConfig.n_embd={self.n_embd} must be divisible by n_head={self.n_head}: "
                f"use n_embd={lo or self.n_head} or {lo + self.n_head}, or an n_head that divides {self.n_embd}"
            )
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ConfigError(f"GPTConfig.dropout={self.dropout!r} must be a number in [0, 1)")
        if self.pos_embedding not in ("learned", "rope"):
            raise ConfigError(
                f"GPTConfig.pos_embedding={self.pos_embedding!r} is not one of 'learned', 'rope'"
                + _did_you_mean(str(self.pos_embedding), ["learned", "rope"])
            )
        if self.pos_embedding == "rope" and self.head_size % 2:
            raise ConfigError(
                f"GPTConfig.pos_embedding='rope' needs an even head size, got n_embd/n_head={self.head_size}: "
                "change n_embd or n_head"
            )
        if not isinstance(self.bias, bool):
            raise ConfigError(f"GPTConfig.bias={self.bias!r} must be true or false")

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    @property
    def padded_vocab_size(self) -> int:
        return math.ceil(self.vocab_size / self.vocab_multiple) * self.vocab_multiple

    @staticmethod
    def presets() -> list[str]:
        return list(PRESETS)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "GPTConfig":
        """The named preset with some fields replaced, e.g. `from_preset("gpt2-124m", vocab_size=32000)`."""
        if name not in PRESETS:
            raise ConfigError(
                f"unknown GPT preset {name!r}{_did_you_mean(name, PRESETS)}; known presets: {', '.join(PRESETS)}"
            )
        _check_fields(overrides)
        return cls(**{**PRESETS[name], **overrides})

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "GPTConfig":
        _check_fields(values)
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Sizes from the GPT-2 paper (Radford et al. 2019) and GPT-3 paper (Brown et al. 2020, table 2.1). Vocab 50304 is
# GPT-2's 50257 padded to a multiple of 64; a run with its own tokenizer overrides vocab_size. The CPU presets use a
# byte vocab (256).
PRESETS: dict[str, dict[str, Any]] = {
    # CPU unit tests: a forward+backward in milliseconds.
    "gpt-tiny": dict(vocab_size=256, seq_len=64, n_layer=2, n_head=2, n_embd=64),
    # The README demo: learns visible structure of a byte-level corpus in ~3 minutes on 2 CPU cores.
    "gpt-small-cpu": dict(vocab_size=256, seq_len=256, n_layer=4, n_head=4, n_embd=128),
    "gpt2-124m": dict(vocab_size=50304, seq_len=1024, n_layer=12, n_head=12, n_embd=768),
    "gpt2-350m": dict(vocab_size=50304, seq_len=1024, n_layer=24, n_head=16, n_embd=1024),
    "gpt2-774m": dict(vocab_size=50304, seq_len=1024, n_layer=36, n_head=20, n_embd=1280),
    "gpt2-1.5b": dict(vocab_size=50304, seq_len=1024, n_layer=48, n_head=25, n_embd=1600),
    "gpt-2.7b": dict(vocab_size=50304, seq_len=2048, n_layer=32, n_head=32, n_embd=2560),
    "gpt-6.7b": dict(vocab_size=50304, seq_len=2048, n_layer=32, n_head=32, n_embd=4096),
}


def _did_you_mean(name: str, choices: Any) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _check_fields(values: dict[str, Any]) -> None:
    fields = [f.name for f in dataclasses.fields(GPTConfig)]
    for key in values:
        if key not in fields:
            hint = _did_you_mean(key, fields)
            raise ConfigError(f"unknown GPTConfig field {key!r}{hint}; fields: {', '.join(fields)}")


# ----------------------------------------------------------------------------------------------------------- model
def rope_cos_sin(seq_len: int, head_size: int, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables for rotary embeddings, each (T, hs) float32. Computed per forward: it is tiny, needs no buffer
    (so meta-device init, dtype casts and state dicts never touch it) and torch.compile folds it."""
    inv_freq = ROPE_THETA ** -(torch.arange(0, head_size, 2, device=device, dtype=torch.float32) / head_size)  # (hs/2,)
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)  # (T, hs/2)
    angles = torch.cat((angles, angles), dim=-1)  # (T, hs): "rotate half" layout (GPT-NeoX, LLaMA)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, nh, T, hs) queries or keys by position, in float32 so bf16 does not blur the angles."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)  # (B, nh, T, hs/2) each
    return (xf * cos + torch.cat((-x2, x1), dim=-1) * sin).type_as(x)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v for all heads at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)  # (B, T, C) each
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        # is_causal with no explicit mask lets SDPA pick the flash kernel on GPU
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble heads side by side
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's GELU, so its weights reproduce its outputs
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), rope)  # pre-LN: the residual stream itself is never normalized
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        layers: dict[str, nn.Module] = {"wte": nn.Embedding(config.padded_vocab_size, config.n_embd)}
        if config.pos_embedding == "learned":
            layers["wpe"] = nn.Embedding(config.seq_len, config.n_embd)
        layers["drop"] = nn.Dropout(config.dropout)
        layers["h"] = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        layers["ln_f"] = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.transformer = nn.ModuleDict(layers)
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        self.tie_weights()
        self.init_weights()

    def tie_weights(self) -> None:
        """One matrix embeds tokens and scores them (Press & Wolf 2017): fewer parameters, and it trains as well."""
        self.lm_head.weight = self.transformer.wte.weight

    @torch.no_grad()
    def init_weights(self, gather: Callable[[nn.Module], ContextManager[Any]] | None = None) -> None:
        """GPT-2 init. Public so that a model built on the meta device and materialized with `to_empty`, or built
        partitioned under ZeRO-3, can be initialized in place. `gather(module)` is entered around each module's own
        parameters (e.g. DeepSpeed's GatheredParameters); without it the parameters are used as they are.
        `to_empty` gives each module its own new Parameter, which unties lm_head from wte: tie them again first."""
        if self.lm_head.weight is not self.transformer.wte.weight:
            self.tie_weights()
        # Each block adds two projections to the residual stream; scaling them keeps its variance independent of depth.
        residual = {id(b.attn.c_proj) for b in self.transformer.h} | {id(b.mlp.c_proj) for b in self.transformer.h}
        residual_std = INIT_STD / math.sqrt(2 * self.config.n_layer)
        for module in self.modules():
            if module is self.lm_head or not isinstance(module, (nn.Linear, nn.Embedding, nn.LayerNorm)):
                continue  # lm_head is wte, initialized as an embedding
            with gather(module) if gather is not None else contextlib.nullcontext():
                if isinstance(module, nn.LayerNorm):
                    module.reset_parameters()
                    continue
                std = residual_std if id(module) in residual else INIT_STD
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if isinstance(module, nn.Linear) and module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Token ids (B, T) -> logits (B, T, vocab_size) for the next token at every position."""
        if idx.dim() != 2:
            raise ValueError(f"GPT.forward expects token ids of shape (batch, time), got {tuple(idx.shape)}")
        B, T = idx.shape
        if T > self.config.seq_len:
            raise ValueError(f"sequence length {T} exceeds GPTConfig.seq_len={self.config.seq_len}: crop the input")
        x = self.transformer.wte(idx)  # (B, T, C)
        rope = None
        if self.config.pos_embedding == "learned":
            x = x + self.transformer.wpe(torch.arange(T, device=idx.device))  # (T, C) broadcast over B
        else:
            rope = rope_cos_sin(T, self.config.head_size, idx.device)  # (T, hs) each
        x = self.transformer.drop(x)
        for block in self.transformer.h:
            x = block(x, rope)
        logits = self.lm_head(self.transformer.ln_f(x))  # (B, T, Vp)
        if self.config.padded_vocab_size != self.config.vocab_size:
            logits = logits[..., : self.config.vocab_size]  # (B, T, V): padding ids can never be predicted or sampled
        return logits

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count, the tied embedding once. non_embedding drops the position table (a lookup, no FLOPs) but
        keeps the token table, which is also the output projection, as nanoGPT and the FLOP estimate count it."""
        # a parameter partitioned by ZeRO-3 is empty locally; DeepSpeed records its full size as ds_numel
        numel = lambda p: getattr(p, "ds_numel", p.numel())  # noqa: E731
        n = sum(numel(p) for p in self.parameters())
        if non_embedding and "wpe" in self.transformer:
            n -= numel(self.transformer.wpe.weight)
        return n

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token, forward + backward: 6N + 12*L*H*Q*T (PaLM paper appendix B; nanoGPT estimate_mfu).

        6N: every weight takes part in one multiply-add (2 FLOPs) per token forward and twice that backward.
        12*L*H*Q*T: attention scores QK^T and the weighted sum of V, 2*T*Q FLOPs each per head per token forward (x3 for
        forward+backward), over L layers and H heads of size Q, with context T (the full T: causal-mask savings are not
        subtracted, as in PaLM). N = num_params(non_embedding=True). MFU = tokens/s * this / peak FLOP/s.
        """
        c = self.config
        T = c.seq_len if seq_len is None else seq_len
        return 6 * self.num_params(non_embedding=True) + 12 * c.n_layer * c.n_head * c.head_size * T

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        eos_id: int | None = None,
    ) -> torch.Tensor:
        """Append up to max_new_tokens sampled tokens to idx (B, T) -> (B, T + n), n <= max_new_tokens.

        temperature 0 is greedy; top_k keeps the k most likely tokens. With eos_id, a row that has produced it keeps
        producing it (so rows stay one tensor) and generation stops once every row has. Runs in eval mode (no dropout)
        and restores the previous mode. No KV cache: each step reruns the (cropped) context, fine for demos and evals.
        """
        if temperature < 0:
            raise ValueError(f"temperature={temperature} must be >= 0 (0 is greedy)")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k={top_k} must be >= 1 or None")
        was_training = self.training
        self.eval()
        try:
            finished = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
            for _ in range(max_new_tokens):
                logits = self(idx[:, -self.config.seq_len :])[:, -1, :].float()  # (B, V): only the last position
                if temperature == 0:
                    next_id = logits.argmax(dim=-1, keepdim=True)  # (B, 1)
                else:
                    logits = logits / temperature
                    if top_k is not None:
                        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]  # (B, 1)
                        logits = logits.masked_fill(logits < kth, float("-inf"))
                    next_id = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)  # (B, 1)
                if eos_id is not None:
                    next_id = next_id.masked_fill(finished[:, None], eos_id)
                    finished |= next_id[:, 0] == eos_id
                idx = torch.cat((idx, next_id), dim=1)
                if eos_id is not None and bool(finished.all()):
                    break
        finally:
            self.train(was_training)
        return idx

    # ------------------------------------------------------------------------------------------------------- files
    def save_pretrained(self, out_dir: str | os.PathLike) -> None:
        """Write config.json and model.safetensors to out_dir (created if needed), each atomically."""
        save_pretrained(out_dir, self.config, self.state_dict())

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, map_location: str | torch.device = "cpu", **overrides: Any
    ) -> "GPT":
        """Load a directory written by save_pretrained. overrides replace config fields that do not change shapes,
        e.g. dropout=0.1 for fine-tuning."""
        load_file = _safetensors().load_file
        path = Path(path)
        config_file, weights_file = path / CONFIG_FILE, path / WEIGHTS_FILE
        for f in (config_file, weights_file):
            if not f.is_file():
                raise FileNotFoundError(f"{f} not found: expected a directory written by GPT.save_pretrained")
        values = json.loads(config_file.read_text())
        _check_fields(overrides)
        config = GPTConfig.from_dict({**values, **overrides})
        with torch.device("meta"):  # no init work for weights that are about to be replaced
            model = cls(config)
        state = load_file(str(weights_file), device=str(map_location))
        result = model.load_state_dict(state, strict=False, assign=True)
        model.tie_weights()  # assign=True replaced wte.weight with a new Parameter; point lm_head at it again
        missing = [k for k in result.missing_keys if k != "lm_head.weight"]
        if missing or result.unexpected_keys:
            raise ValueError(
                f"{weights_file} does not match its config.json: missing {missing}, unexpected {result.unexpected_keys}"
            )
        return model


def _safetensors() -> Any:
    try:
        import safetensors.torch
    except ImportError as e:
        raise ImportError("saving and loading GPT weights needs safetensors: pip install safetensors") from e
    return safetensors.torch


def save_pretrained(out_dir: str | os.PathLike, config: GPTConfig, state_dict: dict[str, torch.Tensor]) -> None:
    """Write a GPT's config and weights. A function, not only a method, so export code can pass a state dict it has
    consolidated from FSDP or DeepSpeed shards. The tied output matrix (lm_head.weight) is stored once, as wte."""
    save_file = _safetensors().save_file
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items() if k != "lm_head.weight"}
    # weights first: a directory with a config.json has its weights
    _write_atomic(out_dir / WEIGHTS_FILE, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    text = json.dumps(config.to_dict(), indent=2) + "\n"
    _write_atomic(out_dir / CONFIG_FILE, lambda tmp: tmp.write_text(text))


def _write_atomic(path: Path, write: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
