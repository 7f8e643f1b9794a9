import json
import math

import pytest
import torch

from framework.errors import UserError
from framework.distributed import apply_activation_checkpointing
from framework.models.gpt import GPT, GPTConfig
from framework.models.transformer import Block, apply_rope, rope_cos_sin
from framework.objectives.causal_lm import causal_lm_loss, shift

POS = ["learned", "rope"]


def tiny(**overrides) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig.from_preset("gpt-tiny", **overrides))


def tokens(B=2, T=16, V=256, seed=0) -> torch.Tensor:
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------------------ config
def test_every_preset_builds_on_meta():
    assert GPTConfig.presets()[:2] == ["gpt-tiny", "gpt-small-cpu"]
    for name in GPTConfig.presets():
        config = GPTConfig.from_preset(name)
        with torch.device("meta"):
            model = GPT(config)
        assert model.num_params() > 0


@pytest.mark.parametrize(
    "name, millions",
    [("gpt2-124m", 124), ("gpt2-350m", 355), ("gpt2-774m", 774), ("gpt2-1.5b", 1558), ("gpt-2.7b", 2652),
     ("gpt-6.7b", 6659)],
)
def test_preset_param_counts(name, millions):
    with torch.device("meta"):
        model = GPT(GPTConfig.from_preset(name))
    assert model.num_params(non_embedding=False) / 1e6 == pytest.approx(millions, abs=1)


def test_gpt2_124m_matches_nanogpt_counts():
    with torch.device("meta"):
        model = GPT(GPTConfig.from_preset("gpt2-124m"))
    assert round(model.num_params() / 1e6, 2) == 123.69  # nanoGPT prints "number of parameters: 123.69M"
    # matmul FLOPs by hand: 6 per weight of the blocks' 12*C^2 and the C x Vp output matrix, plus attention 12*L*C*T
    # (torch's FlopCounterMode agrees exactly at tiny size: tests/test_masked_lm.py)
    assert model.flops_per_token() == 6 * (12 * 12 * 768**2 + 768 * 50304) + 12 * 12 * 768 * 1024
    # nanoGPT's 6N (N with biases and norms) + 12*L*H*Q*T differs by the ~0.1% that biases and norms add
    assert model.flops_per_token() == pytest.approx(6 * model.num_params() + 12 * 12 * 12 * 64 * 1024, rel=2e-3)


def test_from_preset_overrides_and_padding():
    config = GPTConfig.from_preset("gpt-tiny", vocab_size=300, dropout=0.1)
    assert (config.vocab_size, config.dropout, config.n_layer) == (300, 0.1, 2)
    assert config.padded_vocab_size == 320
    assert GPTConfig.from_preset("gpt-tiny").padded_vocab_size == 256
    assert GPTConfig.from_dict(config.to_dict()) == config


def test_unknown_preset_suggests_the_closest():
    with pytest.raises(ValueError, match="unknown GPT preset 'gpt2-124M'.*did you mean 'gpt2-124m'"):
        GPTConfig.from_preset("gpt2-124M")


def test_unknown_field_suggests_the_closest():
    with pytest.raises(ValueError, match="unknown GPTConfig field 'n_layers'.*did you mean 'n_layer'"):
        GPTConfig.from_preset("gpt-tiny", n_layers=4)
    with pytest.raises(ValueError, match="did you mean 'seq_len'"):
        GPTConfig.from_dict({**GPTConfig().to_dict(), "seqlen": 4})


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(n_embd=100, n_head=3), "n_embd=100 must be divisible by n_head=3: use n_embd=99 or 102"),
        (dict(n_layer=0), "n_layer=0 must be a positive integer"),
        (dict(vocab_size=-5), "vocab_size=-5 must be a positive integer"),
        (dict(seq_len=64.0), "seq_len=64.0 must be a positive integer"),
        (dict(dropout=1.0), "dropout=1.0 must be a number in \\[0, 1\\)"),
        (dict(pos_embedding="ropes"), "pos_embedding='ropes'.*did you mean 'rope'"),
        (dict(n_embd=66, n_head=2, pos_embedding="rope"), "pos_embedding='rope' needs an even head size, got .*=33"),
        (dict(bias="yes"), "bias='yes' must be true or false"),
    ],
)
def test_validation_names_the_field_and_fix(overrides, message):
    with pytest.raises(ValueError, match=f"GPTConfig.{message}"):
        GPTConfig.from_preset("gpt-tiny", **overrides)


def test_config_errors_are_user_errors():
    # the CLI turns UserError into one line and exit code 2
    with pytest.raises(UserError):
        GPTConfig(n_head=5)


# ------------------------------------------------------------------------------------------------------------- model
@pytest.mark.parametrize("pos", POS)
def test_output_shape_and_padding_is_never_predicted(pos):
    model = tiny(vocab_size=250, pos_embedding=pos)  # padded to 256
    assert model.transformer.wte.weight.shape == (256, 64)
    logits = model(tokens(B=3, T=10, V=250))
    assert logits.shape == (3, 10, 250)
    assert model.generate(tokens(B=1, T=4, V=250), 20, top_k=None).max() < 250


