"""Expert parallelism on 2 gloo ranks, against one process on the global batch (tests/moe_ranks.py does the work in
each rank): the loss and every gradient (after the experts' sync and the global-norm clip) agree to 1e-5, for top-1
and top-2, with and without accumulation; after three AdamW steps every parameter agrees and the router weights are
bit-identical on both ranks."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_expert_parallel_equals_one_process(tmp_path):
    port, env = free_port(), {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    procs = [subprocess.Popen([sys.executable, str(ROOT / "tests" / "moe_ranks.py"), str(r), "2", str(port),
                               str(tmp_path)], env=env) for r in range(2)]
    for p in procs:
        assert p.wait(timeout=300) == 0
    for rank in range(2):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert "error" not in result, result["error"]
        assert [(c["top_k"], c["accum"]) for c in result["cases"]] == [(1, 1), (2, 1), (1, 2), (2, 2)]
        for case in result["cases"]:
            assert case["expert_split"] == [[2, 64, 256 // case["top_k"]]]  # 2 of the 4 experts on each rank
            assert max(case["loss_diff"]) < 1e-5, case
            assert max(case["grad_diff"]) < 1e-5, case
            assert case["param_diff"] < 1e-5, case
            assert case["routers_identical"], case
