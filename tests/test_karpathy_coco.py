"""The real datasets' formats, on small fixture files written exactly in those formats."""
import json

import pytest

from captionlens.data.bundle import open_data
from captionlens.data.coco import ObjectAnnotations
from captionlens.data.karpathy import coco2017_split, load_karpathy, write_karpathy
from captionlens.data.vocab import Vocabulary


def _sentence(raw, imgid, sentid):
    return {"tokens": raw.lower().rstrip(".").split(), "raw": raw, "imgid": imgid, "sentid": sentid}


def test_flickr30k_karpathy_json(tmp_path):
    # dataset_flickr30k.json has no filepath and no cocoid
    data = {"dataset": "flickr30k", "images": [
        {"filename": "1000092795.jpg", "imgid": 0, "split": "train", "sentids": [0, 1],
         "sentences": [_sentence("Two young guys with shaggy hair.", 0, 0), _sentence("Two men outside.", 0, 1)]},
        {"filename": "10002456.jpg", "imgid": 1, "split": "test", "sentids": [2],
         "sentences": [_sentence("Several men in hard hats.", 1, 2)]},
    ]}
    (tmp_path / "dataset_flickr30k.json").write_text(json.dumps(data))
    bundle = open_data(tmp_path, image_root=tmp_path / "flickr30k-images", check_images=False)
    assert bundle.captions.name == "flickr30k" and bundle.default_min_count == 3
    train = bundle.split("train")
    assert [r.path.name for r in train] == ["1000092795.jpg"]
    assert train[0].path.parent == tmp_path / "flickr30k-images"
    assert train[0].captions[1] == ["two", "men", "outside"]
    assert bundle.split("test")[0].image_id == 1


def test_coco_karpathy_json_restval_is_train(tmp_path):
    data = {"dataset": "coco", "images": [
        {"filepath": "val2014", "filename": "COCO_val2014_000000391895.jpg", "imgid": 0, "split": "restval",
         "cocoid": 391895, "sentids": [0], "sentences": [_sentence("A man with a red helmet.", 0, 0)]},
        {"filepath": "val2014", "filename": "COCO_val2014_000000522418.jpg", "imgid": 1, "split": "val",
         "cocoid": 522418, "sentids": [1], "sentences": [_sentence("A woman cutting a cake.", 1, 1)]},
    ]}
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps(data))
    dataset = load_karpathy(path, tmp_path / "coco")
    assert [r.split for r in dataset.images] == ["train", "val"]
    assert dataset.images[0].image_id == 391895
    assert dataset.images[0].path == tmp_path / "coco" / "val2014" / "COCO_val2014_000000391895.jpg"
    write_karpathy(dataset, tmp_path / "again" / "dataset_coco.json", tmp_path / "coco")
    again = load_karpathy(tmp_path / "again" / "dataset_coco.json", tmp_path / "coco")
    assert [(r.path, r.split, r.captions) for r in again.images] == [(r.path, r.split, r.captions) for r in dataset.images]


def test_coco2017_split_val2017_is_test_and_val_drawn_from_train(tmp_path):
    def captions_file(name, ids):
        return {"images": [{"id": i, "file_name": f"{i:012d}.jpg"} for i in ids],
                "annotations": [{"id": 10 * i + k, "image_id": i, "caption": f"A Photo number {i}, take {k}."}
                                for i in ids for k in range(5)]}
    (tmp_path / "captions_train2017.json").write_text(json.dumps(captions_file("train", range(1, 21))))
    (tmp_path / "captions_val2017.json").write_text(json.dumps(captions_file("val", range(100, 105))))
    dataset = coco2017_split(tmp_path / "captions_train2017.json", tmp_path / "captions_val2017.json", tmp_path,
                             val_size=4, seed=1)
    assert len(dataset.split("test")) == 5 and len(dataset.split("val")) == 4 and len(dataset.split("train")) == 16
    assert all(r.path.parent.name == "val2017" for r in dataset.split("test"))
    assert all(r.path.parent.name == "train2017" for r in dataset.split("val"))
    assert dataset.split("test")[0].captions[0] == ["a", "photo", "number", "100", "take", "0"]
    again = coco2017_split(tmp_path / "captions_train2017.json", tmp_path / "captions_val2017.json", tmp_path,
                           val_size=4, seed=1)
    assert [r.image_id for r in again.split("val")] == [r.image_id for r in dataset.split("val")]
    with pytest.raises(ValueError):
        coco2017_split(tmp_path / "captions_train2017.json", tmp_path / "captions_val2017.json", tmp_path, val_size=99)


def test_vocabulary_min_count_on_training_split_only(tmp_path):
    data = {"dataset": "coco", "images": [
        {"filepath": "x", "filename": f"{i}.jpg", "imgid": i, "cocoid": i, "split": split, "sentids": [i],
         "sentences": [_sentence(text, i, i)]}
        for i, (split, text) in enumerate([("train", "a dog"), ("train", "a dog"), ("train", "a dog barks"),
                                           ("train", "a dog"), ("train", "a dog"), ("test", "zebra zebra zebra zebra zebra")])]}
    (tmp_path / "dataset_coco.json").write_text(json.dumps(data))
    bundle = open_data(tmp_path, check_images=False)
    vocab = Vocabulary.build((c for r in bundle.split("train") for c in r.captions), bundle.default_min_count)
    assert bundle.default_min_count == 5
    assert vocab.words[4:] == ["a", "dog"]  # 'barks' (1×) and test-only 'zebra' are out


def test_coco_instances(tmp_path):
    instances = {
        "images": [{"id": 7, "file_name": "7.jpg", "width": 640, "height": 480}, {"id": 8, "file_name": "8.jpg",
                                                                                "width": 10, "height": 10}],
        "annotations": [{"id": 1, "image_id": 7, "category_id": 18, "bbox": [10.0, 20.0, 30.0, 40.0], "area": 1200.0,
                         "iscrowd": 0, "segmentation": [[10, 20, 40, 20, 40, 60]]}],
        "categories": [{"id": 1, "name": "person", "supercategory": "person"},
                       {"id": 18, "name": "dog", "supercategory": "animal"}],
    }
    (tmp_path / "instances_val2017.json").write_text(json.dumps(instances))
    objects = ObjectAnnotations.from_json(tmp_path / "instances_val2017.json")
    assert objects.categories == ["person", "dog"]
    assert objects.categories_in(7) == {"dog"} and objects.categories_in(8) == set()
    box = objects.boxes[7][0]
    assert (box.x, box.y, box.width, box.height) == (10.0, 20.0, 30.0, 40.0)
    assert objects.image_sizes[7] == (640, 480)


def test_open_data_errors_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="captionlens data shapes"):
        open_data(tmp_path)
    with pytest.raises(FileNotFoundError, match="no dataset at"):
        open_data(tmp_path / "missing")
    (tmp_path / "dataset_x.json").write_text(json.dumps({"nope": []}))
    with pytest.raises(ValueError, match="Karpathy"):
        open_data(tmp_path)
