"""CNN encoders that turn an image into the grid features ``A = {a_1 .. a_L}`` (Section 4).

* ``vgg16``: VGG16 (Simonyan & Zisserman 2015) up to ``block5_conv3`` and its ReLU, as the papers
  use it: 14×14×512 at 224×224. Layer indices equal torchvision's ``vgg16().features[:30]`` so its
  state dicts (``vgg16-397923af.pth``) load unchanged from a *local* file. Nothing is downloaded.
* ``shapes``: a small VGG-style CNN (3×3 convolutions 16-16-32-32-64 with three max-pools, then two
  1×1 convolutions to 128; 8×8×128 at 64×64) for the embedded shapes world, pretrained on
  multi-label presence of shapes and colours — the role that ImageNet plays in the paper — and then
  frozen. Each cell sees a 28-pixel window (the 64-pixel image's objects are 13-22 pixels wide), so
  what a cell holds is what lies at that cell — the locality that makes attention over cells mean
  something (VGG16's block5 cells see far beyond their own 16 pixels, but a photo's objects are large).
"""
from __future__ import annotations

import pickle
from pathlib import Path

import torch
from torch import nn

from ..errors import integer
from .registry import register_encoder

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

POOL = "M"


def vgg_stack(layout: list[int | tuple[int, int] | str], in_channels: int = 3) -> nn.Sequential:
    """Convolutions with ReLU and 2×2 max-pools, VGG style: an int is the width of a 3×3
    convolution, a ``(width, kernel)`` pair a convolution of another odd kernel size (same padding),
    "M" a pool."""
    layers: list[nn.Module] = []
    for item in layout:
        if item == POOL:
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            width, kernel = item if isinstance(item, tuple) else (int(item), 3)
            layers += [nn.Conv2d(in_channels, width, kernel_size=kernel, padding=kernel // 2), nn.ReLU()]
            in_channels = width
    return nn.Sequential(*layers)


class Encoder(nn.Module):
    """An image -> grid feature map ``[B, C, h, w]``, with the preprocessing it expects."""

    out_channels: int
    downsampling: int  # image side / grid side

    max_image_size = 4096  # a side of 100000 px once ended in a MemoryError traceback
    # The memory layout its explanations in bfloat16 run in (explain.explainer, PRECISIONS), measured
    # on an AMX CPU, 15 words: channels last where 3×3 convolutions hold the work, since oneDNN's
    # bfloat16 convolutions reorder every other layout at every call (VGG16's LRP 0.28× fp32's time
    # against 0.47×); the usual layout for ResNets, whose 1×1 convolutions the LRP rules compute as
    # matrix products that would mix the layouts (ResNet-101's LRP 0.41× usual against 0.59× channels last).
    reduced_precision_layout = torch.contiguous_format

    def __init__(self, image_size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.image_size = integer("the encoder's image_size", image_size, self.downsampling, self.max_image_size)
        self.mean = tuple(mean)
        self.std = tuple(std)

    @property
    def grid_size(self) -> int:
        """The side of the grid the encoder returns."""
        return self.image_size // self.downsampling

    def options(self) -> dict:
        """The constructor arguments, for the run's config.json."""
        return {"image_size": self.image_size}

    @staticmethod
    def default_weights() -> Path | None:
        """Pretrained weights available offline without naming a file (an installed package), if any."""
        return None

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:  # pixels [B, 3, H, W]
        return self.features(pixels)  # [B, C, H/downsampling, W/downsampling]


VGG16_BLOCK5_CONV3 = [64, 64, POOL, 128, 128, POOL, 256, 256, 256, POOL, 512, 512, 512, POOL, 512, 512, 512]


@register_encoder("vgg16")
class VGG16Encoder(Encoder):
    out_channels = 512
    downsampling = 16
    reduced_precision_layout = torch.channels_last

    def __init__(self, image_size: int = 224) -> None:
        super().__init__(image_size, IMAGENET_MEAN, IMAGENET_STD)
        self.features = vgg_stack(VGG16_BLOCK5_CONV3)  # indices 0..29: up to block5_conv3 + ReLU

    def load_pretrained(self, path: str | Path) -> None:
        """Load a torchvision-format VGG16 state dict (``.pth``) or a ``.safetensors`` file.

        Only ``features.0`` .. ``features.28`` are used; the classifier is ignored."""
        load_matching(self, load_state_dict_file(path), path, "a torchvision VGG16 state dict")


def load_matching(module: nn.Module, state: dict[str, torch.Tensor], path: str | Path, what: str) -> None:
    """Load the tensors of ``state`` that ``module`` has (others, e.g. a classifier, are ignored),
    with a clear error naming missing keys or wrong shapes. Batch-norm counters (``num_batches_tracked``)
    that files from before PyTorch 0.4.1 lack are kept as they are, as PyTorch itself does."""
    wanted = module.state_dict()
    state = dict(state)
    for key in wanted:
        if key.endswith(".num_batches_tracked") and key not in state:
            state[key] = wanted[key]
    missing = [key for key in wanted if key not in state]
    if missing:
        raise ValueError(f"{path} is not {what}: missing {', '.join(missing[:4])}" + (" ..." if len(missing) > 4 else ""))
    for key, tensor in wanted.items():
        if state[key].shape != tensor.shape:
            raise ValueError(f"{path}: {key} has shape {tuple(state[key].shape)}, expected {tuple(tensor.shape)}")
    module.load_state_dict({key: state[key] for key in wanted})


# receptive field 28 px: 3×3 convs and pools up to the third pool, then only 1×1 convolutions
SHAPES_LAYOUT = [16, 16, POOL, 32, 32, POOL, 64, POOL, (128, 1), (128, 1)]


@register_encoder("shapes")
class ShapesEncoder(Encoder):
    out_channels = 128
    downsampling = 8
    reduced_precision_layout = torch.channels_last  # VGG style
    revision = 2  # of the layout and its pretraining; cached weights carry it in their name

    def __init__(self, image_size: int = 64) -> None:
        super().__init__(image_size, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
        self.features = vgg_stack(SHAPES_LAYOUT)
        for module in self.features:
            if isinstance(module, nn.Conv2d):  # without Kaiming init this plain CNN barely learns
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                nn.init.zeros_(module.bias)

    def load_pretrained(self, path: str | Path) -> None:
        """Load weights saved by ``captionlens`` encoder pretraining (a ``.safetensors`` file)."""
        state = load_state_dict_file(path)
        load_matching(self, {k.removeprefix("encoder."): v for k, v in state.items()}, path,
                      f"shapes encoder weights of this release (layout revision {self.revision})")


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from a local ``.safetensors`` or (tensor-only, ``weights_only``) ``.pth`` file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"encoder weights not found at {path}. captionlens never downloads weights: "
            "download the file yourself (e.g. torchvision's vgg16-397923af.pth) and pass its local path."
        )
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:  # weights_only: a .pth file that holds anything but tensors is refused, never unpickled
        state = load_file(str(path)) if path.suffix == ".safetensors" else \
            torch.load(path, map_location="cpu", weights_only=True)
    except (SafetensorError, pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as error:
        raise ValueError(f"cannot read encoder weights {path}: the file is truncated, corrupt or not a "
                         f"tensor-only state dict ({type(error).__name__})") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict")
    return state


def build_encoder(name: str, weights: str | Path | None = None, **options) -> Encoder:
    """A registered encoder, with pretrained weights from a local file when given (else the encoder's
    offline default weights, where it has any)."""
    from .registry import ENCODERS, lookup

    encoder = lookup(ENCODERS, "encoder", name)(**options)
    weights = weights if weights is not None else encoder.default_weights()
    if weights is not None:
        encoder.load_pretrained(weights)
    return encoder
