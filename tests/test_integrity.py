"""Nothing wrong in silence: reused data is checked (feature cache, run folders), and inputs are
validated at the edges (splits, images by mode, LRP numbers, unknown words)."""
import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import captionlens as cl
from captionlens.cli import app
from captionlens.data.bundle import open_data
from captionlens.features import grid_features
from captionlens.data.images import ImageLoadError, load_image
from captionlens.models.encoders import ShapesEncoder

runner = CliRunner()


@pytest.fixture
def run(tmp_path):
    cap = cl.build_captioner("gridtd", encoder="shapes", vocab="a red blue circle square".split(), hidden_size=8,
                             embed_size=8)
    cap.save(tmp_path / "run")
    return tmp_path / "run"


# --------------------------------------------------------------------------------- run folders
def test_a_corrupted_weight_is_a_clear_error_naming_the_file(run):
    state = load_file(str(run / "model.safetensors"))
    state["decoder.fc.weight"][0, 0] = float("nan")
    save_file(state, str(run / "model.safetensors"))
    with pytest.raises(ValueError, match="model.safetensors is not the file saved"):
        cl.load(run)
    (run / "manifest.json").unlink()
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="decoder.fc.weight.*NaN"):
        cl.load(run)


def test_swapped_vocabulary_words_are_caught_by_the_manifest(run):
    vocab = json.loads((run / "vocab.json").read_text())
    vocab["words"][4], vocab["words"][5] = vocab["words"][5], vocab["words"][4]
    (run / "vocab.json").write_text(json.dumps(vocab))
    with pytest.raises(ValueError, match="vocab.json is not the file saved with this run"):
        cl.load(run)


@pytest.mark.parametrize("damage", ["empty", "truncated", "other architecture", "other vocabulary"])
def test_weights_that_do_not_fit_are_clear_errors(run, tmp_path, damage):
    (run / "manifest.json").unlink()
    weights = run / "model.safetensors"
    if damage == "empty":
        weights.write_bytes(b"")
    elif damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:1000])
    else:
        other = cl.build_captioner("adaptive" if damage == "other architecture" else "gridtd", encoder="shapes",
                                   vocab="a red blue circle square star ring".split()[: 7 if "vocab" in damage else 5],
                                   hidden_size=8, embed_size=8)
        other.save(tmp_path / "other")
        shutil.copy(tmp_path / "other" / "model.safetensors", weights)
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="model.safetensors"):
        cl.load(run)
    result = runner.invoke(app, ["caption", "--model", str(run), str(weights)])
    assert result.exit_code == 2 and "model.safetensors" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("config", [[], {"format_version": 1}, {"format_version": 1, "captioner": {"architecture": "gridtd"}},
                                    "extra"])
def test_bad_configs_are_clear_errors(run, config):
    (run / "manifest.json").unlink()
    if config == "extra":
        config = json.loads((run / "config.json").read_text())
        config["captioner"]["colour"] = "red"
    (run / "config.json").write_text(json.dumps(config))
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="config.json"):
        cl.load(run)


# ------------------------------------------------------------------------------ reused data
def test_the_feature_cache_follows_the_images_content(tiny_shapes, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_shapes, data)
    paths = [r.path for r in open_data(data).split("val")]
    torch.manual_seed(0)
    encoder = ShapesEncoder().eval()
    before = np.array(grid_features(encoder, paths, tmp_path / "cache", "val", progress=False))
    Image.new("RGB", (64, 64), (255, 0, 0)).save(paths[0])  # the same path, another picture
    stat = os.stat(paths[0])
    os.utime(paths[0], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    after = np.array(grid_features(encoder, paths, tmp_path / "cache", "val", progress=False))
    assert not np.allclose(before[0], after[0]) and np.allclose(before[1:], after[1:])
    (tmp_path / "cache" / ".tmp-999999999-stale.npy").write_bytes(b"half")  # a dead writer's leftover
    grid_features(encoder, paths[:3], tmp_path / "cache", "val", progress=False)
    assert not (tmp_path / "cache" / ".tmp-999999999-stale.npy").exists()


def test_empty_or_unknown_splits_are_errors(tiny_shapes, tmp_path):
    document = json.loads((tiny_shapes / "dataset_shapes.json").read_text())
    folder = tmp_path / "data"
    shutil.copytree(tiny_shapes, folder)
    for entry in document["images"]:
        if entry["split"] == "val":
            entry["split"] = "training"
    (folder / "dataset_shapes.json").write_text(json.dumps(document))
    with pytest.raises(ValueError, match="unknown split 'training'"):
        open_data(folder)
    for entry in document["images"]:
        if entry["split"] == "training":
            entry["split"] = "test"
    (folder / "dataset_shapes.json").write_text(json.dumps(document))
    result = runner.invoke(app, ["train", "--data", str(folder), "--arch", "gridtd", "--out", str(tmp_path / "r"),
                                 "--workers", "0"])
    assert result.exit_code == 2 and "val split" in result.output and "no images" in result.output


# ----------------------------------------------------------------------------------- images
def test_images_are_decoded_by_mode(tmp_path):
    grey16 = np.full((8, 8), 32768, dtype=np.uint16)  # half of the 16-bit range: mid grey, not white
    Image.fromarray(grey16).save(tmp_path / "grey16.png")
    assert np.asarray(load_image(tmp_path / "grey16.png"))[0, 0].tolist() == [128, 128, 128]
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[..., 0] = 255  # red hidden under fully transparent pixels ...
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "clear.png")
    assert np.asarray(load_image(tmp_path / "clear.png"))[0, 0].tolist() == [255, 255, 255]  # ... shows white
    rgba[..., 3] = 255
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "opaque.png")
    assert np.asarray(load_image(tmp_path / "opaque.png"))[0, 0].tolist() == [255, 0, 0]
    Image.new("L", (300, 200)).save(tmp_path / "big.png")
    with pytest.raises(ImageLoadError, match="300×200.*megapixels"):
        load_image(tmp_path / "big.png", max_pixels=50_000)


