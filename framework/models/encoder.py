"""A bidirectional transformer encoder (BERT-style) with a masked-LM head, in plain PyTorch.

The blocks are framework.models.transformer's, shared with the GPT, with causal=False: every position attends to
every other (and an optional padding mask hides padding). Unlike the original BERT it is pre-LayerNorm (as the GPT,
RoBERTa-era follow-ups and ModernBERT: stabler to train) and has no token-type embedding (RoBERTa dropped next-sentence
prediction and found it no loss). The MLM head is BERT's: dense -> GELU -> LayerNorm -> the token embedding matrix
(tied) + a bias. `forward` can score only the masked positions: at a 15% mask rate that cuts the largest matmul
(C x V) ~7x.

Shapes in comments: B batch, T sequence length, C n_embd, M masked positions, V vocab (Vp padded).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, ContextManager

import torch
import torch.nn as nn

from framework.models.transformer import (
    TransformerConfig,
    block_flops,
    init_weights,
    make_trunk,
    num_params,
    run_trunk,
    Pretrained,
)


# BERT sizes: the miniatures of Turc et al. 2019 ("Well-Read Students Learn Better", tiny..medium) and BERT base/large
# (Devlin et al. 2019). Vocab 30528 is BERT's 30522 padded to a multiple of 64; runs take the vocabulary of their
# tokenizer. The CPU presets use a byte vocab (256).
PRESETS: dict[str, dict[str, Any]] = {
    # CPU unit tests: a forward+backward in milliseconds.
    "bert-test": dict(vocab_size=256, seq_len=64, n_layer=2, n_head=2, n_embd=64),
    # The CPU smoke run: the size of the GPT demo's gpt-small-cpu.
    "bert-cpu": dict(vocab_size=256, seq_len=256, n_layer=4, n_head=4, n_embd=128),
    "bert-tiny": dict(vocab_size=30528, seq_len=512, n_layer=2, n_head=2, n_embd=128),
    "bert-mini": dict(vocab_size=30528, seq_len=512, n_layer=4, n_head=4, n_embd=256),
    "bert-small": dict(vocab_size=30528, seq_len=512, n_layer=4, n_head=8, n_embd=512),
    "bert-medium": dict(vocab_size=30528, seq_len=512, n_layer=8, n_head=8, n_embd=512),
    "bert-base": dict(vocab_size=30528, seq_len=512, n_layer=12, n_head=12, n_embd=768),
    "bert-large": dict(vocab_size=30528, seq_len=512, n_layer=24, n_head=16, n_embd=1024),
}


@dataclass
class EncoderConfig(TransformerConfig):
    model_type: ClassVar[str] = "bert"
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = PRESETS

    vocab_size: int = 30528
    seq_len: int = 512


class MLMHead(nn.Module):
    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")
        self.ln = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.decoder = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)  # tied to the token embedding
        self.bias = nn.Parameter(torch.zeros(config.padded_vocab_size))
        self.vocab_size = config.vocab_size

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Hidden states (..., C) -> logits (..., V)."""
        logits = self.decoder(self.ln(self.gelu(self.dense(h)))) + self.bias  # (..., Vp)
        return logits[..., : self.vocab_size]  # padding ids can never be predicted


class Encoder(Pretrained):
    config_class = EncoderConfig
    tied_weights = ("mlm_head.decoder.weight",)  # stored once, as transformer.wte.weight
    causal = False

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = make_trunk(config, causal=False)
        self.mlm_head = MLMHead(config)
        self.tie_weights()
        self.init_weights()

    def tie_weights(self) -> None:
        self.mlm_head.decoder.weight = self.transformer.wte.weight

    def init_weights(self, gather: Callable[[nn.Module], ContextManager[Any]] | None = None) -> None:
        """GPT-2/BERT init (framework.models.transformer.init_weights); public for meta-device and ZeRO-3 builds."""
        if self.mlm_head.decoder.weight is not self.transformer.wte.weight:
            self.tie_weights()
        init_weights(self, self.config, skip=(self.mlm_head.decoder,), gather=gather)
        with torch.no_grad(), gather(self.mlm_head) if gather is not None else contextlib.nullcontext():
            self.mlm_head.bias.zero_()

    def encode(self, idx: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids (B, T) [+ padding mask (B, T), 1 = real token] -> hidden states (B, T, C)."""
        return run_trunk(self.transformer, self.config, idx, causal=False, attention_mask=attention_mask)

    def forward(self, idx: torch.Tensor, attention_mask: torch.Tensor | None = None,
                predict: torch.Tensor | None = None) -> torch.Tensor:
        """Masked-LM logits. With `predict` (bool (B, T): the positions to score) -> (M, V) for those positions only,
        in row-major order, so the head runs on M rows instead of B*T; without it -> (B, T, V)."""
        h = self.encode(idx, attention_mask)  # (B, T, C)
        if predict is not None:
            h = h[predict]  # (M, C): gather first, then project
        return self.mlm_head(h)

    def num_params(self, non_embedding: bool = True) -> int:
        return num_params(self, exclude=("wpe.weight",) if non_embedding else ())

    def flops(self, sequences: int, seq_len: int, predicted: int) -> int:
        """Training FLOPs (forward + backward, matrix multiplies) of `sequences` sequences of `seq_len` tokens with
        `predicted` positions scored by the head: the blocks for every token, the head (C x C dense and C x Vp
        decoder) only for the predicted ones."""
        c = self.config
        head = 6 * (c.n_embd * c.n_embd + c.n_embd * c.padded_vocab_size)
        return block_flops(c, sequences * seq_len, seq_len) + head * predicted

