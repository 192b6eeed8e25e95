"""The oracle ceiling: the best ACC/AUC of a predictor that reads the exact global score but not the hidden factor."""

from __future__ import annotations

import numpy as np

from mdmt.data.synth.model import HIDDEN_WEIGHT, SEVERE_SLOPE, global_prior, p_severe, p_severe_given_g
from mdmt.seeding import derive_seed

CEILING_MC_SAMPLES = 200_000
#: The documented range the oracle AUC (model, exact) must fall in.
CEILING_AUC_RANGE = (0.75, 0.85)


def _auc(score: np.ndarray, y: np.ndarray) -> float:
    """Mann-Whitney AUC with ties counted half."""
    from scipy.stats import rankdata  # deferred: scipy.stats (slow to import; only the ceiling needs it)

    y = np.asarray(y, bool)
    n1, n0 = int(y.sum()), int((~y).sum())
    if n1 == 0 or n0 == 0:
        return float("nan")
    r = rankdata(score)
    return float((r[y].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def _best_threshold_acc(score: np.ndarray, y: np.ndarray) -> float:
    y = np.asarray(y, bool)
    best = 0.0
    for t in np.unique(score):
        for pred in (score >= t, score > t):
            best = max(best, float((pred == y).mean()))
    return best


def oracle_ceiling(seed: int = 0, n_mc: int = CEILING_MC_SAMPLES) -> dict:
    """Best ACC/AUC of an oracle that reads the exact global score G but not the hidden factor.

    ``exact``: from the model's joint distribution of (G, label); ``mc``: n_mc Monte Carlo patients.
    """
    prior = global_prior()
    pg = p_severe_given_g()
    acc = float((prior * np.maximum(pg, 1 - pg)).sum())
    ps, pm = prior * pg, prior * (1 - pg)
    ps_n, pm_n = ps / ps.sum(), pm / pm.sum()
    cm = np.cumsum(pm_n)  # P(G_mild <= g)
    below = np.concatenate([[0.0], cm[:-1]])
    auc = float((ps_n * (below + 0.5 * pm_n)).sum())
    rng = np.random.default_rng(derive_seed(seed, "synth", "ceiling"))
    g = rng.choice(19, size=n_mc, p=prior)
    h = rng.standard_normal(n_mc)
    y = rng.random(n_mc) < p_severe(g, h)
    bayes = pg[g] > 0.5
    return {
        "exact": {"acc": round(acc, 4), "auc": round(auc, 4), "severe_share": round(float(ps.sum()), 4)},
        "mc": {
            "n": int(n_mc),
            "acc_bayes": round(float((bayes == y).mean()), 4),
            "auc": round(_auc(g, y), 4),
            "severe_share": round(float(y.mean()), 4),
        },
        "hidden_known": {"auc": round(_auc(SEVERE_SLOPE * g + HIDDEN_WEIGHT * h, y), 4)},
    }


def generated_ceiling(g: np.ndarray, y: np.ndarray) -> dict:
    pg = p_severe_given_g()
    return {
        "n": int(len(y)),
        "auc": round(_auc(g, y), 4),
        "acc_bayes": round(float(((pg[g] > 0.5) == y).mean()), 4) if len(y) else float("nan"),
        "acc_best_threshold": round(_best_threshold_acc(g, y), 4) if len(y) else float("nan"),
    }
