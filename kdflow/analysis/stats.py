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
# A model is flagged at chance level unless its best validation count is
# clearly above guessing: a one-sided binomial test against 1/classes at this
# level, Bonferroni-corrected for the epochs it was the best of (a model that
# guesses still has a lucky epoch, and the fewer validation images the
# luckier it can be).
CHANCE_ALPHA = 0.01
CHANCE_FLAG = "at chance level: diverged or mis-configured"
TEACHER_CHANCE_FLAG = "teacher at chance level: diverged or mis-configured"


def chance_p_value(best_correct: int, images: int, classes: int, epochs: int) -> float:
    """p-value of "this model guesses": the chance that a guesser among
    `classes` gets at least `best_correct` of `images` validation images
    right in its best of `epochs` epochs (binomial tail, union bound over the
    epochs, so an upper bound whatever the epochs' correlation)."""
    if images <= 0 or epochs <= 0:
        raise ValueError("a chance test needs validation images and at least one epoch")
    tail = float(_st.binom.sf(best_correct - 1, images, 1.0 / classes))
    return min(1.0, epochs * tail)


def at_chance(best_correct: int, images: int, classes: int, epochs: int,
              alpha: float = CHANCE_ALPHA) -> bool:
    """Is a model's best validation count not clearly above guessing?"""
    return bool(chance_p_value(best_correct, images, classes, epochs) > alpha)


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


def _exact(values) -> np.ndarray:
    """`values` as int64 when they are whole numbers (counts of images), so
    that equal gains are exactly equal and sums have no rounding."""
    v = np.asarray(values)
    if v.dtype.kind in "iu":
        return v.astype(np.int64)
    v = v.astype(float)
    if np.all(np.isfinite(v)) and np.all(v == np.round(v)):
        return v.astype(np.int64)
    return v


def sign_flip_test(gains) -> tuple[float, float, bool]:
    """Exact paired sign-flip permutation test of "mean gain = 0", two-sided.

    Under the null hypothesis each seed's gain is as likely to have the
    opposite sign, so the observed |sum| is compared with the |sum| of all
    2^n sign patterns: p = (patterns at least as extreme) / 2^n. It assumes
    no distribution of the gains and is defined even when every gain is the
    same (then p = 2 / 2^n, or 1 when they are all 0). Its smallest possible
    p is 2 / 2^n (all gains of one sign): 0.25 with 3 seeds, 0.125 with 4,
    0.0625 with 5, so below 6 seeds it can never reach 0.05.

    Give the gains as whole numbers (test images gained) and the comparison
    is exact. Above EXACT_PERMUTATION_MAX_N pairs the p-value is estimated
    from RANDOM_PATTERNS seeded patterns as (k + 1) / (m + 1), which is
    never 0 and is a valid p-value (the observed pattern counts as one).

    Returns (p, smallest possible p, exact).
    """
    g = _exact(gains)
    n = len(g)
    if n == 0:
        raise ValueError("no gains to test")
    exact = n <= EXACT_PERMUTATION_MAX_N
    if exact:
        # Row k of `signs` is the binary expansion of k mapped to -1/+1.
        bits = (np.arange(2 ** n)[:, None] >> np.arange(n)) & 1
        signs = (1 - 2 * bits).astype(g.dtype)
    else:
        signs = np.random.default_rng(0).choice([-1, 1], size=(RANDOM_PATTERNS, n)).astype(g.dtype)
    sums = np.abs(signs @ g)
    observed = abs(g.sum())
    if g.dtype.kind == "i":
        extreme = int((sums >= observed).sum())
    else:
        # Floating-point ties (a pattern equal to the observed |sum|) count
        # as "as extreme".
        extreme = int((sums >= observed - 1e-12 * max(1.0, float(np.abs(g).sum()))).sum())
    if exact:
        return extreme / len(signs), 2.0 / 2 ** n, True
    return (extreme + 1) / (len(signs) + 1), 1.0 / (len(signs) + 1), False


def holm(p_values) -> list[Optional[float]]:
    """Holm's step-down adjustment of a family of p-values.

    Controls the family-wise error rate: the chance that any member of the
    family looks significant when none is better. A member without a
    p-value (None or nan: too few seeds, or no test defined) still counts in
    the family's size, as if its p were 1, and stays None: leaving it out
    would make the others' adjustment lenient."""
    missing = [p is None or _nan(p) for p in p_values]
    out: list[Optional[float]] = [None] * len(p_values)
    m, running = len(p_values), 0.0
    order = sorted((i for i in range(m) if not missing[i]), key=lambda i: p_values[i])
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        out[i] = running
    return out


def _nan(x) -> bool:
    return isinstance(x, float) and math.isnan(x)


@dataclass
class PairedComparison:
    n: int
    images: int                       # test images each model is scored on
    gain_images: list[int]            # per pair: test images gained (exact)
    mean_gain: float                  # fraction of the test images
    sd_gain: Optional[float]
    equal_gains: bool                 # every pair gained exactly the same
    t: Optional[float]
    p_value: Optional[float]          # two-sided paired t-test
    ci_low: Optional[float]           # t interval of the mean gain
    ci_high: Optional[float]
    perm_p_value: Optional[float]     # sign-flip permutation test
    perm_min_p: Optional[float]       # its smallest possible p with n pairs
    perm_exact: Optional[bool]
    boot_low: Optional[float]         # bootstrap interval, only with >= 10 pairs
    boot_high: Optional[float]
    possible: bool                    # a t-test (and interval) is defined
    reason: str                       # why not, when it is not

    def as_dict(self) -> dict:
        return asdict(self)


