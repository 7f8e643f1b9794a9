"""Resuming sharded checkpoints on the same and on another world size, for DDP, FSDP2 and DeepSpeed ZeRO-2/3.

Each case is a chain of real `pretrain fit` runs (subprocesses; 2 ranks over gloo on CPU), each resuming the last
checkpoint of the one before with `--ckpt_path last`, all within one data epoch:

    2 ranks (steps 0-2) -> 2 ranks (3-4) -> 1 rank (5-6) -> 2 ranks (7 - end of the epoch)

so one chain proves same-size, 2->1 and 1->2 resumes (CHAINS below leaves the same-size hop out where it adds
nothing). After every resume (checked by tests/dist_fit.py callbacks):
- the full training state is the one saved: per parameter its fp32 value and Adam moments, the Adam step, each param
  group's hyperparameters (DeepSpeed reshards through a universal checkpoint, FSDP2 through DCP);
- the global step continues where the checkpoint was taken;
- over the whole epoch no window of tokens is trained twice, and none is lost except the final tail (< world x batch
  windows, dropped so that every rank gets the same number of batches);
- every run logs to the same W&B run, whose id every checkpoint carries.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import math
import os
import re
import time
from pathlib import Path

import pytest

from dist_fit import fit, records, write_config
from framework.callbacks.checkpointing import peek
from framework.data.datamodule import MaskedLMDataModule, ShardDataModule

HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
BATCH = 4  # windows per rank per step (write_config's data.batch_size)

# strategy -> world size of each run of the chain. Same-size resumes are Lightning's and DeepSpeed's own paths: run
# once per checkpoint layout (DCP and DeepSpeed directories); a .ckpt file's is test_fit's exact resume.
CHAINS = {
    # the two resharding paths (FSDP2 DCP, DeepSpeed universal checkpoints) with the masked-LM encoder (tied decoder,
    # head bias, masks seeded per window), also through a same-world resume; the GPT goes through the same code, and
    # DDP's whole-state checkpoints need no resharding (the data position's re-split is tests/test_data_stream.py's)
    ("fsdp", "bert"): [2, 2, 1, 2],
    ("deepspeed_stage_3", "bert"): [2, 2, 1, 2],
}
FIRST_STOP, STOP_EVERY = 3, 2  # run 0 stops after 3 steps, each later run but the last after 2 more
# `shards` (conftest.py): ~5 KB of random words: 155 windows of 33 tokens, all distinct; one epoch is ~20 steps of
# 2 ranks x 4.


@pytest.fixture(scope="module")
def universe(shards) -> dict[str, list[tuple[int, ...]]]:
    """family -> every example of the epoch, read in order by one reader: the GPT's windows, and the encoder's masked
    inputs (each window's masks depend on its place in the epoch only, so they are the same in any order)."""
    out = {}
    for family, dm in (("gpt", ShardDataModule(str(shards), seq_len=32, batch_size=1, num_workers=0, shuffle=False)),
                       ("bert", MaskedLMDataModule(path=str(shards), seq_len=32, batch_size=1, num_workers=0,
                                                   shuffle=False))):
        dm.setup("fit")
        key = "tokens" if family == "gpt" else "input_ids"
        out[family] = [tuple(b[key][0].tolist()) for b in dm.train_dataloader()]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("strategy,family", list(CHAINS), ids=[f"{s}-{f}" for s, f in CHAINS])
def test_resume_on_another_world_size(strategy, family, shards, universe, tmp_path):
    if strategy.startswith("deepspeed") and not HAS_DEEPSPEED:
        pytest.skip("deepspeed is not installed (pip install deepspeed)")
    worlds, universe = CHAINS[strategy, family], universe[family]
    stop_at = [FIRST_STOP + STOP_EVERY * i for i in range(len(worlds) - 1)] + [None]  # the last run ends the epoch
    times = []
    for i, (world, stop) in enumerate(zip(worlds, stop_at)):
        probe = {"class_path": "dist_fit.OptimizerProbe", "init_args": {"path": str(tmp_path / f"probe{i}")}}
        config = write_config(tmp_path, shards, strategy=strategy, devices=world, max_steps=1000, stop_at=stop,
                              callbacks=[probe], label=i, family=family)
        t0 = time.perf_counter()
        fit(config, *(["--ckpt_path", "last"] if i else []))
        times.append(time.perf_counter() - t0)
        if i:
            assert_same_training_state(tmp_path / f"probe{i - 1}.end.json", tmp_path / f"probe{i}.start.json")
    final = json.loads((tmp_path / f"probe{len(worlds) - 1}.end.json").read_text())
    assert final["adam_steps"] == [final["global_step"]], "Adam step counts ran off after a resume"
    print(f"{strategy} {family} {worlds}: " + ", ".join(f"{t:.1f} s" for t in times))

    recs = records(tmp_path)
    # the global step continues: run i trains steps [stop_at[i-1], stop_at[i]), every rank of its world each step
    first = 0
    for i, world in enumerate(worlds):
        run = [r for r in recs if r["run"] == i]
        steps = sorted({r["step"] for r in run})
        assert steps[0] == first and steps == list(range(first, steps[-1] + 1)), (i, steps)
        if stop_at[i] is not None:
            assert steps[-1] == stop_at[i] - 1
        for step in steps:
            assert sorted(r["rank"] for r in run if r["step"] == step) == list(range(world)), (i, step)
        assert {r["world"] for r in run} == {world}
        first = steps[-1] + 1

    # the data position: each window of the epoch trained at most once; only the last run's tail left out
    trained = [tuple(w) for r in recs for w in r["windows"]]
    assert len(trained) == len(set(trained)), "a window was trained twice"
    assert set(trained) <= set(universe)
    lost = len(universe) - len(trained)
    assert 0 <= lost < worlds[-1] * BATCH, f"{lost} windows of {len(universe)} were never trained"

    # one W&B run across all resumes, and its id in the last checkpoint (a directory for the sharded strategies)
    runs = sorted((tmp_path / "run" / "wandb").glob("offline-run-*"))
    ids = {re.match(r"offline-run-\d{8}_\d{6}-([a-z0-9]+)", p.name).group(1) for p in runs}  # "-1" if same second
    assert len(runs) == len(worlds) and len(ids) == 1, [p.name for p in runs]
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert peek(str(last), "wandb_run_id") == ids.pop()
    assert peek(str(last), "global_step") == first

    # a sharded checkpoint that lost a rank's file is not resumable: `last` passes over it, naming it
    from framework.callbacks.checkpointing import find_checkpoint
    from framework.checkpoint.formats import checkpoint_problem

    assert checkpoint_problem(last) is None
    if strategy.startswith("deepspeed") and worlds[-1] > 1:
        newest = os.path.realpath(last)
        victim = sorted(glob.glob(os.path.join(newest, "*", "*optim_states.pt")))[-1]
        os.remove(victim)
        assert "optimizer states of 1 of its 2 ranks" in checkpoint_problem(last)
        with pytest.warns(UserWarning, match="cannot be read"):
            older = find_checkpoint("last", str(last.parent))
        assert older != str(last) and checkpoint_problem(older) is None


@pytest.mark.slow
def test_each_rank_resumes_its_own_random_stream(shards, tmp_path):
    """2 ranks with different random streams: 6 steps straight == 3 steps + resume + 3 steps, rank by rank."""
    digests = {}
    for name, stops in (("straight", [None]), ("resumed", [3, None])):
        run = tmp_path / name
        run.mkdir()
        for i, stop in enumerate(stops):
            probe = {"class_path": "dist_fit.RngProbe", "init_args": {"path": str(run / "rng")}}
            fit(write_config(run, shards, strategy="ddp", devices=2, max_steps=6, stop_at=stop, callbacks=[probe],
                             label=i), *(["--ckpt_path", "last"] if i else []))
        digests[name] = sorted((d["step"], d["rank"], d["rng"]) for r in (0, 1) for d in map(
            json.loads, (run / f"rng.rank{r}.jsonl").read_text().splitlines()))
    assert len(digests["straight"]) == 12
    assert {d for _, rank, d in digests["straight"] if rank == 0}.isdisjoint(
        {d for _, rank, d in digests["straight"] if rank == 1})  # the ranks' streams differ
    assert digests["resumed"] == digests["straight"]


def assert_same_training_state(saved: Path, restored: Path) -> None:
    """The digests of tests/dist_fit.py OptimizerProbe: at the end of a run vs once its checkpoint is restored."""
    a, b = json.loads(saved.read_text()), json.loads(restored.read_text())
    assert b["global_step"] == a["global_step"]
    # every Adam state counts one step per optimizer step (no shared step counters running ahead)
    assert a["adam_steps"] == [a["global_step"]], f"Adam steps {a['adam_steps']} at global step {a['global_step']}"
    assert b["adam_steps"] == a["adam_steps"], "the Adam step counts were not restored"
    assert b["groups"] == a["groups"], "param group hyperparameters differ"
    assert a["params"].keys() == b["params"].keys()
    for name, (x, y) in ((n, (a["params"][n], b["params"][n])) for n in a["params"]):
        # fp32 value, exp_avg, exp_avg_sq, the value the forward uses
        for what, u, v in zip(("value", "exp_avg", "exp_avg_sq", "module value"), x, y):
            assert u is not None and v is not None, f"{name}: no {what}"
            assert math.isclose(u, v, rel_tol=1e-9, abs_tol=1e-12), f"{name} {what}: saved {u}, restored {v}"
