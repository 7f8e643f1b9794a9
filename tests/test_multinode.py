"""Two nodes for real: launch/torchrun.sh with NNODES=2 on each "node" of tests/netns_cluster.py (a network namespace
per node with its own address, interface and hostname, joined by a bridge; the file system is shared, as a cluster's
is), a c10d rendezvous on node 1's address, gloo over each node's own interface (GLOO_SOCKET_IFNAME, as a real
cluster sets it), a tiny GPT on CPU.

What a second node changes, checked here: the ranks (global, local, node) the training sees; every window of the
epoch trained once across the nodes and their DataLoader workers; one checkpoint in the shared directory; one W&B
run; a preemption signal that reaches one node only, and an exact resume on two nodes; a node that does not see the
shared run directory. And the launcher's bad inputs: nodes that never all join, an endpoint nobody answers at: one
line, exit 2, within the timeout the script was given (RDZV_TIMEOUT).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import netns_cluster as netns_cluster_module
import wandb_records
from netns_cluster import SUBNET, netns_cluster  # noqa: F401 - the fixture

from dist_fit import _LAUNCHER_VARS, records, write_config
from framework.callbacks.checkpointing import peek
from framework.data.datamodule import ShardDataModule

ROOT = Path(__file__).resolve().parent.parent
TORCHRUN = ROOT / "launch" / "torchrun.sh"
NPROC = 1  # training processes per node: the world is 2 (2 cores; a second per node only adds start-up time)
BATCH = 4  # windows per rank per step (write_config's data.batch_size)
WORKERS = 2  # DataLoader workers per rank: the windows are split over nodes x ranks x workers
PORT = 29400  # the rendezvous port on node 1 (each node has its own network: no clash with the machine's)


def node_env(cluster, **extra: str) -> dict[str, str]:
    """What every node's job gets: the rendezvous on node 1's address, and gloo on the node's own interface."""
    env = {k: v for k, v in os.environ.items()  # not the launch variables of a job this test may run inside
           if not k.startswith(("SLURM_", "TORCHELASTIC_")) and k not in (*_LAUNCHER_VARS, "LOCAL_ADDR")}
    return {**env, "NNODES": "2", "NPROC": str(NPROC), "RDZV_ENDPOINT": f"{cluster.addrs[0]}:{PORT}",
            "RDZV_ID": "multinode-test", "RDZV_TIMEOUT": "60", "GLOO_SOCKET_IFNAME": cluster.ifname,
            "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", "PYTHON": sys.executable,
            "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}", **extra}


