"""Encoders, decoders and beam search. Importing this package registers every architecture and encoder."""
from . import adaptive, efficientnet, encoders, gridtd, resnet, sat, transformer, vit_gpt2  # noqa: F401  (registration side effects)
from .captioner import Caption, Captioner, CaptionerConfig, CaptionModel, build_model
from .registry import ARCHITECTURES, ENCODERS

__all__ = ["ARCHITECTURES", "ENCODERS", "Caption", "CaptionModel", "Captioner", "CaptionerConfig", "build_model"]
