"""Which words are visual: how much of each generated word's LRP relevance lies on the image rather
than on the preceding words, per word class — the reading the papers give their linguistic
explanations (object words are explained by the image, function words by the words before them),
measured as a table with intervals rather than shown on examples.

For a word with LRP relevance ``R_pixel`` on the image [H, W] and ``R_j`` on <start> and each
preceding word,

    visual share = Σ |R_pixel| / (Σ |R_pixel| + Σ_j |R_j|)  ∈ [0, 1]

(absolute values: relevance of both signs is evidence the word used). A class's number is the
median over its sampled words, with a 95% percentile-bootstrap interval over words.

Word classes: object nouns (the synonym list's object words), colours, spatial relations and
function words (closed lists below); the rest ("other": sizes, counts, verbs) is reported too.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..explain import Explanation
from .context import Mention, Predictions
from .intervals import NOT_MEASURED, above, bootstrap_mean_interval, shown
from .registry import Experiment, Finding, Option, register_experiment

COLOURS = frozenset("red green blue yellow purple orange white black brown grey gray pink silver gold beige tan "
                    "dark light colorful colourful".split())
RELATIONS = frozenset("left right above below top bottom middle center centre corner next near beside behind front "
                      "under underneath over between across inside outside around along beneath atop".split())
FUNCTION_WORDS = frozenset("a an the of and to on in at with is are there some its his her their this that by for "
                           "from as while into onto it one".split())
CLASSES = ("object", "colour", "relation", "function", "other")


def word_class(word: str, is_object: bool) -> str:
    """The class of a caption word (``is_object``: the synonym list names it an object)."""
    if is_object:
        return "object"
    for name, words in (("colour", COLOURS), ("relation", RELATIONS), ("function", FUNCTION_WORDS)):
        if word in words:
            return name
    return "other"


def visual_share(explanation: Explanation) -> float:
    """The share of a single-word explanation's absolute relevance on the image (vs the preceding
    words); NaN when it has no relevance at all."""
    on_image = float(explanation.image[0].abs().sum())
    on_words = float(explanation.preceding[0, : explanation.positions[0] + 1].abs().sum())
    total = on_image + on_words
    return on_image / total if total > 0 else float("nan")


def sample_by_class(predictions: Predictions, per_class: int, seed: int = 0) -> dict[str, list[Mention]]:
    """Up to ``per_class`` words of each class, drawn at random from every caption's words."""
    rng = np.random.default_rng(seed)
    found: dict[str, list[Mention]] = {name: [] for name in CLASSES}
    for index, caption in enumerate(predictions.captions):
        objects = {o.position for o in predictions.synonyms.find(caption.words)} if predictions.synonyms else set()
        for position, word in enumerate(caption.words):
            found[word_class(word, position in objects)].append(Mention(index, position, word, "", False))
    chosen = {}
    for name, mentions in found.items():
        picked = sorted(rng.choice(len(mentions), size=min(per_class, len(mentions)), replace=False)) if mentions else []
        chosen[name] = [mentions[k] for k in picked]
    return chosen


def share_table(shares: dict[str, Sequence[float]]) -> dict[str, dict]:
    """Per class: the median share, its 95% bootstrap interval and the number of words."""
    table = {}
    for name, values in shares.items():
        values = np.asarray(values, dtype=float)
        values = values[np.isfinite(values)]
        low, high = bootstrap_mean_interval(values, statistic=np.median)
        table[name] = {"median": float(np.median(values)) if len(values) else float("nan"), "low": low, "high": high,
                       "words": int(len(values))}
    return table


# ------------------------------------------------------------------------- the experiment
CLAIM = "Object words are explained by the image, function words by the preceding words (the papers' linguistic explanations)"


def visual_findings(results: dict, arch: str) -> list[Finding]:
    table = results.get("visual_share", {}).get(arch) or {}
    if not table:
        return [(CLAIM, NOT_MEASURED, "not measured")]

    def interval(name) -> tuple[float, float]:
        row = table.get(name) or {}
        return tuple(float("nan") if row.get(k) is None else row[k] for k in ("low", "high"))

    return [(CLAIM, above(interval("object"), interval("function")),
             "median share of LRP relevance on the image: " + ", ".join(
                 f"{name} {shown(interval(name))}" for name in CLASSES if name in table))]


def visual_section(results: dict, archs: list[str]) -> list[str]:
    from .tables import markdown_table

    rows = []
    for arch in archs:
        table = results.get("visual_share", {}).get(arch) or {}
        if table:
            rows.append({"model": arch} | {name: _cell(table.get(name)) for name in CLASSES})
    return ["## Which words are visual — beyond the papers' tables", "",
            "Median share of each word's absolute LRP relevance on the image (the rest is on the preceding words), "
            "per word class, with 95% bootstrap intervals over words.", "", markdown_table(rows), ""] if rows else []


def _cell(row: dict | None) -> str:
    """``median [low, high] (n=words)`` of one class, or "no word"."""
    if not row or not row.get("words"):
        return "no word"
    return f"{row['median']:.2f} [{row['low']:.2f}, {row['high']:.2f}] (n={row['words']})"


def _show(result: dict, bench, options: dict) -> None:
    from .tables import markdown_table

    print(markdown_table([{"class": name} | row for name, row in result.items()]))


@register_experiment(Experiment(
    name="visual_share", verb="visual-share", title="Which words are visual", papers="the papers' linguistic explanations", order=9,
    options=(Option("per_class", 100, "Words sampled per word class.", "int", 1, 1_000_000),
             Option("seed", 0, "Seed of the words' sample.", "int", 0)),
    columns=CLASSES, findings=visual_findings, section=visual_section, show=_show,
    demo=lambda quick, seed: {"per_class": 5 if quick else 40, "seed": seed}))
def visual_share_by_class(bench, per_class: int = 100, seed: int = 0) -> dict:
    """Which words are visual: per word class (object nouns, colours, spatial
    relations, function words, other), the median share of a word's absolute LRP relevance on the
    image rather than on the preceding words, with 95% bootstrap intervals over words. Writes
    visual_share.{csv,json,md}."""
    from .tables import write_table

    sample = sample_by_class(bench.predictions, per_class, seed)
    mentions = [m for name in CLASSES for m in sample[name]]
    explanations = bench.word_explanations("lrp", mentions)
    result = share_table({name: [visual_share(explanations[m]) for m in sample[name]] for name in CLASSES})
    write_table(bench.out, "visual_share", [{"class": name} | row for name, row in result.items()],
                f"Share of each word's absolute LRP relevance on the image (median per word class, 95% bootstrap "
                f"interval over words; up to {per_class} words per class): {bench.scope}")
    return result
