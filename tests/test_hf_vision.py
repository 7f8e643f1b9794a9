"""Our ViT and CLIP against Hugging Face `transformers` itself (framework.checkpoint.hf_vision), both ways.

Small random-weight models built from a config on either side (nothing is downloaded), every weight moved off its init
so a misplaced tensor shows: our tensors mapped to HF's and written as a directory (safetensors + config.json, as
the export writes it) load with `from_pretrained` into ViTForImageClassification / CLIPModel and give our outputs
(fp32, eval, atol 1e-5); an HF model's `save_pretrained` directory mapped into ours gives HF's. Then the one-line
refusals of what does not map.
"""

from __future__ import annotations

import json
from types import SimpleNamespace
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from framework.checkpoint.consolidate import TensorSource
from framework.checkpoint.export import export
from framework.checkpoint.init_from import load_weights, source_config
from framework.checkpoint.hf_vision import (caption_tokenizer_json, export_tensors, hf_config, import_tensors,
                                             our_config)
from framework.checkpoint.safetensors_stream import save_safetensors
from framework.errors import UserError
from framework.models import CLIP, CLIPConfig, ViT, ViTConfig, config_from_dict
from framework.models.classifier import frame_documents
from framework.data.tokenizer import Tokenizer, bytes_tokenizer

transformers = pytest.importorskip(
    "transformers", reason="transformers is not installed: bash launch/setup.sh puts it in .venv/reference")
from test_hf import perturbed  # noqa: E402 - every weight moved off its init, so a misplaced tensor shows
transformers.logging.set_verbosity_error()  # its "some weights were not used" would hide nothing here: checked below

ATOL = 1e-5
VIT = dict(image_size=32, patch_size=8, n_layer=2, n_head=2, n_embd=64, num_classes=5)
BYTE_IDS = {"eod": 256, "pad": 257, "cls": 259, "sep": 260}


