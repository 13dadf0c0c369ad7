"""The Explanation record: one image, one method, every explained word — the same shapes for every
method, so experiments and viewers treat them alike. Saved as JSON (words, scores, linguistic
relevance, parameters) plus an ``.npz`` of the heatmaps; no pickles."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..io import atomic_write, write_json

FORMAT_VERSION = 1


@dataclass
class Explanation:
    method: str
    words: list[str]  # the K explained words
    positions: list[int]  # their indices in the caption (0-based; len(caption) for <end>)
    tokens: list[str]  # ["<start>", w_1 .. w_n]: what the columns of ``preceding`` are
    image: torch.Tensor  # [K, H, W] signed pixel relevance at the model's input resolution, channels summed
    grid: torch.Tensor  # [K, h, w] relevance on the encoder's feature grid
    preceding: torch.Tensor  # [K, n+1] relevance of <start> and each caption word; 0 where j > position
    score: torch.Tensor  # [K] the explained fc logit of each word
    parameters: dict = field(default_factory=dict)
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # e.g. "beta" [K] for attention
    photo_size: tuple[int, int] | None = None  # (width, height) of the photo explained, where known

    def __post_init__(self) -> None:
        k = len(self.words)
        for name in ("image", "grid", "preceding", "score"):
            if getattr(self, name).shape[0] != k:
                raise ValueError(f"{name} has {getattr(self, name).shape[0]} rows for {k} words")

    def merged(self, groups: list[list[int]], names: list[str]) -> "Explanation":
        """Tokens merged into words: ``groups[j]`` are the caption positions of word j (in order) and
        ``names[j]`` its text. A word's rows are the sums of its explained tokens' rows (relevance adds
        up); the preceding columns of a word's tokens are summed into one column; the <start> column
        and <end> (position n) stay as they are. Only words with at least one explained token are kept."""
        if len(groups) != len(names):
            raise ValueError(f"{len(groups)} groups for {len(names)} names")
        n = len(self.tokens) - 1
        column = {0: 0, **{p + 1: j + 1 for j, group in enumerate(groups) for p in group}}
        if sorted(column) != list(range(n + 1)):
            raise ValueError(f"the groups must cover the caption's {n} positions exactly once")
        matrix = self.preceding.new_zeros(n + 1, len(groups) + 1)
        for source, target in column.items():
            matrix[source, target] = 1
        rows, words, positions = [], [], []
        for j, group in enumerate(groups):
            picked = [k for k, p in enumerate(self.positions) if p in group]
            if picked:
                rows.append(picked)
                words.append(names[j])
                positions.append(j)
        if n in self.positions:  # <end>
            rows.append([self.positions.index(n)])
            words.append("<end>")
            positions.append(len(groups))

        def summed(values: torch.Tensor) -> torch.Tensor:
            return torch.stack([values[r].sum(dim=0) for r in rows]) if rows else values[:0]

        return Explanation(self.method, words, positions, [self.tokens[0], *names], summed(self.image),
                           summed(self.grid), summed(self.preceding) @ matrix, summed(self.score),
                           dict(self.parameters), {k: summed(v) for k, v in self.extra.items()}, self.photo_size)

    # ------------------------------------------------------------------ looking at it (display/notebook.py)
    def heatmap(self, word: int | str, size: str | tuple[int, int] = "model", photo=None) -> np.ndarray:
        """The map of ``word`` (a caption position or an explained word) as float32 [H, W], at the
        model's input size (``"model"``), the photo's (``"photo"``) or ``size`` = (width, height)."""
        from ..display.notebook import heatmap

        return heatmap(self, word, size, photo)

    def overlay(self, photo, word: int | str, opacity: float = 0.5) -> np.ndarray:
        """``photo`` with ``word``'s map over it: uint8 RGBA [H, W, 4] at the photo's size."""
        from ..display.notebook import overlay

        return overlay(self, photo, word, opacity)

    def plot(self, word: int | str | None = None, photo=None, ax=None):
        """A matplotlib Figure of ``word``'s map (every word's when None), over ``photo`` when given;
        the matplotlib backend is left as it is (inline plots in notebooks keep working)."""
        from ..display.notebook import plot

        return plot(self, word, photo, ax)

    def _repr_html_(self) -> str:
        from ..display.notebook import to_html

        return to_html(self)

    # --------------------------------------------------------------------------------- saving
    def to_dict(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "method": self.method,
            "words": self.words,
            "positions": self.positions,
            "tokens": self.tokens,
            "score": self.score.tolist(),
            "preceding": self.preceding.tolist(),
            "parameters": self.parameters,
            "extra": {k: v.tolist() for k, v in self.extra.items()},
            "photo_size": list(self.photo_size) if self.photo_size else None,
        }

    def to_json(self, path: str | Path) -> None:
        write_json(path, self.to_dict())

    def save_heatmaps(self, directory: str | Path, name: str | None = None) -> Path:
        """``DIR/<method>.npz`` with ``image`` [K, H, W] and ``grid`` [K, h, w] (float32), and the
        image maps alone as ``DIR/<method>.npy`` (``np.load`` without a key)."""
        path = Path(directory) / f"{name or self.method}.npz"
        image = self.image.numpy().astype(np.float32)

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as handle:
                np.savez_compressed(handle, image=image, grid=self.grid.numpy().astype(np.float32))

        def write_image(tmp: Path) -> None:
            with open(tmp, "wb") as handle:
                np.save(handle, image)

        atomic_write(path, write)
        atomic_write(path.with_suffix(".npy"), write_image)
        return path

    def save_pngs(self, directory: str | Path, photo=None, longest: int = 1024) -> list[Path]:
        """Each word's map as a PNG on its colour scale, ``DIR/<method>/<position>_<word>.png``, at the
        photo's shape (its longer side at most ``longest``) when ``photo`` is given, else the model's."""
        from ..display.scales import display_size, heatmap_image, map_scale

        folder = Path(directory) / self.method
        folder.mkdir(parents=True, exist_ok=True)
        size = None
        if photo is not None:
            from ..data.images import load_image

            picture = load_image(photo)
            size = display_size(picture, min(longest, max(picture.size)))
        written = []
        for row, (word, position) in enumerate(zip(self.words, self.positions)):
            values = self.image[row].detach().float().cpu().numpy()
            coloured = heatmap_image(values, size, map_scale(values, self.method, self.parameters))
            safe = "".join(c if c.isalnum() else "_" for c in word)[:40] or "word"
            path = folder / f"{position:03d}_{safe}.png"
            atomic_write(path, lambda tmp: coloured.save(tmp, format="PNG"))
            written.append(path)
        return written

    @classmethod
    def from_dict(cls, data: dict, heatmaps: str | Path) -> "Explanation":
        if data.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"explanation format_version {data.get('format_version')} is not {FORMAT_VERSION}")
        with np.load(heatmaps) as arrays:
            image, grid = torch.from_numpy(arrays["image"]), torch.from_numpy(arrays["grid"])
        photo_size = data.get("photo_size")  # absent in files written before it was recorded
        return cls(data["method"], data["words"], data["positions"], data["tokens"], image, grid,
                   torch.tensor(data["preceding"]), torch.tensor(data["score"]), data["parameters"],
                   {k: torch.tensor(v) for k, v in data["extra"].items()},
                   tuple(photo_size) if photo_size else None)

    @classmethod
    def load(cls, json_path: str | Path, heatmaps: str | Path) -> "Explanation":
        return cls.from_dict(json.loads(Path(json_path).read_text()), heatmaps)
