"""Statistics against independent computations (scipy, numpy, by hand)."""

import itertools

import numpy as np
import pytest
from scipy import stats

from kdflow.stats import (at_chance, bootstrap_mean_ci, calibration, holm, mean_ci,
                          paired_comparison, sign_flip_test)

KD = [0.712, 0.705, 0.718, 0.709, 0.701]
CE = [0.698, 0.699, 0.704, 0.700, 0.695]


def test_paired_test_matches_scipy():
    r = paired_comparison(KD, CE)
    ref = stats.ttest_rel(KD, CE)
    assert r.possible and r.n == 5
    assert r.t == pytest.approx(ref.statistic) and r.p_value == pytest.approx(ref.pvalue)
    gain = np.subtract(KD, CE)
    assert r.mean_gain == pytest.approx(gain.mean()) and r.sd_gain == pytest.approx(gain.std(ddof=1))
    # the paired t-test is the one-sample test of the gains
    assert r.p_value == pytest.approx(stats.ttest_1samp(gain, 0).pvalue)


def test_t_interval_matches_scipy():
    gain = np.subtract(KD, CE)
    m, lo, hi = mean_ci(gain)
    ref = stats.t.interval(0.95, len(gain) - 1, loc=gain.mean(), scale=stats.sem(gain))
    assert (lo, hi) == pytest.approx(ref)
    assert m == pytest.approx(gain.mean())
    assert mean_ci([0.7]) == (0.7, None, None)


def test_bootstrap_interval_matches_scipy_percentile_bootstrap():
    gain = np.subtract(KD, CE)
    lo, hi = bootstrap_mean_ci(gain, resamples=20_000)
    ref = stats.bootstrap((gain,), np.mean, n_resamples=20_000, method="percentile",
                          random_state=1).confidence_interval
    assert lo == pytest.approx(ref.low, abs=5e-4) and hi == pytest.approx(ref.high, abs=5e-4)
    assert lo <= gain.mean() <= hi
    assert bootstrap_mean_ci(gain) == bootstrap_mean_ci(gain)  # seeded


@pytest.mark.parametrize("n", [1, 2])
def test_too_few_seeds_gives_no_test(n):
    r = paired_comparison(KD[:n], CE[:n])
    assert not r.possible and r.p_value is None and "at least 3 seeds" in r.reason


def test_calibration_by_hand():
    # Two bins used: confidence 0.9 (2 of 2 right) and 0.6 (1 of 2 right).
    probs = np.array([[0.9, 0.1], [0.1, 0.9], [0.6, 0.4], [0.4, 0.6]])
    labels = np.array([0, 1, 0, 0])
    cal = calibration(probs, labels, bins=10)
    # ECE = 2/4 * |1.0 - 0.9| + 2/4 * |0.5 - 0.6| = 0.1
    assert cal["ece"] == pytest.approx(0.1)
    used = [b for b in cal["bins"] if b["count"]]
    assert [(b["count"], b["accuracy"]) for b in used] == [(2, 0.5), (2, 1.0)]
    assert sum(b["count"] for b in cal["bins"]) == 4


def test_perfectly_calibrated_predictions_have_zero_ece():
    rng = np.random.default_rng(0)
    p = rng.uniform(0.5, 1.0, 20000)
    labels = (rng.uniform(size=p.size) > p).astype(int)  # class 0 right with prob p
    probs = np.stack([p, 1 - p], 1)
    assert calibration(probs, labels)["ece"] < 0.01


# ---------------------------------------------------------------------------
# Exact sign-flip permutation test, Holm, no bootstrap with few pairs
# ---------------------------------------------------------------------------

def enumerate_sign_flips(gains):
    """The test by hand: every sign pattern, listed by itertools."""
    observed = abs(sum(gains) / len(gains))
    patterns = list(itertools.product([1, -1], repeat=len(gains)))
    extreme = sum(abs(sum(s * g for s, g in zip(signs, gains)) / len(gains)) >= observed - 1e-15
                  for signs in patterns)
    return extreme / len(patterns)


@pytest.mark.parametrize("gains", [
    [0.01, 0.02, 0.03],                       # all positive: the smallest p, 2/8
    [0.012, -0.004, 0.007],
    [0.02, -0.01, 0.005, 0.011],
    [-0.003, 0.004, 0.001, 0.0065, -0.0005],
    [0.021, 0.008, 0.013, 0.002, 0.017],      # all positive: 2/32
])
def test_sign_flip_p_equals_hand_enumeration(gains):
    p, smallest, exact = sign_flip_test(gains)
    assert exact and p == pytest.approx(enumerate_sign_flips(gains), abs=1e-12)
    assert smallest == 2 / 2 ** len(gains)


def test_sign_flip_by_hand_for_three_seeds():
    # gains 1, 2, 3: |mean| 2 is reached only by +++ and ---: p = 2/8.
    assert sign_flip_test([1.0, 2.0, 3.0])[0] == 0.25
    # gains 3, -1, 1 (|mean| 1): +-+ (1), ++- ... : |3+1+1|/3, |3-1-1|/3=1/3, |3+1-1|/3=1,
    # |3-1+1|/3=1 and their mirrors: 6 of 8 patterns reach 1.
    assert sign_flip_test([3.0, -1.0, 1.0])[0] == 0.75


def test_paired_comparison_reports_the_permutation_test():
    r = paired_comparison(KD, CE)
    assert r.perm_p_value == pytest.approx(enumerate_sign_flips(np.subtract(KD, CE)))
    assert r.perm_min_p == 2 / 32 and r.perm_exact


@pytest.mark.parametrize("n", [3, 5, 9])
def test_no_bootstrap_interval_below_ten_pairs(n):
    rng = np.random.default_rng(n)
    kd, ce = rng.normal(0.71, 0.01, n), rng.normal(0.70, 0.01, n)
    r = paired_comparison(kd, ce)
    assert r.possible and r.boot_low is None and r.boot_high is None


def test_bootstrap_interval_from_ten_pairs():
    rng = np.random.default_rng(10)
    r = paired_comparison(rng.normal(0.71, 0.01, 10), rng.normal(0.70, 0.01, 10))
    assert r.boot_low is not None and r.boot_low < r.mean_gain < r.boot_high


def test_holm_by_hand():
    # sorted: 0.01 (x3 = 0.03), 0.02 (x2 = 0.04), 0.04 (x1 = 0.04; monotone)
    assert holm([0.04, 0.01, 0.02]) == pytest.approx([0.04, 0.03, 0.04])
    # capped at 1, monotone, None kept
    assert holm([0.5, None, 0.3]) == [pytest.approx(0.6), None, pytest.approx(0.6)]
    assert holm([0.6, 0.9]) == pytest.approx([1.0, 1.0])


def test_chance_level():
    assert at_chance(0.10, 10) and at_chance(0.119, 10) and not at_chance(0.13, 10)
    assert at_chance(0.02, 100) and not at_chance(0.05, 100)
