"""A sequence classifier on a pre-trainable backbone: a GPT's or an encoder's trunk, pooled, then a linear head.

The trunk keeps the backbone's names (`transformer.{wte,wpe,h,ln_f}`), so the weights of a pre-trained GPT or encoder
load into it as they are (their LM head is simply not used); `head` is new. Documents arrive as raw token ids
(B, L) with their lengths; the model frames them as its backbone was pre-trained to read a document:
- encoder: `<|cls|>` doc `<|sep|>`, bidirectional with a padding mask, pooled at `<|cls|>` or by the mean;
- GPT: doc `<|endoftext|>`, causal (right padding never reaches a real token), pooled at that last token (the only
  one that has read the whole document) or by the mean.
With `lora`, the blocks' projections carry low-rank adapters (framework.models.transformer.LoRALinear).

Shapes in comments: B batch, L longest document, T framed length, C n_embd, K classes.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, ContextManager

import torch
import torch.nn as nn

from framework.models.registry import config_from_dict, family, text_backbones
from framework.models.transformer import (ConfigError, LoRA, Pretrained, TransformerConfig, block_flops, init_weights,
                                          make_trunk, num_params, run_trunk, save_pretrained)


@dataclass
class ClassifierConfig:
    model_type: ClassVar[str] = "classifier"

    backbone: dict[str, Any]  # the backbone family's config (with its model_type)
    num_classes: int
    special_ids: dict[str, int]  # eod, pad, cls, sep: how documents are framed
    pooling: str = ""  # "" -> the family's default: last (GPT), cls (encoder)
    classifier_dropout: float = 0.1
    lora_rank: int = 0  # 0: no adapters
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    class_names: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        name = self.family
        if name not in text_backbones():
            raise ConfigError(f"a classifier's backbone must be one of {', '.join(text_backbones())}, got {name!r}")
        poolings = family(name).poolings
        self.pooling = self.pooling or poolings[0]
        if self.pooling not in poolings:
            raise ConfigError(f"pooling {self.pooling!r} does not suit a {name!r} backbone; use one of "
                              f"{', '.join(poolings)}")
        if self.num_classes < 2:
            raise ConfigError(f"a classifier needs at least 2 classes, got {self.num_classes}")
        if self.lora_rank < 0 or not 0 <= self.classifier_dropout < 1:
            raise ConfigError("lora_rank must be >= 0 and classifier_dropout in [0, 1)")

    @property
    def family(self) -> str:
        return self.backbone.get("model_type", "gpt")

    def backbone_config(self) -> TransformerConfig:
        return config_from_dict(self.backbone)

    @property
    def seq_len(self) -> int:
        return int(self.backbone["seq_len"])

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "model_type": self.model_type}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ClassifierConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names - {"model_type"})
        if unknown:
            raise ConfigError(f"unknown classifier config fields {unknown}")
        return cls(**{k: v for k, v in values.items() if k in names})


def frame_documents(tokens: torch.Tensor, lengths: torch.Tensor, special_ids: dict[str, int], causal: bool
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Documents (B, L) whose first `lengths` tokens are real -> (ids (B, T), padding mask (B, T), the position to
    pool for each row (B,)), framed as the backbone was pre-trained to read a document: a GPT (causal) reads
    doc `<|endoftext|>` and is pooled at that last token, the only one that has read the whole document; an encoder
    reads `<|cls|>` doc `<|sep|>` and is pooled at `<|cls|>`. Used by the classifier and CLIP's text tower."""
    B = tokens.size(0)
    rows = torch.arange(B, device=tokens.device)
    pad = torch.full((B, 1), special_ids["pad"], dtype=tokens.dtype, device=tokens.device)
    if causal:  # doc <|endoftext|>
        framed = torch.cat([tokens, pad], dim=1)  # (B, L + 1)
        framed[rows, lengths] = special_ids["eod"]
        pool_at = lengths
    else:  # <|cls|> doc <|sep|>
        cls = torch.full((B, 1), special_ids["cls"], dtype=tokens.dtype, device=tokens.device)
        framed = torch.cat([cls, tokens, pad], dim=1)  # (B, L + 2)
        framed[rows, lengths + 1] = special_ids["sep"]
        pool_at = torch.zeros_like(lengths)
    last = lengths if causal else lengths + 1  # the framing token after the document
    real = torch.arange(framed.size(1), device=tokens.device)[None, :] <= last[:, None]  # (B, T)
    return framed, real, pool_at


