"""The errors captionlens raises on purpose, and the checks of the numbers it is given.

Every error a user can cause — a bad option, a missing file, a folder that is not ours, a model the
rules do not cover — is a :class:`CaptionlensError` (often also a ``ValueError``, ``FileNotFoundError``
... for callers that catch those): the CLI and the viewer print its message, never a traceback. A
``CaptionlensError`` is a promise that the message says what is wrong and what to do.
"""
from __future__ import annotations

import math
import numbers


class CaptionlensError(Exception):
    """Base of the errors captionlens raises for what a user gave it."""


class InvalidValue(CaptionlensError, ValueError):
    """A number or option outside what it may be (a batch size of -4, a NaN tolerance, port 99999)."""


class UnsupportedModel(CaptionlensError, TypeError):
    """A model the explanation rules do not cover (a module without an LRP rule, a packed LSTM)."""


class TrainingDiverged(CaptionlensError, FloatingPointError):
    """The training loss became NaN or infinite; the last good weights were kept."""


class ToolMissing(CaptionlensError, RuntimeError):
    """An outside program a feature needs (Java for METEOR and the PTB tokenizer) is not installed."""


class OutOfRange(CaptionlensError, IndexError):
    """A word position outside the caption."""


class UnknownParameter(CaptionlensError, TypeError):
    """A keyword a method does not take (``epsilon`` for Grad-CAM)."""


class NotInStore(CaptionlensError, KeyError):
    """An explanation store does not hold what was asked for."""

    def __str__(self) -> str:  # KeyError would print its message in quotes
        return str(self.args[0]) if self.args else ""


def integer(name: str, value: object, low: int | None = 1, high: int | None = None) -> int:
    """``value`` as an int in [low, high], or :class:`InvalidValue` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InvalidValue(f"{name} must be a whole number, not {value!r}")
    value = int(value)
    if (low is not None and value < low) or (high is not None and value > high):
        raise InvalidValue(f"{name} must {range_text(low, high, name=name)}, not {value}")
    return value


def real(name: str, value: object, low: float | None = None, high: float | None = None,
         low_open: bool = False, high_open: bool = False) -> float:
    """``value`` as a finite float in [low, high] (open ends where asked), or :class:`InvalidValue`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidValue(f"{name} must be a number, not {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise InvalidValue(f"{name} must be a finite number, not {value}")
    if (low is not None and (value < low or (low_open and value == low))) or \
            (high is not None and (value > high or (high_open and value == high))):
        raise InvalidValue(f"{name} must {range_text(low, high, low_open, high_open, name)}, not {value:g}")
    return value


def range_text(low, high, low_open: bool = False, high_open: bool = False, name: str = "it") -> str:
    """What a number must do, as a message says it: "be ≥ 1", "satisfy 1 ≤ layers ≤ 256"."""
    if low is not None and high is not None:
        return f"satisfy {low:g} {'<' if low_open else '≤'} {name} {'<' if high_open else '≤'} {high:g}"
    if low is not None:
        return f"be {'>' if low_open else '≥'} {low:g}"
    if high is not None:
        return f"be {'<' if high_open else '≤'} {high:g}"
    return "be a number"
