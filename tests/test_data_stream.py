"""The streaming reader's contracts: exactly once per epoch across ranks and workers, deterministic, resumable."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import shardkit as K
from framework.data.cursor import ORDERS, Layout, Segment, consumed, continue_on, shard_order
from framework.data.datamodule import ShardDataModule
from framework.data.shards import ShardError, manifest_shards
from framework.data.stream import TokenStream
from framework.errors import UserError

SEQ = 15  # windows of 16 tokens
WORKER = str(Path(__file__).with_name("data_worker.py"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(tmp: Path, world: int, **args) -> tuple[list[np.ndarray], dict]:
    """Run data_worker.py on `world` real processes over gloo; return each rank's windows and rank 0's saved state."""
    out = tmp / f"out-{os.urandom(4).hex()}"
    out.mkdir()
    args = {"seq_len": SEQ, "batch_size": 2, "workers": 2, "out": str(out), **args}
    port = _free_port()
    procs = []
    for rank in range(world):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
               "WORLD_SIZE": str(world), "PYTHONPATH": str(Path(__file__).parent.parent)}
        procs.append(subprocess.Popen([sys.executable, WORKER, json.dumps(args)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for p in procs:
        output, _ = p.communicate(timeout=120)
        assert p.returncode == 0, output
    windows = [np.load(out / f"rank{r}.npy") for r in range(world)]
    return windows, json.loads((out / "state.json").read_text())


def rows(a: np.ndarray) -> list[tuple]:
    return sorted(map(tuple, a.tolist()))


def epoch_windows(docs, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    stream = K.epoch_stream(docs, shard_order(seed, epoch, len(docs), shuffle))
    n = len(stream) // (SEQ + 1)
    return stream[: n * (SEQ + 1)].reshape(n, SEQ + 1)


@pytest.fixture
def corpus(tmp_path):
    def make(shards: int, seed: int = 0, docs=(1, 8), length=(1, 120)):
        docs_ = K.random_lengths(np.random.default_rng(seed), shards, docs, length)
        K.write_shards(tmp_path / "data", docs_)
        return tmp_path / "data", docs_
    return make


# ------------------------------------------------------------------------------------------- exactly once, real ranks
# real ranks take several seconds a run: the fast tier keeps the case with fewer shards than reader slots
@pytest.mark.parametrize("shards", [pytest.param(7, marks=pytest.mark.slow), 3,
                                    pytest.param(1, marks=pytest.mark.slow)],
                         ids=["7-shards", "fewer-shards-than-slots", "one-shard"])
def test_every_token_once_per_epoch_across_2_ranks_x_2_workers(tmp_path, corpus, shards):
    path, docs = corpus(shards, seed=shards)
    windows, _ = run_ranks(tmp_path, 2, path=str(path))
    assert len(windows[0]) == len(windows[1]) > 0
    got = np.concatenate(windows)
    expected = epoch_windows(docs, seed=7, epoch=0)
    # delivered = the epoch's windows in full, except a tail of fewer than world * batch windows
    tail = len(expected) - len(got)
    assert 0 <= tail < 2 * 2
    assert rows(got) == rows(expected[: len(got)])
    assert not set(map(tuple, windows[0].tolist())) & set(map(tuple, windows[1].tolist()))
    # every rank draws from the whole epoch, not from a contiguous share of it
    place = {w: g for g, w in enumerate(map(tuple, expected.tolist()))}
    n = len(expected)
    for w in windows:
        ids = [place[tuple(r)] for r in w.tolist()]
        assert n < 40 or (min(ids) < n // 4 and max(ids) >= 3 * n // 4), (n, sorted(ids))


@pytest.mark.slow
def test_two_epochs_reshuffle_and_each_is_exactly_once(tmp_path, corpus):
    path, docs = corpus(6)
    windows, state = run_ranks(tmp_path, 2, path=str(path), epochs=2)
    per_epoch = len(windows[0]) // 2
    e0 = np.concatenate([w[:per_epoch] for w in windows])
    e1 = np.concatenate([w[per_epoch:] for w in windows])
    assert rows(e0) == rows(epoch_windows(docs, 7, 0)[: len(e0)])
    assert rows(e1) == rows(epoch_windows(docs, 7, 1)[: len(e1)])
    assert not np.array_equal(e0, e1)  # a new epoch reads in a new order
    assert state["segment"]["epoch"] == 1


def test_order_is_a_pure_function_of_seed_epoch_and_shards(corpus):
    path, _ = corpus(5)
    shards = manifest_shards(json.loads((path / "manifest.json").read_text()), "train", str(path))

    def read(seed):
        s = TokenStream(shards, seq_len=SEQ, batch_size=2, eod=K.EOD, vocab_size=K.VOCAB, seed=seed, shuffle_block=4)
        return np.concatenate([b["tokens"].numpy() for b in s])

    assert np.array_equal(read(1), read(1))
    assert not np.array_equal(read(1), read(2))


def test_sample_ids_name_each_window_by_its_place_in_the_epoch(corpus):
    path, docs = corpus(5, seed=3)
    shards = manifest_shards(json.loads((path / "manifest.json").read_text()), "train", str(path))
    stream = TokenStream(shards, seq_len=SEQ, batch_size=3, eod=K.EOD, vocab_size=K.VOCAB, seed=5, shuffle_block=4)
    expected = epoch_windows(docs, seed=5, epoch=0)
    seen = []
    for batch in stream:
        for row, g in zip(batch["tokens"].numpy(), batch["sample_ids"].tolist()):
            assert np.array_equal(row, expected[g])
            seen.append(g)
    assert len(seen) == len(set(seen)) > 0
    assert seen != sorted(seen)  # shuffled, yet every id still names its window


# ------------------------------------------------------------------------------------------- resume
@pytest.mark.slow
def test_resume_same_layout_gives_exactly_the_uninterrupted_batches(tmp_path, corpus):
    path, _ = corpus(5)
    full, _ = run_ranks(tmp_path, 2, path=str(path))
    first, state = run_ranks(tmp_path, 2, path=str(path), stop=3)
    (tmp_path / "state.json").write_text(json.dumps(state))
    rest, _ = run_ranks(tmp_path, 2, path=str(path), load=str(tmp_path / "state.json"))
    for r in range(2):
        np.testing.assert_array_equal(np.concatenate([first[r], rest[r]]), full[r])


@pytest.mark.slow
@pytest.mark.parametrize("before,after", [(2, 1), (1, 2)])
def test_resume_on_another_world_size_loses_and_repeats_nothing(tmp_path, corpus, before, after):
    path, docs = corpus(6)
    first, state = run_ranks(tmp_path, before, path=str(path), stop=5)
    (tmp_path / "state.json").write_text(json.dumps(state))
    rest, state2 = run_ranks(tmp_path, after, path=str(path), load=str(tmp_path / "state.json"))
    got = np.concatenate(first + rest)
    expected = epoch_windows(docs, 7, 0)
    assert len(set(map(tuple, got.tolist()))) == len(got), "a window was delivered twice"
    assert set(map(tuple, got.tolist())) <= set(map(tuple, expected.tolist()))
    # the only windows not delivered are the final segment's tail: fewer than one batch on every rank
    assert len(expected) - len(got) < after * 2
    assert state2["segment"]["index"] == 1 and state2["segment"]["world"] == after


@pytest.mark.parametrize("order", ORDERS)
def test_segments_compose_over_repeated_layout_changes(order):
    """Pure cursor arithmetic: 3 -> 2 -> 5 ranks delivers each window at most once, in every order."""
    seg = Segment(0, 0, [(0, 1000)], Layout(3, 2, 4), order, seed=3, block=7)
    delivered: list[int] = []
    for batches, nxt in ((11, Layout(2, 1, 3)), (29, Layout(5, 3, 2)), (None, None)):
        batches = seg.batches_per_rank if batches is None else batches
        for a, b in consumed(seg, batches):
            delivered += seg.windows(np.arange(a, b)).tolist()
        if nxt is not None:
            seg = continue_on(Segment.from_state(json.loads(json.dumps(seg.state()))), batches, nxt)
    assert len(delivered) == len(set(delivered)) and set(delivered) <= set(range(1000))
    assert 1000 - len(delivered) < 5 * 2  # only the last layout's tail is left
    assert len(json.dumps(seg.state())) < 2000  # the saved position stays small: ranges of slots, not windows


def test_resume_skips_earlier_shards_without_opening_them(corpus):
    """Shards before the saved position are overwritten with garbage of the same size: resuming must not touch them."""
    path, docs = corpus(6, docs=(2, 4), length=(40, 80))
    dm = ShardDataModule(path=str(path), seq_len=SEQ, batch_size=2, num_workers=0, shuffle=False)
    dm.setup("fit")
    loader = dm.train_dataloader()
    full = [b["tokens"] for b in loader]
    stop = len(full) - 3
    dm2 = ShardDataModule(path=str(path), seq_len=SEQ, batch_size=2, num_workers=0, shuffle=False)
    dm2.setup("fit")
    for i, b in enumerate(dm2.train_dataloader()):
        dm2.on_before_batch_transfer(b, 0)
        if i + 1 == stop:
            break
    state = dm2.state_dict()
    start_token = stop * 2 * (SEQ + 1)
    ends = np.cumsum([sum(d) + len(d) for d in docs])
    assert ends[0] <= start_token, "test needs at least one whole shard before the resume point"
    for i, end in enumerate(ends):
        if end <= start_token:
            shard = path / f"train-{i:06d}.tar"
            shard.write_bytes(b"\xff" * shard.stat().st_size)
    dm3 = ShardDataModule(path=str(path), seq_len=SEQ, batch_size=2, num_workers=0, shuffle=False)
    dm3.setup("fit")
    dm3.load_state_dict(state)
    rest = [b["tokens"] for b in dm3.train_dataloader()]
    assert len(rest) == 3
    for a, b in zip(rest, full[stop:]):
        assert np.array_equal(a.numpy(), b.numpy())


def test_position_from_other_data_is_refused(corpus, tmp_path):
    path, _ = corpus(3)
    dm = ShardDataModule(path=str(path), seq_len=SEQ, batch_size=2, num_workers=0)
    dm.setup("fit")
    dm.on_before_batch_transfer(next(iter(dm.train_dataloader())), 0)
    state = dm.state_dict()
    other = ShardDataModule(path=str(path), seq_len=SEQ + 1, batch_size=2, num_workers=0)
    other.setup("fit")
    other.load_state_dict(state)
    with pytest.raises(UserError, match="data.seq_len=15"):
        iter(other.train_dataloader())


# ------------------------------------------------------------------------------------------- sources and bad shards
def test_globs_braces_and_pipe_urls_read_the_same_tokens(corpus):
    path, _ = corpus(3)

    def tokens(**kw):
        dm = ShardDataModule(seq_len=SEQ, batch_size=2, num_workers=0, shuffle=False, **kw)
        dm.setup("fit")
        return np.concatenate([b["tokens"].numpy() for b in dm.train_dataloader()])

    reference = tokens(path=str(path))
    assert np.array_equal(tokens(path="", train_shards=str(path / "train-*.tar")), reference)
    assert np.array_equal(tokens(path="", train_shards=str(path / "train-{000000..000002}.tar")), reference)
    piped = [f"pipe:cat {path}/train-{i:06d}.tar" for i in range(3)]
    assert np.array_equal(tokens(path="", train_shards=piped, manifest=str(path / "manifest.json")), reference)


def test_truncated_shard_is_named_or_skipped_with_a_warning(corpus):
    path, docs = corpus(3)
    shard = path / "train-000001.tar"
    shard.write_bytes(shard.read_bytes()[:700])
    dm = ShardDataModule(path=str(path), seq_len=SEQ, batch_size=2, num_workers=0)
    with pytest.raises(ShardError, match="train-000001.tar.*truncated"):
        dm.setup("fit")
    dm = ShardDataModule(path=str(path), seq_len=SEQ, batch_size=2, num_workers=0, skip_corrupt=True, shuffle=False)
    with pytest.warns(UserWarning, match="skipping shard .*train-000001.tar"):
        dm.setup("fit")
    got = np.concatenate([b["tokens"].numpy() for b in dm.train_dataloader()])
    # exactly the windows of shards 0 and 2 (their documents, each followed by EOD), in order, up to the dropped tail
    starts = np.cumsum([0] + [sum(d) for d in docs])
    stream = np.concatenate([part for i in (0, 2) for n, first in zip(docs[i], starts[i] + np.cumsum([0] + docs[i]))
                             for part in (np.arange(first, first + n), [K.EOD])])
    windows = stream[: len(stream) // (SEQ + 1) * (SEQ + 1)].reshape(-1, SEQ + 1)
    assert 0 <= len(windows) - len(got) < 2 and len(got) > 0
    assert np.array_equal(got, windows[: len(got)])


def test_corrupt_shard_of_the_right_size_fails_at_read_time_naming_it(corpus):
    path, _ = corpus(2, docs=(4, 6), length=(40, 80))
    shard = path / "train-000000.tar"
    raw = bytearray(shard.read_bytes())
    raw[0:512] = b"\x00" * 100 + b"\x17" * 412  # a broken first header
    shard.write_bytes(bytes(raw))
    dm = ShardDataModule(path=str(path), seq_len=SEQ, batch_size=2, num_workers=0, shuffle=False)
    dm.setup("fit")
    with pytest.raises(ShardError, match="train-000000.tar"):
        list(dm.train_dataloader())
    # with skip_corrupt the header check at start-up drops it, on every rank alike
    dm = ShardDataModule(path=str(path), seq_len=SEQ, batch_size=2, num_workers=0, skip_corrupt=True)
    with pytest.warns(UserWarning, match="train-000000.tar"):
        dm.setup("fit")
    assert len(list(dm.train_dataloader())) > 0


def test_missing_directory_and_manifest_are_clear_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist.*pretrain prepare"):
        ShardDataModule(path=str(tmp_path / "nope")).setup("fit")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no manifest"):
        ShardDataModule(path=str(tmp_path / "empty")).setup("fit")


def test_vocabulary_is_exposed_and_checked(corpus):
    path, _ = corpus(1)
    dm = ShardDataModule(path=str(path))
    assert dm.vocab_size == K.VOCAB
    assert dm.special_ids["eod"] == K.EOD and set(dm.special_ids) == {"eod", "pad", "mask", "cls", "sep"}
    dm.check_vocab(K.VOCAB)
    with pytest.raises(UserError, match=f"model.config.vocab_size >= {K.VOCAB}"):
        dm.check_vocab(50304)
