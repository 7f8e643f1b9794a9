"""The Llama-style decoder options of the shared transformer: RMSNorm, SwiGLU, grouped-query attention, RoPE base and
Llama 3.1 scaling, untied embeddings. Each part is checked against a reference written here, not against itself."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from framework.errors import UserError
from framework.models import GPT, GPTConfig, from_pretrained
from framework.models.transformer import llama3_frequencies, rope_cos_sin


def llama(**overrides) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig.from_preset("llama-test", **overrides)).eval()


def ids(B=2, T=16, seed=1) -> torch.Tensor:
    return torch.randint(0, 256, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name, parameters", [("llama-3.2-1b", 1_235_814_400), ("llama-3.2-3b", 3_212_749_824),
                                              ("llama-3-8b", 8_030_261_248)])
def test_presets_have_metas_parameter_counts(name, parameters):
    # the counts Meta's model cards and Hugging Face report for these checkpoints
    with torch.device("meta"):
        model = GPT(GPTConfig.from_preset(name))
    assert model.num_params(non_embedding=False) == parameters


def test_cpu_preset_has_the_gpt2_blocks_weights():
    with torch.device("meta"):
        gpt, ll = GPT(GPTConfig.from_preset("gpt-small-cpu")), GPT(GPTConfig.from_preset("llama-cpu"))
    block = lambda m: sum(p.numel() for n, p in m.transformer.h[0].named_parameters() if n.endswith("weight"))  # noqa
    assert block(gpt) == block(ll)  # the same weights (biases aside: the Llama block has none)
    assert gpt.flops_per_token() == ll.flops_per_token()
    assert "wpe" not in ll.transformer and not any(n.endswith("bias") for n, _ in ll.named_parameters())


def test_flops_match_torchs_counter():
    model = llama()
    T = 33
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(ids(B=3, T=T)).sum().backward()
    # the counter sees the math kernel's attention matmuls with K/V repeated per group: 4*T*C per token and layer
    # forward, as flops_per_token counts it (causal savings not subtracted)
    assert counter.get_total_flops() == model.flops_per_token(T) * 3 * T


def test_grouped_query_attention_is_multi_head_attention_with_shared_kv():
    """A GQA model computes what a multi-head model computes when each K/V head is copied to its group's heads."""
    gqa = llama()
    mha = GPT(GPTConfig.from_preset("llama-test", n_kv_head=None)).eval()
    hs, nh, nkv = 16, 4, 2
    state = gqa.state_dict()
    for i in range(2):
        w = state[f"transformer.h.{i}.attn.c_attn.weight"]  # (C + 2*nkv*hs, C)
        q, k, v = w.split((nh * hs, nkv * hs, nkv * hs))
        repeat = lambda t: t.view(nkv, hs, -1).repeat_interleave(nh // nkv, dim=0).reshape(nh * hs, -1)  # noqa
        state[f"transformer.h.{i}.attn.c_attn.weight"] = torch.cat((q, repeat(k), repeat(v)))
    mha.load_state_dict(state)
    x = ids()
    torch.testing.assert_close(gqa(x), mha(x), rtol=1e-5, atol=1e-5)
    assert gqa.transformer.h[0].attn.c_attn.weight.shape == (64 + 2 * 32, 64)


def test_block_parts_match_their_formulas():
    model = llama()
    block = model.transformer.h[0]
    x = torch.randn(2, 5, 64)
    rms = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * block.ln_1.weight  # Zhang & Sennrich 2019
    torch.testing.assert_close(block.ln_1(x), rms)
    w = block.mlp.c_fc.weight  # (2H, C): rows [gate; up]
    gate, up = x @ w[:192].T, x @ w[192:].T
    torch.testing.assert_close(block.mlp(x), (F.silu(gate) * up) @ block.mlp.c_proj.weight.T)


def test_rope_theta_and_llama3_scaling():
    # the base sets the frequencies: theta^(-2i/hs)
    cos, _ = rope_cos_sin(4, 8, theta=500000.0)
    assert cos[1, 1].item() == pytest.approx(math.cos(500000.0 ** (-2 / 8)), rel=1e-6)
    scaling = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=64)
    inv = 500000.0 ** -(torch.arange(0, 64, 2, dtype=torch.float32) / 64)
    wavelength = 2 * math.pi / inv
    out = llama3_frequencies(inv, scaling)
    short, long = wavelength < 64 / 4, wavelength > 64 / 1
    assert short.any() and long.any() and (~short & ~long).any()
    torch.testing.assert_close(out[short], inv[short])  # short wavelengths are kept
    torch.testing.assert_close(out[long], inv[long] / 8)  # long ones are stretched by the factor
    mid = ~short & ~long
    assert ((out[mid] <= inv[mid]) & (out[mid] >= inv[mid] / 8)).all()
    # and the model uses it: scaled frequencies change the logits
    a, b = llama(rope_theta=500000.0), llama(rope_theta=500000.0, rope_scaling=scaling)
    assert not torch.allclose(a(ids()), b(ids()))


