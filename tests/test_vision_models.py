"""The vision families (ViT, ResNet) and CLIP: configs, shapes, files, FLOPs, init under a gather, CLIP's
negative-keeping gradient accumulation and its caption pooling. Tiny presets only: the file runs in seconds."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch
import torch.nn as nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from framework.models import from_pretrained
from framework.models.registry import family as lookup
from framework.models.clip import CLIP, CLIPConfig
from framework.models.encoder import EncoderConfig
from framework.models.resnet import ResNet, ResNetConfig, Stage
from framework.models.transformer import ConfigError
from framework.models.vit import ViT, ViTConfig
from framework.objectives.contrastive import clip_loss

TINY = {"vit": ("vit-test", ViT, ViTConfig), "resnet": ("resnet-test", ResNet, ResNetConfig),
        "clip": ("clip-test", CLIP, CLIPConfig)}


def tiny(family: str, **overrides):
    preset, model_class, config_class = TINY[family]
    torch.manual_seed(0)
    return model_class(config_class.from_preset(preset, **overrides))


def images(B: int = 3, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(B, 3, size, size, generator=torch.Generator().manual_seed(seed))


def captions(B: int = 3, L: int = 12, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, L + 1, (B,), generator=g)
    lengths[0] = L  # one full-length caption: no room to spare
    return torch.randint(0, 256, (B, L), generator=g), lengths


# ------------------------------------------------------------------------------------------------------------ config
def test_presets_are_listed_and_every_one_builds_on_meta():
    assert ViTConfig.presets() == ["vit-test", "vit-cpu", "vit-tiny/16", "vit-small/16", "vit-base/16"]
    assert ResNetConfig.presets() == ["resnet-test", "resnet-cpu", "resnet18", "resnet50"]
    assert CLIPConfig.presets() == ["clip-test", "clip-cpu", "clip-vit-b-16"]
    for _, model_class, config_class in TINY.values():
        for name in config_class.presets():
            config = config_class.from_preset(name)
            assert config_class.from_dict(config.to_dict()) == config  # the dict round trip is exact
            with torch.device("meta"):
                assert model_class(config).num_params() > 0


@pytest.mark.parametrize("name, millions", [("vit-tiny/16", 5.72), ("vit-small/16", 22.05), ("vit-base/16", 86.57),
                                            ("resnet18", 11.69), ("clip-vit-b-16", 149.62)])
def test_param_counts_of_the_published_sizes(name, millions):
    family = name.split("-")[0].removesuffix("18")
    _, model_class, config_class = TINY[family]
    with torch.device("meta"):
        model = model_class(config_class.from_preset(name))
    assert model.num_params() / 1e6 == pytest.approx(millions, abs=0.01)


def test_resnet50_matches_torchvisions_parameter_count_and_macs():
    with torch.device("meta"):
        model = ResNet(ResNetConfig.from_preset("resnet50", num_classes=1000))
    assert model.num_params() == 25_557_032  # torchvision.models.resnet50
    assert model.macs() / 1e9 == pytest.approx(4.09, abs=0.005)  # the 4.1 GMACs every paper quotes at 224 px
    assert model.feature_dim == 2048


@pytest.mark.parametrize("config_class, values, message", [
    (ViTConfig, dict(n_embd=100, n_head=3), "ViTConfig.n_embd=100 must be divisible by n_head=3"),
    (ViTConfig, dict(image_size=30, patch_size=8), "ViTConfig.image_size=30 must be a multiple of patch_size=8"),
    (ViTConfig, dict(dropout=1.0), "ViTConfig.dropout=1.0 must be a number in [0, 1)"),
    (ViTConfig, dict(patch_size=0), "ViTConfig.patch_size=0 must be a positive integer"),
    (ViTConfig, dict(num_classes=-1), "ViTConfig.num_classes=-1 must be an integer >= 0"),
    (ViTConfig, dict(pooling="avg"), "ViTConfig.pooling='avg' is not one of 'cls', 'mean'"),
    (ViTConfig, dict(n_embed=64), "unknown ViTConfig field 'n_embed' (did you mean 'n_embd'?)"),
    (ViTConfig, dict(ln_pre="yes"), "ViTConfig.ln_pre='yes' must be true or false"),
    (ViTConfig, dict(patch_bias=None), "ViTConfig.patch_bias=None must be true or false"),
    (ResNetConfig, dict(layers=[2, 2, 2]), "ResNetConfig.layers=[2, 2, 2] must be 4 positive integers"),
    (ResNetConfig, dict(block="bottleneckk"), "ResNetConfig.block='bottleneckk' is not one of 'basic', 'bottleneck' "
                                              "(did you mean 'bottleneck'?)"),
    (ResNetConfig, dict(stem="cifar"), "ResNetConfig.stem='cifar' is not one of 'imagenet', 'small'"),
    (ResNetConfig, dict(width=0), "ResNetConfig.width=0 must be a positive integer"),
    (ResNetConfig, dict(zero_init_residual="yes"), "ResNetConfig.zero_init_residual='yes' must be true or false"),
    (ResNetConfig, dict(widht=8), "unknown ResNetConfig field 'widht' (did you mean 'width'?)"),
    (CLIPConfig, dict(text={"n_head": 3}), "CLIPConfig.text: GPTConfig.n_embd=64 must be divisible by n_head=3"),
    (CLIPConfig, dict(image={"patch_sise": 4}), "CLIPConfig.image: unknown ViTConfig field 'patch_sise' (did you mean "
                                                "'patch_size'?)"),
    (CLIPConfig, dict(text={"model_type": "t5"}), "CLIPConfig.text.model_type='t5' must be one of gpt, bert"),
    (CLIPConfig, dict(special_ids={"pad": 0}), "CLIPConfig.special_ids lacks ['eod']"),
    (CLIPConfig, dict(text={"vocab_size": 256}), "CLIPConfig.special_ids['eod']=256 is not a token id"),
    (CLIPConfig, dict(embed_dim=0), "CLIPConfig.embed_dim=0 must be a positive integer"),
    (CLIPConfig, dict(max_logit_scale=10.0), "exp(init_logit_scale)=14.29 must be at most max_logit_scale=10.0"),
    (CLIPConfig, dict(embed=32), "unknown CLIPConfig field 'embed' (did you mean 'embed_dim'?)"),
])
def test_config_errors_name_the_field_and_the_fix(config_class, values, message):
    preset = {ViTConfig: "vit-test", ResNetConfig: "resnet-test", CLIPConfig: "clip-test"}[config_class]
    with pytest.raises(ConfigError) as e:
        config_class.from_preset(preset, **values)
    assert message in str(e.value)


def test_unknown_presets_suggest_the_closest():
    with pytest.raises(ConfigError, match="unknown ResNet preset 'resnet5' \\(did you mean 'resnet50'\\?\\)"):
        ResNetConfig.from_preset("resnet5")
    with pytest.raises(ConfigError, match="unknown CLIP preset 'clip-vit-b16' \\(did you mean 'clip-vit-b-16'\\?\\)"):
        CLIPConfig.from_preset("clip-vit-b16", text={"vocab_size": 300})


def test_clip_from_preset_merges_tower_overrides_key_by_key():
    config = CLIPConfig.from_preset("clip-test", text={"vocab_size": 300, "n_layer": 1}, embed_dim=16)
    assert (config.text["vocab_size"], config.text["n_layer"], config.text["n_embd"]) == (300, 1, 64)
    assert config.image["num_classes"] == 0 and config.image["image_size"] == 32  # forced to a feature tower
    resnet = ResNetConfig.from_preset("resnet-test").to_dict()
    config = CLIPConfig.from_preset("clip-test", image=resnet)  # another family replaces the tower
    assert config.image == {**resnet, "num_classes": 0}
    assert CLIPConfig.from_dict(config.to_dict()) == config
    assert isinstance(CLIP(config).visual, ResNet)


# ------------------------------------------------------------------------------------------------------------ shapes
@pytest.mark.parametrize("family, overrides", [
    ("vit", {}), ("vit", {"pooling": "mean", "bias": False}),
    ("resnet", {}), ("resnet", {"block": "bottleneck", "stem": "imagenet"}),
])
def test_forward_and_features_shapes(family, overrides):
    model = tiny(family, **overrides)
    x = images(3)
    assert model(x).shape == (3, 10)
    assert model.features(x).shape == (3, model.feature_dim)
    tower = tiny(family, num_classes=0, **overrides)  # no head: forward is the features
    assert isinstance(tower.head, nn.Identity) and tower(x).shape == (3, tower.feature_dim)
    assert not any("head" in name for name in tower.state_dict())
    if family == "resnet":
        assert [type(s) for s in model.stages] == [Stage] * 4
        assert model.feature_dim == 8 * 8 * (4 if overrides.get("block") == "bottleneck" else 1)


def test_vit_ln_pre_normalizes_the_embeddings_before_the_first_block_and_patch_bias_can_go():
    plain, clip_like = tiny("vit"), tiny("vit", ln_pre=True, patch_bias=False)
    names = set(plain.state_dict())
    assert "patch_embed.bias" in names and not any(n.startswith("ln_pre.") for n in names)
    assert set(clip_like.state_dict()) == names - {"patch_embed.bias"} | {"ln_pre.weight", "ln_pre.bias"}
    assert plain.num_params() - clip_like.num_params() == 64 - 2 * 64  # less a patch bias, plus a LayerNorm
    for model, invariant in ((clip_like, True), (tiny("vit", ln_pre=True, patch_bias=False, bias=False), True),
                             (plain, False)):
        model.eval()
        embeddings = [model.patch_embed.weight, model.cls_token, model.pos_embed]
        embeddings += [model.patch_embed.bias] if model.patch_embed.bias is not None else []
        outputs = []
        for scale in (100, 10):  # every embedding x 100 (far above LayerNorm's eps), then x 10 more
            with torch.no_grad():
                for p in embeddings:
                    p.mul_(scale)
                outputs.append(model.tokens(images(2)))
        # only a LayerNorm before the first block makes the second scaling invisible
        assert torch.allclose(*outputs, atol=1e-5) == invariant


@pytest.mark.parametrize("family", ["vit", "clip"])
def test_files_written_before_ln_pre_and_patch_bias_existed_still_load(tmp_path, family):
    model = tiny(family).eval()
    model.save_pretrained(tmp_path)
    values = json.loads((tmp_path / "config.json").read_text())
    vit = values["image"] if family == "clip" else values
    for key in ("ln_pre", "patch_bias"):  # what an older config.json lacks
        del vit[key]
    (tmp_path / "config.json").write_text(json.dumps(values))
    loaded = from_pretrained(tmp_path).eval()
    assert loaded.config == model.config
    inputs = (images(2), *captions(2)) if family == "clip" else (images(2),)
    out, ref = loaded(*inputs), model(*inputs)
    assert all(torch.equal(a, b) for a, b in zip(out, ref)) if family == "clip" else torch.equal(out, ref)


def test_vit_refuses_images_of_another_size():
    with pytest.raises(ValueError, match="expected images of shape \\(batch, 3, 32, 32\\), got \\(2, 3, 64, 64\\)"):
        tiny("vit")(images(2, size=64))


def test_clip_forward_shapes_and_one_tower_at_a_time():
    model = tiny("clip")
    tokens, lengths = captions(3)
    image_emb, text_emb, scale = model(images(3), tokens, lengths)
    assert image_emb.shape == text_emb.shape == (3, 32)
    torch.testing.assert_close(image_emb.norm(dim=-1), torch.ones(3))  # unit vectors
    torch.testing.assert_close(text_emb.norm(dim=-1), torch.ones(3))
    assert float(scale.detach()) == pytest.approx(1 / 0.07)
    only_text = model(None, tokens, lengths)
    assert only_text[0] is None and torch.equal(only_text[1], text_emb)
    assert model(images(3), None)[1] is None


def test_clip_scale_is_capped_and_gets_no_gradient_above_the_cap():
    model = tiny("clip")
    with torch.no_grad():
        model.logit_scale.fill_(5.0)  # exp(5) = 148 > 100
    scale = model.scale()
    scale.backward()
    assert float(scale.detach()) == 100.0 and float(model.logit_scale.grad) == 0.0


# ------------------------------------------------------------------------------------------------------------ files
@pytest.mark.parametrize("family", ["vit", "resnet", "clip"])
def test_save_pretrained_then_from_pretrained_gives_identical_outputs(tmp_path, family):
    model = tiny(family).eval()
    if family == "resnet":  # non-trivial BN statistics and residual branches, so the buffers are checked too
        model.train()
        model(images(8))
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight)
        model.eval()
    inputs = (images(2), *captions(2)) if family == "clip" else (images(2),)
    model.save_pretrained(tmp_path)
    loaded = from_pretrained(tmp_path).eval()
    assert type(loaded) is type(model) and loaded.config == model.config and lookup(family).tied_in(model.config) == ()
    for a, b in zip(model(*inputs) if family == "clip" else [model(*inputs)],
                    loaded(*inputs) if family == "clip" else [loaded(*inputs)]):
        assert torch.equal(a, b)
    assert type(model).from_pretrained(tmp_path).config == model.config
    other = next(f for f in ("vit", "resnet") if f != family)
    with pytest.raises(ConfigError, match=f"holds a {family!r} model, not a {other!r} one"):
        lookup(other).model_class.from_pretrained(tmp_path)


# ------------------------------------------------------------------------------------------------------------ FLOPs
def counted_forward_flops(model: nn.Module, *inputs) -> int:
    """What torch's counter sees in one forward (math attention, so its matmuls are visible as matmuls)."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.no_grad():
        model(*inputs)
    return counter.get_total_flops()


