"""The command line: --help on every verb, the data → train → caption path, clear errors, and the
quick demo end to end."""
import json

import pytest
from PIL import Image
from typer.testing import CliRunner

from captionlens.cli import app, data_app, import_app

runner = CliRunner()


def _name(command) -> str:
    return command.name or command.callback.__name__.replace("_", "-")


VERBS = [[], ["data"], *[["data", _name(c)] for c in data_app.registered_commands], ["import"],
         *[["import", _name(c)] for c in import_app.registered_commands], *[[_name(c)] for c in app.registered_commands]]


@pytest.mark.parametrize("verb", VERBS, ids=[" ".join(v) or "captionlens" for v in VERBS])
def test_every_verb_has_help(verb):
    result = runner.invoke(app, [*verb, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_the_help_test_covers_every_verb():
    names = {" ".join(v) for v in VERBS}
    assert {"data shapes", "data coco2017", "pretrain-encoder", "train", "caption", "explain", "evaluate", "ablation",
            "correctness", "hallucination", "map", "masking", "finetune", "demo", "audit", "import sat-tutorial",
            "faithfulness", "sanity"} <= names


def test_train_choices_come_from_the_registries():
    result = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "400"})
    for choice in ("adaptive", "gridtd", "sat", "vgg16", "resnet50", "resnet101", "efficientnet_lite0"):
        assert choice in result.output


def test_data_train_caption(tmp_path):
    data = tmp_path / "data"
    result = runner.invoke(app, ["data", "shapes", "--out", str(data), "--train", "30", "--val", "6", "--test", "4"])
    assert result.exit_code == 0, result.output
    assert (data / "dataset_shapes.json").is_file() and (data / "instances_shapes.json").is_file()
    weights = tmp_path / "encoder.safetensors"
    result = runner.invoke(app, ["pretrain-encoder", "--out", str(weights), "--images", "24", "--epochs", "1"])
    assert result.exit_code == 0, result.output
    run = tmp_path / "run"
    result = runner.invoke(app, ["train", "--data", str(data), "--arch", "adaptive", "--out", str(run), "--epochs", "1",
                                 "--hidden-size", "16", "--embed-size", "8", "--batch-size", "10",
                                 "--encoder-weights", str(weights)])
    assert result.exit_code == 0, result.output
    images = sorted((data / "images").glob("*.png"))[-2:]
    result = runner.invoke(app, ["caption", "--model", str(run), "--json", *map(str, images)])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["image"] for line in lines] == [str(p) for p in images]
    assert all(isinstance(line["words"], list) and line["score"] <= 0 for line in lines)


def test_experiment_verbs_write_their_tables(tiny_run, tiny_shapes, tmp_path):
    run, _ = tiny_run
    common = ["--model", str(run), "--data", str(tiny_shapes), "--out", str(tmp_path), "--split", "test", "--limit", "4"]
    result = runner.invoke(app, ["evaluate", *common])
    assert result.exit_code == 0, result.output
    assert "CIDEr" in result.output and "SPICE" in result.output and "not available" in result.output
    assert (tmp_path / "metrics.md").is_file()
    result = runner.invoke(app, ["hallucination", *common, "--min-count", "0"])
    assert result.exit_code == 0, result.output
    assert {"auc", "chair", "map"} <= json.loads(result.stdout).keys()
    result = runner.invoke(app, ["correctness", *common])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "correctness.png").is_file()
    result = runner.invoke(app, ["map", *common, "--min-count", "0"])
    assert result.exit_code == 0, result.output
    assert "per_word" in json.loads(result.stdout) and (tmp_path / "map.png").is_file()
    result = runner.invoke(app, ["ablation", *common, "--skip", "1"])
    assert result.exit_code == 0 and "| stop | lrp |" in result.stdout, result.output
    result = runner.invoke(app, ["masking", *common, "--words", "2"])
    assert result.exit_code == 0 and (tmp_path / "masking.csv").is_file(), result.output
    result = runner.invoke(app, ["finetune", *common, "--mode", "plain", "--seeds", "0", "--steps", "1",
                                 "--train-limit", "4", "--min-count", "0", "--batch-size", "4"])
    assert result.exit_code == 0 and "| plain |" in result.stdout, result.output
    result = runner.invoke(app, ["finetune", *common, "--seeds", "zero"])
    assert result.exit_code != 0 and "--seeds" in result.output
    result = runner.invoke(app, ["faithfulness", *common, "--words", "2", "--other-words", "2", "--regions", "3",
                                 "--replacement", "mean", "--methods", "lrp,attention"])
    assert result.exit_code == 0 and (tmp_path / "faithfulness.md").is_file(), result.output
    result = runner.invoke(app, ["sanity", *common, "--words", "2", "--other-words", "2", "--methods", "gradcam"])
    assert result.exit_code == 0 and (tmp_path / "input_invariance.md").is_file(), result.output
    result = runner.invoke(app, ["faithfulness", *common, "--methods", "lrp,saliency"])
    assert result.exit_code != 0 and "unknown method 'saliency'" in result.output and "Traceback" not in result.output


