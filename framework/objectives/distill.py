"""Knowledge distillation: a student matches a frozen teacher's softened distribution. Pure functions of tensors.

The loss of Hinton et al. (2015): `alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * task loss`, where `_T`
is a softmax at temperature T; the T^2 keeps the KL term's gradients on the scale of the task loss's as T grows.
Forward KL (mass-covering: the student spreads over every token the teacher finds likely) is the default; reverse KL,
KL(student || teacher) (mode-seeking, as in MiniLLM), is the option.

`kl_rows` runs over the vocabulary in chunks, in float32, and keeps no (rows, vocabulary) float32 copy: its forward
reduces each chunk to per-row sums, its backward recomputes the chunk's probabilities and writes the gradient in the
student logits' own dtype. A 50k-vocabulary teacher thus adds only its logits to the peak memory, not a float32 softmax
of both models plus autograd's saved intermediates (several times the logits for `F.kl_div(F.log_softmax(...))`).
"""

from __future__ import annotations

import torch

KL_DIRECTIONS = ("forward", "reverse")


def _chunks(V: int, chunk: int) -> list[slice]:
    return [slice(i, min(i + chunk, V)) for i in range(0, V, chunk)]


def _logsumexp(z: torch.Tensor, scale: float, parts: list[slice]) -> torch.Tensor:
    """logsumexp(z * scale, -1) in float32, one vocabulary chunk at a time: (N, V) -> (N,)."""
    return torch.stack([torch.logsumexp(z[:, s].float() * scale, -1) for s in parts], -1).logsumexp(-1)


class _ChunkedKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student: torch.Tensor, teacher: torch.Tensor, temperature: float, reverse: bool,
                chunk: int) -> torch.Tensor:
        scale, parts = 1.0 / temperature, _chunks(student.size(-1), chunk)
        lse_s, lse_t = _logsumexp(student, scale, parts), _logsumexp(teacher, scale, parts)  # (N,) each
        kl = torch.zeros_like(lse_s)
        for s in parts:
            log_s = student[:, s].float() * scale - lse_s[:, None]  # (N, c)
            log_t = teacher[:, s].float() * scale - lse_t[:, None]
            if reverse:
                kl += (log_s.exp() * (log_s - log_t)).sum(-1)
            else:
                kl += (log_t.exp() * (log_t - log_s)).sum(-1)
        ctx.save_for_backward(student, teacher, lse_s, lse_t, kl)
        ctx.scale, ctx.reverse, ctx.parts = scale, reverse, parts
        return kl

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        student, teacher, lse_s, lse_t, kl = ctx.saved_tensors
        out = torch.empty_like(student)
        g = grad.float()[:, None] * ctx.scale  # (N, 1): d z / d logits = 1 / T
        for s in ctx.parts:
            log_s = student[:, s].float() * ctx.scale - lse_s[:, None]
            log_t = teacher[:, s].float() * ctx.scale - lse_t[:, None]
            p_s = log_s.exp()
            if ctx.reverse:  # d/dz_j sum_v p_v (log p_v - log q_v) = p_j (log p_j - log q_j - KL)
                d = p_s * (log_s - log_t - kl[:, None])
            else:  # d/dz_j sum_v q_v (log q_v - log p_v) = p_j - q_j
                d = p_s - log_t.exp()
            out[:, s] = (d * g).to(out.dtype)
        return out, None, None, None, None


def kl_rows(student: torch.Tensor, teacher: torch.Tensor, *, temperature: float = 1.0, direction: str = "forward",
            chunk: int = 8192) -> torch.Tensor:
    """Per-row KL divergence between the softmaxes at `temperature` of teacher and student logits (N, V) -> (N,),
    float32. `direction` "forward" is KL(teacher || student), "reverse" KL(student || teacher). Gradients flow to
    `student` only (the teacher is a frozen target). Rows are independent: mask or weight them outside."""
    if student.dim() != 2 or student.shape != teacher.shape:
        raise ValueError(f"kl_rows expects student and teacher logits of one shape (N, V), got {tuple(student.shape)} "
                         f"and {tuple(teacher.shape)}")
    if temperature <= 0 or direction not in KL_DIRECTIONS or chunk < 1:
        raise ValueError(f"temperature must be > 0, direction one of {KL_DIRECTIONS} and chunk >= 1; got "
                         f"{temperature}, {direction!r}, {chunk}")
    return _ChunkedKL.apply(student, teacher.detach(), float(temperature), direction == "reverse", int(chunk))


def top_k_of(logits: torch.Tensor, k: int, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A teacher's k most likely ids and their log-probabilities at `temperature`, float32: (..., V) -> (..., k)."""
    values, ids = logits.float().topk(k, dim=-1)
    lse = torch.logsumexp(logits.float() / temperature, dim=-1, keepdim=True)
    return ids, values / temperature - lse


def top_k_kl_rows(student: torch.Tensor, ids: torch.Tensor, logprobs: torch.Tensor, *, temperature: float = 1.0,
                  chunk: int = 8192) -> torch.Tensor:
    """Forward KL per row from a teacher known only by its top k: ids (N, k) and log-probabilities (N, k) at
    `temperature`. Both distributions are coarsened to those k outcomes plus one "rest" bucket (the mass outside
    them), so this is the exact KL of the coarsened pair, a lower bound of the full one (the top-k bias: how the
    teacher spreads its rest is unknown). student: logits (N, V) -> (N,) float32."""
    if student.dim() != 2 or ids.shape != logprobs.shape or ids.shape[0] != student.shape[0]:
        raise ValueError(f"top_k_kl_rows expects student (N, V), ids and logprobs (N, k); got "
                         f"{tuple(student.shape)}, {tuple(ids.shape)}, {tuple(logprobs.shape)}")
    scale = 1.0 / temperature
    lse = _logsumexp(student, scale, _chunks(student.size(-1), chunk))  # (N,)
    log_p = student.gather(-1, ids.long()).float() * scale - lse[:, None]  # (N, k)
    logq = logprobs.float()
    q_rest = (-torch.expm1(logq.logsumexp(-1))).clamp(min=0)  # 1 - top-k mass, without cancellation
    log_p_rest = torch.log((-torch.expm1(log_p.logsumexp(-1))).clamp(min=1e-30))
    return (logq.exp() * (logq - log_p)).sum(-1) + torch.xlogy(q_rest, q_rest) - q_rest * log_p_rest


def distillation_loss(kl: torch.Tensor, task: torch.Tensor, *, alpha: float, temperature: float) -> torch.Tensor:
    """`alpha * T^2 * kl + (1 - alpha) * task` (Hinton et al.'s weighting; alpha = 1 is pure distillation)."""
    return alpha * temperature ** 2 * kl + (1 - alpha) * task


def masked_mean(values: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean of `values` where `keep`, how many were kept); 0 with zero gradient when none is."""
    count = keep.sum()
    return (values * keep).sum() / count.clamp(min=1), count


def agreement(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Per row, whether the student's top-1 class is the teacher's: (N, V) -> (N,) float."""
    return (student.detach().argmax(-1) == teacher.argmax(-1)).float()

