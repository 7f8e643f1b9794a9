"""The order of an epoch's windows (a permutation of the whole epoch for local shards, interleaved streams for shards
that cannot seek) and where explicit shards find their manifest and tokenizer."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import shardkit as K
from framework.data.cursor import STREAMS
from framework.data.datamodule import ShardDataModule
from framework.data.shards import manifest_shards
from framework.data.stream import TokenStream
from framework.errors import UserError
from test_data_stream import SEQ, epoch_windows, run_ranks

B = 4


def make(tmp: Path, shards: int = 20, seed: int = 0) -> tuple[Path, list]:
    docs = K.random_lengths(np.random.default_rng(seed), shards, (5, 10), (50, 150))
    K.write_shards(tmp, docs)
    return tmp, docs


def read_ids(shards, **kw) -> tuple[TokenStream, list[np.ndarray], np.ndarray]:
    """Every batch's window ids and all delivered rows of one epoch, read in-process."""
    stream = TokenStream(shards, seq_len=SEQ, batch_size=B, eod=K.EOD, vocab_size=K.VOCAB, seed=11, **kw)
    batches = list(stream)
    return stream, [b["sample_ids"].numpy() for b in batches], np.concatenate([b["tokens"].numpy() for b in batches])


def deciles_reached(ids: list[np.ndarray], n: int, share: float) -> int:
    """How many tenths of the epoch stream the first `share` of the batches draw from."""
    first = np.concatenate(ids[: max(1, int(len(ids) * share))])
    return len(set((first * 10 // n).tolist()))


def test_local_shards_are_read_in_a_permutation_of_the_whole_epoch(tmp_path):
    path, docs = make(tmp_path / "d")
    shards = manifest_shards(json.loads((path / "manifest.json").read_text()), "train", str(path))
    stream, ids, rows = read_ids(shards)
    assert stream.order == "global"
    n = stream.windows_per_epoch
    flat = np.concatenate(ids)
    expected = epoch_windows(docs, seed=11, epoch=0)
    assert np.array_equal(rows, expected[flat])  # every id names its window
    assert sorted(flat.tolist()) == list(range(len(flat))) and n - len(flat) < B  # once each; the tail is the end
    # as good as uniform sampling: no trend, consecutive batches a third of the epoch apart, full reach at once
    assert abs(np.corrcoef(np.arange(len(flat)), flat)[0, 1]) < 0.1
    gaps = [np.abs(a[:, None] - b[None, :]).mean() / n for a, b in zip(ids, ids[1:])]
    assert 0.29 < np.mean(gaps) < 0.38, np.mean(gaps)  # uniform: E|U - V| = 1/3
    assert deciles_reached(ids, n, 0.1) == 10


def test_pipe_shards_interleave_streams_and_still_deliver_each_window_once(tmp_path):
    path, docs = make(tmp_path / "d")
    shards = manifest_shards(json.loads((path / "manifest.json").read_text()), "train", str(path))
    piped = [type(s)(f"pipe:cat {s.url}", s.name, s.samples, s.tokens, s.bytes) for s in shards]
    stream, ids, rows = read_ids(piped, shuffle_block=32)
    assert stream.order == "stream"
    flat = np.concatenate(ids)
    expected = epoch_windows(docs, seed=11, epoch=0)
    assert np.array_equal(rows, expected[flat])
    assert sorted(flat.tolist()) == list(range(len(flat)))
    # weaker than the global order, but never a walk through the corpus: each block mixes STREAMS far-apart places
    assert deciles_reached(ids, stream.windows_per_epoch, 0.1) >= STREAMS - 2


@pytest.mark.slow
def test_pipe_shards_resume_on_another_world_size(tmp_path):
    path, docs = make(tmp_path / "d", shards=6, seed=2)
    first, state = run_ranks(tmp_path, 2, path=str(path), stop=4, pipe=True)
    assert state["order"] == "stream"
    (tmp_path / "state.json").write_text(json.dumps(state))
    rest, _ = run_ranks(tmp_path, 1, path=str(path), load=str(tmp_path / "state.json"), pipe=True)
    got = [tuple(r) for r in np.concatenate(first + rest).tolist()]
    expected = epoch_windows(docs, 7, 0)
    assert len(set(got)) == len(got) and set(got) <= set(map(tuple, expected.tolist()))
    assert len(expected) - len(got) < 1 * 2


def test_explicit_train_shards_use_their_own_manifest_not_data_path(tmp_path):
    """data.path exists (as data/stdlib does after the demo) but describes other shards of the same names."""
    other, _ = make(tmp_path / "other", shards=3, seed=5)
    path, docs = make(tmp_path / "mine", shards=3, seed=6)
    dm = ShardDataModule(path=str(other), train_shards=str(path / "train-*.tar"), seq_len=SEQ, batch_size=2,
                         num_workers=0, shuffle=False)
    dm.setup("fit")
    got = np.concatenate([b["tokens"].numpy() for b in dm.train_dataloader()])
    assert np.array_equal(got, epoch_windows(docs, 0, 0, shuffle=False)[: len(got)])
    assert dm.tokenizer_path == str(path / "tokenizer.json")


def test_pipe_shards_find_the_manifest_beside_them_or_fail_in_one_line(tmp_path):
    path, docs = make(tmp_path / "d", shards=2)
    other, _ = make(tmp_path / "other", shards=2, seed=4)  # an existing data.path describing other shards
    piped = [f"pipe:cat {path}/train-{i:06d}.tar" for i in range(2)]
    dm = ShardDataModule(path=str(other), train_shards=piped, seq_len=SEQ, batch_size=2, num_workers=0,
                         shuffle=False)
    dm.setup("fit")
    assert dm.vocab_size == K.VOCAB
    got = np.concatenate([b["tokens"].numpy() for b in dm.train_dataloader()])
    assert np.array_equal(got, epoch_windows(docs, 0, 0, shuffle=False)[: len(got)])

    (path / "manifest.json").unlink()
    cmd = [sys.executable, "-m", "framework", "fit", "--config", "configs/gpt/smoke.yaml", "--data.path", "",
           "--data.prepare_if_missing", "false", "--data.train_shards", piped[0], "--wandb.mode", "disabled"]
    root = Path(__file__).parent.parent
    result = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=120,
                            env={**__import__("os").environ, "PYTHONPATH": str(root)})
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert len(errors) == 1 and "--data.manifest" in errors[0], result.stderr


def test_val_shards_from_another_prepare_output_need_the_same_tokenizer(tmp_path):
    path, _ = make(tmp_path / "train", shards=2)
    val_docs = K.random_lengths(np.random.default_rng(9), 1, (3, 5), (40, 80))
    K.write_shards(tmp_path / "held-out", val_docs, split="val", start_id=10_000)
    dm = ShardDataModule(path=str(path), val_shards=str(tmp_path / "held-out" / "val-*.tar"), seq_len=SEQ,
                         batch_size=2, num_workers=0)
    dm.setup("fit")
    got = np.concatenate([b["tokens"].numpy() for b in dm.val_dataloader()])
    stream = K.epoch_stream(val_docs, [0], start_id=10_000)
    assert np.array_equal(got.ravel(), stream[: got.size])

    other = json.loads((tmp_path / "held-out" / "manifest.json").read_text())
    other["tokenizer"]["sha256"] = "0" * 64  # another tokenizer with the same vocabulary size
    shutil.copytree(tmp_path / "held-out", tmp_path / "bpe")
    (tmp_path / "bpe" / "manifest.json").write_text(json.dumps(other))
    dm = ShardDataModule(path=str(path), val_shards=str(tmp_path / "bpe" / "val-*.tar"), seq_len=SEQ, batch_size=2)
    with pytest.raises(UserError, match="another tokenizer .*sha256 differs"):
        dm.setup("fit")


def test_positions_of_another_reader_or_order_are_refused_in_one_line(tmp_path):
    path, _ = make(tmp_path / "d", shards=2)
    dm = ShardDataModule(path=str(path), seq_len=SEQ, batch_size=2, num_workers=0)
    dm.setup("fit")
    dm.on_before_batch_transfer(next(iter(dm.train_dataloader())), 0)
    state = dm.state_dict()
    assert state["order"] == "global"

    def resume(saved: dict, **kw) -> None:
        other = ShardDataModule(seq_len=SEQ, batch_size=2, num_workers=0, **kw)
        other.setup("fit")
        other.load_state_dict(saved)
        iter(other.train_dataloader())

    with pytest.raises(UserError, match="version 1, this framework reads 2"):  # written by the block-shuffle reader
        resume({**state, "version": 1}, path=str(path))
    piped = [f"pipe:cat {path}/train-{i:06d}.tar" for i in range(2)]
    with pytest.raises(UserError, match="'global' order but these shards give 'stream'"):
        resume(state, path="", train_shards=piped)