# ------------------------------------------------------------------------- explanation input
def test_lrp_numbers_must_be_finite_and_unknown_words_are_labelled_unk(run, tiny_shapes):
    image = sorted((tiny_shapes / "images").glob("*.png"))[0]
    for option in (["--epsilon", "nan"], ["--epsilon", "inf"], ["--alpha", "inf"]):
        result = runner.invoke(app, ["explain", "--model", str(run), str(image), "--out", str(run / "x"),
                                     "--caption", "a red circle", "--methods", "lrp", *option])
        assert result.exit_code == 2 and "finite" in result.output, option
    explanation = cl.explain(cl.load(run), image, "a zebra circle", "gradcam")
    assert explanation.words == ["a", "<unk>", "circle"] and explanation.tokens == ["<start>", "a", "<unk>", "circle"]


def test_a_damaged_training_state_is_a_clear_error_on_resume(tiny_shapes, tmp_path):
    weights = tmp_path / "encoder.safetensors"
    assert runner.invoke(app, ["pretrain-encoder", "--out", str(weights), "--images", "16", "--epochs", "1"]).exit_code == 0
    def train(epochs: str, *extra: str):
        return runner.invoke(app, ["train", "--data", str(tiny_shapes), "--arch", "gridtd", "--out", str(tmp_path / "run"),
                                   "--epochs", epochs, "--hidden-size", "8", "--embed-size", "8", "--encoder-weights",
                                   str(weights), "--workers", "0", *extra])
    assert train("1").exit_code == 0
    state = tmp_path / "run" / "training_state.safetensors"
    state.write_bytes(state.read_bytes()[:100])
    result = train("2", "--resume")
    assert result.exit_code == 2 and "cannot resume" in result.output and "training_state" in result.output


@pytest.mark.parametrize("umask, file_mode, folder_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_outputs_follow_the_users_umask_like_any_other_tool(tmp_path, umask, file_mode, folder_mode):
    """Run folders, JSON and .npz outputs and explanation stores get the modes an ordinary ``open`` and
    ``mkdir`` give under the user's umask — not the 0600/0700 of the temporary files they are made in."""
    from captionlens.explain.store import ExplanationStore
    from captionlens.io import atomic_write, write_json

    previous = os.umask(umask)
    try:
        cap = cl.build_captioner("gridtd", encoder="shapes", vocab="a red circle".split(), hidden_size=8,
                                 embed_size=4)
        cap.save(tmp_path / "run")
        write_json(tmp_path / "explanation.json", {"words": ["a"]})
        atomic_write(tmp_path / "lrp.npz", lambda tmp: np.savez_compressed(tmp, image=np.zeros(2)))
        ExplanationStore.create(tmp_path / "s.zarr", "model", "test", "objects", {})
    finally:
        os.umask(previous)
    written = [p for p in (tmp_path / "run").iterdir() if p.is_file()]
    assert written and {oct(p.stat().st_mode & 0o777) for p in written} == {oct(file_mode)}
    for name in ("explanation.json", "lrp.npz"):
        assert (tmp_path / name).stat().st_mode & 0o777 == file_mode, name
    assert (tmp_path / "s.zarr").stat().st_mode & 0o777 == folder_mode


def test_a_phone_photo_with_an_exif_rotation_is_captioned_and_explained_upright(tmp_path):
    """A JPEG stored wide with EXIF orientation 6 (shown turned 90° clockwise) is read tall, as every
    photo viewer shows it, by load_image and by what the captioner explains; dataset images keep the
    stored orientation their boxes were annotated in."""
    from PIL import ImageOps

    from captionlens.data.images import decoded_batches, resized_pixels

    stored = np.zeros((20, 40, 3), dtype=np.uint8)
    stored[:, :20, 0], stored[:, 20:, 2] = 255, 255  # left half red, right half blue
    photo = Image.fromarray(stored)
    exif = photo.getexif()
    exif[0x0112] = 6  # Orientation: rotate 90° clockwise to display
    photo.save(tmp_path / "phone.jpg", exif=exif.tobytes(), quality=95)
    with Image.open(tmp_path / "phone.jpg") as opened:
        shown = ImageOps.exif_transpose(opened).convert("RGB")
    upright = load_image(tmp_path / "phone.jpg")
    assert upright.size == (20, 40) and np.array_equal(np.asarray(upright), np.asarray(shown))
    assert np.asarray(upright)[0, 10, 0] > 200 and np.asarray(upright)[-1, 10, 2] > 200  # red on top after the turn
    assert load_image(tmp_path / "phone.jpg", upright=False).size == (40, 20)
    cap = cl.build_captioner("gridtd", encoder="shapes", vocab="a red circle".split(), hidden_size=8, embed_size=4)
    assert torch.equal(cap.preprocess([tmp_path / "phone.jpg"]), cap.preprocess([np.asarray(shown)]))
    on_file = cl.explain(cap, tmp_path / "phone.jpg", "a red circle", "gradient_x_input")
    on_upright = cl.explain(cap, np.asarray(shown), "a red circle", "gradient_x_input")
    assert torch.equal(on_file.image, on_upright.image)
    raw = resized_pixels(load_image(tmp_path / "phone.jpg", upright=False), 16)
    assert torch.equal(next(decoded_batches([[tmp_path / "phone.jpg"]], 16))[0], raw)