def images(B: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(B, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def captions(B: int = 3, L: int = 12, vocab: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    lengths = torch.tensor([L, 3, 7][:B])  # one full-length caption: no padding in that row
    return torch.randint(0, vocab, (B, L), generator=g), lengths


def sources(model: torch.nn.Module) -> list[TensorSource]:
    return [TensorSource(k, tuple(v.shape), v.dtype, lambda v=v: v) for k, v in model.state_dict().items()]


def write_hf(out: Path, config: dict, tensors: list[TensorSource]) -> Path:
    """An HF directory as the export writes one: model.safetensors streamed from the sources, config.json."""
    out.mkdir()
    save_safetensors(out / "model.safetensors", tensors, metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config))
    return out


def read_hf(directory: Path) -> tuple[dict, list[TensorSource]]:
    """(config.json, the tensors of model.safetensors, each read when asked for)."""
    file = str(directory / "model.safetensors")
    with safe_open(file, framework="pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}

    def read(key: str) -> torch.Tensor:
        with safe_open(file, framework="pt") as f:
            return f.get_tensor(key)

    return (json.loads((directory / "config.json").read_text()),
            [TensorSource(k, s, torch.float32, lambda k=k: read(k)) for k, s in shapes.items()])


def ours_from(values: dict, tensors: list[TensorSource]) -> torch.nn.Module:
    config = config_from_dict(values)
    with torch.device("meta"):
        model = {"vit": ViT, "clip": CLIP}[config.model_type](config)
    model.load_state_dict({s.name: s.load() for s in tensors}, strict=True, assign=True)
    return model.eval()


def hf_load(cls: type, directory: Path) -> torch.nn.Module:
    model, info = cls.from_pretrained(directory, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model.eval()


def clip_config(image: dict | None = None, text: dict | None = None, **overrides) -> CLIPConfig:
    return CLIPConfig.from_preset("clip-test", image={"ln_pre": True, **(image or {})}, text=text or {}, **overrides)


def our_clip_outputs(model: CLIP, pixels: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor):
    image_emb, text_emb, scale = model(pixels, tokens, lengths)
    return image_emb, text_emb, scale * image_emb @ text_emb.t()  # (B, E), (B, E), logits per image (B, B)


# ------------------------------------------------------------------------------------------------------------ export
@pytest.mark.parametrize("overrides", [{}, {"bias": False}, {"patch_bias": False, "dropout": 0.1},
                                       {"mlp": "gelu_exact", "norm_eps": 1e-12}])  # Google's ViT's activation, eps
def test_vit_export_loads_in_transformers_and_gives_our_logits(tmp_path, overrides):
    torch.manual_seed(0)
    model = perturbed(ViT(ViTConfig(**VIT, **overrides)))
    config = hf_config(model.config, labels=list("abcde"))
    out = write_hf(tmp_path / "hf", config, export_tensors(model.config, sources(model)))
    hf = hf_load(transformers.ViTForImageClassification, out)
    assert hf.config.id2label[4] == "e"
    assert hf.config.hidden_act == {"gelu_exact": "gelu"}.get(overrides.get("mlp"), "gelu_pytorch_tanh")
    with torch.no_grad():
        torch.testing.assert_close(hf(pixel_values=images()).logits, model(images()), atol=ATOL, rtol=0)
    if not overrides:  # the config round trip is exact (without biases, HF's are zeros: ours comes back with them)
        assert config_from_dict(our_config(config)) == model.config


@pytest.mark.parametrize("image, text, scale", [
    ({}, {}, None),  # clip-test's byte vocabulary: 261 tokens in a table padded to 320
    ({"bias": False}, {"bias": False, "mlp_hidden": 96, "norm_eps": 1e-6}, 5.0),  # exp(5) > 100: HF gets the cap
    ({"patch_bias": False}, {"vocab_size": 320}, None),  # OpenAI's layout: no patch bias; an unpadded table
])
def test_clip_export_loads_in_transformers_and_gives_our_embeddings_and_logits(tmp_path, image, text, scale):
    torch.manual_seed(0)
    model = perturbed(CLIP(clip_config(image, text)))
    if scale is not None:
        with torch.no_grad():
            model.logit_scale.fill_(scale)
    out = write_hf(tmp_path / "hf", hf_config(model.config), export_tensors(model.config, sources(model)))
    hf = hf_load(transformers.CLIPModel, out)
    tokens, lengths = captions()
    framed = frame_documents(tokens, lengths, model.config.special_ids, causal=True)[0]  # caption, eod, padding
    with torch.no_grad():
        theirs = hf(input_ids=framed, pixel_values=images())
        ours = our_clip_outputs(model, images(), tokens, lengths)
    for a, b in zip((theirs.image_embeds, theirs.text_embeds, theirs.logits_per_image), ours):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
    assert float(hf.logit_scale.detach().exp()) == pytest.approx(min(math.exp(model.logit_scale.item()), 100.0))


def test_the_exported_caption_tokenizer_frames_captions_as_ours(tmp_path):
    """tokenizer(captions, padding=True) with the export's tokenizer gives our framed ids: CLIPModel then gives our
    embeddings from raw text."""
    from framework.data.tokenizer import SPECIAL_TOKENS, Tokenizer, bytes_tokenizer

    ours_tok = Tokenizer(bytes_tokenizer())
    torch.manual_seed(0)
    model = perturbed(CLIP(clip_config()))
    texts = ["a small red triangle at the top left", "a blue circle", "<|endoftext|> is text here"]
    encoded = [ours_tok.encode(t)[:20] for t in texts]
    lengths = torch.tensor([len(e) for e in encoded])
    pad = model.config.special_ids["pad"]  # what follows a caption does not matter (causal), but is compared here
    tokens = torch.tensor([e + [pad] * (int(lengths.max()) - len(e)) for e in encoded])
    framed = frame_documents(tokens, lengths, model.config.special_ids, causal=True)[0]
    file = tmp_path / "tokenizer.json"
    file.write_text(caption_tokenizer_json(ours_tok.to_str(), SPECIAL_TOKENS["eod"]))
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(file), pad_token=SPECIAL_TOKENS["pad"],
                                                  eos_token=SPECIAL_TOKENS["eod"], split_special_tokens=True)
    ids = hf_tok(texts, padding=True, truncation=True, max_length=21, return_tensors="pt")["input_ids"]
    assert torch.equal(ids, framed)
    out = write_hf(tmp_path / "hf", hf_config(model.config), export_tensors(model.config, sources(model)))
    with torch.no_grad():
        theirs = hf_load(transformers.CLIPModel, out).get_text_features(input_ids=ids).pooler_output
        torch.testing.assert_close(torch.nn.functional.normalize(theirs, dim=-1),
                                   model.encode_text(tokens, lengths), atol=ATOL, rtol=0)
    with pytest.raises(UserError, match="has no <\\|eot\\|> token"):
        caption_tokenizer_json(ours_tok.to_str(), "<|eot|>")


# ------------------------------------------------------------------------------------------------------------ import
def hf_vit_config(**overrides) -> "transformers.ViTConfig":
    values = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256, image_size=32,
                  patch_size=8, num_labels=4, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-5)
    return transformers.ViTConfig(**{**values, **overrides})


@pytest.mark.parametrize("qkv_bias, num_labels, public", [(True, 4, False), (False, 0, False), (True, 3, True)])
def test_a_transformers_vit_imports_and_gives_its_logits(tmp_path, monkeypatch, qkv_bias, num_labels, public):
    """num_labels 0: no classifier, the cls features. public: ViTConfig's own activation and eps (the erf GELU, 1e-12),
    those of Google's checkpoints."""
    torch.manual_seed(0)
    layout = dict(hidden_act="gelu", layer_norm_eps=1e-12) if public else {}
    hf = perturbed(transformers.ViTForImageClassification(hf_vit_config(qkv_bias=qkv_bias, num_labels=num_labels,
                                                                        **layout)))
    hf.save_pretrained(tmp_path)
    config, tensors = read_hf(tmp_path)
    with monkeypatch.context() as m:  # no model is built (under ZeRO-3's zero.Init that would partition it)
        m.setattr(ViT, "__init__", lambda *a, **k: pytest.fail("import_tensors built a model"))
        ours_tensors = import_tensors(config, tensors)
    ours = ours_from(our_config(config), ours_tensors)
    assert ours.config.num_classes == num_labels and not ours.config.ln_pre
    with torch.no_grad():
        torch.testing.assert_close(ours(images()), hf(pixel_values=images()).logits, atol=ATOL, rtol=0)


def test_vit_import_reads_transformers_5_module_names_too(tmp_path):
    """A file written from the module's state_dict (vit.layers.N.attention.q_proj, ...), not by save_pretrained."""
    torch.manual_seed(0)
    hf = perturbed(transformers.ViTForImageClassification(hf_vit_config()))
    state = hf.state_dict()
    assert "vit.layers.0.attention.q_proj.weight" in state
    out = write_hf(tmp_path / "hf", {**hf.config.to_dict(), "architectures": ["ViTForImageClassification"]},
                   sources(hf))
    config, tensors = read_hf(out)
    ours = ours_from(our_config(config), import_tensors(config, tensors))
    with torch.no_grad():
        torch.testing.assert_close(ours(images()), hf(pixel_values=images()).logits, atol=ATOL, rtol=0)


def hf_clip_config(**text) -> "transformers.CLIPConfig":
    text = dict(dict(vocab_size=300, hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=2,
                     max_position_embeddings=20, hidden_act="gelu_pytorch_tanh", eos_token_id=299, pad_token_id=0,
                     bos_token_id=298), **text)
    return transformers.CLIPConfig(
        text_config=text,
        vision_config=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8, hidden_act="gelu_pytorch_tanh"),
        projection_dim=16)


@pytest.mark.parametrize("activation", ["gelu_pytorch_tanh", "quick_gelu"])  # ours; OpenAI's CLIP's (the default)
def test_a_transformers_clip_imports_and_gives_its_embeddings_and_logits(tmp_path, activation):
    torch.manual_seed(0)
    config = hf_clip_config(hidden_act=activation)
    config.vision_config.hidden_act = activation
    hf = perturbed(transformers.CLIPModel(config))
    hf.save_pretrained(tmp_path)
    config, tensors = read_hf(tmp_path)
    values = our_config(config)
    assert values["special_ids"] == {"eod": 299, "pad": 0} and values["text"]["mlp_hidden"] == 192
    assert our_config({**config, "architectures": None}) == values  # no class named: model_type's (AutoModel's)
    ours = ours_from(values, import_tensors(config, tensors))
    assert ours.config.image["ln_pre"] and not ours.config.image["patch_bias"]
    assert ours.text.wte.weight.shape == (320, 64) and not ours.text.wte.weight[300:].any()  # zero padding rows
    tokens, lengths = captions(vocab=298)  # no id of a caption is the eos id
    framed = frame_documents(tokens, lengths, ours.config.special_ids, causal=True)[0]
    with torch.no_grad():
        theirs = hf(input_ids=framed, pixel_values=images())
        mine = our_clip_outputs(ours, images(), tokens, lengths)
    for a, b in zip(mine, (theirs.image_embeds, theirs.text_embeds, theirs.logits_per_image)):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
    # HF does not cap the scale, ours does (at 100): a larger one is refused when it is read, not clamped
    big = [TensorSource(s.name, s.shape, s.dtype, lambda: torch.tensor(5.0)) if s.name == "logit_scale" else s
           for s in tensors]
    scale = next(s for s in import_tensors(config, big) if s.name == "logit_scale")
    with pytest.raises(UserError, match="exp\\(logit_scale\\) = 148.413, above our cap max_logit_scale=100"):
        scale.load()


# ------------------------------------------------------------------------------------------------------------ sizes
def test_clip_vit_b_16_has_exactly_openais_and_transformers_parameter_count():
    hf_config_b16 = transformers.CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                         num_attention_heads=8, max_position_embeddings=77),
        vision_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                           image_size=224, patch_size=16), projection_dim=512)
    with torch.device("meta"):
        ours = CLIP(CLIPConfig.from_preset("clip-vit-b-16"))
        theirs = transformers.CLIPModel(hf_config_b16)
    assert ours.num_params() == sum(p.numel() for p in theirs.parameters()) == 149_620_737
    # and the mapping places every tensor: the meta shapes of our export are HF's
    mapped = {s.name: s.shape for s in export_tensors(ours.config, sources(ours))}
    assert mapped == {k: tuple(v.shape) for k, v in theirs.state_dict().items()}


