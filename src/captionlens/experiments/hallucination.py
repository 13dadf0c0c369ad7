"""Finding hallucinated object words (Table 3 / Table II, Fig. 7), their rates (CHAIR, Rohrbach et al.
2018) and the mean average precision of frequent object words (Table 5).

A mention of a frequent object word (predicted more than ``min_count`` times) is a true positive when
the image holds an object of its category, else a false positive (hallucinated). Each mention gets a
score from its explanation; the AUC says how well the score separates the two. Beside the
explanation scores, the model's own confidence — the word's probability and the (negated) entropy of
its next-word distribution — is scored the same way as the baseline an explanation must beat, and
``confounders.py`` asks whether a score still separates the two within word positions and beyond
confidence.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from ..data.synonyms import Synonyms
from ..explain import Explanation
from .intervals import NOT_MEASURED, above, all_of, percentile_interval, shown
from .registry import Experiment, Finding, Option, register_experiment

# score name -> (method, how a single-word explanation becomes a number)
SCORES: dict[str, tuple[str, Callable[[Explanation], float]]] = {
    "lrp": ("lrp", lambda e: float(e.image.mean())),
    "lrp_max": ("lrp", lambda e: float(e.image.max())),
    "guided_gradcam": ("guided_gradcam", lambda e: float(e.image.mean())),
    "guided_gradcam_abs": ("guided_gradcam", lambda e: float(e.image.abs().mean())),
    "gradcam": ("gradcam", lambda e: float(e.image.mean())),
    "attention": ("attention", lambda e: float(e.image.mean())),
    "rollout": ("rollout", lambda e: float(e.image.mean())),  # transformers only (attention rollout)
    # NaN where the decoder has no visual sentinel (sat): the score is not defined there
    "one_minus_beta": ("attention", lambda e: float(1 - e.extra["beta"][0]) if "beta" in e.extra else float("nan")),
}
UNDEFINED = "not defined: this decoder has no visual sentinel (β)"
# The model's own confidence, scored like the explanations (higher = more likely a true mention): the
# word's softmax probability, and the entropy of its next-word distribution negated.
CONFIDENCE = ("probability", "entropy")


def detection_scores(mentions: Sequence, explanations: dict[str, dict]) -> dict[str, np.ndarray]:
    """Score name -> one score per mention (only the scores whose method was explained)."""
    return {name: np.array([score(explanations[method][m]) for m in mentions])
            for name, (method, score) in SCORES.items() if method in explanations}


def auc_table(labels: np.ndarray, scores: dict[str, np.ndarray]) -> dict[str, float]:
    """ROC AUC of each score for true (1) vs false (0) positive mentions; NaN with one class only or
    for a score that is not defined (NaN values)."""
    from sklearn.metrics import roc_auc_score

    if len(set(labels.tolist())) < 2:
        return {name: float("nan") for name in scores}
    return {name: float(roc_auc_score(labels, values)) if np.isfinite(values).all() else float("nan")
            for name, values in scores.items()}


def rank_auc(labels: np.ndarray, values: np.ndarray) -> np.ndarray:
    """ROC AUC of each row, ``labels`` and ``values`` (R, n) → (R,), as the Mann-Whitney statistic: the
    mean rank of the positives (ties share their average rank) against that of the negatives — equal to
    ``sklearn.metrics.roc_auc_score`` row by row, with every row scored at once. NaN where a row has
    one class only."""
    from scipy.stats import rankdata

    labels = labels.astype(bool)
    ranks = rankdata(values, axis=1)  # (R, n), average ranks for ties
    positives = labels.sum(axis=1)
    negatives = labels.shape[1] - positives
    with np.errstate(invalid="ignore", divide="ignore"):
        return ((ranks * labels).sum(axis=1) - positives * (positives + 1) / 2) / (positives * negatives)


def auc_interval(labels: np.ndarray, values: np.ndarray, resamples: int = 1000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile-bootstrap interval of the ROC AUC, resampling mentions with replacement (draws with
    one class only are skipped); NaN when there is only one class."""
    if len(set(labels.tolist())) < 2 or not np.isfinite(values).all():
        return float("nan"), float("nan")
    rows = bootstrap_rows(len(labels), resamples, seed)  # (resamples, n)
    return percentile_interval(rank_auc(labels[rows], values[rows]), level)


