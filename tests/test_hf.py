"""Hugging Face interop, checked against `transformers` itself (framework.checkpoint.hf).

Both directions, with small random-weight models built from a config on either side (nothing is downloaded):
- `pretrain export --format hf`: the directory loads with transformers' Auto classes and gives our logits (fp32, eval,
  atol 1e-5), greedy `generate` gives our greedy tokens, AutoTokenizer encodes as our tokenizer;
- `init_from hf:DIR`: a transformers `save_pretrained` directory gives our model transformers' logits.
For GPT-2 (GPT2LMHeadModel) and the Llama-style decoder (LlamaForCausalLM: grouped-query attention, a rope_theta,
tied and untied embeddings, llama3 rope scaling), single-file and sharded safetensors. The slow test imports under
DDP and ZeRO-3 in real 2-process fits.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from framework.checkpoint.export import export
from framework.checkpoint.init_from import load_weights, source_config, source_tokenizer
from framework.checkpoint.load import load_model
from framework.checkpoint.reader import open_checkpoint
from framework.data.tokenizer import Tokenizer, bytes_tokenizer, train_bpe
from framework.errors import UserError
from framework.models import GPT, Encoder, EncoderConfig, GPTConfig, config_from_dict, from_pretrained
from framework.models.transformer import ConfigError

transformers = pytest.importorskip(
    "transformers", reason="transformers is not installed: bash launch/setup.sh puts it in .venv/reference")

VOCAB = 261  # the bytes tokenizer: 256 bytes + 5 specials (our tables pad it to 320)
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}  # a short original context, so the scaling acts at T = 40
# our configs and their HF architecture
OURS = {
    "gpt2": ("GPT2LMHeadModel", dict(preset="gpt-tiny")),
    "gpt2-nobias": ("GPT2LMHeadModel", dict(preset="gpt-tiny", bias=False)),  # HF's biases are zeros
    "gpt2-erf-gelu": ("GPT2LMHeadModel", dict(preset="gpt-tiny", mlp="gelu_exact")),  # activation_function "gelu"
    "llama-gqa-untied": ("LlamaForCausalLM", dict(preset="llama-test", rope_theta=50_000.0, tie_embeddings=False,
                                                  bias=True)),
    "llama-tied-llama3": ("LlamaForCausalLM", dict(preset="llama-test", rope_scaling=LLAMA3, norm_eps=1e-6)),
}


def ids(B: int = 2, T: int = 40, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def perturbed(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every weight moved off its init (norm weights off one, biases off zero), so a misplaced tensor shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def our_model(preset: str, **overrides) -> GPT:
    torch.manual_seed(0)
    return perturbed(GPT(GPTConfig.from_preset(preset, vocab_size=VOCAB, **overrides)))


def write_ckpt(path: Path, model: torch.nn.Module, tokenizer_json: str | None) -> Path:
    """`model` as `pretrain fit` saves a single-file checkpoint: Lightning's dict, the task's `model.` prefix."""
    torch.save({"state_dict": {"model." + k: v for k, v in model.state_dict().items()},
                "model_config": model.config.to_dict(), "tokenizer_json": tokenizer_json, "global_step": 7}, path)
    return path


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    """A small byte-level BPE trained here (merges and all: a real test of the tokenizer files)."""
    texts = ["the quick brown fox jumps over the lazy dog", "héllo wörld, the dog sleeps", "fox and dog"] * 20
    return Tokenizer(train_bpe(texts, 300))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """name (an OURS key) -> (our model, the exported HF directory); the llama-gqa-untied one sharded."""
    tok = Tokenizer(bytes_tokenizer()).to_str()
    cache: dict[str, tuple[GPT, Path]] = {}

    def get(name: str) -> tuple[GPT, Path]:
        if name not in cache:
            _, spec = OURS[name]
            model = our_model(**spec)
            tmp = tmp_path_factory.mktemp(name)
            shard = "40KB" if name == "llama-gqa-untied" else "5GB"
            summary = export(write_ckpt(tmp / "last.ckpt", model, tok), tmp / "hf", format="hf", max_shard_size=shard)
            assert summary["architecture"] == OURS[name][0]
            cache[name] = model, tmp / "hf"
        return cache[name]

    return get


# ---------------------------------------------------------------- export: transformers loads it as it is
@pytest.mark.parametrize("name", list(OURS))
def test_export_gives_our_logits_in_transformers(name, exported):
    model, out = exported(name)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == OURS[name][0]
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [OURS[name][0]] and config["torch_dtype"] == "float32"
    assert config["vocab_size"] == VOCAB and config["eos_token_id"] == 256 and config["pad_token_id"] == 257
    x = ids()
    with torch.no_grad():
        ours, theirs = model(x), hf(x).logits
    assert theirs.shape == ours.shape == (2, 40, VOCAB)  # only the first vocab_size rows were exported
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)


def test_export_shards_above_the_size_like_save_pretrained(exported):
    model, out = exported("llama-gqa-untied")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(files) > 2 and set(index["weight_map"].values()) == set(files)
    assert not (out / "model.safetensors").exists()
    assert files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    from safetensors import safe_open

    total = 0
    for f in files:
        with safe_open(out / f, framework="pt") as h:
            sizes = [h.get_tensor(k).nbytes for k in h.keys()]
        assert sum(sizes) <= 40_000 or len(sizes) == 1, f  # at most 40KB, or one larger tensor alone
        total += sum(sizes)
    assert index["metadata"]["total_size"] == total
    # q, k, v split out of c_attn and gate/up out of c_fc, with GQA's narrower k and v
    assert index["weight_map"].keys() >= {"model.layers.0.self_attn.k_proj.weight", "model.layers.1.mlp.up_proj.bias",
                                          "lm_head.weight"}


def test_greedy_generate_matches_ours(exported):
    for name in ("gpt2", "llama-tied-llama3"):
        _, out = exported(name)
        hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
        # what `pretrain generate --model DIR --temperature 0` runs: the HF directory read back, our generate
        model, tok = load_model(None, str(out), None, model_type="gpt")
        prompt = torch.tensor([tok.encode("the fox")])
        ours = model.eval().generate(prompt, 12, temperature=0, eos_id=tok.special_ids["eod"])
        theirs = hf.generate(prompt, max_new_tokens=12, do_sample=False, attention_mask=torch.ones_like(prompt))
        assert theirs.tolist() == ours.tolist(), name


def test_from_pretrained_points_to_the_hf_loaders(exported):
    _, out = exported("gpt2")
    with pytest.raises(ConfigError, match="is a Hugging Face transformers directory.*init_from hf:"):
        from_pretrained(out)


def test_tokenizer_round_trip(bpe, tmp_path):
    model = GPT(GPTConfig.from_preset("gpt-tiny", vocab_size=bpe.vocab_size)).eval()
    export(write_ckpt(tmp_path / "last.ckpt", model, bpe.to_str()), tmp_path / "hf", format="hf")
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert isinstance(hf, transformers.PreTrainedTokenizerFast)
    for text in ["the quick brown fox", "héllo wörld ✓ 123", "a literal <|endoftext|> is text"]:
        assert hf(text)["input_ids"] == bpe.encode(text), text  # no BOS/EOS added, specials in text are text
        assert hf.decode(bpe.encode(text)) == text
    special = {"eos": "<|endoftext|>", "pad": "<|pad|>", "mask": "<|mask|>", "cls": "<|cls|>", "sep": "<|sep|>"}
    for name, token in special.items():
        assert getattr(hf, f"{name}_token") == token
        assert getattr(hf, f"{name}_token_id") == bpe.special_ids["eod" if name == "eos" else name]
    # and the directory, read back as a source, carries the same tokenizer
    assert source_tokenizer(f"hf:{tmp_path / 'hf'}") == bpe.to_str()


# ---------------------------------------------------------------- import: init_from hf:DIR
def hf_gpt2(**kw):
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=64, n_layer=2, n_head=2,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **kw)
    torch.manual_seed(0)
    return perturbed(transformers.GPT2LMHeadModel(config))


def hf_llama(**kw):
    spec = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6)
    torch.manual_seed(0)
    return perturbed(transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**spec, **kw})))


HF_MODELS = {
    "gpt2": lambda: hf_gpt2(),
    "gpt2-quick-gelu": lambda: hf_gpt2(activation_function="quick_gelu"),
    "llama-gqa-untied-bias": lambda: hf_llama(tie_word_embeddings=False, attention_bias=True, mlp_bias=True,
                                              rope_parameters={"rope_type": "default", "rope_theta": 50_000.0}),
    "llama-tied-llama3": lambda: hf_llama(tie_word_embeddings=True,
                                          rope_parameters={**LLAMA3, "rope_theta": 500_000.0}),
}


def imported(path: str) -> GPT:
    """Our model built from the source's config and filled by load_weights, as a task with init_from does it."""
    model = GPT(config_from_dict(source_config(path)))
    report = load_weights(model, path, SimpleNamespace(global_rank=0), model.tied_weights)
    assert not report.new and not report.dropped
    return model.eval()


