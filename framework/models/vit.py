"""A Vision Transformer (Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words") in plain PyTorch.

An image is cut into non-overlapping patch x patch squares, each projected to n_embd (a Conv2d with kernel = stride =
patch is exactly that linear map, applied to every square at once); a learned `cls` token is prepended, learned
position embeddings are added, and the sequence runs through framework.models.transformer's Blocks with causal=False
(the same pre-LN blocks as the GPT and the encoder: every patch attends to every other); with `ln_pre`, a LayerNorm
normalizes the embeddings before the first block, as OpenAI's CLIP image tower does. The pooled feature is the
final-LayerNorm'd cls token ("cls", ViT/DeiT) or the mean of the patch tokens ("mean", as MAE and big_vision's later
recipes); `head` maps it to class logits. With num_classes=0 the model is a feature tower (CLIP's image encoder).

This file holds only the architecture: sharding (each `Block` is one FSDP unit), activation checkpointing, precision
and compile are applied from outside, as for the GPT.

Shapes in comments: B batch, Ch image channels, H = W image_size, P patch, N patches (H/P)^2, T = N + 1 tokens,
C n_embd, K classes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar, ContextManager

import torch
import torch.nn as nn

from framework.models.transformer import (
    ACTIVATIONS,
    INIT_STD,
    Block,
    ConfigError,
    PresetConfig,
    block_flops,
    check_bool,
    check_choice,
    check_dropout,
    check_heads,
    check_positive_ints,
    gathered,
    init_weights,
    num_params,
    Pretrained,
)

POOLINGS = ("cls", "mean")

# Sizes: DeiT (Touvron et al. 2021, table 1: Ti/S are ViT-B's depth at a third and half the width) and ViT-B/16
# (Dosovitskiy et al. 2021, table 1). Parameter counts with the 1000-class head: 5.7M, 22.1M, 86.6M.
PRESETS: dict[str, dict[str, Any]] = {
    # CPU unit tests: a forward+backward in milliseconds (16 patches + cls).
    "vit-test": dict(image_size=32, patch_size=8, n_layer=2, n_head=2, n_embd=64, num_classes=10),
    # The CPU smoke run on 64 px synthetic shapes (num_classes is the data's, set at run time): 64 patches + cls,
    # 0.83M parameters with 36 classes. A forward+backward+AdamW step at batch 64 takes ~180 ms on 2 CPU cores
    # (torch 2.13, fp32). Mean pooling (Beyer et al. 2022, "Better plain ViT baselines": better than cls for plain
    # ViTs; here 34% vs 29% val accuracy after 600 steps). Without a CNN's locality prior a ViT learns shapes slowly:
    # on a 36-class (6 colours x 6 shapes) 64 px set it reached 34% after 600 steps (2 minutes) and 64% after 1500
    # (5.5 minutes), where resnet-cpu reached 90% after 600.
    "vit-cpu": dict(image_size=64, patch_size=8, n_layer=4, n_head=4, n_embd=128, pooling="mean"),
    "vit-tiny/16": dict(image_size=224, patch_size=16, n_layer=12, n_head=3, n_embd=192),
    "vit-small/16": dict(image_size=224, patch_size=16, n_layer=12, n_head=6, n_embd=384),
    "vit-base/16": dict(image_size=224, patch_size=16, n_layer=12, n_head=12, n_embd=768),
}


@dataclass
class ViTConfig(PresetConfig):
    model_type: ClassVar[str] = "vit"
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = PRESETS

    image_size: int = 224  # square inputs of exactly this size: the position table has one row per patch
    patch_size: int = 16
    channels: int = 3
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True
    num_classes: int = 1000  # 0: no head, `forward` returns the pooled features (a feature tower)
    pooling: str = "cls"  # "cls" token or "mean" of the patch tokens
    # A LayerNorm on the embeddings (patches + positions) before the first block: OpenAI's CLIP image tower has it
    # (`ln_pre`; Hugging Face's CLIPVisionModel: `pre_layrnorm`), the original ViT does not
    ln_pre: bool = False
    # A bias on the patch projection (only with `bias`). OpenAI's CLIP has none: its position rows already add a
    # learned vector to every patch, so the bias is redundant there
    patch_bias: bool = True
    # the blocks' MLP activation and the LayerNorms' eps: the tanh GELU and 1e-5 here; Google's ViT checkpoints use
    # "gelu_exact" and 1e-12, OpenAI's CLIP "quick_gelu" (framework.models.transformer.ACTIVATIONS)
    mlp: str = "gelu"
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        check_positive_ints(self, "image_size", "patch_size", "channels", "n_layer", "n_head", "n_embd")
        check_heads(self)
        check_dropout(self)
        for name in ("bias", "ln_pre", "patch_bias"):
            check_bool(self, name)
        check_choice(self, "pooling", POOLINGS)
        check_choice(self, "mlp", tuple(ACTIVATIONS))
        if isinstance(self.norm_eps, bool) or not isinstance(self.norm_eps, (int, float)) or not self.norm_eps > 0:
            raise ConfigError(f"ViTConfig.norm_eps={self.norm_eps!r} must be a positive number")
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int) or self.num_classes < 0:
            raise ConfigError(f"ViTConfig.num_classes={self.num_classes!r} must be an integer >= 0 (0: no head)")
        if self.image_size % self.patch_size:
            lo = self.image_size // self.patch_size * self.patch_size
            raise ConfigError(f"ViTConfig.image_size={self.image_size} must be a multiple of patch_size="
                              f"{self.patch_size}: use image_size={lo or self.patch_size} or "
                              f"{lo + self.patch_size}, or a patch_size that divides {self.image_size}")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


class ViT(Pretrained):
    config_class = ViTConfig
    block_types = (Block,)  # the units of FSDP sharding and activation checkpointing

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.patch_embed = nn.Conv2d(c.channels, c.n_embd, kernel_size=c.patch_size, stride=c.patch_size,
                                     bias=c.bias and c.patch_bias)
        self.cls_token = nn.Parameter(torch.empty(1, 1, c.n_embd))
        self.pos_embed = nn.Parameter(torch.empty(1, 1 + c.num_patches, c.n_embd))  # row 0 is the cls token's
        if c.ln_pre:  # only then a module: checkpoints written without it keep their exact set of tensors
            self.ln_pre = nn.LayerNorm(c.n_embd, eps=c.norm_eps, bias=c.bias)
        self.drop = nn.Dropout(c.dropout)
        # the transformer's Blocks read only n_embd, n_head, bias and dropout from a config: a ViTConfig has them all
        self.blocks = nn.ModuleList(Block(c, causal=False) for _ in range(c.n_layer))
        self.ln_f = nn.LayerNorm(c.n_embd, eps=c.norm_eps, bias=c.bias)
        self.head = nn.Linear(c.n_embd, c.num_classes) if c.num_classes else nn.Identity()
        self.init_weights()

    @property
    def feature_dim(self) -> int:
        return self.config.n_embd

    def init_weights(self, gather: Callable[[nn.Module], ContextManager[Any]] | None = None) -> None:
        """Public so that a meta-device build, or one partitioned under ZeRO-3 (`gather` = GatheredParameters), can be
        initialized in place.

        Blocks, LayerNorms: the GPT-2 init (framework.models.transformer.init_weights: N(0, 0.02), the residual
        projections scaled by 1/sqrt(2 n_layer)). cls and position embeddings: N(0, 0.02), as the token embeddings.
        The patch projection is a Linear from Ch*P*P pixels to C, so it gets a Linear's N(0, 0.02) too (timm and MAE
        use a Xavier-uniform of the flattened kernel instead: std 0.036 at ViT-B/16's sizes). The head starts at zero
        (as big_vision's ViT): the first logits are all 0, the loss starts at exactly log K, and the first updates do
        not fight a random projection of features that are themselves random.
        """
        init_weights(self, self.config, gather=gather)  # blocks, ln_pre, ln_f, the head as a Linear (zeroed next)
        with torch.no_grad():
            with gathered(self, gather):  # cls_token and pos_embed are this module's own parameters
                nn.init.normal_(self.cls_token, std=INIT_STD)
                nn.init.normal_(self.pos_embed, std=INIT_STD)
            with gathered(self.patch_embed, gather):
                nn.init.normal_(self.patch_embed.weight, std=INIT_STD)
                if self.patch_embed.bias is not None:
                    nn.init.zeros_(self.patch_embed.bias)
            if isinstance(self.head, nn.Linear):
                with gathered(self.head, gather):
                    nn.init.zeros_(self.head.weight)
                    nn.init.zeros_(self.head.bias)

    def tie_weights(self) -> None:
        """Nothing is tied."""

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, Ch, H, W) -> every final token (B, T, C), after ln_f; token 0 is the cls token."""
        c = self.config
        if images.dim() != 4 or tuple(images.shape[1:]) != (c.channels, c.image_size, c.image_size):
            raise ValueError(f"expected images of shape (batch, {c.channels}, {c.image_size}, {c.image_size}), got "
                             f"{tuple(images.shape)}: resize or crop to the model's image_size (its position table "
                             "has one row per patch)")
        x = self.patch_embed(images)  # (B, C, H/P, W/P)
        x = x.flatten(2).transpose(1, 2)  # (B, N, C), patches in row-major order
        x = torch.cat([self.cls_token.expand(x.size(0), -1, -1), x], dim=1)  # (B, T, C)
        x = x + self.pos_embed
        if self.config.ln_pre:
            x = self.ln_pre(x)
        x = self.drop(x)
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, Ch, H, W) -> pooled features (B, C)."""
        x = self.tokens(images)  # (B, T, C)
        return x[:, 0] if self.config.pooling == "cls" else x[:, 1:].mean(dim=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, Ch, H, W) -> class logits (B, K), or the pooled features (B, C) when num_classes is 0."""
        return self.head(self.features(images))

    def num_params(self) -> int:
        return num_params(self)

    def flops(self, images: int) -> int:
        """Training FLOPs (forward + backward = 3x forward; matrix multiplies only, as block_flops) of `images`
        images: the patch projection (2 * Ch*P*P * C per patch), the blocks on T tokens each, and the head."""
        c = self.config
        T = c.num_patches + 1
        patch = 2 * c.num_patches * c.channels * c.patch_size**2 * c.n_embd
        head = 2 * c.n_embd * c.num_classes
        return block_flops(c, images * T, T) + 3 * images * (patch + head)


