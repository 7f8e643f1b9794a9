"""A cluster of N "nodes" on one machine, for multi-node tests: one Linux network namespace per node, as root.

Each node has its own network stack: loopback, one interface `veth0` with its own address (10.77.0.1/24, .2, ...)
and nothing else, so it reaches the other nodes over that interface only, never over a shared loopback. The
interfaces are joined by a bridge in one more namespace (the switch), so nothing is added to the machine's own network.
Each node also has its own hostname (`node1`, `node2`, ...; a UTS namespace per process started, `unshare --uts`) and
an /etc/hosts that maps every node's name to its address (`ip netns exec` mounts /etc/netns/NAME/hosts over
/etc/hosts), so that a program that finds its peers by hostname, as torchrun's rendezvous does, sees a real cluster.
The file system is shared, as a cluster's shared file system is. The switch has an address of its own on the same
network (SUBNET.254, `cluster.switch_addr`): a host that is none of the nodes, for a service that must outlive any of
them (`cluster.on_switch(argv)` runs a program there), such as an elastic job's rendezvous store.

    with NetnsCluster(nodes=2) as cluster:
        subprocess.run(cluster.command(0, ["python", "-c", "import socket; print(socket.gethostname())"]))

or the session fixture `netns_cluster` (import it into a test module; it skips, saying why, where it cannot run).

Namespace names carry the owning process id (`pnode<PID>-1`), so runs side by side do not collide; namespaces left
by a run that was killed (its process is gone) are removed when the next cluster starts. Needs root and iproute2
(`apt-get install -y iproute2`); `unavailable()` says why it cannot run.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

PREFIX = "pnode"  # namespace names: pnode<PID>-1 .. -N (nodes), pnode<PID>-sw (the switch)
IFNAME = "veth0"  # each node's interface to the others (its GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME)
SUBNET = "10.77.0"  # node i (0-based) is SUBNET.(i+1)/24
SWITCH_HOST = 254  # the switch's own address: SUBNET.254/24 on its bridge
NETNS_ETC = Path("/etc/netns")  # `ip netns exec NAME` mounts the files of /etc/netns/NAME over those of /etc


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and r.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {r.stderr.strip()}")
    return r


def unavailable() -> str | None:
    """Why network namespaces cannot be made here (one line), or None when they can."""
    if shutil.which("ip") is None or shutil.which("unshare") is None:
        return "needs iproute2's `ip` and util-linux's `unshare` (apt-get install -y iproute2 util-linux)"
    if os.geteuid() != 0:
        return "creating network namespaces (`ip netns add`) needs root"
    try:
        NETNS_ETC.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return f"cannot give the nodes their own /etc/hosts: {NETNS_ETC}: {e.strerror}"
    probe = f"{PREFIX}{os.getpid()}-probe"
    r = _ip("netns", "add", probe, check=False)
    if r.returncode != 0:
        return f"`ip netns add` is not permitted here: {r.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _namespaces() -> list[str]:
    # `ip netns list` lines: "NAME" or "NAME (id: N)"
    return [line.split()[0] for line in _ip("netns", "list").stdout.splitlines() if line.strip()]


def _remove(name: str) -> None:
    """Kill what still runs in namespace `name`, then delete it (its interfaces go with it) and its /etc files."""
    pids = _ip("netns", "pids", name, check=False).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 10
    while _ip("netns", "pids", name, check=False).stdout.split() and time.monotonic() < deadline:
        time.sleep(0.05)
    _ip("netns", "del", name, check=False)
    shutil.rmtree(NETNS_ETC / name, ignore_errors=True)


def remove_stale() -> list[str]:
    """Remove the namespaces of earlier runs whose process is gone; returns their names."""
    gone = []
    for name in _namespaces():
        m = re.fullmatch(rf"{PREFIX}(\d+)-\w+", name)
        if m and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))):
            _remove(name)
            gone.append(name)
    for d in NETNS_ETC.glob(f"{PREFIX}*") if NETNS_ETC.is_dir() else []:  # files of a namespace already deleted
        m = re.fullmatch(rf"{PREFIX}(\d+)-\w+", d.name)
        if m and not _pid_alive(int(m.group(1))):
            shutil.rmtree(d, ignore_errors=True)
    return gone


class NetnsCluster:
    def __init__(self, nodes: int = 2):
        self.nodes = nodes
        tag = f"{PREFIX}{os.getpid()}"
        self.names = [f"{tag}-{i + 1}" for i in range(nodes)]  # network namespace of each node
        self.switch = f"{tag}-sw"
        self.addrs = [f"{SUBNET}.{i + 1}" for i in range(nodes)]
        self.switch_addr = f"{SUBNET}.{SWITCH_HOST}"
        self.hostnames = [f"node{i + 1}" for i in range(nodes)]
        self.ifname = IFNAME

    def __enter__(self) -> NetnsCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        remove_stale()
        for name in [*self.names, self.switch]:
            if name in _namespaces():  # this process made it earlier and did not stop it
                _remove(name)
            _ip("netns", "add", name)
            _ip("-n", name, "link", "set", "lo", "up")
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "addr", "add", f"{self.switch_addr}/24", "dev", "br0")
        _ip("-n", self.switch, "link", "set", "br0", "up")
        hosts = "127.0.0.1 localhost\n" + "".join(f"{a} {h}\n" for a, h in zip(self.addrs, self.hostnames))
        for i, name in enumerate(self.names):
            port = f"port{i + 1}"  # the switch's end of node i's cable
            _ip("link", "add", self.ifname, "netns", name, "type", "veth", "peer", "name", port, "netns", self.switch)
            _ip("-n", self.switch, "link", "set", port, "master", "br0")
            _ip("-n", self.switch, "link", "set", port, "up")
            _ip("-n", name, "addr", "add", f"{self.addrs[i]}/24", "dev", self.ifname)
            _ip("-n", name, "link", "set", self.ifname, "up")
            (NETNS_ETC / name).mkdir(parents=True, exist_ok=True)
            (NETNS_ETC / name / "hosts").write_text(hosts)
        self._wait_reachable()

    def stop(self) -> None:
        for name in [*self.names, self.switch]:
            if name in _namespaces() or (NETNS_ETC / name).exists():
                _remove(name)

    def command(self, node: int, argv: list[str]) -> list[str]:
        """`argv` as run on node `node` (0-based): in its network namespace, with its hostname."""
        set_hostname = 'hostname "$0" && exec "$@"'
        return ["ip", "netns", "exec", self.names[node], "unshare", "--uts", "--", "sh", "-c", set_hostname,
                self.hostnames[node], *argv]

    def daemon_command(self, node: int, argv: list[str]) -> list[str]:
        """As `command`, but on this machine's /sys: `ip netns exec` mounts a sysfs of the namespace's own, which has
        no /sys/fs/cgroup, and slurmd will not start without it. The node's network, hostname and /etc/hosts only."""
        hosts = NETNS_ETC / self.names[node] / "hosts"
        script = 'mount --bind "$0" /etc/hosts && hostname "$1" && shift && exec "$@"'
        return ["nsenter", f"--net=/run/netns/{self.names[node]}", "unshare", "--mount", "--uts", "--propagation",
                "private", "--", "sh", "-c", script, str(hosts), self.hostnames[node], *argv]

    def on_switch(self, argv: list[str]) -> list[str]:
        """`argv` as run on the switch: a host of the cluster's network (switch_addr) that is none of the nodes."""
        return ["ip", "netns", "exec", self.switch, *argv]

    def _wait_reachable(self, timeout: float = 10) -> None:
        """Until node 1 reaches every other node over TCP (the bridge's ports take a moment to forward)."""
        deadline = time.monotonic() + timeout
        for addr in [*self.addrs[1:], self.switch_addr]:
            # a connection refused (no listener) proves the path; a timeout or "no route" does not
            probe = ("import socket,sys\ns=socket.socket(); s.settimeout(1)\n"
                     f"try: s.connect(('{addr}', 9))\nexcept ConnectionRefusedError: sys.exit(0)\n"
                     "except OSError: sys.exit(1)\n")
            while subprocess.run(self.command(0, [sys.executable, "-c", probe]), capture_output=True).returncode != 0:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"node 1 cannot reach {addr} over {self.ifname} after {timeout} s")
                time.sleep(0.1)


@pytest.fixture(scope="session")
def netns_cluster() -> Iterator[NetnsCluster]:
    """A two-node cluster shared by the run's tests; skips (one line: why) where namespaces cannot be made."""
    reason = unavailable()
    if reason:
        pytest.skip(reason)
    with NetnsCluster(nodes=2) as cluster:
        yield cluster
