"""Strategy construction: the DeepSpeed JSON (fast unit tests) and real 2-process fits over gloo on CPU.

Each distributed case fits tests/_toy.py in a subprocess (Lightning launches the second rank by re-running that
script), with 2 ranks x micro-batch 2, and checks against a 1-process fit with micro-batch 4 (same global batch):
the loss of every micro-batch matches, and after the steps both ranks hold the same full parameters, equal to the
reference's. Gradient accumulation (2) and norm clipping (0.5, active here) are on, so both are compared too.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from framework.distributed import (
    DeepSpeedStrategy,
    FSDP2Strategy,
    apply_activation_checkpointing,
    build_deepspeed_config,
    deep_merge,
    make_strategy,
)
from framework.errors import UserError

TOY = Path(__file__).parent / "_toy.py"
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
needs_deepspeed = pytest.mark.skipif(not HAS_DEEPSPEED, reason="deepspeed is not installed (pip install deepspeed)")

RUN = dict(micro_batch_size=2, accumulate_grad_batches=4, gradient_clip_val=1.0)


# ---------------------------------------------------------------- DeepSpeed config generation (no DeepSpeed needed)


def test_config_from_run():
    cfg = build_deepspeed_config(stage=2, precision="32-true", **RUN)
    assert cfg["train_micro_batch_size_per_gpu"] == 2
    assert cfg["gradient_accumulation_steps"] == 4
    assert cfg["gradient_clipping"] == 1.0
    assert cfg["zero_optimization"]["stage"] == 2
    assert "offload_optimizer" not in cfg["zero_optimization"]
    assert "bf16" not in cfg and "fp16" not in cfg  # fp32: no half-precision section
    assert cfg["zero_allow_untested_optimizer"] is True  # the LightningModule's torch optimizer is used
    assert build_deepspeed_config(stage=1, precision="32-true", micro_batch_size=1, accumulate_grad_batches=1,
                                  gradient_clip_val=None)["gradient_clipping"] == 0.0


@pytest.mark.parametrize(
    "precision, section",
    [("bf16-mixed", "bf16"), ("bf16-true", "bf16"), ("16-mixed", "fp16"), ("16-true", "fp16")],
)
def test_config_precision(precision, section):
    cfg = build_deepspeed_config(stage=2, precision=precision, **RUN)
    assert cfg[section]["enabled"] is True
    assert ({"bf16", "fp16"} - {section}).isdisjoint(cfg)
    if section == "fp16":
        assert cfg["fp16"]["loss_scale"] == 0  # dynamic loss scaling


def test_config_offload():
    cfg = build_deepspeed_config(stage=3, precision="32-true", offload_optimizer=True, offload_params=True, **RUN)
    zero = cfg["zero_optimization"]
    assert zero["stage"] == 3
    assert zero["offload_optimizer"] == {"device": "cpu", "pin_memory": False}
    assert zero["offload_param"] == {"device": "cpu", "pin_memory": False}
    assert cfg["zero_force_ds_cpu_optimizer"] is False  # torch AdamW may run offloaded
    pinned = build_deepspeed_config(stage=2, precision="32-true", offload_optimizer=True, pin_memory=True, **RUN)
    assert pinned["zero_optimization"]["offload_optimizer"]["pin_memory"] is True
    with pytest.raises(UserError, match="stage 3"):
        build_deepspeed_config(stage=2, precision="32-true", offload_params=True, **RUN)
    with pytest.raises(UserError, match="stage 2 or 3"):
        build_deepspeed_config(stage=1, precision="32-true", offload_optimizer=True, **RUN)


def test_user_config_deep_merges_and_wins(tmp_path):
    user = {
        "zero_optimization": {
            "reduce_bucket_size": 5e7,
            "overlap_comm": False,
            "offload_optimizer": {"pin_memory": True},
        },
        "gradient_clipping": 0.3,
        "bf16": {"enabled": False},
        "train_micro_batch_size_per_gpu": 2,  # same as the run: allowed
    }
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(user))
    for given in (user, str(path), path):
        cfg = build_deepspeed_config(stage=3, precision="bf16-mixed", offload_optimizer=True, user_config=given, **RUN)
        zero = cfg["zero_optimization"]
        assert zero["stage"] == 3  # generated, kept
        assert zero["contiguous_gradients"] is True  # generated, kept
        assert zero["reduce_bucket_size"] == 5e7 and zero["overlap_comm"] is False  # user, added / overriding
        assert zero["offload_optimizer"] == {"device": "cpu", "pin_memory": True}  # merged one level deeper
        assert cfg["gradient_clipping"] == 0.3
        assert cfg["bf16"] == {"enabled": False}
    assert user["zero_optimization"]["offload_optimizer"] == {"pin_memory": True}  # the input is not modified


def test_deep_merge_replaces_non_dicts():
    assert deep_merge({"a": {"b": 1, "c": [1]}, "d": 1}, {"a": {"c": [2]}, "d": {"e": 1}}) == {
        "a": {"b": 1, "c": [2]},
        "d": {"e": 1},
    }


def test_user_config_cannot_change_batch_shape(tmp_path):
    with pytest.raises(UserError, match="gradient_accumulation_steps=8 but the run has 4"):
        build_deepspeed_config(stage=2, precision="32-true", user_config={"gradient_accumulation_steps": 8}, **RUN)
    with pytest.raises(UserError, match="train_micro_batch_size_per_gpu"):
        build_deepspeed_config(stage=2, precision="32-true", user_config={"train_micro_batch_size_per_gpu": 8}, **RUN)
    with pytest.raises(UserError, match="train_batch_size"):
        build_deepspeed_config(stage=2, precision="32-true", user_config={"train_batch_size": 64}, **RUN)


def test_user_config_bad_file(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        build_deepspeed_config(stage=2, precision="32-true", user_config=tmp_path / "missing.json", **RUN)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        build_deepspeed_config(stage=2, precision="32-true", user_config=bad, **RUN)
    bad.write_text("[1, 2]")
    with pytest.raises(UserError, match="JSON object"):
        build_deepspeed_config(stage=2, precision="32-true", user_config=bad, **RUN)


def test_unsupported_precision():
    with pytest.raises(UserError, match="precision '64-true'"):
        build_deepspeed_config(stage=2, precision="64-true", **RUN)


# ---------------------------------------------------------------- make_strategy


def test_unknown_strategy_suggests_the_closest():
    with pytest.raises(UserError, match=r"unknown strategy 'deepspeed_stage3' \(did you mean 'deepspeed_stage_3'\?\)"):
        make_strategy("deepspeed_stage3", precision="32-true", micro_batch_size=1)
    with pytest.raises(UserError, match=r"unknown strategy 'xyz'; choose one of: auto, ddp, fsdp"):
        make_strategy("xyz", precision="32-true", micro_batch_size=1)


def test_invalid_combinations():
    with pytest.raises(UserError, match="offload_params needs strategy"):
        make_strategy("ddp", precision="32-true", micro_batch_size=1, offload_params=True)
    with pytest.raises(UserError, match="deepspeed_config is set but strategy is 'fsdp'"):
        make_strategy("fsdp", precision="32-true", micro_batch_size=1, deepspeed_config={})
    with pytest.raises(UserError, match="does not work with fsdp"):
        make_strategy("fsdp", precision="16-mixed", micro_batch_size=1)


def test_strategy_types():
    from lightning.pytorch.strategies import DDPStrategy

    assert make_strategy("auto", precision="32-true", micro_batch_size=1) == "auto"
    assert type(make_strategy("ddp", precision="32-true", micro_batch_size=1)) is DDPStrategy
    fsdp = make_strategy("fsdp", precision="bf16-mixed", micro_batch_size=1, offload_params=True)
    assert isinstance(fsdp, FSDP2Strategy) and fsdp.offload_params


@needs_deepspeed
def test_deepspeed_strategy_config():
    s = make_strategy(
        "deepspeed_stage_3_offload", precision="bf16-mixed", accelerator="cpu", offload_params=True,
        deepspeed_config={"zero_optimization": {"sub_group_size": 1000}}, **RUN,
    )
    assert isinstance(s, DeepSpeedStrategy)
    assert s.full_config["gradient_accumulation_steps"] == 4  # recorded ...
    assert "gradient_accumulation_steps" not in s.config  # ... but Lightning sets it from the Trainer and refuses it
    assert s.config["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert s.config["zero_optimization"]["sub_group_size"] == 1000
    assert s.config["bf16"] == {"enabled": True}


def test_activation_checkpointing_recomputes_and_keeps_names():
    from _toy import ToyBlock, ToyNet

    torch.manual_seed(0)
    net = ToyNet()
    names = [n for n, _ in net.named_parameters()]
    calls = []
    for block in net.blocks:
        block.register_forward_pre_hook(lambda m, a: calls.append(1))
    x = torch.randn(2, 4, 16)
    net(x).sum().backward()
    plain = [p.grad.clone() for p in net.parameters()]
    assert len(calls) == 2
    net.zero_grad()
    apply_activation_checkpointing(net, (ToyBlock,))
    apply_activation_checkpointing(net, (ToyBlock,))  # idempotent
    calls.clear()
    net(x).sum().backward()
    assert len(calls) == 4  # each block ran again in backward
    assert [n for n, _ in net.named_parameters()] == names
    for g, p in zip(plain, net.parameters()):
        torch.testing.assert_close(p.grad, g)


# ---------------------------------------------------------------- real 2-process fits over gloo

# Variables that would make Lightning think it runs under torchrun/SLURM (and not launch the ranks itself).
_LAUNCHER_VARS = ("LOCAL_RANK", "RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "NODE_RANK", "MASTER_ADDR",
                  "MASTER_PORT")
FIT_ARGS = ["--accumulate", "2", "--clip", "0.5", "--max-steps", "3"]


def _fit(out: Path, *args: str, timeout: float = 120, env: dict[str, str] | None = None) -> float:
    env = {**{k: v for k, v in os.environ.items()
              if k not in _LAUNCHER_VARS and not k.startswith(("SLURM_", "TORCHELASTIC_", "PMI_", "OMPI_"))},
           **(env or {})}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, str(TOY), "--out", str(out), *FIT_ARGS, *args],
                              env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"fit {args} hung for {timeout} s:\n{(e.stderr or b'')[-4000:]}")
    assert proc.returncode == 0, f"fit {args} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-6000:]}"
    return time.perf_counter() - t0


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    _fit(out, "--strategy", "auto", "--devices", "1", "--micro-batch", "4")
    return torch.load(out / "rank0.pt")


CASES = {
    "ddp": [],
    "fsdp": [],
    "fsdp-ac-offload": ["--activation-checkpointing", "--offload-params"],
    "deepspeed_stage_1": [],
    "deepspeed_stage_2": [],
    "deepspeed_stage_3": [],
    "deepspeed_stage_3_offload": ["--offload-params", "--activation-checkpointing"],
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_match_one_process(case, reference, tmp_path):
    strategy = case.split("-")[0]
    if strategy.startswith("deepspeed"):
        if not HAS_DEEPSPEED:
            pytest.skip("deepspeed is not installed (pip install deepspeed)")
    # an empty extensions cache: DeepSpeed's CPU backend must not JIT-build its shared-memory allreduce op (a
    # 25-60 s C++ compile that only its inference path uses; framework.distributed.strategy)
    extensions = tmp_path / "torch_extensions"
    seconds = _fit(tmp_path, "--strategy", strategy, "--devices", "2", "--micro-batch", "2", *CASES[case],
                   env={"TORCH_EXTENSIONS_DIR": str(extensions)})
    assert not list(extensions.glob("**/*shm_comm*")), list(extensions.rglob("*"))
    print(f"{case}: {seconds:.1f} s")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]

    for rank in ranks:
        assert rank["world_size"] == 2
        assert rank["global_step"] == reference["global_step"] == 3
        # every micro-batch's loss over the global batch equals the 1-process loss on the same samples
        torch.testing.assert_close(rank["losses"], reference["losses"], rtol=0, atol=2e-6)
    params0, params1 = ranks[0]["params"], ranks[1]["params"]
    assert params0.keys() == params1.keys() == reference["params"].keys()
    for name, p in params0.items():
        assert torch.equal(p, params1[name]), f"{name} differs between ranks"
        torch.testing.assert_close(p, reference["params"][name], rtol=0, atol=2e-6, msg=f"{name} vs 1 process")