def bootstrap_rows(size: int, resamples: int, seed: int) -> np.ndarray:
    """The indices of ``resamples`` draws of ``size`` items with replacement, one draw per row."""
    rng = np.random.default_rng(seed)
    return np.stack([rng.integers(size, size=size) for _ in range(resamples)])


def plot_roc(labels: np.ndarray, scores: dict[str, np.ndarray], out) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_auc_score, roc_curve

    figure, axis = plt.subplots(figsize=(5, 4.5))
    if len(set(labels.tolist())) == 2:
        for name, values in ((n, v) for n, v in scores.items() if np.isfinite(v).all()):
            fpr, tpr, _ = roc_curve(labels, values)
            axis.plot(fpr, tpr, label=f"{name} (AUC {roc_auc_score(labels, values):.2f})")
    else:
        axis.set_title("only one class of mentions: no ROC curve", fontsize=9)
    axis.plot([0, 1], [0, 1], color="grey", linestyle=":", label="chance")
    axis.set_xlabel("false positive rate")
    axis.set_ylabel("true positive rate")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(out, dpi=100)
    plt.close(figure)


def chair(captions: Sequence[Sequence[str]], image_objects: Sequence[set[str]], synonyms: Synonyms) -> dict:
    """CHAIR-i: hallucinated object mentions / all object mentions; CHAIR-s: captions with at least
    one hallucinated object / all captions (Rohrbach et al. 2018; categories counted once per caption)."""
    mentioned = hallucinated = bad_captions = 0
    for words, objects in zip(captions, image_objects, strict=True):
        named = synonyms.categories_in(words)
        wrong = named - objects
        mentioned += len(named)
        hallucinated += len(wrong)
        bad_captions += bool(wrong)
    return {"chair_i": hallucinated / mentioned if mentioned else float("nan"),
            "chair_s": bad_captions / len(captions) if captions else float("nan"),
            "object_mentions": mentioned, "captions": len(captions)}


def mean_average_precision(words: Sequence[str], labels: np.ndarray, probabilities: np.ndarray) -> dict:
    """AP of each frequent object word, ranking its mentions by the model's probability against the
    true-positive labels, and their mean (words whose mentions are all one class are left out)."""
    from sklearn.metrics import average_precision_score

    per_word = {}
    for word in sorted(set(words)):
        rows = np.array([w == word for w in words])
        if len(set(labels[rows].tolist())) == 2:
            per_word[word] = float(average_precision_score(labels[rows], probabilities[rows]))
    return {"map": float(np.mean(list(per_word.values()))) if per_word else float("nan"), "per_word": per_word}


def labels_of(mentions: Sequence) -> np.ndarray:
    return np.array([int(m.true_positive) for m in mentions])



def why_empty(labels: np.ndarray, min_count: int) -> str:
    """Why a score over true/hallucinated mentions cannot be computed ('' when it can)."""
    if len(labels) == 0:
        return f"no object word predicted more than {min_count} times (lower --min-count)"
    if labels.min() == labels.max():
        kind = "true positives" if labels[0] else "hallucinated"
        return f"all {len(labels)} mentions are {kind}: one class only, undefined"
    return ""


# ------------------------------------------------------------------------- the experiments
PAPER_AUC = {  # Table 3: AUC of true vs hallucinated frequent object words (Flickr30K)
    "gridtd": {"lrp_max": 0.61, "lrp": 0.64, "guided_gradcam_abs": 0.54, "attention": 0.53, "one_minus_beta": 0.54,
               "guided_gradcam": 0.45},
    "adaptive": {"lrp_max": 0.66, "lrp": 0.64, "guided_gradcam_abs": 0.58, "attention": 0.51, "one_minus_beta": 0.53,
                 "guided_gradcam": 0.42},
}
PAPER_MAP = {"adaptive": (51.14, 54.57), "gridtd": (54.66, 55.22)}  # Table 5, Flickr30K: original, LRP-tuned
RESULT_KEYS = ("auc", "auc_interval", "stratified_auc", "stratified_auc_interval", "added_value",
               "added_value_interval", "chair", "true_positives", "false_positives", "words", "ground_truth", "note")
MIN_COUNT = Option("min_count", 50, "Object words predicted more often than this count (paper: 50).", "int", 0)


