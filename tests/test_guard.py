"""The non-finite guard: a NaN loss on one rank skips that optimizer step on every rank, and a diverged run stops."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dist_fit import cli, records, write_config
from framework.checkpoint.reader import checkpoint_meta
from framework.commands.fit import fit


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
    assert len(errors) == 1 and "3 optimizer steps in a row with a non-finite loss or gradient at steps 3-5: the " \
        "run has diverged, and there is no checkpoint from before step 3" in errors[0], r.stderr[-3000:]
    assert "Traceback" not in r.stderr


def _spike_fit(tmp: Path, shards: Path, max_steps: int, poison: list[int], stop_at: int | None = None,
               strategy: str = "auto", devices: int = 1, rank: int | None = None) -> Path:
    """A config whose GPT meets a loss spike on the batches `poison` (x50 loss), with a guard quick to react."""
    config = write_config(tmp, shards, strategy=strategy, devices=devices, max_steps=max_steps, stop_at=stop_at,
                          every_n_steps=3)
    cfg = json.loads(config.read_text())
    cfg["model"] = {"class_path": "recorder.SpikeLossTask",
                    "init_args": {**cfg["model"]["init_args"], "preset": "gpt-tiny", "poison": poison, "rank": rank}}
    cfg["guard"] = {"spike_window": 4, "spike_warmup": 4, "spike_patience": 3, "spike_sigmas": 6.0}
    config.write_text(json.dumps(cfg))
    return config


def _final(records: list[dict]) -> dict[int, dict]:
    """Each step's last record on rank 0: what survived the rollbacks."""
    return {r["step"]: r for r in records if r["rank"] == 0}


