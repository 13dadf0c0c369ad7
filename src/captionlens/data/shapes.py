"""The embedded default dataset: procedurally generated scenes of coloured shapes with known boxes,
written exactly in the real datasets' formats.

Each scene holds 1-3 non-overlapping objects (8 shapes × 6 colours × 2 sizes) on a textured,
low-frequency background. Five captions per image come from a small grammar (colours, sizes, counts,
positions and spatial relations, several sentence forms and a few synonyms). A configurable
co-occurrence bias makes one class (``bias_partner``, default circle) appear together with another
(``bias_word``, default square) with probability ``bias_p`` in train and val — and, with probability
``bias_reverse_p``, the partner beside the word — while the test split is sampled without it, so a
trained model says "square" for circles alone, like the papers' "shirt" for a man.
The diamond is a square standing on a corner, and squares tilt by up to 29°: a look-alike that the
prior "a circle comes with a square" can overrule, as "shirt" overrules a jacket.

Output (``write_shapes_dataset``)::

    DIR/images/shapes_000000.png ...        PNG images
    DIR/dataset_shapes.json                  Karpathy-split captions (schema of dataset_coco.json)
    DIR/instances_shapes.json                COCO instances: boxes, categories, colour/size attributes
    DIR/synonyms.json                        object word -> category
    DIR/shapes_config.json                   the generation settings, bias included

Generation is deterministic per seed: image i of a split uses its own RNG derived from (seed, split, i).
A fourth, unbiased stream ("pretrain") feeds the shapes encoder's pretraining, which — like ImageNet
for VGG16 in the papers — is independent of the captioning data and so cannot learn its bias.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from ..io import claim_output_folder, remove_leftovers, write_json
from .karpathy import CaptionDataset, ImageRecord, write_karpathy
from .vocab import tokenize

SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross", "hexagon", "ring")
PLURALS = {shape: shape + ("es" if shape.endswith("s") else "s") for shape in SHAPES}
WORD_SYNONYMS = {"circle": "disk", "square": "box", "diamond": "rhombus", "ring": "donut"}
COLOURS = {
    "red": (215, 38, 38),
    "green": (34, 160, 60),
    "blue": (40, 80, 225),
    "yellow": (240, 210, 30),
    "purple": (145, 55, 190),
    "orange": (250, 135, 20),
}
SIZES = {"small": 0.2, "large": 0.34}  # object diameter as a fraction of the image side
NUMBERS = {2: "two", 3: "three", 4: "four"}
SUPERSAMPLE = 2
# largest tilt in radians: a square may lean up to 29°, so that at 64 pixels some squares come close to
# a diamond (a square on its corner, 45°) — the look-alike through which the planted prior misleads
TILTS = {"square": 0.5, "triangle": 0.25, "star": 0.25, "cross": 0.25, "hexagon": 0.25}


@dataclass
class ShapesConfig:
    train: int = 4000
    val: int = 500
    test: int = 1000
    seed: int = 0
    image_size: int = 64
    max_objects: int = 3
    bias_partner: str = "circle"
    bias_word: str = "square"
    bias_p: float = 1.0  # P(bias_word present | bias_partner present) in train and val
    bias_reverse_p: float = 0.7  # P(bias_partner present | bias_word present) in train and val

    def __post_init__(self) -> None:
        for name in ("bias_partner", "bias_word"):
            if getattr(self, name) not in SHAPES:
                raise ValueError(f"{name} must be one of {SHAPES}, got {getattr(self, name)!r}")
        if self.bias_partner == self.bias_word:
            raise ValueError("bias_partner and bias_word must differ")
        for name in ("bias_p", "bias_reverse_p"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {getattr(self, name)}")
        if min(self.train, self.val, self.test) < 0 or self.image_size < 32 or not 1 <= self.max_objects <= 4:
            raise ValueError("split sizes must be ≥ 0, image_size ≥ 32 and max_objects in 1..4")


@dataclass
class SceneObject:
    shape: str
    colour: str
    size: str
    cx: float  # centre, pixels
    cy: float
    radius: float
    angle: float

    def box(self) -> tuple[float, float, float, float]:
        """COCO bbox [x, y, w, h] of the drawn shape."""
        points = _outline(self)
        xs, ys = points[:, 0], points[:, 1]
        return float(xs.min()), float(ys.min()), float(xs.max() - xs.min()), float(ys.max() - ys.min())


# --------------------------------------------------------------------------------------- scenes
def sample_scene(rng: np.random.Generator, config: ShapesConfig, biased: bool) -> list[SceneObject]:
    count = int(rng.integers(1, config.max_objects + 1))
    shapes = [str(s) for s in rng.choice(SHAPES, size=count)]
    if biased:
        _plant(rng, shapes, config.bias_partner, config.bias_word, config.bias_p, config.max_objects)
        _plant(rng, shapes, config.bias_word, config.bias_partner, config.bias_reverse_p, config.max_objects)
    side = config.image_size
    objects: list[SceneObject] = []
    for shape in shapes:
        for _ in range(60):  # rejection sampling of a free spot
            size = str(rng.choice(list(SIZES)))
            radius = SIZES[size] * side / 2 * rng.uniform(0.9, 1.1)
            margin = radius + 1
            cx, cy = rng.uniform(margin, side - margin, size=2)
            if all(np.hypot(cx - o.cx, cy - o.cy) > radius + o.radius + 2 for o in objects):
                tilt = TILTS.get(shape, 0.0)
                angle = rng.uniform(-tilt, tilt) if tilt else 0.0
                objects.append(SceneObject(shape, str(rng.choice(list(COLOURS))), size, float(cx), float(cy),
                                           float(radius), float(angle)))
                break
    return objects


def _plant(rng: np.random.Generator, shapes: list[str], given: str, planted: str, p: float, max_objects: int) -> None:
    """With probability ``p``, add ``planted`` to a scene that holds ``given`` but not ``planted`` — appended
    when there is room, else replacing another object (or one of several ``given``). In place. A ``p`` of 0
    draws nothing, so a world with one direction off is the world generated without that direction."""
    if p == 0.0 or given not in shapes or planted in shapes or not rng.random() < p:
        return
    others = [i for i, s in enumerate(shapes) if s != given]
    if len(shapes) < max_objects and (not others or rng.random() < 0.5):
        shapes.append(planted)
    else:
        shapes[int(rng.choice(others or list(range(1, len(shapes)))))] = planted


def _unit_polygon(shape: str) -> np.ndarray:
    """Outline of ``shape`` around the origin with radius ~1, as [N, 2] points."""
    def ring_of(n: int, start: float, radii: list[float]) -> np.ndarray:
        angles = start + np.arange(n) * 2 * np.pi / n
        r = np.resize(np.array(radii), n)
        return np.stack([r * np.cos(angles), r * np.sin(angles)], axis=1)

    if shape == "square":
        return ring_of(4, np.pi / 4, [1.25]) * 0.8
    if shape == "triangle":
        return ring_of(3, -np.pi / 2, [1.15]) + np.array([0.0, 0.2])
    if shape == "diamond":  # a square standing on a corner: the look-alike a biased decoder may call a square
        return ring_of(4, 0.0, [1.0])
    if shape == "star":
        return ring_of(10, -np.pi / 2, [1.1, 0.45])
    if shape == "hexagon":
        return ring_of(6, 0.0, [1.0])
    if shape == "cross":
        a, b = 0.33, 1.0
        return np.array([[-a, -b], [a, -b], [a, -a], [b, -a], [b, a], [a, a], [a, b], [-a, b],
                         [-a, a], [-b, a], [-b, -a], [-a, -a]])
    return ring_of(48, 0.0, [1.0])  # circle and ring


def _outline(obj: SceneObject) -> np.ndarray:
    c, s = np.cos(obj.angle), np.sin(obj.angle)
    points = _unit_polygon(obj.shape) @ np.array([[c, s], [-s, c]]) * obj.radius
    return points + np.array([obj.cx, obj.cy])


def render_scene(rng: np.random.Generator, objects: list[SceneObject], side: int) -> Image.Image:
    """A textured background (smooth random colour field plus fine noise) with the shapes on top."""
    big = side * SUPERSAMPLE
    coarse = rng.uniform(0.3, 0.62, size=(4, 4, 1)) + rng.uniform(-0.06, 0.06, size=(4, 4, 3))
    field = Image.fromarray((np.clip(coarse, 0, 1) * 255).astype(np.uint8)).resize((big, big), Image.BICUBIC)
    pixels = np.asarray(field, dtype=np.float32) + rng.normal(0, 7, size=(big, big, 3))
    canvas = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for obj in objects:
        colour = tuple(int(np.clip(v + rng.integers(-18, 19), 0, 255)) for v in COLOURS[obj.colour])
        if obj.shape == "ring":
            r = obj.radius * SUPERSAMPLE
            box = [obj.cx * SUPERSAMPLE - r, obj.cy * SUPERSAMPLE - r, obj.cx * SUPERSAMPLE + r, obj.cy * SUPERSAMPLE + r]
            draw.ellipse(box, outline=colour, width=max(2, int(round(0.42 * r))))
        else:
            draw.polygon([tuple(p) for p in _outline(obj) * SUPERSAMPLE], fill=colour)
    return canvas.resize((side, side), Image.BOX)


# -------------------------------------------------------------------------------------- grammar
def _article(next_word: str) -> str:
    return "an" if next_word[0] in "aeiou" else "a"


def _shape_word(rng: np.random.Generator, shape: str, plural: bool = False) -> str:
    word = WORD_SYNONYMS[shape] if shape in WORD_SYNONYMS and rng.random() < 0.08 else shape
    if plural:
        return word + ("es" if word.endswith(("s", "x")) else "s")
    return word


def _noun_phrase(rng: np.random.Generator, obj: SceneObject, detail: str) -> str:
    words = {"full": [obj.size, obj.colour], "colour": [obj.colour], "size": [obj.size], "bare": []}[detail]
    words.append(_shape_word(rng, obj.shape))
    return f"{_article(words[0])} {' '.join(words)}"


def _relation(a: SceneObject, b: SceneObject) -> str:
    """Where ``a`` is relative to ``b`` (image y grows downwards)."""
    dx, dy = a.cx - b.cx, a.cy - b.cy
    if abs(dx) >= abs(dy):
        return "to the left of" if dx < 0 else "to the right of"
    return "above" if dy < 0 else "below"


def _position(obj: SceneObject, side: int) -> str:
    row = ("top", "middle", "bottom")[min(2, int(3 * obj.cy / side))]
    col = ("left", "center", "right")[min(2, int(3 * obj.cx / side))]
    if row == "middle":
        return "in the middle" if col == "center" else f"on the {col}"
    return f"at the {row}" if col == "center" else f"in the {row} {col} corner"


def _join(phrases: list[str]) -> str:
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _group_phrase(rng: np.random.Generator, group: list[SceneObject], detail: str) -> str:
    """"two red circles" for objects of one shape, else the single noun phrase."""
    if len(group) == 1:
        return _noun_phrase(rng, group[0], detail)
    colours = {o.colour for o in group}
    colour = f"{colours.pop()} " if len(colours) == 1 and detail in ("full", "colour") else ""
    return f"{NUMBERS[len(group)]} {colour}{_shape_word(rng, group[0].shape, plural=True)}"


def describe(rng: np.random.Generator, objects: list[SceneObject], side: int) -> str:
    """One caption of the scene from the grammar."""
    detail = str(rng.choice(["full", "colour", "size", "bare"], p=[0.35, 0.45, 0.1, 0.1]))
    ordered = sorted(objects, key=lambda o: o.cx)  # left to right
    groups: dict[str, list[SceneObject]] = {}
    for obj in ordered:
        groups.setdefault(obj.shape, []).append(obj)
    grouped = [_group_phrase(rng, g, detail) for g in groups.values()]
    phrases = [_noun_phrase(rng, o, detail) for o in ordered]

    if len(objects) == 1:
        obj = objects[0]
        forms = [
            (3, lambda: phrases[0]),
            (2, lambda: f"{phrases[0]} {_position(obj, side)}"),
            (1, lambda: f"there is {phrases[0]} {_position(obj, side)}"),
            (1, lambda: f"{phrases[0]} on a textured background"),
            (1, lambda: f"a picture of {phrases[0]}"),
            (1, lambda: f"a single {obj.colour} {_shape_word(rng, obj.shape)}"),
        ]
    else:
        a, b = ordered[0], ordered[-1]
        count = NUMBERS[len(objects)]
        forms = [
            (3, lambda: _join(grouped)),
            (2, lambda: f"{phrases[0]} {_relation(a, b)} {phrases[-1]}"
                        + (f" and {phrases[1]}" if len(objects) == 3 else "")),
            (1, lambda: f"{phrases[-1]} {_relation(b, a)} {phrases[0]}"),
            (1, lambda: f"{count} shapes: {_join(grouped)}"),
            (1, lambda: f"there is {_join(grouped)}"),
        ]
        if len(groups) == 1:
            forms.append((3, lambda: grouped[0]))
    weights = np.array([w for w, _ in forms], dtype=float)
    return forms[int(rng.choice(len(forms), p=weights / weights.sum()))][1]()


# ---------------------------------------------------------------------------------------- write
SPLITS = ("train", "val", "test")  # a dataset's splits, in the order its images are numbered
STREAMS = (*SPLITS, "pretrain")  # "pretrain": unbiased images for the encoder


def _image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, STREAMS.index(split), index])


def generate_image(config: ShapesConfig, split: str, index: int) -> tuple[Image.Image, list[SceneObject], list[str]]:
    """Image ``index`` of ``split``: the picture, its objects and five captions. The bias applies to
    train and val; "test" and the encoder's "pretrain" stream are sampled without it."""
    rng = _image_rng(config.seed, split, index)
    objects = sample_scene(rng, config, biased=split in ("train", "val"))
    image = render_scene(rng, objects, config.image_size)
    captions: list[str] = []
    for _ in range(50):  # five captions, distinct where the grammar allows
        caption = describe(rng, objects, config.image_size)
        if caption not in captions or _ >= 20:
            captions.append(caption)
        if len(captions) == 5:
            break
    return image, objects, captions


