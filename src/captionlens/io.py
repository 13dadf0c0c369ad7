"""Small file helpers: every file captionlens writes appears whole or not at all."""
from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from .errors import CaptionlensError


def current_umask() -> int:
    """The process's umask (read from /proc where it can be, without changing it; else set and reset)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def with_user_mode(path: str | Path, directory: bool = False) -> None:
    """Give a file (or folder) made by ``tempfile`` — 0600 (0700) — the mode an ordinary ``open``
    (``mkdir``) would have given it under the user's umask, e.g. 0644 (0755)."""
    os.chmod(path, (0o777 if directory else 0o666) & ~current_umask())


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp_path)`` and move the result to ``path`` in one rename, so a crash never
    leaves a half-written file behind; the file gets the user's umask like any other tool's."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        with_user_mode(tmp)
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


OUTPUT_MARKER = ".captionlens"  # in every folder captionlens creates for its output: {"kind": ...}
# Folders of each kind that captionlens wrote before it left markers, recognised by their files.
_RECOGNISED: dict[str, tuple[tuple[str, ...], ...]] = {
    "dataset": (("shapes_config.json", "dataset_shapes.json"), ("captionlens_dataset.json",)),
    "run": (("config.json", "vocab.json"),),
    "demo": (("summary.json",), ("data", "encoder")),
    "results": (("explanations.zarr",),),
    "explanations": (("explanation.json",), ("caption.txt",)),
}


class OutputRefused(CaptionlensError, ValueError):
    """An --out that captionlens would not write into: a file, the current folder, or a folder of
    someone else's."""


def claim_output_folder(path: str | Path, kind: str) -> Path:
    """Make ``path`` a folder of ``kind`` ("dataset", "run", "demo", "results", "explanations") that
    captionlens may write into (and, for a dataset, replace): it must not exist, be empty, or be a
    folder of that kind that captionlens made (its ``.captionlens`` marker, or the files of an older
    one). Anything else — a file, the current folder or one above it, a folder holding someone's files
    — raises :class:`OutputRefused` naming it, before anything is written or deleted."""
    path = Path(path)
    if kind not in _RECOGNISED:
        raise ValueError(f"unknown output kind {kind!r}")
    resolved, here = path.resolve(), Path.cwd().resolve()
    if resolved == here or resolved in here.parents:
        raise OutputRefused(f"{path} is the current folder or holds it: choose a new folder for the {kind}")
    if path.exists() and not path.is_dir():
        raise OutputRefused(f"{path} is a file, not a folder: choose a folder for the {kind}")
    if path.is_dir() and any(not _pending_marker(p) for p in path.iterdir()) and output_kind(path) != kind:
        found = output_kind(path)
        what = f"a captionlens {found} folder" if found else "not a folder captionlens made"
        raise OutputRefused(f"{path} is not empty and is {what}: nothing was written; choose another folder "
                            f"for the {kind} (or empty it yourself)")
    path.mkdir(parents=True, exist_ok=True)
    nested = output_kind(path.parent) == kind  # one image's folder inside `explain --out`: marked by its parent
    if not nested and not (path / OUTPUT_MARKER).is_file():
        write_json(path / OUTPUT_MARKER, {"kind": kind})
    return path


def _pending_marker(entry: Path) -> bool:
    """The temporary file of a marker another process is writing now (claiming the same new folder)."""
    return entry.name.startswith(f".{OUTPUT_MARKER}.") and entry.name.endswith(".tmp")


def output_kind(path: Path) -> str | None:
    """What kind of captionlens output folder ``path`` is, or None."""
    try:
        marked = json.loads((path / OUTPUT_MARKER).read_text())
        if isinstance(marked, dict) and marked.get("kind") in _RECOGNISED:
            return marked["kind"]
    except (OSError, ValueError):
        pass
    for kind, signatures in _RECOGNISED.items():
        if any(all((path / name).exists() for name in names) for names in signatures):
            return kind
    return None


def file_hash(path: str | Path, algorithm: str = "sha256") -> str:
    """The hex digest of a file's bytes (``hashlib.file_digest``, read in pieces): "sha256" for the run
    folder's manifest, "blake2b" where speed matters (the feature cache's content keys)."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, algorithm).hexdigest()


def weights_digest(state: dict, *context: str) -> str:
    """A short hash of a state dict's names and values (and of ``context`` strings: a config, a
    vocabulary): two models with the same digest compute the same function."""
    digest = hashlib.sha1()
    for text in context:
        digest.update(text.encode())
    for name, tensor in sorted(state.items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def sha256(path: str | Path) -> str:
    """The SHA-256 of a file's bytes."""
    return file_hash(path, "sha256")


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