@pytest.mark.parametrize("name", list(HF_MODELS))
def test_import_gives_transformers_logits(name, tmp_path):
    hf = HF_MODELS[name]()
    shard = "30KB" if name == "gpt2" else "5GB"  # sharded: GPT-2 here, Llama in the export above
    hf.save_pretrained(tmp_path, max_shard_size=shard)
    assert (tmp_path / "model.safetensors.index.json").exists() == (name == "gpt2")
    model = imported(f"hf:{tmp_path}")
    x = ids()
    with torch.no_grad():
        theirs, ours = hf(x).logits, model(x)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    assert model.transformer.wte.weight.shape[0] == 320  # padded to vocab_multiple, the padding rows zeros
    assert not model.transformer.wte.weight[VOCAB:].any()
    if name == "llama-tied-llama3":  # the scaling is carried over: without it the logits differ
        plain = GPT(config_from_dict({**source_config(f"hf:{tmp_path}"), "rope_scaling": None}))
        plain.load_state_dict(model.state_dict())
        with torch.no_grad():
            assert (plain.eval()(x) - ours).abs().max() > 1e-3


def test_import_into_a_larger_vocabulary(tmp_path):
    """Our special tokens added to a Hugging Face tokenizer give more rows than the source: its rows fill the first
    ones, the added rows keep their fresh init (as transformers' resize_token_embeddings)."""
    hf = hf_llama(vocab_size=256, tie_word_embeddings=False)
    hf.save_pretrained(tmp_path)
    model = GPT(config_from_dict({**source_config(f"hf:{tmp_path}"), "vocab_size": VOCAB}))  # 320 rows, not 256
    fresh = model.transformer.wte.weight[256:].detach().clone()
    report = load_weights(model, f"hf:{tmp_path}", SimpleNamespace(global_rank=0), model.tied_weights)
    assert report.grown == ["lm_head.weight 256 -> 320 rows", "transformer.wte.weight 256 -> 320 rows"]
    assert "grown (the added token rows keep their fresh init)" in "\n".join(report.lines("x"))
    assert torch.equal(model.transformer.wte.weight[256:], fresh)
    x = ids() % 256
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x)[..., :256], hf(x).logits, rtol=0, atol=1e-5)