def test_too_long_input_is_a_clear_error():
    model = tiny()
    with pytest.raises(ValueError, match="exceeds GPTConfig.seq_len=64"):
        model(tokens(T=65))


@pytest.mark.parametrize("pos", POS)
def test_causality(pos):
    model = tiny(pos_embedding=pos)
    idx = tokens(B=2, T=20)
    changed = idx.clone()
    changed[:, 9] = (changed[:, 9] + 1) % 256
    a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, :9], b[:, :9], rtol=0, atol=1e-6)
    assert (a[:, 9:] - b[:, 9:]).abs().amax(dim=-1).min() > 1e-4  # every later position sees the change


def test_tied_embeddings():
    model = tiny()
    assert model.lm_head.weight is model.transformer.wte.weight
    names = [n for n, _ in model.named_parameters()]
    assert "lm_head.weight" not in names  # parameters() yields the shared matrix once
    model(tokens()).sum().backward()
    assert model.transformer.wte.weight.grad is model.lm_head.weight.grad


def test_learned_vs_rope_parameters():
    learned, rope = tiny(pos_embedding="learned"), tiny(pos_embedding="rope")
    assert "wpe" in learned.transformer and "wpe" not in rope.transformer
    assert learned.num_params(non_embedding=False) - rope.num_params(non_embedding=False) == 64 * 64
    assert learned.num_params() == rope.num_params()  # non-embedding counts agree
    assert not any(True for _ in rope.buffers())  # rope tables are computed, never stored


def test_rope_scores_depend_only_on_relative_position():
    cos, sin = rope_cos_sin(32, 16)
    q, k = torch.randn(16), torch.randn(16)

    def score(m, n):  # query at position m, key at position n
        rq = apply_rope(q.expand(1, 1, 32, 16), cos, sin)[0, 0, m]
        rk = apply_rope(k.expand(1, 1, 32, 16), cos, sin)[0, 0, n]
        return torch.dot(rq, rk)

    torch.testing.assert_close(score(5, 2), score(20, 17))
    torch.testing.assert_close(score(0, 0), torch.dot(q, k))  # position 0 is not rotated
    assert not torch.allclose(score(5, 2), score(5, 4))


def test_gpt2_init():
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=512, seq_len=128, n_layer=4, n_head=4, n_embd=256)
    model = GPT(config)
    residual = 0.02 / math.sqrt(2 * 4)
    for name, p in model.named_parameters():
        if name.endswith("c_proj.weight"):
            assert p.std().item() == pytest.approx(residual, rel=0.05), name
        elif "ln_" in name:
            assert torch.all(p == (1.0 if name.endswith("weight") else 0.0)), name
        elif name.endswith(".bias"):
            assert torch.all(p == 0), name
        else:  # wte, wpe, c_attn, c_fc
            assert p.std().item() == pytest.approx(0.02, rel=0.05), name
            assert p.mean().abs().item() < 0.002, name


def test_init_weights_after_meta_materialization():
    config = GPTConfig.from_preset("gpt-tiny")
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device="cpu")
    model.init_weights()
    assert model.lm_head.weight is model.transformer.wte.weight
    assert model.transformer.wte.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert torch.isfinite(model(tokens())).all()


@pytest.mark.parametrize("pos", POS)
def test_activation_checkpointing_gives_same_loss_and_grads(pos):
    batch = tokens(B=2, T=33)
    results = []
    for checkpointing in (False, True):
        model = tiny(pos_embedding=pos, dropout=0.1)
        if checkpointing:
            apply_activation_checkpointing(model, (Block,))
        torch.manual_seed(1)  # same dropout masks: checkpoint replays the RNG state in recomputation
        inputs, targets = shift(batch)
        loss = causal_lm_loss(model(inputs), targets)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b, rtol=0, atol=0)
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.parametrize("pos", POS)
def test_overfits_one_batch(pos):
    model = tiny(pos_embedding=pos)
    inputs, targets = shift(tokens(B=4, T=33))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first = None
    for _ in range(50):
        loss = causal_lm_loss(model(inputs), targets)
        first = loss.item() if first is None else first
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert first == pytest.approx(math.log(256), rel=0.05)  # uniform at init
    assert loss.item() < 0.5, f"loss {first:.2f} -> {loss.item():.2f}"


# ---------------------------------------------------------------------------------------------------------- generate
def test_generate_length_and_mode():
    model = tiny(dropout=0.5)
    model.train()
    prompt = tokens(B=3, T=5)
    out = model.generate(prompt, max_new_tokens=7)
    assert out.shape == (3, 12) and torch.equal(out[:, :5], prompt)
    assert model.training  # restored


