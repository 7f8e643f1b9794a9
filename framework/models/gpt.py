"""A GPT (decoder-only transformer) in plain PyTorch: config dataclass with named presets, the model, and its files.

Architecture follows GPT-2 / nanoGPT: pre-LayerNorm blocks, GELU MLP (4x), tied input/output embeddings, GPT-2 init,
causal attention through `F.scaled_dot_product_attention` (flash / memory-efficient kernels on GPU). Module names match
nanoGPT and the GPT-2 checkpoints (`transformer.wte`, `h.0.attn.c_attn`, ...) so weights map across by name. The
blocks are framework.models.transformer's, shared with the encoder (causal=True here).

This file holds only the architecture. Sharding, precision, torch.compile and optimizer grouping are applied from
outside (framework.distributed, framework.tasks), activation checkpointing included
(`framework.distributed.apply_activation_checkpointing` hooks each `Block`).

Shapes in comments: B batch, T sequence length, C n_embd, V vocab (Vp padded).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar, ContextManager

import torch
import torch.nn as nn
import torch.nn.functional as F

from framework.models.moe import MoE, MoEConfig
from framework.models.transformer import (
    TransformerConfig,
    block_flops,
    check_bool,
    init_weights,
    make_trunk,
    num_params,
    run_trunk,
    KVCache,
    Pretrained,
)


LLAMA: dict[str, Any] = dict(norm="rmsnorm", mlp="swiglu", pos_embedding="rope", bias=False)
LLAMA_3: dict[str, Any] = dict(LLAMA, vocab_size=128256, rope_theta=500000.0, norm_eps=1e-5)
LLAMA_3_2_ROPE = dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                      original_max_position_embeddings=8192)

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
    # Mixture-of-Experts (framework.models.moe). Expert hidden size 4*C/top_k: a token's active MLP is the dense one's.
    "gpt-moe-test": dict(vocab_size=256, seq_len=64, n_layer=2, n_head=2, n_embd=64,
                         moe=dict(num_experts=4, top_k=2)),
    # gpt-small-cpu with 8 experts, top-2, in every block: the same active parameters (0.83M), 2.9x the total (2.4M)
    "gpt-moe-cpu": dict(vocab_size=256, seq_len=256, n_layer=4, n_head=4, n_embd=128,
                        moe=dict(num_experts=8, top_k=2)),
    # OLMoE-1B-7B's shape (Muennighoff et al. 2024: 16 layers, d 2048, 64 experts of 1024, top-8, RoPE, no biases)
    # with GELU experts (OLMoE's are SwiGLU): ~4.7B parameters, ~0.9B active
    "gpt-moe-olmoe": dict(vocab_size=50304, seq_len=4096, n_layer=16, n_head=16, n_embd=2048, bias=False,
                          pos_embedding="rope", moe=dict(num_experts=64, top_k=8, expert_hidden=1024)),
    # The Llama block (Touvron et al. 2023; Meta's Llama 3 model cards): RMSNorm, SwiGLU, RoPE, no biases, grouped-query
    # attention. llama-test / llama-cpu are gpt-tiny / gpt-small-cpu with it: a block has exactly the GPT-2 block's
    # weights (GQA's smaller K/V pays for SwiGLU's third matrix), and no position table.
    "llama-test": dict(LLAMA, vocab_size=256, seq_len=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, mlp_hidden=192),
    "llama-cpu": dict(LLAMA, vocab_size=256, seq_len=256, n_layer=4, n_head=4, n_kv_head=2, n_embd=128,
                      mlp_hidden=384),
    # Llama 3.2 1B / 3B and Llama 3 8B shapes (sizes only: the weights come with `init_from hf:DIR`). 1.24B, 3.21B and
    # 8.03B parameters. seq_len is a training context; the 3.2 models' RoPE scaling serves up to 131072.
    "llama-3.2-1b": dict(LLAMA_3, seq_len=8192, n_layer=16, n_head=32, n_kv_head=8, n_embd=2048, mlp_hidden=8192,
                         rope_scaling=LLAMA_3_2_ROPE),
    "llama-3.2-3b": dict(LLAMA_3, seq_len=8192, n_layer=28, n_head=24, n_kv_head=8, n_embd=3072, mlp_hidden=8192,
                         rope_scaling=LLAMA_3_2_ROPE),
    "llama-3-8b": dict(LLAMA_3, seq_len=8192, n_layer=32, n_head=32, n_kv_head=8, n_embd=4096, mlp_hidden=14336,
                       tie_embeddings=False),
}


@dataclass
class GPTConfig(TransformerConfig):
    model_type: ClassVar[str] = "gpt"
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = PRESETS
    # sparse MLPs: {num_experts, top_k, every_n_layers, shared_experts, router, balance, ...} (MoEConfig); null: dense
    moe: MoEConfig | dict[str, Any] | None = None
    # one matrix embeds tokens and scores them (Press & Wolf 2017; GPT-2, Llama 3.2 1B/3B); false: a separate lm_head
    # (Llama 3 8B)
    tie_embeddings: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_bool(self, "tie_embeddings")
        self.moe = MoEConfig.from_value(self.moe)


class GPT(Pretrained):
    config_class = GPTConfig
    tied_weights = ("lm_head.weight",)  # stored once, as transformer.wte.weight (with tie_embeddings)
    causal = True

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.tied_weights = self.tied_in(config)
        self.transformer = make_trunk(config, causal=True)
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        self.tie_weights()
        self.init_weights()

    @classmethod
    def tied_in(cls, config: GPTConfig) -> tuple[str, ...]:
        return cls.tied_weights if config.tie_embeddings else ()

    def tie_weights(self) -> None:
        """One matrix embeds tokens and scores them (Press & Wolf 2017): fewer parameters, and it trains as well."""
        if self.config.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight

    def init_weights(self, gather: Callable[[nn.Module], ContextManager[Any]] | None = None) -> None:
        """GPT-2 init (framework.models.transformer.init_weights). Public so that a model built on the meta device and
        materialized with `to_empty`, or built partitioned under ZeRO-3, can be initialized in place. `to_empty`
        gives each module its own new Parameter, which unties lm_head from wte: tie them again first."""
        if self.config.tie_embeddings and self.lm_head.weight is not self.transformer.wte.weight:
            self.tie_weights()
        # a tied lm_head is wte; an untied one gets the same N(0, 0.02) as every matrix
        init_weights(self, self.config, skip=(self.lm_head,) if self.config.tie_embeddings else (), gather=gather)

    def forward(self, idx: torch.Tensor, attention_mask: torch.Tensor | None = None,
                cache: KVCache | None = None) -> torch.Tensor:
        """Token ids (B, T) [+ padding mask (B, T), 1 = real token] -> logits (B, T, vocab_size) for the next token
        at every position. With a KVCache (inference), idx continues the cached tokens and the cache grows."""
        x = run_trunk(self.transformer, self.config, idx, causal=True, attention_mask=attention_mask,
                      cache=cache)  # (B, T, C)
        logits = self.lm_head(x)  # (B, T, Vp)
        if self.config.padded_vocab_size != self.config.vocab_size:
            logits = logits[..., : self.config.vocab_size]  # (B, T, V): padding ids can never be predicted or sampled
        return logits

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count, the tied embedding once. non_embedding drops the position table (a lookup, no FLOPs) but
        keeps the token table, which is also the output projection, as nanoGPT and the FLOP estimate count it."""
        return num_params(self, exclude=("wpe.weight",) if non_embedding else ())

    def moe_layers(self) -> list[MoE]:
        """The blocks' sparse MLPs, in depth order (empty for a dense model)."""
        return [m for m in self.modules() if isinstance(m, MoE)]

    def num_active_params(self, non_embedding: bool = True) -> int:
        """Parameters one token uses: all of them but the experts its router does not pick (top_k of num_experts)."""
        total = self.num_params(non_embedding)
        moe = self.config.moe
        if moe is None:
            return total
        per_expert = 2 * self.config.n_embd * moe.hidden(self.config.n_embd)
        return total - len(self.moe_layers()) * (moe.num_experts - moe.top_k) * per_expert

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token (forward + backward, matrix multiplies): the blocks (see block_flops) plus the
        output projection, 6 * C * Vp (the padded table is what the matmul computes)."""
        c = self.config
        return block_flops(c, 1, c.seq_len if seq_len is None else seq_len) + 6 * c.n_embd * c.padded_vocab_size

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
        and restores the previous mode. Keys and values are cached (KVCache): each new token runs through the blocks
        alone while the context fits in config.seq_len; past that, every step reruns the last seq_len tokens (the
        window's positions restart at 0, so cached keys no longer apply). Same tokens as rerunning the context.
        """
        if temperature < 0:
            raise ValueError(f"temperature={temperature} must be >= 0 (0 is greedy)")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k={top_k} must be >= 1 or None")
        was_training = self.training
        self.eval()
        try:
            finished = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
            cache: KVCache | None = None
            for _ in range(max_new_tokens):
                if idx.size(1) <= self.config.seq_len:
                    if cache is None:  # the prompt, once
                        cache = KVCache(self.config.n_layer)
                        logits = self(idx, cache=cache)
                    else:  # only the token sampled last
                        logits = self(idx[:, -1:], cache=cache)
                else:  # the window slides: no cache
                    logits = self(idx[:, -self.config.seq_len :])
                logits = logits[:, -1, :].float()  # (B, V): only the last position
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

