"""The contrastive objective: clip_loss against a naive reference, its valid mask, and its distributed form on 2 real
gloo processes against one process holding the whole batch; retrieval recall and zero-shot accuracy."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from dist_fit import spawn_ranks
from framework.objectives.contrastive import (clip_loss, gather_with_grad, retrieval_recall, zero_shot_accuracy,
                                              zero_shot_classifier)


def embeddings(B: int, E: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (F.normalize(torch.randn(B, E, generator=g), dim=-1), F.normalize(torch.randn(B, E, generator=g), dim=-1))


def naive_clip_loss(images: torch.Tensor, texts: torch.Tensor, scale: float, valid: list[bool]) -> torch.Tensor:
    """The loss written out with loops: for each valid pair, -log softmax of its own score among the valid candidates,
    image -> text and text -> image, averaged."""
    keep = [i for i, v in enumerate(valid) if v]
    terms = []
    for i in keep:
        for queries, candidates in ((images, texts), (texts, images)):
            scores = torch.stack([scale * torch.dot(queries[i], candidates[j]) for j in keep])
            terms.append(-(scores[keep.index(i)] - torch.logsumexp(scores, dim=0)))
    return torch.stack(terms).sum() / 2 / len(keep)


# ------------------------------------------------------------------------------------------------------ one process
def test_clip_loss_matches_the_naive_reference():
    images, texts = embeddings(6)
    loss, count = clip_loss(images, texts, torch.tensor(10.0))
    assert int(count) == 6
    torch.testing.assert_close(loss, naive_clip_loss(images, texts, 10.0, [True] * 6))
    perfect = torch.eye(4)  # each image equals its caption, orthogonal to the others
    assert float(clip_loss(perfect, perfect, torch.tensor(100.0))[0]) < 1e-6
    assert gather_with_grad(images) is images  # no process group: the identity


def test_masked_pairs_change_nothing_for_the_others():
    images, texts = embeddings(7)
    valid = torch.tensor([True, False, True, True, False, True, True])
    images.requires_grad_(True)
    loss, count = clip_loss(images, texts, torch.tensor(20.0), valid)
    assert int(count) == 5
    # the same as the loss of the valid pairs alone: masked rows are neither queries nor candidates
    torch.testing.assert_close(loss, clip_loss(images[valid], texts[valid], torch.tensor(20.0))[0])
    torch.testing.assert_close(loss, naive_clip_loss(images, texts, 20.0, valid.tolist()))
    loss.backward()
    assert not images.grad[~valid].any() and images.grad[valid].abs().sum() > 0
    # nothing valid: 0 with zero gradients, not NaN
    images.grad = None
    empty, count = clip_loss(images, texts, torch.tensor(20.0), torch.zeros(7, dtype=torch.bool))
    empty.backward()
    assert float(empty.detach()) == 0.0 and int(count) == 0 and not images.grad.isnan().any()


# ------------------------------------------------------------------------------------------------------ 2 processes
B_GLOBAL, FEATURES, E, SCALE = 8, 6, 4, 12.0


def batch() -> dict[str, torch.Tensor]:
    """A global batch of input features, the weights of two linear 'towers' and a valid mask, identical everywhere."""
    g = torch.Generator().manual_seed(3)
    x_img, x_txt = (torch.randn(B_GLOBAL, FEATURES, generator=g) for _ in range(2))
    return {"x_img": x_img, "x_txt": x_txt,
            "w_img": torch.randn(E, FEATURES, generator=g), "w_txt": torch.randn(E, FEATURES, generator=g),
            # rank 0 holds 4 valid rows, rank 1 only 2 of its 4
            "valid": torch.tensor([True, True, True, True, True, False, True, False])}


def run(b: dict[str, torch.Tensor], rows: slice, valid: torch.Tensor | None, weight: float = 1.0) -> dict:
    """clip_loss on `rows` of the batch through the linear towers, backward; the loss and every gradient."""
    w_img, w_txt = b["w_img"].clone().requires_grad_(True), b["w_txt"].clone().requires_grad_(True)
    x_img = b["x_img"][rows].clone().requires_grad_(True)
    images = F.normalize(x_img @ w_img.T, dim=-1)
    texts = F.normalize(b["x_txt"][rows] @ w_txt.T, dim=-1)
    loss, count = clip_loss(images, texts, torch.tensor(SCALE), valid)
    (loss * weight).backward()
    return {"loss": loss.detach(), "weighted": loss.detach() * weight, "count": count, "w_img": w_img.grad,
            "w_txt": w_txt.grad, "x_img": x_img.grad}


def rank_main(rank: int, world: int, port: int, out: str) -> None:
    """One rank: its half of the batch through clip_loss, then what DDP would do; saves the results to `out`."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        b, B = batch(), B_GLOBAL // world
        rows = slice(rank * B, (rank + 1) * B)
        results = {}
        # every rank all valid: each rank's local-loss mean, DDP-averaged, is the global mean
        results["equal"] = run(b, rows, None)
        # unequal valid counts: each rank weights its loss by W * n_r / N, using the returned count
        local_valid = b["valid"][rows]
        n = local_valid.sum()
        total = n.clone()
        dist.all_reduce(total)
        results["masked"] = run(b, rows, local_valid, weight=float(world * n / total))
        for r in results.values():
            for key in ("loss", "weighted", "w_img", "w_txt"):  # what DDP does to gradients, a logger to the loss
                dist.all_reduce(r[key])
                r[key] /= world
        torch.save(results, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> dict[int, dict]:
    """2 real processes over gloo (spawned: a fresh interpreter each, as torchrun's ranks)."""
    out = tmp_path_factory.mktemp("ranks")
    spawn_ranks(rank_main, out)
    return {rank: torch.load(out / f"rank{rank}.pt") for rank in range(2)}


@pytest.mark.slow
def test_two_ranks_give_the_single_process_loss_and_gradients(two_ranks):
    full = run(batch(), slice(None), None)
    for rank, results in two_ranks.items():
        r = results["equal"]
        torch.testing.assert_close(r["loss"], full["loss"], atol=1e-6, rtol=0)
        torch.testing.assert_close(r["w_img"], full["w_img"], atol=1e-6, rtol=0)
        torch.testing.assert_close(r["w_txt"], full["w_txt"], atol=1e-6, rtol=0)
        # the rank's own input features: the full-batch gradient of its rows, times W (DDP averages only the
        # parameters' gradients; each rank's loss is a mean over B, the global one over W * B)
        rows = slice(rank * 4, (rank + 1) * 4)
        torch.testing.assert_close(r["x_img"] / 2, full["x_img"][rows], atol=1e-6, rtol=0)


@pytest.mark.slow
def test_two_ranks_with_unequal_valid_counts_weighted_by_count(two_ranks):
    b = batch()
    full = run(b, slice(None), b["valid"])
    assert [int(two_ranks[r]["masked"]["count"]) for r in (0, 1)] == [4, 2]
    for results in two_ranks.values():
        r = results["masked"]
        torch.testing.assert_close(r["w_img"], full["w_img"], atol=1e-6, rtol=0)
        torch.testing.assert_close(r["w_txt"], full["w_txt"], atol=1e-6, rtol=0)
        torch.testing.assert_close(r["weighted"], full["loss"], atol=1e-6, rtol=0)
        # the plain average of the ranks' means weighs rank 1's 2 rows double: not the global mean
        assert not torch.allclose(r["loss"], full["loss"])


# ------------------------------------------------------------------------------------------------------ measures
def brute_force_recall(images: torch.Tensor, texts: torch.Tensor, k: int) -> tuple[float, float]:
    N = len(images)
    hits = [0, 0]
    for d, (q, c) in enumerate(((images, texts), (texts, images))):
        for i in range(N):
            own = float(q[i] @ c[i])
            ahead = sum(1 for j in range(N) if j != i and float(q[i] @ c[j]) >= own)
            hits[d] += ahead < k
    return hits[0] / N, hits[1] / N


def test_retrieval_recall_matches_brute_force_in_blocks():
    images, texts = embeddings(23, E=4, seed=1)
    texts = F.normalize(texts + 1.5 * images, dim=-1)  # related pairs, so recall is neither 0 nor 1
    texts[5] = texts[6]  # a tie: counted against the match
    got = retrieval_recall(images, texts, ks=(1, 3, 5), block_rows=4)
    assert got == retrieval_recall(images, texts, ks=(1, 3, 5))  # blocking changes nothing
    for k in (1, 3, 5):
        i2t, t2i = brute_force_recall(images, texts, k)
        assert got[f"image_to_text_R@{k}"] == pytest.approx(i2t) and got[f"text_to_image_R@{k}"] == pytest.approx(t2i)
    assert 0 < got["image_to_text_R@1"] < 1
    same = torch.ones(5, 4)  # a collapsed model ties everything: it retrieves nothing
    assert retrieval_recall(same, same, ks=(1,))["image_to_text_R@1"] == 0.0


def test_zero_shot_on_a_hand_made_case():
    # 3 classes along the axes, 2 templates each; template embeddings are noisy copies of the axis
    axes = torch.eye(3)
    templates = torch.stack([axes + 0.1, axes - 0.1 * torch.tensor([0.0, 1.0, 0.0])], dim=1)  # (3, 2, 3)
    classifier = zero_shot_classifier(templates)
    assert classifier.shape == (3, 3)
    torch.testing.assert_close(classifier.norm(dim=-1), torch.ones(3))
    images = F.normalize(torch.tensor([[1.0, 0.2, 0.0], [0.1, 1.0, 0.0], [0.0, 0.3, 1.0], [0.9, 1.0, 0.0]]), dim=-1)
    labels = torch.tensor([0, 1, 2, 0])  # the last image leans to class 1: a top-1 miss, a top-2 hit
    assert zero_shot_accuracy(images, classifier, labels, ks=(1, 2, 5)) == {"top1": 0.75, "top2": 1.0, "top5": 1.0}
    assert math.isclose(zero_shot_accuracy(images, classifier, torch.tensor([2, 2, 2, 2]), ks=(1,))["top1"], 0.25)
