"""``explain``, ``explain_batch`` and ``explain_pixels``: from a captioner, images and captions to one
``Explanation`` per image — the words selected, the model in the asked precision, one forward and one
batched backward of the registered method for all of them."""
from __future__ import annotations

import copy
import functools
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils._pytree import tree_map

from ..data.images import ImageInput, load_image
from ..errors import InvalidValue, OutOfRange, UnknownParameter
from ..models.captioner import Caption, Captioner
from .engine import Targets, words_per_pass
from .explanation import Explanation
from .methods import method_info
from .rules import with_values_of

CaptionLike = Caption | Sequence[str] | str
MAX_WORDS = 100  # words explained per caption unless told otherwise (1500 once ran 10 minutes at 1.7 GB)


def _positions(words: Sequence[int] | None, length: int, include_end: bool) -> list[int]:
    last = length + 1 if include_end else length  # <end> is position `length`
    if words is None:
        return list(range(last))
    positions = [int(p) for p in words]
    bad = [p for p in positions if not 0 <= p < last]
    if bad:
        raise OutOfRange(f"word index {bad[0]} is out of range for a caption of {length} words"
                         + (" (+ <end>)" if include_end else ""))
    return positions


def method_parameters(method: str) -> list[str]:
    """The keyword parameters a method takes (e.g. epsilon, alpha, beta for "lrp")."""
    return list(method_info(method).parameters)


@dataclass(frozen=True)
class Precision:
    """How a precision runs the captioner: its vision module (the image encoder: VGG16, ResNet, a ViT)
    in ``vision``, the rest (the decoder, or the language model) in ``language``."""

    vision: torch.dtype
    language: torch.dtype


PRECISIONS = {
    "fp32": Precision(torch.float32, torch.float32),  # the reference
    "bf16": Precision(torch.bfloat16, torch.bfloat16),  # all of it (a large language model's memory halved)
    # the image encoder's graph, where the FLOPs are, in bfloat16; the decoder in float32 (reading the
    # encoder's float32 values: _convert_vision), where bfloat16's rounding costs the maps most
    "bf16-vision": Precision(torch.bfloat16, torch.float32),
}
PRECISION_CHOICES = (*PRECISIONS, "auto")  # "auto": the model's auto_precision where bf16 is native, else fp32
BF16_CPU_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})  # /proc/cpuinfo flags of x86 bfloat16 units


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux lists them in /proc/cpuinfo (empty elsewhere)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return frozenset()
    return next((frozenset(line.split(":", 1)[1].split()) for line in lines if line.startswith("flags")), frozenset())


