"""The launchers, for real: launch/torchrun.sh with 2 processes, and launch/slurm/pretrain.sbatch unchanged on a
two-node SLURM cluster (tests/slurm_cluster.py over tests/netns_cluster.py), as 2 nodes x 1 task and as 1 node x 2
tasks, including a preemption: SIGUSR1 -> checkpoint -> requeue -> resume into the same W&B run at the exact data
position. All on CPU, DDP over gloo, a tiny GPT.

Exactness is checked against an uninterrupted torchrun run of the same config: every (step, batch digest, loss) that
each rank recorded must match, nothing trained twice, nothing skipped.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import lightning as L
import pytest
import torch
from netns_cluster import netns_cluster  # noqa: F401 - the fixture the SLURM cluster runs on
from slurm_cluster import slurm_cluster  # noqa: F401 - the fixture

from framework.commands.fit import fit

ROOT = Path(__file__).parent.parent
TORCHRUN = ROOT / "launch" / "torchrun.sh"
SBATCH = ROOT / "launch" / "slurm" / "pretrain.sbatch"
STEPS = 40  # long enough that a signal sent after the first steps lands mid-run


@pytest.fixture(scope="module")
def shards(text_shards) -> Path:
    """test_fit's corpus (conftest.py, shared by the run)."""
    return text_shards("lines", 0.1)


def write_config(run: Path, shards: Path, max_steps: int = STEPS, **trainer) -> Path:
    """A tiny DDP fit on CPU; `{run}/steps.jsonl` gets one line per rank and step (tests/recorder.py)."""
    run.mkdir(parents=True, exist_ok=True)
    config = {
        "seed_everything": 3,
        "model": {"class_path": "framework.tasks.causal_lm.CausalLMTask",
                  "init_args": {"preset": "gpt-tiny", "config": {"dropout": 0.1}, "lr": 3e-3, "warmup_steps": 2}},
        "data": {"path": str(shards), "seq_len": 32, "batch_size": 4, "num_workers": 1, "shuffle_block": 16},
        "trainer": {"default_root_dir": str(run / "root"), "accelerator": "cpu", "strategy": "ddp",
                    "max_steps": max_steps, "limit_val_batches": 0, "log_every_n_steps": 1,
                    "enable_progress_bar": False, "enable_model_summary": False,
                    "callbacks": [{"class_path": "recorder.StepRecorder",
                                   "init_args": {"path": str(run / "steps.jsonl")}}], **trainer},
        "checkpoint": {"every_n_steps": 25, "keep": 10},
        "summary": {"sample_tokens": 0},
        "wandb": {"mode": "offline"},
    }
    path = run / "config.json"
    path.write_text(json.dumps(config))
    return path


def env(**extra: str) -> dict[str, str]:
    # one thread per process: the 2 ranks share 2 cores, and equal thread counts keep the losses bit-identical
    # between launchers; PYTHON is the interpreter the launch scripts run
    return {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", "PYTHON": sys.executable,
            "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}", **extra}


def records(run: Path) -> list[tuple]:
    lines = (run / "steps.jsonl").read_text().splitlines()
    return sorted((r["step"], r["tokens"], r["loss"]) for r in map(json.loads, lines))


def wait_for_steps(run: Path, n: int, running: Callable[[], bool], timeout: float = 120) -> None:
    """Until `n` step lines (over all ranks) are recorded; fails at once if the training stops running first."""
    path, deadline = run / "steps.jsonl", time.monotonic() + timeout
    while not path.exists() or len(path.read_text().splitlines()) < n:
        assert running(), "the training ended before it was signalled"
        assert time.monotonic() < deadline, f"fewer than {n} steps recorded after {timeout} s"
        time.sleep(0.05)


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def wandb_ids(run: Path) -> list[str]:
    return [p.name.rsplit("-", 1)[-1] for p in sorted((run / "root" / "wandb").glob("offline-run-*"))]


def torchrun(run: Path, *args: str) -> subprocess.Popen:
    with open(run / "log.txt", "ab") as log:
        return subprocess.Popen(["bash", str(TORCHRUN), "--config", str(run / "config.json"), *args], cwd=run,
                                env=env(NPROC="2"), stdout=log, stderr=subprocess.STDOUT)


def finish(proc: subprocess.Popen, run: Path, timeout: float = 180) -> None:
    assert proc.wait(timeout) == 0, (run / "log.txt").read_text()[-4000:]


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory) -> Path:
    """An uninterrupted 2-process torchrun run of STEPS steps."""
    run = tmp_path_factory.mktemp("reference")
    write_config(run, shards)
    finish(torchrun(run), run)
    return run


# ---------------------------------------------------------------------------------------------------- torchrun

