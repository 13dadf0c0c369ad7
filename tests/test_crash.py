"""Crash tests: `data shapes`, feature caching, encoder pretraining and training are killed with
SIGKILL at random moments (a bounded number of times, seeded); afterwards what they write is either
complete and valid or recognisably absent or incomplete — never a half-written result that a later
run would take for a finished one — and running again completes."""
import json
import os
import random
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest

import captionlens as cl
from captionlens.data.bundle import open_data

ENV = os.environ | {"OMP_NUM_THREADS": "1"}
KILLS = 2  # per scenario
RANDOM = random.Random(14)


def run(args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], env=ENV, capture_output=True, text=True, **kwargs)


def kill_during(args, earliest: float, latest: float) -> None:
    """Start ``args``, SIGKILL it after a random delay (if it is still running)."""
    process = subprocess.Popen([sys.executable, *args], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(RANDOM.uniform(earliest, latest))
    process.send_signal(signal.SIGKILL)
    process.wait()


def test_data_shapes_killed_leaves_the_old_dataset_or_none(tmp_path):
    out = tmp_path / "data"
    first = ["-m", "captionlens", "data", "shapes", "--out", str(out), "--train", "300", "--val", "20", "--test", "20"]
    for _ in range(KILLS):  # no dataset yet: killed, there is none or a whole one
        kill_during(first, 0.3, 2.0)
        assert not out.exists() or len(open_data(out).captions.images) == 340
    assert run(first).returncode == 0
    before = (out / "dataset_shapes.json").read_text()
    second = [*first, "--seed", "1"]
    for _ in range(KILLS):  # replacing it: killed, it is the old dataset or the new one, never a mixture
        kill_during(second, 0.3, 2.0)
        text = (out / "dataset_shapes.json").read_text()
        bundle = open_data(out)
        assert all(r.path.is_file() for r in bundle.captions.images)
        if text == before:
            assert json.loads((out / "shapes_config.json").read_text())["seed"] == 0
    assert run(second).returncode == 0 and json.loads((out / "shapes_config.json").read_text())["seed"] == 1
    assert not list(tmp_path.glob(".data.*"))  # what the killed runs left was cleaned up


def test_feature_caching_killed_leaves_no_cache_that_looks_complete(tmp_path):
    data = tmp_path / "data"
    assert run(["-m", "captionlens", "data", "shapes", "--out", str(data), "--train", "400", "--val", "4",
                "--test", "4"]).returncode == 0
    script = tmp_path / "features.py"
    script.write_text(f"""
import torch
from captionlens.data.bundle import open_data
from captionlens.features import grid_features
from captionlens.models.encoders import ShapesEncoder
torch.manual_seed(0)
paths = [r.path for r in open_data({str(data)!r}).split("train")]
grid_features(ShapesEncoder(), paths, {str(tmp_path / "cache")!r}, "train", batch_size=16, progress=False)
""")
    for _ in range(KILLS):
        kill_during([str(script)], 0.5, 2.0)
        for cache in (tmp_path / "cache").glob("*.npy"):  # only whole caches carry the final name
            assert np.load(cache, mmap_mode="r").shape == (400, 128, 8, 8)
    assert run([str(script)]).returncode == 0
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 1 and not list((tmp_path / "cache").glob(".tmp-*"))


def test_encoder_pretraining_killed_never_leaves_a_half_trained_encoder(tmp_path):
    out = tmp_path / "encoder.safetensors"
    command = ["-m", "captionlens", "pretrain-encoder", "--out", str(out), "--images", "600", "--epochs", "3"]
    for _ in range(KILLS):
        kill_during(command, 1.0, 4.0)
        assert not out.exists()  # the file appears only when pretraining has finished
    assert run(command).returncode == 0 and out.is_file()
    assert not list(tmp_path.glob(".encoder.safetensors.*"))


@pytest.mark.parametrize("arch", ["adaptive", "vit-gpt2"])
def test_training_killed_leaves_a_loadable_run_or_none_and_resumes(tmp_path, arch):
    """A decoder on the cached shapes features, and a Hugging Face captioner trained from the pixels."""
    data = tmp_path / "data"
    assert run(["-m", "captionlens", "data", "shapes", "--out", str(data), "--train", "300", "--val", "30",
                "--test", "4"]).returncode == 0
    if arch == "vit-gpt2":
        pytest.importorskip("transformers")  # the hf extra, part of the test extra
        sizes = ["--hidden-size", "32", "--encoder-layers", "1", "--layers", "1", "--heads", "2"]
        window = (5.0, 10.0)  # importing transformers takes seconds before training starts
    else:
        encoder = tmp_path / "encoder.safetensors"
        assert run(["-m", "captionlens", "pretrain-encoder", "--out", str(encoder), "--images", "16",
                    "--epochs", "1"]).returncode == 0
        sizes = ["--hidden-size", "32", "--embed-size", "16", "--encoder-weights", str(encoder)]
        window = (2.0, 5.0)
    out = tmp_path / "run"
    command = ["-m", "captionlens", "train", "--data", str(data), "--arch", arch, "--out", str(out),
               "--epochs", "6", "--batch-size", "16", "--patience", "6", "--workers", "0", *sizes]
    for _ in range(KILLS):
        kill_during([*command, *(["--resume"] if (out / "training_state.json").is_file() else [])], *window)
        if (out / "manifest.json").is_file():
            try:
                cl.load(out)  # a saved model is a whole, verified one ...
            except ValueError as error:  # ... or, killed between its files and its manifest, detected as such
                assert "not the file saved with this run" in str(error)
        else:  # killed before the first save finished: it loads (its files are whole) or says what is missing
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    cl.load(out)
            except (FileNotFoundError, ValueError) as error:
                assert str(out) in str(error)
    resume = ["--resume"] if (out / "training_state.json").is_file() else []
    done = run([*command, *resume])
    assert done.returncode == 0, done.stderr[-2000:]
    assert cl.load(out).vocab.words