def test_import_reads_the_older_config_format(tmp_path):
    """Hub files of Llama 3.2 predate transformers 5: rope_theta and rope_scaling at the top level."""
    hf = HF_MODELS["llama-tied-llama3"]()
    hf.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    rope = config.pop("rope_parameters")
    config.update(rope_theta=rope.pop("rope_theta"), rope_scaling=rope)
    (tmp_path / "config.json").write_text(json.dumps(config))
    values = source_config(f"hf:{tmp_path}")
    assert values["rope_theta"] == 500_000.0 and values["rope_scaling"] == LLAMA3 and values["n_kv_head"] == 2
    with torch.no_grad():
        torch.testing.assert_close(imported(str(tmp_path))(ids()), hf(ids()).logits, rtol=0, atol=1e-5)


def test_an_exported_directory_imports_back_exactly(exported):
    for name in OURS:
        model, out = exported(name)
        back = imported(f"hf:{out}")
        want = {k: v for k, v in model.state_dict().items() if k not in model.tied_weights}
        got = back.state_dict()
        for k, v in want.items():  # all but the padding rows of the tables, which the export leaves out
            rows = slice(0, VOCAB) if k in ("transformer.wte.weight", "lm_head.weight") else slice(None)
            torch.testing.assert_close(got[k][rows], v[rows], rtol=0, atol=0, msg=k)


