"""framework/torchrun.py's one-line messages for torchrun's rendezvous failures, by where each error arises (the
failures themselves, between real nodes, are in tests/test_multinode.py)."""

from __future__ import annotations

import pytest
from torch.distributed import run
from torch.distributed.elastic.rendezvous.api import (
    RendezvousClosedError,
    RendezvousConnectionError,
    RendezvousTimeoutError,
)

from framework.torchrun import explain

ARGS = run.parse_args(["--nnodes", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint", "10.0.0.1:29400",
                       "--rdzv-id", "job", "--rdzv-conf", "join_timeout=7", "train.py"])


def raised_in(function: str, error: BaseException) -> BaseException:
    """`error` as raised inside a function of that name (explain reads the traceback)."""
    def raiser():
        raise error

    raiser.__code__ = raiser.__code__.replace(co_name=function)
    try:
        raiser()
    except BaseException as caught:  # noqa: BLE001
        return caught
    raise AssertionError("not raised")


@pytest.mark.parametrize("error,says", [
    (raised_in("next_rendezvous", RendezvousTimeoutError()),
     "the rendezvous at 10.0.0.1:29400 (id 'job') did not gather NNODES=2 node(s) within 7 s"),
    (raised_in("next_rendezvous", RendezvousClosedError()), "ended while this node waited for NNODES=2 node(s)"),
    (raised_in("_create_tcp_store", RendezvousConnectionError()), "cannot reach the rendezvous store at 10.0.0.1:29400"),
    (raised_in("num_nodes_waiting", RendezvousConnectionError()), "ended while this node's training processes ran"),
    (raised_in("num_nodes_waiting", RendezvousClosedError()), "ended while this node's training processes ran"),
])
def test_each_rendezvous_failure_has_its_line(error, says):
    message = explain(error, ARGS)
    assert says in message and "\n" not in message, message


def test_other_errors_are_left_to_torchrun():
    assert explain(ValueError("not a rendezvous error"), ARGS) is None
