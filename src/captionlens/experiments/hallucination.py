"""Finding hallucinated object words (Table 3 / Table II, Fig. 7), their rates (CHAIR, Rohrbach et al.
2018) and the mean average precision of frequent object words (Table 5).

A mention of a frequent object word (predicted more than ``min_count`` times) is a true positive when
the image holds an object of its category, else a false positive (hallucinated). Each mention gets a
score from its explanation; the AUC says how well the score separates the two.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from ..data.synonyms import Synonyms
from ..explain import Explanation

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


def auc_interval(labels: np.ndarray, values: np.ndarray, resamples: int = 1000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile-bootstrap interval of the ROC AUC, resampling mentions with replacement (draws with
    one class only are skipped); NaN when there is only one class."""
    from sklearn.metrics import roc_auc_score

    if len(set(labels.tolist())) < 2 or not np.isfinite(values).all():
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    aucs = []
    for _ in range(resamples):
        rows = rng.integers(len(labels), size=len(labels))
        if labels[rows].min() != labels[rows].max():
            aucs.append(roc_auc_score(labels[rows], values[rows]))
    tail = (1 - level) / 2 * 100
    return float(np.percentile(aucs, tail)), float(np.percentile(aucs, 100 - tail))


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