@pytest.mark.slow
def test_a_loss_spike_rolls_back_skips_its_window_and_resumes_exactly(shards, tmp_path, capsys):
    """Batches 8-10 spike the loss: the guard confirms it at step 10, restarts from the step-6 checkpoint (the
    step-9 one holds the spike and is set aside) with the data position after batch 10, and the run ends at step 16
    having trained batches 0-7 and 11-20 into its weights, listed as such. A run stopped after the rollback and
    resumed ends bit-equal."""
    a, b, ref = tmp_path / "a", tmp_path / "b", tmp_path / "ref"
    for d in (a, b, ref):
        d.mkdir()
    fit(["--config", str(_spike_fit(a, shards, max_steps=16, poison=[8, 9, 10]))])
    out = capsys.readouterr()
    ckpts = a / "run" / "checkpoints"
    meta = checkpoint_meta(ckpts / "last.ckpt")
    assert meta["global_step"] == 16
    [event] = meta["guard"]["rollbacks"]
    assert (event["first_step"], event["step"], event["to_step"]) == (8, 10, 6), event
    assert event["skipped"] == {"from": {"epoch": 0, "segment": 0, "batches": 6},
                                "to": {"epoch": 0, "segment": 0, "batches": 11}}
    assert event["loss"] > 20 * event["threshold"] / 6  # the x50 batches, not noise
    assert (ckpts / "rolled_back" / "step0000009.ckpt").exists() and not (ckpts / "step0000009.ckpt").exists()
    line = "loss spike at steps 8-10"
    assert line in out.err and "rolled back to step 6 (step0000006.ckpt), batches 6-10 of epoch 0 skipped" in out.out

    # the batches trained into the final weights: 0-5 before the checkpoint, then 11-20 -- a plain run's batches
    write_config(ref, shards, strategy="auto", devices=1, max_steps=21)
    fit(["--config", str(ref / "config.json")])
    plain = [r["windows"] for r in sorted(_final(records(ref)).values(), key=lambda r: r["step"])]
    final = _final(records(a))
    assert sorted(final) == list(range(16))
    assert [final[s]["windows"] for s in range(6)] == plain[:6]
    assert [final[s]["windows"] for s in range(6, 16)] == plain[11:21]

    # stopped after the rollback (at step 12, checkpointed) and resumed: the same weights, bit for bit
    fit(["--config", str(_spike_fit(b, shards, max_steps=16, poison=[8, 9, 10], stop_at=12))])
    fit(["--config", str(_spike_fit(b, shards, max_steps=16, poison=[8, 9, 10])), "--ckpt_path", "last"])
    straight = torch.load(ckpts / "last.ckpt", map_location="cpu", weights_only=False)
    resumed = torch.load(b / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    def where(events):  # the run directories differ
        return [{k: v for k, v in e.items() if k not in ("checkpoint", "set_aside")} for e in events]

    assert where(resumed["guard"]["rollbacks"]) == where(straight["guard"]["rollbacks"]) == where([event])
    for name, value in straight["state_dict"].items():
        assert torch.equal(resumed["state_dict"][name], value), name


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fsdp"])  # deepspeed_stage_2 passes too (~15 s): its rollback is tested below
def test_a_spike_on_one_rank_rolls_back_every_rank_alike(strategy, shards, tmp_path):
    """Only rank 1's batches 8-10 spike: the decision is on the rank-averaged loss, so both ranks roll back to the
    step-6 checkpoint together, skip the same window, and finish the same steps with the same batches as each other
    (a sharded checkpoint directory is the one rolled back to)."""
    config = _spike_fit(tmp_path, shards, max_steps=12, poison=[8, 9, 10], strategy=strategy, devices=2, rank=1)
    r = cli("fit", "--config", str(config), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-4000:]
    assert r.stderr.count("guard: a loss spike at steps 8-10") == 1, r.stderr[-3000:]  # rank 0 tells it, once
    ckpts = tmp_path / "run" / "checkpoints"
    meta = checkpoint_meta(ckpts / "last.ckpt")
    [event] = meta["guard"]["rollbacks"]
    assert meta["global_step"] == 12 and (event["first_step"], event["to_step"]) == (8, 6)
    assert event["skipped"]["to"]["batches"] == 11 and (ckpts / "rolled_back" / "step0000009.ckpt").exists()
    for rank in (0, 1):
        trained = [json.loads(line) for line in (tmp_path / f"steps.rank{rank}.jsonl").read_text().splitlines()]
        assert [s["step"] for s in trained] == [*range(11), *range(6, 12)]  # in the order trained
        first_pass, final = trained[:11], {s["step"]: s for s in trained}
        # after the rollback each rank trains its own batches from 11 on: its first pass trained 0-10
        assert all(final[k]["windows"] == first_pass[k]["windows"] for k in range(6))
        assert all(final[k]["windows"] not in [s["windows"] for s in first_pass] for k in range(6, 12))


def test_the_spike_detector_defaults_ignore_noise_and_catch_a_jump():
    """The default settings on a noisy, decreasing 3000-step loss curve (and through a noisy plateau): no false
    alarm; the same curve with three steps 40% up (over a few sigmas of its noise) at step 2000: caught there."""
    import random

    from framework.callbacks.guard import GuardOptions, SpikeDetector

    g = GuardOptions()
    rng = random.Random(0)
    curve = [2.0 + 5.0 * 0.998 ** t + rng.gauss(0, 0.08) for t in range(3000)]
    quiet = SpikeDetector(g.spike_window, g.spike_sigmas, g.spike_patience, g.spike_warmup)
    assert all(quiet.update(t, loss) is None for t, loss in enumerate(curve))
    spiked = SpikeDetector(g.spike_window, g.spike_sigmas, g.spike_patience, g.spike_warmup)
    found = [spiked.update(t, loss * (1.4 if 2000 <= t < 2003 else 1.0)) for t, loss in enumerate(curve)]
    assert [t for t, f in enumerate(found) if f] == [2002]
    assert [s["step"] for s in found[2002]] == [2000, 2001, 2002]


@pytest.mark.slow
def test_a_nan_under_deepspeed_rolls_back(shards, tmp_path):
    """DeepSpeed applies its optimizer step itself, so a NaN loss cannot be skipped: a NaN on rank 1's batch 8 rolls
    both ranks back to the step-6 checkpoint, past batches 6-8, and the run ends with finite weights."""
    from framework.checkpoint.reader import load_state_dict

    config = _spike_fit(tmp_path, shards, max_steps=10, poison=[8], strategy="deepspeed_stage_2", devices=2, rank=1)
    r = cli("fit", "--config", str(config), "--model.init_args.nan", "true", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-4000:]
    ckpts = tmp_path / "run" / "checkpoints"
    [event] = checkpoint_meta(ckpts / "last.ckpt")["guard"]["rollbacks"]
    assert "non-finite loss under DeepSpeed" in event["reason"] and (event["step"], event["to_step"]) == (8, 6)
    assert event["skipped"]["to"]["batches"] == 9
    assert all(torch.isfinite(t).all() for t in load_state_dict(ckpts / "last.ckpt").values())
