"""CLIP (Radford et al. 2021, "Learning Transferable Visual Models From Natural Language Supervision") in plain
PyTorch: an image tower and a text tower, each followed by a linear projection into one shared embedding space, and a
learned temperature. The loss (framework.objectives.contrastive.clip_loss) pulls each image towards its own caption
and away from every other caption of the global batch, and vice versa.

- `visual`: a ViT or a ResNet feature tower (framework.models.vit / resnet with num_classes=0). Its state dict is the
  tower's own under `visual.`, so a CLIP checkpoint's image tower loads into a ViT/ResNet classifier as it is.
- `text`: the GPT/encoder trunk of framework.models.transformer (`text.{wte,wpe,h,ln_f}`). Captions arrive as raw
  token ids (B, L) with lengths (B,) and are framed as the classifier frames documents
  (framework.models.classifier.frame_documents): a GPT reads caption `<|endoftext|>`, causally, and is pooled at that
  last token, the only one that has read the whole caption (OpenAI's CLIP pools at its EOT token the same way); an
  encoder reads `<|cls|>` caption `<|sep|>` with a padding mask and is pooled at `<|cls|>`.
- `forward(..., chunks=k)`: gradient accumulation that keeps every negative (the GradCache idea, Gao et al. 2021; as
  open_clip's --accum-freq). See `CLIP.forward`.

This file holds only the architecture: sharding (the units are transformer Blocks and ResNet Stages: `block_types`),
activation checkpointing, precision and compile are applied from outside, as for every family.

Shapes in comments: B batch, Ch/H/W image channels/height/width, L longest caption, T framed length, C a tower's
width, E embed_dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, ContextManager

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from framework.models.classifier import frame_documents, framed_len
from framework.models.gpt import GPTConfig
from framework.models.registry import family, image_models, text_backbones
from framework.models.resnet import ResNetConfig, Stage
from framework.models.transformer import (
    Block,
    ConfigError,
    PresetConfig,
    TransformerConfig,
    block_flops,
    check_positive_ints,
    gathered,
    init_weights,
    make_trunk,
    num_params,
    run_trunk,
    Pretrained,
)
from framework.models.vit import ViTConfig

# The byte tokenizer's special ids (framework.data.tokenizer: bytes are 0..255, then eod, pad, mask, cls, sep) and its
# vocabulary of 261, so that the CPU presets build and run on their own; a run replaces both, the text vocab_size and
# the special ids, with its data's tokenizer's.
BYTE_SPECIALS = {"eod": 256, "pad": 257, "cls": 259, "sep": 260}
BYTE_VOCAB = 261
OPENAI_SPECIALS = {"eod": 49407, "pad": 0}  # OpenAI's CLIP BPE: <|endoftext|> is 49407, captions are 0-padded


PRESETS: dict[str, dict[str, Any]] = {
    # CPU unit tests: two 2-layer, 64-wide towers.
    "clip-test": dict(
        image=ViTConfig.from_preset("vit-test", num_classes=0).to_dict(),
        text=GPTConfig(vocab_size=BYTE_VOCAB, seq_len=32, n_layer=2, n_head=2, n_embd=64).to_dict(),
        embed_dim=32, special_ids=BYTE_SPECIALS),
    # The CPU smoke run on the synthetic shapes set's captions (64 px images, byte-level captions of < 64 tokens):
    # vit-cpu and a 3-layer, 128-wide byte-level GPT, 1.50M parameters in all. A forward+backward+AdamW step at batch
    # 64 (captions of ~40 tokens) takes ~280 ms on 2 CPU cores (torch 2.13, fp32), the image tower ~180 ms of it.
    "clip-cpu": dict(
        image=ViTConfig.from_preset("vit-cpu", num_classes=0).to_dict(),
        text=GPTConfig(vocab_size=BYTE_VOCAB, seq_len=64, n_layer=3, n_head=4, n_embd=128).to_dict(),
        embed_dim=128, special_ids=BYTE_SPECIALS),
    # OpenAI's ViT-B/16 CLIP: ViT-B/16 image tower with a LayerNorm before the first block and no patch bias (as
    # OpenAI's), a 12-layer 512-wide 8-head causal text transformer over 77 BPE tokens (vocab 49408), embeddings of
    # 512: 149,620,737 parameters, exactly OpenAI's (and Hugging Face's CLIPModel of these sizes).
    "clip-vit-b-16": dict(
        image=ViTConfig.from_preset("vit-base/16", num_classes=0, ln_pre=True, patch_bias=False).to_dict(),
        text=GPTConfig(vocab_size=49408, seq_len=77, n_layer=12, n_head=8, n_embd=512).to_dict(),
        embed_dim=512, special_ids=OPENAI_SPECIALS),
}


@dataclass
class CLIPConfig(PresetConfig):
    model_type: ClassVar[str] = "clip"
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = PRESETS

    # the image tower's config dict ("vit" or "resnet", with its model_type); num_classes is forced to 0 (no head)
    image: dict[str, Any] = field(default_factory=lambda: dict(PRESETS["clip-vit-b-16"]["image"]))
    # the text trunk's config dict ("gpt": causal, pooled at eod; "bert": bidirectional, pooled at cls)
    text: dict[str, Any] = field(default_factory=lambda: dict(PRESETS["clip-vit-b-16"]["text"]))
    embed_dim: int = 512
    special_ids: dict[str, int] = field(default_factory=lambda: dict(OPENAI_SPECIALS))  # how captions are framed
    # CLIP's temperature is learned as log(1/tau) and starts at tau = 0.07 (Wu et al. 2018's value)
    init_logit_scale: float = math.log(1 / 0.07)
    # logits are scaled by at most 100: past it training becomes unstable (Radford et al. 2021, section 2.5)
    max_logit_scale: float = 100.0

    def __post_init__(self) -> None:
        self.image = self._tower_dict("image", image_models(), {"num_classes": 0})
        self.text = self._tower_dict("text", text_backbones(), {})
        check_positive_ints(self, "embed_dim")
        framing = family(self.text["model_type"]).framing
        if not isinstance(self.special_ids, dict):
            raise ConfigError(f"CLIPConfig.special_ids={self.special_ids!r} must map token names to ids")
        self.special_ids = dict(self.special_ids)  # not the preset's own dict
        missing = [k for k in framing if k not in self.special_ids]
        if missing:
            raise ConfigError(f"CLIPConfig.special_ids lacks {missing}: a {self.text['model_type']!r} text tower "
                              f"frames captions with {', '.join(framing)}")
        vocab = self.text["vocab_size"]
        for name in framing:
            value = self.special_ids[name]
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < vocab:
                raise ConfigError(f"CLIPConfig.special_ids[{name!r}]={value!r} is not a token id of the text tower's "
                                  f"vocabulary (0..{vocab - 1}): set text.vocab_size to the tokenizer's size")
        for name in ("init_logit_scale", "max_logit_scale"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(f"CLIPConfig.{name}={value!r} must be a finite number")
        if self.max_logit_scale <= 0 or math.exp(self.init_logit_scale) > self.max_logit_scale:
            raise ConfigError(f"CLIPConfig: exp(init_logit_scale)={math.exp(self.init_logit_scale):.4g} must be at "
                              f"most max_logit_scale={self.max_logit_scale} (> 0): above the cap the scale gets no "
                              "gradient and would never move")

    def _tower_dict(self, name: str, families: list[str], forced: dict[str, Any]) -> dict[str, Any]:
        """A tower's dict, checked by its own config class and written out in full (so the round trip is exact)."""
        values = getattr(self, name)
        if not isinstance(values, dict):
            raise ConfigError(f"CLIPConfig.{name}={values!r} must be a config dict with a model_type")
        model_type = values.get("model_type")
        if model_type not in families:
            raise ConfigError(f"CLIPConfig.{name}.model_type={model_type!r} must be one of {', '.join(families)}")
        try:
            return family(model_type).config_class.from_dict({**values, **forced}).to_dict()
        except ConfigError as e:
            raise ConfigError(f"CLIPConfig.{name}: {e}") from e

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "CLIPConfig":
        """The named preset with some fields replaced. `image` and `text` are merged key by key into the preset's
        (`text={"vocab_size": 32000}` keeps the rest of the text tower), unless they name another model_type, which
        replaces the tower."""
        base = cls.PRESETS.get(name, {})
        for key in ("image", "text"):
            value = overrides.get(key)
            if isinstance(value, dict) and key in base and value.get("model_type", base[key]["model_type"]) == \
                    base[key]["model_type"]:
                overrides[key] = {**base[key], **value}
        return super().from_preset(name, **overrides)

    def image_config(self) -> ViTConfig | ResNetConfig:
        return family(self.image["model_type"]).config_class.from_dict(self.image)

    def text_config(self) -> TransformerConfig:
        return family(self.text["model_type"]).config_class.from_dict(self.text)


