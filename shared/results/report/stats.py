"""Statistics over backbones: the bootstrap interval of a mean AUC, effect sizes with their intervals (t and
a cluster bootstrap over backbones) and the paired one-tailed tests of MDMT against its baselines."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from scipy import stats

from mdmt.ml.metrics import HIST_BINS, boot_aucs
from mdmt.results.report.records import LOCAL, sort_rows

TESTED_METRICS = ("acc", "f1", "gmean", "gmean_weighted", "auc")  # the per-backbone values the paired tests compare
TREATMENT = "mdmt"
BASELINES = ("stl_prognosis", "ft")
COMPARISONS = {  # name -> (method A, method B, one-sided H1 of A - B for the pooled metric and the fold mean)
    "mdmt vs stl_prognosis": (TREATMENT, "stl_prognosis", "greater"),
    "mdmt vs ft": (TREATMENT, "ft", "greater"),
    "federated vs centralised": (TREATMENT, "centralised_mdmt", "less"),  # federation costs something
    "federated vs local": (TREATMENT, LOCAL, "greater"),
}
SPREAD_COMPARED = ("mdmt vs stl_prognosis", "mdmt vs ft")  # the comparisons that also test the fold std
LEVELS = ("pairs", "backbones")
SUMMARIES = {  # how a backbone's metric is summarised over folds -> (column suffix, H1 of MDMT - STL/FT)
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


# ---- effect sizes --------------------------------------------------------------------------------------
def mean_diff_ci(d: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """Two-sided t-interval of the mean of paired differences ``d`` (n - 1 degrees of freedom); an interval
    of zero width when every difference is the same; NaN below 2 differences."""
    d = np.asarray(d, dtype=float)
    if len(d) < 2:
        return float("nan"), float("nan")
    mean, sem = float(np.mean(d)), float(stats.sem(d))
    if sem == 0.0:
        return mean, mean
    lo, hi = stats.t.interval(level, len(d) - 1, loc=mean, scale=sem)
    return float(lo), float(hi)


def cluster_bootstrap_ci(
    d: Sequence[float], clusters: Sequence, n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``d`` resampling whole clusters (backbones) with
    replacement: each drawn cluster brings all its differences (its seeds), so differences within a cluster
    are never treated as independent. With one cluster every replicate is that cluster's mean."""
    d = np.asarray(d, dtype=float)
    if len(d) < 2 or n_boot < 1:
        return float("nan"), float("nan")
    labels, idx = np.unique(np.asarray(clusters, dtype=str), return_inverse=True)
    sums = np.bincount(idx, weights=d, minlength=len(labels))
    sizes = np.bincount(idx, minlength=len(labels)).astype(float)
    rng = np.random.default_rng(seed)
    draws = rng.multinomial(len(labels), np.full(len(labels), 1.0 / len(labels)), size=n_boot)
    reps = (draws @ sums) / (draws @ sizes)
    lo, hi = np.quantile(reps, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def effect_size(d: Sequence[float]) -> float:
    """Standardised mean difference of paired values: dz = mean(d) / sd(d), ddof 1 (NaN if undefined)."""
    d = np.asarray(d, dtype=float)
    if len(d) < 2:
        return float("nan")
    sd = float(np.std(d, ddof=1))
    return float(np.mean(d) / sd) if sd > 0 else float("nan")


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


COLUMNS = [
    "protocol",
    "comparison",
    "method_a",
    "method_b",
    "metric",
    "summary",
    "alternative",
    "level",
    "n",
    "mean_a",
    "mean_b",
    "diff",
    "diff_lo",
    "diff_hi",
    "boot_lo",
    "boot_hi",
    "dz",
    "t",
    "t_p",
    "t_stars",
    "w",
    "w_p",
    "w_stars",
    "note",
]


def _level_row(a: np.ndarray, b: np.ndarray, alternative: str, clusters=None, n_boot: int = 0, seed: int = 0) -> dict:
    """paired_test of one level plus the mean difference a - b, its t-interval, dz and (given ``clusters``)
    the cluster bootstrap interval."""
    res = paired_test(a, b, alternative)
    keep = np.isfinite(a) & np.isfinite(b)
    d = (a - b)[keep]
    lo, hi = mean_diff_ci(d)
    boot = (
        cluster_bootstrap_ci(d, np.asarray(clusters)[keep], n_boot, seed) if clusters is not None else (np.nan, np.nan)
    )
    return {
        **res,
        "diff": float(np.mean(d)) if len(d) else np.nan,
        "diff_lo": lo,
        "diff_hi": hi,
        "boot_lo": boot[0],
        "boot_hi": boot[1],
        "dz": effect_size(d),
        "t_stars": stars(res["t_p"]),
        "w_stars": stars(res["w_p"]),
    }


def compare_methods(
    backbones: pd.DataFrame,
    comparisons: Mapping[str, tuple[str, str, str]] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> pd.DataFrame:
    """Each comparison (name -> (method A, method B, one-sided H1 of A - B); default COMPARISONS) per
    protocol, metric and summary, at two levels of pairing: 'pairs' (one pair per backbone and seed that
    both methods have) and 'backbones' (each backbone's pairs averaged first). Every row carries the mean
    difference A - B with its t-interval and dz; 'pairs' rows also a cluster bootstrap interval that
    resamples backbones (``n_boot`` replicates, ``seed``)."""
    comparisons = COMPARISONS if comparisons is None else comparisons
    cols = [f"{m}{suffix}" for m in TESTED_METRICS for suffix, _ in SUMMARIES.values()]
    rows = []
    for protocol in sort_rows(backbones[["protocol"]].drop_duplicates(), ["protocol"])["protocol"]:
        here = backbones[backbones["protocol"] == protocol]
        for name, (method_a, method_b, h1) in comparisons.items():
            head = {"protocol": protocol, "comparison": name, "method_a": method_a, "method_b": method_b}
            missing = [m for m in (method_a, method_b) if m not in set(here["method"])]
            if missing:
                rows.append(
                    {
                        **head,
                        **dict.fromkeys(("metric", "summary", "alternative", "level"), "-"),
                        "n": 0,
                        "note": f"not tested: no {' or '.join(missing)} results",
                    }
                )
                continue
            # a model with fewer folds done than its method's others (a sitting stopped mid-grid) is not paired
            folds = here["n_folds"] if "n_folds" in here else pd.Series(1, here.index)
            whole = here.assign(whole=folds == folds.groupby(here["method"]).transform("max"))
            keys = ["backbone", "seed", "whole"]
            pairs = whole[whole["method"] == method_a][keys + cols].merge(
                whole[whole["method"] == method_b][keys + cols], on=["backbone", "seed"], suffixes=("_a", "_b")
            )
            part = ~(pairs["whole_a"] & pairs["whole_b"])
            pairs = pairs[~part].reset_index(drop=True)
            left_out = f"{int(part.sum())} pair(s) left out: a model with folds still to run" * bool(part.any())
            for summary, (suffix, spread_h1) in SUMMARIES.items():
                if suffix == "_fold_std" and name not in SPREAD_COMPARED:
                    continue
                alternative = spread_h1 if suffix == "_fold_std" else h1
                for metric in TESTED_METRICS:
                    col = f"{metric}{suffix}"
                    a, b = pairs[f"{col}_a"].to_numpy(float), pairs[f"{col}_b"].to_numpy(float)
                    both = np.isfinite(a) & np.isfinite(b)
                    # backbones: the mean of each backbone's complete pairs (NaN where it has none)
                    per_bb = (
                        pd.DataFrame(
                            {
                                "backbone": pairs["backbone"],
                                "a": np.where(both, a, np.nan),
                                "b": np.where(both, b, np.nan),
                            }
                        )
                        .groupby("backbone", sort=True)[["a", "b"]]
                        .mean()
                    )
                    base = {**head, "metric": metric, "summary": summary, "alternative": alternative}
                    by_backbone = _level_row(per_bb["a"].to_numpy(float), per_bb["b"].to_numpy(float), alternative)
                    for level, row in (
                        ("pairs", _level_row(a, b, alternative, pairs["backbone"], n_boot, seed)),
                        ("backbones", by_backbone),
                    ):
                        note = "; ".join(x for x in (row["note"], left_out) if x)
                        rows.append({**base, "level": level, **row, "note": note})
    return pd.DataFrame(rows, columns=COLUMNS)


GAP_COMPARISONS = ("federated vs centralised", "federated vs local")
GAP_METRICS = ("acc", "gmean", "gmean_weighted", "auc")
GAP_COLUMNS = [
    c for c in COLUMNS if c in ("protocol", "comparison", "metric", "n") or c.startswith(("mean_", "diff", "boot_"))
] + ["note"]


def gap_table(tests: pd.DataFrame) -> pd.DataFrame:
    """The price of federation: from compare_methods' rows, MDMT minus centralised MDMT and MDMT minus the
    single-site models on the pooled metric at the 'pairs' level (difference, t-interval, cluster bootstrap
    interval, number of pairs); a comparison without results keeps its note row."""
    rows = tests[tests["comparison"].isin(GAP_COMPARISONS)]
    keep = (rows["level"] == "-") | (
        (rows["level"] == "pairs") & (rows["summary"] == "pooled") & rows["metric"].isin(GAP_METRICS)
    )
    return rows.loc[keep, GAP_COLUMNS].reset_index(drop=True)