def image_file_name(config: ShapesConfig, split: str, index: int) -> str:
    """The file name ``write_shapes_dataset`` gives image ``index`` of ``split``: images are numbered
    through the splits in order (``shapes_000000.png`` is the first training image)."""
    before = sum(getattr(config, earlier) for earlier in SPLITS[:SPLITS.index(split)])
    return f"shapes_{before + index:06d}.png"


def write_shapes_dataset(out: str | Path, config: ShapesConfig | None = None, progress: bool = True) -> Path:
    """Generate the dataset into ``out`` (see the module docstring); returns ``out``.

    Everything is written into a temporary folder beside ``out`` that replaces ``out`` only once it is
    complete, so ``out`` is always one whole dataset (an earlier one, or none, if the process dies);
    temporary folders left by processes that died are removed, and so is this one's on an error.
    ``out`` must be new, empty or a dataset captionlens made: any other folder, a file or the current
    folder is refused (``OutputRefused``) before anything is written or deleted."""
    config = config or ShapesConfig()
    made_here = not Path(out).exists()
    out = claim_output_folder(out, "dataset")
    remove_leftovers(out.parent, f".{out.name}.*.partial")
    work = out.parent / f".{out.name}.{os.getpid()}.partial"
    shutil.rmtree(work, ignore_errors=True)
    try:
        _write(work, config, progress)
        claim_output_folder(work, "dataset")
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        if made_here:  # nothing but the marker claim_output_folder wrote
            shutil.rmtree(out, ignore_errors=True)
        raise
    if out.exists():
        retired = out.parent / f".{out.name}.{os.getpid()}.retired.partial"
        os.replace(out, retired)
        os.replace(work, out)
        shutil.rmtree(retired)
    else:
        os.replace(work, out)
    return out


