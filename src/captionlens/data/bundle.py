"""A dataset folder as captionlens reads it: the Karpathy-split JSON, and where present the COCO
instances, the word → category synonyms and (for the shapes world) the generation settings."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..io import read_json
from .coco import ObjectAnnotations, load_synonyms
from .karpathy import CaptionDataset, ImageRecord, load_karpathy

# The papers' vocabulary thresholds; other datasets use the Flickr30K one.
MIN_COUNT = {"coco": 5, "coco2017": 5, "flickr30k": 3}


@dataclass
class DataBundle:
    root: Path
    captions: CaptionDataset
    objects: ObjectAnnotations | None = None
    synonyms: dict[str, str] | None = None
    shapes_config: dict | None = None  # the bias (partner, word, p) of a generated shapes world

    def split(self, name: str) -> list[ImageRecord]:
        return self.captions.split(name)

    @property
    def default_min_count(self) -> int:
        return MIN_COUNT.get(self.captions.name, 3)

    @property
    def cache_dir(self) -> Path:
        return self.root / "cache"


def open_data(path: str | Path, image_root: str | Path | None = None, instances: str | Path | None = None,
              synonyms: str | Path | None = None) -> DataBundle:
    """Open a dataset folder holding one ``dataset_*.json`` (or the JSON file itself).

    ``instances_*.json``, ``synonyms.json`` and ``shapes_config.json`` beside it are picked up;
    ``image_root`` defaults to the JSON's folder."""
    path = Path(path)
    if path.is_dir():
        candidates = sorted(path.glob("dataset_*.json"))
        if len(candidates) != 1:
            raise FileNotFoundError(
                f"{path} must hold exactly one Karpathy-split dataset_*.json, found {len(candidates)}"
                + (" (make one with `captionlens data shapes --out DIR`)" if not candidates else "")
            )
        json_path, folder = candidates[0], path
    else:
        json_path, folder = path, path.parent
    captions = load_karpathy(json_path, image_root)
    if instances is None:
        found = sorted(folder.glob("instances_*.json"))
        instances = found[0] if found else None
    if synonyms is None and (folder / "synonyms.json").is_file():
        synonyms = folder / "synonyms.json"
    shapes = folder / "shapes_config.json"
    return DataBundle(
        root=folder,
        captions=captions,
        objects=ObjectAnnotations.from_json(instances) if instances else None,
        synonyms=load_synonyms(synonyms) if synonyms else None,
        shapes_config=read_json(shapes) if shapes.is_file() else None,
    )