# ---------------------------------------------------------------- what does not map: one line
def test_unsupported_hf_architecture_is_one_line(tmp_path):
    config = transformers.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                        intermediate_size=64)
    transformers.GPTNeoXForCausalLM(config).save_pretrained(tmp_path)
    with pytest.raises(UserError, match="GPTNeoXForCausalLM, which this framework cannot load; supported: "
                                        "GPT2LMHeadModel, LlamaForCausalLM") as e:
        source_config(f"hf:{tmp_path}")
    assert "\n" not in str(e.value)


def test_hf_configs_we_cannot_compute_are_one_line(tmp_path):
    hf_gpt2(activation_function="relu").save_pretrained(tmp_path / "relu")
    with pytest.raises(UserError, match="activation_function='relu'"):
        source_config(f"hf:{tmp_path / 'relu'}")
    hf_llama(head_dim=32).save_pretrained(tmp_path / "head_dim")  # 4 heads of 32 in a 64-wide model
    with pytest.raises(UserError, match="head_dim=32"):
        source_config(f"hf:{tmp_path / 'head_dim'}")
    with pytest.raises(UserError, match="is not a Hugging Face model directory"):
        source_config(f"hf:{tmp_path}")
    hf_gpt2().save_pretrained(tmp_path / "bin")
    (tmp_path / "bin" / "model.safetensors").rename(tmp_path / "bin" / "pytorch_model.bin")
    with pytest.raises(UserError, match="only safetensors"):
        open_checkpoint(f"hf:{tmp_path / 'bin'}").tensors()


@pytest.mark.parametrize("overrides, match", [
    (dict(preset="gpt-tiny", pos_embedding="rope"), "GPT2LMHeadModel needs pos_embedding='learned'; "
                                                    "LlamaForCausalLM needs norm='rmsnorm', mlp='swiglu'"),
    (dict(preset="llama-test", norm="layernorm"), "LlamaForCausalLM needs norm='rmsnorm'"),
    (dict(preset="gpt-moe-test"), "dense MLP"),
])
def test_configs_that_no_hf_architecture_computes_are_refused(overrides, match, tmp_path):
    overrides = dict(overrides)
    model = GPT(GPTConfig.from_preset(overrides.pop("preset"), **overrides))
    with pytest.raises(UserError, match=match) as e:
        export(write_ckpt(tmp_path / "last.ckpt", model, None), tmp_path / "hf", format="hf")
    assert "\n" not in str(e.value) and not (tmp_path / "hf").exists()


def test_the_encoder_is_refused_with_why(tmp_path):
    model = Encoder(EncoderConfig.from_preset("bert-test"))
    with pytest.raises(UserError, match="post-LayerNorm"):
        export(write_ckpt(tmp_path / "last.ckpt", model, None), tmp_path / "hf", format="hf")


