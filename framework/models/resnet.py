"""ResNets (He et al. 2016, "Deep Residual Learning for Image Recognition") in plain PyTorch.

The "v1.5" layout that torchvision and most training recipes use: in a bottleneck block the stride sits on the 3x3
conv, not the first 1x1 (~0.5% more top-1 for a few % more compute), and a block that changes shape gets a projection
shortcut (1x1 conv + BN, "option B"). Convs have no bias (the BN after each one has it). The model is a stem, four
stages and a global average pool, then `head`; with num_classes=0 it is a feature tower (a CLIP image encoder).

A `Stage` (the blocks at one resolution) is the unit that FSDP shards and activation checkpointing recomputes: a
ResNet has only 4 of them, but per-block units would be tiny in the early stages and cost more in collectives than
they save. Sharding, checkpointing, precision and compile are applied from outside, as for every family.

BatchNorm, in training, normalizes with the statistics of the micro-batch on each rank (no SyncBatchNorm here: convert
from outside with nn.SyncBatchNorm.convert_sync_batchnorm if small per-rank batches need it). Note that recomputation
(activation checkpointing, or CLIP's chunked forward) runs each BN forward twice, which updates its running statistics
twice per step: they still converge to the same values, just with a larger effective momentum.

Shapes in comments: B batch, Ch image channels, H, W height and width, C channels, K classes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, ContextManager

import torch
import torch.nn as nn

from framework.models.transformer import (
    ConfigError,
    PresetConfig,
    check_bool,
    check_choice,
    check_positive_ints,
    gathered,
    num_params,
    Pretrained,
)

BLOCKS = ("basic", "bottleneck")
STEMS = ("imagenet", "small")
HEAD_INIT_STD = 0.01  # Goyal et al. 2017: the classifier starts small, N(0, 0.01)

PRESETS: dict[str, dict[str, Any]] = {
    # CPU unit tests: 0.08M parameters, a forward+backward in milliseconds.
    "resnet-test": dict(layers=[1, 1, 1, 1], block="basic", width=8, stem="small", image_size=32, num_classes=10),
    # The CPU smoke run on 64 px synthetic shapes (num_classes is the data's, set at run time): ResNet-10 at a quarter
    # of ResNet-18's width, 0.31M parameters with 36 classes, 65 MMACs per image. A forward+backward+AdamW step at
    # batch 64 takes 245-310 ms on 2 CPU cores (torch 2.13, fp32; [2,2,2,2] takes 480 ms, width 32 870 ms); 600 steps
    # (~3 minutes) reached 90% val accuracy on a 36-class (6 colours x 6 shapes, noisy backgrounds) set. The small
    # stem keeps the full 64 px in stage 1: the ImageNet stem would leave stage 4 a 2x2 map.
    "resnet-cpu": dict(layers=[1, 1, 1, 1], block="basic", width=16, stem="small", image_size=64),
    "resnet18": dict(layers=[2, 2, 2, 2], block="basic"),  # 11.69M parameters, 1.81 GMACs at 224 px
    # 25,557,032 parameters (as torchvision's resnet50), 4.09 GMACs forward at 224 px (8.2 GFLOPs; 24.5 for training)
    "resnet50": dict(layers=[3, 4, 6, 3], block="bottleneck"),
}


@dataclass
class ResNetConfig(PresetConfig):
    model_type: ClassVar[str] = "resnet"
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = PRESETS

    layers: list[int] = field(default_factory=lambda: [3, 4, 6, 3])  # blocks in each of the 4 stages
    block: str = "bottleneck"  # "basic" (two 3x3 convs, ResNet-18/34) or "bottleneck" (1x1, 3x3, 1x1 at 4x width)
    width: int = 64  # channels of stage 1's convs; stage i has width * 2**i (a bottleneck outputs 4x that)
    channels: int = 3
    num_classes: int = 1000  # 0: no head, `forward` returns the pooled features (a feature tower)
    image_size: int = 224  # nominal: the size flops() counts for and the data's default crop (any size runs)
    # "imagenet": 7x7 stride-2 conv + 3x3 stride-2 max pool (/4 before stage 1); "small": one 3x3 stride-1 conv and
    # no pool, for 32-64 px images, where /4 would throw most of the picture away
    stem: str = "imagenet"
    zero_init_residual: bool = True  # each residual branch's last BN starts at 0: every block starts as the identity

    def __post_init__(self) -> None:
        if (not isinstance(self.layers, (list, tuple)) or len(self.layers) != 4
                or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in self.layers)):
            raise ConfigError(f"ResNetConfig.layers={self.layers!r} must be 4 positive integers, the blocks in each "
                              "stage, e.g. [2, 2, 2, 2] (ResNet-18) or [3, 4, 6, 3] (ResNet-50)")
        self.layers = list(self.layers)  # a tuple from Python code round-trips through JSON as a list
        check_choice(self, "block", BLOCKS)
        check_choice(self, "stem", STEMS)
        check_positive_ints(self, "width", "channels", "image_size")
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int) or self.num_classes < 0:
            raise ConfigError(f"ResNetConfig.num_classes={self.num_classes!r} must be an integer >= 0 (0: no head)")
        check_bool(self, "zero_init_residual")

    @property
    def expansion(self) -> int:
        return 4 if self.block == "bottleneck" else 1


def conv3x3(n_in: int, n_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(n_in: int, n_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, kernel_size=1, stride=stride, bias=False)


def projection(n_in: int, n_out: int, stride: int) -> nn.Module | None:
    """The shortcut of a block that changes resolution or width (1x1 conv + BN); None when x can be added as is."""
    if stride == 1 and n_in == n_out:
        return None
    return nn.Sequential(conv1x1(n_in, n_out, stride), nn.BatchNorm2d(n_out))


class BasicBlock(nn.Module):
    """relu(x + bn2(conv2(relu(bn1(conv1(x)))))), 3x3 convs; the stride, if any, on conv1."""

    expansion = 1

    def __init__(self, n_in: int, width: int, stride: int) -> None:
        super().__init__()
        self.conv1 = conv3x3(n_in, width, stride)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width)
        self.bn2 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = projection(n_in, width, stride)

    @property
    def convs(self) -> list[nn.Conv2d]:
        """The residual branch's convs, in order (the FLOP count walks them)."""
        return [self.conv1, self.conv2]

    @property
    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)  # (B, C_out, H', W')
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class Bottleneck(nn.Module):
    """1x1 reduce to `width`, 3x3 (with the stride: v1.5), 1x1 expand to 4 * width; residual add, relu."""

    expansion = 4

    def __init__(self, n_in: int, width: int, stride: int) -> None:
        super().__init__()
        self.conv1 = conv1x1(n_in, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, stride)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, width * self.expansion)
        self.bn3 = nn.BatchNorm2d(width * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = projection(n_in, width * self.expansion, stride)

    @property
    def convs(self) -> list[nn.Conv2d]:
        return [self.conv1, self.conv2, self.conv3]

    @property
    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


class Stage(nn.Sequential):
    """The blocks at one resolution: the first may change stride and width, the rest keep them. The unit of FSDP
    sharding and activation checkpointing (a model's `block_types`)."""


def conv_out(conv: nn.Conv2d | nn.MaxPool2d, size: int) -> int:
    """Output side of a square input of `size` through a conv or pool (no dilation)."""
    pair = lambda v: v if isinstance(v, int) else v[0]  # noqa: E731
    return (size + 2 * pair(conv.padding) - pair(conv.kernel_size)) // pair(conv.stride) + 1


def conv_macs(conv: nn.Conv2d, size: int) -> tuple[int, int]:
    """(multiply-accumulates, output side) of a conv on a square input: one MAC per output position and weight."""
    out = conv_out(conv, size)
    k = conv.kernel_size[0] * conv.kernel_size[1]
    weights = conv.out_channels * conv.in_channels // conv.groups * k  # from the shape: a ZeRO-3 shard is empty
    return out * out * weights, out


class ResNet(Pretrained):
    config_class = ResNetConfig
    block_types = (Stage,)

    def __init__(self, config: ResNetConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        if c.stem == "imagenet":
            self.stem = nn.Sequential(nn.Conv2d(c.channels, c.width, kernel_size=7, stride=2, padding=3, bias=False),
                                      nn.BatchNorm2d(c.width), nn.ReLU(inplace=True),
                                      nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
        else:
            self.stem = nn.Sequential(conv3x3(c.channels, c.width), nn.BatchNorm2d(c.width), nn.ReLU(inplace=True))
        block = Bottleneck if c.block == "bottleneck" else BasicBlock
        stages, n_in = [], c.width
        for i, n in enumerate(c.layers):
            width = c.width * 2**i
            stride = 1 if i == 0 else 2  # stage 1 keeps the stem's resolution; each later one halves it
            stages.append(Stage(*(block(n_in if j == 0 else width * block.expansion, width, stride if j == 0 else 1)
                                  for j in range(n))))
            n_in = width * block.expansion
        self.stages = nn.ModuleList(stages)
        self.head = nn.Linear(n_in, c.num_classes) if c.num_classes else nn.Identity()
        self.init_weights()

    @property
    def feature_dim(self) -> int:
        return self.config.width * 8 * self.config.expansion

    def init_weights(self, gather: Callable[[nn.Module], ContextManager[Any]] | None = None) -> None:
        """Convs: Kaiming normal with fan_out (He et al. 2015, as torchvision), which keeps the gradients' variance
        through the ReLUs. BN: weight 1, bias 0, fresh running statistics; with zero_init_residual the last BN of
        each residual branch starts at weight 0, so every block starts as the identity and the deep net trains like
        a shallow one at first (Goyal et al. 2017, "Accurate, Large Minibatch SGD"). Head: N(0, 0.01), bias 0 (same).
        `gather(module)` is entered around each module's own parameters (ZeRO-3's GatheredParameters)."""
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    with gathered(m, gather):
                        nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                elif isinstance(m, nn.BatchNorm2d):
                    with gathered(m, gather):
                        m.reset_parameters()  # weight 1, bias 0, running mean 0 / var 1
                elif isinstance(m, nn.Linear):
                    with gathered(m, gather):
                        nn.init.normal_(m.weight, std=HEAD_INIT_STD)
                        nn.init.zeros_(m.bias)
            if self.config.zero_init_residual:
                for stage in self.stages:
                    for block in stage:
                        with gathered(block.last_bn, gather):
                            nn.init.zeros_(block.last_bn.weight)

    def tie_weights(self) -> None:
        """Nothing is tied."""

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, Ch, H, W) -> globally average-pooled features (B, C_final)."""
        if images.dim() != 4 or images.size(1) != self.config.channels:
            raise ValueError(f"expected images of shape (batch, {self.config.channels}, height, width), got "
                             f"{tuple(images.shape)}")
        x = self.stem(images)  # (B, width, H', W'): H' = H (small stem) or H / 4 (imagenet stem)
        for stage in self.stages:
            x = stage(x)  # (B, C_i, H'/2**i, W'/2**i)
        return x.mean(dim=(2, 3))  # (B, C_final): global average pool

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, Ch, H, W) -> class logits (B, K), or the pooled features when num_classes is 0."""
        return self.head(self.features(images))

    def num_params(self) -> int:
        return num_params(self)

    def macs(self, image_size: int | None = None) -> int:
        """Forward multiply-accumulates of one image of side `image_size` (default: the config's): every conv (the
        projection shortcuts included) and the head. BN, ReLU, pooling and the residual adds are left out: they are
        elementwise, ~1% of a ResNet-50's arithmetic, and not matrix-multiply work (torch's FlopCounterMode leaves them
        out too)."""
        size = self.config.image_size if image_size is None else image_size
        total, size = conv_macs(self.stem[0], size)
        if self.config.stem == "imagenet":
            size = conv_out(self.stem[3], size)
        for stage in self.stages:
            for block in stage:
                if block.downsample is not None:
                    total += conv_macs(block.downsample[0], size)[0]
                for conv in block.convs:
                    macs, size = conv_macs(conv, size)
                    total += macs
        return total + self.feature_dim * self.config.num_classes

    def flops(self, images: int, image_size: int | None = None) -> int:
        """Training FLOPs (forward + backward = 3x forward, 2 FLOPs per MAC) of `images` images."""
        return 6 * self.macs(image_size) * images

