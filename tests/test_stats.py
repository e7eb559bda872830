"""Statistics against independent computations (scipy, numpy, by hand)."""

import itertools

import numpy as np
import pytest
from scipy import stats

from kdflow.analysis.stats import (at_chance, bootstrap_mean_ci, calibration, chance_p_value, holm,
                          mean_ci, paired_comparison, sign_flip_test)

# Test images right of 1,000, per seed; accuracies are these / 1,000.
N = 1000
KD_RIGHT = [712, 705, 718, 709, 701]
CE_RIGHT = [698, 699, 704, 700, 695]
KD = [k / N for k in KD_RIGHT]
CE = [c / N for c in CE_RIGHT]


def test_paired_test_matches_scipy():
    r = paired_comparison(KD_RIGHT, CE_RIGHT, N)
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
    r = paired_comparison(KD_RIGHT[:n], CE_RIGHT[:n], N)
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
    r = paired_comparison(KD_RIGHT, CE_RIGHT, N)
    assert r.perm_p_value == pytest.approx(enumerate_sign_flips(np.subtract(KD, CE)))
    assert r.perm_min_p == 2 / 32 and r.perm_exact


@pytest.mark.parametrize("n", [3, 5, 9])
def test_no_bootstrap_interval_below_ten_pairs(n):
    rng = np.random.default_rng(n)
    kd, ce = rng.binomial(N, 0.71, n), rng.binomial(N, 0.70, n)
    r = paired_comparison(kd, ce, N)
    assert r.possible and r.boot_low is None and r.boot_high is None


def test_bootstrap_interval_from_ten_pairs():
    rng = np.random.default_rng(10)
    r = paired_comparison(rng.binomial(N, 0.71, 10), rng.binomial(N, 0.70, 10), N)
    assert r.boot_low is not None and r.boot_low < r.mean_gain < r.boot_high


def test_holm_by_hand():
    # sorted: 0.01 (x3 = 0.03), 0.02 (x2 = 0.04), 0.04 (x1 = 0.04; monotone)
    assert holm([0.04, 0.01, 0.02]) == pytest.approx([0.04, 0.03, 0.04])
    assert holm([0.6, 0.9]) == pytest.approx([1.0, 1.0])


def test_holm_counts_members_without_a_p_value():
    # A setting without a p-value (too few seeds, no test defined) is still a
    # setting the best was picked from: the family has 3 members, not 2.
    # sorted: 0.01 (x3 = 0.03), 0.02 (x2 = 0.04); the missing one stays None.
    assert holm([0.02, None, 0.01]) == [pytest.approx(0.04), None, pytest.approx(0.03)]
    assert holm([float("nan"), 0.02]) == [None, pytest.approx(0.04)]


# -- item: equal gains must not give a fake certainty ------------------------

def test_equal_gains_have_no_spread_and_no_t_test():
    # Every seed gains exactly 37 of 10,000 test images. As float accuracies
    # the gains differ in the last bits (sd ~ 1e-17) and the t-test printed
    # t = 1e14, p = 1e-28; counted in images there is no spread at all.
    base = [5013, 6120, 7342]
    r = paired_comparison([b + 37 for b in base], base, 10_000)
    assert r.equal_gains and r.sd_gain == 0.0 and r.gain_images == [37, 37, 37]
    assert r.t is None and r.p_value is None and r.ci_low is None and not r.possible
    assert "every seed gained exactly +37 of 10000 test images" in r.reason
    # The sign-flip test is defined: only all-plus and all-minus are as extreme.
    assert (r.perm_p_value, r.perm_min_p) == (0.25, 0.25)
    assert r.mean_gain == pytest.approx(0.0037, abs=1e-15)
    zero = paired_comparison(base, base, 10_000)
    assert zero.equal_gains and zero.perm_p_value == 1.0


def test_gains_are_counted_in_whole_images():
    with pytest.raises(ValueError, match="counts of correct test images"):
        paired_comparison([0.5037, 0.612], [0.5, 0.6], 10_000)


def test_monte_carlo_sign_flip_p_is_never_zero():
    # 25 positive gains: no random pattern is as extreme, and the estimate
    # (k + 1) / (m + 1) is 1 / 200,001, not 0.
    p, smallest, exact = sign_flip_test([3] * 25)
    assert not exact and p == smallest == pytest.approx(1 / 200_001) and p > 0


def test_exact_sign_flip_on_integers_has_no_tolerance():
    # |sum| ties are exact with integer gains: [2, -1, -1] has sum 0, so
    # every pattern is as extreme.
    assert sign_flip_test([2, -1, -1])[0] == 1.0
    assert sign_flip_test([5, 5, 5, 5])[0] == pytest.approx(2 / 16)


# -- item: the chance flag accounts for validation size and best-of-epochs ---

def test_chance_flag_catches_lucky_guessers_on_small_validation_sets():
    # 1,000 guessers among 10 classes, 200 validation images, best of 10
    # epochs: the best epoch is often above 12 % (the old 1/k + 2 points
    # rule), but nearly all must still be flagged.
    rng = np.random.default_rng(0)
    best = rng.binomial(200, 0.1, size=(1000, 10)).max(axis=1)
    assert (best > 0.12 * 200).mean() > 0.3  # the old rule missed these
    flagged = np.mean([at_chance(int(b), 200, 10, 10) for b in best])
    assert flagged >= 0.98


def test_chance_flag_passes_models_that_learnt():
    assert not at_chance(70, 200, 10, 10)          # 35 % of 200
    assert not at_chance(600, 5000, 10, 10)        # 12 % of 5,000 is clearly above
    assert at_chance(22, 200, 10, 1)               # 11 % of 200: a guess
    assert at_chance(3, 100, 100, 5)               # 3 % among 100 classes, 100 images
    # The union bound over epochs: more epochs, larger p.
    assert chance_p_value(30, 200, 10, 10) == pytest.approx(
        min(1.0, 10 * stats.binom.sf(29, 200, 0.1)))
    assert chance_p_value(30, 200, 10, 10) > chance_p_value(30, 200, 10, 1)
