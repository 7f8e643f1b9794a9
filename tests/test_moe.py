"""Mixture-of-Experts layers: routing, the grouped expert path against a per-token loop, the balancing losses, the
config checks, and a short fit (framework.models.moe, framework.objectives.moe)."""

import math
import types

import pytest
import torch
import torch.nn.functional as F

from framework.models.gpt import GPT, GPTConfig
from framework.models.moe import MoE, MoEConfig
from framework.objectives.moe import load_imbalance, router_z_loss, switch_aux_loss
from framework.errors import UserError


def moe_layer(**cfg) -> MoE:
    torch.manual_seed(0)
    layer = MoE(16, MoEConfig(**{"num_experts": 4, "top_k": 2, **cfg}))
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.3)
    return layer


def loop_reference(layer: MoE, x: torch.Tensor) -> torch.Tensor:
    """The MoE MLP one token at a time: its top-k experts, each as a plain MLP, weighted by the gates."""
    cfg = layer.config
    out = torch.zeros_like(x)
    flat, flat_out = x.reshape(-1, x.size(-1)), out.view(-1, x.size(-1))
    for n, token in enumerate(flat):
        logits = layer.router.weight.float() @ token.float()  # (E,)
        scores = logits.softmax(-1) if cfg.router == "softmax" else torch.sigmoid(logits)
        choice = scores + layer.expert_bias if cfg.balance == "bias" else scores
        ids = torch.topk(choice, cfg.top_k).indices
        gates = scores[ids] / (scores[ids].sum() if cfg.top_k > 1 else 1)
        for e, g in zip(ids.tolist(), gates):
            h = F.gelu(token @ layer.experts.w_fc[e], approximate="tanh")
            flat_out[n] += g * (h @ layer.experts.w_proj[e])
        if layer.shared is not None:
            flat_out[n] += F.gelu(token @ layer.shared.w_fc[0], approximate="tanh") @ layer.shared.w_proj[0]
    return out


@pytest.mark.parametrize("cfg", [dict(top_k=1), dict(top_k=2), dict(top_k=4), dict(router="sigmoid"),
                                 dict(shared_experts=1), dict(balance="bias")])
def test_grouped_path_equals_a_per_token_loop(cfg):
    layer = moe_layer(**cfg)
    if cfg.get("balance") == "bias":
        layer.expert_bias.copy_(torch.tensor([0.5, -0.5, 0.0, 0.2]))  # the bias changes the choice, not the gates
    x = torch.randn(2, 7, 16, generator=torch.Generator().manual_seed(1))
    y = layer(x)
    torch.testing.assert_close(y, loop_reference(layer, x), atol=1e-5, rtol=1e-5)
    # gradients too: the expert weights, the router (through the gates) and the input
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    g = torch.randn_like(y)
    grads1 = torch.autograd.grad((layer(x1) * g).sum(), [x1, *layer.parameters()])
    grads2 = torch.autograd.grad((loop_reference(layer, x2) * g).sum(), [x2, *layer.parameters()])
    for a, b in zip(grads1, grads2):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_capacity_drops_the_later_assignments_of_a_full_expert():
    layer = moe_layer(top_k=1, capacity_factor=1.0)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[2, 0] = 10.0  # every token with a positive first feature goes to expert 2
    x = torch.randn(1, 8, 16, generator=torch.Generator().manual_seed(0))
    x[0, :, 0] = 1.0  # all 8 tokens pick expert 2; capacity = ceil(1.0 * 8 * 1 / 4) = 2
    y = layer(x)
    assert int(layer.last_stats["counts"][2]) == 8 and int(layer.last_stats["dropped"]) == 6
    assert y[0, :2].abs().sum() > 0 and torch.all(y[0, 2:] == 0)  # the first two kept, in token order
    dropless = moe_layer(top_k=1)
    dropless.load_state_dict(layer.state_dict())
    torch.testing.assert_close(dropless(x)[0, :2], y[0, :2])