def test_generate_crops_context_to_seq_len():
    model = tiny()
    out = model.generate(tokens(B=1, T=60), max_new_tokens=10, temperature=0)
    assert out.shape == (1, 70)


def test_top_k_1_is_greedy():
    model = tiny()
    prompt = tokens(B=2, T=4)
    greedy = model.generate(prompt, 12, temperature=0)
    torch.manual_seed(123)
    sampled = model.generate(prompt, 12, temperature=1.5, top_k=1)
    assert torch.equal(greedy, sampled)
    # and greedy is argmax of the forward pass
    assert torch.equal(greedy[:, 4], model(prompt)[:, -1].argmax(-1))


def recompute_greedy(model: GPT, idx: torch.Tensor, n: int) -> torch.Tensor:
    """Greedy decoding the slow way: the whole (cropped) context through the model for every token."""
    for _ in range(n):
        next_id = model(idx[:, -model.config.seq_len :])[:, -1].argmax(-1, keepdim=True)
        idx = torch.cat((idx, next_id), dim=1)
    return idx


@pytest.mark.parametrize("overrides", [dict(pos_embedding="learned"), dict(pos_embedding="rope"),
                                       dict(pos_embedding="rope", n_head=4, n_kv_head=2),
                                       dict(moe=dict(num_experts=4, top_k=2))],
                         ids=["learned", "rope", "gqa", "moe"])
def test_cached_generation_matches_rerunning_the_context(overrides):
    # the KV cache runs one token a step; its logits must be the full forward's, also once the window slides
    # (the prompt of 50 + 30 new tokens passes seq_len 64)
    model = tiny(**overrides).eval()
    prompt = tokens(B=2, T=50)
    out = model.generate(prompt, 30, temperature=0)
    assert torch.equal(out, recompute_greedy(model, prompt, 30))


def test_kv_cache_logits_match_the_full_forward():
    from framework.models.transformer import KVCache

    model = tiny(pos_embedding="rope").eval()
    idx = tokens(B=2, T=20)
    with torch.no_grad():
        full = model(idx)
        cache = KVCache(model.config.n_layer)
        parts = [model(idx[:, :7], cache=cache), model(idx[:, 7:8], cache=cache), model(idx[:, 8:], cache=cache)]
    assert cache.length == 20
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="exceeds"):  # the cache holds at most seq_len positions
        model(tokens(B=2, T=45), cache=cache)


def test_generate_stops_at_eos():
    model = tiny()
    prompt = tokens(B=1, T=4)
    greedy = model.generate(prompt, 10, temperature=0)
    eos = int(greedy[0, 7])  # the 4th generated token
    first = int((greedy[0, 4:] == eos).nonzero()[0])  # it may already appear earlier
    out = model.generate(prompt, 10, temperature=0, eos_id=eos)
    assert out.shape == (1, 4 + first + 1) and out[0, -1] == eos
    assert torch.equal(out, greedy[:, : 4 + first + 1])


def test_generate_eos_keeps_finished_rows_at_eos():
    model = tiny()
    prompt = torch.cat([tokens(B=1, T=4, seed=1), tokens(B=1, T=4, seed=2)])
    greedy = model.generate(prompt, 10, temperature=0)
    eos = int(greedy[0, 4])  # row 0 stops at once
    out = model.generate(prompt, 10, temperature=0, eos_id=eos)
    assert torch.all(out[0, 4:] == eos)
    assert out.shape[1] <= 14


# ------------------------------------------------------------------------------------------------------------- files
@pytest.mark.parametrize("pos", POS)
def test_save_and_load_round_trip(tmp_path, pos):
    from safetensors import safe_open

    model = tiny(vocab_size=250, pos_embedding=pos)
    model.save_pretrained(tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", "model.safetensors"]
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text()) == model.config.to_dict()
    with safe_open(str(tmp_path / "ckpt" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "transformer.wte.weight" in keys and "lm_head.weight" not in keys  # the tied matrix is stored once

    loaded = GPT.from_pretrained(tmp_path / "ckpt")
    assert loaded.config == model.config
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    assert not any(p.is_meta for p in loaded.parameters())
    idx = tokens(V=250)
    assert torch.equal(loaded(idx), model(idx))


def test_from_pretrained_overrides_and_errors(tmp_path):
    tiny().save_pretrained(tmp_path)
    assert GPT.from_pretrained(tmp_path, dropout=0.1).config.dropout == 0.1
    with pytest.raises(ValueError, match="did you mean 'dropout'"):
        GPT.from_pretrained(tmp_path, droput=0.1)
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        GPT.from_pretrained(tmp_path / "nothing")


def test_save_overwrites_atomically(tmp_path):
    tiny().save_pretrained(tmp_path)
    model = tiny(n_layer=3)
    model.save_pretrained(tmp_path)  # overwrite in place, no temp files left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    assert GPT.from_pretrained(tmp_path).config.n_layer == 3