@pytest.mark.parametrize("family, overrides", [
    ("vit", {}), ("vit", {"num_classes": 0}),
    ("resnet", {}), ("resnet", {"block": "bottleneck", "stem": "imagenet"}),
])
def test_flops_are_three_forwards_of_what_torchs_counter_sees(family, overrides):
    # FlopCounterMode counts only convolutions and matmuls (BN, ReLU, pooling, LayerNorm and the adds are not
    # counted by it either), so our matmul/conv-only count agrees exactly, ResNet included.
    model = tiny(family, **overrides)
    assert model.flops(4) == 3 * counted_forward_flops(model, images(4))


@pytest.mark.parametrize("text", ["gpt", "bert"])
def test_clip_flops_match_torchs_counter(text):
    overrides = {} if text == "gpt" else {"text": {**EncoderConfig.from_preset("bert-test", vocab_size=261, seq_len=32)
                                                   .to_dict()}}
    model = tiny("clip", **overrides)
    tokens, lengths = captions(4, L=10)
    assert model.flops(4, tokens.numel()) == 3 * counted_forward_flops(model, images(4), tokens, lengths)


# ------------------------------------------------------------------------------------------------------------ init
@pytest.mark.parametrize("family, overrides", [("vit", {}), ("resnet", {}), ("clip", {}),
                                               ("clip", {"image": ResNetConfig.from_preset("resnet-test").to_dict()})])
