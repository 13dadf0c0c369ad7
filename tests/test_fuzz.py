"""Property-based tests (Hypothesis): malformed datasets, run folders, synonym lists and images given
to the loaders and the command line end in a clean exit with a message — never a traceback."""
import json
import os
import shutil

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from typer.testing import CliRunner

import captionlens as cl
from captionlens.cli import app

runner = CliRunner()
# CI runs a fixed set of examples (derandomized: a red CI means a real regression, not a new draw);
# CAPTIONLENS_FUZZ_EXAMPLES=500 explores afresh with that many examples per test.
EXPLORE = int(os.environ.get("CAPTIONLENS_FUZZ_EXAMPLES", "0"))
FUZZ = settings(max_examples=EXPLORE or 40, derandomize=not EXPLORE, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)


def assert_clean(result) -> None:
    """Exit 0; exit 2 with an 'error:' message; or exit 1 after a batch of images, naming each image that
    could not be done ("1 of 1 images could not be captioned: ..."). An exception escaping the command
    is a failure."""
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"uncaught {type(result.exception).__name__}: {result.exception}") from result.exception
    assert result.exit_code in (0, 1, 2), result.output
    if result.exit_code == 2:
        assert "error" in result.output.lower()
    if result.exit_code == 1:
        assert "images could not be" in result.output and "Traceback" not in result.output


@pytest.fixture(scope="module")
def valid(tmp_path_factory):
    """A valid Karpathy dataset folder with two images, and a valid run folder."""
    root = tmp_path_factory.mktemp("fuzz")
    (root / "images").mkdir()
    for name in ("a.png", "b.png"):
        Image.new("RGB", (16, 12), (200, 10, 10)).save(root / "images" / name)
    images = [{"filename": name, "filepath": "images", "imgid": k, "split": split,
               "sentences": [{"tokens": ["a", "red", "square"], "raw": "A red square."}]}
              for k, (name, split) in enumerate((("a.png", "train"), ("b.png", "val")))]
    (root / "dataset_x.json").write_text(json.dumps({"dataset": "x", "images": images}))
    run = root / "run"
    cl.build_captioner("gridtd", encoder="shapes", vocab=["a", "red", "square"], hidden_size=8, embed_size=8).save(run)
    return root, images, run


def mutate(value, path, replacement):
    """``value`` with the element at ``path`` (keys and indices) replaced (or deleted if replacement is ...)."""
    if not path:
        return {} if replacement is ... else replacement
    key, rest = path[0], path[1:]
    copy = dict(value) if isinstance(value, dict) else list(value)
    if key not in (copy if isinstance(copy, dict) else range(len(copy))):
        return copy
    if rest or replacement is not ...:
        copy[key] = mutate(copy[key], rest, replacement)
    else:
        del copy[key]
    return copy


