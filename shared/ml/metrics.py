"""Metrics from the sufficient statistics that sites send: confusion counts and score histograms.

Sites never send per-sample predictions. ROC and AUC come from the per-class histograms of predicted
P(SEVERE) (scikit-learn with sample weights); confusion-derived metrics from the counts.
"""

from __future__ import annotations

import math
import warnings

import numpy as np

HIST_BINS = 200  # per-class histograms of predicted P(SEVERE) that sites send instead of per-sample scores

BIN_CENTRES = (np.arange(HIST_BINS) + 0.5) / HIST_BINS


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
    n0, n1 = int(hist[0].sum()), int(hist[1].sum())
    if n0 == 0 or n1 == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    p0, p1 = hist[0] / n0, hist[1] / n1
    b0 = rng.multinomial(n0, p0, size=n_boot)
    b1 = rng.multinomial(n1, p1, size=n_boot)
    # AUC of binned scores = P(s1 > s0) + 0.5 P(s1 == s0), from cumulative counts (ties within a bin = half).
    c0 = np.cumsum(b0, axis=1) - b0  # negatives strictly below each bin
    aucs = ((b1 * (c0 + 0.5 * b0)).sum(axis=1)) / (n0 * n1)
    lo, hi = np.quantile(aucs, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def prognosis_summary(cm: np.ndarray, hist: np.ndarray, n_boot: int = 1000, seed: int = 0) -> dict[str, float]:
    out = binary_metrics(cm)
    out["auc"] = auc_from_hist(hist)
    out["auc_lo"], out["auc_hi"] = auc_ci(hist, n_boot=n_boot, seed=seed)
    return out


DEFAULT_THRESHOLD_BIN = HIST_BINS // 2  # P(SEVERE) >= 0.5, i.e. the argmax of the two logits


def cm_at_bin(hist: np.ndarray, k: int) -> np.ndarray:
    """The 2x2 confusion [true, pred] when scores in bins >= k are called SEVERE (threshold k / HIST_BINS)."""
    hist = np.asarray(hist).reshape(2, HIST_BINS)
    return np.array([[hist[0, :k].sum(), hist[0, k:].sum()], [hist[1, :k].sum(), hist[1, k:].sum()]], dtype=np.int64)


def youden_bin(hist: np.ndarray) -> int:
    """The threshold bin that maximises Youden's J = TPR - FPR on a validation histogram; ties go to the
    bin nearest 0.5, and an empty class keeps the default threshold."""
    hist = np.asarray(hist).reshape(2, HIST_BINS)
    n0, n1 = hist[0].sum(), hist[1].sum()
    if n0 == 0 or n1 == 0:
        return DEFAULT_THRESHOLD_BIN
    ks = np.arange(HIST_BINS + 1)
    tpr = np.array([hist[1, k:].sum() for k in ks]) / n1
    fpr = np.array([hist[0, k:].sum() for k in ks]) / n0
    j = tpr - fpr
    best = np.flatnonzero(np.isclose(j, j.max()))
    return int(best[np.argmin(np.abs(best - DEFAULT_THRESHOLD_BIN))])


def threshold_bin(rule: str, val_hist: np.ndarray | None) -> int:
    """``val``: Youden's J on the validation histogram; a number in (0, 1): that fixed threshold."""
    if rule == "val":
        return youden_bin(val_hist) if val_hist is not None else DEFAULT_THRESHOLD_BIN
    return int(round(float(rule) * HIST_BINS))
