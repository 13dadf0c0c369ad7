"""Paper-style explanation figures (Fig. 1/4 of the papers): one row per word, the image and one
column per method, each signed map in a diverging blue–white–red colormap scaled symmetrically by its
own max |value| and overlaid on the image; the preceding words coloured by their normalised
relevance as in Fig. 4 (red [0.3, 1], yellow (0, 0.3), blue [−1, 0])."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..explain.explanation import Explanation

TITLES = {"attention": "attention", "gradcam": "Grad-CAM", "guided_gradcam": "Guided Grad-CAM",
          "guided_backprop": "guided backprop", "gradient_x_input": "gradient×input", "lrp": "LRP"}
COLUMN_ORDER = ("attention", "gradcam", "guided_gradcam", "guided_backprop", "gradient_x_input", "lrp")
LINGUISTIC_PREFERENCE = ("lrp", "gradcam", "guided_gradcam", "gradient_x_input", "guided_backprop")


def symmetric_limit(values: np.ndarray) -> float:
    """max |value| (1 where the map is all zeros), for symmetric colour scaling."""
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
                       opacity: float = 0.5) -> Path:
    """Save the figure for one image explained by several methods (same words in each)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_method = {e.method: e for e in explanations}
    methods = [m for m in COLUMN_ORDER if m in by_method] + [m for m in by_method if m not in COLUMN_ORDER]
    first = by_method[methods[0]]
    size = first.image.shape[-1]
    picture = np.asarray(image.convert("RGB").resize((size, size), Image.BILINEAR)) / 255.0
    grey = picture.mean(axis=2)
    linguistic = next((by_method[m] for m in LINGUISTIC_PREFERENCE if m in by_method), None)
    rows, columns = len(first.words), len(methods) + 1 + (linguistic is not None)
    figure, axes = plt.subplots(rows, columns, figsize=(1.9 * columns + (1.6 if linguistic else 0), 1.9 * rows),
                                squeeze=False)
    for row, word in enumerate(first.words):
        axes[row, 0].imshow(picture)
        axes[row, 0].set_ylabel(word, rotation=0, ha="right", va="center", fontsize=12, fontweight="bold")
        for column, method in enumerate(methods, start=1):
            heatmap = by_method[method].image[row].detach().cpu().numpy()
            limit = symmetric_limit(heatmap)
            axes[row, column].imshow(grey, cmap="gray", vmin=0, vmax=1)
            axes[row, column].imshow(heatmap, cmap="bwr", vmin=-limit, vmax=limit, alpha=opacity)
            if row == 0:
                axes[row, column].set_title(TITLES.get(method, method), fontsize=10)
        if row == 0:
            axes[row, 0].set_title("image", fontsize=10)
        if linguistic is not None:
            _words_in_colour(axes[row, -1], linguistic, row)
            if row == 0:
                axes[row, -1].set_title(f"preceding words ({TITLES.get(linguistic.method, linguistic.method)})",
                                        fontsize=10)
    for axis in axes.flat:
        axis.set_xticks([])
        axis.set_yticks([])
    figure.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=80)
    plt.close(figure)
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
