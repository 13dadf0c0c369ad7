"""Does a hallucination-detection score know more than the model's own confidence and than where the
word stands? Two measures against the confounders of object-word hallucination:

- **AUROC within position strata**: the probability that a true mention scores higher than a
  hallucinated mention *at the same word position* (ties count ½) — the pairs of the ordinary AUROC
  (Hanley & McNeil 1982) restricted to those that share a stratum. Late words are hallucinated more
  often (Zhou et al. 2024, "Analyzing and mitigating object hallucination in LVLMs", LURE), so a
  score that only tracks the position has an ordinary AUROC far from ½ but a stratified one of ½.
- **Added value**: a logistic regression of "hallucinated" on the confounders (token probability,
  entropy, position, how often the object was already named in the caption) with and without the
  score; the cross-validated AUROC of the second minus that of the first. A score equal to the
  confidence adds nothing.

Intervals: percentile bootstrap over mentions (the same draws as ``hallucination.auc_interval``).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .hallucination import bootstrap_rows, rank_auc
from .intervals import percentile_interval

FOLDS = 5


def draw_weights(size: int, resamples: int = 1000, seed: int = 0) -> np.ndarray:
    """How often each of ``size`` items is drawn in each bootstrap draw: (resamples, size)."""
    rows = bootstrap_rows(size, resamples, seed)
    return np.stack([np.bincount(row, minlength=size) for row in rows]).astype(float)


def stratified_auc(labels: np.ndarray, values: np.ndarray, strata: np.ndarray,
                   weights: np.ndarray | None = None) -> np.ndarray:
    """AUROC of ``values`` for true (1) vs false (0) ``labels`` over the pairs in one stratum:
    Σ_s U_s / Σ_s n⁺_s·n⁻_s with U_s the Mann-Whitney count of stratum s. With ``weights`` (R, n) —
    item multiplicities, e.g. bootstrap draws — one AUROC per row, (R,); else a 0-d array. NaN where
    no stratum holds both classes."""
    labels, values, strata = np.asarray(labels, bool), np.asarray(values, float), np.asarray(strata)
    weights = np.ones((1, len(labels))) if weights is None else np.asarray(weights, float)
    wins = np.zeros(len(weights))
    pairs = np.zeros(len(weights))
    for stratum in np.unique(strata):
        inside = strata == stratum
        true, false = np.flatnonzero(inside & labels), np.flatnonzero(inside & ~labels)
        if not len(true) or not len(false):
            continue
        # [n⁺_s, n⁻_s]: 1 where the true mention scores higher, ½ on a tie
        beats = (values[true, None] > values[None, false]) + 0.5 * (values[true, None] == values[None, false])
        wins += np.einsum("ri,ij,rj->r", weights[:, true], beats, weights[:, false])
        pairs += weights[:, true].sum(axis=1) * weights[:, false].sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        result = wins / pairs
    return result if len(weights) > 1 else result[0]


def stratified_auc_interval(labels: np.ndarray, values: np.ndarray, strata: np.ndarray,
                            level: float = 0.95) -> tuple[float, float]:
    """Percentile-bootstrap interval of ``stratified_auc`` over mentions; NaN when it is undefined."""
    if not np.isfinite(values).all() or np.isnan(stratified_auc(labels, values, strata)):
        return float("nan"), float("nan")
    return percentile_interval(stratified_auc(labels, values, strata, draw_weights(len(labels))), level)


def repetitions(mentions: Sequence) -> np.ndarray:
    """For each mention, how often its category was already named earlier in the same caption."""
    seen: dict[tuple[int, str], int] = {}
    counts = []
    for mention in sorted(mentions, key=lambda m: (m.image, m.position)):
        key = (mention.image, mention.category)
        counts.append((mention, seen.get(key, 0)))
        seen[key] = seen.get(key, 0) + 1
    by_mention = dict(counts)
    return np.array([by_mention[m] for m in mentions], dtype=float)


def out_of_fold_risk(features: np.ndarray, hallucinated: np.ndarray, folds: int, seed: int = 0) -> np.ndarray:
    """P(hallucinated) of each mention from a logistic regression (standardised features) fitted on
    the other folds."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    splits = StratifiedKFold(folds, shuffle=True, random_state=seed)
    return cross_val_predict(model, features, hallucinated, cv=splits, method="predict_proba")[:, 1]


def added_value(labels: np.ndarray, score: np.ndarray, confounders: np.ndarray,
                level: float = 0.95) -> tuple[float, float, float]:
    """(added value, low, high): cross-validated AUROC for "hallucinated" of a logistic regression on
    ``confounders`` (n, k) plus ``score`` minus that on ``confounders`` alone, with the paired
    bootstrap interval over mentions of the out-of-fold predictions. NaN with fewer than two mentions
    of either class or an undefined score."""
    hallucinated = 1 - np.asarray(labels, int)
    minority = min(hallucinated.sum(), len(hallucinated) - hallucinated.sum())
    if minority < 2 or not np.isfinite(score).all():
        return (float("nan"),) * 3
    folds = min(FOLDS, int(minority))
    base = out_of_fold_risk(confounders, hallucinated, folds)
    full = out_of_fold_risk(np.column_stack([confounders, score]), hallucinated, folds)
    value = float(rank_auc(hallucinated[None], full[None])[0] - rank_auc(hallucinated[None], base[None])[0])
    rows = bootstrap_rows(len(hallucinated), 1000, 0)
    differences = rank_auc(hallucinated[rows], full[rows]) - rank_auc(hallucinated[rows], base[rows])
    return (value, *percentile_interval(differences, level))
