"""The explanation store: every explained word of every caption of a split, by several methods, on
disk in Zarr v3, so experiments at the papers' scale read one word's maps instead of holding a
split's explanations in memory — and many processes can write one store at once.

Layout (one group per image, so reading one word's map touches one chunk)::

    STORE/zarr.json                 attributes: format, format_version, model (fingerprint), split,
                                    words ("all" or "objects"), parameters {method: {...}}
    STORE/images/<image id>/        attributes: image_id, file, words, token_ids, positions (the
                                    explained caption positions), caption_score
    STORE/images/<image id>/<method>/
        image      float16 [K, H, W]   pixel relevance at the model's input size (one chunk), divided
        image_scale float32 [K]        by each row's max |value| (so float16 keeps 3 digits of every map)
        grid       float32 [K, h, w]
        preceding  float32 [K, n+1]    relevance of <start> and each caption word
        score      float32 [K]
        beta       float32 [K]         where the method defines it (attention)
        positions  float32 [K]         where the model has learned positions (LRP on the transformer)
                                    attributes: complete = true, written last

Every file is written atomically by Zarr; an image's caption exists once its group does, and a
method's explanation counts only once ``complete`` is set, after its arrays, and only while every
array it vouches for is there with the shape the caption implies (``has`` checks): a process killed at
any moment leaves nothing that is read as complete, and the same command later redoes exactly what
is missing. A store belongs to one model and one set of method parameters; opening it with another
is a clear error (:class:`StoreMismatch`).

Several processes may write one store at once — torchrun ranks, or two commands started by hand: an
image is written only under its lock (``STORE/.locks/<image id>``, an ``flock`` that the system releases
when its process dies), so two writers never interleave on one image; ``claim`` lets a writer skip
images another process is writing and come back to them (``explain_split`` shares the work so).
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from ..errors import CaptionlensError, NotInStore
from ..io import with_user_mode
from .explanation import Explanation

STORE_FORMAT, STORE_VERSION = "captionlens-explanations", 1
WORD_MODES = ("all", "objects")
_ARRAYS = ("image", "grid", "preceding", "score")
CACHE_BYTES = 256 * 2**20  # explanations kept in memory, as stored, after they are written or read
EXTRAS = ("beta", "positions")  # per-word numbers some methods add: attention's β, LRP's positional share


class StoreMismatch(CaptionlensError, ValueError):
    """The store was written for another model, split, word selection or method parameters."""


# Image locks this process holds: (store folder, image id) -> [open lock file, depth]. flock conflicts
# between two opens of one file even in one process, so a lock taken again by its holder is counted.
_HELD: dict[tuple[str, int], list] = {}


@contextlib.contextmanager
def _image_lock(folder: Path, image_id: int, wait: bool) -> Iterator[bool]:
    """Hold the write lock of one image of the store in ``folder``; yields whether it was taken (always
    True with ``wait``: then it waits for the process holding it)."""
    key = (str(folder.resolve()), int(image_id))
    if key in _HELD:
        _HELD[key][1] += 1
        try:
            yield True
        finally:
            _HELD[key][1] -= 1
        return
    (folder / ".locks").mkdir(exist_ok=True)
    handle = open(folder / ".locks" / f"{int(image_id)}", "a")  # noqa: SIM115  (closed below)
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        _HELD[key] = [handle, 1]
        try:
            yield True
        finally:
            del _HELD[key]
            fcntl.flock(handle, fcntl.LOCK_UN)
    finally:
        handle.close()


def _zarr():
    try:
        import zarr
    except ImportError as error:  # pragma: no cover - zarr is a dependency
        raise ImportError("the explanation store needs zarr>=3: pip install 'zarr>=3'") from error
    return zarr


def _why_unreadable(caption: dict | None, arrays: dict | None, complete: bool) -> str | None:
    """Why an explanation group with these arrays cannot be read (None: it can)."""
    if caption is None or arrays is None:
        return "not written"
    if not complete:
        return "not complete"
    rows = len(caption["positions"])
    for name in (*_ARRAYS, "image_scale"):
        if name not in arrays:
            return f"marked complete but its {name!r} array is missing"
        if arrays[name].shape[:1] != (rows,):
            return f"marked complete but its {name!r} array has {arrays[name].shape[0]} rows, not {rows}"
    return None


def _nbytes(explanation: Explanation) -> int:
    tensors = (explanation.image, explanation.grid, explanation.preceding, explanation.score, *explanation.extra.values())
    return sum(t.numel() * t.element_size() for t in tensors)


class ExplanationStore:
    """``store = ExplanationStore.open(path)``; ``store.image_ids()``, ``store.words(image_id)``,
    ``store.image_map(image_id, position, "lrp")``, ``store.preceding(...)``, ``store.score(...)``,
    ``store.query(word="dog")``."""

    def __init__(self, root, path: Path) -> None:
        self._root = root
        self.path = path
        self.repaired: list[str] = []  # what opening for writing found broken and removed (see verify)
        self._cache: OrderedDict[tuple[int, str], Explanation] = OrderedDict()  # recent ones, as stored
        self._cached_bytes = 0

    # ----------------------------------------------------------------------------- opening
    @classmethod
    def open(cls, path: str | Path, mode: str = "r") -> "ExplanationStore":
        """An existing store (``mode="r+"`` to add to it)."""
        zarr = _zarr()
        path = Path(path)
        if not (path / "zarr.json").is_file():
            raise FileNotFoundError(f"no explanation store at {path} (make one with `captionlens explain-split`)")
        try:
            root = zarr.open_group(str(path), mode=mode)
        except Exception as error:  # zarr raises several types for an unreadable group
            raise ValueError(f"{path} is not a readable explanation store: {error}") from None
        if root.attrs.get("format") != STORE_FORMAT:
            raise ValueError(f"{path} is a Zarr group but not a captionlens explanation store")
        if root.attrs.get("format_version") != STORE_VERSION:
            raise ValueError(f"{path} has store format_version {root.attrs.get('format_version')}; this "
                             f"captionlens reads {STORE_VERSION}")
        return cls(root, path)

    @classmethod
    def create(cls, path: str | Path, model: str, split: str, words: str, parameters: dict[str, dict],
               any_words: bool = False) -> "ExplanationStore":
        """A new store, or the existing one at ``path`` if it was made for the same model, split and
        word selection (any selection with ``any_words``; its method parameters are checked and
        extended with new methods)."""
        zarr = _zarr()
        if words not in WORD_MODES:
            raise ValueError(f"words must be one of {WORD_MODES}, not {words!r}")
        path = Path(path)
        if (path / "zarr.json").is_file():
            store = cls.open(path, "r+")
            store.check(model, split, None if any_words else words)
            store.add_methods(parameters)
            store.remove_partial_files()
            store.repaired = store.verify(repair=True)
            return store
        if path.is_file() or (path.is_dir() and any(path.iterdir())):  # never overwrite what is not ours
            if (path / "zarr.json").is_file():  # another process created it since the check above
                return cls.create(path, model, split, words, parameters, any_words)
            raise ValueError(f"{path} exists and is not an explanation store: choose another --store path")
        # Built in a staging folder and renamed into place: rename is atomic, so of two processes
        # creating the same store one wins and the other opens what the winner made (never
        # ``mode="w"`` on the path itself, which deletes whatever another process just wrote there).
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".creating", dir=path.parent))
        try:
            root = zarr.open_group(str(staging), mode="w", attributes={
                "format": STORE_FORMAT, "format_version": STORE_VERSION, "model": model, "split": split,
                "words": words, "parameters": parameters})
            root.create_group("images")
            with_user_mode(staging, directory=True)  # mkdtemp's 0700 would hide the store from the user's group
            os.rename(staging, path)
        except OSError:
            if not (path / "zarr.json").is_file():
                raise
            return cls.create(path, model, split, words, parameters, any_words)  # another process won
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return cls(zarr.open_group(str(path), mode="r+"), path)

    @property
    def attributes(self) -> dict:
        return dict(self._root.attrs)

    def check(self, model: str, split: str | None = None, words: str | None = None) -> None:
        """Raise :class:`StoreMismatch` unless the store was made for this model (and split, words)."""
        attrs = self._root.attrs
        for key, wanted in (("model", model), ("split", split), ("words", words)):
            if wanted is not None and attrs.get(key) != wanted:
                what = "model (weights, vocabulary or config differ)" if key == "model" else key
                raise StoreMismatch(f"{self.path} was written for another {what}: {attrs.get(key)!r}, not {wanted!r}; "
                                    "use another --store path")

    def add_methods(self, parameters: dict[str, dict]) -> None:
        """Record the parameters of methods new to the store; a known method must keep its parameters."""
        known = dict(self._root.attrs.get("parameters", {}))
        for method, values in parameters.items():
            if method in known and known[method] != values:
                raise StoreMismatch(f"{self.path} holds {method} explanations with parameters {known[method]}, "
                                    f"not {values}; use another --store path")
        if set(parameters) - set(known):
            self._root.attrs["parameters"] = known | parameters

    def parameters(self, method: str) -> dict:
        return dict(self._root.attrs.get("parameters", {}).get(method, {}))

    def remove_partial_files(self) -> None:
        """Temporary files of writes that a killed process never finished (those of images another
        process is writing now are left to it)."""
        for partial in self.path.rglob("*.partial"):
            parts = partial.relative_to(self.path).parts
            image_id = int(parts[1]) if len(parts) > 2 and parts[0] == "images" and parts[1].isdigit() else None
            with self.claim([image_id] if image_id is not None else []) as ours:
                if ours:
                    partial.unlink(missing_ok=True)

    # ---------------------------------------------------------------------------- reading
    def _image(self, image_id: int):
        try:
            return self._root[f"images/{int(image_id)}"]
        except KeyError:
            raise NotInStore(f"image {image_id} is not in the store {self.path}") from None

    def image_ids(self) -> list[int]:
        """The images whose captions are in the store, in increasing id order."""
        return sorted(int(key) for key in self._root["images"].group_keys())

    def has_caption(self, image_id: int) -> bool:
        return f"images/{int(image_id)}" in self._root

    def words(self, image_id: int) -> list[str]:
        return list(self._image(image_id).attrs["words"])

    def caption(self, image_id: int) -> dict:
        """The caption record: ``words``, ``token_ids``, ``positions`` (explained), ``caption_score``, ``file``."""
        return dict(self._image(image_id).attrs)

    def positions(self, image_id: int) -> list[int]:
        return list(self._image(image_id).attrs["positions"])

    def has(self, image_id: int, method: str) -> bool:
        """Whether ``method``'s explanation of the image was written completely: marked complete, and
        every array it vouches for there with one row per explained word."""
        return self._problem(image_id, method) is None

    def _problem(self, image_id: int, method: str) -> str | None:
        """Why ``method``'s explanation of the image cannot be read (None: it can)."""
        if (int(image_id), method) in self._cache:  # complete when this process wrote or read it
            return None
        try:
            return _why_unreadable(*self._arrays(image_id, method))
        except Exception as error:  # noqa: BLE001  an unreadable group is an unfinished one
            return f"unreadable ({type(error).__name__})"

    def _arrays(self, image_id: int, method: str) -> tuple[dict | None, dict | None, bool]:
        """(the image's caption record, ``method``'s arrays by name, whether it is marked complete),
        read with one listing of the group; None for what is not written."""
        images = self._root["images"]
        if str(int(image_id)) not in images:
            return None, None, False
        image_group = images[str(int(image_id))]
        if method not in image_group:
            return dict(image_group.attrs), None, False
        group = image_group[method]
        return dict(image_group.attrs), dict(group.arrays()), bool(group.attrs.get("complete", False))

    def verify(self, repair: bool = False) -> list[str]:
        """Every explanation marked complete that is not (a missing or short array): one line each; with
        ``repair`` (a store opened for writing) those groups are removed, so they are written again."""
        found = []
        self._forget()  # what is on disk now, not what this process remembers
        for image_id in self.image_ids():
            with self.claim([image_id]) if repair else contextlib.nullcontext(True) as ours:
                if not ours:  # another process is writing it now: not broken, unfinished
                    continue
                for method in self._image(image_id).group_keys():
                    problem = self._problem(image_id, method)
                    if problem and problem not in ("not written", "not complete"):
                        found.append(f"image {image_id}, {method}: {problem}")
                        if repair:
                            del self._image(image_id)[method]
        self._forget()
        return found

    @contextlib.contextmanager
    def claim(self, image_ids: Sequence[int], wait: bool = False) -> Iterator[bool]:
        """The right to write these images, against every other process writing this store: yields True
        once all are held (in increasing id order, so two waiting writers cannot deadlock), or — without
        ``wait`` — False at once if another process holds one of them (then none is held)."""
        with contextlib.ExitStack() as held:
            for image_id in sorted({int(i) for i in image_ids}):
                if not held.enter_context(_image_lock(self.path, image_id, wait)):
                    held.close()
                    yield False
                    return
            yield True

    def methods(self, image_id: int) -> list[str]:
        return sorted(m for m in self._image(image_id).group_keys() if self.has(image_id, m))

    def explanation(self, image_id: int, method: str) -> Explanation:
        """All explained words of one image by ``method`` (recent ones, up to ``CACHE_BYTES``, are kept
        in memory)."""
        key = (int(image_id), method)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        try:
            caption, arrays, complete = self._arrays(image_id, method)
            problem = _why_unreadable(caption, arrays, complete)
        except Exception as error:  # noqa: BLE001  an unreadable group is an unfinished one
            problem = f"unreadable ({type(error).__name__})"
        if problem:
            raise NotInStore(f"the store {self.path} has no complete {method} explanation of image {image_id}")
        return self._remember(key, self._explanation(method, caption, {n: a[...] for n, a in arrays.items()}))

    def _explanation(self, method: str, caption: dict, arrays: dict[str, np.ndarray]) -> Explanation:
        """The Explanation that the stored ``arrays`` hold (the image map back at its scale)."""
        tensors = {name: torch.from_numpy(np.asarray(values, dtype=np.float32)) for name, values in arrays.items()}
        image = tensors.pop("image") * tensors.pop("image_scale").view(-1, 1, 1)
        extra = {name: tensors[name] for name in EXTRAS if name in tensors}
        words, positions = caption["words"], caption["positions"]
        return Explanation(method, [words[p] if p < len(words) else "<end>" for p in positions], positions,
                           ["<start>", *words], image, tensors["grid"], tensors["preceding"], tensors["score"],
                           self.parameters(method), extra)

    def _remember(self, key: tuple[int, str], explanation: Explanation) -> Explanation:
        self._forget(key)
        self._cache[key] = explanation
        self._cached_bytes += _nbytes(explanation)
        while self._cached_bytes > CACHE_BYTES and len(self._cache) > 1:
            self._forget(next(iter(self._cache)))
        return explanation

    def _forget(self, key: tuple[int, str] | None = None) -> None:
        """Drop one cached explanation (every one without ``key``)."""
        if key is None:
            self._cache.clear()
            self._cached_bytes = 0
        elif key in self._cache:
            self._cached_bytes -= _nbytes(self._cache.pop(key))

    def _row(self, image_id: int, position: int) -> int:
        positions = self.positions(image_id)
        if position not in positions:
            raise NotInStore(f"word {position} of image {image_id} was not explained (explained: {positions})")
        return positions.index(position)

    def image_map(self, image_id: int, position: int, method: str) -> np.ndarray:
        """Pixel relevance [H, W] (float32) of the word at ``position``."""
        return self.explanation(image_id, method).image[self._row(image_id, position)].numpy()

    def grid_map(self, image_id: int, position: int, method: str) -> np.ndarray:
        return self.explanation(image_id, method).grid[self._row(image_id, position)].numpy()

    def preceding(self, image_id: int, position: int, method: str) -> np.ndarray:
        """Relevance of <start> and the caption words [n+1] (0 after the explained word)."""
        return self.explanation(image_id, method).preceding[self._row(image_id, position)].numpy()

    def score(self, image_id: int, position: int, method: str) -> float:
        return float(self.explanation(image_id, method).score[self._row(image_id, position)])

    def beta(self, image_id: int, position: int, method: str = "attention") -> float | None:
        extra = self.explanation(image_id, method).extra
        return float(extra["beta"][self._row(image_id, position)]) if "beta" in extra else None

    def query(self, word: str | None = None) -> list[tuple[int, int]]:
        """(image id, position) of every explained word (equal to ``word`` when given)."""
        found = []
        for image_id in self.image_ids():
            caption = self.caption(image_id)
            words = caption["words"]
            found += [(image_id, p) for p in caption["positions"]
                      if word is None or (p < len(words) and words[p] == word)]
        return found

    # ---------------------------------------------------------------------------- writing
    def write_caption(self, image_id: int, file: str, words: Sequence[str], token_ids: Sequence[int],
                      positions: Sequence[int], caption_score: float) -> None:
        """The image's caption and the positions that will be explained (written once)."""
        with self.claim([image_id], wait=True):
            self._write_caption(image_id, file, words, token_ids, positions, caption_score)

    def _write_caption(self, image_id: int, file: str, words: Sequence[str], token_ids: Sequence[int],
                       positions: Sequence[int], caption_score: float) -> None:
        if self.has_caption(image_id):
            stored = self.caption(image_id)
            if stored["words"] != list(words) or stored["positions"] != list(positions):
                raise StoreMismatch(f"image {image_id} is in {self.path} with the caption {stored['words']} "
                                    f"(positions {stored['positions']}), not {list(words)} ({list(positions)})")
            return
        self._root["images"].create_group(str(int(image_id)), attributes={
            "image_id": int(image_id), "file": file, "words": list(words), "token_ids": [int(t) for t in token_ids],
            "positions": [int(p) for p in positions], "caption_score": float(caption_score)})

    def write_explanation(self, image_id: int, explanation: Explanation) -> None:
        """One method's explanation of the image's explained positions; ``complete`` is set last. Under
        the image's lock: if another writer completed it meanwhile, it is kept."""
        with self.claim([image_id], wait=True):
            if not self.has(image_id, explanation.method):
                self._write_explanation(image_id, explanation)

    def _write_explanation(self, image_id: int, explanation: Explanation) -> None:
        method = explanation.method
        if explanation.positions != self.positions(image_id):
            raise ValueError(f"image {image_id}: explained {explanation.positions}, the store wants "
                             f"{self.positions(image_id)}")
        known = self.parameters(method)
        if known and known != explanation.parameters:
            raise StoreMismatch(f"{self.path} holds {method} with parameters {known}, not {explanation.parameters}")
        image_group = self._image(image_id)
        if method in image_group:  # an unfinished earlier attempt
            del image_group[method]
        group = image_group.create_group(method)
        image = explanation.image.numpy().astype(np.float32)
        scale = np.abs(image).max(axis=(1, 2), initial=0.0)
        scale[scale == 0] = 1.0
        arrays = {"image": image / scale[:, None, None], "image_scale": scale, "grid": explanation.grid.numpy(),
                  "preceding": explanation.preceding.numpy(), "score": explanation.score.numpy()}
        arrays |= {name: explanation.extra[name].numpy() for name in EXTRAS if name in explanation.extra}
        stored = {}
        for name, values in arrays.items():
            stored[name] = np.ascontiguousarray(values, dtype=np.float16 if name == "image" else np.float32)
            array = group.create_array(name, shape=stored[name].shape, dtype=stored[name].dtype,
                                       chunks=tuple(max(1, n) for n in stored[name].shape))
            if stored[name].size:
                array[...] = stored[name]
        group.attrs["complete"] = True
        # What a read would return, kept: the experiments read what they have just written.
        self._remember((int(image_id), method), self._explanation(method, dict(image_group.attrs), stored))
