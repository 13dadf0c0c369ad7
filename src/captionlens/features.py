"""A disk cache of encoder grid features, as the papers' pipeline extracts ``block5_conv3`` once and
trains the decoder on the stored grids.

One ``.npy`` file (float16, memory-mapped on load, so COCO-sized caches need not fit in memory) per
(encoder weights, image files); its name carries a fingerprint of the weights and of every image's
path and *content* (a BLAKE2b hash of its bytes, ~1 GB/s), so a changed encoder or a replaced or
regenerated image never reads stale features — even one with the same size and modification time. Written to a temporary file and renamed when complete; temporary files of processes
that died are removed.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .data.images import decoded_batches, normalise
from .io import file_hash, remove_leftovers, weights_digest
from .models.encoders import Encoder


def encoder_fingerprint(encoder: Encoder) -> str:
    """A hash of the encoder's class, options (image and grid size) and weights."""
    return weights_digest(encoder.state_dict(), type(encoder).__name__, json.dumps(encoder.options(), sort_keys=True))


def content_hash(path: str | Path) -> str:
    """A BLAKE2b hash of a file's bytes; a missing file is a clear error."""
    try:
        return file_hash(path, "blake2b")
    except OSError:
        raise FileNotFoundError(f"no image file at {path} (pass --images with the folder that holds the "
                                "dataset's images)") from None


@torch.no_grad()
def grid_features(
    encoder: Encoder,
    paths: Sequence[Path],
    cache_dir: str | Path,
    name: str,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    progress: bool = True,
    workers: int = 0,
) -> np.ndarray:
    """Grid features ``[N, C, h, w]`` (float16) of the images at ``paths``, computed once and cached
    in ``cache_dir`` as ``{name}-{fingerprint}.npy``; ``workers`` processes decode the images."""
    digest = hashlib.sha1(encoder_fingerprint(encoder).encode())
    for path in tqdm(paths, desc=f"hashing {name}", disable=not progress or len(paths) < 10_000):
        digest.update(f"{path}\0{content_hash(path)}\n".encode())
    cache = Path(cache_dir) / f"{name}-{digest.hexdigest()[:16]}.npy"
    if cache.is_file():
        return np.load(cache, mmap_mode="r")
    cache.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(cache.parent, ".tmp-*")
    shape = (len(paths), encoder.out_channels, encoder.grid_size, encoder.grid_size)
    tmp = cache.with_name(f".tmp-{os.getpid()}-{cache.name}")
    store = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=shape)
    encoder = encoder.to(device).eval()
    try:
        batches = [paths[start: start + batch_size] for start in range(0, len(paths), batch_size)]
        start = 0
        for pixels in tqdm(decoded_batches(batches, encoder.image_size, workers), total=len(batches),
                           desc=f"features {name}", disable=not progress):
            pixels = normalise(pixels.to(device), encoder.mean, encoder.std)
            store[start: start + pixels.shape[0]] = encoder(pixels).cpu().numpy().astype(np.float16)
            start += pixels.shape[0]
        store.flush()
        del store
        os.replace(tmp, cache)
    finally:
        if tmp.exists():
            tmp.unlink()
    return np.load(cache, mmap_mode="r")