def native_bf16(device: str | torch.device = "cpu") -> bool:
    """Whether ``device`` computes bfloat16 natively: a CUDA GPU that supports it, or an x86 CPU with
    AMX or AVX512-BF16 units (elsewhere bf16 is emulated and rarely faster than fp32)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and bool(cpu_flags() & BF16_CPU_FLAGS)


@functools.cache
def huge_page_buffers() -> bool:
    """Whether PyTorch's CPU allocator of this process asks for transparent huge pages for large buffers
    (``THP_MEM_ALLOC_ENABLE=1`` was set before its first allocation, as importing captionlens first
    does): such buffers are then page-aligned rather than 64-byte aligned, which is what is probed.
    Where the kernel has them (``/sys/kernel/mm/transparent_hugepage/enabled`` not "never"), a buffer
    is faulted in 2 MiB at a time instead of 4 KiB (docs/benchmarks.md, "Page faults")."""
    if not sys.platform.startswith("linux"):  # PyTorch knows THP only on Linux (macOS pages big buffers anyway)
        return False
    probes = [torch.empty((1 << 21) + 64 * i, dtype=torch.uint8) for i in range(1, 4)]
    return all(probe.data_ptr() % 4096 == 0 for probe in probes)


def resolve_precision(precision: str, device: str | torch.device = "cpu", model: torch.nn.Module | None = None) -> str:
    """A name of ``PRECISIONS`` as asked; "auto" becomes ``model.auto_precision`` where ``device``
    computes bfloat16 natively (``native_bf16``), else fp32 — an option to choose, never the silent
    default (fp32 is the reference). captionlens's own architectures choose bf16-vision (their CNN holds
    nearly all of the work: LRP 0.33× fp32's time against bf16's 0.26–0.28× on an AMX CPU, the maps
    much closer to fp32's), Hugging Face captioners bf16 (their language model holds much of the work:
    on ViT-GPT2 bf16-vision leaves it in float32); docs/benchmarks.md. Without a model, bf16-vision."""
    if precision not in PRECISION_CHOICES:
        raise ValueError(f"precision must be one of {', '.join(PRECISION_CHOICES)}, not {precision!r}")
    if precision == "auto":
        return getattr(model, "auto_precision", "bf16-vision") if native_bf16(device) else "fp32"
    return precision


def resolved_parameters(method: str, precision: str = "fp32", **given) -> dict:
    """Every parameter of ``method`` with its value (``given`` over the method's defaults) and the
    precision (``resolve_precision``'s answer on the CPU for "auto"; the explainers resolve it on the
    model's device first): what an explanation's ``parameters`` record."""
    defaults = method_info(method).parameters
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise UnknownParameter(f"method {method!r} takes {', '.join(defaults) or 'no parameters'}, not {', '.join(unknown)}")
    return defaults | given | {"precision": resolve_precision(precision)}


def _model_in(captioner: Captioner, precision: str) -> torch.nn.Module:
    """The captioner's network in ``precision``: itself for fp32; otherwise a converted copy, one per
    precision, kept until the weights change (the reduced-precision fast path for CPUs with bfloat16
    units, e.g. AMX): asking for bf16 and bf16-vision in turn converts the model once each, not each time."""
    model = captioner.model
    if precision == "fp32":
        return model
    weights = tuple((p.data_ptr(), p._version) for p in model.parameters())
    copies = getattr(captioner, "_reduced_precision", {})
    if precision not in copies or copies[precision][0] != weights:
        dtypes = PRECISIONS[precision]
        converted = copy.deepcopy(model).to(dtypes.language).eval()
        _convert_vision(converted.vision_module(), dtypes.vision, dtypes.language)
        # a new dict: a captioner shallow-copied by with_model must not see this one's copies change
        captioner._reduced_precision = copies = {**copies, precision: (weights, converted)}
    return copies[precision][1]


def _convert_vision(vision: torch.nn.Module, inside: torch.dtype, outside: torch.dtype) -> None:
    """``vision``'s graph is computed in ``inside``, in its ``reduced_precision_layout`` (channels last
    for VGG-style encoders, ``models.encoders.Encoder``; the usual layout elsewhere): its floating-point
    inputs are cast to it (channels last: images [B, C, H, W] laid out [B, H, W, C] in memory, with its
    convolutions' weights) and its outputs (a tensor, or a Hugging Face output of several) back to
    ``outside``, the rest of the model's dtype. Autograd casts the gradient or relevance flowing back
    through each cast the other way. float32 keeps the usual layout: channels last sums in another
    order (fp32 is the reference).

    Where ``inside`` is narrower than ``outside`` (bf16-vision), the rest of the model reads the
    values of a copy of ``vision`` run in ``outside`` without a graph, the gradient or relevance of
    those values flowing into ``output``'s graph unchanged (``rules.with_values_of``): the decoder
    computes from float32 features, and only the encoder's backward rounds to bfloat16 (the lowest
    per-word Pearson of the transformer's LRP with fp32's 0.9988 → 0.9999, for one more forward of
    the encoder; docs/benchmarks.md)."""
    def cast(dtype: torch.dtype, layout: torch.memory_format):
        def one(x):
            if not (torch.is_tensor(x) and x.is_floating_point()):
                return x
            return x.to(dtype, memory_format=layout if x.dim() == 4 else torch.preserve_format)
        return lambda tree: tree_map(one, tree)

    def exact_values(exact: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        if not (torch.is_tensor(output) and output.is_floating_point()):
            return output
        return with_values_of(exact, output)

    layout = getattr(vision, "reduced_precision_layout", torch.contiguous_format)
    to_inside, to_outside = cast(inside, layout), cast(outside, torch.preserve_format)
    exact = copy.deepcopy(vision).to(outside) if inside != outside else None  # outside the module tree: no hooks
    computed: list = []  # the exact copy's output, from the pre-hook (its inputs uncast) to the hook

    def before(module, args, kwargs):
        if exact is not None:
            with torch.no_grad():
                computed.append(exact(*to_outside(args), **to_outside(kwargs)))  # (a probe may come in bf16)
        return to_inside(args), to_inside(kwargs)

    def after(module, args, output):
        output = to_outside(output)
        return tree_map(exact_values, computed.pop(), output) if exact is not None else output

    vision.to(inside, memory_format=layout)
    vision.register_forward_pre_hook(before, with_kwargs=True)
    vision.register_forward_hook(after)


def explain_batch(captioner: Captioner, images: Sequence[ImageInput], captions: Sequence[CaptionLike],
                  method: str = "lrp", words: Sequence[int] | Sequence[Sequence[int]] | None = None,
                  include_end: bool = False, precision: str = "fp32", max_words_per_pass: int | str | None = None,
                  max_words: int | None = MAX_WORDS, **parameters) -> list[Explanation]:
    """Explain several images at once (one forward, one batched backward): one Explanation each.

    ``words`` selects caption positions (0-based) to explain — all words by default, one list for
    every image or one list per image; ``include_end`` also explains the <end> token.
    ``parameters`` go to the method (LRP: epsilon, alpha, beta, first_layer; Grad-CAM: relu).
    ``precision`` (``PRECISIONS``): "fp32", the reference; "bf16-vision" runs the image encoder's graph
    in bfloat16 and the decoder in float32 on the encoder's float32 values, "bf16" all of the model in
    bfloat16 — on an AMX CPU at the papers' size 0.30–0.35× and 0.18–0.30× of fp32's time,
    bf16-vision's LRP maps the closer to fp32's (lowest per-word Pearson 0.9999 for grid-TD and the
    transformer, against bf16's 0.9997 and 0.977: docs/benchmarks.md);
    ``precision="auto"`` picks the model's ``auto_precision`` (bf16-vision; bf16 for a Hugging Face
    captioner) where its device computes bfloat16 natively (a GPU, or a CPU with AMX or AVX512-BF16),
    fp32 elsewhere, and records which ran;
    ``max_words_per_pass`` bounds how many words share one backward (memory; ``"auto"``: as many as fit
    in 256 MiB by the traced forward's largest activation, 4 words for VGG16 at 224 px); more than ``max_words``
    words of one caption (100) is an error unless raised (None: no bound)."""
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    resolved_parameters(method, precision, **parameters)  # unknown parameters fail before any image is read
    pictures = [load_image(image) for image in images]
    explanations = explain_pixels(captioner, captioner.preprocess(pictures), captions, method, words, include_end,
                                  precision, max_words_per_pass, max_words, **parameters)
    for explanation, picture in zip(explanations, pictures):
        explanation.photo_size = picture.size  # (width, height): what .heatmap(size="photo") resamples to
    return explanations


def explain_pixels(captioner: Captioner, pixels: torch.Tensor, captions: Sequence[CaptionLike], method: str = "lrp",
                   words: Sequence[int] | Sequence[Sequence[int]] | None = None, include_end: bool = False,
                   precision: str = "fp32", max_words_per_pass: int | str | None = None, max_words: int | None = MAX_WORDS,
                   **parameters) -> list[Explanation]:
    """``explain_batch`` on inputs already preprocessed for the model: ``pixels`` [B, 3, H, W]
    (normalised) — for inputs no image file can hold, such as the shifted inputs of the input
    invariance test (``experiments/sanity.py``)."""
    precision = resolve_precision(precision, captioner.device, captioner.model)
    recorded = resolved_parameters(method, precision, **parameters)  # unknown parameters are an error
    if len(pixels) != len(captions):
        raise ValueError(f"{len(pixels)} inputs but {len(captions)} captions")
    vocab = captioner.vocab
    # a word the vocabulary lacks is read by the model as <unk>, and labelled so: what was explained
    encoded = [captioner.caption_ids(c) for c in captions]  # (words, [<start>, w_1 .. w_n, <end>])
    word_lists = [words for words, _ in encoded]
    per_image = words is not None and len(words) > 0 and not isinstance(words[0], (int, float))
    if per_image and len(words) != len(captions):
        raise ValueError(f"{len(words)} lists of word positions for {len(captions)} images")
    selected = [_positions(words[b] if per_image else words, len(w), include_end) for b, w in enumerate(word_lists)]
    longest = max((len(s) for s in selected), default=0)
    if max_words is not None and longest > max_words:
        raise InvalidValue(f"{longest} words of one caption were asked to be explained, more than max_words="
                           f"{max_words} (explaining costs time and memory per word): pick positions (words=...), "
                           "or raise max_words (--max-words) if you mean it")
    if not any(selected):
        return [_empty(method, w, recorded) for w in word_lists]
    device = captioner.device
    longest = max(len(w) for w in word_lists) + 1  # steps fed: <start>, w_1 .. w_n
    token_ids = torch.full((len(captions), longest), vocab.pad_id, dtype=torch.long, device=device)
    k = max(len(s) for s in selected)
    steps = torch.zeros(len(captions), k, dtype=torch.long, device=device)
    tokens = torch.zeros_like(steps)
    valid = torch.zeros(len(captions), k, dtype=torch.bool, device=device)
    for b, (w, positions) in enumerate(zip(word_lists, selected)):
        ids = encoded[b][1]  # <start> w_1 .. w_n <end>
        token_ids[b, : len(ids) - 1] = torch.tensor(ids[:-1])
        for j, position in enumerate(positions):
            steps[b, j], tokens[b, j], valid[b, j] = position, ids[position + 1], True
    info = method_info(method)
    # bf16-vision's decoder computes in float32 from the float32 encoder's values: a method that uses
    # nothing of the encoder but its output gets fp32's numbers, without the bfloat16 encoder's forward
    runs_in = "fp32" if precision == "bf16-vision" and not info.enters_vision else precision
    model = _model_in(captioner, runs_in).eval()
    # fp32 runs the model as it is (float64 for the oracle tests); the others take the pixels in their
    # language dtype (bf16-vision's exact encoder forward reads them uncast), their vision module casts
    dtype = next(model.parameters()).dtype if runs_in == "fp32" else PRECISIONS[runs_in].language
    pixels = pixels.to(device=device, dtype=dtype)
    with words_per_pass(max_words_per_pass):
        output = info.function(model, pixels, token_ids, Targets(steps, tokens, valid), **parameters)
    result = (lambda t: t.detach().cpu()) if runs_in == "fp32" else (lambda t: t.detach().float().cpu())
    explanations = []
    for b, (w, positions) in enumerate(zip(word_lists, selected)):
        n, count = len(w), len(positions)
        explanations.append(Explanation(
            method=method,
            words=[w[p] if p < n else "<end>" for p in positions],
            positions=positions,
            tokens=["<start>", *w],
            image=result(output.image[b, :count]),
            grid=result(output.grid[b, :count]),
            preceding=_pad_columns(result(output.preceding[b, :count, : n + 1]), n + 1),
            score=result(output.score[b, :count]),
            parameters=recorded,
            extra={name: result(value[b, :count]) for name, value in output.extra.items()},
        ))
    return explanations


def _empty(method: str, words: list[str], parameters: dict) -> Explanation:
    """An explanation of no words (nothing was selected)."""
    return Explanation(method, [], [], ["<start>", *words], torch.zeros(0, 0, 0), torch.zeros(0, 0, 0),
                       torch.zeros(0, len(words) + 1), torch.zeros(0), parameters)


def _pad_columns(preceding: torch.Tensor, columns: int) -> torch.Tensor:
    """The relevance of w_n is only defined when <end> is explained; pad the column with 0 otherwise."""
    if preceding.shape[1] < columns:
        preceding = torch.cat([preceding, preceding.new_zeros(preceding.shape[0], columns - preceding.shape[1])], 1)
    return preceding


def explain(captioner: Captioner, image: ImageInput, caption: CaptionLike, method: str = "lrp",
            words: Sequence[int] | None = None, include_end: bool = False, precision: str = "fp32",
            max_words_per_pass: int | str | None = None, max_words: int | None = MAX_WORDS, **parameters) -> Explanation:
    """Explain every word (or the positions in ``words``) of ``caption`` for ``image``. An empty
    caption (e.g. the model's own, when it says ``<end>`` first) is an error, as at the command line."""
    explanation = explain_batch(captioner, [image], [caption], method, words, include_end, precision,
                                max_words_per_pass, max_words, **parameters)[0]
    if len(explanation.tokens) == 1 and not include_end:
        raise InvalidValue("the caption is empty: nothing to explain (give a caption of your own, or caption with "
                           "beam_size=1: a wider beam can prefer an empty caption; include_end=True explains <end>)")
    return explanation
