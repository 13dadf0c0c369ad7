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
