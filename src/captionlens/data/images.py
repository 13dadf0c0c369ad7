"""Turning user images (paths, PIL images, arrays) into the normalised tensors an encoder takes."""
from __future__ import annotations

from pathlib import Path
from typing import Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

ImageInput = Union[str, Path, Image.Image, np.ndarray, torch.Tensor]


class ImageLoadError(ValueError):
    """An input that is not a readable image."""


def load_image(image: ImageInput) -> Image.Image:
    """An RGB PIL image from a path, a PIL image, an ``H×W×3`` array (uint8, or floats in [0, 1])
    or a ``3×H×W`` float tensor in [0, 1]."""
    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise ImageLoadError(f"no image file at {path}")
        try:
            with Image.open(path) as opened:
                return opened.convert("RGB")
        except (UnidentifiedImageError, OSError) as error:
            raise ImageLoadError(f"cannot read {path} as an image: {error}") from None
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().permute(1, 2, 0).numpy()
    if isinstance(image, np.ndarray):
        if image.ndim == 2:
            image = np.stack([image] * 3, axis=-1)
        if image.ndim != 3 or image.shape[2] not in (3, 4):
            raise ImageLoadError(f"an image array must be H×W×3, got shape {image.shape}")
        if image.dtype != np.uint8:
            image = (np.clip(image, 0.0, 1.0) * 255).round().astype(np.uint8)
        return Image.fromarray(image[:, :, :3])
    raise ImageLoadError(f"cannot use an object of type {type(image).__name__} as an image")


def to_tensor(image: Image.Image, size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """Resize to ``size×size`` (bilinear), scale to [0, 1] and normalise: ``[3, size, size]``."""
    if image.size != (size, size):
        image = image.resize((size, size), Image.BILINEAR)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)  # [3, H, W]
    return (pixels - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
