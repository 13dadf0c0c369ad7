"""Paper-style explanation figures (Fig. 1/4 of the papers): one row per word, the image (in its own
aspect ratio) and one column per method, each map overlaid on the image on its scale (``scales.py``:
signed maps blue–white–red around 0, non-negative maps sequential from 0, all-zero maps marked) with
the scale printed under the panel; the preceding words coloured by their normalised relevance as in
Fig. 4 (red [0.3, 1], yellow (0, 0.3), blue [−1, 0]). Long captions wrap into several column groups."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..explain.explanation import Explanation
from ..explain.methods import METHOD_INFO, in_column_order, linguistic_method
from ..display.scales import LEGEND, ZERO, display_size, heatmap_image, map_scale


def title(method: str) -> str:
    """How figures and tables name a method ("Guided Grad-CAM"; its id when unregistered)."""
    return METHOD_INFO[method].title if method in METHOD_INFO else method


def word_label(explanation: Explanation, row: int) -> str:
    """The explained word of ``row`` as a figure or table names it: with its position ("small #7")
    when the word is explained more than once, so repeated words can be told apart."""
    word = explanation.words[row]
    return f"{word} #{explanation.positions[row] + 1}" if explanation.words.count(word) > 1 else word


def symmetric_limit(values: np.ndarray) -> float:
    """max |value| (1 where all values are zero), for normalising relevance to [−1, 1]."""
    limit = float(np.abs(values).max())
    return limit if limit > 0 else 1.0


def word_colour(value: float) -> str:
    """The papers' bins of a relevance normalised to [−1, 1]."""
    if value >= 0.3:
        return "#e8423f"  # red
    if value > 0:
        return "#f2c12e"  # yellow
    return "#4a7bd0"  # blue


def normalised(preceding: torch.Tensor) -> np.ndarray:
    """Relevance divided by its max |value| (the papers' normalisation)."""
    values = preceding.detach().cpu().numpy().astype(float)
    return values / symmetric_limit(values)


def explanation_figure(image: Image.Image, explanations: Sequence[Explanation], out: str | Path,
                       opacity: float = 0.5, rows_per_group: int = 8, longest_side: int = 192) -> Path:
    """Save the figure for one image explained by several methods (same words in each): one row per
    word, the method titles repeated every ``rows_per_group`` rows — a long caption makes the figure
    taller, never its panels smaller (side-by-side groups made a 20-word caption 4032 px wide with
    panels a reader had to zoom into). Drawn on a bare ``matplotlib.figure.Figure``: the backend a
    notebook or script chose is left alone."""
    from matplotlib.figure import Figure

    by_method = {e.method: e for e in explanations}
    methods = in_column_order(by_method)
    first = by_method[methods[0]]
    size = display_size(image, longest_side)  # (width, height) in the photo's own aspect ratio
    picture = np.asarray(image.convert("RGB").resize(size, Image.BILINEAR)) / 255.0
    grey = picture.mean(axis=2)
    linguistic = by_method.get(linguistic_method(by_method))
    per_group = len(methods) + 1 + (linguistic is not None)
    rows = max(1, len(first.words))
    panel, aspect = 1.9, size[1] / size[0]
    figure = Figure(figsize=(panel * per_group + (1.6 if linguistic else 0), (panel * aspect + 0.45) * rows))
    axes = figure.subplots(rows, per_group, squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for index, word in enumerate(first.words):
        titled = index % rows_per_group == 0  # the method titles again every rows_per_group rows
        cells = axes[index]
        for axis in cells[: len(methods) + 1]:
            axis.axis("on")
            axis.set_xticks([])
            axis.set_yticks([])
        cells[0].imshow(picture)
        cells[0].set_ylabel(word_label(first, index), rotation=0, ha="right", va="center", fontsize=12, fontweight="bold")
        for axis, method in zip(cells[1:], methods):
            heatmap = by_method[method].image[index].detach().cpu().numpy()
            scale = map_scale(heatmap, method, by_method[method].parameters)
            overlay = np.asarray(heatmap_image(heatmap, size, scale), dtype=float) / 255.0
            overlay[..., 3] *= opacity
            axis.imshow(grey, cmap="gray", vmin=0, vmax=1)
            axis.imshow(overlay)
            if scale.kind == ZERO:
                axis.text(0.5, 0.5, "all zero", transform=axis.transAxes, ha="center", va="center", fontsize=9,
                          fontweight="bold", color="#b00000",
                          bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "none"})
            axis.set_xlabel(scale.label, fontsize=8, labelpad=1)
            if titled:
                axis.set_title(title(method), fontsize=10)
        if titled:
            cells[0].set_title("image", fontsize=10)
        if linguistic is not None:
            _words_in_colour(cells[-1], linguistic, index)
            if titled:
                cells[-1].set_title(f"preceding words ({title(linguistic.method)})",
                                    fontsize=10)
    figure.tight_layout(rect=(0, 0.03, 1, 1))
    figure.text(0.5, 0.005, LEGEND, ha="center", va="bottom", fontsize=7, color="#444")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=80)
    return out


def _words_in_colour(axis, explanation: Explanation, row: int, line_length: int = 24) -> None:
    """<start> and the words before the explained one, each boxed in its relevance bin's colour,
    wrapped into lines of about ``line_length`` characters."""
    position = explanation.positions[row]
    tokens = explanation.tokens[: position + 1]
    values = normalised(explanation.preceding[row, : position + 1])
    axis.set_xlim(0, 1)
    axis.set_ylim(0, 1)
    axis.axis("off")
    lines: list[list[tuple[str, float]]] = [[]]
    for token, value in zip(tokens, values):
        if lines[-1] and sum(len(t) + 1 for t, _ in lines[-1]) + len(token) > line_length:
            lines.append([])
        lines[-1].append((token.replace("<", "‹").replace(">", "›"), value))
    step = min(0.16, 0.9 / len(lines))
    for number, line in enumerate(lines):
        x = 0.02
        for token, value in line:
            axis.text(x, 0.92 - number * step, token, fontsize=8, family="monospace", va="top",
                      bbox={"facecolor": word_colour(value), "edgecolor": "none", "pad": 1.2})
            x += (len(token) + 1) / line_length
