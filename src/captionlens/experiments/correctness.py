"""Localisation of image explanations: the attention-correctness measure of Liu et al. 2017 as the
papers use it (ICML eq. (9), journal eq. (13)).

For an explained object word, ``E_p = max(E, 0)`` normalised to [0, 1] (``max(−E, 0)`` for the
negative part: N-LRP, N-Guided-Grad-CAM); keeping the scores above a threshold,

    correctness = Σ_{ij ∈ boxes} E_p[i, j] / Σ_{ij} E_p[i, j]  ∈ [0, 1]

where ``boxes`` is the union of the ground-truth boxes of the word's category.
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch

from ..data.coco import Box
from .intervals import bootstrap_mean_interval

THRESHOLDS = tuple(round(0.1 * k, 1) for k in range(10))  # 0.0 .. 0.9, the papers' Fig. 3 axis


def box_mask(boxes: Sequence[Box], image_size: tuple[int, int], map_size: tuple[int, int]) -> torch.Tensor:
    """Union of ``boxes`` (COCO [x, y, w, h] in an image of ``image_size`` = (width, height)) as a
    boolean mask on a heatmap of ``map_size`` = (H, W); a pixel is inside when its centre is."""
    height, width = map_size
    sx, sy = width / image_size[0], height / image_size[1]
    ys = (torch.arange(height) + 0.5).unsqueeze(1)  # pixel centres [H, 1]
    xs = (torch.arange(width) + 0.5).unsqueeze(0)  # [1, W]
    mask = torch.zeros(height, width, dtype=torch.bool)
    for box in boxes:
        mask |= ((xs >= box.x * sx) & (xs <= (box.x + box.width) * sx)
                 & (ys >= box.y * sy) & (ys <= (box.y + box.height) * sy))
    return mask


def correctness(heatmap: torch.Tensor, mask: torch.Tensor, thresholds: Sequence[float] = THRESHOLDS,
                negative: bool = False) -> np.ndarray:
    """Correctness of one heatmap [H, W] at each threshold; NaN where nothing passes the threshold
    (e.g. a map without positive scores)."""
    scores = (-heatmap if negative else heatmap).clamp(min=0).double()
    peak = scores.max()
    if peak <= 0:
        return np.full(len(thresholds), np.nan)
    scores = scores / peak  # E_p in [0, 1]
    result = []
    for threshold in thresholds:
        kept = scores * (scores > threshold) if threshold > 0 else scores
        total = kept.sum()
        result.append(float(kept[mask].sum() / total) if total > 0 else np.nan)
    return np.array(result)


# The curves of the papers' Fig. 3 / Fig. 5: (method whose explanation is used, negative part?).
CURVES = {
    "attention": ("attention", False),
    "rollout": ("rollout", False),  # transformers only: attention rollout (Abnar & Zuidema 2020)
    "gradcam": ("gradcam", False),
    "guided_gradcam": ("guided_gradcam", False),
    "gradient_x_input": ("gradient_x_input", False),
    "lrp": ("lrp", False),
    "n_lrp": ("lrp", True),
    "n_guided_gradcam": ("guided_gradcam", True),
}


def uniform_map(height: int, width: int) -> torch.Tensor:
    """The same score everywhere: its correctness is the share of the image the boxes cover."""
    return torch.ones(height, width)


def centre_map(height: int, width: int) -> torch.Tensor:
    """A centre prior: a Gaussian at the image centre with σ of a quarter of each side (photographers,
    and dataset makers, put objects near the middle)."""
    ys = (torch.arange(height) + 0.5 - height / 2) / (height / 4)
    xs = (torch.arange(width) + 0.5 - width / 2) / (width / 4)
    return torch.exp(-0.5 * (ys.unsqueeze(1) ** 2 + xs.unsqueeze(0) ** 2))


# Baselines that look at no model: a map must beat them to say anything about where the object is.
BASELINES = {"uniform": uniform_map, "centre": centre_map}


def localisable(predictions, objects) -> list:
    """Correctly predicted object words that also occur in the image's references and have boxes."""
    chosen = []
    for mention in predictions.mentions():
        record = predictions.records[mention.image]
        in_references = any(mention.word in caption for caption in record.captions)
        if mention.true_positive and in_references and objects.boxes.get(record.image_id):
            chosen.append(mention)
    return chosen


def correctness_curves(predictions, objects, explanations: dict[str, dict], thresholds=THRESHOLDS) -> list[dict]:
    """Mean correctness per curve and threshold over the localisable mentions, with the 95% bootstrap
    interval (over mentions) at the first threshold (``0.0_low``, ``0.0_high``); ``explanations``
    maps a method name to {mention: single-word Explanation}."""
    mentions = localisable(predictions, objects)
    rows = []

    def row(curve: str, heatmap_of, negative: bool = False) -> dict:
        values = []
        for mention in mentions:
            record = predictions.records[mention.image]
            heatmap = heatmap_of(mention)
            boxes = [b for b in objects.boxes[record.image_id] if b.category == mention.category]
            mask = box_mask(boxes, objects.image_sizes[record.image_id], tuple(heatmap.shape))
            values.append(correctness(heatmap, mask, thresholds, negative))
        with warnings.catch_warnings():  # a threshold that no map passes has no mean: NaN, said in the table
            warnings.simplefilter("ignore", RuntimeWarning)
            means = np.nanmean(np.array(values), axis=0) if values else np.full(len(thresholds), np.nan)
        low, high = bootstrap_mean_interval(np.array(values)[:, 0]) if values else (float("nan"),) * 2
        return ({"curve": curve, "mentions": len(mentions)} | {f"{t:.1f}": float(v) for t, v in zip(thresholds, means)}
                | {f"{thresholds[0]:.1f}_low": low, f"{thresholds[0]:.1f}_high": high})

    for curve, (method, negative) in CURVES.items():
        if method in explanations:
            rows.append(row(curve, lambda m, method=method: explanations[method][m].image[0], negative))
    if explanations:  # the baselines on the explanations' map size
        shown = explanations[next(iter(explanations))]
        for curve, baseline in BASELINES.items():
            rows.append(row(curve, lambda m, baseline=baseline: baseline(*shown[m].image.shape[1:])))
    return rows


def plot_correctness(rows: list[dict], out) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(5.5, 4))
    for row in rows:
        thresholds = [t for t in THRESHOLDS if f"{t:.1f}" in row]
        style = ":" if row["curve"] in BASELINES else "--" if row["curve"].startswith("n_") else "-"
        axis.plot(thresholds, [row[f"{t:.1f}"] for t in thresholds], marker="o", linestyle=style, label=row["curve"])
    axis.set_xlabel("threshold on the normalised explanation")
    axis.set_ylabel("correctness (mass inside the boxes)")
    axis.set_ylim(0, 1)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(out, dpi=100)
    plt.close(figure)
