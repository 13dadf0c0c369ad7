"""Shared fixtures: tiny generated data, so every test runs on any machine in seconds."""
from __future__ import annotations

import pytest
import torch

from captionlens.data.shapes import ShapesConfig, write_shapes_dataset

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_shapes(tmp_path_factory):
    """A 60-image shapes world (40 train / 10 val / 10 test) in the real formats."""
    return write_shapes_dataset(tmp_path_factory.mktemp("shapes"), ShapesConfig(train=40, val=10, test=10, seed=3),
                                progress=False)


@pytest.fixture(scope="session")
def demo_workspace(tmp_path_factory):
    """A folder laid out like `captionlens demo --out runs/demo` leaves it — runs/demo/{data, encoder,
    adaptive, gridtd, results/gridtd/explanations.zarr} — but tiny (a 60-image world, captioners trained
    for seconds), so the documentation's examples run against it as a user runs them after the demo.
    The full demo's first two test images are runs/demo/data/images/shapes_004500.png and _004501.png;
    two of this world's test images are copied to those names."""
    import shutil

    import captionlens as cl
    from captionlens.data.bundle import open_data
    from captionlens.experiments.explain_split import explain_split
    from captionlens.pipeline import pretrain_shapes_encoder
    from captionlens.train import TrainConfig

    root = tmp_path_factory.mktemp("workspace")
    demo = root / "runs" / "demo"
    data = open_data(write_shapes_dataset(demo / "data", ShapesConfig(train=40, val=10, test=10, seed=3),
                                          progress=False))
    for record, name in zip(data.split("test"), ("shapes_004500.png", "shapes_004501.png")):
        shutil.copy(record.path, demo / "data" / "images" / name)
    encoder = demo / "encoder" / "shapes_encoder.safetensors"
    pretrain_shapes_encoder(encoder, TrainConfig(epochs=1, batch_size=16), images=40, progress=False)
    for architecture in ("adaptive", "gridtd"):
        cl.train_captioner(data, architecture, demo / architecture, encoder_weights=encoder, hidden_size=16,
                           embed_size=8, train_config=TrainConfig(epochs=12, batch_size=8, learning_rate=1e-2,
                                                                  patience=12), progress=False)
    explain_split(cl.load(demo / "gridtd"), data, demo / "results" / "gridtd" / "explanations.zarr",
                  methods=("lrp", "gradcam", "attention"), limit=4, progress=False)
    return root
