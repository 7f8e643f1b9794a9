"""A model family is one file and one `register` call: a toy family declared here, outside framework/, is built,
saved, loaded and read back through the same calls as the framework's own; one reader opens every checkpoint kind."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import pytest
import torch
from safetensors import safe_open
from torch import nn

from framework.checkpoint.reader import open_checkpoint
from framework.errors import UserError
from framework.models import GPT, from_pretrained
from framework.models.registry import (Family, build_model, config_from_dict, families, family, image_tower,
                                       model_type_of, register, unregister)
from framework.models.transformer import ConfigError, PresetConfig, Pretrained


@dataclass
class ToyConfig(PresetConfig):
    model_type: ClassVar[str] = "toy"
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {"toy-test": dict(width=4)}

    width: int = 4


class Toy(Pretrained):
    config_class = ToyConfig
    tied_weights = ("out.weight",)  # stored once, as inp.weight

    def __init__(self, config: ToyConfig) -> None:
        super().__init__()
        self.config = config
        self.inp = nn.Linear(config.width, config.width, bias=False)
        self.out = nn.Linear(config.width, config.width, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        self.out.weight = self.inp.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.inp(x)))


@pytest.fixture
def toy():
    entry = register(Family(Toy))
    yield entry
    unregister("toy")


def test_a_toy_family_is_one_register_call(toy, tmp_path):
    assert toy.name == "toy" and toy.tied_in(None) == ("out.weight",) and family("toy") is toy
    config = config_from_dict({"model_type": "toy", "width": 3})
    assert isinstance(config, ToyConfig) and model_type_of(config.to_dict()) == "toy"
    model = build_model(config)
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert set(f.keys()) == {"inp.weight"}  # the tied matrix is stored once
    x = torch.randn(2, 3)
    for loaded in (from_pretrained(tmp_path), Toy.from_pretrained(tmp_path)):
        assert type(loaded) is Toy and loaded.out.weight is loaded.inp.weight
        assert torch.equal(loaded(x), model(x))
    with pytest.raises(ConfigError, match="holds a 'toy' model, not a 'gpt' one"):
        GPT.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="registered already"):
        register(Family(Toy))

    checkpoint = open_checkpoint(tmp_path)  # the reader opens an export directory of any family
    assert checkpoint.kind == "export" and checkpoint.model_config["model_type"] == "toy"
    assert checkpoint.tokenizer_json is None and set(checkpoint.weights()) == {"inp.weight"}
    assert torch.equal(checkpoint.weights()["inp.weight"].load(), model.inp.weight)


def test_unknown_families_and_image_towers():
    assert [f.name for f in families()][:6] == ["gpt", "bert", "classifier", "vit", "resnet", "clip"]
    with pytest.raises(ConfigError, match="unknown model_type 'toy'; this framework knows gpt, bert"):
        config_from_dict({"model_type": "toy"})
    clip = {"model_type": "clip", "image": {"model_type": "vit", "image_size": 32}}
    assert image_tower(clip) == ({"model_type": "vit", "image_size": 32}, "visual.")
    assert image_tower({"model_type": "vit"}) == ({"model_type": "vit"}, "")


def test_the_reader_refuses_what_is_no_checkpoint(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        open_checkpoint(tmp_path / "missing.ckpt")
    with pytest.raises(UserError, match="is a directory but not a checkpoint"):
        open_checkpoint(tmp_path)
    GPT(config_from_dict({"model_type": "gpt", "vocab_size": 16, "seq_len": 8, "n_layer": 1, "n_head": 1,
                          "n_embd": 8})).save_pretrained(tmp_path / "export")
    with pytest.raises(UserError, match="is a directory but not a checkpoint"):
        open_checkpoint(tmp_path / "export", exports=False)  # where only training checkpoints are taken
