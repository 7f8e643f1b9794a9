import pytest
import torch

from framework.objectives.causal_lm import IGNORE_INDEX, causal_lm_loss, shift


def naive_loss(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Explicit log-softmax and a loop over positions, in float64."""
    total, count = torch.zeros((), dtype=torch.float64), 0
    B, T, _ = logits.shape
    for b in range(B):
        for t in range(T):
            target = int(targets[b, t])
            if target == ignore_index:
                continue
            row = logits[b, t].double()
            log_probs = row - torch.log(torch.exp(row - row.max()).sum()) - row.max()
            total = total - log_probs[target]
            count += 1
    return total / max(count, 1)


def random_batch(B=3, T=7, V=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, V, generator=g) * 3, torch.randint(0, V, (B, T), generator=g)


def test_matches_naive_reference():
    logits, targets = random_batch()
    loss = causal_lm_loss(logits, targets)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    torch.testing.assert_close(loss.double(), naive_loss(logits, targets, IGNORE_INDEX), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("ignore_index", [IGNORE_INDEX, 0])
def test_ignored_positions_do_not_count(ignore_index):
    logits, targets = random_batch(seed=1)
    targets[0, :3] = ignore_index
    targets[2, -1] = ignore_index
    loss = causal_lm_loss(logits, targets, ignore_index=ignore_index)
    torch.testing.assert_close(loss.double(), naive_loss(logits, targets, ignore_index), rtol=1e-6, atol=1e-6)
    # changing the logits at an ignored position changes nothing
    logits2 = logits.clone()
    logits2[0, 0] += 100
    assert causal_lm_loss(logits2, targets, ignore_index=ignore_index) == loss


def test_bf16_logits_are_reduced_in_float32():
    logits, targets = random_batch(B=2, T=5, V=1000, seed=2)
    logits = logits.bfloat16().requires_grad_()
    loss = causal_lm_loss(logits, targets)
    assert loss.dtype == torch.float32
    # exact reference on the same (bf16-representable) values: float32 math, not bf16 math
    torch.testing.assert_close(loss.double(), naive_loss(logits.detach(), targets, IGNORE_INDEX), rtol=1e-6, atol=1e-6)
    loss.backward()
    assert logits.grad.dtype == torch.bfloat16


def test_gradient_matches_reference():
    logits, targets = random_batch(seed=3)
    targets[1, 2] = IGNORE_INDEX
    a = logits.clone().requires_grad_()
    b = logits.double().requires_grad_()
    causal_lm_loss(a, targets).backward()
    naive_loss(b, targets, IGNORE_INDEX).backward()
    torch.testing.assert_close(a.grad.double(), b.grad, rtol=1e-5, atol=1e-7)
    assert a.grad[1, 2].abs().sum() == 0


def test_all_ignored_is_zero_not_nan():
    logits, targets = random_batch()
    logits.requires_grad_()
    loss = causal_lm_loss(logits, torch.full_like(targets, IGNORE_INDEX))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.count_nonzero(logits.grad) == 0


def test_shape_mismatch_is_a_clear_error():
    logits, targets = random_batch()
    with pytest.raises(ValueError, match="logits \\(B, T, V\\) and targets \\(B, T\\)"):
        causal_lm_loss(logits, targets[:, :-1])


def test_shift():
    tokens = torch.arange(10).view(2, 5)
    inputs, targets = shift(tokens)
    assert inputs.tolist() == [[0, 1, 2, 3], [5, 6, 7, 8]]
    assert targets.tolist() == [[1, 2, 3, 4], [6, 7, 8, 9]]
    with pytest.raises(ValueError):
        shift(torch.arange(3))
