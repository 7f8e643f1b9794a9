"""A real SLURM cluster for tests: munged, slurmctld and one slurmd per node, everything in a temp dir.

On one node, the daemons run on this machine. On the two "nodes" of tests/netns_cluster.py (a network namespace
per node, with its own address, interface and hostname), slurmctld runs on the cluster's switch (a host that is
neither node, as a real controller is) and each node runs its own slurmd; the clients (sbatch, scontrol, ...) run
on the switch too, since only the cluster's network reaches the daemons. Jobs span both nodes: `sbatch -N 2`.

Debian's `slurm-wlm` (22.05) and `munge`, as root: `apt-get install -y --no-install-recommends slurmctld slurmd
slurm-client munge`. Nothing outside the temp dir is used or changed: the daemons get their own config, ports, munge
key and socket, state and spool dirs, and the clients are pointed at them through `SLURM_CONF` (use `cluster.env`
for every `sbatch`/`scontrol` call and every job). Teardown cancels the jobs, waits for them to leave, then stops
the daemons by PID.

    with SlurmCluster(tmp_path, netns=cluster_of_two_nodes) as cluster:
        job = cluster.sbatch(["--nodes=2", "--ntasks-per-node=1", "job.sh"])
        cluster.wait(job, {"COMPLETED"}, timeout=60)
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest
from netns_cluster import NetnsCluster, netns_cluster  # noqa: F401 - the fixture the cluster runs on

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "squeue", "scancel", "sinfo")
APT = "apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge"
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
         "PREEMPTED"}


def unavailable() -> str | None:
    """Why a SLURM cluster cannot be started here, or None when it can."""
    missing = [b for b in BINARIES if shutil.which(b) is None and not os.path.exists(f"/usr/sbin/{b}")]
    if missing:
        return f"SLURM/munge binaries missing ({', '.join(missing)}); install them with: {APT}"
    if os.geteuid() != 0:
        return "the test SLURM cluster runs slurmd as root, and this is not root"
    try:
        pwd.getpwnam("munge")
    except KeyError:
        return "no 'munge' user (it comes with the munge package)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _binary(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


CTLD_PORT, SLURMD_PORT = 6817, 6818  # on a network of the cluster's own (each namespace has its own ports)
SLURMD_TIMEOUT = 5  # seconds without an answer from a node's slurmd before slurmctld sets it DOWN (SLURM: 300)


class SlurmCluster:
    def __init__(self, root: Path, netns: NetnsCluster | None = None):
        self.root = Path(root)
        self.netns = netns
        self.conf = self.root / "slurm.conf"
        # munged runs as the munge user, who cannot enter pytest's private temp dirs: its dir is its own, in /tmp
        self.munge_dir = Path(tempfile.mkdtemp(prefix="munge-"))
        self.munge_socket = self.munge_dir / "munge.socket"
        self.procs: dict[str, subprocess.Popen] = {}
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}  # not the CI's own job, if any
        self.env = {**env, "SLURM_CONF": str(self.conf)}

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> SlurmCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self, timeout: float = 60) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self._start_munge()
        node = subprocess.run([_binary("slurmd"), "-C"], capture_output=True, text=True, check=True)
        node_line = node.stdout.splitlines()[0]  # NodeName=HOST CPUs=... RealMemory=...
        host, resources = node_line.split()[0].split("=", 1)[1], node_line.split(None, 1)[1]
        if self.netns is None:
            self.nodes, ctld_addr, ports = [host], "127.0.0.1", (_free_port(), _free_port())
            nodes = [f"{node_line} NodeAddr=127.0.0.1 State=UNKNOWN"]  # no name lookup of the host needed
        else:  # slurmctld keeps this machine's name (the switch shares its hostname) on the switch's address
            self.nodes, ctld_addr, ports = self.netns.hostnames, self.netns.switch_addr, (CTLD_PORT, SLURMD_PORT)
            nodes = [f"NodeName={name} NodeAddr={addr} {resources} State=UNKNOWN"
                     for name, addr in zip(self.netns.hostnames, self.netns.addrs)]
        for d in ("state", "log", *(f"spool/{n}" for n in self.nodes)):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        r = self.root
        self.conf.write_text("\n".join([
            "ClusterName=pretraintest",
            f"SlurmctldHost={host}({ctld_addr})",
            f"SlurmctldPort={ports[0]}",
            f"SlurmdPort={ports[1]}",
            "SlurmUser=root",
            "SlurmdUser=root",
            f"AuthInfo=socket={self.munge_socket}",
            f"StateSaveLocation={r}/state",
            f"SlurmdSpoolDir={r}/spool/%n",  # %n: the node's name
            f"SlurmctldPidFile={r}/slurmctld.pid",
            f"SlurmdPidFile={r}/slurmd-%n.pid",
            f"SlurmctldLogFile={r}/log/slurmctld.log",
            f"SlurmdLogFile={r}/log/slurmd-%n.log",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "MpiDefault=none",
            "MailProg=/bin/true",
            "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none",
            "JobCompType=jobcomp/none",
            "ReturnToService=2",  # a node that was DOWN (lost) is back in service once its slurmd registers again
            f"SlurmdTimeout={SLURMD_TIMEOUT}",
            "KillWait=10",
            "SchedulerParameters=sched_interval=2",
            *nodes,
            "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
            "",
        ]))
        ctld = [_binary("slurmctld"), "-D", "-i", "-f", str(self.conf)]
        self._spawn("slurmctld", ctld if self.netns is None else self.netns.on_switch(ctld))
        for i in range(len(self.nodes)):
            self.start_node(i)
        self.wait_idle(timeout)

    def start_node(self, i: int) -> None:
        """Start node i's slurmd (again, after it was lost)."""
        slurmd = [_binary("slurmd"), "-D", "-f", str(self.conf)]
        if self.netns is not None:
            slurmd = self.netns.daemon_command(i, [*slurmd, "-N", self.nodes[i]])
        self._spawn(f"slurmd-{self.nodes[i]}", slurmd)

    def wait_idle(self, timeout: float = 60) -> None:
        """Until every node is idle (a node back from DOWN takes a registration)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, p in self.procs.items():
                if p.poll() is not None:
                    raise RuntimeError(f"{name} exited with {p.returncode}:\n{self.logs()}")
            r = self.run(["sinfo", "-h", "-N", "-o", "%T"])
            if r.returncode == 0 and r.stdout.split() == ["idle"] * len(self.nodes):
                return
            time.sleep(0.5)
        raise RuntimeError(f"the SLURM nodes did not become idle within {timeout} s:\n{self.logs()}")

    def run(self, argv: list[str], **kwargs) -> subprocess.CompletedProcess:
        """A client command (sbatch, scontrol, squeue, scancel, sinfo) against this cluster."""
        if self.netns is not None:
            argv = self.netns.on_switch(argv)
        return subprocess.run(argv, capture_output=True, text=True, env=self.env, **kwargs)

    def _start_munge(self) -> None:
        munge = pwd.getpwnam("munge")
        d = self.munge_dir
        key = d / "munge.key"
        key.write_bytes(os.urandom(1024))
        for path, mode in ((d, 0o755), (key, 0o400)):  # munged: socket dir searchable by all, key private
            os.chown(path, munge.pw_uid, munge.pw_gid)
            os.chmod(path, mode)
        # munged refuses directories that others can write, except sticky ones like /tmp
        self._spawn("munged", [_binary("munged"), "--foreground", f"--socket={self.munge_socket}", f"--key-file={key}",
                               f"--log-file={d / 'munged.log'}", f"--pid-file={d / 'munged.pid'}",
                               f"--seed-file={d / 'munged.seed'}"], user=munge)
        deadline = time.monotonic() + 20
        while not self.munge_socket.exists():
            if self.procs["munged"].poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"munged did not start:\n{self.logs()}")
            time.sleep(0.1)

    def _spawn(self, name: str, cmd: list[str], user: pwd.struct_passwd | None = None) -> None:
        log = open(self.root / f"{name}.out", "wb")
        kwargs = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []} if user else {}
        self.procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                            start_new_session=True, **kwargs)
        log.close()

    def stop(self, timeout: float = 60) -> None:
        """Cancel every job and wait until none is left, then stop slurmd, slurmctld and munged (by PID)."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            self.run(["scancel", "--user", "root"])
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and self.jobs():
                time.sleep(0.5)
        for name in [*(n for n in list(self.procs) if n.startswith("slurmd")), "slurmctld", "munged"]:
            p = self.procs.pop(name, None)
            if p is None or p.poll() is not None:
                continue
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        shutil.rmtree(self.munge_dir, ignore_errors=True)

    # ------------------------------------------------------------------ jobs
    def sbatch(self, args: Iterable[str], cwd: Path | None = None) -> str:
        r = self.run(["sbatch", "--parsable", *args], cwd=cwd, timeout=30)
        if r.returncode != 0:
            raise RuntimeError(f"sbatch failed ({r.returncode}): {r.stderr}\n{self.logs()}")
        return r.stdout.strip().split(";")[0]

    def scontrol(self, *args: str) -> str:
        r = self.run(["scontrol", *args], timeout=30)
        if r.returncode != 0:
            raise RuntimeError(f"scontrol {' '.join(args)} failed: {r.stderr}")
        return r.stdout

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, Reason, ExitCode, ...); {} once the job has been purged."""
        r = self.run(["scontrol", "-o", "show", "job", job_id])
        if r.returncode != 0:
            return {}
        return dict(f.split("=", 1) for f in r.stdout.split() if "=" in f)

    def jobs(self) -> list[str]:
        r = self.run(["squeue", "-h", "-o", "%i"])
        return r.stdout.split()

    def wait(self, job_id: str, states: set[str], timeout: float, poll: float = 0.5) -> dict[str, str]:
        """Poll until the job is in one of `states` (or a final state); returns its last `job()` record."""
        deadline = time.monotonic() + timeout
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states | FINAL:
                return info
            time.sleep(poll)
        raise TimeoutError(f"job {job_id} not in {states} after {timeout} s: {info}\n{self.logs()}")

    def logs(self, tail: int = 40) -> str:
        out = []
        logs = [*sorted(self.root.rglob("*.log")), *self.munge_dir.glob("*.log"), *sorted(self.root.glob("*.out"))]
        for path in logs:
            lines = path.read_text(errors="replace").splitlines()[-tail:]
            out.append(f"--- {path.name}\n" + "\n".join(lines))
        return "\n".join(out)


@pytest.fixture(scope="module")
def slurm_cluster(netns_cluster, tmp_path_factory) -> Iterator[SlurmCluster]:  # noqa: F811 - the fixture
    """A running two-node cluster for the module's tests, on the run's netns_cluster; skips (with the reason and the
    fix) when SLURM or network namespaces are not available."""
    reason = unavailable()
    if reason:
        pytest.skip(reason)
    with SlurmCluster(tmp_path_factory.mktemp("slurm"), netns=netns_cluster) as cluster:
        yield cluster