def demo_min_count(quick: bool) -> int:
    """The demo's min count: the papers' 50 predictions among Flickr30K's 1000 test images, scaled to
    the 200 images the demo's experiments use (``demo.FULL.experiment_images``); 5 for the quick demo's
    60. At 50, whether any of the shapes world's object words is predicted that often in 200 captions
    depended on the CPU the demo trained on: on one 2-core machine none was, and every hallucination
    row of the adaptive model read "not measured"."""
    return 5 if quick else 10


def _result(results: dict, name: str, arch: str, needed: tuple[str, ...]) -> dict:
    """One architecture's result of a dict-valued experiment; a key read here that it lacks is an error
    (an empty result — not run — is not)."""
    from .registry import MissingColumn

    result = results.get(name, {}).get(arch) or {}
    missing = [k for k in needed if result and k not in result]
    if missing:
        raise MissingColumn(f"the {name} result of {arch} has no {', '.join(missing)}")
    return result


def hallucination_findings(results: dict, arch: str) -> list[Finding]:
    result = _result(results, "hallucination", arch, ("auc", "auc_interval"))
    auc, intervals = result.get("auc", {}), result.get("auc_interval", {})
    nan = float("nan")

    def auc_of(score) -> tuple[float, float]:
        interval = intervals.get(score)
        return (nan, nan) if interval is None or interval[0] is None else tuple(interval)

    sentinel = auc.get("one_minus_beta") is not None and not np.isnan(auc.get("one_minus_beta", nan))
    rivals = ["attention", "one_minus_beta"] if sentinel else ["attention"]
    findings = [("LRP identifies hallucinated words better than attention and 1−β",
                 all_of(*(above(max(auc_of("lrp"), auc_of("lrp_max"), key=lambda i: i[0]), auc_of(r))
                          for r in rivals)),
                 f"AUC LRP {shown(auc_of('lrp'))}, L-max {shown(auc_of('lrp_max'))}, attention "
                 f"{shown(auc_of('attention'))}, 1−β " + (shown(auc_of("one_minus_beta")) if sentinel
                                                           else "not defined (no sentinel)")),
                ("The absolute value of Guided Grad-CAM detects hallucination better than its signed mean",
                 above(auc_of("guided_gradcam_abs"), auc_of("guided_gradcam")),
                 f"AUC Guided Grad-CAM-abs {shown(auc_of('guided_gradcam_abs'))} vs signed "
                 f"{shown(auc_of('guided_gradcam'))}")]
    if "probability" in auc:  # the model's confidence as the baseline (results from before it lack it)
        best_lrp = max(auc_of("lrp"), auc_of("lrp_max"), key=lambda i: i[0])
        added = result.get("added_value_interval", {}).get("lrp", (nan, nan))
        findings += [
            ("LRP detects hallucinated words better than the model's confidence",
             all_of(above(best_lrp, auc_of("probability")), above(best_lrp, auc_of("entropy"))),
             f"AUC LRP {shown(auc_of('lrp'))}, L-max {shown(auc_of('lrp_max'))} vs token probability "
             f"{shown(auc_of('probability'))}, −entropy {shown(auc_of('entropy'))}"),
            ("LRP adds to the model's confidence (beyond probability, entropy, position and repetition)",
             above(tuple(nan if x is None else x for x in added), (0.0, 0.0)),
             f"added cross-validated AUROC of the LRP score in a logistic regression {shown(added)}; "
             f"AUROC within word positions: LRP {shown(_pair(result, 'stratified_auc_interval', 'lrp'))}, "
             f"probability {shown(_pair(result, 'stratified_auc_interval', 'probability'))}")]
    return [(c, v if result else NOT_MEASURED, n if result else "not measured") for c, v, n in findings]


def _pair(result: dict, key: str, score: str) -> tuple[float, float]:
    """An interval of ``result[key][score]`` (NaNs where it is missing or undefined)."""
    pair = result.get(key, {}).get(score) or (None, None)
    return tuple(float("nan") if x is None else float(x) for x in pair)


