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
from pathlib import Path, PurePosixPath, PureWindowsPath

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
    if not isinstance(data["images"], list):
        raise ValueError(f"{json_path}: 'images' must be a list")
    images = [_record(entry, index, json_path, root) for index, entry in enumerate(data["images"])]
    ids = [r.image_id for r in images]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{json_path}: image ids (cocoid, else imgid) must be unique")
    name = data.get("dataset", json_path.stem.removeprefix("dataset_"))
    return CaptionDataset(name if isinstance(name, str) else json_path.stem, images)


def _record(entry: object, index: int, json_path: Path, root: Path) -> ImageRecord:
    """One image entry of a Karpathy JSON, every field checked (errors name the file, entry and field)."""
    where = f"{json_path}: images[{index}]"
    if not isinstance(entry, dict):
        raise ValueError(f"{where} is not an object")
    for key in ("split", "sentences", "filename"):
        if key not in entry:
            raise ValueError(f"{where} has no {key!r}")
    if entry["split"] not in (*SPLITS, "restval"):
        raise ValueError(f"{where}: unknown split {entry['split']!r} (Karpathy's are train, val, test, restval)")
    identifier = entry.get("cocoid", entry.get("imgid"))
    if isinstance(identifier, bool) or not isinstance(identifier, int):
        raise ValueError(f"{where} needs an integer 'imgid' (or 'cocoid'), has {identifier!r}")
    if not isinstance(entry["filename"], str) or not isinstance(entry.get("filepath", ""), str) or not entry["filename"]:
        raise ValueError(f"{where}: 'filename' and 'filepath' must be strings")
    sentences = entry["sentences"]
    if not isinstance(sentences, list) or not sentences:
        raise ValueError(f"{where}: 'sentences' must be a non-empty list")
    captions, raw = [], []
    for k, sentence in enumerate(sentences):
        tokens = sentence.get("tokens") if isinstance(sentence, dict) else None
        text = sentence.get("raw") if isinstance(sentence, dict) else None
        if not (isinstance(tokens, list) and all(isinstance(t, str) for t in tokens)) and not isinstance(text, str):
            raise ValueError(f"{where}.sentences[{k}] needs 'tokens' (a list of strings) or 'raw' (a string)")
        captions.append(tokens if isinstance(tokens, list) else tokenize(text))
        raw.append(text if isinstance(text, str) else " ".join(tokens))
    return ImageRecord(identifier, inside(root, entry.get("filepath", ""), entry["filename"], where=where),
                       "train" if entry["split"] == "restval" else entry["split"], captions, raw)


def inside(root: Path, *parts: str, where: str) -> Path:
    """``root / parts...``, refusing parts that would lead outside the image root (an absolute path, a
    ``..`` component, a drive): a dataset file names images, it never reaches elsewhere on the disk."""
    for part in parts:
        pure = PurePosixPath(part.replace("\\", "/"))
        if pure.is_absolute() or ".." in pure.parts or PureWindowsPath(part).drive:
            raise ValueError(f"{where}: the image name {part!r} leads outside the image root {root} "
                             "(absolute paths and '..' are not allowed in a dataset file)")
    return root.joinpath(*parts)


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
    if not isinstance(data["images"], list) or not isinstance(data["annotations"], list):
        raise ValueError(f"{path}: 'images' and 'annotations' must be lists")
    records: dict[int, ImageRecord] = {}
    for k, image in enumerate(data["images"]):
        if not isinstance(image, dict) or not _is_int(image.get("id")) or not isinstance(image.get("file_name"), str):
            raise ValueError(f"{path}: images[{k}] needs an integer 'id' and a 'file_name' string")
        records[image["id"]] = ImageRecord(image["id"], inside(folder, image["file_name"], where=f"{path}: images[{k}]"),
                                           split, [], [])
    annotations = []
    for k, annotation in enumerate(data["annotations"]):
        if not isinstance(annotation, dict) or not _is_int(annotation.get("id")) or \
                not _is_int(annotation.get("image_id")) or not isinstance(annotation.get("caption"), str):
            raise ValueError(f"{path}: annotations[{k}] needs integer 'id' and 'image_id' and a 'caption' string")
        if annotation["image_id"] not in records:
            raise ValueError(f"{path}: annotation {annotation['id']} refers to image {annotation['image_id']}, "
                             "which is not in its 'images'")
        annotations.append(annotation)
    for annotation in sorted(annotations, key=lambda a: a["id"]):
        record = records[annotation["image_id"]]
        record.captions.append(tokenize(annotation["caption"]))
        record.raw.append(annotation["caption"].strip())
    return sorted(records.values(), key=lambda r: r.image_id)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
