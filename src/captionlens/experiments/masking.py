"""Feature masking (journal Section IV-B-1, Fig. 4): are the regions an explanation highlights the
ones the model uses? For each correctly predicted object word, the ``fraction`` of pixels with the
highest relevance (``sign="positive"``: the supporting evidence) or the lowest (``"negative"``: the
opposing evidence) is replaced by the image's mean colour; the masked image is captioned again and
we record whether the word's object category is still named. A random mask of the same area is the
baseline. Masking support should make words disappear more often than random masking; masking
opposing evidence should not."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from ..models import Captioner
from .context import Mention, Predictions
from .intervals import NOT_MEASURED, above, shown
from .metrics import wilson_interval
from .registry import Experiment, Finding, Option, Rows, register_experiment


def top_pixels(heatmap: torch.Tensor, fraction: float, sign: str, rng: np.random.Generator | None = None) -> np.ndarray:
    """Boolean mask [H, W] of the ``fraction`` of pixels with the highest ("positive"), lowest
    ("negative") or random ("random", needs ``rng``) scores."""
    values = heatmap.detach().cpu().numpy().ravel()
    count = max(1, int(round(fraction * values.size)))
    if sign == "random":
        chosen = rng.choice(values.size, size=count, replace=False)
    else:
        order = np.argsort(-values if sign == "positive" else values, kind="stable")
        chosen = order[:count]
    mask = np.zeros(values.size, dtype=bool)
    mask[chosen] = True
    return mask.reshape(heatmap.shape)


def masked_image(image: Image.Image, mask: np.ndarray) -> Image.Image:
    """``image`` at the mask's size with the masked pixels set to the mean colour of the rest."""
    pixels = np.asarray(image.convert("RGB").resize(mask.shape[::-1], Image.BILINEAR)).astype(np.float32)
    keep = ~mask
    fill = pixels[keep].mean(axis=0) if keep.any() else pixels.reshape(-1, 3).mean(axis=0)
    pixels[mask] = fill
    return Image.fromarray(pixels.round().astype(np.uint8))


def feature_masking(captioner: Captioner, predictions: Predictions, explanations: dict[str, dict[Mention, object]],
                    mentions: Sequence[Mention], fraction: float = 0.1, seed: int = 0, beam_size: int = 3,
                    batch_size: int = 64) -> list[dict]:
    """One row per method and sign: the share of mentions whose word vanishes after masking, with its
    95% Wilson interval."""
    rng = np.random.default_rng(seed)
    jobs: list[tuple[str, str, Mention, np.ndarray]] = []
    for method, by_mention in explanations.items():
        for mention in mentions:
            heatmap = by_mention[mention].image[0]
            for sign in ("positive", "negative"):
                jobs.append((method, sign, mention, top_pixels(heatmap, fraction, sign)))
    if mentions:
        shape = next(iter(explanations.values()))[mentions[0]].image.shape[1:]
        for mention in mentions:
            jobs.append(("random", "random", mention, top_pixels(torch.zeros(shape), fraction, "random", rng)))
    vanished: dict[tuple[str, str], list[bool]] = {}
    chunks = [jobs[start: start + batch_size] for start in range(0, len(jobs), batch_size)]
    for chunk, pixels in zip(chunks, predictions.images([[m.image for _, _, m, _ in chunk] for chunk in chunks])):
        images = [masked_image(Image.fromarray(p.permute(1, 2, 0).numpy()), mask) for p, (_, _, _, mask) in zip(pixels, chunk)]
        for (method, sign, mention, _), caption in zip(chunk, captioner.caption(images, beam_size=beam_size)):
            named = predictions.synonyms.categories_in(caption.words)
            vanished.setdefault((method, sign), []).append(mention.category not in named)
    if not mentions:  # nothing to mask: the same table, with no words and no rates
        vanished = {(method, sign): [] for method in explanations for sign in ("positive", "negative")}
        vanished[("random", "random")] = []
    rows = []
    for (method, sign), values in vanished.items():
        rate = wilson_interval(int(np.sum(values)), len(values))
        rows.append({"method": method, "masked": sign, "words": len(values), "vanished": rate.rate,
                     "vanished_low": rate.low, "vanished_high": rate.high})
    return rows


# ------------------------------------------------------------------------- the experiment
MASKING_METHODS = ("lrp", "guided_gradcam", "gradcam", "attention")
COLUMNS = ("method", "masked", "words", "vanished", "vanished_low", "vanished_high", "note?", "ground_truth")
CLAIM = "Masking the regions LRP finds supporting removes the word more often than a random mask"


def masking_findings(results: dict, arch: str) -> list[Finding]:
    table = Rows.of(results, "masking", arch)
    if not table.rows:
        return [(CLAIM, NOT_MEASURED, "not measured")]

    def vanished(method, masked) -> tuple[float, float]:
        return table.interval(table.find(method=method, masked=masked), "vanished")

    return [(CLAIM, above(vanished("lrp", "positive"), vanished("random", "random")),
             f"word gone after masking LRP-positive {shown(vanished('lrp', 'positive'), 2)}, "
             f"LRP-negative {shown(vanished('lrp', 'negative'), 2)}, random {shown(vanished('random', 'random'), 2)}")]


def masking_section(results: dict, archs: list[str]) -> list[str]:
    from .tables import markdown_table

    lines = ["## Feature masking (Fig. 4): share of correctly named objects no longer named", ""]
    for arch in archs:
        rows = results.get("masking", {}).get(arch, [])
        if rows:
            lines += [f"**{arch}**", "", markdown_table(rows), ""]
    return lines


def _show_table(rows, bench, options: dict) -> None:
    from .tables import markdown_table

    print(markdown_table(rows))


@register_experiment(Experiment(
    name="masking", verb="masking", title="Feature masking", papers="Fig. 4, IV-B-1", order=5,
    options=(Option("fraction", 0.1, "Share of the pixels masked.", "float", 0, 1, low_open=True, high_open=True),
             Option("seed", 0, "Seed of the random mask.", "int", 0),
             Option("limit", 200, "Most object words to test.", "int", 1, 1_000_000, flag="words")),
    columns=COLUMNS, demo=lambda quick, seed: {"seed": seed, "limit": 10 if quick else 80},
    findings=masking_findings, section=masking_section, show=_show_table))
def masking(bench, fraction: float = 0.1, seed: int = 0, limit: int | None = 200) -> list[dict]:
    """Feature masking (Fig. 4): mask the most supporting (or opposing) pixels of each correctly
    named object (at most --words of them) by each method, or random pixels, re-caption, and report
    how often the word vanishes."""
    from .tables import plot_bars, write_table

    mentions = [m for m in bench.predictions.mentions() if m.true_positive][:limit]
    explanations = {method: bench.explanations(method, mentions) for method in MASKING_METHODS}
    rows = feature_masking(bench.captioner, bench.predictions, explanations, mentions, fraction, seed,
                           bench.beam_size)
    if not mentions:
        rows = [row | {"note": "no correctly named object word to mask"} for row in rows]
    write_table(bench.out, "masking", bench.labelled(rows), f"Feature masking: {fraction:.0%} of the pixels "
                f"masked; share of {len(mentions)} correctly named objects that are no longer named: {bench.scope}")
    plot_bars(rows, ("method", "masked"), "vanished", bench.out / "masking.png", "word no longer named after masking")
    return rows