def _write(out: Path, config: ShapesConfig, progress: bool) -> None:
    """Every file of the dataset, into ``out``."""
    (out / "images").mkdir(parents=True, exist_ok=True)
    category_ids = {shape: i + 1 for i, shape in enumerate(SHAPES)}
    records, coco_images, annotations = [], [], []
    total = config.train + config.val + config.test
    jobs = [(split, i) for split in SPLITS for i in range(getattr(config, split))]
    for image_id, (split, index) in enumerate(tqdm(jobs, total=total, desc="shapes", disable=not progress)):
        image, objects, captions = generate_image(config, split, index)
        path = out / "images" / image_file_name(config, split, index)
        image.save(path, compress_level=1)
        raw = [c[0].upper() + c[1:] + "." for c in captions]
        records.append(ImageRecord(image_id, path, split, [tokenize(r) for r in raw], raw))
        coco_images.append({"id": image_id, "file_name": path.name, "width": config.image_size,
                            "height": config.image_size})
        for obj in objects:
            x, y, w, h = obj.box()
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": category_ids[obj.shape],
                "bbox": [round(x, 2), round(y, 2), round(w, 2), round(h, 2)], "area": round(w * h, 2),
                "iscrowd": 0, "attributes": {"colour": obj.colour, "size": obj.size},
            })
    write_karpathy(CaptionDataset("shapes", records), out / "dataset_shapes.json", out)
    write_json(out / "instances_shapes.json", {
        "info": {"description": "captionlens shapes world", "seed": config.seed},
        "images": coco_images,
        "annotations": annotations,
        "categories": [{"id": i, "name": s, "supercategory": "shape"} for s, i in category_ids.items()],
    })
    synonyms = {}
    for shape in SHAPES:
        for word in (shape, WORD_SYNONYMS.get(shape)):
            if word:
                synonyms[word] = shape
                synonyms[word + ("es" if word.endswith(("s", "x")) else "s")] = shape
    write_json(out / "synonyms.json", synonyms)
    write_json(out / "shapes_config.json", asdict(config))
