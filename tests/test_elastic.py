"""Elastic training on two nodes for real: launch/torchrun.sh with NNODES=1:2 on each node of tests/netns_cluster.py,
the rendezvous store in a process on the cluster's switch (a host that is neither node), a tiny GPT on CPU.

Node 2 is lost mid-run (its network goes down and every process on it is killed, as when a machine dies: no
connection is closed politely), node 1 notices through the process-group timeout, restarts its training process
alone (world 1) from the newest checkpoint; node 2 comes back, torchrun restarts node 1's process to let it in (it
checkpoints the step it is on first), and the run ends the epoch at world 2. Checked: every window of the epoch
trained exactly once by the steps that count (a step trained again after a restart counts once, the last time),
the global step continuing across the restarts, the worlds 2 -> 1 -> 2 in that order, one W&B run.

The same loss under SLURM (tests/slurm_cluster.py on the same two nodes): a job submitted with `--nodes=1-2` loses
node 2; slurmctld sets the node DOWN (no answer from its slurmd for SlurmdTimeout) and requeues the job (it was
submitted with --requeue), which runs again on node 1 alone and continues from the newest checkpoint.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from netns_cluster import netns_cluster  # noqa: F401 - the fixture
from slurm_cluster import slurm_cluster  # noqa: F401 - the fixture
from test_launch import sbatch, start_requeued
from test_multinode import BATCH, NPROC, ROOT, fit_config, finish, launch, logs, node_env

from dist_fit import records
from framework.callbacks.checkpointing import peek
from framework.data.datamodule import ShardDataModule

STORE_PORT = 29450
EVERY = 2  # checkpoint every 2 steps
LOST_AT = 5  # node 2 is lost after step 5: the newest checkpoint is step 4, step 5 is lost work and is retrained
ALONE_AT = 9  # node 1 alone waits after step 9 (a global step count) until torchrun restarts it for node 2
PG_TIMEOUT = 10  # seconds: how long node 1's collective waits for the dead node (distributed.timeout)
# the rendezvous: a node without heartbeat for 3 x 1 s is gone; once MIN nodes are in, wait 1 s for more
RDZV_CONF = "last_call_timeout=1,keep_alive_interval=1,keep_alive_max_attempt=3"


@pytest.fixture(scope="module")
def universe(shards) -> list[tuple[int, ...]]:
    dm = ShardDataModule(str(shards), seq_len=32, batch_size=1, num_workers=0, shuffle=False)
    dm.setup("fit")
    return [tuple(b["tokens"][0].tolist()) for b in dm.train_dataloader()]


def elastic_config(run: Path, shards: Path) -> Path:
    path = fit_config(run, shards)
    config = json.loads(path.read_text())
    callbacks = config["trainer"]["callbacks"]
    callbacks[0]["class_path"] = "dist_fit.StartRecorder"  # records name the (re)start that wrote them
    callbacks.append({"class_path": "dist_fit.Gate", "init_args": {"path": str(run / "gate"),
                                                                   "at": [LOST_AT, ALONE_AT]}})
    config["checkpoint"] = {"every_n_steps": EVERY, "keep": 20}
    config["distributed"] = {"timeout": PG_TIMEOUT}
    path.write_text(json.dumps(config))
    return path


def wait_for(what, run: Path, timeout: float = 180, procs=()) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < deadline, f"waited {timeout} s in vain:\n{logs(run)}"
        for p in procs:
            assert p.poll() is None, f"a node exited ({p.returncode}) early:\n{logs(run)}"
        time.sleep(0.05)


def lose_node(cluster, node: int) -> None:
    """The machine dies: its network goes first (nothing it had open is closed towards the others), then every
    process on it."""
    name = cluster.names[node]
    subprocess.run(["ip", "-n", name, "link", "set", cluster.ifname, "down"], check=True)
    pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass
    while subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout.split():
        time.sleep(0.05)


@pytest.mark.slow
def test_a_lost_node_is_survived_and_rejoins(netns_cluster, shards, universe, tmp_path):  # noqa: F811 - fixture
    cluster = netns_cluster
    run = tmp_path
    elastic_config(run, shards)
    env = {"NNODES": "1:2", "RDZV_ENDPOINT": f"{cluster.switch_addr}:{STORE_PORT}", "RDZV_ID": "elastic-test",
           "RDZV_CONF": RDZV_CONF, "MAX_RESTARTS": "3"}
    store = subprocess.Popen(cluster.on_switch([sys.executable, "-m", "framework.torchrun", "--serve-store",
                                                f"{cluster.switch_addr}:{STORE_PORT}"]),
                             env=node_env(cluster), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    procs = []
    try:
        assert b"rendezvous store at" in store.stdout.readline()
        t0 = time.perf_counter()
        procs = launch(cluster, run, **env)
        gate = run / "gate"

        # both nodes hold after step LOST_AT (checkpoints 2 and 4 written); node 2 dies there
        wait_for(lambda: all(Path(f"{gate}.{LOST_AT}.rank{r}").exists() for r in (0, 1)), run, procs=procs)
        t_lost = time.perf_counter()
        lose_node(cluster, 1)
        procs[1].wait()
        Path(f"{gate}.{LOST_AT}.open").touch()

        # node 1 alone: its collective times out, torchrun restarts it at world 1 from step 4
        wait_for(lambda: Path(f"{gate}.{ALONE_AT}.rank0").exists(), run, procs=procs[:1])
        t_alone = time.perf_counter()

        # node 2 comes back: torchrun restarts node 1's process (which checkpoints its step first), both at world 2
        subprocess.run(["ip", "-n", cluster.names[1], "link", "set", cluster.ifname, "up"], check=True)
        procs[1:] = launch(cluster, run, nodes=(1,), **env)
        assert finish(procs, run, timeout=240) == [0, 0], logs(run)
        t_end = time.perf_counter()
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
        store.kill()
        store.wait()
    print(f"elastic: lost node 2 after {t_lost - t0:.1f} s, world 1 at step {ALONE_AT} {t_alone - t_lost:.1f} s "
          f"later, world 2 again to the end of the epoch {t_end - t_alone:.1f} s later")

    first, alone, rejoined = check_starts(run, universe, [2, 1, 2], run / "run")
    assert alone[-1] >= ALONE_AT - 1
    assert rejoined[0] == alone[-1] + 1, (alone, rejoined)  # node 1 checkpointed its last step before the restart
    # node 1 noticed the dead node through the process-group timeout (gloo's words), not through a closed connection
    assert f"Timed out waiting {PG_TIMEOUT * 1000}ms" in (run / "node1.log").read_text()


def check_starts(run: Path, universe: list, worlds: list[int], root: Path) -> list[list[int]]:
    """The accounting of a run whose world changed: the (re)starts in order, each with its world (`worlds`); the
    first trains steps 0..LOST_AT-1, the second continues from the newest checkpoint before the loss, each later one
    goes on without a gap; every window of the epoch trained exactly once by the steps that count (a step trained
    again after a restart counts once, the last time); the final checkpoint's step and data position (at the last
    world, laid out len(worlds) - 1 times), and one W&B run. Returns each start's steps."""
    recs = records(run)
    starts = []
    for r in sorted(recs, key=lambda r: float(r["start"].split("-")[1])):
        if not starts or starts[-1]["start"] != r["start"]:
            starts.append({"start": r["start"], "world": r["world"], "steps": set()})
        assert r["nodes"] == r["world"] // NPROC  # the Trainer's num_nodes: what the launcher started this time
        starts[-1]["steps"].add(r["step"])
    assert [s["world"] for s in starts] == worlds, [s["world"] for s in starts]
    steps = [sorted(s["steps"]) for s in starts]
    assert steps[0] == list(range(LOST_AT)), steps[0]  # steps 0..4 (global steps 1..5) before node 2 was lost
    newest = (LOST_AT // EVERY) * EVERY
    assert steps[1][0] == newest, steps[1]  # from the newest checkpoint: step LOST_AT's work was lost
    for s in steps[1:]:
        assert s == list(range(s[0], s[-1] + 1)), s

    # the steps that count: each step's records from the last start that trained it; every rank of its world each
    last = {}
    for s in starts:
        for step in s["steps"]:
            last[step] = s
    counted = [r for r in recs if last[r["step"]]["start"] == r["start"]]
    for step, s in last.items():
        assert sorted(r["rank"] for r in counted if r["step"] == step) == list(range(s["world"] * NPROC)), step
    trained = [tuple(w) for r in counted for w in r["windows"]]
    assert len(trained) == len(set(trained)), "a window was trained twice"
    assert set(trained) <= set(universe)
    assert len(universe) - len(trained) < 2 * NPROC * BATCH, f"{len(universe) - len(trained)} windows never trained"

    ckpt = str(root / "checkpoints" / "last.ckpt")
    assert peek(ckpt, "global_step") == steps[-1][-1] + 1
    segment = peek(ckpt, "ShardDataModule")["segment"]
    assert segment["world"] == worlds[-1] * NPROC and segment["index"] == len(worlds) - 1, segment
    ids = {p.name.rsplit("-", 1)[-1] for p in sorted((root / "wandb").glob("offline-run-*"))}
    assert ids == {peek(ckpt, "wandb_run_id")}, ids
    return steps


@pytest.mark.slow
def test_slurm_requeues_a_job_that_lost_a_node_on_the_nodes_left(slurm_cluster, shards, universe,  # noqa: F811
                                                                  tmp_path):
    """`sbatch --nodes=1-2` (pretrain.sbatch unchanged): node 2 dies after step LOST_AT; SLURM sets it DOWN and
    requeues the job, which runs on node 1 alone from the newest checkpoint to the end of the epoch."""
    cluster, run = slurm_cluster, tmp_path
    path = elastic_config(run, shards)
    config = json.loads(path.read_text())
    config["trainer"]["callbacks"][-1]["init_args"]["at"] = [LOST_AT]
    # node 1's collective must outwait SLURM's finding the node lost (SlurmdTimeout): SLURM ends the job, and
    # requeues it, rather than the job failing first
    config["distributed"] = {"timeout": 120}
    path.write_text(json.dumps(config))
    job = sbatch(cluster, run, "1-2")
    gate = run / "gate"
    try:
        wait_for(lambda: all(Path(f"{gate}.{LOST_AT}.rank{r}").exists() for r in (0, 1)), run)
        lose_node(cluster.netns, 1)
        Path(f"{gate}.{LOST_AT}.open").touch()
        info = cluster.wait(job, {"PENDING"}, timeout=120)
        assert info["JobState"] == "PENDING" and info["Restarts"] == "1", (info, cluster.logs())
        start_requeued(cluster, job)
        info = cluster.wait(job, set(), timeout=180)
    finally:  # node 2 comes back for the tests after this one
        subprocess.run(["ip", "-n", cluster.netns.names[1], "link", "set", cluster.netns.ifname, "up"], check=True)
        cluster.start_node(1)
        cluster.wait_idle()
    out = (run / "slurm.out").read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", out[-4000:]
    assert "attempt SLURM_RESTART_COUNT=0: 2 node(s) x 1 task(s) on node[1-2]" in out, out[-4000:]
    assert "attempt SLURM_RESTART_COUNT=1: 1 node(s) x 1 task(s) on node1" in out, out[-4000:]
    check_starts(run, universe, [2, 1], run / "run")


# ------------------------------------------------------------------------------------------------ the pieces, fast

def cli_config(*args: str, tmp: Path):
    from framework.commands.fit import PretrainCLI
    from framework.data.base import StreamDataModule
    from framework.tasks.base import PretrainTask

    return PretrainCLI(PretrainTask, StreamDataModule, subclass_mode_model=True, subclass_mode_data=True, run=False,
                       args=["--config", str(ROOT / "configs" / "gpt" / "smoke.yaml"), "--trainer.accelerator", "cpu",
                             "--trainer.default_root_dir", str(tmp), "--wandb.mode", "disabled",
                             "--data.init_args.batch_size", "4", *args],
                       save_config_callback=None, load_from_checkpoint_support=False, auto_configure_optimizers=False)


def torchrun_env(monkeypatch, nodes: int, per_node: int = 1, elastic: str | None = None) -> None:
    """The environment torchrun gives a training process of a job at `nodes` nodes x `per_node` processes."""
    for key, value in {"TORCHELASTIC_RUN_ID": "test", "LOCAL_WORLD_SIZE": per_node, "GROUP_WORLD_SIZE": nodes,
                       "WORLD_SIZE": nodes * per_node, "RANK": 0, "LOCAL_RANK": 0, "GROUP_RANK": 0,
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": 29999}.items():
        monkeypatch.setenv(key, str(value))
    if elastic:
        monkeypatch.setenv("PRETRAIN_ELASTIC_NNODES", elastic)


def test_global_batch_sets_the_accumulation_for_the_world(monkeypatch, tmp_path):
    """distributed.global_batch_size / (world x data.batch_size) micro-batches per step, with the world (and the
    Trainer's devices and nodes) what torchrun started this time, whatever the config or NNODES said."""
    cli = cli_config("--trainer.devices", "2", "--trainer.strategy", "ddp", "--distributed.global_batch_size", "32",
                     tmp=tmp_path)
    assert cli.trainer.world_size == 2 and cli.trainer.accumulate_grad_batches == 4
    torchrun_env(monkeypatch, nodes=4, elastic="2:4")
    cli = cli_config("--trainer.devices", "8", "--trainer.num_nodes", "1", "--trainer.strategy", "ddp",
                     "--distributed.global_batch_size", "48", "--distributed.timeout", "7", tmp=tmp_path)
    assert (cli.trainer.num_nodes, cli.trainer.num_devices, cli.trainer.world_size) == (4, 1, 4)
    assert cli.trainer.accumulate_grad_batches == 3  # 48 / (4 x 4); 2 and 3 nodes divide too
    assert cli.trainer.strategy._timeout.total_seconds() == 7
    # the option replaces a config's accumulation, saying so
    with pytest.warns(UserWarning, match=r"trainer.accumulate_grad_batches=16 is replaced by 3: distributed."
                                         r"global_batch_size=48 on 4 rank\(s\) x data.batch_size 4"):
        cli = cli_config("--trainer.strategy", "ddp", "--distributed.global_batch_size", "48",
                         "--trainer.accumulate_grad_batches", "16", tmp=tmp_path)
    assert cli.trainer.accumulate_grad_batches == 3
    # without the option: the config's accumulation, and the global batch grows with the world
    cli = cli_config("--trainer.strategy", "ddp", "--trainer.accumulate_grad_batches", "2", tmp=tmp_path)
    assert cli.trainer.world_size == 4 and cli.trainer.accumulate_grad_batches == 2


def test_a_global_batch_that_a_world_does_not_divide_is_refused(monkeypatch, tmp_path):
    from framework.errors import UserError

    with pytest.raises(UserError, match=r"distributed.global_batch_size=20 is not a multiple of 2 rank\(s\) x "
                                        r"data.batch_size 4 = 8: set it to a multiple of 8"):
        cli_config("--trainer.devices", "2", "--trainer.strategy", "ddp", "--distributed.global_batch_size", "20",
                   tmp=tmp_path)
    # an elastic job fails at its first start for any world it may come to, not when it loses a node
    torchrun_env(monkeypatch, nodes=2, elastic="1:3")
    with pytest.raises(UserError, match=r"not a multiple of 3 rank\(s\) \(3 node\(s\)\) x data.batch_size 4 = 12"):
        cli_config("--trainer.strategy", "ddp", "--distributed.global_batch_size", "16", tmp=tmp_path)


@pytest.mark.parametrize("env,args,said", [
    ({"NNODES": "3:2"}, [], "NNODES='3:2' is not MIN:MAX with 1 <= MIN <= MAX"),
    ({"NNODES": "1:2"}, [], "NNODES=1:2 (elastic) needs a c10d rendezvous: set RDZV_ENDPOINT=host:port"),
    ({"NNODES": "1:2", "RDZV_ENDPOINT": "h:1"}, ["--ckpt_path", "x.ckpt"], "drop --ckpt_path"),
    ({"NNODES": "1:2", "RDZV_ENDPOINT": "h:1", "RDZV_CONF": "last_call_timeout"}, [], "RDZV_CONF='last_call_timeout'"),
    ({"NNODES": "1:2", "RDZV_ENDPOINT": "h:1", "MAX_RESTARTS": "-1"}, [], "MAX_RESTARTS='-1' is not a whole number"),
], ids=["min-above-max", "no-endpoint", "ckpt-path", "rdzv-conf", "max-restarts"])
def test_elastic_launch_bad_input_is_one_line(env, args, said):
    r = subprocess.run(["bash", str(ROOT / "launch" / "torchrun.sh"), "--config", "c.yaml", *args],
                       env={**os.environ, "NPROC": "1", "PYTHON": sys.executable, **env}, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and said in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_resuming_last_without_a_checkpoint_starts_fresh(tmp_path):
    """What every start of an elastic job passes: the first one, with no checkpoint (not even the directory), trains
    from scratch."""
    from framework.callbacks.checkpointing import find_checkpoint

    assert find_checkpoint("last", str(tmp_path / "run" / "checkpoints")) is None
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    assert find_checkpoint("last", str(tmp_path / "run" / "checkpoints")) is None


def test_serve_store_bad_endpoint_is_one_line():
    r = subprocess.run([sys.executable, "-m", "framework.torchrun", "--serve-store", "nowhere"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip() == ("error: --serve-store 'nowhere' is not HOST:PORT "
                                                      "(e.g. 0.0.0.0:29400)"), r.stderr


def test_elastic_node_without_its_store_says_so_in_one_line():
    """An elastic node that cannot reach its store (not started yet, or a wrong address) names the store command.
    (The path from torchrun to this message is tests/test_multinode.py's unreachable-endpoint test.)"""
    from torch.distributed import run
    from torch.distributed.elastic.rendezvous.api import RendezvousConnectionError

    from framework.torchrun import explain

    def _create_tcp_store():  # where torchrun's c10d backend raises it
        raise RendezvousConnectionError("The connection to the C10d store has failed.")

    args = run.parse_args(["--nnodes=1:2", "--rdzv-backend=c10d", "--rdzv-endpoint=10.77.0.254:29450",
                           "--rdzv-conf=read_timeout=2", "train.py"])
    with pytest.raises(RendezvousConnectionError) as error:
        _create_tcp_store()
    assert explain(error.value, args) == (
        "cannot reach the rendezvous store at 10.77.0.254:29450 (waited 2 s): start it first on that host (python -m "
        "framework.torchrun --serve-store 10.77.0.254:29450), or the node with that address, and check "
        "RDZV_ENDPOINT's address and that its port is open between the nodes")


@pytest.mark.slow
def test_bad_input_under_elastic_torchrun_is_one_line_and_not_retried(shards, tmp_path):
    """A global batch that the world does not divide, on one node (its torchrun hosting the store): the training
    process says so in one line and exits 2, and torchrun does not spend its restarts on it (it would fail alike)."""
    config = fit_config(tmp_path, shards)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TORCHELASTIC_"))}
    env.update(NNODES="1:2", NPROC="1", RDZV_ENDPOINT=f"127.0.0.1:{STORE_PORT}", RDZV_CONF="last_call_timeout=1",
               MAX_RESTARTS="3", PYTHON=sys.executable, WANDB_MODE="disabled", OMP_NUM_THREADS="1",
               PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'tests'}")
    r = subprocess.run(["bash", str(ROOT / "launch" / "torchrun.sh"), "--config", str(config),
                        "--distributed.global_batch_size", "6"], env=env, cwd=tmp_path, capture_output=True,
                       text=True, timeout=180)
    out = r.stdout + r.stderr
    assert r.returncode == 2, out
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert errors == ["error: distributed.global_batch_size=6 is not a multiple of 1 rank(s) x data.batch_size 4 = 4: "
                      "set it to a multiple of 4 (of every world size x batch size the job may run at), or change "
                      "data.batch_size"], out
    assert "Traceback" not in out and out.count("failed (exitcode: 2)") == 1, out
