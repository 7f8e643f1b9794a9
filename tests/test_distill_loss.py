"""The distillation loss (framework.objectives.distill) against a plain full-softmax reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from framework.objectives.distill import agreement, distillation_loss, kl_rows, masked_mean


def reference(student: torch.Tensor, teacher: torch.Tensor, temperature: float, direction: str) -> torch.Tensor:
    log_p = F.log_softmax(student.double() / temperature, -1)
    log_q = F.log_softmax(teacher.double() / temperature, -1)
    if direction == "reverse":
        log_p, log_q = log_q, log_p
    return F.kl_div(log_p, log_q, log_target=True, reduction="none").sum(-1)  # KL(q || p) per row


@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("temperature,chunk", [(1.0, 7), (2.0, 64), (0.5, 1000)])
def test_chunked_kl_equals_the_full_softmax_reference_in_value_and_gradient(direction, temperature, chunk):
    g = torch.Generator().manual_seed(0)
    student = (3 * torch.randn(13, 50, generator=g)).requires_grad_()
    teacher = 3 * torch.randn(13, 50, generator=g)
    weights = torch.rand(13, generator=g)  # an arbitrary upstream gradient per row
    (kl_rows(student, teacher, temperature=temperature, direction=direction, chunk=chunk) * weights).sum().backward()
    ours = student.grad.clone()
    student.grad = None
    expected = reference(student, teacher, temperature, direction)
    (expected * weights).sum().backward()
    got = kl_rows(student.detach(), teacher, temperature=temperature, direction=direction, chunk=chunk)
    torch.testing.assert_close(got.double(), expected.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.double(), student.grad.double(), atol=1e-5, rtol=1e-4)


def test_a_student_equal_to_its_teacher_has_zero_kl_and_zero_gradient():
    logits = torch.randn(6, 300)
    for direction in ("forward", "reverse"):
        student = logits.clone().requires_grad_()
        kl = kl_rows(student, logits, temperature=2.0, direction=direction, chunk=128)
        kl.sum().backward()
        assert kl.abs().max() < 1e-6 and student.grad.abs().max() < 1e-7
    # ... and a different one has a positive KL that gradient descent lowers
    student = torch.zeros(6, 300, requires_grad=True)
    before = kl_rows(student, logits).mean()
    before.backward()
    after = kl_rows(student.detach() - 10 * student.grad, logits).mean()
    assert before > 0.1 and after < before


def test_the_kl_keeps_bf16_logits_and_gives_a_bf16_gradient():
    student = torch.randn(4, 1000).bfloat16().requires_grad_()
    teacher = torch.randn(4, 1000).bfloat16()
    kl = kl_rows(student, teacher, chunk=256)
    assert kl.dtype == torch.float32
    kl.sum().backward()
    assert student.grad.dtype == torch.bfloat16
    torch.testing.assert_close(kl.double(), reference(student.detach().float(), teacher.float(), 1.0, "forward"),
                               atol=1e-4, rtol=1e-4)


def test_weighting_masking_and_agreement():
    kl, task = torch.tensor(0.5), torch.tensor(2.0)
    assert distillation_loss(kl, task, alpha=0.5, temperature=2.0) == pytest.approx(0.5 * 4 * 0.5 + 0.5 * 2.0)
    assert distillation_loss(kl, task, alpha=0.0, temperature=4.0) == pytest.approx(2.0)
    mean, count = masked_mean(torch.tensor([1.0, 3.0, 100.0]), torch.tensor([True, True, False]))
    assert mean == pytest.approx(2.0) and count == 2
    mean, count = masked_mean(torch.tensor([1.0]), torch.tensor([False]))
    assert mean == 0 and count == 0
    s, t = torch.tensor([[0.0, 1.0], [2.0, 0.0]]), torch.tensor([[0.0, 5.0], [0.0, 1.0]])
    assert agreement(s, t).tolist() == [1.0, 0.0]


def test_bad_shapes_and_options_are_refused():
    with pytest.raises(ValueError, match="one shape"):
        kl_rows(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="direction"):
        kl_rows(torch.zeros(2, 3), torch.zeros(2, 3), direction="sideways")


def test_top_k_kl_is_the_kl_of_the_coarsened_pair_and_the_full_kl_when_k_is_everything():
    from framework.objectives.distill import top_k_kl_rows, top_k_of

    g = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(5, 40, generator=g), 2 * torch.randn(5, 40, generator=g)
    ids, logprobs = top_k_of(teacher, 40, 2.0)
    torch.testing.assert_close(top_k_kl_rows(student, ids, logprobs, temperature=2.0, chunk=16).double(),
                               reference(student, teacher, 2.0, "forward"), atol=1e-5, rtol=1e-5)
    ids, logprobs = top_k_of(teacher, 6, 2.0)
    p, q = F.softmax(student.double() / 2, -1), F.softmax(teacher.double() / 2, -1)
    p6, q6 = p.gather(-1, ids), q.gather(-1, ids)  # the 6 outcomes, then the rest as a 7th
    p7 = torch.cat([p6, 1 - p6.sum(-1, keepdim=True)], -1)
    q7 = torch.cat([q6, 1 - q6.sum(-1, keepdim=True)], -1)
    expected = (q7 * (q7.log() - p7.log())).sum(-1)
    got = top_k_kl_rows(student, ids, logprobs, temperature=2.0)
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)
    assert (got.double() <= reference(student, teacher, 2.0, "forward") + 1e-6).all()  # a lower bound of the full KL