def test_init_weights_gathers_every_parameter_and_is_deterministic(family, overrides):
    """The ZeRO-3 path: init_weights(gather) must enter gather(m) around every module whose own parameters it sets."""
    model = tiny(family, **overrides)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gathered: set[int] = set()

    def gather(module: nn.Module) -> contextlib.AbstractContextManager:
        gathered.add(id(module))
        return contextlib.nullcontext()

    torch.manual_seed(0)
    model.init_weights(gather=gather)
    for name, module in model.named_modules():
        if any(True for _ in module.parameters(recurse=False)):
            assert id(module) in gathered, f"{name or 'the root'} was initialized without its gather"
    torch.manual_seed(0)
    model.init_weights()
    after = model.state_dict()
    torch.manual_seed(0)
    model.init_weights(gather=gather)
    assert all(torch.equal(after[k], v) for k, v in model.state_dict().items())  # gather changes nothing else
    assert before.keys() == after.keys()


def test_init_zero_starts():
    vit = tiny("vit")
    assert not vit.head.weight.any() and not vit.head.bias.any()  # the first logits are 0: loss starts at log K
    resnet = tiny("resnet")
    assert all(not block.last_bn.weight.any() for stage in resnet.stages for block in stage)
    x = images(4)
    # every residual branch starts at 0: a block is relu(shortcut(x)) at first
    block = resnet.stages[1][0]
    torch.testing.assert_close(block(resnet.stages[0](resnet.stem(x))),
                               torch.relu(block.downsample(resnet.stages[0](resnet.stem(x)))))
    assert tiny("resnet", zero_init_residual=False).stages[0][0].bn2.weight.all()