def test_untied_embeddings_are_saved_and_loaded(tmp_path):
    from safetensors import safe_open

    model = llama(tie_embeddings=False)
    assert model.lm_head.weight is not model.transformer.wte.weight and model.tied_weights == ()
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" in set(f.keys())
    loaded = from_pretrained(tmp_path).eval()
    assert loaded.lm_head.weight is not loaded.transformer.wte.weight
    assert torch.equal(loaded(ids()), model(ids()))
    tied = llama()
    assert tied.lm_head.weight is tied.transformer.wte.weight and tied.tied_weights == ("lm_head.weight",)


def test_causal_and_learns():
    model = llama().train()
    x = ids(B=4, T=32)
    changed = x.clone()
    changed[:, 9] = (changed[:, 9] + 1) % 256
    with torch.no_grad():
        torch.testing.assert_close(model(x)[:, :9], model(changed)[:, :9], rtol=0, atol=1e-6)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(60):  # one batch, memorized
        loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1 * math.log(256)


@pytest.mark.parametrize("overrides, message", [
    (dict(n_kv_head=3), "n_kv_head=3 must divide n_head=4"),
    (dict(norm="rms"), "norm='rms' is not one of"),
    (dict(mlp="geglu"), "mlp=.geglu. is not one of .gelu., .gelu_exact., .quick_gelu., .swiglu."),
    (dict(rope_theta=0), "rope_theta=0 must be a positive number"),
    (dict(rope_scaling=dict(rope_type="yarn", factor=4.0)), "rope_scaling=.* is not supported"),
    (dict(rope_scaling=dict(rope_type="llama3", factor=8.0)), "rope_scaling needs positive numbers for low_freq_factor"),
    (dict(pos_embedding="learned", rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                                     high_freq_factor=4.0, original_max_position_embeddings=8)),
     "rope_scaling is set but pos_embedding is 'learned': use pos_embedding=rope"),
    (dict(tie_embeddings="no"), "tie_embeddings='no' must be true or false"),
])
def test_bad_options_are_one_clear_error(overrides, message):
    with pytest.raises(UserError, match=f"GPTConfig.{message}"):
        GPTConfig.from_preset("llama-test", **overrides)


@pytest.mark.parametrize("mlp, act", [("gelu", lambda x: F.gelu(x, approximate="tanh")), ("gelu_exact", F.gelu),
                                      ("quick_gelu", lambda x: x * torch.sigmoid(1.702 * x))])
def test_mlp_activations_are_the_public_checkpoints_own(mlp, act):
    """GPT-2's tanh GELU (every preset), the erf GELU (BERT, Google's ViT) and OpenAI CLIP's quick GELU."""
    torch.manual_seed(0)
    block = GPT(GPTConfig.from_preset("gpt-tiny", mlp=mlp)).transformer.h[0]
    x = torch.randn(2, 5, 64)
    expected = act(x @ block.mlp.c_fc.weight.T + block.mlp.c_fc.bias) @ block.mlp.c_proj.weight.T + block.mlp.c_proj.bias
    torch.testing.assert_close(block.mlp(x), expected)
