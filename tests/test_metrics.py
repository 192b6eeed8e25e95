"""Metrics from confusion counts and score histograms agree with per-sample scikit-learn results."""

import math

import numpy as np
from imblearn.metrics import geometric_mean_score
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

from mdmt.ml.metrics import HIST_BINS, auc_ci, auc_from_hist, binary_metrics, multiclass_metrics


def _sample(seed=0, n=300):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    score = np.clip(rng.normal(0.35 + 0.3 * y, 0.2), 0, 1 - 1e-9)
    return y, score


def _hist(y, score):
    edges = np.linspace(0, 1, HIST_BINS + 1)
    return np.stack([np.histogram(score[y == c], bins=edges)[0] for c in (0, 1)])


def test_binary_metrics_match_per_sample_definitions():
    y, s = _sample()
    p = (s >= 0.5).astype(int)
    cm = np.zeros((2, 2), int)
    np.add.at(cm, (y, p), 1)
    m = binary_metrics(cm)
    assert math.isclose(m["acc"], accuracy_score(y, p))
    assert math.isclose(m["f1"], f1_score(y, p, average="weighted"))
    assert math.isclose(m["gmean_weighted"], geometric_mean_score(y, p, average="weighted"))
    tpr = ((p == 1) & (y == 1)).sum() / (y == 1).sum()
    tnr = ((p == 0) & (y == 0)).sum() / (y == 0).sum()
    assert math.isclose(m["gmean"], math.sqrt(tpr * tnr))
    # the weighted variant is sqrt(ACC x support-weighted specificity)
    w_spec = (y == 0).mean() * tpr + (y == 1).mean() * tnr  # class 0's specificity is TPR, class 1's is TNR
    assert math.isclose(m["gmean_weighted"], math.sqrt(m["acc"] * w_spec), rel_tol=1e-9)


def test_auc_from_histogram_is_close_to_exact_auc():
    y, s = _sample(1)
    exact = roc_auc_score(y, s)
    assert abs(auc_from_hist(_hist(y, s)) - exact) < 0.01


def test_bootstrap_interval_brackets_the_auc_and_shrinks_with_n():
    y, s = _sample(2, 200)
    h = _hist(y, s)
    lo, hi = auc_ci(h, n_boot=500, seed=0)
    auc = auc_from_hist(h)
    assert lo < auc < hi
    y2, s2 = _sample(3, 4000)
    lo2, hi2 = auc_ci(_hist(y2, s2), n_boot=500, seed=0)
    assert (hi2 - lo2) < (hi - lo)


def test_empty_and_single_class_inputs_do_not_crash():
    assert math.isnan(binary_metrics(np.zeros((2, 2), int))["acc"])
    h = np.zeros((2, HIST_BINS), int)
    h[0, 10] = 5
    assert math.isnan(auc_from_hist(h)) and all(math.isnan(v) for v in auc_ci(h))


def test_multiclass_metrics():
    cm = np.array([[5, 1, 0, 0], [1, 6, 1, 0], [0, 2, 4, 1], [0, 0, 1, 2]])
    m = multiclass_metrics(cm)
    assert math.isclose(m["acc"], np.trace(cm) / cm.sum())


def test_confusion_at_half_matches_argmax_and_youden_separates_classes():
    from mdmt.ml.metrics import DEFAULT_THRESHOLD_BIN, cm_at_bin, threshold_bin, youden_bin

    y, s = _sample(4, 500)
    h = _hist(y, s)
    p = (s >= 0.5).astype(int)
    cm = np.zeros((2, 2), int)
    np.add.at(cm, (y, p), 1)
    np.testing.assert_array_equal(cm_at_bin(h, DEFAULT_THRESHOLD_BIN), cm)
    # two well separated classes: Youden's cut-off falls between them
    sep = np.zeros((2, HIST_BINS), int)
    sep[0, 20:40] = 3
    sep[1, 70:90] = 2
    k = youden_bin(sep)
    assert 40 <= k <= 70
    tn, fp, fn, tp = cm_at_bin(sep, k).ravel()
    assert fp == 0 and fn == 0
    assert threshold_bin("0.3", sep) == 60 and threshold_bin("val", None) == DEFAULT_THRESHOLD_BIN
