"""``captionlens data ...``: generate the shapes world, or describe where a real dataset's files live."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .app import command, console, data_app
from .options import SeedOption, number, whole


@command(data_app, "shapes")
def data_shapes(
    out: Annotated[Path, typer.Option(help="Folder to write the dataset into: new, empty, or a shapes dataset made before (replaced whole); any other folder is refused.")],
    train: Annotated[int, typer.Option(help="Training images.", parser=whole(1, 10_000_000))] = 4000,
    val: Annotated[int, typer.Option(help="Validation images.", parser=whole(1, 10_000_000))] = 500,
    test: Annotated[int, typer.Option(help="Test images.", parser=whole(1, 10_000_000))] = 1000,
    seed: SeedOption = 0,
    image_size: Annotated[int, typer.Option(help="Image side in pixels.", parser=whole(32, 1024))] = 64,
    bias_partner: Annotated[str, typer.Option(help="Shape that (in train/val) comes with --bias-word with probability --bias-p.")] = "circle",
    bias_word: Annotated[str, typer.Option(help="Shape the model learns to expect with --bias-partner.")] = "square",
    bias_p: Annotated[float, typer.Option(help="P(bias word present | partner present) in train and val.", parser=number(0, 1))] = 1.0,
    bias_reverse_p: Annotated[float, typer.Option(help="P(partner present | bias word present) in train and val.", parser=number(0, 1))] = 0.7,
) -> None:
    """Generate the embedded shapes world: PNGs, dataset_shapes.json (Karpathy split),
    instances_shapes.json (COCO boxes), synonyms.json.

    Example: captionlens data shapes --out data/shapes --train 4000 --seed 0
    """
    from ..data.shapes import ShapesConfig, write_shapes_dataset

    config = ShapesConfig(train=train, val=val, test=test, seed=seed, image_size=image_size, bias_partner=bias_partner,
                          bias_word=bias_word, bias_p=bias_p, bias_reverse_p=bias_reverse_p)
    write_shapes_dataset(out, config)
    console.print(f"wrote {train + val + test} images to {out}")


def _describe(folder: Path, name: str, captions: Path, images: Path, instances: Optional[Path],
              synonyms: Optional[str]) -> None:
    """Write the dataset descriptor, open the folder as every later verb will, and say what it holds."""
    from ..data.bundle import instance_files, open_data, write_descriptor

    found = instance_files(instances) if instances is not None else []
    write_descriptor(folder, name, captions, images, found, synonyms)
    bundle = open_data(folder)
    counts = ", ".join(f"{len(bundle.split(s))} {s}" for s in ("train", "val", "test"))
    console.print(f"{folder}: {name}, {counts} images under {bundle.image_root}")
    console.print(f"  object boxes: {', '.join(p.name for p in bundle.instance_files) or 'none (labels come from the reference captions)'}")
    console.print(f"  object words: {bundle.synonyms.source if bundle.synonyms else 'none'}")
    console.print(f"next: captionlens train --data {folder} --arch gridtd --encoder vgg16 --encoder-weights vgg16-397923af.pth --out RUN")


SynonymsOption = Annotated[Optional[str], typer.Option(help="Object words: a synonyms JSON or a built-in list (coco, flickr30k).")]


@command(data_app, "flickr30k")
def data_flickr30k(
    json_path: Annotated[Path, typer.Option("--json", help="Karpathy's dataset_flickr30k.json.")],
    images: Annotated[Path, typer.Option(help="The flickr30k-images folder.")],
    out: Annotated[Path, typer.Option(help="Dataset folder to create (holds a small descriptor and, later, the feature cache).")],
    synonyms: SynonymsOption = "flickr30k",
) -> None:
    """Describe a Flickr30K download as a dataset folder: nothing is copied; later verbs need only --data.
    Flickr30K has no boxes: object words are labelled against the reference captions.

    Example: captionlens data flickr30k --json dataset_flickr30k.json --images flickr30k-images/ --out data/f30k
    """
    _describe(out, "flickr30k", json_path, images, None, synonyms)


@command(data_app, "coco")
def data_coco(
    json_path: Annotated[Path, typer.Option("--json", help="Karpathy's dataset_coco.json.")],
    images: Annotated[Path, typer.Option(help="Folder holding train2014/ and val2014/.")],
    out: Annotated[Path, typer.Option(help="Dataset folder to create.")],
    instances: Annotated[Optional[Path], typer.Option(help="COCO annotations folder (instances_train2014.json, instances_val2014.json) or one file: object boxes.")] = None,
    synonyms: SynonymsOption = "coco",
) -> None:
    """Describe COCO in Karpathy's split as a dataset folder (restval counts as training data);
    nothing is copied. Without --instances, object words are labelled against the reference captions.

    Example: captionlens data coco --json dataset_coco.json --images coco/ --instances annotations/ --out data/coco
    """
    _describe(out, "coco", json_path, images, instances, synonyms)


@command(data_app, "coco2017")
def data_coco2017(
    annotations: Annotated[Path, typer.Option(help="Folder with captions_train2017.json and captions_val2017.json (and instances_val2017.json).")],
    images: Annotated[Path, typer.Option(help="Folder holding train2017/ and val2017/.")],
    out: Annotated[Path, typer.Option(help="Dataset folder to write dataset_coco2017.json into.")],
    val_size: Annotated[int, typer.Option(help="Training images moved to the validation split.", parser=whole(1))] = 5000,
    seed: Annotated[int, typer.Option(help="Seed of that draw.", parser=whole(0))] = 0,
) -> None:
    """Build the papers' COCO2017 split (val2017 = test, 5000 train2017 images = val) as a
    Karpathy-split JSON in OUT, with a descriptor pointing at the images and at instances_val2017.json
    (the test split's boxes) where present.

    Example: captionlens data coco2017 --annotations annotations/ --images coco/ --out data/coco2017
    """
    from ..data.karpathy import coco2017_split, write_karpathy

    dataset = coco2017_split(annotations / "captions_train2017.json", annotations / "captions_val2017.json",
                             images, val_size, seed)
    write_karpathy(dataset, out / "dataset_coco2017.json", images)
    instances = annotations / "instances_val2017.json"
    _describe(out, "coco2017", out / "dataset_coco2017.json", images, instances if instances.is_file() else None,
              "coco")