def hallucination_section(results: dict, archs: list[str]) -> list[str]:
    from .tables import format_cell, markdown_table

    rows = []
    for arch in archs:
        result = _result(results, "hallucination", arch, ("auc",))
        auc = result.get("auc", {})
        rows.append({"model": arch, "TP/FP": f"{result.get('true_positives', 0)}/{result.get('false_positives', 0)}"}
                    | {k: auc.get(k, float("nan")) for k in auc})
        if arch in PAPER_AUC:
            rows.append({"model": f"{arch} (paper)", "TP/FP": "Flickr30K"} | PAPER_AUC[arch])
    chair_of = lambda arch, key: format_cell((results.get("hallucination", {}).get(arch) or {}).get("chair", {}).get(key))  # noqa: E731
    beyond = []
    for arch in archs:
        result = _result(results, "hallucination", arch, ())
        for score, value in (result.get("added_value") or {}).items():
            beyond.append({"model": arch, "score": score,
                           "AUROC within positions": _with(result, "stratified_auc", score),
                           "added value over confidence": "" if value is None else
                           f"{value:.3f} {shown(_pair(result, 'added_value_interval', score))}"})
    confounded = ["Beyond confidence and position (confounders.py): the AUROC over pairs of mentions at the same "
                  "word position, and the cross-validated AUROC a score adds to a logistic regression of "
                  "\"hallucinated\" on probability, entropy, position and repetition (95% bootstrap intervals).", "",
                  markdown_table(beyond), ""] if beyond else []
    return ["## Table 3 — AUC of true vs hallucinated object words", "", markdown_table(rows), "",
            "`probability` and `entropy` are the model's own confidence (token probability, negated entropy of "
            "the next-word distribution): the baselines an explanation score must beat.", "", *confounded,
            "CHAIR (Rohrbach et al. 2018): " + "; ".join(
                f"{arch} CHAIR-i {chair_of(arch, 'chair_i')}, CHAIR-s {chair_of(arch, 'chair_s')}" for arch in archs), ""]


def _with(result: dict, key: str, score: str) -> str:
    """``value [low, high]`` of ``result[key][score]`` and its interval."""
    value = (result.get(key) or {}).get(score)
    return "" if value is None else f"{value:.3f} {shown(_pair(result, key + '_interval', score))}"


def _show_hallucination(result: dict, bench, options: dict) -> None:
    from ..io import dumps

    average = bench.mean_average_precision(options.get("min_count", 50))
    print(dumps({"auc": result["auc"], "stratified_auc": result["stratified_auc"],
                 "added_value": result["added_value"], "chair": result["chair"], "map": average["map"],
                 "true_positives": result["true_positives"], "false_positives": result["false_positives"],
                 "ground_truth": result["ground_truth"], "note": result["note"] or average["note"]}))


@register_experiment(Experiment(
    name="hallucination", verb="hallucination", title="Hallucination detection", papers="Table 3, Fig. 7", order=3,
    options=(MIN_COUNT,), columns=RESULT_KEYS, demo=lambda quick, seed: {"min_count": demo_min_count(quick)},
    findings=hallucination_findings, section=hallucination_section, show=_show_hallucination))
