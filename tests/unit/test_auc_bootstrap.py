"""The experiments' AUC statistics: the stratified bootstrap and the paired difference of two scores,
checked against scikit-learn on the same resamples."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score

from training.evaluate.metrics import auc_difference, bootstrap_auc, paired_bootstrap_auc


def _scores(seed: int = 5) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    n_neg, n_pos = 17, 11
    truth_neg, truth_pos = rng.normal(0, 1, n_neg), rng.normal(1.2, 1, n_pos)
    # score b: score a plus noise, with ties (rounded) so the average-rank form is exercised
    a_neg, a_pos = truth_neg, truth_pos
    b_neg = np.round(truth_neg + rng.normal(0, 1.5, n_neg), 1)
    b_pos = np.round(truth_pos + rng.normal(0, 1.5, n_pos), 1)
    return a_neg, a_pos, b_neg, b_pos


def test_paired_columns_are_the_single_bootstraps_and_sklearns_aucs() -> None:
    a_neg, a_pos, b_neg, b_pos = _scores()
    boot = paired_bootstrap_auc([a_neg, b_neg], [a_pos, b_pos], 300, seed=9)
    assert boot.shape == (300, 2)
    np.testing.assert_allclose(boot[:, 0], bootstrap_auc(a_neg, a_pos, 300, 9), atol=1e-12)
    np.testing.assert_allclose(boot[:, 1], bootstrap_auc(b_neg, b_pos, 300, 9), atol=1e-12)
    # the same draws, replayed by hand and scored by scikit-learn
    rng = np.random.default_rng(9)  # one chunk here: every resample's abnormals, then its normals
    all_ip = rng.integers(0, a_pos.size, (300, a_pos.size))
    all_ineg = rng.integers(0, a_neg.size, (300, a_neg.size))
    for i in range(0, 300, 37):
        ip, ineg = all_ip[i], all_ineg[i]
        y = np.r_[np.ones(a_pos.size), np.zeros(a_neg.size)]
        for k, (neg, pos) in enumerate(((a_neg, a_pos), (b_neg, b_pos))):
            assert abs(boot[i, k] - roc_auc_score(y, np.r_[pos[ip], neg[ineg]])) < 1e-12


def test_auc_difference_of_metrics_low_is_abnormal() -> None:
    a_neg, a_pos, b_neg, b_pos = _scores()
    # metrics are normality scores: low = abnormal, so pass minus the abnormality scores
    res = auc_difference(-a_neg, -a_pos, -b_neg, -b_pos, 2000, seed=1)
    y = np.r_[np.zeros(a_neg.size), np.ones(a_pos.size)]
    want = roc_auc_score(y, np.r_[a_neg, a_pos]) - roc_auc_score(y, np.r_[b_neg, b_pos])
    assert abs(res["difference"] - want) < 1e-12 and want > 0
    lo, hi = res["ci95"]
    assert lo < want < hi and hi - lo < 0.6
    assert 0.0 <= res["p_not_better"] < 0.5
    same = auc_difference(-a_neg, -a_pos, -a_neg, -a_pos, 500, seed=1)
    assert same["difference"] == 0.0 and same["ci95"] == [0.0, 0.0] and same["p_not_better"] == 1.0


def test_paired_scores_must_cover_the_same_studies() -> None:
    a_neg, a_pos, b_neg, b_pos = _scores()
    try:
        paired_bootstrap_auc([a_neg, b_neg[:-1]], [a_pos, b_pos], 10, seed=0)
    except ValueError as exc:
        assert "same studies" in str(exc)
    else:
        raise AssertionError("unequal score arrays were accepted")
