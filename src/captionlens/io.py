"""Small file helpers: every file captionlens writes appears whole or not at all."""
from __future__ import annotations

import hashlib
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
    """Parsed JSON; a missing file is a FileNotFoundError and bad content a ValueError, each naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no file at {path}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error})") from None


def sha256(path: str | Path) -> str:
    """The SHA-256 of a file's bytes (read in 1 MiB pieces)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for piece in iter(lambda: handle.read(1 << 20), b""):
            digest.update(piece)
    return digest.hexdigest()


def process_alive(pid: int) -> bool:
    """Whether a process with this id runs (used to tell a dead writer's leftovers from a live one's)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_leftovers(folder: Path, pattern: str) -> None:
    """Delete the files or folders matching ``pattern`` (their names carry the writer's pid as the
    first run of digits after the pattern's prefix) whose writer no longer runs."""
    import re
    import shutil

    prefix = pattern.split("*")[0]
    for path in folder.glob(pattern):
        found = re.search(r"\d+", path.name[len(prefix):])
        if found and not process_alive(int(found.group())):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