def framed_len(longest: int, causal: bool) -> int:
    """The framed length of documents of at most `longest` tokens: one framing token for a GPT, two for an encoder."""
    return longest + (1 if causal else 2)


class SequenceClassifier(Pretrained):
    config_class = ClassifierConfig

    def __init__(self, config: ClassifierConfig) -> None:
        super().__init__()
        self.config = config
        self.trunk_config = config.backbone_config()
        self.causal = family(config.family).causal
        lora = LoRA(config.lora_rank, config.lora_alpha, config.lora_dropout) if config.lora_rank else None
        self.transformer = make_trunk(self.trunk_config, causal=self.causal, lora=lora)
        self.dropout = nn.Dropout(config.classifier_dropout)
        self.head = nn.Linear(self.trunk_config.n_embd, config.num_classes)
        self.frozen_trunk = False  # a linear probe: the trunk stays in eval mode (no dropout) and gets no gradient
        self.init_weights()

    def init_weights(self, gather: Callable[[nn.Module], ContextManager[Any]] | None = None) -> None:
        init_weights(self, self.trunk_config, gather=gather)

    def tie_weights(self) -> None:
        """Nothing is tied (the backbone's LM head is not part of a classifier)."""

    def train(self, mode: bool = True) -> "SequenceClassifier":
        super().train(mode)
        if self.frozen_trunk:
            self.transformer.eval()
        return self

    def frame(self, tokens: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return frame_documents(tokens, lengths, self.config.special_ids, self.causal)

    def features(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Pooled document features (B, C)."""
        framed, real, pool_at = self.frame(tokens, lengths)
        # a GPT needs no padding mask: with right padding and causal attention no real token sees a pad
        mask = None if self.causal else real
        h = run_trunk(self.transformer, self.trunk_config, framed, causal=self.causal, attention_mask=mask)  # (B,T,C)
        if self.config.pooling == "mean":
            w = real.to(h.dtype)[..., None]  # (B, T, 1)
            return (h * w).sum(1) / w.sum(1)
        return h[torch.arange(h.size(0), device=h.device), pool_at]  # (B, C)

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Documents (B, L) and their lengths (B,) -> class logits (B, K)."""
        if self.frozen_trunk:
            with torch.no_grad():
                feats = self.features(tokens, lengths)
        else:
            feats = self.features(tokens, lengths)
        return self.head(self.dropout(feats))

    def framed_len(self, longest: int) -> int:
        return framed_len(longest, self.causal)

    def flops(self, sequences: int, seq_len: int) -> int:
        """Training FLOPs (matrix multiplies) of `sequences` framed sequences of `seq_len` tokens: the blocks (only
        forward when the trunk is frozen) and the head. LoRA's rank-r matmuls are left out (< 2r/C of a block's)."""
        blocks = block_flops(self.trunk_config, sequences * seq_len, seq_len)
        head = 6 * self.trunk_config.n_embd * self.config.num_classes * sequences
        return (blocks // 3 if self.frozen_trunk else blocks) + head

    def num_params(self, non_embedding: bool = True) -> int:
        return num_params(self, exclude=("wpe.weight",) if non_embedding else ())

    def merged_state_dict(self) -> dict[str, torch.Tensor]:
        """The state dict with every LoRA update folded into its weight (and the adapters left out)."""
        return merge_lora(self.state_dict(), self.config)

    def save_pretrained(self, out_dir: str | os.PathLike) -> None:
        config = dataclasses.replace(self.config, lora_rank=0) if self.config.lora_rank else self.config
        save_pretrained(out_dir, config, self.merged_state_dict())


def lora_scale(config: ClassifierConfig) -> float:
    return config.lora_alpha / config.lora_rank


def merged(weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    """W + scale * B A, computed in fp32, in W's dtype."""
    return (weight.float() + scale * (B.float() @ A.float())).to(weight.dtype)


def merge_lora(state: dict[str, torch.Tensor], config: ClassifierConfig) -> dict[str, torch.Tensor]:
    """W + (alpha / r) B A for every adapted weight; the lora_A/lora_B tensors are dropped."""
    if not config.lora_rank:
        return dict(state)
    out = {k: v for k, v in state.items() if ".lora_" not in k}
    for name in [k for k in state if k.endswith(".lora_A")]:
        base = name[: -len(".lora_A")]
        out[base + ".weight"] = merged(state[base + ".weight"], state[name], state[base + ".lora_B"],
                                       lora_scale(config))
    return out

