"""DistributedDataParallel training under torchrun with 2 CPU processes (gloo): it completes, its
ranks hold identical weights, it resumes exactly, and it reaches the validation loss of one process
within the spread over seeds."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from captionlens.data.shapes import ShapesConfig, write_shapes_dataset
from captionlens.pipeline import train_captioner
from captionlens.train import TrainConfig

TORCHRUN = Path(sys.executable).parent / "torchrun"
pytestmark = pytest.mark.skipif(not TORCHRUN.is_file(), reason="torchrun is installed with torch")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from typer.testing import CliRunner

    from captionlens.cli import app

    root = tmp_path_factory.mktemp("ddp")
    data = write_shapes_dataset(root / "data", ShapesConfig(train=48, val=12, test=4, seed=5), progress=False)
    weights = root / "encoder.safetensors"
    result = CliRunner().invoke(app, ["pretrain-encoder", "--out", str(weights), "--images", "16", "--epochs", "1"])
    assert result.exit_code == 0, result.output
    return root, data, weights


def torchrun_train(world, out: Path, epochs: int, *extra: str) -> dict:
    root, data, weights = world
    command = [str(TORCHRUN), "--standalone", "--nproc_per_node", "2", "-m", "captionlens", "train", "--data", str(data),
               "--arch", "gridtd", "--out", str(out), "--epochs", str(epochs), "--hidden-size", "16",
               "--embed-size", "8", "--batch-size", "8", "--lr", "0.005", "--encoder-weights", str(weights),
               "--workers", "0", *extra]
    done = subprocess.run(command, env=os.environ | {"OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((out / "training_state.json").read_text())


def test_two_process_training_completes_resumes_exactly_with_identical_ranks(world, tmp_path):
    interrupted = torchrun_train(world, tmp_path / "run", 2)
    assert interrupted["world_size"] == 2 and interrupted["epochs_done"] == 2
    resumed = torchrun_train(world, tmp_path / "run", 3, "--resume")
    straight = torchrun_train(world, tmp_path / "straight", 3)
    for state in (interrupted, resumed, straight):
        first, second = state["rank_weight_checksums"]
        assert first == second  # every rank holds the same weights
    assert resumed["rank_weight_checksums"] == straight["rank_weight_checksums"]  # resume is exact
    assert [h["val_loss"] for h in resumed["history"]] == [h["val_loss"] for h in straight["history"]]
    assert (tmp_path / "run" / "model.safetensors").is_file()
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 3  # rank 0 alone logs


def test_two_processes_reach_the_loss_of_one_within_the_spread_over_seeds(world, tmp_path):
    _, data, weights = world
    single = []
    for seed in (0, 1, 2):
        train_captioner(data, "gridtd", tmp_path / f"one-{seed}", encoder_weights=weights, hidden_size=16, embed_size=8,
                        train_config=TrainConfig(epochs=4, batch_size=8, learning_rate=0.005, seed=seed),
                        progress=False)
        single.append(json.loads((tmp_path / f"one-{seed}" / "training_state.json").read_text())["best_val_loss"])
    two = torchrun_train(world, tmp_path / "two", 4)["best_val_loss"]
    spread = max(single) - min(single)
    assert min(single) - spread <= two <= max(single) + spread, (two, single)
