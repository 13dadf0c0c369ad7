"""Small file helpers: every file captionlens writes appears whole or not at all."""
from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp_path)`` and move the result to ``path`` in one rename, so a crash never
    leaves a half-written file behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def strict(data: object) -> object:
    """``data`` with every float that JSON cannot hold (NaN, ±inf) replaced by ``None``, numpy scalars
    and arrays turned into Python numbers and lists, and tuples into lists."""
    if isinstance(data, dict):
        return {str(key): strict(value) for key, value in data.items()}
    if isinstance(data, (list, tuple)):
        return [strict(value) for value in data]
    if hasattr(data, "tolist") and not isinstance(data, (str, bytes)):  # numpy scalars and arrays
        return strict(data.tolist())
    if isinstance(data, float) and not math.isfinite(data):
        return None
    return data


def dumps(data: object, indent: int | None = 2) -> str:
    """Strict JSON text (RFC 8259: no NaN or Infinity; those become ``null``)."""
    return json.dumps(strict(data), indent=indent, allow_nan=False)


def write_json(path: str | Path, data: object) -> None:
    """Write strict JSON (see :func:`dumps`) atomically."""
    atomic_write_text(path, dumps(data) + "\n")


def read_json(path: str | Path) -> object:
    return json.loads(Path(path).read_text())