# ------------------------------------------------------------------------------------------------------------ refusals
@pytest.mark.parametrize("config, message", [
    (ViTConfig(**{**VIT, "pooling": "mean"}), "ViTForImageClassification.*pooling='mean' \\(Hugging Face's ViT and "
                                              "CLIP pool the final cls token\\)"),
    (ViTConfig(**{**VIT, "num_classes": 0}), "num_classes=0: a ViT without its head .* fine-tune it with one "
                                             "\\(configs/vision/linear-probe.yaml"),
    (ViTConfig(**VIT, ln_pre=True), "ln_pre=true \\(ViTForImageClassification has no LayerNorm before"),
    (CLIPConfig.from_preset("clip-test"), "CLIPModel.*image.ln_pre=false \\(CLIPModel normalizes the image "
                                          "embeddings .* train with image.ln_pre=true"),
    (clip_config({"pooling": "mean"}), "image.pooling='mean'"),
    (CLIPConfig.from_preset("clip-test", image={"model_type": "resnet"}),
     "a 'resnet' image tower \\(CLIPModel's image tower is a ViT"),
    (clip_config(text={"model_type": "bert", "vocab_size": 261, "seq_len": 32, "n_layer": 1, "n_head": 2,
                       "n_embd": 64}), "a 'bert' text tower \\(CLIPModel's text tower is causal"),
    (clip_config(text={"pos_embedding": "rope"}), "text.pos_embedding='rope' \\(CLIPModel's text tower has learned"),
    (clip_config(text={"norm": "rmsnorm", "mlp": "swiglu"}), "text.norm='rmsnorm'.*text.mlp='swiglu'"),
    (clip_config(special_ids={"eod": 2, "pad": 257}), "special_ids.eod=2 \\(transformers reads eos_token_id 2"),
])
def test_export_refuses_what_transformers_would_compute_differently_in_one_line(config, message):
    for call in (lambda: hf_config(config), lambda: export_tensors(config, [])):
        with pytest.raises(UserError, match=message) as e:
            call()
        assert "\n" not in str(e.value) and "export it without --format hf" in str(e.value)


