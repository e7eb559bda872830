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
# Percentile bootstrap intervals of a mean are too narrow with few values
# (they cannot see spread that was not sampled): none below this many pairs.
MIN_PAIRS_FOR_BOOTSTRAP = 10
# The exact sign-flip test enumerates all 2^n sign patterns up to this n;
# above it, this many random patterns (seeded) estimate the p-value.
EXACT_PERMUTATION_MAX_N = 20
RANDOM_PATTERNS = 200_000
# A model whose best validation accuracy is within this of 1/classes has
# learnt nothing: diverged or mis-configured.
CHANCE_MARGIN = 0.02
CHANCE_FLAG = "at chance level: diverged or mis-configured"
TEACHER_CHANCE_FLAG = "teacher at chance level: diverged or mis-configured"


def at_chance(val_accuracy: float, classes: int, margin: float = CHANCE_MARGIN) -> bool:
    """Is a validation accuracy not clearly above guessing among `classes`?"""
    return bool(val_accuracy <= 1.0 / classes + margin)


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


def sign_flip_test(gains) -> tuple[float, float, bool]:
    """Exact paired sign-flip permutation test of "mean gain = 0", two-sided.

    Under the null hypothesis each seed's gain is as likely to have the
    opposite sign, so the observed |mean| is compared with the |mean| of all
    2^n sign patterns: p = (patterns at least as extreme) / 2^n. It assumes
    no distribution of the gains. Its smallest possible p is 2 / 2^n (all
    gains of one sign): 0.25 with 3 seeds, 0.125 with 4, 0.0625 with 5, so
    below 6 seeds it can never reach 0.05.

    Returns (p, smallest possible p, exact). Above EXACT_PERMUTATION_MAX_N
    pairs the p-value is estimated from RANDOM_PATTERNS seeded patterns.
    """
    g = np.asarray(gains, dtype=float)
    n = len(g)
    if n == 0:
        raise ValueError("no gains to test")
    observed = abs(g.mean())
    # Floating-point ties (a pattern that equals the observed |mean|) must
    # count as "as extreme".
    tol = 1e-12 * max(1.0, float(np.abs(g).max()))
    exact = n <= EXACT_PERMUTATION_MAX_N
    if exact:
        # Row k of `signs` is the binary expansion of k mapped to -1/+1.
        bits = (np.arange(2 ** n)[:, None] >> np.arange(n)) & 1
        signs = 1 - 2 * bits
    else:
        signs = np.random.default_rng(0).choice([-1, 1], size=(RANDOM_PATTERNS, n))
    extreme = int((np.abs(signs @ g / n) >= observed - tol).sum())
    return extreme / len(signs), 2.0 / 2 ** n, exact


def holm(p_values) -> list[Optional[float]]:
    """Holm's step-down adjustment of a family of p-values (None stays None).

    Controls the family-wise error rate: the chance that any setting of the
    family looks significant when none is better."""
    idx = [i for i, p in enumerate(p_values) if p is not None and not _nan(p)]
    out: list[Optional[float]] = [None] * len(p_values)
    m, running = len(idx), 0.0
    for rank, i in enumerate(sorted(idx, key=lambda i: p_values[i])):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        out[i] = running
    return out


def _nan(x) -> bool:
    return isinstance(x, float) and math.isnan(x)


@dataclass
class PairedComparison:
    n: int
    mean_gain: float
    sd_gain: Optional[float]
    t: Optional[float]
    p_value: Optional[float]          # two-sided paired t-test
    ci_low: Optional[float]           # t interval of the mean gain
    ci_high: Optional[float]
    perm_p_value: Optional[float]     # exact sign-flip permutation test
    perm_min_p: Optional[float]       # its smallest possible p with n pairs
    perm_exact: Optional[bool]
    boot_low: Optional[float]         # bootstrap interval, only with >= 10 pairs
    boot_high: Optional[float]
    possible: bool                    # enough seeds for a test at all
    reason: str

    def as_dict(self) -> dict:
        return asdict(self)


def paired_comparison(kd, baseline, level: float = 0.95) -> PairedComparison:
    """Is KD better than the baseline across seeds? Paired by seed.

    The t-test and its interval assume roughly normal gains; the sign-flip
    test beside it assumes nothing but is coarse with few seeds (see
    sign_flip_test). No bootstrap interval below MIN_PAIRS_FOR_BOOTSTRAP.
    """
    kd, baseline = np.asarray(kd, float), np.asarray(baseline, float)
    gain = kd - baseline
    n = len(gain)
    sd = float(gain.std(ddof=1)) if n > 1 else None
    none = dict(t=None, p_value=None, ci_low=None, ci_high=None, perm_p_value=None,
                perm_min_p=None, perm_exact=None, boot_low=None, boot_high=None)
    if n < MIN_SEEDS_FOR_TEST:
        return PairedComparison(n, float(gain.mean()), sd, **none, possible=False,
                                reason=f"a paired test needs at least {MIN_SEEDS_FOR_TEST} "
                                f"seeds; this run has {n}")
    if sd == 0:
        return PairedComparison(n, float(gain.mean()), sd, **none, possible=False,
                                reason="every seed gives the same gain: no spread to test")
    res = _st.ttest_rel(kd, baseline)
    _, lo, hi = mean_ci(gain, level)
    perm_p, perm_min, exact = sign_flip_test(gain)
    b_lo = b_hi = None
    if n >= MIN_PAIRS_FOR_BOOTSTRAP:
        b_lo, b_hi = bootstrap_mean_ci(gain, level)
    return PairedComparison(n, float(gain.mean()), sd, float(res.statistic), float(res.pvalue),
                            lo, hi, perm_p, perm_min, exact, b_lo, b_hi, True, "")


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
