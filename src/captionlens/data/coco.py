"""COCO ``instances_*.json`` object annotations: boxes and categories per image."""
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
        """Read a COCO ``instances_*.json``: category ids may be non-contiguous (COCO's run 1..90 with
        gaps); crowd annotations (``iscrowd: 1``) count as present objects and their boxes as object area."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no COCO instances file at {path} (--instances)")
        data = read_json(path)
        if not isinstance(data, dict) or not {"images", "annotations", "categories"} <= data.keys():
            raise ValueError(f"{path} is not a COCO instances file (needs images, annotations, categories)")
        try:
            names = {c["id"]: c["name"] for c in data["categories"]}
            sizes = {image["id"]: (image["width"], image["height"]) for image in data["images"]}
            boxes: dict[int, list[Box]] = {image_id: [] for image_id in sizes}
            for a in data["annotations"]:
                category, box = names.get(a["category_id"]), a["bbox"]
                if category is None or len(box) != 4:
                    raise KeyError(f"annotation {a.get('id')}: category id {a['category_id']} or bbox {box}")
                attributes = tuple(sorted((a.get("attributes") or {}).items()))
                boxes.setdefault(a["image_id"], []).append(Box(category, *box, attributes))
        except (KeyError, TypeError) as error:
            raise ValueError(f"{path} is not a valid COCO instances file: missing or bad {error}") from None
        return cls(boxes, [names[i] for i in sorted(names)], sizes)

    @classmethod
    def from_files(cls, paths: list[Path]) -> "ObjectAnnotations":
        """Several instances files (e.g. COCO 2014's train and val, which Karpathy's split mixes) as one."""
        parts = [cls.from_json(p) for p in paths]
        boxes: dict[int, list[Box]] = {}
        sizes: dict[int, tuple[int, int]] = {}
        categories: list[str] = []
        for part in parts:
            boxes.update(part.boxes)
            sizes.update(part.image_sizes)
            categories += [c for c in part.categories if c not in categories]
        return cls(boxes, categories, sizes)
