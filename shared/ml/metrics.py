"""Metrics from the sufficient statistics that sites send: confusion counts, score histograms, and each
split's exact AUC.

Sites never send per-sample predictions. A site computes the AUC of its own split from its own scores and
sends that one number; ROC curves, pooled AUCs and bootstrap intervals come from the per-class histograms
(scikit-learn with sample weights); confusion-derived metrics from the counts.

The histogram bins are uniform in the logit of P(SEVERE), log(p / (1 - p)), over [-LOGIT_RANGE,
LOGIT_RANGE], with both end bins open (everything below / above falls in them): a weak model's scores
crowd into a narrow band, which equal-width bins of P(SEVERE) merged into ties. Bin edge HIST_BINS / 2 is
logit 0, P(SEVERE) = 0.5, the argmax of the two logits. On the demo run (runs/demo) the pooled LOCO AUC
from these histograms is within POOLED_AUC_BOUND of the exact AUC of the pooled predictions.
"""

from __future__ import annotations

import math
import warnings

import numpy as np

HIST_BINS = 8000  # per-class histograms of predicted P(SEVERE) that sites send instead of per-sample scores
LOGIT_RANGE = 8.0  # bins cover logit(P(SEVERE)) in [-8, 8] (P in [0.00034, 0.99966]); the end bins are open
BIN_WIDTH = 2 * LOGIT_RANGE / HIST_BINS  # 0.002 in logit units
LOGIT_EDGES = (np.arange(HIST_BINS + 1) - HIST_BINS // 2) * BIN_WIDTH  # edge HIST_BINS // 2 is exactly 0
BIN_CENTRES = (LOGIT_EDGES[:-1] + LOGIT_EDGES[1:]) / 2  # the logit each bin's scores are ranked at
LEGACY_HIST_BINS = 200  # stores written before contract 2: 200 equal bins of P(SEVERE) in [0, 1]
POOLED_AUC_BOUND = 0.005  # measured: max |pooled histogram AUC - exact pooled AUC| on the demo run (docs/report.md)


def score_logits(p: np.ndarray) -> np.ndarray:
    """logit(P(SEVERE)), +-inf at 1 and 0."""
    p = np.asarray(p, dtype=np.float64)
    with np.errstate(divide="ignore"):
        return np.log(p) - np.log1p(-p)


def score_bins(p: np.ndarray) -> np.ndarray:
    """The histogram bin of each P(SEVERE): bin i holds logits in [LOGIT_EDGES[i], LOGIT_EDGES[i + 1]),
    the first and last bins everything below / above the range."""
    return np.searchsorted(LOGIT_EDGES[1:-1], score_logits(p), side="right")


def score_histogram(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    """The (2, HIST_BINS) counts of P(SEVERE) per true class (row 0 MILD, row 1 SEVERE) that a split sends."""
    y, b = np.asarray(y), score_bins(p)
    return np.stack([np.bincount(b[y == c], minlength=HIST_BINS) for c in (0, 1)]).astype(np.int64)


def dense_counts(sparse: dict) -> np.ndarray:
    """The table of counts a sparse form ``{"shape": [rows, columns], "nonzero": [[row, column, count]]}``
    stands for."""
    out = np.zeros(tuple(int(v) for v in sparse["shape"]), dtype=np.int64)
    for i, j, c in sparse["nonzero"]:
        out[int(i), int(j)] += int(c)
    return out


def as_layout(hist) -> np.ndarray:
    """A stored histogram in this layout: (2, HIST_BINS) as is; a store's (2, LEGACY_HIST_BINS) histogram of
    equal P(SEVERE) bins has each bin's count moved to the bin of its middle score (order, and so the AUC
    and the counts on either side of a legacy threshold, are kept). The store's sparse form
    (``{"shape": [2, HIST_BINS], "nonzero": [[class, bin, count], ...]}``, mdmt.store.sparse_counts) is
    expanded first."""
    if isinstance(hist, dict):
        hist = dense_counts(hist)
    hist = np.asarray(hist, dtype=np.int64)
    if hist.size == 2 * LEGACY_HIST_BINS:
        out = np.zeros((2, HIST_BINS), dtype=np.int64)
        centres = (np.arange(LEGACY_HIST_BINS) + 0.5) / LEGACY_HIST_BINS
        np.add.at(out, (slice(None), score_bins(centres)), hist.reshape(2, LEGACY_HIST_BINS))
        return out
    return hist.reshape(2, HIST_BINS)


def exact_auc(y: np.ndarray, p: np.ndarray) -> float:
    """The AUC of per-sample scores (what a site sends for its split); NaN when a class is absent, or when a
    score is not a number (a diverged model: the server then refuses the split)."""
    y, p = np.asarray(y), np.asarray(p, dtype=np.float64)
    if not ((y == 0).any() and (y == 1).any()) or not np.isfinite(p).all():
        return float("nan")
    # deferred: scikit-learn (slow to import; reading a run config or a reply needs no metric)
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, p))


