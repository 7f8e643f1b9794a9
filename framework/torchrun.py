"""torchrun (torch.distributed.run) with its rendezvous failures said in one line, exit code 2, no traceback.

launch/torchrun.sh runs `python -m framework.torchrun TORCHRUN-ARGS` on every node. When the nodes do not meet (a
node missing or started with another NNODES, node 0 not up, a wrong address or a closed port), torchrun raises
after its rendezvous timeout with a traceback that names no address; here the user gets what was awaited where, and
what to check. When every failed training process exited with 2 (bad input, said in one line by each), so does
this, without torchrun's traceback and without restarting them (MAX_RESTARTS) to fail alike. Everything else is torchrun's, unchanged.

`python -m framework.torchrun --serve-store HOST:PORT` runs a rendezvous store alone (a TCPStore server) for
elastic jobs: on a host that is not a training node, it outlives the loss of any of them (torchrun's c10d rendezvous
otherwise hosts its store inside the torchrun of one node, and the job ends with that node).

Imports only torch's launcher and framework.errors, not the framework: this launcher is one more process on every node.
"""

from __future__ import annotations

import os
import sys


def _conf(args, key: str, default: str) -> str:
    for item in (args.rdzv_conf or "").split(","):
        name, _, value = item.partition("=")
        if name.strip() == key and value.strip():
            return value.strip()
    return default


def _raised_in(error: BaseException, function: str) -> bool:
    """Whether `function` is on the traceback of `error` or of an exception it was raised from."""
    while error is not None:
        tb = error.__traceback__
        while tb is not None:
            if tb.tb_frame.f_code.co_name == function:
                return True
            tb = tb.tb_next
        error = error.__cause__ or error.__context__
    return False


def explain(error: BaseException, args) -> str | None:
    """The one-line message for a rendezvous failure of torchrun run with `args`, or None for any other error."""
    from torch.distributed import DistError
    from torch.distributed.elastic.rendezvous.api import (
        RendezvousClosedError,
        RendezvousConnectionError,
        RendezvousError,
        RendezvousTimeoutError,
    )

    endpoint = args.rdzv_endpoint or f"{args.master_addr}:{args.master_port}"
    if isinstance(error, RendezvousTimeoutError):
        wait = _conf(args, "join_timeout", "600")
        return (f"the rendezvous at {endpoint} (id '{args.rdzv_id}') did not gather NNODES={args.nnodes} node(s) "
                f"within {wait} s: start launch/torchrun.sh on every node of the job with the same NNODES, "
                "RDZV_ENDPOINT and RDZV_ID (and NNODES equal to the nodes you start), or raise RDZV_TIMEOUT when "
                "the nodes start far apart")
    if isinstance(error, (RendezvousClosedError, RendezvousConnectionError)) and _raised_in(error,
                                                                                         "num_nodes_waiting"):
        # the agent polls the rendezvous while its training processes run: the node hosting the store has left
        return (f"the rendezvous at {endpoint} ended while this node's training processes ran: another node stopped "
                "(or the one hosting its store did); that node's error says why")
    if isinstance(error, RendezvousClosedError) or (
            isinstance(error, RendezvousConnectionError) and not _raised_in(error, "_create_tcp_store")):
        return (f"the rendezvous at {endpoint} ended while this node waited for NNODES={args.nnodes} node(s): "
                "another node closed it or, hosting its store, stopped; that node's error says why (most often: "
                "not every node joined in time)")
    if isinstance(error, RendezvousConnectionError):
        wait = _conf(args, "read_timeout", "60")
        if ":" in str(args.nnodes):  # elastic: the store is best a process of its own on a host that is no node
            return (f"cannot reach the rendezvous store at {endpoint} (waited {wait} s): start it first on that host "
                    f"(python -m framework.torchrun --serve-store {endpoint}), or the node with that address, and "
                    "check RDZV_ENDPOINT's address and that its port is open between the nodes")
        return (f"cannot reach the rendezvous store at {endpoint} (waited {wait} s): start the job on the node "
                "that has this address first (it hosts the store), check RDZV_ENDPOINT's address and that its port "
                "is open between the nodes; on that node the address must be its hostname or one its hostname "
                "resolves to, or it will not host the store")
    if isinstance(error, RendezvousError):
        return f"the rendezvous at {endpoint} failed ({type(error).__name__}: {error}); start the job again"
    if isinstance(error, DistError) and not args.rdzv_endpoint:  # static rendezvous: MASTER_ADDR/MASTER_PORT
        wait = _conf(args, "timeout", "600")
        return (f"the nodes did not meet at MASTER_ADDR:MASTER_PORT={endpoint} within {wait} s "
                f"({' '.join(str(error).split())[:200]}): start launch/torchrun.sh on every node with NNODES="
                f"{args.nnodes}, the same MASTER_ADDR (node 0's address) and MASTER_PORT, and NODE_RANK 0..NNODES-1, "
                "or raise RDZV_TIMEOUT")
    return None


