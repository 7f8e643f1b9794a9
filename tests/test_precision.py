"""bf16 on CPU for every strategy family: the GPU recipes' precision (bf16-mixed) runs through the same FSDP2
mixed-precision policy and DeepSpeed bf16 engine on CPU, and bf16-true through Lightning's precision plugin under
DDP, slowly but exactly enough to compare (DDP's bf16-mixed is torch autocast, the 1-GPU path). A tiny
GPT on 2 ranks: every step's loss stays within bf16 rounding of the fp32 run on the same data and initial weights,
and the checkpoint keeps fp32 master weights (bf16-mixed) or bf16 ones (bf16-true)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from dist_fit import fit, write_config
from framework.checkpoint.reader import load_state_dict


def _losses(tmp: Path, rank: int = 0) -> list[float]:
    lines = (tmp / f"steps.rank{rank}.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines]


@pytest.fixture(scope="module")
def fp32(shards, tmp_path_factory) -> list[float]:
    tmp = tmp_path_factory.mktemp("fp32")
    fit(write_config(tmp, shards, strategy="ddp", devices=2, max_steps=4, precision="32-true"))
    return _losses(tmp)


@pytest.mark.slow
@pytest.mark.parametrize("strategy, precision", [
    ("fsdp", "bf16-mixed"), ("deepspeed_stage_3", "bf16-mixed"), ("ddp", "bf16-true"),
])
def test_bf16_trains_like_fp32(strategy, precision, shards, fp32, tmp_path):
    fit(write_config(tmp_path, shards, strategy=strategy, devices=2, max_steps=4, precision=precision))
    losses = _losses(tmp_path)  # rank 0's batches: the same samples as the fp32 run's rank 0
    assert len(losses) == len(fp32) == 4 and all(math.isfinite(x) for x in losses)
    # bf16 keeps 8 bits of mantissa (~0.4% per rounding); the first step starts from the same initial weights
    assert losses[0] == pytest.approx(fp32[0], rel=1e-2)
    assert losses == pytest.approx(fp32, rel=3e-2)
    assert losses != fp32  # and bf16 really ran: fp32 would give these losses bit for bit
    weights = load_state_dict(tmp_path / "run" / "checkpoints" / "last.ckpt")
    dtypes = {t.dtype for t in weights.values() if t.is_floating_point()}
    assert dtypes == ({torch.bfloat16} if precision == "bf16-true" else {torch.float32}), dtypes