def hallucination(bench, min_count: int = 50) -> dict:
    """Hallucination detection (Table 3, Fig. 7): ROC AUC of explanation scores for true vs
    hallucinated frequent object words, CHAIR-i/CHAIR-s, and (printed beside them) the mAP of frequent
    object words (Table 5). Object words are labelled by boxes or, e.g. on Flickr30K, by the reference
    captions. Writes hallucination_auc, chair and map tables and hallucination_roc.png."""
    from .confounders import added_value, repetitions, stratified_auc, stratified_auc_interval
    from .context import word_confidence
    from .tables import write_table

    p = bench.predictions
    mentions = p.frequent_mentions(min_count)
    labels = labels_of(mentions)
    explanations = {method: bench.explanations(method, mentions) for method in bench.available(SCORES)}
    probabilities, entropies = word_confidence(bench.captioner, p, mentions)
    explained = detection_scores(mentions, explanations)
    scores = explained | dict(zip(CONFIDENCE, (probabilities, -entropies)))
    auc = auc_table(labels, scores)
    rates = chair([c.words for c in p.captions], p.objects, p.synonyms)
    note = why_empty(labels, min_count)
    intervals = {name: auc_interval(labels, values) for name, values in scores.items()}
    positions = np.array([m.position for m in mentions])
    stratified = {name: float(stratified_auc(labels, values, positions)) for name, values in scores.items()}
    stratified_intervals = {name: stratified_auc_interval(labels, values, positions) for name, values in scores.items()}
    confounders = np.column_stack([probabilities, entropies, positions, repetitions(mentions)]).reshape(len(mentions), 4)
    beyond = {name: added_value(labels, values, confounders) for name, values in explained.items()}
    result = {"auc": auc, "auc_interval": intervals, "stratified_auc": stratified,
              "stratified_auc_interval": stratified_intervals,
              "added_value": {name: value for name, (value, _, _) in beyond.items()},
              "added_value_interval": {name: (low, high) for name, (_, low, high) in beyond.items()},
              "chair": rates, "true_positives": int(labels.sum()),
              "false_positives": int(len(labels) - labels.sum()), "words": sorted({m.word for m in mentions}),
              "ground_truth": p.truth.source, "note": note}
    nan3 = (float("nan"),) * 3
    write_table(bench.out, "hallucination_auc",
                bench.labelled([{"score": k, "auc": v, "auc_low": intervals[k][0], "auc_high": intervals[k][1],
                                 "stratified_auc": stratified[k], "stratified_auc_low": stratified_intervals[k][0],
                                 "stratified_auc_high": stratified_intervals[k][1]}
                                | dict(zip(("added_value", "added_value_low", "added_value_high"), beyond.get(k, nan3)))
                                | ({"note": note} if note else {})
                                | ({} if np.isfinite(scores[k]).all() else {"note": UNDEFINED})
                                for k, v in auc.items()]),
                f"AUC of true vs hallucinated object words ({result['true_positives']} TP, "
                f"{result['false_positives']} FP; words predicted > {min_count} times; within word positions; the "
                f"cross-validated AUROC a score adds to confidence, position and repetition; 95% bootstrap "
                f"intervals over mentions): {bench.scope}")
    chair_note = {} if rates["object_mentions"] else {"note": "no object word in any caption"}
    write_table(bench.out, "chair", bench.labelled([rates | chair_note]), f"CHAIR hallucination rates: {bench.scope}")
    plot_roc(labels, scores, bench.out / "hallucination_roc.png")
    return result


def map_section(results: dict, archs: list[str]) -> list[str]:
    from .tables import markdown_table

    rows = [{"model": arch, "ours": _result(results, "map", arch, ("map",)).get("map", float("nan")),
             "paper original": PAPER_MAP.get(arch, (float("nan"),) * 2)[0] / 100,
             "paper LRP-tuned": PAPER_MAP.get(arch, (float("nan"),) * 2)[1] / 100} for arch in archs]
    return ["## Table 5 — mAP of frequent object words", "", markdown_table(rows), ""]


def _show_json(result: dict, bench, options: dict) -> None:
    from ..io import dumps

    print(dumps(result))


@register_experiment(Experiment(
    name="map", verb="map", title="mAP of frequent object words", papers="Table 5", order=4,
    options=(MIN_COUNT,), columns=("map", "per_word", "ground_truth", "note"),
    demo=lambda quick, seed: {"min_count": demo_min_count(quick)}, section=map_section, show=_show_json,
    aliases=("mean_average_precision",)))
def mean_average_precision_of(bench, min_count: int = 50) -> dict:
    """Mean average precision of the frequent object words (Table 5): each word's mentions ranked by
    the model's probability against their true/false-positive labels. Writes map.{csv,json,md,png}."""
    from .context import word_probabilities
    from .tables import plot_bars, write_table

    mentions = bench.predictions.frequent_mentions(min_count)
    probabilities = word_probabilities(bench.captioner, bench.predictions, mentions)
    labels = labels_of(mentions)
    result = mean_average_precision([m.word for m in mentions], labels, probabilities)
    result["ground_truth"] = bench.predictions.truth.source
    result["note"] = why_empty(labels, min_count) or (
        "" if result["per_word"] else "no frequent object word has both true and hallucinated mentions")
    rows = [{"word": w, "ap": ap} for w, ap in result["per_word"].items()]
    rows.append({"word": "mAP", "ap": result["map"]} | ({"note": result["note"]} if result["note"] else {}))
    write_table(bench.out, "map", bench.labelled(rows), f"AP of frequent object words (> {min_count}): {bench.scope}")
    plot_bars([r for r in rows if r["ap"] == r["ap"]], "word", "ap", bench.out / "map.png",
              "average precision of frequent object words")
    return result
