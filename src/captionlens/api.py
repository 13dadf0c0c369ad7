"""The public surface of captionlens: everything the CLI and the viewer call lives behind these
functions (``import captionlens as cl``)."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from .data.vocab import SPECIAL_TOKENS, Vocabulary
from .models import Captioner, CaptionerConfig, build_model
from .models.encoders import build_encoder
from .pipeline import train_captioner


def load(run_dir: str | Path, device: str | None = None) -> Captioner:
    """A trained captioner from a run folder (config.json, vocab.json, model.safetensors)."""
    return Captioner.load(run_dir, device)


def build_captioner(
    architecture: str,
    encoder: str = "vgg16",
    vocab: Vocabulary | Sequence[str] = (),
    hidden_size: int = 512,
    embed_size: int = 512,
    attention_size: int | None = None,
    dropout: float = 0.5,
    seed: int = 0,
    encoder_weights: str | Path | None = None,
    encoder_options: dict | None = None,
    device: str | None = None,
) -> Captioner:
    """A randomly initialised captioner of a registered architecture ("adaptive", "gridtd") on a
    registered encoder ("vgg16", "shapes"). ``vocab`` is a Vocabulary or a list of words (the special
    tokens are added when missing). ``encoder_weights`` loads a local file (torchvision format for VGG16)."""
    if not isinstance(vocab, Vocabulary):
        words = [w for w in vocab if w not in SPECIAL_TOKENS]
        vocab = Vocabulary([*SPECIAL_TOKENS, *dict.fromkeys(words)])
    torch.manual_seed(seed)
    cnn = build_encoder(encoder, encoder_weights, **(encoder_options or {}))
    config = CaptionerConfig(architecture, encoder, len(vocab), hidden_size, embed_size, attention_size, dropout,
                             encoder_options=cnn.options())
    model = build_model(config)
    model.encoder = cnn
    return Captioner(model, vocab, config, device)


__all__ = ["Captioner", "build_captioner", "build_encoder", "load", "train_captioner"]
