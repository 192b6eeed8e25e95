"""Metrics from confusion counts and score histograms agree with per-sample scikit-learn results."""

import math

import numpy as np
from imblearn.metrics import geometric_mean_score
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

from mdmt.fed.policy import COARSE_BINS, coarsen_histogram
from mdmt.ml.metrics import (
    DEFAULT_THRESHOLD_BIN,
    HIST_BINS,
    LEGACY_HIST_BINS,
    LOGIT_RANGE,
    as_layout,
    auc_ci,
    auc_from_hist,
    binary_metrics,
    cm_at_bin,
    edge_bin,
    edge_p,
    exact_auc,
    multiclass_metrics,
    score_bins,
    score_histogram,
    youden_bin,
)


def _sample(seed=0, n=300):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    score = np.clip(rng.normal(0.35 + 0.3 * y, 0.2), 0, 1 - 1e-9)
    return y, score


def _hist(y, score):
    return score_histogram(y, score)


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
    from mdmt.ml.metrics import threshold_bin

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
    assert abs(edge_p(threshold_bin("0.3", sep)) - 0.3) < 1e-3 and threshold_bin("val", None) == DEFAULT_THRESHOLD_BIN


# ---- the histogram layout: logit bins --------------------------------------------------------------------
def test_bins_are_uniform_in_logit_with_open_ends_and_an_edge_at_one_half():
    p = np.array([0.0, 1e-12, 0.5 - 1e-7, 0.5, 0.5 + 1e-7, 1 - 1e-12, 1.0])
    b = score_bins(p)
    assert list(b[:2]) == [0, 0] and list(b[-2:]) == [HIST_BINS - 1] * 2  # beyond +-LOGIT_RANGE: the end bins
    assert b[2] == DEFAULT_THRESHOLD_BIN - 1 and b[3] == b[4] == DEFAULT_THRESHOLD_BIN
    z = np.linspace(-LOGIT_RANGE + 0.01, LOGIT_RANGE - 0.01, 50)
    widths = np.diff(score_bins(1 / (1 + np.exp(-z))))
    assert widths.max() - widths.min() <= 1  # equal steps in logit are equal steps in bins
    # a threshold bin and its P(SEVERE) cut-off are inverse; 0.5 is the argmax of the logits
    for k in (1, 17, DEFAULT_THRESHOLD_BIN, HIST_BINS - 3):
        assert edge_bin(edge_p(k)) == k
    assert edge_p(DEFAULT_THRESHOLD_BIN) == 0.5 and edge_bin(0.0) == 0 and edge_bin(1.0) == HIST_BINS


def test_crowded_scores_keep_their_auc_in_logit_bins():
    """A weak model's scores crowd into a band narrower than one equal-width bin of P(SEVERE): equal bins
    turn them into ties, logit bins keep their order."""
    rng = np.random.default_rng(5)
    y = rng.integers(0, 2, 400)
    s = 0.465 + 0.004 * rng.random(400) + 0.001 * y  # all within 0.005 of each other
    exact = roc_auc_score(y, s)
    legacy = np.stack([np.histogram(s[y == c], bins=np.linspace(0, 1, LEGACY_HIST_BINS + 1))[0] for c in (0, 1)])
    assert abs(auc_from_hist(as_layout(legacy)) - exact) > 0.1  # the old layout: one or two bins, mostly ties
    assert abs(auc_from_hist(score_histogram(y, s)) - exact) < 0.005
    assert exact_auc(y, s) == exact and math.isnan(exact_auc(np.zeros(5), s[:5]))


def test_legacy_histograms_convert_without_changing_auc_or_counts():
    y, s = _sample(6, 400)
    legacy = np.stack([np.histogram(s[y == c], bins=np.linspace(0, 1, LEGACY_HIST_BINS + 1))[0] for c in (0, 1)])
    h = as_layout(legacy.tolist())
    assert h.shape == (2, HIST_BINS) and (h.sum(axis=1) == legacy.sum(axis=1)).all()
    ranks = np.repeat(np.arange(LEGACY_HIST_BINS), legacy[0]), np.repeat(np.arange(LEGACY_HIST_BINS), legacy[1])
    legacy_auc = roc_auc_score(np.r_[np.zeros(len(ranks[0])), np.ones(len(ranks[1]))], np.r_[ranks[0], ranks[1]])
    assert abs(auc_from_hist(h) - legacy_auc) < 1e-12
    for k in (37, 100, 161):  # a legacy threshold k / 200 cuts the converted histogram where it cut the old one
        old = np.array([[legacy[0, :k].sum(), legacy[0, k:].sum()], [legacy[1, :k].sum(), legacy[1, k:].sum()]])
        np.testing.assert_array_equal(cm_at_bin(h, edge_bin(k / LEGACY_HIST_BINS)), old)


def test_youden_bin_is_the_best_cut_and_coarsening_merges_logit_bins():
    y, s = _sample(7, 300)
    h = _hist(y, s)
    k = youden_bin(h)
    j = [(h[1, c:].sum() / h[1].sum()) - (h[0, c:].sum() / h[0].sum()) for c in range(0, HIST_BINS + 1, 7)]
    best = h[1, k:].sum() / h[1].sum() - h[0, k:].sum() / h[0].sum()
    assert best >= max(j) - 1e-12
    coarse = coarsen_histogram(h)
    width = HIST_BINS // COARSE_BINS
    assert coarse.shape == h.shape and (coarse.sum(axis=1) == h.sum(axis=1)).all()
    assert set(np.flatnonzero(coarse.sum(axis=0))) <= set(range(width // 2, HIST_BINS, width))
    # each coarse bin is a run of the logit bins: its counts are theirs
    np.testing.assert_array_equal(coarse[:, width // 2 :: width], h.reshape(2, COARSE_BINS, width).sum(axis=2))


def test_the_store_keeps_a_histogram_by_its_nonzero_cells_and_reads_it_back():
    import json

    from mdmt.ml.metrics import HIST_BINS, as_layout, score_histogram
    from mdmt.store import sparse_counts

    rng = np.random.default_rng(0)
    y, p = rng.integers(0, 2, 300), rng.uniform(0, 1, 300)
    hist = score_histogram(y, p)
    stored = json.dumps(sparse_counts(hist.tolist()))
    assert len(stored) < 20 * 300 < len(json.dumps(hist.tolist())) / 5  # bytes a score, not the dense list
    back = as_layout(json.loads(stored))
    assert back.shape == (2, HIST_BINS) and (back == hist).all()
