"""The second hostile-user probe (issue 28): nothing lost, nothing corrupted, nothing silently wrong.
Each test is one finding of the probe, replayed; the viewer's are in test_viewer.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import captionlens as cl
from captionlens.data.bundle import open_data
from captionlens.features import grid_features
from captionlens.data.shapes import ShapesConfig, write_shapes_dataset
from captionlens.explain.store import ExplanationStore
from captionlens.io import OutputRefused, claim_output_folder
from captionlens.models.encoders import ShapesEncoder

SMALL = ShapesConfig(train=4, val=2, test=2)


# ----------------------------------------------------------------------------- output folders
def test_data_shapes_never_deletes_a_folder_it_did_not_make(tmp_path, monkeypatch):
    thesis = tmp_path / "p"
    thesis.mkdir()
    (thesis / "thesis.txt").write_text("four years of work")
    with pytest.raises(OutputRefused, match="not a folder captionlens made"):
        write_shapes_dataset(thesis, SMALL, progress=False)
    assert (thesis / "thesis.txt").read_text() == "four years of work" and len(list(thesis.iterdir())) == 1
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputRefused, match="is a file"):
        write_shapes_dataset(tmp_path / "file", SMALL, progress=False)
    assert (tmp_path / "file").read_text() == "x"
    monkeypatch.chdir(thesis)
    for here in (".", "..", str(thesis)):
        with pytest.raises(OutputRefused, match="current folder"):
            write_shapes_dataset(here, SMALL, progress=False)
    assert not list(tmp_path.glob(".*partial"))


def test_a_dataset_captionlens_made_is_replaced_whole(tmp_path):
    out = write_shapes_dataset(tmp_path / "d", SMALL, progress=False)
    write_shapes_dataset(out, ShapesConfig(train=3, val=1, test=1), progress=False)
    assert len(list((out / "images").glob("*.png"))) == 5
    empty = tmp_path / "empty"
    empty.mkdir()
    write_shapes_dataset(empty, SMALL, progress=False)
    assert (empty / "shapes_config.json").is_file()


def _claim_at_once(path: str, barrier) -> str:
    import time

    import captionlens.io as io_module

    written_now = io_module.atomic_write

    def slowly(target, write):  # a slow disk: the marker's temporary file lingers before its rename
        written_now(target, lambda tmp: (write(tmp), time.sleep(0.3)))

    io_module.atomic_write = slowly  # this forked process only
    barrier.wait()
    return str(claim_output_folder(path, "run"))


def test_processes_claiming_one_new_folder_at_once_all_get_it(tmp_path):
    """Each rank of a torchrun claims the run folder: one's marker, half written, is no stranger's file."""
    import multiprocessing

    context = multiprocessing.get_context("fork")
    for attempt in range(5):
        barrier = context.Manager().Barrier(6)
        folder = tmp_path / f"run{attempt}"
        with context.Pool(6) as pool:
            claimed = pool.starmap(_claim_at_once, [(str(folder), barrier)] * 6)
        assert claimed == [str(folder)] * 6
        assert [p.name for p in folder.iterdir()] == [".captionlens"]
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / ".captionlens.notes.txt").write_text("someone's")  # only our own temporary name
    with pytest.raises(OutputRefused):
        claim_output_folder(tmp_path / "theirs", "run")


def test_every_out_follows_the_same_rule(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.md").write_text("x")
    cap = cl.build_captioner("gridtd", encoder="shapes", vocab=["a", "circle"], hidden_size=8, embed_size=8)
    with pytest.raises(OutputRefused):
        cap.save(foreign)
    with pytest.raises(OutputRefused):
        cl.explain_image(cap, np.zeros((64, 64, 3), np.uint8), foreign, ["attention"], caption="a circle")
    with pytest.raises(OutputRefused, match="captionlens run folder"):  # a run folder is not a dataset
        cap.save(tmp_path / "run")
        claim_output_folder(tmp_path / "run", "dataset")
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.md"]


def test_a_failed_generation_leaves_the_old_dataset_and_no_partial_folder(tmp_path, monkeypatch):
    out = write_shapes_dataset(tmp_path / "d", SMALL, progress=False)
    before = sorted(p.name for p in (out / "images").iterdir())

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("captionlens.data.shapes.write_json", full_disk)
    with pytest.raises(OSError, match="No space left"):
        write_shapes_dataset(out, ShapesConfig(train=3, val=1, test=1), progress=False)
    assert sorted(p.name for p in (out / "images").iterdir()) == before
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]


# ----------------------------------------------------------------------------- reused data
def test_the_feature_cache_follows_content_even_at_the_same_size_and_time(tiny_shapes, tmp_path):
    """Two BMPs of one size have the same byte count; the second gets the first's modification time."""
    paths = [tmp_path / "a.png", tmp_path / "b.png"]
    Image.new("RGB", (64, 64), (250, 10, 10)).save(paths[0], format="BMP")
    Image.new("RGB", (64, 64), (10, 250, 10)).save(paths[1], format="BMP")
    stat = os.stat(paths[0])
    torch.manual_seed(0)
    encoder = ShapesEncoder().eval()
    before = np.array(grid_features(encoder, paths, tmp_path / "cache", "x", progress=False))
    Image.new("RGB", (64, 64), (10, 10, 250)).save(paths[0], format="BMP")  # another picture, same bytes count
    os.utime(paths[0], ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert os.stat(paths[0]).st_size == stat.st_size and os.stat(paths[0]).st_mtime_ns == stat.st_mtime_ns
    after = np.array(grid_features(encoder, paths, tmp_path / "cache", "x", progress=False))
    assert np.abs(before[0] - after[0]).max() > 0.01 and np.array_equal(before[1], after[1])


@pytest.mark.parametrize("name", ["../outside.png", "/etc/passwd", "a/../../outside.png"])
def test_dataset_file_names_stay_inside_the_image_root(tiny_shapes, tmp_path, name):
    folder = tmp_path / "data"
    import shutil

    shutil.copytree(tiny_shapes, folder)
    document = json.loads((folder / "dataset_shapes.json").read_text())
    document["images"][0]["filename"] = name
    (folder / "dataset_shapes.json").write_text(json.dumps(document))
    with pytest.raises(ValueError, match="leads outside the image root"):
        open_data(folder)


# ----------------------------------------------------------------------------- the store
WRITER = textwrap.dedent("""
    import sys, torch
    torch.set_num_threads(1)
    import captionlens as cl
    from captionlens.data.bundle import open_data
    from captionlens.experiments.explain_split import explain_split
    explain_split(cl.load(sys.argv[1]), open_data(sys.argv[2]), sys.argv[3], split="train",
                  methods=("lrp", "gradcam", "attention"), batch_size=2, progress=False)
    print("done")
""")


@pytest.fixture(scope="module")
def run_and_data(tiny_shapes, tmp_path_factory):
    root = tmp_path_factory.mktemp("concurrent")
    cap = cl.build_captioner("gridtd", encoder="shapes", vocab="a red blue circle square".split(), hidden_size=12,
                             embed_size=8, seed=0)
    with torch.no_grad():
        cap.model.decoder.fc.bias[cap.vocab.end_id] = -1e4  # captions of max_length words
    cap.config.max_length = 4
    cap.save(root / "run")
    return root / "run", tiny_shapes


def test_two_writers_on_one_store_share_the_work_and_agree_with_one(run_and_data, tmp_path):
    run, data = run_and_data
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(run), str(data), str(tmp_path / "shared.zarr")],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [w.communicate(timeout=600) for w in writers]
    for writer, (out, err) in zip(writers, outputs):
        assert writer.returncode == 0 and out.strip() == "done", err[-2000:]
    subprocess.run([sys.executable, "-c", WRITER, str(run), str(data), str(tmp_path / "alone.zarr")], check=True,
                   capture_output=True, timeout=600)
    shared, alone = ExplanationStore.open(tmp_path / "shared.zarr"), ExplanationStore.open(tmp_path / "alone.zarr")
    assert shared.image_ids() == alone.image_ids() and len(alone.image_ids()) == 40
    assert shared.verify() == []
    for image_id in alone.image_ids():
        for method in ("lrp", "gradcam", "attention"):
            a, b = shared.explanation(image_id, method), alone.explanation(image_id, method)
            assert torch.allclose(a.image, b.image, atol=1e-3 * float(b.image.abs().max()) + 1e-12)
            assert torch.allclose(a.preceding, b.preceding, atol=1e-5)


