"""Intervals and the three-way verdicts built on them: a finding "holds" only when the intervals say
so, "does not hold" only when they say the opposite, and is "inconclusive" when they overlap. The
intervals cover the sampling of images for one trained model; a model trained with another seed is
another model, and its verdicts can differ (the demo's two seeds: docs/demo-results.md).
"""
from __future__ import annotations

import math

import numpy as np

HOLDS, FAILS, INCONCLUSIVE, NOT_MEASURED = "holds", "does not hold", "inconclusive", "not measured"
Interval = tuple[float, float]


def bootstrap_mean_interval(values, resamples: int = 1000, seed: int = 0, level: float = 0.95,
                            statistic=np.mean) -> Interval:
    """Percentile-bootstrap interval of the mean (or of another ``statistic(array, axis=1)``, e.g.
    ``np.median``) of ``values`` (NaNs left out); NaN with none."""
    values = np.asarray(values, dtype=float)
    values = values[~np.isnan(values)]
    if values.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    return percentile_interval(statistic(values[rng.integers(values.size, size=(resamples, values.size))], axis=1),
                               level)


def percentile_interval(draws, level: float = 0.95) -> Interval:
    """The central ``level`` share of a bootstrap's draws of a statistic: its (1−level)/2 and
    (1+level)/2 percentiles (non-finite draws, e.g. an AUC of a one-class draw, left out)."""
    draws = np.asarray(draws, dtype=float)
    draws = draws[np.isfinite(draws)]
    if draws.size == 0:
        return float("nan"), float("nan")
    tail = (1 - level) / 2 * 100
    return float(np.percentile(draws, tail)), float(np.percentile(draws, 100 - tail))


def t_interval(values, level: float = 0.95) -> Interval:
    """Student-t interval of the mean over a few runs (seeds); NaN with fewer than two."""
    from scipy.stats import t

    values = np.asarray(values, dtype=float)
    values = values[~np.isnan(values)]
    if values.size < 2:
        return float("nan"), float("nan")
    half = t.ppf(0.5 + level / 2, values.size - 1) * values.std(ddof=1) / math.sqrt(values.size)
    return float(values.mean() - half), float(values.mean() + half)


def _known(*intervals: Interval) -> bool:
    return all(not math.isnan(x) for interval in intervals for x in interval)


def above(a: Interval, b: Interval) -> str:
    """Is the quantity of ``a`` larger than that of ``b``? holds: a's interval lies above b's;
    does not hold: below; inconclusive: they overlap."""
    if not _known(a, b):
        return NOT_MEASURED
    if a[0] > b[1]:
        return HOLDS
    if a[1] < b[0]:
        return FAILS
    return INCONCLUSIVE


def below(a: Interval, b: Interval) -> str:
    return above(b, a)


def all_of(*verdicts: str) -> str:
    """A finding made of several comparisons: holds if all hold, does not hold if any fails."""
    if any(v == FAILS for v in verdicts):
        return FAILS
    if any(v == NOT_MEASURED for v in verdicts):
        return NOT_MEASURED
    if all(v == HOLDS for v in verdicts):
        return HOLDS
    return INCONCLUSIVE



def shown(interval: Interval, digits: int = 3) -> str:
    """``[low, high]`` with ``digits`` decimals."""
    return f"[{interval[0]:.{digits}f}, {interval[1]:.{digits}f}]"


def scaled(interval: Interval, factor: float) -> Interval:
    return interval[0] * factor, interval[1] * factor


def with_interval(row: dict, key: str) -> str:
    """``value [low, high]`` of ``key`` in a table row ('' where the row has no value)."""
    value = row.get(key, float("nan"))
    if value is None or value != value:
        return ""
    return f"{value:.3g} [{row.get(key + '_low', float('nan')):.3g}, {row.get(key + '_high', float('nan')):.3g}]"
