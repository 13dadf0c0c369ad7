"""Localisation of image explanations: the attention-correctness measure of Liu et al. 2017 as the
papers use it (ICML eq. (9), journal eq. (13)).

For an explained object word, ``E_p = max(E, 0)`` normalised to [0, 1] (``max(−E, 0)`` for the
negative part: N-LRP, N-Guided-Grad-CAM); keeping the scores above a threshold,

    correctness = Σ_{ij ∈ boxes} E_p[i, j] / Σ_{ij} E_p[i, j]  ∈ [0, 1]

where ``boxes`` is the union of the ground-truth boxes of the word's category. At threshold 0 this is
the energy-based pointing game (EBPG) of Score-CAM (Wang et al. 2020, eq. 9), the localisation measure
vision-language explanation papers report; beside it each row has the pointing game (Zhang et al.
2018, "Top-down neural attention by excitation backprop"): whether the map's maximum lies inside the
boxes (no tolerance margin; a maximum shared by several pixels counts the share of them inside, so a
uniform map scores the share of the image the boxes cover), and F1-IoU: the F1 score (Dice) of the map
binarised at half its maximum against the box mask, 2·|M ∩ B| / (|M| + |B|) — a monotone function of
their IoU, F1 = 2·IoU / (1 + IoU) — which, unlike EBPG, also punishes a map that covers only a corner
of the object.
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch

from ..data.coco import Box
from .intervals import NOT_MEASURED, above, all_of, below, bootstrap_mean_interval, scaled, shown
from .registry import Experiment, Finding, Rows, register_experiment

THRESHOLDS = tuple(round(0.1 * k, 1) for k in range(10))  # 0.0 .. 0.9, the papers' Fig. 3 axis


def column(threshold: float) -> str:
    """The table's column of a threshold ("0.0" .. "0.9"); the first also has "_low" and "_high"."""
    return f"{threshold:.1f}"


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


def pointing_game(heatmap: torch.Tensor, mask: torch.Tensor, negative: bool = False) -> float:
    """1 if the maximum of the map [H, W] (of its negative part with ``negative``) lies inside ``mask``,
    0 if outside; a maximum shared by several pixels scores the share of them inside. NaN for a map
    without positive scores."""
    scores = (-heatmap if negative else heatmap).clamp(min=0).double()
    peak = scores.max()
    if peak <= 0:
        return float("nan")
    at_peak = scores == peak
    return float((at_peak & mask).sum() / at_peak.sum())


F1_IOU_THRESHOLD = 0.5  # share of the map's maximum a pixel must reach to count as "pointed at"


def f1_iou(heatmap: torch.Tensor, mask: torch.Tensor, negative: bool = False,
           threshold: float = F1_IOU_THRESHOLD) -> float:
    """F1 score of the map [H, W] binarised at ``threshold`` × its maximum (of its negative part with
    ``negative``) against ``mask``: 2·|M ∩ B| / (|M| + |B|). NaN for a map without positive scores."""
    scores = (-heatmap if negative else heatmap).clamp(min=0).double()
    peak = scores.max()
    if peak <= 0:
        return float("nan")
    pointed = scores >= threshold * peak
    return float(2 * (pointed & mask).sum() / (pointed.sum() + mask.sum()))


def mean_and_interval(values) -> tuple[float, float, float]:
    """(mean, low, high) of the finite ``values`` with their 95% bootstrap interval; NaNs with none."""
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    return (float(values.mean()), *bootstrap_mean_interval(values)) if len(values) else (float("nan"),) * 3


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
        values, hits, overlaps = [], [], []
        for mention in mentions:
            record = predictions.records[mention.image]
            heatmap = heatmap_of(mention)
            boxes = [b for b in objects.boxes[record.image_id] if b.category == mention.category]
            mask = box_mask(boxes, objects.image_sizes[record.image_id], tuple(heatmap.shape))
            values.append(correctness(heatmap, mask, thresholds, negative))
            hits.append(pointing_game(heatmap, mask, negative))
            overlaps.append(f1_iou(heatmap, mask, negative))
        with warnings.catch_warnings():  # a threshold that no map passes has no mean: NaN, said in the table
            warnings.simplefilter("ignore", RuntimeWarning)
            means = np.nanmean(np.array(values), axis=0) if values else np.full(len(thresholds), np.nan)
        low, high = bootstrap_mean_interval(np.array(values)[:, 0]) if values else (float("nan"),) * 2
        return ({"curve": curve, "mentions": len(mentions)} | {column(t): float(v) for t, v in zip(thresholds, means)}
                | {f"{column(thresholds[0])}_low": low, f"{column(thresholds[0])}_high": high}
                | dict(zip(EBPG_COLUMNS, (float(means[0]), low, high)))  # EBPG: correctness at threshold 0
                | dict(zip(POINTING_COLUMNS, mean_and_interval(hits)))
                | dict(zip(F1_IOU_COLUMNS, mean_and_interval(overlaps))))

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
        thresholds = [t for t in THRESHOLDS if column(t) in row]
        style = ":" if row["curve"] in BASELINES else "--" if row["curve"].startswith("n_") else "-"
        axis.plot(thresholds, [row[column(t)] for t in thresholds], marker="o", linestyle=style, label=row["curve"])
    axis.set_xlabel("threshold on the normalised explanation")
    axis.set_ylabel("correctness (mass inside the boxes)")
    axis.set_ylim(0, 1)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(out, dpi=100)
    plt.close(figure)


