"""Turning user images (paths, PIL images, arrays) into the normalised tensors an encoder takes."""
from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Union

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import CaptionlensError

ImageInput = Union[str, Path, Image.Image, np.ndarray, torch.Tensor]


class ImageLoadError(CaptionlensError, ValueError):
    """An input that is not a readable image."""


MAX_PIXELS = 64_000_000  # larger images (e.g. 8000×8000 and up) are refused, not decoded into GBs of memory
BACKGROUND = (255, 255, 255)  # transparent pixels are composited on white


def load_image(image: ImageInput, max_pixels: int = MAX_PIXELS, upright: bool = True) -> Image.Image:
    """An RGB PIL image from a path, a PIL image, an ``H×W×3`` array (uint8, or floats in [0, 1])
    or a ``3×H×W`` float tensor in [0, 1].

    Decoded by mode: 16-bit images are scaled to 8 bits (not clipped), images with transparency are
    composited on white (not shown with the colours hidden under transparent pixels); an image of
    more than ``max_pixels`` pixels is refused before it is decoded. With ``upright`` (the default,
    for a user's photos) an EXIF orientation is applied, as every photo viewer does; dataset images
    are read with ``upright=False``, in the orientation their annotated boxes were drawn on."""
    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise ImageLoadError(f"no image file at {path}")
        try:
            with Image.open(path) as opened:
                _check_size(opened, max_pixels, str(path))
                return to_rgb(_upright(opened) if upright else opened)
        except ImageLoadError:
            raise
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError, ValueError) as error:
            raise ImageLoadError(f"cannot read {path} as an image: {error}") from None
    if isinstance(image, Image.Image):
        _check_size(image, max_pixels, "the image")
        return to_rgb(_upright(image) if upright else image)
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


IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"})
GLOB_CHARACTERS = frozenset("*?[")


def image_files(arguments: Sequence[str | Path]) -> list[Path]:
    """The image files named by command-line arguments, in order: a file as it is, a folder as its
    image files (by suffix: .jpg, .png, ...; sorted, not recursive), a glob pattern (``photos/*.jpg``,
    ``shots/**/*.png``, quoted so the shell leaves it) as its matches, sorted. An argument that names
    nothing is an error naming it."""
    import glob

    found: list[Path] = []
    for argument in map(str, arguments):
        path = Path(argument)
        if path.is_dir():
            inside = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not inside:
                raise ImageLoadError(f"no image file ({', '.join(sorted(IMAGE_SUFFIXES))}) in the folder {path}")
            found += inside
        elif not path.exists() and GLOB_CHARACTERS & set(argument):
            matches = sorted(Path(m) for m in glob.glob(argument, recursive=True) if Path(m).is_file())
            if not matches:
                raise ImageLoadError(f"no file matches {argument}")
            found += matches
        elif path.is_file():
            found.append(path)
        else:
            raise ImageLoadError(f"no image file at {path}")
    return found


def _upright(image: Image.Image) -> Image.Image:
    """The image turned as its EXIF orientation tag says (a phone photo taken sideways stands up);
    unchanged without the tag, or when the EXIF block cannot be parsed."""
    try:
        return ImageOps.exif_transpose(image)
    except (OSError, ValueError, KeyError, TypeError, SyntaxError):  # a damaged EXIF block: show it as stored
        return image


def _check_size(image: Image.Image, max_pixels: int, name: str) -> None:
    width, height = image.size
    if width * height > max_pixels:
        raise ImageLoadError(f"{name} is {width}×{height} = {width * height / 1e6:.0f} megapixels, more than the "
                             f"{max_pixels / 1e6:.0f} allowed")


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB: 16/32-bit greyscale scaled by its bit depth, transparency composited on white."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or values.max(initial=0) > 255 else 255.0
        image = Image.fromarray((np.clip(values, 0, top) / top * 255).round().astype(np.uint8), mode="L")
    elif image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        image = Image.fromarray((np.clip(values, 0, 1) * 255).round().astype(np.uint8), mode="L")
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def resized_pixels(image: Image.Image, size: int) -> torch.Tensor:
    """Resize to ``size×size`` (bilinear): uint8 ``[3, size, size]``."""
    if image.size != (size, size):
        image = image.resize((size, size), Image.BILINEAR)
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)


def normalise(pixels: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 ``[..., 3, H, W]`` -> float, scaled to [0, 1] and normalised per channel."""
    shape = (3, 1, 1)
    scaled = pixels.float() / 255.0
    return (scaled - torch.tensor(mean, device=pixels.device).view(shape)) / torch.tensor(std, device=pixels.device).view(shape)


def to_tensor(image: Image.Image, size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """Resize to ``size×size`` (bilinear), scale to [0, 1] and normalise: ``[3, size, size]``."""
    return normalise(resized_pixels(image, size), mean, std)


# ------------------------------------------------------------------------- parallel decoding
def default_workers() -> int:
    """Image-decoding worker processes: one per core beyond the one the model runs on, at most 8."""
    return max(0, min(8, (os.cpu_count() or 1) - 1))


class _BatchesOfFiles(torch.utils.data.Dataset):
    """Item k: the images of ``batches[k]`` decoded and resized, ``(uint8 [B, 3, S, S], None)``, or
    ``(None, message)`` when one cannot be read (so the message reaches the main process intact)."""

    def __init__(self, batches: Sequence[Sequence[ImageInput]], size: int) -> None:
        self.batches, self.size = batches, size

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, k: int):
        try:
            # dataset images: in their stored orientation, the one their boxes are annotated in
            return torch.stack([resized_pixels(load_image(p, upright=False), self.size) for p in self.batches[k]]), None
        except ImageLoadError as error:
            return None, str(error)


def decoded_batches(batches: Sequence[Sequence[ImageInput]], size: int, workers: int = 0) -> Iterator[torch.Tensor]:
    """For each batch of image files, its images decoded and resized to ``size×size``: uint8
    ``[B, 3, size, size]``, in order. With ``workers`` > 0 the decoding runs in that many worker
    processes (a torch ``DataLoader``) ahead of the consumer, so a large dataset is not bound to one core."""
    # its own generator: decoding images must not draw from (and so shift) the global random stream
    # that training and fine-tuning use for dropout
    loader = torch.utils.data.DataLoader(_BatchesOfFiles(batches, size), batch_size=None, num_workers=workers,
                                         prefetch_factor=2 if workers else None, generator=torch.Generator())
    for pixels, error in loader:
        if error is not None:
            raise ImageLoadError(error)
        yield pixels