# ------------------------------------------------------------------------------------------------------------ CLIP
def test_chunked_forward_gives_the_same_loss_and_gradients_as_one_pass():
    """chunks=4 keeps every negative: the loss over the full batch and every parameter's gradient equal chunks=1."""
    model = tiny("clip")
    x = images(8)
    tokens, lengths = captions(8)
    results = []
    for chunks in (1, 4):
        model.zero_grad()
        loss, _ = clip_loss(*model(x, tokens, lengths, chunks=chunks))
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss1, grads1), (loss4, grads4) = results
    torch.testing.assert_close(loss4, loss1, rtol=1e-6, atol=1e-6)
    assert grads1.keys() == grads4.keys() and all(g.abs().sum() > 0 for g in grads1.values())
    for name in grads1:  # fp32 sums in another order: ~1e-6 apart at gradients of up to ~10
        torch.testing.assert_close(grads4[name], grads1[name], rtol=1e-4, atol=2e-5, msg=name)
    with pytest.raises(ValueError, match="chunks=9 must be an integer in \\[1, batch size 8\\]"):
        model(x, tokens, lengths, chunks=9)


@pytest.mark.parametrize("text", ["gpt", "bert"])
def test_encode_text_pools_the_framing_token_and_ignores_padding(text):
    """A GPT pools at eod (after the caption), an encoder at cls: whatever follows the caption changes nothing."""
    overrides = {} if text == "gpt" else {"text": EncoderConfig.from_preset("bert-test", vocab_size=261,
                                                                            seq_len=32).to_dict()}
    model = tiny("clip", **overrides).eval()
    tokens, lengths = captions(4, L=10)
    lengths[:] = torch.tensor([10, 3, 6, 1])
    emb = model.encode_text(tokens, lengths)
    other = tokens.clone()
    for i, n in enumerate(lengths.tolist()):
        other[i, n:] = (other[i, n:] + 7) % 256  # other padding content
    torch.testing.assert_close(model.encode_text(other, lengths), emb, rtol=1e-5, atol=1e-6)
    longer = torch.cat([tokens, torch.full((4, 5), 3)], dim=1)  # more padding
    torch.testing.assert_close(model.encode_text(longer, lengths), emb, rtol=1e-5, atol=1e-6)
    # but the caption itself matters, and for a GPT the token read last is the one after it (eod)
    changed = tokens.clone()
    changed[:, 0] = (changed[:, 0] + 1) % 256
    assert not torch.allclose(model.encode_text(changed, lengths), emb)
