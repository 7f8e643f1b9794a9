"""The non-finite guard: a NaN loss on one rank skips that optimizer step on every rank, and a diverged run stops."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dist_fit import cli, make_shards, write_config
from framework.checkpoint.consolidate import checkpoint_meta


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return make_shards(tmp_path_factory, val_fraction=0.0)


def _weights(tmp: Path) -> list[dict]:
    out = []
    for f in sorted(tmp.glob("weights.rank*.jsonl")):
        out += [json.loads(line) for line in f.read_text().splitlines()]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_a_nan_on_one_rank_skips_that_step_on_every_rank(strategy, shards, tmp_path):
    probe = {"class_path": "dist_fit.StepWeights", "init_args": {"path": str(tmp_path / "weights")}}
    config = write_config(tmp_path, shards, strategy=strategy, devices=2, max_steps=5, callbacks=[probe])
    r = cli("fit", "--config", str(config), "--model.class_path", "recorder.NonFiniteLossTask",
            "--model.init_args.nan_steps", "[2]", "--model.init_args.rank", "1", "--model.init_args.preset",
            "gpt-tiny", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-4000:]
    records = _weights(tmp_path)
    by_step = {}
    for rec in records:
        by_step.setdefault(rec["step"], set()).add(rec["weights"])
        assert rec["finite"], rec
    assert all(len(v) == 1 for v in by_step.values())  # every rank holds the same weights after every step
    w = {step: v.pop() for step, v in by_step.items()}
    # Lightning counts the skipped step too (the schedule moves on): after steps 1, 2 (skipped), 3, ...
    assert w[3] == w[2] and w[2] != w[1] and w[4] != w[3]
    ckpt = checkpoint_meta(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert [s["step"] for s in ckpt["guard"]["skipped"]] == [2]
    assert ckpt["guard"]["skipped"][0]["batch"] == 2  # the third batch of the epoch on every rank
    assert "guard: 1 step(s) skipped for a non-finite gradient: 2" in r.stdout


@pytest.mark.slow
def test_a_diverged_run_stops_with_one_line(shards, tmp_path):
    config = write_config(tmp_path, shards, strategy="ddp", devices=1, max_steps=20)
    r = cli("fit", "--config", str(config), "--model.class_path", "recorder.NonFiniteLossTask",
            "--model.init_args.nan_steps", str(list(range(3, 20))), "--model.init_args.preset", "gpt-tiny",
            "--guard.max_consecutive", "3", cwd=tmp_path)
    assert r.returncode == 2, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "3 optimizer steps in a row (steps 3-5)" in errors[0], r.stderr[-3000:]
    assert "Traceback" not in r.stderr