def test_a_complete_mark_without_its_arrays_is_not_trusted_and_is_repaired(run_and_data, tmp_path):
    run, data = run_and_data
    subprocess.run([sys.executable, "-c", WRITER, str(run), str(data), str(tmp_path / "s.zarr")], check=True,
                   capture_output=True, timeout=600)
    store = ExplanationStore.open(tmp_path / "s.zarr", "r+")
    image_id = store.image_ids()[0]
    del store._root[f"images/{image_id}/lrp/image"]  # what two interleaved writers once left behind
    reopened = ExplanationStore.open(tmp_path / "s.zarr")
    assert not reopened.has(image_id, "lrp") and reopened.has(image_id, "gradcam")
    assert reopened.verify() == [f"image {image_id}, lrp: marked complete but its 'image' array is missing"]
    with pytest.raises(KeyError, match="no complete lrp explanation"):
        reopened.explanation(image_id, "lrp")
    result = subprocess.run([sys.executable, "-c", WRITER, str(run), str(data), str(tmp_path / "s.zarr")],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    repaired = ExplanationStore.open(tmp_path / "s.zarr")
    assert repaired.has(image_id, "lrp") and repaired.verify() == []


# ----------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def encoder_weights(tmp_path_factory):
    from captionlens.pipeline import pretrain_shapes_encoder
    from captionlens.train import TrainConfig

    path = tmp_path_factory.mktemp("encoder") / "encoder.safetensors"
    pretrain_shapes_encoder(path, TrainConfig(epochs=1, batch_size=16), images=16, progress=False)
    return path


def _train(data, out, weights, **changes):
    from captionlens.train import TrainConfig

    settings = dict(epochs=1, batch_size=8, learning_rate=1e-2, patience=5, seed=0) | changes.pop("config", {})
    return cl.train_captioner(data, "gridtd", out, encoder_weights=weights, hidden_size=8, embed_size=8,
                              train_config=TrainConfig(**settings), progress=False, **changes)


def test_resume_refuses_other_data_or_settings_unless_forced(tiny_shapes, encoder_weights, tmp_path):
    from captionlens.errors import InvalidValue

    _train(tiny_shapes, tmp_path / "run", encoder_weights)
    with pytest.raises(InvalidValue, match=r"learning_rate: 0.01 then, 0.02 now"):
        _train(tiny_shapes, tmp_path / "run", encoder_weights, config={"epochs": 2, "learning_rate": 2e-2}, resume=True)
    with pytest.raises(InvalidValue, match="batch_size"):
        _train(tiny_shapes, tmp_path / "run", encoder_weights, config={"epochs": 2, "batch_size": 4}, resume=True)
    other = write_shapes_dataset(tmp_path / "other", ShapesConfig(train=30, val=10, test=2, seed=1), progress=False)
    with pytest.raises(InvalidValue, match="train_images: 40 then, 30 now"):
        _train(other, tmp_path / "run", encoder_weights, config={"epochs": 2}, resume=True)
    _train(tiny_shapes, tmp_path / "run", encoder_weights, config={"epochs": 2}, resume=True)  # more epochs: fine
    _train(tiny_shapes, tmp_path / "run", encoder_weights, config={"epochs": 3, "learning_rate": 2e-2}, resume=True,
           force=True)
    log = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(log) == 3


def test_a_nan_loss_stops_training_and_keeps_the_last_good_weights(tiny_shapes, encoder_weights, tmp_path,
                                                                   monkeypatch):
    from captionlens.errors import TrainingDiverged

    _train(tiny_shapes, tmp_path / "run", encoder_weights)
    good = (tmp_path / "run" / "model.safetensors").read_bytes()
    calls = {"n": 0}
    import captionlens.pipeline as pipeline

    real_loss = pipeline.caption_loss

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss = real_loss(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(pipeline, "caption_loss", poisoned)
    with pytest.raises(TrainingDiverged, match="epoch 2.*kept.*lower learning rate"):
        _train(tiny_shapes, tmp_path / "run", encoder_weights, config={"epochs": 3}, resume=True)
    assert (tmp_path / "run" / "model.safetensors").read_bytes() == good
    cl.load(tmp_path / "run")  # still a whole run folder


# ----------------------------------------------------------------------------- full and read-only disks
@pytest.fixture
def small_disk(tmp_path):
    """A 3 MB tmpfs where the machine lets us mount one (root on Linux), else None."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.environ.get("CAPTIONLENS_NO_TMPFS") or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True).returncode:
        yield None
        return
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_a_full_disk_is_a_clear_error_and_leaves_nothing_half_written(small_disk, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from captionlens.cli import app

    if small_disk is None:  # no tmpfs here: the same failure, injected where PNGs are written
        small_disk = tmp_path / "disk"
        original = Image.Image.save
        count = {"n": 0}

        def filling(self, fp, *args, **kwargs):
            count["n"] += 1
            if count["n"] > 50:
                raise OSError(28, "No space left on device", str(fp))
            return original(self, fp, *args, **kwargs)

        monkeypatch.setattr(Image.Image, "save", filling)
    result = CliRunner().invoke(app, ["data", "shapes", "--out", str(small_disk / "d"), "--train", "3000", "--val", "10",
                                      "--test", "10"])
    assert result.exit_code == 2 and "No space left on device" in result.output and "Traceback" not in result.output
    assert not (small_disk / "d").exists() and not list(small_disk.glob(".*"))


def test_a_read_only_target_is_a_clear_error(small_disk, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from captionlens.cli import app

    cap = cl.build_captioner("gridtd", encoder="shapes", vocab=["a", "circle"], hidden_size=8, embed_size=8)
    cap.save(tmp_path / "run")
    image = tmp_path / "x.png"
    Image.new("RGB", (64, 64)).save(image)
    if small_disk is not None and subprocess.run(["mount", "-o", "remount,ro", str(small_disk)],
                                                 capture_output=True).returncode == 0:
        target = small_disk / "out"
    else:  # no read-only mount here: the failure injected where folders are made
        target = tmp_path / "out"

        def read_only(self, *args, **kwargs):
            raise OSError(30, "Read-only file system", str(self))

        monkeypatch.setattr(Path, "mkdir", read_only)
    result = CliRunner().invoke(app, ["explain", "--model", str(tmp_path / "run"), str(image), "--out", str(target),
                                      "--caption", "a circle", "--methods", "attention"])
    assert result.exit_code == 2 and "Read-only file system" in result.output and "Traceback" not in result.output


# ----------------------------------------------------------------------------- bounds
def test_configs_beyond_sane_sizes_are_clear_errors(tmp_path):
    cap = cl.build_captioner("gridtd", encoder="shapes", vocab=["a", "circle"], hidden_size=8, embed_size=8)
    cap.save(tmp_path / "run")
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    for field, value, message in (("encoder_options", {"image_size": 100000}, "image_size must satisfy"),
                                  ("max_length", 1_000_000_000, "max_length' must be in")):
        changed = json.loads(json.dumps(config))
        changed["captioner"][field] = value
        (tmp_path / "run" / "config.json").write_text(json.dumps(changed))
        (tmp_path / "run" / "manifest.json").unlink(missing_ok=True)
        with pytest.warns(UserWarning), pytest.raises(ValueError, match=message):
            cl.load(tmp_path / "run")


def test_long_captions_and_searches_are_bounded_but_can_be_allowed():
    from captionlens.errors import InvalidValue

    cap = cl.build_captioner("gridtd", encoder="shapes", vocab=["a", "circle"], hidden_size=8, embed_size=8)
    image = np.zeros((64, 64, 3), np.uint8)
    with pytest.raises(InvalidValue, match="more than max_words=100"):
        cl.explain(cap, image, ["circle"] * 150, method="attention")
    assert len(cl.explain(cap, image, ["circle"] * 150, method="attention", max_words=None).words) == 150
    with pytest.raises(InvalidValue, match="max_length must satisfy 1 ≤ max_length ≤ 1000"):
        cap.caption([image], max_length=10**9)
    with pytest.raises(InvalidValue, match="beam_size"):
        cap.caption([image], beam_size=0)
    for device in ("foo", "meta", "cuda:7" if not torch.cuda.is_available() else "cuda:999"):
        with pytest.raises(InvalidValue, match="device"):
            cl.load.__globals__["Captioner"](cap.model, cap.vocab, cap.config, device)


def test_old_resnet_files_without_batch_norm_counters_load(tmp_path):
    from safetensors.torch import save_file

    from captionlens.models.encoders import build_encoder

    encoder = build_encoder("resnet50")
    state = {k: v for k, v in encoder.state_dict().items() if not k.endswith("num_batches_tracked")}
    save_file(state, str(tmp_path / "old.safetensors"))
    loaded = build_encoder("resnet50", tmp_path / "old.safetensors")
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in state.items())