def _expand_cm(cm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample (true, predicted) arrays that reproduce a confusion matrix (sample_weight is not
    honoured by every metric we use, so the samples are spelled out; n is at most a few thousand)."""
    k = cm.shape[0]
    t, p = np.meshgrid(np.arange(k), np.arange(k), indexing="ij")
    reps = cm.ravel().astype(np.int64)
    return np.repeat(t.ravel(), reps), np.repeat(p.ravel(), reps)


def binary_metrics(cm: np.ndarray) -> dict[str, float]:
    """ACC, support-weighted F1, G-mean (both definitions, named), sensitivity and specificity.

    ``gmean`` is the textbook sqrt(TPR x TNR); ``gmean_weighted`` is imbalanced-learn's weighted
    variant (sqrt(ACC x support-weighted specificity)), the one the paper's code reports.
    """
    # deferred: imbalanced-learn and scikit-learn (slow to import; reading a run config or a reply needs neither)
    from imblearn.metrics import geometric_mean_score
    from sklearn.metrics import accuracy_score, f1_score

    cm = np.asarray(cm, dtype=np.int64).reshape(2, 2)
    n = int(cm.sum())
    if n == 0:
        return {k: float("nan") for k in ("acc", "f1", "gmean", "gmean_weighted", "sensitivity", "specificity")} | {
            "n": 0
        }
    y, p = _expand_cm(cm)
    tn, fp, fn, tp = cm.ravel()
    sens = tp / (tp + fn) if tp + fn else float("nan")
    spec = tn / (tn + fp) if tn + fp else float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a class never predicted: its specificity is 0 by definition
        gmean_w = float(geometric_mean_score(y, p, average="weighted", labels=[0, 1]))
    return {
        "n": n,
        "acc": float(accuracy_score(y, p)),
        "f1": float(f1_score(y, p, average="weighted", labels=[0, 1], zero_division=0)),
        "gmean": float(math.sqrt(sens * spec)) if not (math.isnan(sens) or math.isnan(spec)) else float("nan"),
        "gmean_weighted": gmean_w,
        "sensitivity": float(sens),
        "specificity": float(spec),
    }


def multiclass_metrics(cm: np.ndarray) -> dict[str, float]:
    # deferred: scikit-learn (slow to import; reading a run config or a reply needs no metric)
    from sklearn.metrics import accuracy_score, f1_score

    cm = np.asarray(cm, dtype=np.int64)
    n = int(cm.sum())
    if n == 0:
        return {"n": 0, "acc": float("nan"), "f1": float("nan")}
    y, p = _expand_cm(cm)
    labels = list(range(cm.shape[0]))
    return {
        "n": n,
        "acc": float(accuracy_score(y, p)),
        "f1": float(f1_score(y, p, average="weighted", labels=labels, zero_division=0)),
    }


def _hist_xy(hist: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    hist = np.asarray(hist).reshape(2, HIST_BINS)
    y = np.repeat([0, 1], HIST_BINS)
    s = np.tile(BIN_CENTRES, 2)
    w = hist.ravel().astype(float)
    keep = w > 0
    return y[keep], s[keep], w[keep]


def auc_from_hist(hist: np.ndarray) -> float:
    hist = np.asarray(hist).reshape(2, HIST_BINS)
    if hist[0].sum() == 0 or hist[1].sum() == 0:
        return float("nan")
    # deferred: scikit-learn (slow to import; reading a run config or a reply needs no metric)
    from sklearn.metrics import roc_auc_score

    y, s, w = _hist_xy(hist)
    return float(roc_auc_score(y, s, sample_weight=w))


def roc_from_hist(hist: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # deferred: scikit-learn (slow to import; reading a run config or a reply needs no metric)
    from sklearn.metrics import roc_curve

    y, s, w = _hist_xy(hist)
    fpr, tpr, _ = roc_curve(y, s, sample_weight=w)
    return fpr, tpr


def auc_ci(hist: np.ndarray, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Stratified bootstrap interval of the AUC: each class resampled from its own score histogram."""
    hist = np.asarray(hist).reshape(2, HIST_BINS)
    if hist[0].sum() == 0 or hist[1].sum() == 0:
        return float("nan"), float("nan")
    aucs = boot_aucs(hist, n_boot, np.random.default_rng(seed))
    lo, hi = np.quantile(aucs, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def boot_aucs(hist: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """Bootstrap replicates of the AUC of one histogram pair (both classes present). Only the bins that
    hold a score take part (an empty bin is never drawn), so the draws cost what the scores do, not
    HIST_BINS."""
    hist = np.asarray(hist).reshape(2, HIST_BINS)
    hist = hist[:, hist.sum(axis=0) > 0]
    n0, n1 = int(hist[0].sum()), int(hist[1].sum())
    b0 = rng.multinomial(n0, hist[0] / n0, size=n_boot)
    b1 = rng.multinomial(n1, hist[1] / n1, size=n_boot)
    # AUC of binned scores = P(s1 > s0) + 0.5 P(s1 == s0), from cumulative counts (ties within a bin = half).
    below = np.cumsum(b0, axis=1) - b0  # negatives strictly below each bin
    return (b1 * (below + 0.5 * b0)).sum(axis=1) / (n0 * n1)


def prognosis_summary(
    cm: np.ndarray, hist: np.ndarray, n_boot: int = 1000, seed: int = 0, auc: float | None = None
) -> dict[str, float]:
    """Confusion metrics, the AUC and its bootstrap interval. ``auc``: the exact AUC a site sent for its
    split (None: not known, e.g. a pooled histogram or an older store; the histogram's AUC is used)."""
    out = binary_metrics(cm)
    out["auc"] = auc_from_hist(hist) if auc is None else float(auc)
    out["auc_lo"], out["auc_hi"] = auc_ci(hist, n_boot=n_boot, seed=seed)
    return out


DEFAULT_THRESHOLD_BIN = HIST_BINS // 2  # P(SEVERE) >= 0.5, i.e. the argmax of the two logits


def edge_p(k: int) -> float:
    """The P(SEVERE) cut-off of threshold bin ``k`` (scores in bins >= k are called SEVERE): the logistic of
    edge k; 0 and 1 at the open ends."""
    if k <= 0:
        return 0.0
    if k >= HIST_BINS:
        return 1.0
    return float(1.0 / (1.0 + math.exp(-LOGIT_EDGES[k])))


def edge_bin(p: float) -> int:
    """The threshold bin whose edge is nearest to the P(SEVERE) cut-off ``p`` (the inverse of edge_p)."""
    if p <= 0:
        return 0
    if p >= 1:
        return HIST_BINS
    z = float(score_logits(np.asarray(p)))
    return int(np.clip(round(z / BIN_WIDTH) + HIST_BINS // 2, 1, HIST_BINS - 1))


def cm_at_bin(hist: np.ndarray, k: int) -> np.ndarray:
    """The 2x2 confusion [true, pred] when scores in bins >= k are called SEVERE (cut-off edge_p(k))."""
    hist = np.asarray(hist).reshape(2, HIST_BINS)
    return np.array([[hist[0, :k].sum(), hist[0, k:].sum()], [hist[1, :k].sum(), hist[1, k:].sum()]], dtype=np.int64)


def youden_bin(hist: np.ndarray) -> int:
    """The threshold bin that maximises Youden's J = TPR - FPR on a validation histogram; ties go to the
    bin nearest 0.5, and an empty class keeps the default threshold."""
    hist = np.asarray(hist).reshape(2, HIST_BINS)
    n0, n1 = hist[0].sum(), hist[1].sum()
    if n0 == 0 or n1 == 0:
        return DEFAULT_THRESHOLD_BIN
    at_or_above = np.zeros((2, HIST_BINS + 1))
    at_or_above[:, :-1] = np.cumsum(hist[:, ::-1], axis=1)[:, ::-1]
    j = at_or_above[1] / n1 - at_or_above[0] / n0  # J of every threshold bin 0..HIST_BINS
    best = np.flatnonzero(np.isclose(j, j.max()))
    return int(best[np.argmin(np.abs(best - DEFAULT_THRESHOLD_BIN))])


def threshold_bin(rule: str, val_hist: np.ndarray | None) -> int:
    """``val``: Youden's J on the validation histogram; a number in (0, 1): the bin edge nearest that
    fixed P(SEVERE) cut-off."""
    if rule == "val":
        return youden_bin(val_hist) if val_hist is not None else DEFAULT_THRESHOLD_BIN
    return edge_bin(float(rule))