def launch(cluster, run: Path, *args: str, nodes: tuple[int, ...] = (0, 1), local_addr: bool = False,
           node_local: dict[int, tuple[Path, Path]] | None = None, **env: str) -> list[subprocess.Popen]:
    """launch/torchrun.sh on each of `nodes`, node 1 first (it hosts the rendezvous store); logs in run/node{i}.log.
    local_addr: give each node its address as LOCAL_ADDR (else the nodes find each other by hostname).
    node_local: {node: (dir, path)}: that node sees `dir` at `path` (a bind mount of its own), as a node-local disk."""
    procs = []
    for i in nodes:
        with open(run / f"node{i + 1}.log", "ab") as log:
            argv = ["bash", str(TORCHRUN), "--config", str(run / "config.json"), *args]
            if i in (node_local or {}):
                own, path = node_local[i]
                argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                        'mount --bind "$1" "$2" && shift 2 && exec "$@"', "sh", str(own), str(path), *argv]
            extra = {"LOCAL_ADDR": cluster.addrs[i]} if local_addr else {}
            procs.append(subprocess.Popen(cluster.command(i, argv), cwd=run, env=node_env(cluster, **env, **extra),
                                          stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
    return procs


def finish(procs: list[subprocess.Popen], run: Path, timeout: float = 240) -> list[int]:
    """Every node's exit status; a node still running after `timeout` is killed (with what it started) and fails."""
    deadline, codes = time.monotonic() + timeout, []
    try:
        for p in procs:
            codes.append(p.wait(max(1.0, deadline - time.monotonic())))
    except subprocess.TimeoutExpired:
        pytest.fail(f"a node hung past {timeout} s:\n{logs(run)}")
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    return codes


def logs(run: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(run.glob("node*.log")))


def fit_config(run: Path, shards: Path, stop_at: int | None = None, label: int = 0) -> Path:
    """dist_fit's tiny GPT (DDP, fp32, a whole epoch) with WORKERS data workers, recording each step's windows
    (RankRecorder) and where each rank ran (PlaceRecorder)."""
    place = {"class_path": "dist_fit.PlaceRecorder", "init_args": {"path": str(run / f"place{label}")}}
    path = write_config(run, shards, strategy="ddp", devices=NPROC, max_steps=1000, stop_at=stop_at,
                        callbacks=[place], label=label)
    config = json.loads(path.read_text())
    config["data"]["init_args"]["num_workers"] = WORKERS
    path.write_text(json.dumps(config))
    return path


def places(run: Path, label: int = 0) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(run.glob(f"place{label}.rank*.json"))]


def wandb_runs(run: Path) -> list[Path]:
    return sorted((run / "run" / "wandb").glob("offline-run-*"))


@pytest.fixture(scope="module")
def universe(shards) -> list[tuple[int, ...]]:
    """Every window of the epoch, read in order by one reader."""
    dm = ShardDataModule(str(shards), seq_len=32, batch_size=1, num_workers=0, shuffle=False)
    dm.setup("fit")
    return [tuple(b["tokens"][0].tolist()) for b in dm.train_dataloader()]


@pytest.fixture(scope="module")
def epoch(netns_cluster, shards, tmp_path_factory) -> Path:  # noqa: F811 - the fixture
    """One uninterrupted 2-node fit of a whole epoch."""
    run = tmp_path_factory.mktemp("two-nodes")
    fit_config(run, shards)
    t0 = time.perf_counter()
    assert finish(launch(netns_cluster, run), run) == [0, 0], logs(run)
    print(f"2-node fit of one epoch: {time.perf_counter() - t0:.1f} s")
    return run


# ------------------------------------------------------------------------------------------------ the cluster itself

def test_nodes_have_their_own_network_and_hostname(netns_cluster):  # noqa: F811 - the fixture
    """Each node sees only its loopback and its own interface, has its own hostname that the other node resolves,
    and reaches the other node over the bridge."""
    code = ("import socket, sys, os\n"
            "print(socket.gethostname(), socket.gethostbyname(sys.argv[1]), sorted(os.listdir('/sys/class/net')))\n")
    out = []
    for i in (0, 1):
        peer = netns_cluster.hostnames[1 - i]
        r = subprocess.run(netns_cluster.command(i, [sys.executable, "-c", code, peer]), capture_output=True,
                           text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        out.append(r.stdout.split(maxsplit=2))
    for i, (hostname, peer_addr, interfaces) in enumerate(out):
        assert hostname == netns_cluster.hostnames[i]
        assert peer_addr == netns_cluster.addrs[1 - i]
        assert interfaces.strip() == str(sorted(["lo", netns_cluster.ifname]))
    # a server on node 2's address answers node 1, and is not reachable at the machine's own loopback from node 1
    server = subprocess.Popen(netns_cluster.command(1, [sys.executable, "-c", (
        "import socket\ns = socket.create_server((%r, 29411))\nc, _ = s.accept()\nc.sendall(b'node2')\n"
        % netns_cluster.addrs[1])]), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        client = ("import socket, sys, time\n"
                  "for _ in range(100):\n"
                  "    try: s = socket.create_connection((sys.argv[1], 29411), timeout=2); break\n"
                  "    except ConnectionRefusedError: time.sleep(0.05)\n"
                  "print(s.recv(16).decode())\n")
        r = subprocess.run(netns_cluster.command(0, [sys.executable, "-c", client, netns_cluster.addrs[1]]),
                           capture_output=True, text=True, timeout=30)
        assert r.stdout.strip() == "node2", r.stderr
    finally:
        server.kill()
        server.wait()


def test_namespaces_left_by_a_killed_run_are_removed(netns_cluster):  # noqa: F811 - skips where it cannot run
    """A run killed before its teardown leaves its namespaces; the next cluster removes them, and only those whose
    process is gone (a run beside this one keeps its own)."""
    dead = subprocess.Popen(["true"])
    dead.wait()  # its pid names no process now
    stale = f"{netns_cluster_module.PREFIX}{dead.pid}-1"
    subprocess.run(["ip", "netns", "add", stale], check=True)
    (netns_cluster_module.NETNS_ETC / stale).mkdir(parents=True, exist_ok=True)
    try:
        assert stale in netns_cluster_module.remove_stale()
        assert stale not in netns_cluster_module._namespaces()
        assert not (netns_cluster_module.NETNS_ETC / stale).exists()
        assert set(netns_cluster.names) <= set(netns_cluster_module._namespaces())  # this run's own: kept
    finally:
        subprocess.run(["ip", "netns", "del", stale], capture_output=True)


# ------------------------------------------------------------------------------------------------ a 2-node fit

@pytest.mark.slow
def test_two_nodes_train_one_epoch_exactly_once(epoch, universe, netns_cluster):  # noqa: F811 - the fixture
    # the ranks: one process per node, node rank = torchrun's group rank, global rank = node rank x NPROC + local
    where = places(epoch)
    assert len(where) == 2 * NPROC, where
    by_node = {}
    for p in where:
        assert p["world"] == 2 * NPROC and p["num_nodes"] == 2, p
        assert p["global_rank"] == p["node_rank"] * NPROC + p["local_rank"], p
        assert p["env"]["GROUP_RANK"] == str(p["node_rank"]) and p["env"]["LOCAL_RANK"] == str(p["local_rank"]), p
        assert p["env"]["GLOO_SOCKET_IFNAME"] == netns_cluster.ifname
        assert p["env"]["MASTER_ADDR"] in netns_cluster.hostnames  # the first node's, found by its hostname
        by_node.setdefault(p["hostname"], set()).add(p["node_rank"])
    assert sorted(by_node) == netns_cluster.hostnames and sorted(r for v in by_node.values() for r in v) == [0, 1]
    assert all(len(v) == 1 for v in by_node.values()), by_node  # one node rank per host

    # every step trained by both ranks; every window of the epoch once, across the nodes and their workers
    recs = records(epoch)
    steps = sorted({r["step"] for r in recs})
    assert steps == list(range(len(steps))) and len(steps) == len(universe) // (2 * NPROC * BATCH)
    for step in steps:
        assert sorted(r["rank"] for r in recs if r["step"] == step) == list(range(2 * NPROC))
    trained = [tuple(w) for r in recs for w in r["windows"]]
    assert len(trained) == len(set(trained)), "a window was trained twice"
    assert set(trained) <= set(universe)
    assert len(universe) - len(trained) < 2 * NPROC * BATCH

    # one checkpoint, of the last step, in the shared directory, and nothing else there
    ckpts = epoch / "run" / "checkpoints"
    name = f"step{len(steps):07d}.ckpt"
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.ckpt", name]
    assert os.readlink(ckpts / "last.ckpt") == name
    assert peek(str(ckpts / name), "global_step") == len(steps)
    assert peek(str(ckpts / name), "ShardDataModule")["segment"]["world"] == 2 * NPROC

    # one W&B run, on the node of global rank 0, whose id the checkpoint carries
    runs = wandb_runs(epoch)
    assert len(runs) == 1, runs
    assert runs[0].name.rsplit("-", 1)[-1] == peek(str(ckpts / name), "wandb_run_id")
    rank0_host = next(p["hostname"] for p in where if p["global_rank"] == 0)
    (log,) = runs[0].glob("run-*.wandb")
    (run_record,) = [r.run for r in wandb_records.records(log) if r.WhichOneof("record_type") == "run"]
    assert run_record.host == rank0_host, run_record.host


@pytest.mark.slow
def test_one_node_preempted_both_stop_and_resume_exactly(epoch, shards, netns_cluster, tmp_path):  # noqa: F811
    """SIGUSR1 to node 2's launcher only (a spot node being reclaimed): both nodes stop after the same step (the ranks
    agree over the network), one checkpoint; a second 2-node launch with --ckpt_path last then trains the same
    windows with the same losses, step by step and rank by rank, as the uninterrupted fit, into the same W&B run."""
    fit_config(tmp_path, shards, label=1)
    procs = launch(netns_cluster, tmp_path, local_addr=True)  # the nodes name themselves by address, not hostname
    deadline = time.monotonic() + 120
    while not any(len(p.read_text().splitlines()) >= 3 for p in tmp_path.glob("steps.rank*.jsonl")):
        assert all(p.poll() is None for p in procs), logs(tmp_path)
        assert time.monotonic() < deadline, logs(tmp_path)
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGUSR1)  # `ip netns exec` and `unshare` exec: this is node 2's torchrun.sh
    assert finish(procs, tmp_path) == [0, 0], logs(tmp_path)
    assert "preemption signal SIGUSR1: stopping after step" in logs(tmp_path)
    ckpts = tmp_path / "run" / "checkpoints"
    stopped = peek(str(ckpts / "last.ckpt"), "global_step")
    epoch_steps = max(r["step"] for r in records(epoch)) + 1
    assert 3 <= stopped < epoch_steps, stopped
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.ckpt", f"step{stopped:07d}.ckpt"]
    first = records(tmp_path)
    assert sorted((r["step"], r["rank"]) for r in first) == [(s, r) for s in range(stopped) for r in (0, 1)]

    fit_config(tmp_path, shards, label=2)
    assert finish(launch(netns_cluster, tmp_path, "--ckpt_path", "last", local_addr=True), tmp_path) == [0, 0], \
        logs(tmp_path)
    masters = [p["env"]["MASTER_ADDR"] for label in (1, 2) for p in places(tmp_path, label)]
    assert len(masters) == 4 and set(masters) <= set(netns_cluster.addrs), masters  # LOCAL_ADDR, not a hostname

    def key(r):
        return r["step"], r["rank"], r["loss"], r["windows"]

    assert sorted(map(key, records(tmp_path))) == sorted(map(key, records(epoch)))
    runs = wandb_runs(tmp_path)
    assert len(runs) == 2 and len({p.name.rsplit("-", 1)[-1] for p in runs}) == 1, runs


@pytest.mark.slow
def test_a_node_that_does_not_see_the_run_directory_is_refused(epoch, shards, netns_cluster, tmp_path):  # noqa: F811
    """Node 2 sees a directory of its own at the run directory's path, as with a node-local disk: with --ckpt_path
    last it would start afresh while node 1 resumes, the ranks training on at different steps and data positions.
    Instead every rank stops before training, naming the directory and what each side sees."""
    shutil.copytree(epoch / "run" / "checkpoints", tmp_path / "run" / "checkpoints", symlinks=True)
    fit_config(tmp_path, shards)
    own = tmp_path / "node2-disk"
    own.mkdir()
    procs = launch(netns_cluster, tmp_path, "--ckpt_path", "last", "--wandb.mode", "disabled",
                   node_local={1: (own, tmp_path / "run")})
    assert finish(procs, tmp_path, timeout=120) == [2, 2], logs(tmp_path)
    log = logs(tmp_path)
    assert "Traceback" not in log, log
    assert "error: the ranks do not see the same checkpoints in" in log, log
    assert "finds none; trainer.default_root_dir must be one directory shared by every node" in log, log
    assert not list(tmp_path.glob("steps.rank*.jsonl")), "a rank trained"


# ------------------------------------------------------------------------------------------------ bad input

@pytest.mark.slow
def test_nnodes_larger_than_the_nodes_that_join_times_out_in_one_line(netns_cluster, shards, tmp_path):  # noqa: F811
    """NNODES=3 with two nodes started: both wait RDZV_TIMEOUT, then say so in one line and exit 2."""
    fit_config(tmp_path, shards)
    t0 = time.perf_counter()
    codes = finish(launch(netns_cluster, tmp_path, NNODES="3", RDZV_TIMEOUT="3"), tmp_path, timeout=90)
    assert codes == [2, 2], logs(tmp_path)
    # the node that times out first closes the rendezvous: it says the nodes did not gather; the other one times out
    # too, or finds the rendezvous closed (or, on node 2, gone with node 1's store) and points to the first's error
    timed_out, ended = "did not gather NNODES=3 node(s) within 3 s", "ended while this node waited for NNODES=3"
    said = []
    for i in (1, 2):
        log = (tmp_path / f"node{i}.log").read_text()
        errors = [line for line in log.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and (timed_out in errors[0] or ended in errors[0]), log
        assert "Traceback" not in log, log
        said.append(errors[0])
    assert any(timed_out in e for e in said), said
    assert time.perf_counter() - t0 < 60


def test_unreachable_rendezvous_endpoint_times_out_in_one_line(netns_cluster, shards, tmp_path):  # noqa: F811
    """Node 2 pointed at an address of the cluster's network where nothing answers: one line, exit 2, in time."""
    fit_config(tmp_path, shards)
    t0 = time.perf_counter()
    procs = launch(netns_cluster, tmp_path, nodes=(1,), RDZV_ENDPOINT=f"{SUBNET}.99:{PORT}", RDZV_TIMEOUT="2")
    assert finish(procs, tmp_path, timeout=60) == [2], logs(tmp_path)
    log = (tmp_path / "node2.log").read_text()
    assert log.strip().splitlines()[-1].startswith(f"error: cannot reach the rendezvous store at {SUBNET}.99:{PORT} "
                                                   "(waited 2 s)"), log
    assert "Traceback" not in log and len(log.strip().splitlines()) == 1, log
    assert time.perf_counter() - t0 < 30
