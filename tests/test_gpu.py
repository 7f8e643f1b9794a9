"""GPU paths CI cannot run: bf16 mixed precision, fused AdamW, torch.compile, DeepSpeed on CUDA. Marked `gpu`."""

import pytest
import torch

from test_fit import shards, steps, write_config  # noqa: F401 - the shards fixture is reused
from framework.commands.fit import fit

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("strategy,compile", [("auto", False), ("auto", True), ("deepspeed_stage_2", False)])
def test_bf16_fit_on_one_gpu(shards, tmp_path, strategy, compile):  # noqa: F811
    config = write_config(tmp_path, shards, trainer__accelerator="gpu", trainer__devices=1,
                          trainer__precision="bf16-mixed", trainer__strategy=strategy, trainer__max_steps=20)
    fit(["--config", str(config), "--model.init_args.compile", str(compile).lower()])
    logged = steps(tmp_path)
    assert len(logged) == 20 and all(torch.isfinite(torch.tensor(s["loss"])) for s in logged)
    assert logged[-1]["loss"] < logged[0]["loss"]
