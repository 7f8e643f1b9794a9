"""The model families this framework knows, each declared once: `register(Family(ModelClass, ...))`.

A family is its model class (which names its config dataclass, with the presets, as `config_class`, and the tensors
its weights file leaves out as `tied_weights`) plus what the rest of the framework needs to know about it: how a
classifier or CLIP frames and pools its documents, whether it is an image model, where it keeps an image tower, the
`pretrain` command that inspects it, and what its export does beyond writing its weights. Checkpoints and exports
record the family as `model_type`; every reader dispatches through `family(model_type)`.

The framework's own families are registered in framework/models/__init__.py (one line each). This module imports no
family, so a family's own file (the classifier, CLIP) may look others up here at run time; and a test can register a
toy family the same way, then `unregister` it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from framework.models.transformer import CONFIG_FILE, ConfigError, load_pretrained_files


@dataclass(frozen=True)
class Family:
    model_class: type[nn.Module]  # its `config_class` (presets on it), `tied_weights` and, for text, `causal`
    # as a text backbone (a classifier's, CLIP's text tower): how it may be pooled (the first is the default) and the
    # special tokens it frames a document with; () = not a text backbone
    poolings: tuple[str, ...] = ()
    framing: tuple[str, ...] = ()
    image: bool = False  # an image model: a backbone of the image classifier, a CLIP image tower
    # where a model of this family keeps an image tower: (the config field of its config, the prefix of its tensors)
    image_tower: tuple[str, str] | None = None
    command: str | None = None  # the `pretrain` command that inspects a checkpoint or export of it
    adapters: bool = False  # its config may carry LoRA adapters (lora_rank), which an export merges into the weights

    @property
    def name(self) -> str:
        return self.model_class.config_class.model_type

    @property
    def config_class(self) -> Any:
        return self.model_class.config_class

    def tied_in(self, config: Any) -> tuple[str, ...]:
        """What the weights file of a model of `config` leaves out because it is tied to another tensor."""
        return self.model_class.tied_in(config)

    @property
    def causal(self) -> bool:
        """A text backbone that reads left to right (frames doc <|endoftext|>, pooled at the end)."""
        return bool(self.model_class.causal)


_FAMILIES: dict[str, Family] = {}


def register(entry: Family, replace: bool = False) -> Family:
    """Add a family (the model_type its config names); another one under the same name is an error unless `replace`."""
    if entry.name in _FAMILIES and not replace:
        raise ValueError(f"model family {entry.name!r} is registered already")
    _FAMILIES[entry.name] = entry
    return entry


def unregister(name: str) -> None:
    _FAMILIES.pop(name, None)


def families() -> list[Family]:
    """Every family, in the order they were registered."""
    return list(_FAMILIES.values())


def text_backbones() -> list[str]:
    """The families a classifier or CLIP's text tower can be built on."""
    return [f.name for f in _FAMILIES.values() if f.poolings]


def image_models() -> list[str]:
    """The families an image classifier or CLIP's image tower can be built on."""
    return [f.name for f in _FAMILIES.values() if f.image]


def family(name: str) -> Family:
    """The family named `name`; ConfigError naming the known ones otherwise."""
    if name not in _FAMILIES:
        raise ConfigError(f"unknown model_type {name!r}; this framework knows {', '.join(_FAMILIES)}")
    return _FAMILIES[name]


def model_type_of(values: dict[str, Any]) -> str:
    """The family a config dict describes; dicts written before families were recorded are GPTs."""
    return family(values.get("model_type", "gpt")).name


def family_of(values: dict[str, Any]) -> Family:
    return family(model_type_of(values))


def config_from_dict(values: dict[str, Any]) -> Any:
    """A config dict (from a checkpoint's model_config or an export's config.json) -> its family's config."""
    model_type = model_type_of(values)
    return family(model_type).config_class.from_dict({**values, "model_type": model_type})


def build_model(config: Any) -> nn.Module:
    return family(config.model_type).model_class(config)


def from_pretrained(path: str | os.PathLike, map_location: str | torch.device = "cpu", **overrides: Any) -> nn.Module:
    """Load a directory written by save_pretrained or `pretrain export`, whatever its family. overrides replace
    config fields that do not change shapes, e.g. dropout=0.1 for fine-tuning."""
    if is_hf_directory(path):  # the mapping lives in framework.checkpoint.hf, which models/ does not import
        raise ConfigError(f"'{path}' is a Hugging Face transformers directory, not one of this framework's: load it "
                          f"with framework.checkpoint.load.load_model(None, '{path}', None) (what `pretrain generate "
                          f"--model {path}` does), or start a run from it with --model.init_from hf:{path}")
    values, state = load_pretrained_files(path, map_location)
    config = config_from_dict({**values, **overrides})
    return family(config.model_type).model_class.from_state(config, state, path)


def is_hf_directory(path: str | os.PathLike) -> bool:
    """A directory whose config.json is Hugging Face's: it names its `architectures`, which ours never does."""
    file = os.path.join(path, CONFIG_FILE)
    try:
        with open(file) as f:
            values = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(values, dict) and "architectures" in values


def image_tower(values: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """(the image model's config dict, the prefix of its tensors) in a model of config `values`: a CLIP's image tower
    is its `image` config and its `visual.*` tensors; any other model is its own."""
    entry = _FAMILIES.get(values.get("model_type", "gpt"))
    tower = entry.image_tower if entry is not None else None
    if tower is None:
        return values, ""
    key, prefix = tower
    return dict(values[key]), prefix