def test_bad_input_exits_nonzero_with_a_message(tmp_path):
    (tmp_path / "bad.png").write_text("not an image")
    result = runner.invoke(app, ["caption", "--model", str(tmp_path), str(tmp_path / "bad.png")])
    assert result.exit_code != 0 and "config.json" in result.output
    result = runner.invoke(app, ["train", "--data", str(tmp_path), "--arch", "gridtd", "--out", str(tmp_path / "r")])
    assert result.exit_code != 0 and "dataset_*.json" in result.output
    result = runner.invoke(app, ["train", "--data", str(tmp_path), "--arch", "lstm", "--out", str(tmp_path / "r")])
    assert result.exit_code != 0
    result = runner.invoke(app, ["data", "shapes", "--out", str(tmp_path / "d"), "--bias-word", "unicorn"])
    assert result.exit_code != 0 and "bias_word" in result.output


@pytest.mark.slow
def test_quick_demo_end_to_end(tmp_path):
    # gridtd and Show-Attend-Tell (no sentinel); the default pair, adaptive included, runs in .ci/run's
    # core-install step
    result = runner.invoke(app, ["demo", "--quick", "--archs", "gridtd,sat", "--out", str(tmp_path / "demo")])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    for arch in ("gridtd", "sat"):
        assert {"bleu4", "object_precision", "object_recall", "hallucination_rate"} <= summary[arch].keys()
        assert 0.0 <= summary[arch]["bleu4"] <= 1.0
    assert summary["seconds"] > 0
    results = json.loads((tmp_path / "demo" / "results.json").read_text())
    for name in ("metrics", "ablation", "correctness", "hallucination", "map", "masking", "finetune", "faithfulness",
                 "sanity"):
        assert set(results[name]) == {"gridtd", "sat"}, name
    assert set(results["hallucination"]["gridtd"]["auc"]) == {"lrp", "lrp_max", "guided_gradcam", "guided_gradcam_abs",
                                                             "gradcam", "attention", "one_minus_beta", "probability",
                                                             "entropy"}
    assert results["hallucination"]["sat"]["auc"]["one_minus_beta"] is None  # no sentinel: not defined
    assert results["hallucination"]["sat"]["added_value"]["one_minus_beta"] is None
    assert {"ebpg", "pointing_game", "f1_iou"} <= results["correctness"]["gridtd"][0].keys()
    assert "not defined: this decoder has no visual sentinel" in (tmp_path / "demo" / "results" / "sat" /
                                                                  "hallucination_auc.csv").read_text()
    text = (tmp_path / "demo" / "RESULTS.md").read_text()
    assert "Do the papers' findings hold here?" in text and "Table 5" in text and "**sat**" in text
    assert "Region perturbation (Samek et al. 2017)" in text and "cascading randomisation" in text
    assert "input invariance" in text and (tmp_path / "demo" / "results" / "sat" / "randomisation.png").is_file()
    assert (tmp_path / "demo" / "results" / "gridtd" / "correctness.png").is_file()
    report = (tmp_path / "demo" / "report.html").read_text()
    assert "https://" not in report and "Experiments" in report


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny untrained run folder and a few shapes images."""
    import captionlens as cl
    from captionlens.data.shapes import ShapesConfig, write_shapes_dataset

    root = tmp_path_factory.mktemp("explain")
    data = write_shapes_dataset(root / "data", ShapesConfig(train=2, val=1, test=2), progress=False)
    cap = cl.build_captioner("gridtd", encoder="shapes", vocab="a red blue circle square".split(), hidden_size=12,
                             embed_size=8)
    cap.save(root / "run")
    return root / "run", sorted((data / "images").glob("*.png"))[:2]


def test_explain_writes_json_heatmaps_and_figure(tiny_run, tmp_path):
    run, images = tiny_run
    result = runner.invoke(app, ["explain", "--model", str(run), *map(str, images), "--out", str(tmp_path),
                                 "--methods", "lrp,gradcam,attention", "--caption", "a red circle", "--epsilon", "0.1"])
    assert result.exit_code == 0, result.output
    folder = tmp_path / images[0].stem
    assert {p.name for p in folder.iterdir()} == {"caption.txt", "explanation.json", "lrp.npz", "gradcam.npz",
                                                  "attention.npz", "lrp.npy", "gradcam.npy", "attention.npy",
                                                  "figure.png", "heatmaps"}
    from PIL import Image
    with Image.open(images[0]) as photo:
        shape = photo.size
    pngs = sorted((folder / "heatmaps" / "lrp").iterdir())
    assert [p.name for p in pngs] == ["000_a.png", "001_red.png", "002_circle.png"]
    with Image.open(pngs[1]) as png:
        assert png.size == shape  # at the photo's shape
    report = json.loads((folder / "explanation.json").read_text())
    assert report["caption"] == ["a", "red", "circle"]
    assert report["methods"]["lrp"]["parameters"]["epsilon"] == 0.1
    assert len(report["methods"]["gradcam"]["preceding"]) == 3
    import numpy as np
    with np.load(folder / "lrp.npz") as heatmaps:
        assert heatmaps["image"].shape == (3, 64, 64) and heatmaps["grid"].shape == (3, 8, 8)
        assert np.array_equal(np.load(folder / "lrp.npy"), heatmaps["image"])


def test_explain_runs_and_records_each_precision(tiny_run, tmp_path):
    run, images = tiny_run
    for precision in ("bf16-vision", "bf16"):
        result = runner.invoke(app, ["explain", "--model", str(run), str(images[0]), "--out", str(tmp_path / precision),
                                     "--methods", "lrp", "--caption", "a red circle", "--precision", precision])
        assert result.exit_code == 0, result.output
        report = json.loads((tmp_path / precision / images[0].stem / "explanation.json").read_text())
        assert report["methods"]["lrp"]["parameters"]["precision"] == precision
    result = runner.invoke(app, ["explain", "--model", str(run), str(images[0]), "--out", str(tmp_path / "fp8"),
                                 "--precision", "fp8"])
    assert result.exit_code != 0 and "bf16-vision" in result.output  # the choices are named


def test_explain_rejects_bad_input(tiny_run, tmp_path):
    run, images = tiny_run
    result = runner.invoke(app, ["explain", "--model", str(run), str(images[0]), "--out", str(tmp_path),
                                 "--methods", "lrp,saliency"])
    assert result.exit_code != 0 and "saliency" in result.output
    result = runner.invoke(app, ["explain", "--model", str(run), str(images[0]), "--out", str(tmp_path),
                                 "--caption", "a red circle", "--words", "7"])
    assert result.exit_code != 0 and "out of range" in result.output
    (tmp_path / "broken.png").write_bytes(b"\x89PNG nope")
    result = runner.invoke(app, ["explain", "--model", str(run), str(tmp_path / "broken.png"), "--out", str(tmp_path)])
    assert result.exit_code != 0 and "cannot read" in result.output


def test_data_coco2017_writes_a_karpathy_json_with_the_papers_split(tmp_path):
    annotations = tmp_path / "annotations"
    annotations.mkdir()
    for name, ids in (("train", range(1, 9)), ("val", range(50, 53))):
        (annotations / f"captions_{name}2017.json").write_text(json.dumps({
            "images": [{"id": i, "file_name": f"{i:012d}.jpg"} for i in ids],
            "annotations": [{"id": 10 * i, "image_id": i, "caption": f"A cat number {i}."} for i in ids]}))
    (annotations / "instances_val2017.json").write_text(json.dumps({"images": [], "annotations": [], "categories": []}))
    command = ["data", "coco2017", "--annotations", str(annotations), "--images", str(tmp_path / "coco"),
               "--out", str(tmp_path / "out"), "--val-size", "3"]
    result = runner.invoke(app, command)
    assert result.exit_code != 0 and "--images" in result.output and "train2017" in result.output  # no images there yet
    for folder, ids in (("train2017", range(1, 9)), ("val2017", range(50, 53))):
        (tmp_path / "coco" / folder).mkdir(parents=True, exist_ok=True)
        for i in ids:
            Image.new("RGB", (8, 6)).save(tmp_path / "coco" / folder / f"{i:012d}.jpg")
    result = runner.invoke(app, command)
    assert result.exit_code == 0, result.output
    written = json.loads((tmp_path / "out" / "dataset_coco2017.json").read_text())
    splits = [image["split"] for image in written["images"]]
    assert splits.count("test") == 3 and splits.count("val") == 3 and splits.count("train") == 5
    assert {image["filepath"] for image in written["images"] if image["split"] == "test"} == {"val2017"}
    descriptor = json.loads((tmp_path / "out" / "captionlens_dataset.json").read_text())
    assert descriptor["instances"] == [str((annotations / "instances_val2017.json").resolve())]  # referenced, not copied
    assert descriptor["captions"] == "dataset_coco2017.json" and descriptor["synonyms"] == "coco"
    result = runner.invoke(app, ["data", "coco2017", "--annotations", str(tmp_path), "--images", str(tmp_path),
                                 "--out", str(tmp_path / "o2")])
    assert result.exit_code != 0


def test_caption_and_explain_take_folders_and_globs_and_go_on_past_a_broken_image(tiny_run, tmp_path):
    """A folder (or a quoted glob) stands for its images; a broken file among them is reported at the
    end with exit code 1, after every other image was captioned / explained."""
    import shutil

    run, images = tiny_run
    photos = tmp_path / "photos"
    photos.mkdir()
    for image in images:
        shutil.copy(image, photos / image.name)
    (photos / "broken.png").write_bytes(b"not an image")
    (photos / "notes.txt").write_text("not an image either, and not taken for one")
    result = runner.invoke(app, ["caption", "--model", str(run), str(photos), "--json"])
    assert result.exit_code == 1
    captioned = [json.loads(line)["image"] for line in result.stdout.splitlines()]
    assert sorted(c.rsplit("/", 1)[-1] for c in captioned) == sorted(i.name for i in images)
    assert "1 of 3 images could not be captioned" in result.output and "broken.png" in result.output
    result = runner.invoke(app, ["explain", "--model", str(run), str(photos), "--out", str(tmp_path / "x"),
                                 "--methods", "gradcam", "--caption", "a red circle"])
    assert result.exit_code == 1, result.output
    assert {p.name for p in (tmp_path / "x").iterdir() if p.is_dir()} == {i.stem for i in images}
    assert "1 of 3 images could not be explained" in result.output and "broken.png" in result.output
    result = runner.invoke(app, ["caption", "--model", str(run), str(photos / "shapes_*.png")])
    assert result.exit_code == 0 and len(result.stdout.splitlines()) == len(images), result.output
    for missing in (str(photos / "*.gif"), str(tmp_path / "nowhere")):
        result = runner.invoke(app, ["caption", "--model", str(run), missing])
        assert result.exit_code == 2 and "no " in result.output and "Traceback" not in result.output


def test_explain_warns_of_unknown_words_and_of_maps_that_are_all_zero(tiny_run, tmp_path):
    """Words the model does not know are named (explained as <unk>); a model whose gradients vanish
    gets a warning instead of silent all-zero maps; warnings read as one "warning:" line."""
    import torch

    import captionlens as cl

    run, images = tiny_run
    result = runner.invoke(app, ["explain", "--model", str(run), str(images[0]), "--out", str(tmp_path / "a"),
                                 "--methods", "gradcam", "--caption", "a red zebra"])
    assert result.exit_code == 0, result.output
    assert "warning: " in result.output and "'zebra'" in result.output and "<unk>" in result.output
    assert f"{images[0].name}: 3 words" in result.output and "gradcam" in result.output  # progress inside the image
    assert "UserWarning" not in result.output
    saturated = cl.load(run)
    with torch.no_grad():  # every weight of the shapes encoder zero: no gradient reaches the pixels
        for parameter in saturated.model.encoder.parameters():
            parameter.zero_()
    saturated.save(tmp_path / "saturated")
    result = runner.invoke(app, ["explain", "--model", str(tmp_path / "saturated"), str(images[0]), "--out",
                                 str(tmp_path / "b"), "--methods", "gradient_x_input", "--caption", "a red circle"])
    assert result.exit_code == 0, result.output
    assert "every gradient_x_input map is exactly zero" in result.output


def test_report_reuses_an_explain_folder_without_explaining_again(tiny_run, tmp_path, monkeypatch):
    """`report --explained DIR` reads what `explain --out DIR` wrote: every image and word, no model."""
    run, images = tiny_run
    result = runner.invoke(app, ["explain", "--model", str(run), *map(str, images), "--out", str(tmp_path / "x"),
                                 "--methods", "lrp,attention", "--caption", "a blue square"])
    assert result.exit_code == 0, result.output

    def never(*args, **kwargs):
        raise AssertionError("explained again")
    monkeypatch.setattr("captionlens.report.html.explain", never)
    result = runner.invoke(app, ["report", "--explained", str(tmp_path / "x"), "--out", str(tmp_path / "r.html")])
    assert result.exit_code == 0, result.output
    page = (tmp_path / "r.html").read_text()
    assert all(f"<h2>{image.stem}</h2>" in page for image in images)
    assert page.count('<td class="word">square</td>') == len(images) and page.count('class="map"') == 2 * 3 * 2
    result = runner.invoke(app, ["report", "--explained", str(tmp_path), "--out", str(tmp_path / "r2.html")])
    assert result.exit_code == 2 and "no explanation.json" in result.output
    result = runner.invoke(app, ["report", "--out", str(tmp_path / "r3.html")])
    assert result.exit_code == 2 and "--model" in result.output
