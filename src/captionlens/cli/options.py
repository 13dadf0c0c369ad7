"""Options several verbs share, each declared once, and the checks every number passes on the way in.

Every numeric option parses through ``whole`` or ``number``: a size is ≥ 1, a limit ≥ 0, a rate or a
tolerance finite — ``--batch-size -4``, ``--tolerance nan`` or ``--port 99999`` stop at the command line
with a message (``tests/test_cli_options.py`` checks that no numeric option escapes them).
"""
from __future__ import annotations

import dataclasses
import math
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..data.ground_truth import NAMED_SUBSETS, SOURCES
from ..data.images import default_workers
from ..errors import InvalidValue, range_text
from ..explain.explainer import PRECISION_CHOICES
from ..explain.rules import ATTENTION_RULES
from ..models.registry import ARCHITECTURES, ENCODERS


# ------------------------------------------------------------------------------ number checks
def whole(low: int | None = 1, high: int | None = None):
    """A parser of whole numbers in [low, high] (the error says the range)."""

    def parse(text) -> int:
        try:
            value = int(text)
        except (TypeError, ValueError):
            raise ValueError(f"{text!r} is not a whole number") from None
        if (low is not None and value < low) or (high is not None and value > high):
            raise ValueError(f"{value} is out of range: it must {range_text(low, high, name='it')}")
        return value

    parse.checked = ("int", low, high)
    return parse


def whole_or_auto(low: int = 1):
    """A parser of "auto" or whole numbers ≥ low (``--max-words-per-pass``)."""
    count = whole(low)

    def parse(text) -> int | str:
        return "auto" if str(text).strip().lower() == "auto" else count(text)

    return parse


def number(low: float | None = None, high: float | None = None, low_open: bool = False, high_open: bool = False):
    """A parser of finite numbers in [low, high] (open ends where asked)."""

    def parse(text) -> float:
        try:
            value = float(text)
        except (TypeError, ValueError):
            raise ValueError(f"{text!r} is not a number") from None
        if not math.isfinite(value):
            raise ValueError(f"{value} is not a finite number")
        if (low is not None and (value < low or (low_open and value == low))) or \
                (high is not None and (value > high or (high_open and value == high))):
            raise ValueError(f"{value:g} is out of range: it must {range_text(low, high, low_open, high_open, name='it')}")
        return value

    parse.checked = ("float", low, high)
    return parse


def device(text) -> str:
    """A device this machine has (cpu, cuda, cuda:N, mps)."""
    from ..models.captioner import resolve_device

    try:
        resolve_device(text)
    except InvalidValue as error:
        raise ValueError(str(error)) from None
    return str(text)


def choice(name: str, names) -> type[Enum]:
    """An Enum of ``names`` (a registry's keys): the command line offers exactly what is registered."""
    return Enum(name, {n: n for n in names}, type=str)


def comma_list(text: str | None, choices, what: str) -> list[str] | None:
    """``"a,b"`` -> ["a", "b"], each one of ``choices``; None stays None (the verb's default)."""
    if text is None:
        return None
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in choices]
    if unknown or not names:
        raise InvalidValue(f"unknown {what} {', '.join(map(repr, unknown)) or '(none given)'}; choose from: "
                           f"{', '.join(sorted(choices))}")
    return names


