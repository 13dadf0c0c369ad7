"""Localisation of image explanations: the attention-correctness measure of Liu et al. 2017 as the
papers use it (ICML eq. (9), journal eq. (13)).

For an explained object word, ``E_p = max(E, 0)`` normalised to [0, 1] (``max(−E, 0)`` for the
negative part: N-LRP, N-Guided-Grad-CAM); keeping the scores above a threshold,

    correctness = Σ_{ij ∈ boxes} E_p[i, j] / Σ_{ij} E_p[i, j]  ∈ [0, 1]

where ``boxes`` is the union of the ground-truth boxes of the word's category.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..data.coco import Box

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
