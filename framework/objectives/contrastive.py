"""Contrastive learning over the global batch: CLIP's symmetric InfoNCE of image-text pairs, the NT-Xent loss of two
augmented views (SimCLR; GraphCL and MolCLR for molecule graphs), and the retrieval and zero-shot measures of the
embeddings they learn. Pure functions of tensors; the only communication is the feature all-gather, explicit in
`gather_with_grad`.

Shapes in comments: B this rank's pairs, W world size, N = W * B the global batch (or a whole eval split), E embed_dim,
K classes, T prompt templates.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F


def _world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without an initialized process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _GatherWithGrad(torch.autograd.Function):
    """all_gather in forward; in backward, each rank's gradient w.r.t. its own rows is the sum over ranks of the
    gradient every rank's loss sends to those rows (all_reduce SUM, then this rank's slice). reduce_scatter would do
    both in one collective, but gloo has none."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        rank, world = _world()
        ctx.rank, ctx.rows = rank, x.size(0)
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)  # (W * B, ...), rank r's rows at [r * B, (r + 1) * B)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()  # all_reduce works in place: never on a tensor autograd may reuse
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.rows: (ctx.rank + 1) * ctx.rows]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Every rank's x (B, ...) concatenated in rank order -> (W * B, ...), differentiable: gradients flow back to
    the rank that produced each row. x itself (no copy) without an initialized process group or with one rank.

    Every rank must pass the same B (all_gather needs equal sizes: gloo raises, NCCL may hang or misplace rows): a
    short last batch is padded with filler samples, marked invalid for clip_loss, rather than sent with fewer rows."""
    _, world = _world()
    if world == 1:
        return x
    return _GatherWithGrad.apply(x)


def _gather(x: torch.Tensor) -> torch.Tensor:
    """all_gather without gradient (masks); bool travels as uint8, which every backend has."""
    _, world = _world()
    if world == 1:
        return x
    parts = [torch.empty_like(x, dtype=torch.uint8 if x.dtype == torch.bool else x.dtype) for _ in range(world)]
    dist.all_gather(parts, x.to(parts[0].dtype).contiguous())
    return torch.cat(parts).to(x.dtype)


def clip_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, scale: torch.Tensor,
              valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric InfoNCE of this rank's pairs against the global batch -> (mean loss over this rank's valid pairs,
    how many they are (a long tensor)).

    image_emb, text_emb: (B, E), L2-normalized, pair i = (image i, caption i); scale: () the logit scale;
    valid: bool (B,), False for filler or undecodable samples, which are then neither queries (no loss term) nor
    candidates (their columns are -inf for every query, on every rank).

    open_clip's "local loss": this rank's B images are scored against all N captions (gathered with their gradient),
    and its B captions against all N images, so each query still sees N - 1 negatives while the logits are B x N
    rather than N x N per rank. Pair i's label is its column in the gathered batch, rank * B + i. The loss is
    (CE(image -> text) + CE(text -> image)) / 2, averaged over this rank's valid rows, computed in float32 (or
    float64) whatever the embeddings' dtype.

    Why this gives exactly the single-process gradient: if every rank has n valid rows, the global-batch mean loss
    is (1 / W n) sum over all N rows = the mean over ranks of each rank's mean. DDP averages the ranks' gradients,
    i.e. it differentiates that mean over ranks, and gather_with_grad routes the part of each rank's loss that flows
    through another rank's embeddings (as negatives) back to that rank. So the averaged gradient is the gradient of
    the global mean, as if one process had computed clip_loss on the whole batch. With unequal counts n_r (filler
    in a last batch) each rank's rows weigh 1 / (W n_r) instead of 1 / sum(n_r): a rank with fewer valid rows counts
    each of them more. The caller that needs the exact global mean scales each rank's loss by
    W * n_r / all_reduce(sum n_r), using the returned count.
    """
    if image_emb.dim() != 2 or image_emb.shape != text_emb.shape:
        raise ValueError(f"clip_loss expects image and text embeddings of the same shape (B, E), got "
                         f"{tuple(image_emb.shape)} and {tuple(text_emb.shape)}")
    logits_i2t, logits_t2i, labels, count = contrastive_logits(image_emb, text_emb, scale, valid)
    return infonce(logits_i2t, logits_t2i, labels, count), count