def paths_of(value, prefix=()):
    yield prefix
    if isinstance(value, dict):
        for key, item in value.items():
            yield from paths_of(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from paths_of(item, (*prefix, index))


@FUZZ
@given(data=st.data())
def test_malformed_karpathy_datasets_end_cleanly(valid, tmp_path_factory, data):
    root, images, run = valid
    document = {"dataset": "x", "images": images}
    where = data.draw(st.sampled_from(list(paths_of(document))))
    broken = mutate(document, where, data.draw(st.just(...) | json_values))
    folder = tmp_path_factory.mktemp("karpathy")
    shutil.copytree(root / "images", folder / "images")
    (folder / "dataset_x.json").write_text(json.dumps(broken))
    assert_clean(runner.invoke(app, ["map", "--model", str(run), "--data", str(folder), "--out",
                                     str(folder / "out"), "--workers", "0", "--split", "val", "--min-count", "0"]))


@FUZZ
@given(config=json_values, vocab=json_values, data=st.data())
def test_malformed_run_folders_end_cleanly(valid, tmp_path_factory, config, vocab, data):
    root, _, run = valid
    folder = tmp_path_factory.mktemp("run")
    shutil.copytree(run, folder, dirs_exist_ok=True)
    (folder / "manifest.json").unlink()  # so that each file's own checks are reached, not only the manifest's
    target = data.draw(st.sampled_from(["config", "config-field", "vocab", "weights", "weights-truncated"]))
    if target == "config":
        (folder / "config.json").write_text(json.dumps(config))
    elif target == "config-field":
        stored = json.loads((folder / "config.json").read_text())
        field = data.draw(st.sampled_from([*stored["captioner"], "extra"]))
        stored["captioner"][field] = config
        (folder / "config.json").write_text(json.dumps(stored))
    elif target == "vocab":
        (folder / "vocab.json").write_text(json.dumps(vocab))
    elif target == "weights":
        (folder / "model.safetensors").write_bytes(data.draw(st.binary(max_size=64)))
    else:
        content = (folder / "model.safetensors").read_bytes()
        (folder / "model.safetensors").write_bytes(content[: data.draw(st.integers(0, len(content) - 1))])
    result = runner.invoke(app, ["caption", "--model", str(folder), str(root / "images" / "a.png")])
    assert_clean(result)


@FUZZ
@given(content=st.binary(max_size=200), data=st.data())
def test_malformed_images_and_synonym_lists_end_cleanly(valid, tmp_path_factory, content, data):
    root, _, run = valid
    folder = tmp_path_factory.mktemp("image")
    png = (root / "images" / "a.png").read_bytes()
    raw = data.draw(st.sampled_from([content, png[: len(png) // 2], png[:30] + content]))
    (folder / "x.png").write_bytes(raw)
    assert_clean(runner.invoke(app, ["caption", "--model", str(run), str(folder / "x.png")]))
    (folder / "synonyms.json").write_text(json.dumps(data.draw(json_values)))
    assert_clean(runner.invoke(app, ["map", "--model", str(run), "--data", str(root), "--out", str(folder / "o"),
                                     "--synonyms", str(folder / "synonyms.json"), "--split", "val", "--workers", "0",
                                     "--min-count", "0"]))


@FUZZ
@given(captions=json_values, data=st.data())
def test_malformed_coco_caption_files_end_cleanly(tmp_path_factory, captions, data):
    folder = tmp_path_factory.mktemp("coco")
    valid_file = {"images": [{"id": 1, "file_name": "1.jpg"}], "annotations": [{"id": 5, "image_id": 1, "caption": "A cat."}]}
    where = data.draw(st.sampled_from(list(paths_of(valid_file))))
    broken = data.draw(st.sampled_from([captions, mutate(valid_file, where, data.draw(st.just(...) | json_values))]))
    (folder / "captions_train2017.json").write_text(json.dumps(broken))
    (folder / "captions_val2017.json").write_text(json.dumps(valid_file))
    assert_clean(runner.invoke(app, ["data", "coco2017", "--annotations", str(folder), "--images", str(folder),
                                     "--out", str(folder / "out"), "--val-size", "0"]))


def test_the_error_names_the_file_and_the_field(valid, tmp_path):
    root, images, run = valid
    broken = [dict(images[0]), images[1]]
    del broken[0]["split"]
    (tmp_path / "dataset_x.json").write_text(json.dumps({"images": broken}))
    result = runner.invoke(app, ["map", "--model", str(run), "--data", str(tmp_path), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "dataset_x.json" in result.output and "'split'" in result.output
    folder = tmp_path / "run"
    shutil.copytree(run, folder)
    config = json.loads((folder / "config.json").read_text())
    config["captioner"]["hidden_size"] = "big"
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "manifest.json").unlink()
    result = runner.invoke(app, ["caption", "--model", str(folder), str(root / "images" / "a.png")])
    assert result.exit_code == 2 and "config.json" in result.output and "hidden_size" in result.output
