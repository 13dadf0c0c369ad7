"""The embedded shapes world: formats, determinism, the planted bias, boxes that hold the objects."""
import hashlib
import json

import numpy as np
import pytest
from PIL import Image

from captionlens.data.bundle import open_data
from captionlens.data.shapes import COLOURS, SHAPES, ShapesConfig, generate_image, image_file_name, sample_scene


def test_files_follow_the_real_formats(tiny_shapes):
    karpathy = json.loads((tiny_shapes / "dataset_shapes.json").read_text())
    image = karpathy["images"][0]
    assert {"filepath", "filename", "imgid", "cocoid", "split", "sentids", "sentences"} <= image.keys()
    assert {"tokens", "raw", "imgid", "sentid"} <= image["sentences"][0].keys()
    assert len(image["sentences"]) == 5
    instances = json.loads((tiny_shapes / "instances_shapes.json").read_text())
    assert {"images", "annotations", "categories"} <= instances.keys()
    annotation = instances["annotations"][0]
    assert {"id", "image_id", "category_id", "bbox", "area", "iscrowd"} <= annotation.keys()
    assert [c["name"] for c in instances["categories"]] == list(SHAPES)
    synonyms = json.loads((tiny_shapes / "synonyms.json").read_text())
    assert synonyms["circles"] == "circle" and synonyms["disk"] == "circle" and synonyms["boxes"] == "square"
    bundle = open_data(tiny_shapes)
    assert [len(bundle.split(s)) for s in ("train", "val", "test")] == [40, 10, 10]
    assert all(r.path.is_file() for r in bundle.captions.images)



def test_image_file_names_number_the_splits_in_order(tiny_shapes):
    """Documentation names the demo's images by file (``image_file_name``): each split's images are
    those names, in order, and each name's number is the image's id in the COCO file."""
    config = ShapesConfig(train=40, val=10, test=10, seed=3)  # the tiny_shapes world
    bundle = open_data(tiny_shapes)
    for split in ("train", "val", "test"):
        assert [r.path.name for r in bundle.split(split)] == [image_file_name(config, split, i)
                                                              for i in range(getattr(config, split))]
    instances = json.loads((tiny_shapes / "instances_shapes.json").read_text())
    assert all(image["file_name"] == f"shapes_{image['id']:06d}.png" for image in instances["images"])
    assert image_file_name(config, "test", 0) == "shapes_000050.png"

def test_deterministic_per_seed():
    config = ShapesConfig(seed=11)
    first, objects, captions = generate_image(config, "train", 5)
    again, objects_again, captions_again = generate_image(config, "train", 5)
    assert np.array_equal(np.asarray(first), np.asarray(again)) and captions == captions_again
    other = generate_image(ShapesConfig(seed=12), "train", 5)
    assert not np.array_equal(np.asarray(first), np.asarray(other[0]))


def test_boxes_hold_the_object_pixels(tiny_shapes):
    bundle = open_data(tiny_shapes)
    for record in bundle.split("train")[:10]:
        pixels = np.asarray(Image.open(record.path), dtype=float)
        for box in bundle.objects.boxes[record.image_id]:
            x0, y0 = int(box.x), int(box.y)
            x1, y1 = int(np.ceil(box.x + box.width)), int(np.ceil(box.y + box.height))
            assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64
            colour = np.array(COLOURS[dict(box.attributes)["colour"]], dtype=float)
            close = np.linalg.norm(pixels - colour, axis=2) < 60  # pixels of the object's colour
            inside = close[y0:y1, x0:x1].sum()
            assert inside >= 10  # the shape is drawn inside its box


def test_captions_are_varied_and_name_the_objects(tiny_shapes):
    bundle = open_data(tiny_shapes)
    starts = set()
    for record in bundle.captions.images:
        objects = bundle.objects.categories_in(record.image_id)
        for caption in record.captions:
            starts.add(" ".join(caption[:2]))
            named = bundle.synonyms.categories_in(caption)
            assert named <= objects  # the grammar never names an absent object
        assert len({" ".join(c) for c in record.captions}) >= 3
    assert len(starts) >= 8  # many sentence forms, not one template


def test_co_occurrence_bias_in_train_not_in_test():
    config = ShapesConfig(bias_partner="circle", bias_word="square", bias_p=0.9)
    rng = np.random.default_rng(0)

    def p_word_given_partner(biased):
        scenes = [sample_scene(rng, config, biased) for _ in range(3000)]
        with_partner = [{o.shape for o in s} for s in scenes if any(o.shape == "circle" for o in s)]
        return np.mean(["square" in shapes for shapes in with_partner])

    assert p_word_given_partner(True) > 0.85
    assert p_word_given_partner(False) < 0.4


def test_reverse_bias_plants_the_partner_beside_the_word_in_train_only():
    config = ShapesConfig(bias_p=0.0, bias_reverse_p=0.8)
    rng = np.random.default_rng(1)

    def p_partner_given_word(biased):
        scenes = [{o.shape for o in sample_scene(rng, config, biased)} for _ in range(3000)]
        return np.mean(["circle" in shapes for shapes in scenes if "square" in shapes])

    assert p_partner_given_word(True) > 0.75
    assert p_partner_given_word(False) < 0.4


def test_the_reverse_bias_changes_only_scenes_with_the_word_alone():
    one_way, two_way = ShapesConfig(bias_reverse_p=0.0), ShapesConfig(bias_reverse_p=1.0)
    for seed in range(200):  # the reverse draw happens only when a square comes without a circle
        scene = [o.shape for o in sample_scene(np.random.default_rng(seed), one_way, True)]
        planted = [o.shape for o in sample_scene(np.random.default_rng(seed), two_way, True)]
        if "square" in scene and "circle" not in scene:
            assert "circle" in planted and "square" in planted
        else:
            assert planted == scene


def test_config_is_validated():
    with pytest.raises(ValueError):
        ShapesConfig(bias_word="unicorn")
    with pytest.raises(ValueError):
        ShapesConfig(bias_p=1.5)
    with pytest.raises(ValueError, match="bias_reverse_p"):
        ShapesConfig(bias_reverse_p=-0.1)


def test_dataset_files_are_identical_for_the_same_seed(tmp_path):
    from captionlens.data.shapes import write_shapes_dataset

    def digest(folder):
        h = hashlib.sha1()
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                h.update(path.name.encode() + path.read_bytes())
        return h.hexdigest()

    config = ShapesConfig(train=6, val=2, test=2, seed=5)
    assert digest(write_shapes_dataset(tmp_path / "a", config, False)) == digest(
        write_shapes_dataset(tmp_path / "b", config, False))