def integers(text: str | None, what: str, low: int = 0) -> list[int] | None:
    """``"0,1,2"`` -> [0, 1, 2]; an empty list or a word is an error."""
    if text is None:
        return None
    try:
        values = [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise InvalidValue(f"{what} takes comma-separated whole numbers, not {text!r}") from None
    if not values:
        raise InvalidValue(f"{what} needs at least one number, not {text!r}")
    if any(v < low for v in values):
        raise InvalidValue(f"{what} must all be ≥ {low}, not {text!r}")
    return values


# ------------------------------------------------------------------------------ single options
Architecture = choice("Architecture", sorted(ARCHITECTURES))
EncoderName = choice("EncoderName", sorted(ENCODERS))
GroundTruthChoice = choice("GroundTruthChoice", SOURCES)
PrecisionChoice = choice("PrecisionChoice", PRECISION_CHOICES)
AttentionRuleChoice = choice("AttentionRuleChoice", ATTENTION_RULES)
FirstLayerChoice = choice("FirstLayerChoice", ("alphabeta", "zb"))

ModelOption = Annotated[Path, typer.Option(help="Run folder of a trained captioner.")]
DataOption = Annotated[Path, typer.Option(help="Dataset folder made by `captionlens data ...` (or holding one dataset_*.json).")]
OutOption = Annotated[Path, typer.Option(help="Folder for the tables (CSV, JSON, Markdown) and plots.")]
DeviceOption = Annotated[Optional[str], typer.Option(help="cpu (default), cuda, cuda:N or mps.", parser=device)]
MinCountOption = Annotated[int, typer.Option(help="Object words predicted more often than this count (paper: 50).", parser=whole(0))]
WorkersOption = Annotated[int, typer.Option(help="Processes that decode images in parallel (0: none).", parser=whole(0, 256))]
BeamOption = Annotated[int, typer.Option(help="Beam size of the captions (1 = greedy; paper: 3).", parser=whole(1, 100))]
LimitOption = Annotated[Optional[int], typer.Option(help="Use only the first N images.", parser=whole(1))]
SeedOption = Annotated[int, typer.Option(help="Random seed.", parser=whole(0))]
PrecisionOption = Annotated[PrecisionChoice, typer.Option(help="fp32 (the reference), bf16-vision (the image encoder's graph in bfloat16, channels last for VGG16; the decoder in float32, reading the encoder's float32 values: 0.30-0.35x fp32's time on an AMX CPU at the papers' size, LRP maps correlating 0.9999 with fp32's), bf16 (all of the model in bfloat16: 0.18-0.30x, LRP maps 0.977-0.9997; halves a large language model's memory) or auto (where a GPU or a CPU with AMX/AVX512-BF16 computes bfloat16: bf16-vision, or bf16 for a Hugging Face captioner, whose language model holds much of the work; else fp32; the explanation records which ran).")]
WordsPerPassOption = Annotated[Optional[str], typer.Option(help="At most this many words share one backward pass (bounds memory for long captions), or auto: as many as fit in 256 MiB (4 for VGG16 at 224 px).", parser=whole_or_auto(1))]
MaxWordsOption = Annotated[int, typer.Option(help="Most words of one caption explained (each costs time and memory); raise it if you mean it.", parser=whole(1))]


def methods_help(default: str | None = None) -> str:
    from ..explain import METHODS

    listed = ", ".join(sorted(METHODS))
    return f"Comma-separated explanation methods: {listed}" + (f" (default: {default})." if default else
                                                                (" (default: every method the model has)."))


# ------------------------------------------------------------------------------ option groups
@dataclasses.dataclass
class DatasetOptions:
    """Where a dataset's parts live when not where its folder says (every verb that reads a dataset)."""

    images: Annotated[Optional[Path], typer.Option(help="Image root (images are IMAGES/filepath/filename); overrides the dataset folder's.")] = None
    instances: Annotated[Optional[Path], typer.Option(help="COCO instances_*.json (object boxes), or a folder of them; overrides the folder's.")] = None
    synonyms: Annotated[Optional[str], typer.Option(help="Object words: a synonyms JSON, or a built-in list (coco, flickr30k); overrides the folder's.")] = None

    def open(self, data: Path, check_images: bool = True):
        from ..data.bundle import open_data

        return open_data(data, self.images, self.instances, self.synonyms, check_images)


@dataclasses.dataclass
class ExperimentOptions:
    """Which images an experiment runs on and how their objects are labelled."""

    split: Annotated[str, typer.Option(help="Split to evaluate (train, val or test).")] = "test"
    limit: LimitOption = None
    subset: Annotated[Optional[str], typer.Option(help=f"A named subset: {', '.join(NAMED_SUBSETS)} (Table III: references mention clothes, not 'shirt').")] = None
    subset_words: Annotated[Optional[str], typer.Option(help="Only images whose references mention one of these comma-separated words.")] = None
    exclude_word: Annotated[Optional[str], typer.Option(help="... and never mention this word (comma-separated for several); finetune reports how often it is said.")] = None
    ground_truth: Annotated[GroundTruthChoice, typer.Option(help="Objects of an image: boxes (COCO instances), references (words of its reference captions) or auto (boxes where present).")] = "auto"
    beam_size: BeamOption = 3
    store: Annotated[Optional[Path], typer.Option(help="Explanation store (Zarr) to read explanations from and add missing ones to; default OUT/explanations.zarr.")] = None
    workers: WorkersOption = default_workers()
    device: DeviceOption = None


@dataclasses.dataclass
class LRPOptions:
    """The LRP rules' parameters (ignored by the other methods)."""

    epsilon: Annotated[float, typer.Option(help="LRP ε for linear, sum, attention and LSTM layers.", parser=number(0, 1e6))] = 0.01
    alpha: Annotated[float, typer.Option(help="LRP α for convolutions (α − β = 1).", parser=number(1, 1e6))] = 1.0
    beta: Annotated[float, typer.Option(help="LRP β for convolutions.", parser=number(0, 1e6))] = 0.0
    first_layer: Annotated[FirstLayerChoice, typer.Option(help="LRP rule of the first convolution: alphabeta or zb (the zB-rule).")] = "alphabeta"
    attention_rule: Annotated[AttentionRuleChoice, typer.Option(help="LRP through dot-product attention (transformer): cp (weights held constant, the papers' eq. 8) or attnlrp (AttnLRP: also through queries and keys).")] = "cp"

    def parameters(self) -> dict:
        if abs(self.alpha - self.beta - 1) > 1e-9:
            raise InvalidValue(f"--alpha and --beta must differ by 1 (α − β = 1), not {self.alpha:g} and {self.beta:g}")
        return {"epsilon": self.epsilon, "alpha": self.alpha, "beta": self.beta, "first_layer": self.first_layer.value,
                "attention_rule": self.attention_rule.value}


def _architecture_options() -> type:
    """A group with one option per keyword a registered decoder declares (``Decoder.options``): a new
    architecture's options reach ``train`` without touching the CLI."""
    declared: dict[str, tuple] = {}
    for architecture, decoder in sorted(ARCHITECTURES.items()):
        for name, option in decoder.options.items():
            spec = (option.kind, option.low, option.high, option.high_open)
            if name in declared and declared[name][0] != spec:
                raise TypeError(f"decoders declare the option {name!r} differently: {declared[name][1]} and {architecture}")
            declared.setdefault(name, (spec, [], option))[1].append((architecture, option.default))
    fields = []
    for name, ((kind, low, high, high_open), owners, option) in declared.items():
        parser = whole(low, high) if kind is int else number(low, high, high_open=high_open)
        defaults = ", ".join(f"{default:g} for {owner}" for owner, default in owners)
        help_text = f"{', '.join(owner for owner, _ in owners)}: {option.help} (default {defaults})."
        fields.append((name, Annotated[Optional[kind], typer.Option(help=help_text, parser=parser)], dataclasses.field(default=None)))

    def given(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}

    return dataclasses.make_dataclass("ArchitectureOptions", fields, namespace={"given": given})


ArchitectureOptions = _architecture_options()
