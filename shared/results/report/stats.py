"""Statistics over backbones: the bootstrap interval of a mean AUC and the paired one-tailed tests of MDMT
against its baselines."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import stats

from mdmt.ml.metrics import HIST_BINS, boot_aucs
from mdmt.results.report.records import sort_rows

TESTED_METRICS = ("acc", "f1", "gmean", "gmean_weighted", "auc")  # the per-backbone values the paired tests compare
TREATMENT = "mdmt"
BASELINES = ("stl_prognosis", "ft")
SUMMARIES = {  # how a backbone's metric is summarised over folds -> (column suffix, one-sided H1 of MDMT - baseline)
    "pooled": ("", "greater"),
    "fold mean": ("_fold_mean", "greater"),
    "fold std": ("_fold_std", "less"),
}


# ---- bootstrap intervals -------------------------------------------------------------------------------
def mean_auc_ci(
    hists: Sequence[np.ndarray], weights: Sequence[float], n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Bootstrap interval of a weighted mean of AUCs: every histogram pair resampled (stratified by class)
    in each replicate. With one histogram it equals mdmt.ml.metrics.auc_ci."""
    hists = [np.asarray(h).reshape(2, HIST_BINS) for h in hists]
    if not hists or any(h[0].sum() == 0 or h[1].sum() == 0 for h in hists):
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    w = np.asarray(weights, dtype=float) / np.sum(weights)
    reps = sum(wi * boot_aucs(h, n_boot, rng) for wi, h in zip(w, hists))
    lo, hi = np.quantile(reps, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def mean_auc_interval(backbones: pd.DataFrame, n_boot: int, seed: int) -> tuple[float, float]:
    """mean_auc_ci over one method's backbone rows, each backbone weighted equally across its seeds."""
    if backbones["hist"].isna().any():  # 'local' rows are means of models: no pooled histogram
        return float("nan"), float("nan")
    weights = 1.0 / backbones.groupby("backbone")["seed"].transform("size")
    return mean_auc_ci(list(backbones["hist"]), list(weights), n_boot=n_boot, seed=seed)


# ---- paired tests --------------------------------------------------------------------------------------
def stars(p: float) -> str:
    if p is None or not np.isfinite(p):
        return ""
    return "***" if p < 0.001 else "**" if p < 0.01 else "*" if p < 0.05 else ""


def paired_test(a: Sequence[float], b: Sequence[float], alternative: str) -> dict:
    """One-tailed paired t-test and Wilcoxon signed-rank test of a against b (H1: a - b is ``alternative``,
    'greater' or 'less'). Pairs with a missing value are dropped; too few or all-zero differences give a note
    instead of a test."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    keep = np.isfinite(a) & np.isfinite(b)
    a, b = a[keep], b[keep]
    d = a - b
    out = {
        "n": int(len(d)),
        "mean_a": float(np.mean(a)) if len(a) else np.nan,
        "mean_b": float(np.mean(b)) if len(b) else np.nan,
        "t": np.nan,
        "t_p": np.nan,
        "w": np.nan,
        "w_p": np.nan,
        "note": "",
    }
    if len(d) < 2:
        dropped = int((~keep).sum())
        out["note"] = f"not tested: {len(d)} pair(s), at least 2 needed" + (
            f" ({dropped} without a value, e.g. a std over one fold)" if dropped else ""
        )
        return out
    if np.allclose(d, 0.0, rtol=0.0, atol=1e-12):
        out["note"] = "not tested: every difference is zero"
        return out
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # small samples: scipy notes its switch to the normal approximation
        if np.ptp(d) > 1e-12:
            t = stats.ttest_rel(a, b, alternative=alternative)
            out["t"], out["t_p"] = float(t.statistic), float(t.pvalue)
        else:
            out["note"] = "t-test undefined: every difference is the same"
        w = stats.wilcoxon(a, b, alternative=alternative)
        out["w"], out["w_p"] = float(w.statistic), float(w.pvalue)
    return out


def compare_methods(
    backbones: pd.DataFrame, treatment: str = TREATMENT, baselines: Sequence[str] = BASELINES
) -> pd.DataFrame:
    """MDMT vs each baseline, paired across backbones (seeds averaged), per protocol, metric and summary."""
    cols = [f"{m}{suffix}" for m in TESTED_METRICS for suffix, _ in SUMMARIES.values()]
    per_backbone = backbones.groupby(["protocol", "method", "backbone"], as_index=False)[cols].mean()
    rows = []
    for protocol in sort_rows(per_backbone[["protocol"]].drop_duplicates(), ["protocol"])["protocol"]:
        here = per_backbone[per_backbone["protocol"] == protocol]
        for base in baselines:
            head = {"protocol": protocol, "comparison": f"{treatment} vs {base}"}
            missing = [m for m in (treatment, base) if m not in set(here["method"])]
            if missing:
                rows.append(
                    {
                        **head,
                        "metric": "-",
                        "summary": "-",
                        "alternative": "-",
                        "n": 0,
                        "note": f"not tested: no {' or '.join(missing)} results",
                    }
                )
                continue
            pairs = here[here["method"] == treatment].merge(
                here[here["method"] == base], on="backbone", suffixes=("_a", "_b")
            )
            for summary, (suffix, alternative) in SUMMARIES.items():
                for metric in TESTED_METRICS:
                    col = f"{metric}{suffix}"
                    res = paired_test(pairs[f"{col}_a"], pairs[f"{col}_b"], alternative)
                    rows.append(
                        {
                            **head,
                            "metric": metric,
                            "summary": summary,
                            "alternative": alternative,
                            **res,
                            "t_stars": stars(res["t_p"]),
                            "w_stars": stars(res["w_p"]),
                        }
                    )
    cols = [
        "protocol",
        "comparison",
        "metric",
        "summary",
        "alternative",
        "n",
        "mean_a",
        "mean_b",
        "t",
        "t_p",
        "t_stars",
        "w",
        "w_p",
        "w_stars",
        "note",
    ]
    return pd.DataFrame(rows, columns=cols)
