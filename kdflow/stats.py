"""Statistics for a handful of seeds: intervals, the paired test, calibration.

With 3-10 seeds the t distribution, not the normal, gives honest intervals;
KD and baseline of one seed share teacher and initial weights, so they are
compared as pairs.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np
from scipy import stats as _st

MIN_SEEDS_FOR_TEST = 3


def mean_ci(values, level: float = 0.95) -> tuple[float, Optional[float], Optional[float]]:
    """Mean and its t-based confidence interval (None, None below 2 values)."""
    v = np.asarray(values, dtype=float)
    m = float(v.mean())
    if len(v) < 2:
        return m, None, None
    half = _st.t.ppf(0.5 + level / 2, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v))
    return m, m - half, m + half


def bootstrap_mean_ci(values, level: float = 0.95, resamples: int = 10_000,
                      seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean (seeded: the report is
    reproducible)."""
    v = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), size=(resamples, len(v)))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


@dataclass
class PairedComparison:
    n: int
    mean_gain: float
    sd_gain: Optional[float]
    t: Optional[float]
    p_value: Optional[float]          # two-sided paired t-test
    ci_low: Optional[float]           # t interval of the mean gain
    ci_high: Optional[float]
    boot_low: Optional[float]         # bootstrap interval of the mean gain
    boot_high: Optional[float]
    possible: bool                    # enough seeds for a test at all
    reason: str

    def as_dict(self) -> dict:
        return asdict(self)


def paired_comparison(kd, baseline, level: float = 0.95) -> PairedComparison:
    """Is KD better than the baseline across seeds? Paired by seed."""
    kd, baseline = np.asarray(kd, float), np.asarray(baseline, float)
    gain = kd - baseline
    n = len(gain)
    sd = float(gain.std(ddof=1)) if n > 1 else None
    if n < MIN_SEEDS_FOR_TEST:
        return PairedComparison(n, float(gain.mean()), sd, None, None, None, None, None,
                                None, False,
                                f"a paired test needs at least {MIN_SEEDS_FOR_TEST} seeds; "
                                f"this run has {n}")
    if sd == 0:
        return PairedComparison(n, float(gain.mean()), sd, None, None, None, None, None,
                                None, False, "every seed gives the same gain: no spread to test")
    res = _st.ttest_rel(kd, baseline)
    _, lo, hi = mean_ci(gain, level)
    b_lo, b_hi = bootstrap_mean_ci(gain, level)
    return PairedComparison(n, float(gain.mean()), sd, float(res.statistic), float(res.pvalue),
                            lo, hi, b_lo, b_hi, True, "")


def calibration(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> dict:
    """Expected calibration error (Guo et al. 2017) and the reliability
    diagram's bins: top-1 confidence against accuracy in equal-width bins."""
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)
    rows, ece = [], 0.0
    for b in range(bins):
        mask = which == b
        count = int(mask.sum())
        acc = float(correct[mask].mean()) if count else None
        mean_conf = float(conf[mask].mean()) if count else None
        if count:
            ece += count / len(labels) * abs(acc - mean_conf)
        rows.append({"low": float(edges[b]), "high": float(edges[b + 1]), "count": count,
                     "accuracy": acc, "confidence": mean_conf})
    return {"ece": float(ece), "bins": rows}
