"""A dataset folder as captionlens reads it.

``captionlens data flickr30k|coco|coco2017`` writes a small descriptor, ``captionlens_dataset.json``,
that records where the dataset's parts live; nothing is copied, so image folders of 30k–120k files
stay where they are::

    {"format": "captionlens-dataset", "format_version": 1, "name": "flickr30k",
     "captions": "/data/dataset_flickr30k.json",       # the Karpathy-split JSON
     "images": "/data/flickr30k-images",                # image root: IMAGES/filepath/filename
     "instances": [],                                   # COCO instances_*.json files (boxes), if any
     "synonyms": "flickr30k"}                           # a built-in list, a file, or null

Paths inside the descriptor's folder are stored relative to it, others absolute. A folder without a
descriptor (the shapes world, older folders) is read as before: its one ``dataset_*.json``, with
``instances_*.json``, ``synonyms.json`` and ``shapes_config.json`` beside it and the images under it.
Every verb's ``--images``, ``--instances`` and ``--synonyms`` override what the folder says.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from ..io import read_json, write_json
from .coco import ObjectAnnotations
from .ground_truth import SOURCES, BoxGroundTruth, GroundTruth, ObjectsUnavailable, ReferenceGroundTruth
from .karpathy import CaptionDataset, ImageRecord, load_karpathy
from .synonyms import BUILTIN, DEFAULT_FOR_DATASET, Synonyms

DESCRIPTOR = "captionlens_dataset.json"
DESCRIPTOR_FORMAT, DESCRIPTOR_VERSION = "captionlens-dataset", 1

# The papers' vocabulary thresholds; other datasets use the Flickr30K one.
MIN_COUNT = {"coco": 5, "coco2017": 5, "flickr30k": 3}


@dataclass
class DataBundle:
    root: Path  # the dataset folder (the feature cache lives in it)
    captions: CaptionDataset
    image_root: Path
    instance_files: tuple[Path, ...] = ()
    synonyms_spec: str | None = None  # a built-in list name or a file path
    shapes_config: dict | None = None  # the generation settings of a shapes world, its bias included

    def split(self, name: str) -> list[ImageRecord]:
        return self.captions.split(name)

    @property
    def name(self) -> str:
        return self.captions.name

    @property
    def default_min_count(self) -> int:
        return MIN_COUNT.get(self.name, 3)

    @property
    def cache_dir(self) -> Path:
        return self.root / "cache"

    @cached_property
    def objects(self) -> ObjectAnnotations | None:
        """The COCO boxes, read on first use (COCO's instance files take seconds to parse)."""
        return ObjectAnnotations.from_files(list(self.instance_files)) if self.instance_files else None

    @cached_property
    def synonyms(self) -> Synonyms | None:
        """The synonym list: the folder's or the user's, else the built-in one for the dataset, else none."""
        spec = self.synonyms_spec or DEFAULT_FOR_DATASET.get(self.name)
        return Synonyms.load(spec) if spec else None

    def ground_truth(self, source: str = "auto") -> GroundTruth:
        """The objects of each image from ``boxes``, ``references`` or (``auto``) boxes where the
        dataset has them, else references. Raises :class:`ObjectsUnavailable` saying why not."""
        if source not in SOURCES:
            raise ValueError(f"unknown ground truth {source!r}; choose one of {', '.join(SOURCES)}")
        if self.synonyms is None:
            raise ObjectsUnavailable(f"no object words are known for {self.name}: pass --synonyms with a synonyms "
                                     f"JSON or a built-in list ({', '.join(BUILTIN)})")
        if source == "boxes" or (source == "auto" and self.instance_files):
            if not self.instance_files:
                raise ObjectsUnavailable(f"{self.name} has no object boxes: pass --instances with COCO "
                                         "instances_*.json files (or a folder of them), or --ground-truth references")
            return BoxGroundTruth(self.objects, [p.name for p in self.instance_files])
        return ReferenceGroundTruth(self.synonyms)


# ------------------------------------------------------------------------------------ descriptor
def _stored(path: Path, folder: Path) -> str:
    """``path`` relative to ``folder`` when inside it, else absolute."""
    path = path.resolve()
    try:
        return str(path.relative_to(folder.resolve()))
    except ValueError:
        return str(path)


def write_descriptor(folder: str | Path, name: str, captions: Path, images: Path,
                     instances: list[Path] | None = None, synonyms: str | None = None) -> Path:
    """Write ``folder/captionlens_dataset.json`` and return its path."""
    folder = Path(folder)  # a descriptor only adds its own small file: it may sit beside the data it describes
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / DESCRIPTOR
    write_json(path, {
        "format": DESCRIPTOR_FORMAT, "format_version": DESCRIPTOR_VERSION, "name": name,
        "captions": _stored(captions, folder), "images": _stored(images, folder),
        "instances": [_stored(p, folder) for p in instances or []],
        "synonyms": synonyms if synonyms is None or synonyms in BUILTIN else _stored(Path(synonyms), folder),
    })
    return path


def _read_descriptor(path: Path) -> dict:
    data = read_json(path)
    keys = {"format", "format_version", "name", "captions", "images", "instances", "synonyms"}
    if not isinstance(data, dict) or data.get("format") != DESCRIPTOR_FORMAT or not keys <= data.keys():
        raise ValueError(f"{path} is not a captionlens dataset descriptor (needs {', '.join(sorted(keys))})")
    if data["format_version"] != DESCRIPTOR_VERSION:
        raise ValueError(f"{path} has format_version {data['format_version']}; this captionlens reads "
                         f"{DESCRIPTOR_VERSION}")
    return data


def instance_files(spec: str | Path) -> list[Path]:
    """An instances file, or every ``instances_*.json`` in a folder."""
    spec = Path(spec)
    if spec.is_dir():
        found = sorted(spec.glob("instances_*.json"))
        if not found:
            raise FileNotFoundError(f"no instances_*.json in {spec} (--instances)")
        return found
    if not spec.is_file():
        raise FileNotFoundError(f"no COCO instances file at {spec} (--instances)")
    return [spec]


def open_data(path: str | Path, image_root: str | Path | None = None, instances: str | Path | None = None,
              synonyms: str | Path | None = None, check_images: bool = True) -> DataBundle:
    """Open a dataset folder (with a descriptor, or with one ``dataset_*.json``), a descriptor file or
    a Karpathy JSON. ``image_root``, ``instances`` (a file or folder) and ``synonyms`` (a file or a
    built-in list name) override what the folder says. With ``check_images`` the first image of each
    split must exist, so a wrong image root is reported at once, naming the option that fixes it."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no dataset at {path} (make one with `captionlens data shapes|flickr30k|coco|"
                                "coco2017 --out DIR`)")
    descriptor = path / DESCRIPTOR if path.is_dir() else path if path.name == DESCRIPTOR else None
    shapes_config = None
    if descriptor is not None and descriptor.is_file():
        info, folder = _read_descriptor(descriptor), descriptor.parent
        resolve = lambda stored: folder / stored  # noqa: E731  (absolute paths stay absolute)
        json_path, name = resolve(info["captions"]), info["name"]
        default_images = resolve(info["images"])
        found_instances = [resolve(p) for p in info["instances"]]
        found_synonyms = info["synonyms"] if info["synonyms"] in BUILTIN or info["synonyms"] is None \
            else str(resolve(info["synonyms"]))
    else:
        if path.is_dir():
            candidates = sorted(path.glob("dataset_*.json"))
            if len(candidates) != 1:
                raise FileNotFoundError(
                    f"{path} must hold a {DESCRIPTOR} or exactly one Karpathy-split dataset_*.json, found "
                    f"{len(candidates)} (make one with `captionlens data shapes|flickr30k|coco|coco2017 --out DIR`)")
            json_path, folder = candidates[0], path
        else:
            json_path, folder = path, path.parent
        name, default_images = None, folder
        found_instances = sorted(folder.glob("instances_*.json"))
        found_synonyms = str(folder / "synonyms.json") if (folder / "synonyms.json").is_file() else None
        if (folder / "shapes_config.json").is_file():
            shapes_config = read_json(folder / "shapes_config.json")
    images = Path(image_root) if image_root is not None else default_images
    captions = load_karpathy(json_path, images)
    if name:
        captions.name = name
    bundle = DataBundle(
        root=folder, captions=captions, image_root=images,
        instance_files=tuple(instance_files(instances) if instances is not None else found_instances),
        synonyms_spec=str(synonyms) if synonyms is not None else found_synonyms,
        shapes_config=shapes_config,
    )
    if synonyms is not None:
        _ = bundle.synonyms  # a bad --synonyms is reported now, not half-way through an experiment
    if check_images:
        check_image_root(bundle, json_path)
    return bundle


def check_image_root(bundle: DataBundle, json_path: Path) -> None:
    """The first image of each split must exist under the image root."""
    for split in ("train", "val", "test"):
        records = bundle.split(split)
        if records and not records[0].path.is_file():
            wanted = os.path.relpath(records[0].path, bundle.image_root)
            raise FileNotFoundError(
                f"no image file at {records[0].path}: the images of {json_path.name} are looked for under "
                f"{bundle.image_root}; pass --images DIR with the folder that holds {wanted}")
