"""How a heatmap is coloured, one rule for the figures, the HTML report and the viewer:

* a map with negative values (LRP, gradient×input, Guided Grad-CAM, signed Grad-CAM) on the
  diverging blue–white–red scale, symmetric around 0 (white = 0), scaled by its max |value|;
* a map that is non-negative by construction (attention, ReLU'd Grad-CAM; for a map of unknown
  origin: one without negative values) on a sequential scale from 0 (dark) to its maximum — so a
  near-uniform attention map reads as near-uniform, not as solid red;
* an all-zero map (e.g. Guided Grad-CAM where the ReLU'd CAM is 0) is transparent and marked
  "all zero", never shown as an untouched image.

Both scales end where the map's largest absolute values add up to ``OUTLIER_SHARE`` (2%) of its
total absolute value, as Captum's ``visualize_image_attr`` does with ``outlier_perc=2``: those few
pixels are drawn saturated. A pixel-level map (guided backprop, gradient×input) whose maximum is an
outlier would otherwise be drawn nearly blank — its 99th percentile can be a fifth of its maximum —
and read as "no evidence"; a map without such outliers is drawn as before.

Every panel prints its scale (``MapScale.label``: "±0.52" on the diverging scale, "0 … 0.031" on the
sequential one, "all zero"; "±0.12 (max 0.52)" where the top is clipped); ``LEGEND`` says how to read
them, once per figure or page.
"""
from __future__ import annotations

import base64
import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

DIVERGING, SEQUENTIAL, ZERO = "diverging", "sequential", "zero"
COLOURMAPS = {DIVERGING: "bwr", SEQUENTIAL: "magma"}
LEGEND = ("±m: signed map, blue −m … white 0 … red +m;  0 … m: non-negative map, dark 0 … bright m;  "
          "(max M): values beyond m, the top 2% of the map's mass, drawn saturated;  all zero: nothing to show")
OUTLIER_SHARE = 0.02  # of a map's total |value| drawn saturated (Captum's outlier_perc=2)


@dataclass(frozen=True)
class MapScale:
    kind: str  # diverging, sequential or zero
    low: float  # the value at the bottom of the colour scale
    high: float  # ... and at the top (values beyond are drawn saturated)
    peak: float | None = None  # the map's largest |value| where it lies beyond ``high``

    @property
    def colourmap(self) -> str | None:
        return COLOURMAPS.get(self.kind)

    @property
    def label(self) -> str:
        if self.kind == ZERO:
            return "all zero"
        # the maximum is printed where the cut shows at three digits (near-uniform maps clip a hair)
        clipped = f" (max {self.peak:.3g})" if self.peak is not None and f"{self.peak:.3g}" != f"{self.high:.3g}" else ""
        if self.kind == DIVERGING:
            return f"±{self.high:.3g}{clipped}"
        return f"0 … {self.high:.3g}{clipped}"

    def to_dict(self) -> dict:
        return {"kind": self.kind, "low": self.low, "high": self.high, "peak": self.peak, "label": self.label,
                "colourmap": self.colourmap}


def non_negative(method: str | None, parameters: dict | None = None) -> bool | None:
    """Whether a method's maps are non-negative by construction (its registry entry says: attention,
    rollout, ReLU'd Grad-CAM); None for a map of unknown origin. A signed method keeps the diverging
    scale even where one map happens to have no negative value, so a column of a figure reads the same
    way throughout."""
    from ..explain.methods import METHOD_INFO

    if method is None or method not in METHOD_INFO:
        return None
    return METHOD_INFO[method].non_negative(parameters or {})


def outlier_cut(magnitudes: np.ndarray, share: float = OUTLIER_SHARE) -> float:
    """The smallest of the non-negative ``magnitudes`` at which their sorted running sum reaches
    (1 − ``share``) of their total: the values above it carry the top ``share`` of the mass (Captum's
    cumulative-sum threshold)."""
    ordered = np.sort(magnitudes.ravel())
    running = np.cumsum(ordered)
    return float(ordered[np.searchsorted(running, running[-1] * (1 - share))])


def map_scale(heatmap: np.ndarray, method: str | None = None, parameters: dict | None = None,
              outlier_share: float = OUTLIER_SHARE) -> MapScale:
    """The scale a map is drawn on (see the module docstring); ``method`` (and its parameters) decide
    between sequential and diverging, the values themselves when it is not given. The top
    ``outlier_share`` of the map's absolute mass is drawn saturated (0: scaled by the maximum)."""
    values = np.asarray(heatmap, dtype=float)
    finite = values[np.isfinite(values)]
    peak = float(np.abs(finite).max()) if finite.size else 0.0
    if peak == 0:
        return MapScale(ZERO, 0.0, 0.0)
    sequential = non_negative(method, parameters)
    if sequential is None:
        sequential = bool(finite.min() >= 0)
    magnitudes = np.clip(finite, 0, None) if sequential else np.abs(finite)
    top = outlier_cut(magnitudes, outlier_share) if outlier_share > 0 and magnitudes.max() > 0 else peak
    top = top if top > 0 else peak  # a map whose mass sits in a handful of pixels: scaled by its maximum
    clipped = peak if top < peak else None
    return MapScale(SEQUENTIAL, 0.0, top, clipped) if sequential else MapScale(DIVERGING, -top, top, clipped)


def colourise(heatmap: np.ndarray, scale: MapScale | None = None) -> np.ndarray:
    """RGBA in [0, 1], [H, W, 4]: the map on its scale (fully transparent when all zero)."""
    import matplotlib

    values = np.nan_to_num(np.asarray(heatmap, dtype=float))
    scale = scale or map_scale(values)
    if scale.kind == ZERO:
        return np.zeros((*values.shape, 4))
    position = (values - scale.low) / (scale.high - scale.low)
    return matplotlib.colormaps[scale.colourmap](np.clip(position, 0, 1))


def heatmap_image(heatmap: np.ndarray, size: tuple[int, int] | None = None, scale: MapScale | None = None) -> Image.Image:
    """The coloured map as an RGBA image on ``scale`` (by default ``map_scale(heatmap)``), resampled
    (bilinear, before colouring) to ``size`` = (width, height) when given — e.g. onto a photo in its
    own aspect ratio."""
    values = np.asarray(heatmap, dtype=np.float32)
    if size is not None and (values.shape[1], values.shape[0]) != tuple(size):
        values = np.asarray(Image.fromarray(values, mode="F").resize(tuple(size), Image.BILINEAR))
    colours = colourise(values, scale or map_scale(heatmap))
    return Image.fromarray((colours * 255).round().astype(np.uint8), mode="RGBA")


def display_size(image: Image.Image, longest: int) -> tuple[int, int]:
    """(width, height) with the image's own aspect ratio and its longer side ``longest``."""
    width, height = image.size
    factor = longest / max(width, height)
    return max(1, round(width * factor)), max(1, round(height * factor))


def png_data_uri(image: Image.Image) -> str:
    """``image`` as a PNG in a data URI (embedded in the report, the viewer's answers, notebooks)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