@pytest.mark.slow
def test_torchrun_runs_two_ranks_and_checkpoints(reference):
    ckpts = reference / "root" / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("step*.ckpt")) == ["step0000025.ckpt", f"step{STEPS:07d}.ckpt"]
    last = load(ckpts / "last.ckpt")
    assert last["global_step"] == STEPS
    assert last["ShardDataModule"]["segment"]["world"] == 2  # the data position was laid out for 2 ranks
    steps = Counter(step for step, _, _ in records(reference))
    assert steps == {s: 2 for s in range(STEPS)}  # both ranks trained every step
    assert last["wandb_run_id"] == wandb_ids(reference)[0]


@pytest.mark.slow
def test_torchrun_sigterm_checkpoints_stops_and_resumes_exactly(shards, reference, tmp_path):
    """SIGTERM to the launcher (scancel, Kubernetes): torchrun passes it to the training processes, which finish the
    step, checkpoint it and exit 75 before torchrun's grace period ends; the resumed run equals the uninterrupted one."""
    write_config(tmp_path, shards)
    proc = torchrun(tmp_path)
    wait_for_steps(tmp_path, 2 * 3, lambda: proc.poll() is None)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(180) != 0  # the job did not finish: whatever launched it requeues it
    log = (tmp_path / "log.txt").read_text()
    assert "stopped on SIGTERM after step" in log, log[-4000:]
    stopped = load(tmp_path / "root" / "checkpoints" / "last.ckpt")["global_step"]
    assert 3 <= stopped < STEPS and max(step for step, _, _ in records(tmp_path)) == stopped - 1

    finish(torchrun(tmp_path, "--ckpt_path", "last"), tmp_path)
    assert records(tmp_path) == records(reference)


# ---------------------------------------------------------------------------------------------------- in process

class SignalAt(L.Callback):
    """Sends this process a signal (SIGUSR1 by default) at the end of batch `batch`."""

    def __init__(self, batch: int, signum: int = int(signal.SIGUSR1)):
        self.batch, self.signum = batch, signum

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == self.batch:
            os.kill(os.getpid(), self.signum)


def test_preemption_stops_only_at_an_optimizer_step(shards, tmp_path):
    """With 2 micro-batches per step, a signal after micro-batch 3 of 4 (mid-step 2) stops after step 2, not before:
    the checkpoint never holds half an accumulation."""
    config = write_config(tmp_path, shards, strategy="auto", devices=1, accumulate_grad_batches=2)
    before = signal.getsignal(signal.SIGUSR1)
    fit(["--config", str(config), "--trainer.callbacks+=test_launch.SignalAt", "--trainer.callbacks.batch=2"])
    last = load(tmp_path / "root" / "checkpoints" / "last.ckpt")
    assert last["global_step"] == 2
    assert last["ShardDataModule"]["batches"] == 4  # the data position: 4 micro-batches trained, no more
    assert signal.getsignal(signal.SIGUSR1) == before  # the handler is removed with the fit


def test_sigterm_checkpoints_the_step_and_exits_75_for_a_requeue(shards, tmp_path):
    """SIGTERM (scancel, a Kubernetes eviction) mid-step: the step finishes, is checkpointed, the exit code asks for
    a requeue, and the resumed run continues from that step."""
    config = write_config(tmp_path, shards, strategy="auto", devices=1, accumulate_grad_batches=2)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as stopped:
        fit(["--config", str(config), "--trainer.callbacks+=test_launch.SignalAt", "--trainer.callbacks.batch=2",
             f"--trainer.callbacks.signum={int(signal.SIGTERM)}"])
    assert stopped.value.code == 75
    last = load(tmp_path / "root" / "checkpoints" / "last.ckpt")
    assert last["global_step"] == 2 and last["ShardDataModule"]["batches"] == 4
    assert signal.getsignal(signal.SIGTERM) == before  # the handler is removed with the fit
    fit(["--config", str(config), "--ckpt_path", "last", "--trainer.max_steps", "4"])
    assert load(tmp_path / "root" / "checkpoints" / "last.ckpt")["global_step"] == 4


# ---------------------------------------------------------------------------------------------------- SLURM

LAYOUTS = {"2x1": ["--nodes=2", "--ntasks-per-node=1"], "1x2": ["--nodes=1", "--ntasks-per-node=2"],
           "1-2": ["--nodes=1-2"]}  # a range: as many nodes as are up, one task each (no GPUs)


def sbatch(cluster, run: Path, layout: str = "2x1", *options: str) -> str:
    """launch/slurm/pretrain.sbatch as `layout` (nodes x tasks per node); gloo on the nodes' cluster interface."""
    cluster.env.update(env(GLOO_SOCKET_IFNAME=cluster.netns.ifname))
    return cluster.sbatch([*LAYOUTS[layout], "--gpus-per-node=0", "--cpus-per-task=1", "--time=10",
                           f"--output={run / 'slurm.out'}", *options, str(SBATCH), "--config",
                           str(run / "config.json")], cwd=run)