def paired_comparison(kd_correct, baseline_correct, images: int,
                      level: float = 0.95) -> PairedComparison:
    """Is KD better than the baseline across seeds? Paired by seed.

    Computed on exact quantities: the number of the `images` test images
    each model gets right, so a gain is a whole number of images, equal gains
    are exactly equal (float accuracies would give them a spread of 1e-17
    and the t-test a fake certainty) and a spread below one image is none.
    The t-test and its interval assume roughly normal gains and are
    undefined without spread; the sign-flip test beside it assumes nothing
    and is defined then too, but is coarse with few seeds (see
    sign_flip_test). No bootstrap interval below MIN_PAIRS_FOR_BOOTSTRAP.
    """
    kd, base = _exact(kd_correct), _exact(baseline_correct)
    if kd.dtype.kind != "i" or base.dtype.kind != "i":
        raise ValueError("paired_comparison needs counts of correct test images")
    images = int(images)
    gain = kd - base
    n = len(gain)
    frac = gain / images
    mean = float(gain.sum()) / (n * images) if n else float("nan")
    equal = n > 1 and bool((gain == gain[0]).all())
    sd = None if n < 2 else (0.0 if equal else float(frac.std(ddof=1)))
    common = dict(n=n, images=images, gain_images=[int(g) for g in gain], mean_gain=mean,
                  sd_gain=sd, equal_gains=equal)
    none = dict(t=None, p_value=None, ci_low=None, ci_high=None, boot_low=None, boot_high=None)
    if n < MIN_SEEDS_FOR_TEST:
        return PairedComparison(**common, **none, perm_p_value=None, perm_min_p=None,
                                perm_exact=None, possible=False,
                                reason=f"a paired test needs at least {MIN_SEEDS_FOR_TEST} "
                                f"seeds; this run has {n}")
    perm_p, perm_min, exact = sign_flip_test(gain)
    perm = dict(perm_p_value=perm_p, perm_min_p=perm_min, perm_exact=exact)
    if equal:
        return PairedComparison(**common, **none, **perm, possible=False,
                                reason=f"every seed gained exactly {int(gain[0]):+d} of "
                                f"{images} test images, so the gains have no spread and the "
                                "t-test is undefined")
    res = _st.ttest_1samp(frac, 0.0)
    _, lo, hi = mean_ci(frac, level)
    b_lo = b_hi = None
    if n >= MIN_PAIRS_FOR_BOOTSTRAP:
        b_lo, b_hi = bootstrap_mean_ci(frac, level)
    return PairedComparison(**common, t=float(res.statistic), p_value=float(res.pvalue),
                            ci_low=lo, ci_high=hi, **perm, boot_low=b_lo, boot_high=b_hi,
                            possible=True, reason="")


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


ALPHA = 0.05


def verdict(test: PairedComparison, family: Optional[dict] = None) -> dict:
    """Whether the headline's gain is beyond seed noise, decided on the
    evidence that fits how the setting was chosen.

    `family` is None when the headline's setting was not chosen on these
    seeds (one setting, or confirmation seeds that took no part in the
    choice): its own p-values decide. Otherwise it holds the setting's
    p-values adjusted (Holm) over every setting it was chosen among
    ({size, p_value, perm_p_value}); those decide, and a p-value the family
    lacks means the verdict says "not tested". With equal gains the t-test
    is undefined and the sign-flip test decides.

    kind: untested, equal (every seed gained the same; `significant` says
    whether the sign-flip test calls that beyond chance), beyond, hurts or
    noise.
    """
    adjusted = family is not None
    out = {"kind": "untested", "significant": False, "alpha": ALPHA, "adjusted": adjusted,
           # How the family's p-values were adjusted (Holm unless it says otherwise).
           "adjustment": family.get("method", "Holm") if adjusted else None,
           "family_size": family["size"] if adjusted else 1, "test": None,
           "p_value": None, "perm_p_value": None, "reason": test.reason}
    if test.n < 3 or test.perm_p_value is None:
        return out
    if test.equal_gains:
        p = family["perm_p_value"] if adjusted else test.perm_p_value
        out.update(test="sign-flip", p_value=p, perm_p_value=p)
        if p is None:
            out["reason"] = "no adjusted sign-flip p-value over the settings it was chosen among"
            return out
        out.update(kind="equal", significant=bool(p < ALPHA and test.mean_gain != 0))
        return out
    p = family["p_value"] if adjusted else test.p_value
    out.update(test="paired t", p_value=p,
               perm_p_value=family["perm_p_value"] if adjusted else test.perm_p_value)
    if p is None:
        out["reason"] = "no adjusted t-test p-value over the settings it was chosen among"
        return out
    significant = bool(p < ALPHA)
    kind = "noise" if not significant else ("beyond" if test.mean_gain > 0 else "hurts")
    out.update(kind=kind, significant=significant)
    return out
