"""The grid-feature cache: computed once, reused, never stale."""
import numpy as np
import torch

from captionlens.data.bundle import open_data
from captionlens.features import grid_features
from captionlens.data.images import load_image, to_tensor
from captionlens.models.encoders import ShapesEncoder


def test_cache_matches_the_encoder_and_is_reused(tiny_shapes, tmp_path):
    paths = [r.path for r in open_data(tiny_shapes).split("val")]
    torch.manual_seed(0)
    encoder = ShapesEncoder().eval()
    grids = grid_features(encoder, paths, tmp_path, "val", batch_size=4, progress=False)
    assert grids.shape == (len(paths), 128, 8, 8) and grids.dtype == np.float16
    with torch.no_grad():
        pixels = torch.stack([to_tensor(load_image(p), encoder.image_size, encoder.mean, encoder.std) for p in paths])
        direct = encoder(pixels).numpy()
    assert np.allclose(grids, direct, rtol=1e-2, atol=1e-2)  # float16 storage
    files = sorted(tmp_path.glob("*.npy"))
    assert len(files) == 1 and not list(tmp_path.glob(".tmp-*"))
    mtime = files[0].stat().st_mtime_ns
    grid_features(encoder, paths, tmp_path, "val", progress=False)
    assert files[0].stat().st_mtime_ns == mtime  # read back, not recomputed


def test_other_weights_or_images_get_another_cache(tiny_shapes, tmp_path):
    paths = [r.path for r in open_data(tiny_shapes).split("val")]
    torch.manual_seed(0)
    first = grid_features(ShapesEncoder(), paths, tmp_path, "val", progress=False)
    torch.manual_seed(1)
    second = grid_features(ShapesEncoder(), paths, tmp_path, "val", progress=False)
    grid_features(ShapesEncoder(), paths[:3], tmp_path, "val", progress=False)
    assert len(list(tmp_path.glob("*.npy"))) == 3
    assert not np.allclose(first, second)