def start_requeued(cluster, job: str) -> None:
    """SLURM holds a requeued job ~2 min (Reason=BeginTime); start it now, but not within the second in which slurmd
    revoked the first attempt's credential (it compares whole seconds: "Job credential revoked")."""
    time.sleep(2)
    cluster.scontrol("update", f"JobId={job}", "StartTime=now")


@pytest.mark.slow
@pytest.mark.parametrize("layout,signal_args", [("2x1", ["--signal=USR1", "--batch"]), ("1x2", ["--signal=TERM"])],
                         ids=["usr1-two-nodes", "term-one-node"])
def test_sbatch_preempted_checkpoints_requeues_and_resumes_exactly(slurm_cluster, shards, reference,  # noqa: F811
                                                                    tmp_path, layout, signal_args):
    """USR1 to the batch script (on node 1 of a two-node job): what `#SBATCH --signal=B:USR1@120` does before the
    time limit; the script passes it to both nodes' tasks and requeues the job, which resumes on two nodes.
    TERM to every process of the step (the W&B service included), as SLURM's preemption and
    `scancel --signal=TERM` deliver it: the tasks stop after the same step, checkpoint it and exit 75 ("requeue
    me"); SLURM's preemption requeues by itself, so here the job is submitted again, as the requeue would. (W&B's
    service process dies of the signal too: `pretrain fit` warns and still exits 75; W&B's own logger prints the
    broken connection's traceback.)"""
    term = "--signal=TERM" in signal_args
    config = json.loads(write_config(tmp_path, shards).read_text())
    config["trainer"]["callbacks"].append({"class_path": "dist_fit.PlaceRecorder",
                                           "init_args": {"path": str(tmp_path / "place")}})
    (tmp_path / "config.json").write_text(json.dumps(config))
    job = sbatch(slurm_cluster, tmp_path, layout)
    slurm_cluster.wait(job, {"RUNNING"}, timeout=60)
    wait_for_steps(tmp_path, 2 * 3, lambda: slurm_cluster.job(job).get("JobState") == "RUNNING")
    assert slurm_cluster.run(["scancel", *signal_args, job]).returncode == 0

    info = slurm_cluster.wait(job, {"PENDING"}, timeout=120)
    if term:
        out = (tmp_path / "slurm.out").read_text()
        stopped = re.findall(r"stopped on SIGTERM after step (\d+), which is checkpointed: exiting with 75", out)
        assert stopped, out[-4000:]
        if info["JobState"] != "PENDING":  # srun ended the step when the first task exited 75: submit it again
            job = sbatch(slurm_cluster, tmp_path, layout)
    else:
        assert info["JobState"] == "PENDING" and info["Restarts"] == "1", info
    if slurm_cluster.job(job).get("JobState") == "PENDING" and slurm_cluster.job(job).get("Restarts") == "1":
        start_requeued(slurm_cluster, job)
    info = slurm_cluster.wait(job, set(), timeout=180)
    out = (tmp_path / "slurm.out").read_text()  # both attempts: --open-mode=append
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", out[-4000:]
    nodes, tasks = layout.split("x")
    assert f"attempt SLURM_RESTART_COUNT=0: {nodes} node(s) x {tasks} task(s)" in out
    assert f"attempt SLURM_RESTART_COUNT=1: {nodes} node(s) x {tasks} task(s)" in out or term
    # each rank where SLURM put it (as the resumed run saw it): global, local and node rank, host
    places = sorted((json.loads(p.read_text()) for p in tmp_path.glob("place.rank*.json")),
                    key=lambda r: r["global_rank"])
    expect = [(0, 0, 0, "node1"), (1, 0, 1, "node2")] if layout == "2x1" else [(0, 0, 0, "node1"), (1, 1, 0, "node1")]
    assert [(p["global_rank"], p["local_rank"], p["node_rank"], p["hostname"]) for p in places] == expect, places
    assert {(p["world"], p["num_nodes"]) for p in places} == {(2, int(nodes))}

    ckpts = tmp_path / "root" / "checkpoints"
    stopped = [int(p.stem[4:]) for p in ckpts.glob("step*.ckpt") if int(p.stem[4:]) % 25 and int(p.stem[4:]) < STEPS]
    # the regular ones, the preemption's and the link: each written once, by global rank 0, into the shared directory
    assert len(stopped) == 1, sorted(p.name for p in ckpts.iterdir())
    assert sorted(p.name for p in ckpts.iterdir()) == sorted(
        ["last.ckpt", "step0000025.ckpt", f"step{stopped[0]:07d}.ckpt", f"step{STEPS:07d}.ckpt"])
    assert f"stopping after step {stopped[0]}" in out
    assert f"Restored all states from the checkpoint at {ckpts / 'last.ckpt'}" in out
    assert load(ckpts / "last.ckpt")["global_step"] == STEPS
    assert records(tmp_path) == records(reference)  # the exact data position, on both ranks
    first, second = wandb_ids(tmp_path)
    assert first == second == load(ckpts / "last.ckpt")["wandb_run_id"]
