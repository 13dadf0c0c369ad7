"""The public surface of captionlens: everything the CLI and the viewer call lives behind these
functions (``import captionlens as cl``)."""
from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from .data.images import ImageInput, load_image
from .data.vocab import SPECIAL_TOKENS, Vocabulary
from .explain import MAX_WORDS, METHODS, Explanation, explain, explain_batch, method_parameters
from .explain.audit import AuditReport, audit_lrp
from .explain.store import ExplanationStore
from .io import atomic_write_text, claim_output_folder, write_json
from .models import Captioner, CaptionerConfig, build_model
from .models.captioner import architecture_settings
from .models.encoders import build_encoder
from .pipeline import train_captioner


def load(run_dir: str | Path, device: str | None = None) -> Captioner:
    """A trained captioner from a run folder (config.json, vocab.json, model.safetensors; or a Hugging
    Face captioner imported with ``captionlens import hf``)."""
    return Captioner.load(run_dir, device)


def from_hf(model, processor=None, prompt: str | None = None, max_length: int = 20,
            device: str | None = None) -> Captioner:
    """A Hugging Face captioner (VisionEncoderDecoder, BLIP, GIT, LLaVA) as a captionlens Captioner:
    ``from_hf("folder")`` for a local ``save_pretrained`` folder (model, tokenizer and image processor
    files; offline, never remote code), or ``from_hf(model, processor)`` for objects in memory. It
    captions with the model's own ``generate`` and every method explains each generated token. Needs
    the ``hf`` extra (transformers)."""
    from .models.hf import from_hf as load_hf

    return load_hf(model, processor, prompt, max_length, device)


def build_captioner(
    architecture: str,
    encoder: str = "vgg16",
    vocab: Vocabulary | Sequence[str] = (),
    hidden_size: int = 512,
    embed_size: int = 512,
    attention_size: int | None = None,
    dropout: float | None = None,
    seed: int = 0,
    encoder_weights: str | Path | None = None,
    encoder_options: dict | None = None,
    device: str | None = None,
    architecture_options: dict | None = None,
) -> Captioner:
    """A randomly initialised decoder of a registered architecture ("adaptive", "gridtd" with
    ``architecture_options`` global_dropout, "sat", "transformer" with layers, heads, encoder_layers) on a
    registered encoder ("vgg16", "resnet50", "resnet101", "efficientnet_lite0", "shapes"). ``vocab`` is
    a Vocabulary or a list of words (the special tokens are added when missing). ``encoder_weights``
    loads a local file (torchvision format for VGG16 and the ResNets); without it efficientnet_lite0
    takes the ImageNet weights of the ``efficientnet`` extra when installed, the others stay random."""
    if not isinstance(vocab, Vocabulary):
        words = [w for w in vocab if w not in SPECIAL_TOKENS]
        vocab = Vocabulary([*SPECIAL_TOKENS, *dict.fromkeys(words)])
    torch.manual_seed(seed)
    cnn = build_encoder(encoder, encoder_weights, **(encoder_options or {}))
    dropout, architecture_options = architecture_settings(architecture, dropout, architecture_options)
    config = CaptionerConfig(architecture, encoder, len(vocab), hidden_size, embed_size, attention_size, dropout,
                             encoder_options=cnn.options(), architecture_options=architecture_options)
    model = build_model(config)
    model.encoder = cnn
    return Captioner(model, vocab, config, device)


def explain_image(captioner: Captioner, image: ImageInput, out: str | Path, methods: Sequence[str],
                  caption: str | Sequence[str] | None = None, words: Sequence[int] | None = None,
                  include_end: bool = False, lrp: dict | None = None, beam_size: int = 3, precision: str = "fp32",
                  max_words_per_pass: int | str | None = None, max_words: int | None = MAX_WORDS,
                  progress: bool = False) -> Path:
    """Explain one image's caption (the model's own by default) with several methods and write
    caption.txt, explanation.json, ``<method>.npz`` and ``.npy`` heatmaps, ``heatmaps/<method>/*.png``
    (each word's map at the photo's shape) and figure.png into ``out``."""
    from .report.figures import explanation_figure

    picture = load_image(image)
    words_to_explain = (captioner.caption([picture], beam_size=beam_size)[0].words if caption is None
                        else caption if not isinstance(caption, str) else captioner.tokenize(caption))
    if not words_to_explain:
        raise ValueError(f"the caption of {image} is empty: nothing to explain (give one with --caption / caption=, "
                         "or caption with --beam-size 1: a wider beam can prefer the empty caption)")
    unknown = sorted({w for w in words_to_explain if w not in captioner.vocab})
    if unknown:
        warnings.warn(f"{image}: the model does not know {', '.join(map(repr, unknown))}: read and explained as <unk>",
                      stacklevel=2)
    out = claim_output_folder(out, "explanations")
    explanations: list[Explanation] = []
    from tqdm import tqdm

    name = Path(image).name if isinstance(image, (str, Path)) else "image"
    steps = tqdm(methods, desc=f"{name}: {len(words_to_explain)} words", unit="method", disable=not progress,
                 leave=False)
    for method in steps:
        steps.set_postfix_str(method)
        parameters = {k: v for k, v in (lrp or {}).items() if k in method_parameters(method)}
        explanations.append(explain(captioner, picture, words_to_explain, method, words, include_end, precision,
                                    max_words_per_pass, max_words, **parameters))
        if len(explanations[-1].words) and not explanations[-1].image.any():
            warnings.warn(f"{image}: every {method} map is exactly zero — the model's gradients vanish here "
                          "(saturated units, or an image the model ignores); another method may still show "
                          "evidence", stacklevel=2)
    atomic_write_text(out / "caption.txt", " ".join(words_to_explain) + "\n")
    write_json(out / "explanation.json", {
        "image": str(image) if isinstance(image, (str, Path)) else None,
        "caption": list(words_to_explain),
        "methods": {e.method: e.to_dict() | {"heatmaps": e.save_heatmaps(out).name} for e in explanations},
    })
    for explanation in explanations:  # each word's map as a PNG at the photo's shape: heatmaps/<method>/
        explanation.save_pngs(out / "heatmaps", picture)
    explanation_figure(picture, explanations, out / "figure.png")
    return out


__all__ = ["METHODS", "AuditReport", "Captioner", "audit_lrp", "Explanation", "ExplanationStore", "build_captioner", "build_encoder", "explain", "explain_batch", "from_hf",
           "explain_image", "load", "train_captioner"]
