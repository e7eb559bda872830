"""Statistics against independent computations (scipy, numpy, by hand)."""

import numpy as np
import pytest
from scipy import stats

from kdflow.stats import bootstrap_mean_ci, calibration, mean_ci, paired_comparison

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
