"""Pure nn.Modules and their config dataclasses with named presets. No Lightning, DeepSpeed or W&B imports here."""

from framework.models.gpt import GPT, GPTConfig

__all__ = ["GPT", "GPTConfig"]