def test_router_runs_in_float32_under_bf16():
    layer = moe_layer().to(torch.bfloat16)
    x = torch.randn(2, 5, 16, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16 and layer.last_stats["prob_sum"].dtype == torch.float32
    fp32 = moe_layer()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16-mixed: the router's matmul stays out of autocast
        assert fp32.router(torch.randn(3, 16)).dtype == torch.float32


# ------------------------------------------------------------------------------------------------- balancing losses
def test_aux_loss_is_one_for_a_uniform_router_and_larger_for_a_skewed_one():
    E, N, k = 8, 64, 2
    uniform = switch_aux_loss(torch.full((E,), N / E), N, torch.full((E,), N * k / E))
    assert float(uniform) == pytest.approx(1.0)
    skewed_probs = torch.tensor([0.5, 0.3] + [0.2 / 6] * 6) * N
    skewed_counts = torch.tensor([N, N] + [0] * 6)  # every token picks experts 0 and 1
    assert float(switch_aux_loss(skewed_probs, N, skewed_counts)) == pytest.approx(8 * (0.5 * 0.5 + 0.5 * 0.3))
    collapsed = switch_aux_loss(torch.tensor([N] + [0.0] * 7), N, torch.tensor([N * k] + [0] * 7))
    assert float(collapsed) == pytest.approx(E)
    # the layer's own statistics of a router with all-zero weights (uniform probabilities)
    layer = moe_layer()
    with torch.no_grad():
        layer.router.weight.zero_()
    layer(torch.randn(3, 5, 16))
    s = layer.last_stats
    assert float(switch_aux_loss(s["prob_sum"], s["tokens"], torch.full((4,), 15 * 2 / 4))) == pytest.approx(1.0)
    assert float(router_z_loss(s["z_sum"], s["tokens"])) == pytest.approx(math.log(4) ** 2, rel=1e-5)
    assert float(load_imbalance(torch.tensor([4, 4, 4, 4]))) == 1.0
    assert float(load_imbalance(torch.tensor([16, 0, 0, 0]))) == 4.0


def test_aux_loss_over_ranks_is_the_global_one():
    """Two halves of a batch, each with its own probabilities but the counts of both: their mean loss (what DDP's
    gradient mean optimizes) is the loss of the whole batch."""
    torch.manual_seed(0)
    probs = torch.rand(20, 4).softmax(-1)
    counts = torch.bincount(probs.topk(2).indices.flatten(), minlength=4)
    whole = switch_aux_loss(probs.sum(0), 20, counts)
    halves = [switch_aux_loss(p.sum(0), 10, counts) for p in probs.split(10)]
    torch.testing.assert_close((halves[0] + halves[1]) / 2, whole)


def test_bias_update_moves_toward_balance():
    layer = moe_layer(balance="bias", bias_update_rate=0.1)
    layer.update_bias(torch.tensor([10, 2, 2, 2]))
    torch.testing.assert_close(layer.expert_bias, torch.tensor([-0.1, 0.1, 0.1, 0.1]))
    assert "expert_bias" in layer.state_dict()  # saved in checkpoints
    assert "expert_bias" not in moe_layer().state_dict()  # not with the loss (no state to keep)


# --------------------------------------------------------------------------------------------------- config, model
@pytest.mark.parametrize("bad, message", [
    (dict(num_experts=4, top_k=5), "moe.top_k=5 is more than moe.num_experts=4"),
    (dict(router="soft"), "moe.router='soft'"),
    (dict(balance="loss"), "moe.balance='loss'"),
    (dict(capacity_factor=0), "moe.capacity_factor=0"),
    (dict(nonsense=1), "unknown moe field 'nonsense'"),
])
def test_bad_moe_config_is_one_line(bad, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(")) as e:
        GPTConfig.from_preset("gpt-tiny", moe=bad)
    assert "\n" not in str(e.value)


def test_gpt_with_moe_every_other_layer_round_trips(tmp_path):
    config = GPTConfig.from_preset("gpt-tiny", n_layer=4, moe=dict(num_experts=4, top_k=1, every_n_layers=2))
    model = GPT(config)
    assert [type(b.mlp).__name__ for b in model.transformer.h] == ["MLP", "MoE", "MLP", "MoE"]
    assert len(model.moe_layers()) == 2
    x = torch.randint(0, 256, (2, 16))
    model.save_pretrained(tmp_path)
    again = GPT.from_pretrained(tmp_path)
    assert again.config == config
    assert not [n for n, t in [*again.named_parameters(), *again.named_buffers()] if t.is_meta]  # all in the file
    torch.testing.assert_close(again(x), model(x))


def test_active_params_and_flops():
    moe = GPT(GPTConfig.from_preset("gpt-moe-test"))
    dense = GPT(GPTConfig.from_preset("gpt-moe-test", moe=None))
    # top-2 of 4 experts of hidden 4C/2: a token's active MLP weighs what the dense MLP does (plus the router)
    router = 2 * 64 * 4
    assert moe.num_active_params() == dense.num_params() - 2 * (4 * 64 + 64) + router  # no expert biases
    assert moe.num_params() > 1.5 * dense.num_params()
    assert moe.flops_per_token() - dense.flops_per_token() == 3 * 2 * router  # 2 FLOPs per router weight, x3 for backward


# ------------------------------------------------------------------------------------------------ fit, files, plan
@pytest.fixture(scope="module")
def moe_run(text_shards, tmp_path_factory):
    """A 6-step fit (in this process) of gpt-moe-test with the bias balance (a large rate, so the bias moves) and
    shared experts, on the common corpus with a val split: its run directory."""
    import json

    from dist_fit import write_config
    from framework.commands.fit import fit

    tmp = tmp_path_factory.mktemp("moe-fit")
    path = write_config(tmp, text_shards("lines", 0.1), strategy="auto", devices=1, max_steps=6, every_n_steps=6,
                        limit_val_batches=2, val_check_interval=6)
    config = json.loads(path.read_text())
    config["model"]["init_args"].update(preset="gpt-moe-test", config={"moe": {
        "num_experts": 4, "top_k": 1, "shared_experts": 1, "balance": "bias", "bias_update_rate": 0.05}})
    path.write_text(json.dumps(config))
    fit(["--config", str(path)])
    return tmp


def test_fit_saves_the_bias_and_export_generate_init_from_work(moe_run, tmp_path):
    from framework.checkpoint.export import export
    from framework.checkpoint.load import load_checkpoint_model
    from framework.models import from_pretrained

    ckpt = moe_run / "run" / "checkpoints" / "last.ckpt"
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)
    bias = saved["state_dict"]["model.transformer.h.0.mlp.expert_bias"]
    # six updates of +-0.05 each: the bias moved, in steps of the rate (and not all in one direction)
    assert bias.abs().max() > 0 and torch.allclose(bias / 0.05, (bias / 0.05).round(), atol=1e-4)
    export(ckpt, tmp_path / "exported")
    model = from_pretrained(tmp_path / "exported").eval()
    assert model.config.moe.balance == "bias" and model.config.moe.shared_experts == 1
    torch.testing.assert_close(model.transformer.h[0].mlp.expert_bias, bias)
    live, _ = load_checkpoint_model(str(ckpt))
    x = torch.randint(0, 200, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(x), live.eval()(x))
    out = model.generate(x, 5, temperature=0)
    assert out.shape == (1, 17)
    # init_from: a new dense-layout model of the same config takes every tensor, expert biases included
    from framework.checkpoint.init_from import load_weights

    fresh = GPT(model.config)
    report = load_weights(fresh, str(ckpt), types.SimpleNamespace(global_rank=0), fresh.tied_weights)
    assert "transformer.h.0.mlp.expert_bias" in report.loaded and not report.new
    assert "\n".join(report.lines(str(ckpt)))
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), model(x))


