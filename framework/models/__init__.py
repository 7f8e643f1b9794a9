"""Pure nn.Modules and their config dataclasses with named presets. No Lightning, DeepSpeed or W&B imports here.

Each family's config names its `model_type`; checkpoints and exports record it (`config.json` has a `model_type`), and
every command that reads one dispatches on it through FAMILIES.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from framework.models.classifier import ClassifierConfig, SequenceClassifier
from framework.models.clip import CLIP, CLIPConfig
from framework.models.encoder import Encoder, EncoderConfig
from framework.models.gpt import GPT, GPTConfig
from framework.models.resnet import ResNet, ResNetConfig
from framework.models.transformer import ConfigError, TransformerConfig, load_pretrained_files
from framework.models.vit import ViT, ViTConfig

# model_type -> the model class (its `config_class` is the config dataclass)
FAMILIES: dict[str, type[nn.Module]] = {"gpt": GPT, "bert": Encoder, "classifier": SequenceClassifier,
                                       "vit": ViT, "resnet": ResNet, "clip": CLIP}
# what each family's weights file leaves out because it is tied to another tensor
TIED: dict[str, tuple[str, ...]] = {"gpt": ("lm_head.weight",), "bert": ("mlm_head.decoder.weight",),
                                    "classifier": (), "vit": (), "resnet": (), "clip": ()}


def model_type_of(values: dict[str, Any]) -> str:
    """The family a config dict describes; dicts written before families were recorded are GPTs."""
    model_type = values.get("model_type", "gpt")
    if model_type not in FAMILIES:
        raise ConfigError(f"unknown model_type {model_type!r}; this framework knows {', '.join(FAMILIES)}")
    return model_type


def config_from_dict(values: dict[str, Any]) -> TransformerConfig:
    """A config dict (from a checkpoint's model_config or an export's config.json) -> its family's config."""
    model_type = model_type_of(values)
    return FAMILIES[model_type].config_class.from_dict({**values, "model_type": model_type})


def build_model(config: TransformerConfig) -> nn.Module:
    return FAMILIES[config.model_type](config)


def from_pretrained(path: str | os.PathLike, map_location: str | torch.device = "cpu",
                    model_class: type[nn.Module] | None = None, **overrides: Any) -> nn.Module:
    """Load a directory written by save_pretrained or `pretrain export`, whatever its family (or, with model_class,
    only that family's). overrides replace config fields that do not change shapes, e.g. dropout=0.1 for fine-tuning."""
    values, state = load_pretrained_files(path, map_location)
    config = config_from_dict({**values, **overrides})
    if model_class is not None and FAMILIES[config.model_type] is not model_class:
        raise ConfigError(f"'{path}' holds a {config.model_type!r} model, not a "
                          f"{model_class.config_class.model_type!r} one")
    with torch.device("meta"):  # no init work for weights that are about to be replaced
        model = build_model(config)
    tied = TIED[config.model_type]
    result = model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()  # assign=True replaced the embedding with a new Parameter; point the head at it again
    missing = [k for k in result.missing_keys if k not in tied]
    if missing or result.unexpected_keys:
        raise ValueError(f"the weights in {path} do not match its config.json: missing {missing}, unexpected "
                         f"{result.unexpected_keys}")
    return model


__all__ = ["FAMILIES", "TIED", "GPT", "GPTConfig", "Encoder", "EncoderConfig", "ClassifierConfig",
           "SequenceClassifier", "ViT", "ViTConfig", "ResNet", "ResNetConfig", "CLIP", "CLIPConfig", "build_model",
           "config_from_dict", "from_pretrained", "model_type_of"]
