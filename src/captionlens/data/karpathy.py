"""Caption datasets in the Karpathy-split JSON format (``dataset_coco.json``, ``dataset_flickr30k.json``)
and the papers' COCO2017 split built from ``captions_{train,val}2017.json``.

Karpathy schema::

    {"dataset": "coco", "images": [{"filepath": "val2014", "filename": "x.jpg", "imgid": 0,
      "split": "train|val|test|restval", "cocoid": 391895, "sentids": [..],
      "sentences": [{"tokens": ["a", "man"], "raw": "A man ...", "imgid": 0, "sentid": 0}, ..]}, ..]}

``filepath`` is absent for Flickr30K; ``restval`` counts as training data, as in Karpathy's code.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

from ..io import read_json, write_json
from .vocab import tokenize

SPLITS = ("train", "val", "test")


@dataclass
class ImageRecord:
    image_id: int  # cocoid where the JSON has one (it links to COCO instances), else imgid
    path: Path
    split: str  # train / val / test
    captions: list[list[str]]  # tokenised reference captions
    raw: list[str] = field(default_factory=list)


@dataclass
class CaptionDataset:
    name: str
    images: list[ImageRecord]

    def split(self, name: str) -> list[ImageRecord]:
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; choose one of {SPLITS}")
        return [record for record in self.images if record.split == name]


def load_karpathy(json_path: str | Path, image_root: str | Path | None = None) -> CaptionDataset:
    """Read a Karpathy-split JSON. Image paths are ``image_root/filepath/filename`` (``image_root``
    defaults to the JSON's folder)."""
    json_path = Path(json_path)
    if not json_path.is_file():
        raise FileNotFoundError(f"no Karpathy-split JSON at {json_path}")
    root = Path(image_root) if image_root is not None else json_path.parent
    data = read_json(json_path)
    if not isinstance(data, dict) or "images" not in data:
        raise ValueError(f"{json_path} is not a Karpathy-split JSON (no 'images' list)")
    images = []
    for entry in data["images"]:
        split = "train" if entry["split"] == "restval" else entry["split"]
        sentences = entry["sentences"]
        images.append(
            ImageRecord(
                image_id=int(entry.get("cocoid", entry.get("imgid"))),
                path=root / entry.get("filepath", "") / entry["filename"],
                split=split,
                captions=[s["tokens"] if "tokens" in s else tokenize(s["raw"]) for s in sentences],
                raw=[s.get("raw", " ".join(s.get("tokens", []))) for s in sentences],
            )
        )
    return CaptionDataset(data.get("dataset", json_path.stem.removeprefix("dataset_")), images)


def write_karpathy(dataset: CaptionDataset, json_path: str | Path, image_root: str | Path) -> None:
    """Write ``dataset`` in the Karpathy schema with paths relative to ``image_root``."""
    image_root = Path(image_root)
    images, sentence_id = [], 0
    for imgid, record in enumerate(dataset.images):
        relative = record.path.relative_to(image_root)
        sentences = []
        for tokens, raw in zip(record.captions, record.raw or [" ".join(c) for c in record.captions]):
            sentences.append({"tokens": tokens, "raw": raw, "imgid": imgid, "sentid": sentence_id})
            sentence_id += 1
        images.append({
            "filepath": str(relative.parent) if str(relative.parent) != "." else "",
            "filename": relative.name,
            "imgid": imgid,
            "cocoid": record.image_id,
            "split": record.split,
            "sentids": [s["sentid"] for s in sentences],
            "sentences": sentences,
        })
    write_json(json_path, {"dataset": dataset.name, "images": images})


def coco2017_split(
    captions_train: str | Path,
    captions_val: str | Path,
    image_root: str | Path,
    val_size: int = 5000,
    seed: int = 0,
) -> CaptionDataset:
    """The papers' MSCOCO2017 split: val2017 is the test set, ``val_size`` images drawn from train2017
    (with ``seed``) are the validation set, the rest is training data (110000/5000/5000).

    Images are expected at ``image_root/train2017/<file_name>`` and ``image_root/val2017/<file_name>``."""
    image_root = Path(image_root)
    train = _coco_caption_records(captions_train, image_root / "train2017", "train")
    test = _coco_caption_records(captions_val, image_root / "val2017", "test")
    if val_size > len(train):
        raise ValueError(f"val_size={val_size} exceeds the {len(train)} training images")
    for record in random.Random(seed).sample(train, val_size):
        record.split = "val"
    return CaptionDataset("coco2017", train + test)


def _coco_caption_records(path: str | Path, folder: Path, split: str) -> list[ImageRecord]:
    data = read_json(path)
    if not isinstance(data, dict) or "annotations" not in data or "images" not in data:
        raise ValueError(f"{path} is not a COCO captions file (needs 'images' and 'annotations')")
    records = {
        image["id"]: ImageRecord(image["id"], folder / image["file_name"], split, [], [])
        for image in data["images"]
    }
    for annotation in sorted(data["annotations"], key=lambda a: a["id"]):
        record = records[annotation["image_id"]]
        record.captions.append(tokenize(annotation["caption"]))
        record.raw.append(annotation["caption"].strip())
    return sorted(records.values(), key=lambda r: r.image_id)
