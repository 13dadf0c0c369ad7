"""Looking at one Explanation in Python or a notebook: its maps at the model's or the photo's size,
laid over the photo, plotted, or shown as HTML — on the same colour scales as the figures, the
report and the viewer (``scales.py``). ``Explanation.heatmap``, ``.overlay``, ``.plot`` and
``._repr_html_`` call these.

Nothing here selects a matplotlib backend: figures are ``matplotlib.figure.Figure`` objects, which a
notebook shows inline and a script saves with ``figure.savefig``.
"""
from __future__ import annotations

import html
import math
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from .scales import LEGEND, ZERO, heatmap_image, map_scale

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from ..data.images import ImageInput
    from ..explain.explanation import Explanation

Word = int | str


def row_of_word(explanation: Explanation, word: Word) -> int:
    """The row of ``word``: a caption position (int) that was explained, or the first explained word
    spelled ``word`` (str)."""
    if isinstance(word, str):
        if word not in explanation.words:
            raise ValueError(f"{word!r} is not an explained word; explained: {', '.join(explanation.words)}")
        return explanation.words.index(word)
    if word not in explanation.positions:
        raise ValueError(f"word position {word} was not explained; explained positions: {explanation.positions}")
    return explanation.positions.index(word)


def heatmap(explanation: Explanation, word: Word, size: str | tuple[int, int] = "model",
            photo: ImageInput | None = None) -> np.ndarray:
    """The map of ``word`` as float32 [H, W]: at the model's input size (``"model"``), resampled
    bilinearly to the photo's (``"photo"``: the explained photo's size, or ``photo``'s) or to
    ``size`` = (width, height)."""
    values = explanation.image[row_of_word(explanation, word)].detach().float().cpu().numpy()
    if size == "model":
        return values
    if size == "photo":
        if photo is not None:
            from ..data.images import load_image

            size = load_image(photo).size
        elif explanation.photo_size is not None:
            size = tuple(explanation.photo_size)
        else:
            raise ValueError("the photo's size is not known (an explanation made from a tensor, or loaded from an "
                             "older file): pass photo=, or size=(width, height)")
    width, height = (int(v) for v in size)
    return np.asarray(Image.fromarray(values, mode="F").resize((width, height), Image.BILINEAR))


def overlay(explanation: Explanation, photo: ImageInput, word: Word, opacity: float = 0.5) -> np.ndarray:
    """The photo with ``word``'s map laid over it, as uint8 RGBA [H, W, 4] at the photo's size (the
    photo in grey under the coloured map, so the map's colours read as they do in the figures)."""
    from ..data.images import load_image

    if not 0 <= opacity <= 1:
        raise ValueError(f"opacity must be in [0, 1], got {opacity}")
    picture = load_image(photo)
    row = row_of_word(explanation, word)
    values = explanation.image[row].detach().float().cpu().numpy()
    scale = map_scale(values, explanation.method, explanation.parameters)
    coloured = np.asarray(heatmap_image(values, picture.size, scale), dtype=float) / 255
    grey = np.asarray(picture.convert("L"), dtype=float)[..., None] / 255
    alpha = coloured[..., 3:] * opacity
    rgb = grey * (1 - alpha) + coloured[..., :3] * alpha
    return (np.concatenate([rgb, np.ones_like(alpha)], axis=-1) * 255).round().astype(np.uint8)


def plot(explanation: Explanation, word: Word | None = None, photo: ImageInput | None = None,
         ax: Axes | None = None, columns: int = 5) -> Figure:
    """A matplotlib Figure of ``word``'s map (every explained word's, ``columns`` to a row, when
    ``word`` is None), over ``photo`` when given, each titled with the word, its position and its
    colour scale. ``ax``: draw the one word's map into this Axes (returns its figure)."""
    from matplotlib.figure import Figure

    rows = list(range(len(explanation.words))) if word is None else [row_of_word(explanation, word)]
    if not rows:
        raise ValueError("this explanation has no explained word to plot")
    if ax is not None and len(rows) > 1:
        raise ValueError("ax= draws one word: give word= too")
    picture = None
    if photo is not None:
        from ..data.images import load_image

        picture = load_image(photo)
    if ax is None:
        across = min(columns, len(rows))
        down = math.ceil(len(rows) / across)
        figure = Figure(figsize=(2.6 * across, 2.9 * down + 0.3), layout="constrained")
        axes = [figure.add_subplot(down, across, k + 1) for k in range(len(rows))]
        figure.suptitle(f"{explanation.method} · {LEGEND}", fontsize=6, color="#444")
    else:
        figure, axes = ax.figure, [ax]
    for axis, row in zip(axes, rows):
        _draw(axis, explanation, row, picture)
    return figure


def _draw(axis: Axes, explanation: Explanation, row: int, picture: Image.Image | None) -> None:
    values = explanation.image[row].detach().float().cpu().numpy()
    scale = map_scale(values, explanation.method, explanation.parameters)
    size = picture.size if picture is not None else (values.shape[1], values.shape[0])
    coloured = np.asarray(heatmap_image(values, size, scale))
    if picture is not None:
        axis.imshow(np.asarray(picture.convert("L")), cmap="gray", vmin=0, vmax=255)
        coloured = coloured.copy()
        coloured[..., 3] = (coloured[..., 3] * 0.5).astype(np.uint8)
    axis.imshow(coloured)
    if scale.kind == ZERO:
        axis.text(0.5, 0.5, "all zero", transform=axis.transAxes, ha="center", va="center", color="#b00000")
    axis.set_title(f"{explanation.words[row]} (#{explanation.positions[row] + 1})", fontsize=10)
    axis.set_xlabel(scale.label, fontsize=8)
    axis.set_xticks([])
    axis.set_yticks([])


def to_html(explanation: Explanation, longest: int = 96) -> str:
    """A small HTML table for a notebook: per explained word its map (on its scale) and its label."""
    from .scales import png_data_uri

    cells = []
    for row, word in enumerate(explanation.words):
        values = explanation.image[row].detach().float().cpu().numpy()
        scale = map_scale(values, explanation.method, explanation.parameters)
        factor = longest / max(values.shape)
        size = (max(1, round(values.shape[1] * factor)), max(1, round(values.shape[0] * factor)))
        cells.append(f'<td style="text-align:center"><b>{html.escape(word)}</b> '
                     f'<small>#{explanation.positions[row] + 1}</small><br>'
                     f'<img src="{png_data_uri(heatmap_image(values, size, scale))}" alt="{html.escape(word)}"><br>'
                     f'<small>{html.escape(scale.label)}</small></td>')
    caption = html.escape(" ".join(explanation.tokens[1:]))
    return (f'<div><b>{html.escape(explanation.method)}</b> explanation of “{caption}” '
            f'({len(explanation.words)} words)<table><tr>{"".join(cells)}</tr></table></div>')
