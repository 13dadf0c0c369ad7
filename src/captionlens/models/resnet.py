"""ResNet-50/101 encoders (He et al. 2016, torchvision's "v1.5" bottleneck with the stride on the
3×3 convolution), as Show-Attend-Tell uses them: the last stage's grid, adaptive-average-pooled to
``grid_size`` × ``grid_size`` (14×14 in the tutorial). Module names equal torchvision's, so its state
dicts (``resnet101-63fe2227.pth``) load unchanged from a *local* file; the classifier is ignored.

Every operation LRP treats with a rule is a module: the residual addition is a ``Sum`` (ε-rule),
batch-norm is folded into the preceding convolution for the duration of an explanation
(``explain.canonize``), the final pooling is an ``nn.AdaptiveAvgPool2d`` (ε-rule).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .encoders import IMAGENET_MEAN, IMAGENET_STD, Encoder, load_matching, load_state_dict_file
from .layers import Sum
from .registry import register_encoder


class Bottleneck(nn.Module):
    """1×1 -> 3×3 (stride) -> 1×1 convolutions, each with batch-norm, and the residual sum:
    ``y = ReLU(F(x) ⊕ shortcut(x))`` with ``F`` [B, 4·width, H/s, W/s]."""

    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int = 1) -> None:
        super().__init__()
        out_channels = width * self.expansion
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU()
        self.downsample = None
        if stride != 1 or in_channels != out_channels:  # projection shortcut
            self.downsample = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(out_channels))
        self.residual_sum = Sum()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(self.residual_sum(out, shortcut))


RESNET_DEPTHS = {"resnet50": (3, 4, 6, 3), "resnet101": (3, 4, 23, 3)}


class ResNetEncoder(Encoder):
    """Stem (7×7/2 conv, max-pool /2) and four bottleneck stages: 2048 channels at 1/32 of the image,
    then adaptive average pooling to ``grid_size``."""

    out_channels = 2048
    downsampling = 32
    depth: str
    # The gradient methods' float32 backward takes the words as a batch up to this many pixels
    # (explain.gradients.words_as_a_batch): with batch-norm folded, batch / word by word on a 2-core CPU,
    # 15 words, 0.80-0.90x for ResNet-101 at 256 px, 0.85-0.91x for ResNet-50 at 224, 1.01-1.13x at 320.
    gradients_as_a_batch_up_to = 256 * 256

    def __init__(self, image_size: int = 224, grid_size: int = 14) -> None:
        super().__init__(image_size, IMAGENET_MEAN, IMAGENET_STD)
        self.pooled_size = grid_size
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        channels = 64
        for stage, (blocks, width) in enumerate(zip(RESNET_DEPTHS[self.depth], (64, 128, 256, 512)), start=1):
            layers = []
            for block in range(blocks):
                layers.append(Bottleneck(channels, width, stride=2 if block == 0 and stage > 1 else 1))
                channels = width * Bottleneck.expansion
            setattr(self, f"layer{stage}", nn.Sequential(*layers))
        self.pool = nn.AdaptiveAvgPool2d(grid_size)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    @property
    def grid_size(self) -> int:
        return self.pooled_size

    def options(self) -> dict:
        return {"image_size": self.image_size, "grid_size": self.pooled_size}

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:  # pixels [B, 3, H, W]
        x = self.maxpool(self.relu(self.bn1(self.conv1(pixels))))  # [B, 64, H/4, W/4]
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))  # [B, 2048, H/32, W/32]
        return self.pool(x)  # [B, 2048, grid, grid]

    def load_pretrained(self, path: str | Path) -> None:
        """Load a torchvision-format ResNet state dict (``.pth``) or a ``.safetensors`` file."""
        load_matching(self, load_state_dict_file(path), path, f"a torchvision {self.depth} state dict")


@register_encoder("resnet50")
class ResNet50Encoder(ResNetEncoder):
    depth = "resnet50"


@register_encoder("resnet101")
class ResNet101Encoder(ResNetEncoder):
    depth = "resnet101"
