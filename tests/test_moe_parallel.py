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


# ------------------------------------------------------------------------------------- through `pretrain fit`
def moe_config(tmp, shards, *, expert_parallel: int, stop_at=None, label=0, max_steps=4, **kw):
    from dist_fit import write_config

    path = write_config(tmp, shards, strategy="ddp", devices=2, max_steps=max_steps, stop_at=stop_at, label=label,
                        every_n_steps=100, **kw)
    config = json.loads(path.read_text())
    config["model"]["init_args"].update(preset="gpt-moe-test", config={"moe": {"num_experts": 4, "top_k": 2}},
                                        grad_clip=0.5)
    config["distributed"] = {"expert_parallel": expert_parallel}
    path.write_text(json.dumps(config))
    return path


@pytest.mark.slow
def test_resume_across_expert_parallel_sizes(shards, tmp_path):
    """2 ranks, 4 steps with 2 experts per rank == 1 step at EP 2, resumed at EP 1 (every expert on both ranks) for
    1 step, resumed at EP 2 for 2 steps: the same losses. The checkpoints hold every expert once, at full shape."""
    import torch
    from dist_fit import fit, records

    straight, chain = tmp_path / "straight", tmp_path / "chain"
    straight.mkdir(), chain.mkdir()
    fit(moe_config(straight, shards, expert_parallel=2))
    for i, (ep, stop) in enumerate([(2, 1), (1, 2), (2, None)]):
        fit(moe_config(chain, shards, expert_parallel=ep, stop_at=stop, label=i), *(["--ckpt_path", "last"] if i else []))
        ckpt = torch.load(chain / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
        assert ckpt["state_dict"]["model.transformer.h.0.mlp.experts.w_fc"].shape == (4, 64, 128)
        state = ckpt["optimizer_states"][0]["state"]
        assert sorted({tuple(s["exp_avg"].shape) for s in state.values()} & {(2, 64, 128), (4, 64, 128)}) == \
            [(4, 64, 128)], "an optimizer state saved at the local expert shape"
    want = {(r["step"], r["rank"]): r["loss"] for r in records(straight)}
    got = {(r["step"], r["rank"]): r["loss"] for r in records(chain)}
    assert sorted(got) == sorted(want) and len(want) == 8
    for key in want:
        assert abs(got[key] - want[key]) < 1e-5, (key, got[key], want[key])


@pytest.mark.parametrize("args, message", [
    (["--distributed.expert_parallel", "2", "--trainer.strategy", "fsdp"], "needs --trainer.strategy ddp"),
    (["--distributed.expert_parallel", "2", "--trainer.strategy", "deepspeed_stage_2"], "needs --trainer.strategy ddp"),
    (["--distributed.expert_parallel", "3", "--trainer.devices", "2"], "does not divide the world size 2"),
    (["--distributed.expert_parallel", "2", "--model.init_args.config", '{moe: {num_experts: 3, top_k: 1}}'],
     "does not divide moe.num_experts=3"),
    (["--distributed.expert_parallel", "2", "--model.init_args.preset", "gpt-tiny", "--model.init_args.config",
      "{}"], "the model has no MoE layers"),
])
def test_expert_parallel_bad_layouts_are_one_line(args, message, shards, tmp_path):
    """Refused before any rank starts (in this process: the checks run when the strategy is built)."""
    from framework.commands.fit import fit
    from framework.errors import UserError

    with pytest.raises(UserError) as e:
        fit(["--config", str(moe_config(tmp_path, shards, expert_parallel=2)), *args])
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)
