"""The data order trains like uniform sampling: a small char-level GPT on a corpus whose topics are sorted.

A short version of benchmarks/learning_order.py, whose full run (1500 steps; the 0.02-nat criterion) is recorded in
benchmarks/results/data_order.md. At this size two random orders differ by up to ~0.25 nats (the model escapes its
unigram plateau at a random step), so the test asks where the default order lands: with the plain loop that samples
windows uniformly, not with the corpus read in file order (a curriculum: what a walk through sorted shards, such as
the earlier block shuffle, amounts to), which ends several nats behind.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import learning_order  # noqa: E402


@pytest.mark.slow
def test_default_order_learns_like_uniform_sampling_not_like_a_walk(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # this model steps faster on one thread than on two shared ones
    try:
        r = learning_order.run(tmp_path, steps=250, topics=4, docs_per_topic=80, sequential=True, lr=1e-2)
    finally:
        torch.set_num_threads(threads)
    assert r["epochs"] < 1  # every window is new: no overfitting to tell the orders apart
    walk = r["sequential"] - r["uniform"]
    assert walk > 0.5, r
    assert r["reader"] - r["uniform"] < 0.3 * walk, r