def test_fit_logs_the_balancing_terms(moe_run):
    from wandb_records import history

    rows = history(next((moe_run / "run").rglob("*.wandb")))
    keys = set().union(*rows)
    for key in ("train/loss", "train/lm_loss", "train/moe_aux", "train/moe_z", "moe/load_max_mean/layer0",
                "moe/load_max_mean/layer1", "val/loss", "val/moe_aux"):
        assert key in keys, sorted(keys)
    load = [r["moe/load_max_mean/layer0"] for r in rows if "moe/load_max_mean/layer0" in r]
    assert all(1.0 <= x <= 4.0 for x in load)  # max/mean of 4 experts


def test_plan_counts_active_parameters():
    from framework.commands.plan import describe_model

    model = describe_model("gpt-moe-olmoe", seq_len=4096)
    assert 4.5e9 < model.params < 4.8e9 and 0.85e9 < model.active_params < 0.95e9
    dense = describe_model("gpt-moe-olmoe", seq_len=4096, moe=None)
    assert dense.active_params == 0


@pytest.mark.gpu
def test_grouped_mm_kernel_equals_the_loop_on_gpu():
    """On a GPU with torch._grouped_mm (bf16, compute capability 9+), the one-kernel expert path gives the loop's
    outputs and gradients."""
    from framework.models.moe import expert_matmul, grouped_mm_available

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    x = torch.randn(100, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(4, 64, 32, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    if not grouped_mm_available(x):
        pytest.skip("this GPU has no torch._grouped_mm")
    counts = [30, 0, 50, 20]  # an expert with no rows too
    grouped = expert_matmul(x, w, counts)
    loop = torch.cat([c @ e for c, e in zip(x.split(counts), w.unbind(0))])
    torch.testing.assert_close(grouped, loop, atol=1e-2, rtol=1e-2)
    g = torch.randn_like(grouped)
    torch.testing.assert_close(torch.autograd.grad((grouped * g).sum(), [x, w]),
                               torch.autograd.grad((loop * g).sum(), [x, w]), atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("cfg", [dict(num_experts=4, top_k=2), dict(num_experts=4, top_k=1, shared_experts=1,
                                                                     every_n_layers=2)])
def test_task_flops_match_torchs_flop_counter(cfg):
    """MFU's FLOPs are the active parameters': the router and the top_k (+ shared) experts of each token."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from framework.tasks.causal_lm import CausalLMTask

    task = CausalLMTask(preset="gpt-moe-test", config={"moe": cfg})
    task.model = GPT(GPTConfig.from_preset("gpt-moe-test", moe=cfg))
    batch = {"tokens": torch.randint(0, 256, (3, 33))}
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        task.compute_losses(batch)["loss"][0].backward()
    assert task.batch_flops(batch) == counter.get_total_flops()
