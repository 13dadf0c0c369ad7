"""The papers' real setting on fixture datasets written here in the exact on-disk layouts of Karpathy's
dataset_coco.json / dataset_flickr30k.json and of COCO 2017 (captions_*2017.json, instances_*2017.json):
every verb runs on each, from a folder made by `captionlens data ...` whose images live elsewhere;
and planted cases for the synonym matching, the two ground truths, subsets and strict JSON."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import captionlens as cl
from captionlens.cli import app
from captionlens.data.bundle import open_data
from captionlens.data.ground_truth import ObjectsUnavailable, ReferenceGroundTruth, Subset
from captionlens.data.images import ImageLoadError, decoded_batches
from captionlens.data.karpathy import ImageRecord
from captionlens.data.synonyms import Synonyms

runner = CliRunner()

# Each image: (reference captions, COCO boxes as (category id, [x, y, w, h], iscrowd)).
# COCO's category ids are not contiguous: 1 person, 18 dog, 88 teddy bear.
CATEGORIES = [{"id": 1, "name": "person", "supercategory": "person"},
              {"id": 18, "name": "dog", "supercategory": "animal"},
              {"id": 88, "name": "teddy bear", "supercategory": "indoor"}]
SCENES = [
    (["A man walks a dog on the grass.", "A man with his dog.", "A guy and a puppy outside."],
     [(1, [4, 4, 20, 40], 0), (18, [30, 30, 20, 14], 0)]),
    (["A teddy bear on a bed.", "Two teddy bears sit on a bed.", "A stuffed teddy bear."], [(88, [10, 10, 30, 30], 0)]),
    (["A man in a red shirt.", "A man wearing a shirt.", "A man stands in a shirt."], [(1, [8, 2, 30, 44], 0)]),
    (["A woman in a dress with a dog.", "A lady and her dog.", "A woman wearing a dress walks a dog."],
     [(1, [2, 2, 20, 44], 0), (18, [30, 20, 24, 20], 0)]),
    (["A crowd of people in a street.", "Many people on a street.", "A group of people walking."],
     [(1, [0, 0, 64, 48], 1)]),  # a crowd box
    (["A man and a dog in the snow.", "A dog runs near a man.", "A man plays with a dog."],
     [(1, [2, 4, 16, 40], 0), (18, [28, 26, 26, 18], 0)]),
]


def _picture(index: int, mode: str) -> Image.Image:
    rng = np.random.default_rng(index)
    pixels = (rng.random((48, 64, 3)) * 255).astype(np.uint8)  # non-square, like real photos
    image = Image.fromarray(pixels)
    return image.convert("L") if mode == "L" else image.convert("CMYK") if mode == "CMYK" else image


def _write_jpeg(path: Path, index: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    _picture(index, ("RGB", "L", "CMYK")[index % 3]).save(path, format="JPEG")  # greyscale and CMYK JPEGs too


def _instances(entries) -> dict:
    """COCO instances for [(image id, file name, scene index)]."""
    annotations, next_id = [], 1000
    for image_id, _, scene in entries:
        for category, box, crowd in SCENES[scene][1]:
            annotations.append({"id": next_id, "image_id": image_id, "category_id": category, "bbox": box,
                                "area": box[2] * box[3], "iscrowd": crowd, "segmentation": []})
            next_id += 7
    return {"info": {}, "licenses": [], "categories": CATEGORIES, "annotations": annotations,
            "images": [{"id": i, "file_name": name, "width": 64, "height": 48} for i, name, _ in entries]}


def _sentences(scene: int, imgid: int, first_sentid: int) -> list[dict]:
    from captionlens.data.vocab import tokenize

    return [{"tokens": tokenize(raw), "raw": raw, "imgid": imgid, "sentid": first_sentid + k}
            for k, raw in enumerate(SCENES[scene][0])]


SPLITS = ["train", "restval", "train", "train", "val", "test", "test", "test", "train", "restval", "val", "test"]


def write_karpathy_coco(root: Path) -> tuple[Path, Path, Path]:
    """dataset_coco.json (filepath/cocoid, restval), images under coco/{train,val}2014, annotations/."""
    images, per_folder = [], {"train2014": [], "val2014": []}
    for imgid, split in enumerate(SPLITS):
        folder = "train2014" if split == "train" else "val2014"
        cocoid = 100000 + 37 * imgid
        name = f"COCO_{folder}_{cocoid:012d}.jpg"
        _write_jpeg(root / "downloads" / "coco" / folder / name, imgid)
        scene = imgid % len(SCENES)
        per_folder[folder].append((cocoid, name, scene))
        sentences = _sentences(scene, imgid, 10 * imgid)
        images.append({"filepath": folder, "filename": name, "imgid": imgid, "split": split, "cocoid": cocoid,
                       "sentids": [s["sentid"] for s in sentences], "sentences": sentences})
    (root / "downloads").mkdir(parents=True, exist_ok=True)
    json_path = root / "downloads" / "dataset_coco.json"
    json_path.write_text(json.dumps({"dataset": "coco", "images": images}))
    annotations = root / "downloads" / "annotations"
    annotations.mkdir()
    for folder, entries in per_folder.items():
        (annotations / f"instances_{folder}.json").write_text(json.dumps(_instances(entries)))
    return json_path, root / "downloads" / "coco", annotations


def write_karpathy_flickr30k(root: Path) -> tuple[Path, Path]:
    """dataset_flickr30k.json: no filepath, no cocoid; images flat in flickr30k-images/."""
    images = []
    for imgid, split in enumerate(s if s != "restval" else "train" for s in SPLITS):
        name = f"{1000092795 + imgid * 13}.jpg"
        _write_jpeg(root / "downloads" / "flickr30k-images" / name, imgid)
        sentences = _sentences(imgid % len(SCENES), imgid, 10 * imgid)
        images.append({"filename": name, "imgid": imgid, "split": split,
                       "sentids": [s["sentid"] for s in sentences], "sentences": sentences})
    json_path = root / "downloads" / "dataset_flickr30k.json"
    json_path.write_text(json.dumps({"dataset": "flickr30k", "images": images}))
    return json_path, root / "downloads" / "flickr30k-images"


def write_coco2017(root: Path) -> tuple[Path, Path]:
    """annotations/captions_{train,val}2017.json + instances_val2017.json; images in coco/{train,val}2017."""
    annotations = root / "downloads" / "annotations"
    annotations.mkdir(parents=True)
    for folder, ids in (("train2017", range(1, 9)), ("val2017", range(500, 505))):
        entries = [(i, f"{i:012d}.jpg", i % len(SCENES)) for i in ids]
        for i, name, _ in entries:
            _write_jpeg(root / "downloads" / "coco" / folder / name, i)
        captions = [{"id": 31 * i + k, "image_id": i, "caption": raw}
                    for i, _, scene in entries for k, raw in enumerate(SCENES[scene][0])]
        (annotations / f"captions_{folder}.json").write_text(json.dumps(
            {"info": {}, "licenses": [], "images": [{"id": i, "file_name": n, "width": 64, "height": 48}
                                                    for i, n, _ in entries], "annotations": captions}))
        if folder == "val2017":
            (annotations / "instances_val2017.json").write_text(json.dumps(_instances(entries)))
    return annotations, root / "downloads" / "coco"


@pytest.fixture(scope="module")
def encoder_weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("encoder") / "shapes_encoder.safetensors"
    result = runner.invoke(app, ["pretrain-encoder", "--out", str(path), "--images", "16", "--epochs", "1"])
    assert result.exit_code == 0, result.output
    return path


def make_dataset(kind: str, root: Path) -> Path:
    """A dataset folder made by `captionlens data KIND`, its downloads elsewhere."""
    folder = root / f"data-{kind}"
    if kind == "coco":
        json_path, images, annotations = write_karpathy_coco(root)
        command = ["data", "coco", "--json", str(json_path), "--images", str(images), "--instances", str(annotations)]
    elif kind == "flickr30k":
        json_path, images = write_karpathy_flickr30k(root)
        command = ["data", "flickr30k", "--json", str(json_path), "--images", str(images)]
    else:
        annotations, images = write_coco2017(root)
        command = ["data", "coco2017", "--annotations", str(annotations), "--images", str(images), "--val-size", "2"]
    result = runner.invoke(app, [*command, "--out", str(folder)])
    assert result.exit_code == 0, result.output
    return folder


def _strict_json(path: Path):
    return json.loads(path.read_text(), parse_constant=lambda token: pytest.fail(f"{token} in {path}"))


@pytest.mark.parametrize("kind", ["coco", "flickr30k", "coco2017"])
def test_every_verb_runs_on_the_real_layouts(kind, tmp_path, encoder_weights, monkeypatch):
    data = make_dataset(kind, tmp_path)
    assert {p.name for p in data.iterdir()} <= {"captionlens_dataset.json", "dataset_coco2017.json"}  # nothing copied
    run = tmp_path / "run"
    result = runner.invoke(app, ["train", "--data", str(data), "--arch", "gridtd", "--out", str(run), "--epochs", "2",
                                 "--hidden-size", "16", "--embed-size", "8", "--batch-size", "4", "--min-count", "1",
                                 "--encoder-weights", str(encoder_weights), "--workers", "0"])
    assert result.exit_code == 0, result.output
    captioner = cl.load(run)  # so few images teach nothing: make the model say "dog", object words occur
    with torch.no_grad():
        captioner.model.decoder.fc.bias[captioner.vocab.index("dog")] += 8.0
    captioner.config.max_length = 3
    captioner.save(run)
    # the images move: --images on every verb points at their new home
    moved = tmp_path / "elsewhere"
    descriptor = json.loads((data / "captionlens_dataset.json").read_text())
    shutil.move(descriptor["images"], moved)
    out = tmp_path / "results"
    common = ["--model", str(run), "--data", str(data), "--out", str(out), "--workers", "0"]
    result = runner.invoke(app, ["evaluate", *common])
    assert result.exit_code != 0 and "--images" in result.output  # the old root is gone: say which option fixes it
    common += ["--images", str(moved)]
    result = runner.invoke(app, ["evaluate", *common])
    assert result.exit_code == 0, result.output
    assert "CIDEr" in result.output and "object precision" in result.output
    ground_truth = "references" if kind == "flickr30k" else "boxes"
    assert f"ground truth       {ground_truth}" in result.output
    result = runner.invoke(app, ["hallucination", *common, "--min-count", "0"])
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert printed["ground_truth"] == ground_truth and printed["true_positives"] + printed["false_positives"] > 0
    rows = _strict_json(out / "hallucination_auc.json")
    assert {r["ground_truth"] for r in rows} == {ground_truth}
    assert all(r["auc"] is not None or r["note"] for r in rows)  # an empty cell says why
    result = runner.invoke(app, ["map", *common, "--min-count", "0"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["correctness", *common])
    assert result.exit_code == 0, result.output
    correctness = _strict_json(out / "correctness.json")
    if kind == "flickr30k":  # no boxes: reported as not available, not a crash
        assert "not available" in correctness[0]["note"]
    else:
        assert correctness[0]["ground_truth"] == "boxes" and correctness[0]["mentions"] > 0
    result = runner.invoke(app, ["ablation", *common, "--skip", "1"])
    assert result.exit_code == 0 and "| object | lrp |" in result.stdout, result.output
    result = runner.invoke(app, ["masking", *common, "--words", "2"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["finetune", *common, "--mode", "plain", "--seeds", "0", "--steps", "1",
                                 "--train-limit", "4", "--min-count", "0", "--batch-size", "2",
                                 "--subset-words", "dog", "--exclude-word", "shirt"])
    assert result.exit_code == 0 and "| plain |" in result.stdout, result.output
    assert "hallucination_rate" in _strict_json(out / "finetune.json")[0]
    for table in out.glob("*.json"):
        _strict_json(table)
    report = tmp_path / "report.html"
    result = runner.invoke(app, ["report", "--run", str(run), "--data", str(data), "--image-root", str(moved),
                                 "--count", "1", "--methods", "lrp,attention", "--out", str(report)])
    assert result.exit_code == 0 and report.is_file(), result.output
    served = {}
    monkeypatch.setattr("captionlens.viewer.server.serve", lambda application, *args, **kwargs: served.setdefault("app", application))
    result = runner.invoke(app, ["serve", "--model", str(run), "--data", str(data), "--images", str(moved)])
    assert result.exit_code == 0, result.output
    from fastapi.testclient import TestClient

    client = TestClient(served["app"])
    images = client.get("/api/images").json()
    assert len(images) == len(open_data(data, image_root=moved).split("test"))
    assert client.get(f"/api/images/{images[0]['id']}").headers["content-type"] == "image/png"


# ------------------------------------------------------------------------------ planted cases
def test_synonyms_match_longest_phrases_first():
    coco = Synonyms.builtin("coco")
    assert len(coco.categories) == 80 and "teddy bear" in coco.categories and "hot dog" in coco.categories
    words = "a baby bird near a hot dog and two teddy bears on a toilet seat".split()
    found = coco.find(words)
    assert [(words[o.position], o.category) for o in found] == [
        ("bird", "bird"), ("dog", "hot dog"), ("bears", "teddy bear"), ("seat", "toilet")]
    assert coco.categories_in("a man and two dogs".split()) == {"person", "dog"}
    assert coco.categories_in("a baby animal".split()) == set()  # CHAIR: not a person
    flickr = Synonyms.builtin("flickr30k")
    clothes = ["kilt", "jacket", "uniform", "coat", "dress", "suit", "jersey", "outfit", "polka", "bikini", "swimsuit",
               "plaid", "bib", "skirt"]
    frequent = ["man", "shirt", "woman", "people", "group", "street", "dog", "bench", "boy"]
    assert all(flickr.category(w) == w for w in clothes + frequent)
    assert flickr.category("men") == "man" and flickr.categories_in("a red t shirt".split()) == {"shirt"}


def test_synonym_files_in_both_formats_and_clear_errors(tmp_path):
    (tmp_path / "pairs.json").write_text(json.dumps({"puppy": "dog", "hot dog": "food"}))
    pairs = Synonyms.load(tmp_path / "pairs.json")
    assert pairs.categories_in("a hot dog and a puppy".split()) == {"food", "dog"}
    (tmp_path / "lists.json").write_text(json.dumps({"categories": {"teddy bear": ["teddy bears"]}}))
    assert Synonyms.load(tmp_path / "lists.json").categories_in(["teddy", "bears"]) == {"teddy bear"}
    (tmp_path / "twice.json").write_text(json.dumps({"categories": {"a": ["x"], "b": ["x"]}}))
    with pytest.raises(ValueError, match="'x' is listed under both"):
        Synonyms.load(tmp_path / "twice.json")
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a synonym list"):
        Synonyms.load(tmp_path / "bad.json")
    with pytest.raises(FileNotFoundError, match="--synonyms"):
        Synonyms.load(tmp_path / "missing.json")


def test_reference_captions_label_true_and_false_positives():
    synonyms = Synonyms.builtin("coco")
    record = ImageRecord(1, Path("x.jpg"), "test", [["a", "puppy", "on", "grass"], ["two", "teddy", "bears"]])
    truth = ReferenceGroundTruth(synonyms)
    assert truth.objects(record) == {"dog", "teddy bear"}
    caption = "a dog and a cat near a teddy bear".split()
    labels = {caption[o.position]: o.category in truth.objects(record) for o in synonyms.find(caption)}
    assert labels == {"dog": True, "cat": False, "bear": True}  # in references: TP; absent: FP; multi-word: TP


def test_ground_truth_sources_and_what_is_missing(tmp_path):
    json_path, images, annotations = write_karpathy_coco(tmp_path)
    boxes = open_data(json_path, image_root=images, instances=annotations)
    truth = boxes.ground_truth()
    assert truth.source == "boxes" and "instances_val2014.json" in truth.description
    test = boxes.split("test")
    assert truth.objects(test[0]) == {"person", "dog"}  # non-contiguous ids 1 and 18 map to their names
    assert truth.objects(boxes.split("val")[0]) == {"person"}  # only a crowd box: it counts
    assert truth.objects(boxes.split("train")[1]) == {"teddy bear"}  # restval is training data
    assert boxes.ground_truth("references").objects(test[0]) == {"person", "dog"}  # "guy", "puppy" ...
    plain = open_data(json_path, image_root=images)  # no instances beside the JSON, no synonyms for 'coco'?
    assert plain.ground_truth().source == "references"  # the built-in coco list applies by the dataset's name
    with pytest.raises(ObjectsUnavailable, match="--instances"):
        plain.ground_truth("boxes")
    unnamed = json.loads(json_path.read_text()) | {"dataset": "mine"}
    (tmp_path / "dataset_mine.json").write_text(json.dumps(unnamed))
    with pytest.raises(ObjectsUnavailable, match="--synonyms"):
        open_data(tmp_path / "dataset_mine.json", image_root=images).ground_truth()


def test_subsets_of_the_papers():
    synonyms = Synonyms.builtin("flickr30k")
    records = [ImageRecord(i, Path(f"{i}.jpg"), "test", [c.split()]) for i, c in enumerate(
        ["a man in a red dress", "a man in a shirt and a jacket", "a woman in two dresses", "a dog"])]
    clothes = Subset.named("clothes")
    assert [r.image_id for r in clothes.select(records, synonyms)] == [0, 2]  # 1 mentions the shirt
    assert [r.image_id for r in Subset(("dog",)).select(records, synonyms)] == [3]
    assert Subset.from_options(None, "dress, coat", "shirt") == Subset(("dress", "coat"), ("shirt",))
    assert Subset.from_options(None, None, None) is None
    with pytest.raises(ValueError, match="--exclude-word needs"):
        Subset.from_options(None, None, "shirt")
    with pytest.raises(ValueError, match="no subset named"):
        Subset.from_options("hats", None, None)


def test_descriptor_paths_and_overrides(tmp_path):
    json_path, images = write_karpathy_flickr30k(tmp_path)
    inside = tmp_path / "downloads"
    result = runner.invoke(app, ["data", "flickr30k", "--json", str(json_path), "--images", str(images), "--out", str(inside)])
    assert result.exit_code == 0, result.output
    descriptor = json.loads((inside / "captionlens_dataset.json").read_text())
    assert descriptor["captions"] == "dataset_flickr30k.json" and descriptor["images"] == "flickr30k-images"
    moved = tmp_path / "moved"
    shutil.move(inside, moved)  # relative paths travel with the folder
    bundle = open_data(moved)
    assert bundle.name == "flickr30k" and bundle.default_min_count == 3 and bundle.synonyms.source.startswith("built-in")
    result = runner.invoke(app, ["data", "flickr30k", "--json", str(tmp_path / "nope.json"), "--images", str(images),
                                 "--out", str(tmp_path / "x")])
    assert result.exit_code != 0 and "nope.json" in result.output
    result = runner.invoke(app, ["data", "coco", "--json", str(moved / "dataset_flickr30k.json"), "--images",
                                 str(tmp_path), "--out", str(tmp_path / "y")])
    assert result.exit_code != 0 and "--images" in result.output


def test_images_decode_in_workers_exactly_as_in_process(tmp_path):
    json_path, images, _ = write_karpathy_coco(tmp_path)
    paths = [r.path for r in open_data(json_path, image_root=images).captions.images]
    batches = [paths[:5], paths[5:]]
    alone = list(decoded_batches(batches, 32, workers=0))
    parallel = list(decoded_batches(batches, 32, workers=2))
    assert all(torch.equal(a, b) for a, b in zip(alone, parallel, strict=True))
    assert alone[0].dtype == torch.uint8 and alone[0].shape == (5, 3, 32, 32)
    grey, cmyk = alone[0][1], alone[0][2]  # greyscale and CMYK JPEGs come out as RGB
    assert torch.equal(grey[0], grey[1]) and cmyk.shape == (3, 32, 32)
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    list(decoded_batches(batches, 32, workers=1))
    assert torch.equal(torch.rand(3), expected)  # decoding never shifts the random stream training uses
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    with pytest.raises(ImageLoadError, match="broken.jpg"):
        list(decoded_batches([[paths[0], tmp_path / "broken.jpg"]], 32, workers=2))