def serve_store(endpoint: str) -> None:
    """Host a c10d rendezvous store at `endpoint` (HOST:PORT, HOST one of this machine's addresses or 0.0.0.0) until
    killed; the jobs that use it tell themselves apart by RDZV_ID."""
    import signal

    from torch.distributed import TCPStore

    from framework.errors import UserError

    host, _, port = endpoint.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"--serve-store '{endpoint}' is not HOST:PORT (e.g. 0.0.0.0:29400)")
    try:
        store = TCPStore(host, int(port), is_master=True, wait_for_workers=False)  # serves while it is referenced
    except (RuntimeError, OSError) as e:
        raise UserError(f"cannot serve a rendezvous store at {endpoint}: {' '.join(str(e).split())[:200]}; "
                        "HOST must be an address of this machine and PORT free") from None
    print(f"rendezvous store at {endpoint}: point RDZV_ENDPOINT at it on every node", flush=True)
    while store is not None:
        signal.pause()


def _no_restart_after_bad_input() -> None:
    """A failure where every failed training process exited 2 (a UserError: bad input, said in one line by each)
    ends the job instead of using up torchrun's restarts (MAX_RESTARTS): a restart would fail the same way."""
    from torch.distributed.elastic.agent.server.api import WorkerState
    from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent

    from framework.errors import UserError

    monitor = getattr(LocalElasticAgent, "_monitor_workers", None)
    if monitor is None or getattr(monitor, "_stops_on_bad_input", False):  # another torch: restarts as torchrun does
        return

    def _monitor_workers(self, worker_group):
        result = monitor(self, worker_group)
        failures = getattr(result, "failures", None)
        if result.state == WorkerState.FAILED and failures and all(
                f.exitcode == UserError.exit_code for f in failures.values()):
            self._remaining_restarts = 0
        return result

    _monitor_workers._stops_on_bad_input = True
    LocalElasticAgent._monitor_workers = _monitor_workers


def main(argv: list[str] | None = None) -> None:
    # torch's C++ store client logs every failed connection try with a stack of frames while a node waits for
    # another; the outcome is said below. Read once as torch loads, and kept from the training processes' environment.
    quiet = "TORCH_CPP_LOG_LEVEL" not in os.environ
    if quiet:
        os.environ["TORCH_CPP_LOG_LEVEL"] = "FATAL"
    import torch  # noqa: F401 - loads the C++ library under that setting

    if quiet:
        del os.environ["TORCH_CPP_LOG_LEVEL"]
    from torch.distributed import run
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, record

    from framework.errors import UserError

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--serve-store"]:
        try:
            serve_store(argv[1] if len(argv) > 1 else "")
        except UserError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            raise SystemExit(UserError.exit_code) from None
        return
    args = run.parse_args(argv)
    _no_restart_after_bad_input()
    try:
        record(run.run)(args)  # as torchrun's own main: a failed training process is reported the same way
    except ChildFailedError as error:
        if error.failures and all(f.exitcode == UserError.exit_code for f in error.failures.values()):
            raise SystemExit(UserError.exit_code) from None  # bad input: each process said why in one line
        raise
    except Exception as error:  # noqa: BLE001 - only rendezvous failures are explained; the rest is raised as is
        message = explain(error, args)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