# ---------------------------------------------------------------- the command line, and the strategies
def test_cli_export_and_generate(gpt_checkpoint, tmp_path):
    """`pretrain export --format hf` of a real fit's checkpoint, then `pretrain generate` from the directory (in this
    process: the same code as the command line, without its seconds of imports)."""
    from test_fit import run_main

    out = tmp_path / "hf"
    r = run_main("export", str(gpt_checkpoint), str(out), "--format", "hf", "--max-shard-size", "100KB")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "as a Hugging Face GPT2LMHeadModel" in r.stdout and "(step 1)" in r.stdout
    assert (out / "model.safetensors.index.json").exists()
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    tok = transformers.AutoTokenizer.from_pretrained(out)
    prompt = tok("the ", return_tensors="pt")["input_ids"]
    text = tok.decode(hf.generate(prompt, max_new_tokens=12, do_sample=False,
                                  attention_mask=torch.ones_like(prompt))[0], skip_special_tokens=True)
    r = run_main("generate", "--model", str(out), "--prompt", "the ", "--max-new-tokens", "12", "--temperature", "0")
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout == text + "\n"
    r = run_main("export", str(gpt_checkpoint), str(tmp_path / "x"), "--format", "hf", "--max-shard-size", "lots")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--max-shard-size" in r.stderr


@pytest.mark.slow
def test_import_under_ddp_and_zero3(shards, tmp_path):
    """`pretrain fit --model.init_from hf:DIR` on 2 real processes: GPT-2 under DDP, the Llama-style model under
    ZeRO-3 (rank 0 reads each tensor into the gathered parameter); the run starts from transformers' weights."""
    from dist_fit import cli, write_config

    cases = [("ddp", "gpt2", "gpt-tiny")]
    if importlib.util.find_spec("deepspeed") is not None:
        cases.append(("deepspeed_stage_3", "llama-256", "llama-test"))
    for strategy, name, preset in cases:
        tmp = tmp_path / strategy
        tmp.mkdir()
        # under ZeRO-3 a 256-token Llama (untied, biases, GQA) into the data's 261 tokens: the tables grow
        hf = hf_llama(vocab_size=256, tie_word_embeddings=False, attention_bias=True, mlp_bias=True,
                      rope_parameters={"rope_type": "default", "rope_theta": 50_000.0}) if name == "llama-256" \
            else HF_MODELS[name]()
        hf.save_pretrained(tmp / "hf", max_shard_size="30KB")
        values = source_config(f"hf:{tmp / 'hf'}")
        fields = {k: v for k, v in values.items() if k not in ("model_type", "vocab_size", "dropout")}
        probe = {"class_path": "dist_fit.WeightsProbe", "init_args": {"path": str(tmp / "start.pt")}}
        config = write_config(tmp, shards, strategy=strategy, devices=2, max_steps=1, callbacks=[probe])
        r = cli("fit", "--config", str(config), "--model.init_args.preset", preset,
                "--model.init_args.config", json.dumps(fields), "--model.init_args.init_from", f"hf:{tmp / 'hf'}",
                cwd=tmp)
        assert r.returncode == 0, f"{strategy}: {r.stdout[-2000:]}\n{r.stderr[-4000:]}"
        assert "new (fresh init): none" in r.stdout and "dropped (not in this model): none" in r.stdout
        started = torch.load(tmp / "start.pt")["weights"]
        expected = imported(f"hf:{tmp / 'hf'}").state_dict()
        assert set(started) == {k for k in expected if k not in GPT(config_from_dict(values)).tied_weights}
        for k, v in started.items():  # all rows of the source (the added ones keep their fresh init)
            torch.testing.assert_close(v[: len(expected[k])], expected[k], rtol=0, atol=0, msg=f"{strategy} {k}")
        grown = "grown (the added token rows keep their fresh init): lm_head.weight 256 -> 320 rows"
        assert (grown in r.stdout) == (name == "llama-256")
