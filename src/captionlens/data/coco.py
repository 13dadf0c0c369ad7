"""COCO ``instances_*.json`` object annotations (boxes and categories) and the word → category
synonym map used to decide whether a caption's object word is supported by the image."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..io import read_json


@dataclass(frozen=True)
class Box:
    category: str
    x: float  # COCO bbox: top-left corner, width, height, in image pixels
    y: float
    width: float
    height: float
    attributes: tuple[tuple[str, str], ...] = ()


class ObjectAnnotations:
    """Boxes per image id, with category names."""

    def __init__(self, boxes: dict[int, list[Box]], categories: list[str], image_sizes: dict[int, tuple[int, int]]):
        self.boxes = boxes
        self.categories = categories
        self.image_sizes = image_sizes  # image id -> (width, height)

    def categories_in(self, image_id: int) -> set[str]:
        return {box.category for box in self.boxes.get(image_id, [])}

    @classmethod
    def from_json(cls, path: str | Path) -> "ObjectAnnotations":
        data = read_json(path)
        if not isinstance(data, dict) or not {"images", "annotations", "categories"} <= data.keys():
            raise ValueError(f"{path} is not a COCO instances file (needs images, annotations, categories)")
        names = {c["id"]: c["name"] for c in data["categories"]}
        boxes: dict[int, list[Box]] = {image["id"]: [] for image in data["images"]}
        for a in data["annotations"]:
            x, y, w, h = a["bbox"]
            attributes = tuple(sorted((a.get("attributes") or {}).items()))
            boxes.setdefault(a["image_id"], []).append(Box(names[a["category_id"]], x, y, w, h, attributes))
        sizes = {image["id"]: (image["width"], image["height"]) for image in data["images"]}
        return cls(boxes, [names[i] for i in sorted(names)], sizes)


def load_synonyms(path: str | Path) -> dict[str, str]:
    """A ``{word: category}`` JSON object (e.g. ``{"puppy": "dog", "dogs": "dog"}``)."""
    data = read_json(path)
    if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
        raise ValueError(f"{path} must hold a JSON object mapping words to category names")
    return data
