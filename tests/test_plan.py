"""`pretrain plan`: the memory model against the calibration figures and against tensors measured on CPU."""

from __future__ import annotations

import pytest
import torch

from framework.models.gpt import GPT, GPTConfig
from framework.commands.plan import GiB, describe_model, estimate, fits, plan

GB = 1e9


def within(value: float, measured_gb: float, tolerance: float = 0.15) -> bool:
    """Within tolerance of a figure reported in GB, whether it meant 10^9 or 2^30 bytes."""
    return any(abs(value / (measured_gb * unit) - 1) <= tolerance for unit in (GB, GiB))


def test_calibration_figures_from_an_h100():
    # a 1.5B GPT, T=1024, micro-batch 16, AdamW, one GPU, bf16: 73 GB
    m = describe_model("gpt2-1.5b", seq_len=1024)
    e = estimate(m, "ddp", seq_len=1024, micro_batch=16, gpus=1)
    assert within(e.gpu, 73), e.gpu / GB
    # ZeRO-3 with CPU offload: a 3.9B GPT at micro-batch 1 used 117 GB of host RAM; a 6.7B one exhausted 125 GB
    m = describe_model("gpt-2.7b", seq_len=1024, n_layer=48, n_embd=2560)
    assert abs(m.params / 3.9e9 - 1) < 0.02
    e = estimate(m, "deepspeed_stage_3_offload", seq_len=1024, micro_batch=1, gpus=1)
    assert within(e.host, 117), e.host / GB
    big = estimate(describe_model("gpt-6.7b", seq_len=1024), "deepspeed_stage_3_offload", seq_len=1024,
                   micro_batch=1, gpus=1)
    assert not fits(big, 80 * GB, 125 * GB) and fits(e, 80 * GB, 125 * GB)


@pytest.mark.parametrize("preset,T,b", [("gpt-tiny", 64, 8), ("gpt-small-cpu", 256, 4)])
def test_estimates_match_tensors_measured_on_cpu(preset, T, b):
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset(preset, dropout=0.0))
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    idx = torch.randint(0, 256, (b, T))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(idx)
        loss = torch.nn.functional.cross_entropy(logits.float().view(-1, logits.size(-1)), idx.view(-1))
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    activations = sum(n for ptr, n in saved.items() if ptr not in weights)
    optimizer = torch.optim.AdamW(model.parameters())
    loss.backward()
    optimizer.step()
    tensors = [p for p in model.parameters()] + [p.grad for p in model.parameters()] + \
        [v for s in optimizer.state.values() for v in s.values() if v.dim() > 0]
    states = sum(t.untyped_storage().nbytes() for t in tensors)

    e = estimate(describe_model(preset, seq_len=T), "ddp", seq_len=T, micro_batch=b, gpus=1, precision="32-true")
    assert states == e.states  # 16 bytes per parameter: weight, gradient, two moments
    assert abs(activations / (e.activations + e.logits) - 1) < 0.15, (activations, e.activations + e.logits)


def test_sharding_divides_model_states_and_the_plan_picks_what_fits():
    m = describe_model("gpt-6.7b", seq_len=2048)
    kw = dict(seq_len=2048, micro_batch=1, gpus=8)
    ddp, z3 = (estimate(m, s, **kw) for s in ("ddp", "deepspeed_stage_3"))
    assert ddp.states == 16 * m.params + 4 * m.params and z3.states < ddp.states / 6
    rows, best = plan(m, seq_len=2048, micro_batch=1, gpus=8, nodes=1, gpu_memory=80 * GB, host_memory=512 * GB,
                      precision="bf16-mixed", peak_tflops=989.4, mfu=0.4)
    assert len(rows) == 14 and best is not None and fits(best, 80 * GB, 512 * GB)
    assert best.strategy != "ddp"  # 6.7B x 20 bytes of model states alone is more than 80 GB


def test_the_command_prints_a_recommendation_and_bad_sizes_are_one_line():
    from test_fit import assert_one_line_error, run_main

    r = run_main("plan", "--config", "configs/gpt/1.5b.yaml", "--gpus", "8", "--gpu-memory", "80GB")
    assert r.returncode == 0, r.stderr
    assert "recommended: --trainer.strategy" in r.stdout and "deepspeed_stage_3_offload" in r.stdout
    assert_one_line_error(run_main("plan", "--preset", "gpt2-124m", "--gpu-memory", "eighty"), "bad memory size")


def test_zero_states_agree_with_deepspeeds_own_estimators():
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    from framework.commands.plan import PROCESS

    m = describe_model("gpt2-1.5b", seq_len=1024)
    kw = dict(seq_len=1024, micro_batch=1, gpus=8)
    P = m.params
    assert int(estimate(m, "deepspeed_stage_2", **kw).states) == estimate_zero2_model_states_mem_needs(
        P, num_gpus_per_node=8, cpu_offload=False)[1]
    cpu, gpu = estimate_zero2_model_states_mem_needs(P, num_gpus_per_node=8, cpu_offload=True)
    z2o = estimate(m, "deepspeed_stage_2_offload", **kw)
    assert (int(z2o.states), int(z2o.host - 8 * PROCESS)) == (gpu, cpu)
    assert int(estimate(m, "deepspeed_stage_3", **kw).states) == estimate_zero3_model_states_mem_needs(
        P, m.largest_layer, num_gpus_per_node=8, cpu_offload=False)[1]
    cpu, gpu, _ = estimate_zero3_model_states_mem_needs(P, m.largest_layer, num_gpus_per_node=8)
    z3o = estimate(m, "deepspeed_stage_3_offload", **kw)
    assert (int(z3o.states), int(z3o.host - 8 * PROCESS)) == (gpu, cpu)