# ------------------------------------------------------------------------- the experiment
POINTING_COLUMNS = ("pointing_game", "pointing_game_low", "pointing_game_high")
EBPG_COLUMNS = ("ebpg", "ebpg_low", "ebpg_high")
F1_IOU_COLUMNS = ("f1_iou", "f1_iou_low", "f1_iou_high")
COLUMNS = ("curve", "mentions", *(column(t) for t in THRESHOLDS), f"{column(0.0)}_low", f"{column(0.0)}_high",
           *EBPG_COLUMNS, *POINTING_COLUMNS, *F1_IOU_COLUMNS, "note?", "ground_truth?")


def correctness_findings(results: dict, arch: str) -> list[Finding]:
    table = Rows.of(results, "correctness", arch)

    def at0(curve) -> tuple[float, float]:
        return table.interval(table.find(curve=curve), column(0.0))

    findings = [("Explanations (LRP, Grad-CAM, Guided Grad-CAM) localise objects better than attention",
                 all_of(*(above(at0(m), at0("attention")) for m in ("lrp", "gradcam", "guided_gradcam"))),
                 "correctness at threshold 0: " + ", ".join(
                     f"{name} {shown(at0(curve))}" for name, curve in (
                         ("LRP", "lrp"), ("Grad-CAM", "gradcam"), ("Guided Grad-CAM", "guided_gradcam"),
                         ("attention", "attention"), ("uniform map", "uniform"))))]
    if table.find(curve="rollout"):  # a transformer: its second attention baseline
        findings.append(("Explanations (LRP, Grad-CAM, Guided Grad-CAM) localise objects better than attention "
                         "rollout (beyond the papers: the transformer's attention through all its layers)",
                         all_of(*(above(at0(m), at0("rollout")) for m in ("lrp", "gradcam", "guided_gradcam"))),
                         f"correctness at threshold 0: rollout {shown(at0('rollout'))}, last-layer attention "
                         f"{shown(at0('attention'))}, LRP {shown(at0('lrp'))}"))
    findings.append(("Attention localises objects better than a uniform map (a precondition of the comparison above)",
                     above(at0("attention"), at0("uniform")),
                     f"attention {shown(at0('attention'))} vs uniform {shown(at0('uniform'))}, centre prior "
                     f"{shown(at0('centre'))}"))
    findings.append(("The sign of LRP is meaningful (N-LRP localises poorly), that of Guided Grad-CAM is not",
                     all_of(below(at0("n_lrp"), scaled(at0("lrp"), 0.5)),
                            above(at0("n_guided_gradcam"), scaled(at0("guided_gradcam"), 0.5))),
                     f"N-LRP {shown(at0('n_lrp'))} vs ½·LRP {shown(scaled(at0('lrp'), 0.5))}; N-Guided-Grad-CAM "
                     f"{shown(at0('n_guided_gradcam'))} vs ½·Guided Grad-CAM "
                     f"{shown(scaled(at0('guided_gradcam'), 0.5))}"))
    return [(claim, verdict if table.rows else NOT_MEASURED, numbers if table.rows else "not measured")
            for claim, verdict, numbers in findings]


def correctness_section(results: dict, archs: list[str]) -> list[str]:
    from .tables import markdown_table

    lines = ["## Fig. 3 — correctness of localisation (mass inside the boxes)", ""]
    for arch in archs:
        rows = results.get("correctness", {}).get(arch, [])
        if rows:
            lines += [f"**{arch}** ({rows[0]['mentions']} correctly predicted object words) — plot: "
                      f"`results/{arch}/correctness.png`", "", markdown_table(rows), ""]
    return lines


def _show_table(rows, bench, options: dict) -> None:
    from .tables import markdown_table

    print(markdown_table(rows))


@register_experiment(Experiment(
    name="correctness", verb="correctness", title="Correctness of localisation", papers="eq. 9/13, Fig. 3", order=2,
    columns=COLUMNS, findings=correctness_findings, section=correctness_section, show=_show_table))
def run_correctness(bench) -> list[dict]:
    """Localisation (eq. 9/13, Fig. 3): the share of each explanation's positive (or, for n_lrp and
    n_guided_gradcam, negative) mass inside the boxes of correctly predicted object words, at
    thresholds 0 .. 0.9, beside a uniform and a centre map. Needs COCO boxes (reported as not available
    without them). Writes correctness.{csv,json,md} and correctness.png."""
    from .context import Predictions
    from .tables import write_table

    if not bench.data.instance_files:
        rows = [{"curve": "all", "mentions": 0, "note": "not available: correctness needs object boxes (COCO "
                 f"instances_*.json, --instances); {bench.data.name} has none"}]
        write_table(bench.out, "correctness", rows, f"Correctness: {len(bench.predictions.records)} "
                    f"{bench.split} images of {bench.data.name}")
        return rows
    truth = bench.data.ground_truth("boxes")
    predictions = bench.predictions if bench.predictions.truth.source == "boxes" else \
        Predictions(bench.predictions.records, bench.predictions.captions, bench.predictions.synonyms, truth,
                    bench.predictions.image_size, bench.workers)
    objects = truth.annotations
    mentions = localisable(predictions, objects)
    explanations = {method: bench.explanations(method, mentions) for method in bench.available(CURVES)}
    rows = correctness_curves(predictions, objects, explanations)
    if not mentions:
        rows = [{**row, "note": "no correctly named object word with a box in the image"} for row in rows]
    write_table(bench.out, "correctness", [{**row, "ground_truth": "boxes"} for row in rows],
                f"Correctness of {len(mentions)} correctly predicted object words in {len(predictions.records)} "
                f"{bench.split} images of {bench.data.name}; ground truth: {truth.description}")
    plot_correctness(rows, bench.out / "correctness.png")
    return rows