class CLIP(Pretrained):
    config_class = CLIPConfig
    block_types = (Block, Stage)  # the units of FSDP sharding and activation checkpointing, in either tower

    def __init__(self, config: CLIPConfig) -> None:
        super().__init__()
        self.config = config
        self.text_config = config.text_config()
        self.causal = family(self.text_config.model_type).causal
        self.visual = family(config.image["model_type"]).model_class(config.image_config())
        self.text = make_trunk(self.text_config, causal=self.causal)
        self.image_proj = nn.Linear(self.visual.feature_dim, config.embed_dim, bias=False)
        self.text_proj = nn.Linear(self.text_config.n_embd, config.embed_dim, bias=False)
        # (1,) log(1/temperature): one element, not a scalar, because FSDP2 shards parameters along a dimension
        self.logit_scale = nn.Parameter(torch.full((1,), float(config.init_logit_scale)))
        self.init_weights()

    def init_weights(self, gather: Callable[[nn.Module], ContextManager[Any]] | None = None) -> None:
        """Each tower's own init (public for meta-device and ZeRO-3 builds: `gather` = GatheredParameters). The
        projections are N(0, width^-1/2) (as OpenAI's CLIP): each embedding coordinate starts with the variance of
        one feature. After the L2 normalization their scale does not change the output, but it sets how large the
        gradient that reaches the towers is."""
        self.visual.init_weights(gather)
        init_weights(self.text, self.text_config, gather=gather)
        with torch.no_grad():
            for proj in (self.image_proj, self.text_proj):
                with gathered(proj, gather):
                    nn.init.normal_(proj.weight, std=proj.in_features**-0.5)
            with gathered(self, gather):  # logit_scale is this module's own parameter
                self.logit_scale.fill_(self.config.init_logit_scale)

    def tie_weights(self) -> None:
        """Nothing is tied (the text trunk has no LM head here)."""

    # ------------------------------------------------------------------------------------------------------ towers
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, Ch, H, W) -> L2-normalized embeddings (B, E)."""
        return F.normalize(self.image_proj(self.visual.features(images)), dim=-1)

    def encode_text(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Captions (B, L) whose first `lengths` (B,) tokens are real -> L2-normalized embeddings (B, E)."""
        framed, real, pool_at = frame_documents(tokens, lengths, self.config.special_ids, self.causal)  # (B, T)
        # a GPT needs no padding mask: with right padding and causal attention no real token sees a pad
        h = run_trunk(self.text, self.text_config, framed, causal=self.causal,
                      attention_mask=None if self.causal else real)  # (B, T, C)
        pooled = h[torch.arange(h.size(0), device=h.device), pool_at]  # (B, C): eod (GPT) or cls (encoder)
        return F.normalize(self.text_proj(pooled), dim=-1)

    def scale(self) -> torch.Tensor:
        """exp(logit_scale) capped at max_logit_scale. Clamped here, in forward, so above the cap the parameter gets
        no gradient (open_clip clamps the parameter itself after each step: the same ceiling)."""
        return self.logit_scale.exp().clamp(max=self.config.max_logit_scale).squeeze(0)  # ()

    def forward(self, images: torch.Tensor | None, tokens: torch.Tensor | None, lengths: torch.Tensor | None = None,
                chunks: int = 1) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
        """(image embeddings (B, E), caption embeddings (B, E), the logit scale ()): either tower may be skipped
        (None in, None out), e.g. to embed class prompts for zero-shot classification.

        chunks > 1: gradient accumulation that keeps every negative. The batch is split into `chunks` micro-batches
        and each tower runs on each under non-reentrant activation checkpointing (RNG state preserved, so dropout
        draws the same masks when recomputed): forward keeps only the inputs and the embeddings, the loss is then
        computed over the full batch, and backward recomputes one micro-batch at a time with grad and backpropagates
        the full-batch loss into it. Peak activation memory is one micro-batch's, the result the same as chunks=1
        (for a ViT exactly; a ResNet's BatchNorm sees micro-batch statistics, as with open_clip's accumulation), at
        the cost of a second forward.
        """
        image_emb = None if images is None else self._run(self.encode_image, chunks, images)
        text_emb = None
        if tokens is not None:
            if lengths is None:
                raise ValueError("CLIP.forward needs the captions' lengths with their tokens")
            text_emb = self._run(self.encode_text, chunks, tokens, lengths)
        return image_emb, text_emb, self.scale()

    @staticmethod
    def _run(encode: Callable[..., torch.Tensor], chunks: int, *inputs: torch.Tensor) -> torch.Tensor:
        if chunks == 1:
            return encode(*inputs)
        B = inputs[0].size(0)
        if isinstance(chunks, bool) or not isinstance(chunks, int) or not 1 <= chunks <= B:
            raise ValueError(f"chunks={chunks!r} must be an integer in [1, batch size {B}]")
        parts = zip(*(x.tensor_split(chunks) for x in inputs))
        if not torch.is_grad_enabled():  # nothing is stored without grad: micro-batches only bound the peak
            return torch.cat([encode(*p) for p in parts])
        return torch.cat([checkpoint(encode, *p, use_reentrant=False, preserve_rng_state=True) for p in parts])

    # ------------------------------------------------------------------------------------------------------ sizes
    def num_params(self) -> int:
        return num_params(self)

    def flops(self, images: int, text_tokens: int) -> int:
        """Training FLOPs (forward + backward, matrix multiplies) of a batch of `images` image-caption pairs whose
        caption ids, as passed to forward, number `text_tokens` (B * L, before framing): the image tower (see its
        flops), the text blocks on the framed captions, both projections. The B x B' similarity matrix of the loss
        (~6 B B' E, small next to the towers) and the recomputation of chunks > 1 (an extra forward, not model work,
        as MFU counts) are left out."""
        L = text_tokens // images if images else 0
        T = framed_len(L, self.causal)
        proj = 6 * images * (self.visual.feature_dim + self.text_config.n_embd) * self.config.embed_dim
        return self.visual.flops(images) + block_flops(self.text_config, images * T, T) + proj