def test_export_refuses_a_checkpoint_that_lacks_a_tensor():
    model = ViT(ViTConfig(**VIT, bias=False))  # its biases are HF's zeros; a missing weight or the head's bias is not
    for name in ("blocks.1.attn.c_proj.weight", "head.bias"):
        with pytest.raises(UserError, match=f"the checkpoint lacks {name}, which its vit config has"):
            export_tensors(model.config, [s for s in sources(model) if s.name != name])


@pytest.mark.parametrize("config, message", [
    (hf_vit_config(hidden_act="relu"), "hidden_act='relu' is none of the activations our blocks compute"),
    (hf_vit_config(intermediate_size=100), "intermediate_size=100 \\(our ViT's MLP is 4 x hidden_size = 256\\)"),
    (hf_clip_config(eos_token_id=2), "text_config.eos_token_id=2 \\(an old CLIP config"),
    (hf_clip_config(eos_token_id=500), "special_ids\\['eod'\\]=500 is not a token id"),
])
def test_import_refuses_configs_we_cannot_compute_in_one_line(config, message):
    values = {**config.to_dict(), "architectures": [config.model_type == "vit" and "ViTForImageClassification"
                                                    or "CLIPModel"]}
    with pytest.raises(UserError, match=message) as e:
        our_config(values)
    assert "\n" not in str(e.value)