def contrastive_logits(image_emb: torch.Tensor, text_emb: torch.Tensor, scale: torch.Tensor,
                       valid: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """clip_loss's logits: (this rank's valid images against every caption (M, N), its valid captions against every
    image (M, N), each row's own column (M,), M as a tensor), with invalid candidates at -inf. For a caller that
    wants more than the loss from one gather (e.g. the in-batch accuracy)."""
    rank, _ = _world()
    B = image_emb.size(0)
    dtype = torch.promote_types(image_emb.dtype, torch.float32)  # bf16 logits at scale 100 would lose ~2 digits
    images, texts = image_emb.to(dtype), text_emb.to(dtype)
    all_images, all_texts = gather_with_grad(images), gather_with_grad(texts)  # (N, E) each
    scale = scale.to(dtype)
    logits_i2t = scale * images @ all_texts.T  # (B, N): this rank's images against every caption
    logits_t2i = scale * texts @ all_images.T  # (B, N): this rank's captions against every image
    labels = rank * B + torch.arange(B, device=images.device)  # (B,): each pair's own column
    return _drop_invalid(logits_i2t, logits_t2i, labels, valid)


def _drop_invalid(logits_a: torch.Tensor, logits_b: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor | None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits (B, C) of this rank's rows against C = k * N gathered candidates (k blocks of the global batch, in rank
    order each) -> the rows of valid samples only, with the columns of every rank's invalid samples at -inf, their
    own columns and their count (a tensor)."""
    B = logits_a.size(0)
    if valid is None:
        return logits_a, logits_b, labels, torch.tensor(B, device=logits_a.device)
    if valid.shape != (B,):
        raise ValueError(f"valid must be a bool mask of shape ({B},), got {tuple(valid.shape)}")
    valid = valid.bool()
    candidates = _gather(valid)  # (N,)
    candidates = candidates.repeat(logits_a.size(1) // candidates.numel())  # (C,)
    logits_a = logits_a.masked_fill(~candidates[None, :], float("-inf"))
    logits_b = logits_b.masked_fill(~candidates[None, :], float("-inf"))
    # invalid rows are dropped before the cross-entropy, not zeroed after: their own column is -inf, and
    # 0 * inf would be NaN. Every kept row has its own (valid) column finite.
    return logits_a[valid], logits_b[valid], labels[valid], valid.sum()


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.1, valid: torch.Tensor | None = None,
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """NT-Xent, the normalized temperature-scaled cross-entropy of two views (Chen et al. 2020, SimCLR; the loss of
    GraphCL and MolCLR) of this rank's samples against the global batch -> (mean loss over this rank's valid
    samples, their count). See nt_xent_logits for the logits; the loss is infonce's mean of the two views' CEs."""
    logits_1, logits_2, labels, count = nt_xent_logits(z1, z2, temperature, valid)
    return infonce(logits_1, logits_2, labels, count), count


def nt_xent_logits(z1: torch.Tensor, z2: torch.Tensor, temperature: float, valid: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """z1, z2 (B, P): the projections of view 1 and view 2 of this rank's B samples (any scale: L2-normalized here)
    -> (view 1 of each valid sample against every view 2 then every view 1 of the global batch (M, 2N), view 2
    against every view 1 then every view 2 (M, 2N), each row's positive column (M,), M as a tensor).

    Cosine similarities divided by the temperature; a view is never its own candidate (its column is -inf), so each
    of the 2N views has its other view as the positive and the 2N - 2 views of the other samples as negatives, as
    SimCLR's NT-Xent. The features are gathered with gather_with_grad (as clip_loss does), and the distributed
    gradient argument of clip_loss holds here unchanged; filler samples (valid False) are neither anchors nor
    candidates. Computed in float32 (or float64) whatever the projections' dtype."""
    if z1.dim() != 2 or z1.shape != z2.shape:
        raise ValueError(f"nt_xent expects two views of the same shape (B, P), got {tuple(z1.shape)} and "
                         f"{tuple(z2.shape)}")
    if temperature <= 0:
        raise ValueError(f"nt_xent's temperature must be > 0, got {temperature}")
    rank, _ = _world()
    B = z1.size(0)
    dtype = torch.promote_types(z1.dtype, torch.float32)
    a, b = F.normalize(z1.to(dtype), dim=-1), F.normalize(z2.to(dtype), dim=-1)
    all_a, all_b = gather_with_grad(a), gather_with_grad(b)  # (N, P) each
    labels = rank * B + torch.arange(B, device=a.device)  # (B,): the positive's column (the other view)
    itself = F.one_hot(labels, all_a.size(0)).bool()  # (B, N): a view's own column among its view's block
    logits_1 = torch.cat([a @ all_b.T, (a @ all_a.T).masked_fill(itself, float("-inf"))], 1) / temperature
    logits_2 = torch.cat([b @ all_a.T, (b @ all_b.T).masked_fill(itself, float("-inf"))], 1) / temperature
    return _drop_invalid(logits_1, logits_2, labels, valid)


def infonce(logits_i2t: torch.Tensor, logits_t2i: torch.Tensor, labels: torch.Tensor,
            count: torch.Tensor) -> torch.Tensor:
    """(CE(image -> text) + CE(text -> image)) / 2, the mean over `count` rows; 0 with zero gradients, not NaN,
    when there is no row."""
    total = F.cross_entropy(logits_i2t, labels, reduction="sum") + F.cross_entropy(logits_t2i, labels, reduction="sum")
    return total / 2 / count.clamp(min=1)


@torch.no_grad()
def retrieval_recall(image_emb: torch.Tensor, text_emb: torch.Tensor, ks: Sequence[int] = (1, 5, 10),
                     block_rows: int | None = None) -> dict[str, float]:
    """Recall@k of matching pairs (pair i = image i, caption i) among N: "image_to_text_R@k" is the share of images
    whose own caption ranks in the top k of all N captions, "text_to_image_R@k" the converse.

    Ranks are pessimistic in ties (a candidate scoring equal to the true match ranks ahead of it), so a collapsed
    model whose embeddings are all equal scores 0, not 1. The N x N similarities are computed `block_rows` rows at a
    time (default: ~16M scores per block, 64 MB in float32), so N = 50k never holds the 2.5G-entry matrix at once.
    """
    if image_emb.dim() != 2 or image_emb.shape != text_emb.shape:
        raise ValueError(f"retrieval_recall expects embeddings of the same shape (N, E), got "
                         f"{tuple(image_emb.shape)} and {tuple(text_emb.shape)}")
    N = image_emb.size(0)
    if N == 0:
        return {f"{name}_R@{k}": 0.0 for name in ("image_to_text", "text_to_image") for k in ks}
    rows = block_rows or max(1, (1 << 24) // N)
    out: dict[str, float] = {}
    for name, queries, candidates in (("image_to_text", image_emb, text_emb), ("text_to_image", text_emb, image_emb)):
        queries, candidates = queries.float(), candidates.float()
        ranks = []
        for start in range(0, N, rows):
            scores = queries[start:start + rows] @ candidates.T  # (b, N)
            own = scores[torch.arange(scores.size(0)), torch.arange(start, start + scores.size(0))]  # (b,)
            ranks.append((scores >= own[:, None]).sum(dim=1) - 1)  # (b,): candidates at least as close, but itself
        rank = torch.cat(ranks)  # (N,) 0 = the true match is first
        for k in ks:
            out[f"{name}_R@{k}"] = float((rank < k).float().mean())
    return out


def zero_shot_classifier(class_text_emb: torch.Tensor) -> torch.Tensor:
    """Class prompt embeddings (K, T, E), T templates per class -> one unit vector per class (K, E): the mean of its
    normalized template embeddings, renormalized (Radford et al. 2021, section 3.1.4: the prompt ensemble)."""
    if class_text_emb.dim() != 3:
        raise ValueError(f"zero_shot_classifier expects (classes, templates, E), got {tuple(class_text_emb.shape)}")
    return F.normalize(F.normalize(class_text_emb.float(), dim=-1).mean(dim=1), dim=-1)


@torch.no_grad()
def zero_shot_accuracy(image_emb: torch.Tensor, classifier: torch.Tensor, labels: torch.Tensor,
                       ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """{"top1": ..., "top5": ...}: the share of images (N, E) whose class (labels (N,)) is among the k classes of the
    classifier (K, E) closest to them (k capped at K)."""
    if image_emb.size(0) != labels.numel():
        raise ValueError(f"{image_emb.size(0)} images but {labels.numel()} labels")
    scores = image_emb.float() @ classifier.float().T  # (N, K)
    top = scores.topk(min(max(ks), scores.size(1)), dim=1).indices  # (N, k_max), best first
    hit = top == labels[:, None]  # (N, k_max)
    n = max(labels.numel(), 1)
    return {f"top{k}": float(hit[:, :k].any(dim=1).sum()) / n for k in ks}
