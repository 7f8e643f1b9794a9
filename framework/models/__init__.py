"""Pure nn.Modules and their config dataclasses with named presets. No Lightning, DeepSpeed or W&B imports here.

Each family's config names its `model_type`; checkpoints and exports record it (`config.json` has a `model_type`), and
every command that reads one dispatches on it through the registry (framework.models.registry), where each family is
declared below, one line each.
"""

from __future__ import annotations

from framework.models.classifier import ClassifierConfig, SequenceClassifier
from framework.models.clip import CLIP, CLIPConfig
from framework.models.encoder import Encoder, EncoderConfig
from framework.models.gin import GIN, GINConfig
from framework.models.gpt import GPT, GPTConfig
from framework.models.registry import (Family, build_model, config_from_dict, family, from_pretrained, model_type_of,
                                       register)
from framework.models.resnet import ResNet, ResNetConfig
from framework.models.vit import ViT, ViTConfig

register(Family(GPT, poolings=("last", "mean"), framing=("eod", "pad"), command="generate"))
register(Family(Encoder, poolings=("cls", "mean"), framing=("cls", "sep", "pad"), command="fill-mask"))
register(Family(SequenceClassifier, adapters=True))
register(Family(ViT, image=True))
register(Family(ResNet, image=True))
register(Family(CLIP, image_tower=("image", "visual.")))  # `pretrain zero-shot` needs data too: no one-line hint
register(Family(GIN))  # molecule graphs (framework.data.graphs)

__all__ = ["GPT", "GPTConfig", "Encoder", "EncoderConfig", "ClassifierConfig", "SequenceClassifier", "ViT", "ViTConfig",
           "ResNet", "ResNetConfig", "CLIP", "CLIPConfig", "GIN", "GINConfig", "Family", "build_model", "config_from_dict", "family",
           "from_pretrained", "model_type_of", "register"]