def test_import_refuses_other_architectures_and_damaged_files(tmp_path):
    with pytest.raises(UserError, match="a Hugging Face ViTModel is not one of the image models this framework loads"):
        our_config({**hf_vit_config().to_dict(), "architectures": ["ViTModel"]})
    torch.manual_seed(0)
    hf = transformers.ViTForImageClassification(hf_vit_config())
    hf.save_pretrained(tmp_path)
    config, tensors = read_hf(tmp_path)
    with pytest.raises(UserError, match="lack tensor vit.encoder.layer.1.attention.attention.query.weight"):
        import_tensors(config, [s for s in tensors if s.name != "vit.encoder.layer.1.attention.attention.query.weight"])
    extra = TensorSource("vit.pooler.dense.bias", (64,), torch.float32, lambda: torch.zeros(64))
    with pytest.raises(UserError, match="have tensors that their config.json's ViTForImageClassification does not "
                                        "\\(vit.pooler.dense.bias\\)"):
        import_tensors(config, tensors + [extra])
    narrow = [TensorSource(s.name, (64, 32), s.dtype, s.load) if s.name.endswith("0.attention.attention.key.weight")
              else s for s in tensors]
    with pytest.raises(UserError, match="have shapes \\(64, 64\\), \\(64, 32\\), \\(64, 64\\), which do not "
                                        "fit together"):
        import_tensors(config, narrow)


# ------------------------------------------------------------------------- through `pretrain export` and init_from
def ckpt_of(model, path, tokenizer_json=None):
    torch.save({"state_dict": {"model." + k: v for k, v in model.state_dict().items()},
                "model_config": model.config.to_dict(), "global_step": 1, "tokenizer_json": tokenizer_json}, path)
    return path


def test_vit_and_clip_export_and_import_through_the_core(tmp_path):
    torch.manual_seed(0)
    vit = perturbed(ViT(ViTConfig(**VIT)))
    out = tmp_path / "vit-hf"
    summary = export(ckpt_of(vit, tmp_path / "vit.ckpt"), out, format="hf")
    assert summary["architecture"] == "ViTForImageClassification"
    hf = transformers.ViTForImageClassification.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(pixel_values=images()).logits, vit(images()), atol=1e-5, rtol=0)
    back = ViT(config_from_dict(source_config(f"hf:{out}")))
    report = load_weights(back, f"hf:{out}", SimpleNamespace(global_rank=0), ())
    assert not report.new and not report.dropped
    with torch.no_grad():
        torch.testing.assert_close(back.eval()(images()), vit(images()), atol=1e-5, rtol=0)

    clip = perturbed(CLIP(clip_config()))
    out = tmp_path / "clip-hf"
    tok = Tokenizer(bytes_tokenizer())
    assert export(ckpt_of(clip, tmp_path / "clip.ckpt", tok.to_str()), out, format="hf")["architecture"] == "CLIPModel"
    hf = transformers.CLIPModel.from_pretrained(out).eval()
    texts = ["a red square", "a small blue circle at the top"]
    enc = [tok.encode(t) for t in texts]
    lengths = torch.tensor([len(e) for e in enc])
    tokens = torch.tensor([e + [257] * (int(lengths.max()) - len(e)) for e in enc])
    framed = frame_documents(tokens, lengths, clip.config.special_ids, causal=True)[0]
    auto = transformers.AutoTokenizer.from_pretrained(out)
    assert torch.equal(auto(texts, padding=True, return_tensors="pt")["input_ids"], framed)
    images2 = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = hf(input_ids=framed, pixel_values=images2)
        ours = our_clip_outputs(clip, images2, tokens, lengths)
    for a, b in zip((theirs.image_embeds, theirs.text_embeds, theirs.logits_per_image), ours):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    back = CLIP(config_from_dict(source_config(f"hf:{out}")))
    report = load_weights(back, f"hf:{out}", SimpleNamespace(global_rank=0), ())
    assert not report.new and not report.dropped
    with torch.no_grad():
        for a, b in zip(our_clip_outputs(back.eval(), images2, tokens, lengths), ours):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)

    with pytest.raises(UserError, match="image.ln_pre=false"):
        export(ckpt_of(perturbed(CLIP(CLIPConfig.from_preset("clip-test"))), tmp_path / "c2.ckpt"), tmp_path / "x",
               format="hf")
    (tmp_path / "odd").mkdir()
    hf_vit_config(hidden_act="relu").save_pretrained(tmp_path / "odd")
    with pytest.raises(UserError, match="odd'.*hidden_act='relu'"):
        source_config(f"hf:{tmp_path / 'odd'}")
