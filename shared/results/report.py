"""Result tables, statistics and plots from the run store.

``loco_table`` / ``write_loco_report``: the LOCO table per held-out centre with its mean and pooled rows.
``write_report``: every table of the paper's analysis (per fold, centre, backbone and method, for each
protocol), the severity results, the paired tests of MDMT against its baselines, and PNG plots.
docs/report.md describes each output file and how its numbers are computed.
"""

from __future__ import annotations

import json
import math
import sqlite3
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd
from scipy import stats

from mdmt.errors import DataError, MDMTError
from mdmt.ml.methods import METHODS, PROGNOSIS, SEVERITY
from mdmt.ml.metrics import HIST_BINS, auc_from_hist, cm_at_bin, multiclass_metrics, prognosis_summary, roc_from_hist, threshold_bin
from mdmt.store import RunStore

TABLE_METRICS = ("threshold", "n", "acc", "f1", "gmean", "gmean_weighted", "auc", "auc_lo", "auc_hi", "sensitivity", "specificity")
SUMMARY_METRICS = ("n", "acc", "f1", "gmean", "gmean_weighted", "auc", "auc_lo", "auc_hi", "sensitivity", "specificity")
TESTED_METRICS = ("acc", "f1", "gmean", "gmean_weighted", "auc")  # the per-backbone values the paired tests compare
PERCENT_METRICS = ("acc", "f1", "gmean", "gmean_weighted", "sensitivity", "specificity")

LOCAL_PREFIX = "local:"  # local:<SITE>: one model trained on that site alone
LOCAL = "local"  # the method name that groups the site models in method tables
METHOD_ORDER = ("stl_prognosis", "stl_severity", "ft", "mdmt", "centralised_mdmt", LOCAL)
PROTOCOL_ORDER = ("loco", "cv")
PROTOCOL_TITLES = {"loco": "leave-one-centre-out", "cv": "k-fold cross-validation"}

TREATMENT = "mdmt"
BASELINES = ("stl_prognosis", "ft")
SUMMARIES = {  # how a backbone's metric is summarised over folds -> (column suffix, one-sided H1 of MDMT - baseline)
    "pooled": ("", "greater"),
    "fold mean": ("_fold_mean", "greater"),
    "fold std": ("_fold_std", "less"),
}


# ---- reading the store ---------------------------------------------------------------------------------
def finished_units(store: RunStore) -> list[sqlite3.Row]:
    """Units that count in a report: status 'done' with a selected round."""
    try:
        units = store.units()
    except sqlite3.Error as exc:
        raise DataError(f"{store.path}: not a readable run store ({exc})") from None
    return [u for u in units if u["status"] == "done" and u["best_round"] is not None]


def method_group(method: str) -> str:
    """The method a unit counts under in method tables: every local:<SITE> model is 'local'."""
    return LOCAL if method.startswith(LOCAL_PREFIX) else method


def _trains(method: str, task: str) -> bool | None:
    """Does a registered method train ``task``? None for methods outside the registry (ft, local:<SITE>)."""
    m = METHODS.get(method)
    return None if m is None else task in m.tasks


def _hist(row: sqlite3.Row) -> np.ndarray:
    return np.asarray(json.loads(row["hist"]), dtype=np.int64).reshape(2, HIST_BINS)


def _threshold_rule(unit: sqlite3.Row) -> str:
    try:
        rule = str(json.loads(unit["config"] or "{}").get("threshold", "val"))
    except json.JSONDecodeError:
        raise DataError(f"unit {unit['unit_id']}: its config column is not JSON; re-run the unit") from None
    if rule != "val":
        try:
            ok = 0.0 < float(rule) < 1.0
        except ValueError:
            ok = False
        if not ok:
            raise DataError(f"unit {unit['unit_id']}: config 'threshold' = {rule!r}; use 'val' or a number in (0, 1)")
    return rule


def unit_prognosis(store: RunStore, unit: sqlite3.Row) -> tuple[int, list[tuple[str, np.ndarray]]]:
    """A unit's decision threshold bin and its scored prognosis histograms at the selected round.

    The threshold comes from the pooled validation histograms of the unit's training sites (or the config's
    fixed value). Scored: under LOCO the held-out centre; under CV every site's test split.
    """
    rows = [r for r in store.eval_stats(unit["unit_id"], unit["best_round"])
            if r["task"] == PROGNOSIS and r["hist"] is not None]
    train_sites = set((unit["train_sites"] or "").split(","))
    val = [_hist(r) for r in rows if r["site"] in train_sites and r["split"] == "val"]
    k = threshold_bin(_threshold_rule(unit), sum(val) if val else None)
    if unit["protocol"] == "loco":
        scored = [(r["site"], _hist(r)) for r in rows if r["site"] == unit["fold"]][:1]
    elif unit["protocol"] == "cv":
        scored = [(r["site"], _hist(r)) for r in rows if r["split"] == "test"]
    else:
        scored = []
    return k, scored


def prognosis_records(store: RunStore, units: Iterable[sqlite3.Row]) -> pd.DataFrame:
    """One row per (unit, scored site): the site's histogram and its confusion counts at the unit's threshold."""
    rows = []
    for u in units:
        if _trains(u["method"], PROGNOSIS) is False:
            continue
        k, scored = unit_prognosis(store, u)
        for site, hist in scored:
            rows.append({"protocol": u["protocol"], "method": u["method"], "backbone": u["backbone"], "seed": u["seed"],
                         "fold": u["fold"], "round": u["best_round"], "site": site, "threshold": k / HIST_BINS,
                         "cm": cm_at_bin(hist, k), "hist": hist})
    cols = ["protocol", "method", "backbone", "seed", "fold", "round", "site", "threshold", "cm", "hist"]
    return pd.DataFrame(rows, columns=cols)


# ---- prognosis tables ----------------------------------------------------------------------------------
def summarise(records: pd.DataFrame, keys: Sequence[str], n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Per group of ``keys``: metrics on the group's pooled predictions (summed confusion counts, each at its
    own fold's threshold, and summed histograms), with the AUC's bootstrap interval. Keeps the pooled
    histogram in column 'hist'."""
    rows = []
    for key, grp in records.groupby(list(keys), sort=False):
        cm, hist = np.sum(np.stack(grp["cm"]), axis=0), np.sum(np.stack(grp["hist"]), axis=0)
        m = prognosis_summary(cm, hist, n_boot=n_boot, seed=seed)
        rows.append({**dict(zip(keys, key)), "n_folds": grp["fold"].nunique(),
                     **{c: m[c] for c in SUMMARY_METRICS}, "hist": hist})
    return pd.DataFrame(rows, columns=[*keys, "n_folds", *SUMMARY_METRICS, "hist"])


def group_local(df: pd.DataFrame, keys: Sequence[str]) -> pd.DataFrame:
    """Replace the local:<SITE> rows by one 'local' row per group of ``keys`` (which include 'method'): the
    mean of each metric over the site models. A mean of models has no pooled histogram, so no AUC interval."""
    local = df["method"].str.startswith(LOCAL_PREFIX)
    if not local.any():
        return df
    first = {"n", "n_folds", "round"}
    cols = [c for c in df.columns if c not in keys and c not in ("hist", "cm", "auc_lo", "auc_hi")
            and pd.api.types.is_numeric_dtype(df[c])]
    means = (df[local].assign(method=LOCAL)
             .groupby(list(keys), as_index=False, sort=False)
             .agg(**{c: (c, "max" if c in first else "mean") for c in cols},
                  site_models=("method", "size")))
    means["auc_lo"] = means["auc_hi"] = np.nan
    return pd.concat([df[~local], means], ignore_index=True)


def sort_rows(df: pd.DataFrame, keys: Sequence[str]) -> pd.DataFrame:
    """Protocols and methods in their reading order (unknown names after the known ones), the rest by name."""
    def order(col: pd.Series) -> pd.Series:
        if col.name == "method":
            known = {m: i for i, m in enumerate(METHOD_ORDER)}
            return col.map(lambda m: (known.get(method_group(m), len(known)), m))
        if col.name == "protocol":
            return col.map(lambda p: (PROTOCOL_ORDER.index(p) if p in PROTOCOL_ORDER else len(PROTOCOL_ORDER), p))
        return col if pd.api.types.is_numeric_dtype(col) else col.map(str)

    present = [k for k in keys if k in df.columns]
    return df.sort_values(present, key=order, kind="stable").reset_index(drop=True) if present else df


def fold_spread(folds: pd.DataFrame) -> pd.DataFrame:
    """Per (protocol, method, backbone, seed): mean and sample std (ddof 1) over folds of each tested metric."""
    keys = ["protocol", "method", "backbone", "seed"]
    agg = {f"{m}_fold_{how}": (m, how) for m in TESTED_METRICS for how in ("mean", "std")}
    return folds.groupby(keys, as_index=False, sort=False).agg(**agg)


def mean_over_backbones(df: pd.DataFrame, keys: Sequence[str], cols: Sequence[str]) -> pd.DataFrame:
    """Mean of ``cols`` over seeds within each backbone, then over backbones; 'n_backbones' counts them."""
    per_backbone = df.groupby([*keys, "backbone"], as_index=False, sort=False)[list(cols)].mean()
    out = per_backbone.groupby(list(keys), as_index=False, sort=False)[list(cols)].mean()
    counts = per_backbone.groupby(list(keys), as_index=False, sort=False).size().rename(columns={"size": "n_backbones"})
    return counts.merge(out, on=list(keys))


def _boot_aucs(hist: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """Bootstrap replicates of the AUC of one histogram pair, drawn as mdmt.ml.metrics.auc_ci draws them."""
    hist = np.asarray(hist).reshape(2, HIST_BINS)
    n0, n1 = int(hist[0].sum()), int(hist[1].sum())
    b0 = rng.multinomial(n0, hist[0] / n0, size=n_boot)
    b1 = rng.multinomial(n1, hist[1] / n1, size=n_boot)
    below = np.cumsum(b0, axis=1) - b0
    return (b1 * (below + 0.5 * b0)).sum(axis=1) / (n0 * n1)


def mean_auc_ci(hists: Sequence[np.ndarray], weights: Sequence[float], n_boot: int = 1000, seed: int = 0,
                level: float = 0.95) -> tuple[float, float]:
    """Bootstrap interval of a weighted mean of AUCs: every histogram pair resampled (stratified by class)
    in each replicate. With one histogram it equals mdmt.ml.metrics.auc_ci."""
    hists = [np.asarray(h).reshape(2, HIST_BINS) for h in hists]
    if not hists or any(h[0].sum() == 0 or h[1].sum() == 0 for h in hists):
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    w = np.asarray(weights, dtype=float) / np.sum(weights)
    reps = sum(wi * _boot_aucs(h, n_boot, rng) for wi, h in zip(w, hists))
    lo, hi = np.quantile(reps, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def _mean_auc_interval(backbones: pd.DataFrame, n_boot: int, seed: int) -> tuple[float, float]:
    """mean_auc_ci over one method's backbone rows, each backbone weighted equally across its seeds."""
    if backbones["hist"].isna().any():  # 'local' rows are means of models: no pooled histogram
        return float("nan"), float("nan")
    weights = 1.0 / backbones.groupby("backbone")["seed"].transform("size")
    return mean_auc_ci(list(backbones["hist"]), list(weights), n_boot=n_boot, seed=seed)


def method_table(backbones: pd.DataFrame, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """The paper's table: per (protocol, method) the mean over backbones of the metrics on each backbone's
    pooled predictions; AUC interval: bootstrap of that mean from the backbones' pooled histograms."""
    cols = [c for c in SUMMARY_METRICS if c not in ("auc_lo", "auc_hi")]
    out = mean_over_backbones(backbones, ["protocol", "method"], cols)
    intervals = pd.DataFrame([(protocol, method, *_mean_auc_interval(grp, n_boot, seed))
                              for (protocol, method), grp in backbones.groupby(["protocol", "method"], sort=False)],
                             columns=["protocol", "method", "auc_lo", "auc_hi"])
    out = out.merge(intervals, on=["protocol", "method"])
    out["n"] = out["n"].round().astype(int)
    return sort_rows(out[["protocol", "method", "n_backbones", *SUMMARY_METRICS]], ["protocol", "method"])


@dataclass
class PrognosisTables:
    folds: pd.DataFrame  # per (method, backbone, seed, fold); local grouped
    local_sites: pd.DataFrame  # per (local:<SITE>, backbone, seed, fold)
    centres: pd.DataFrame  # per (method, centre): mean over backbones
    backbones: pd.DataFrame  # per (method, backbone, seed): pooled over folds + fold mean/std
    methods: pd.DataFrame  # per method: mean over backbones of the pooled metrics


def prognosis_tables(records: pd.DataFrame, n_boot: int = 1000, seed: int = 0) -> PrognosisTables:
    """Every prognosis table of one or more protocols from ``prognosis_records``."""
    unit = ["protocol", "method", "backbone", "seed", "fold"]
    raw_folds = summarise(records, unit, n_boot, seed)
    firsts = records.groupby(unit, as_index=False, sort=False)[["round", "threshold"]].first()
    raw_folds = raw_folds.merge(firsts, on=unit)
    folds = sort_rows(group_local(raw_folds, unit), unit)
    local_sites = sort_rows(raw_folds[raw_folds["method"].str.startswith(LOCAL_PREFIX)], unit)

    model = ["protocol", "method", "backbone", "seed"]
    pooled = group_local(summarise(records, model, n_boot, seed), model)
    backbones = sort_rows(pooled.merge(fold_spread(folds), on=model), model)

    per_site = group_local(summarise(records, [*model, "site"], n_boot, seed), [*model, "site"])
    centres = mean_over_backbones(per_site, ["protocol", "method", "site"],
                                  [c for c in SUMMARY_METRICS if c not in ("auc_lo", "auc_hi")])
    centres = sort_rows(centres.rename(columns={"site": "centre"}), ["protocol", "method", "centre"])
    return PrognosisTables(folds, local_sites, centres, backbones, method_table(backbones, n_boot, seed))


# ---- severity ------------------------------------------------------------------------------------------
def severity_table(store: RunStore, units: Iterable[sqlite3.Row]) -> pd.DataFrame:
    """Per unit that trains severity: accuracy and weighted F1 at the selected round on the severity sites'
    validation rows ('val') and on the consensus test set ('test'), confusion counts summed over sites."""
    rows = []
    for u in units:
        if not _trains(u["method"], SEVERITY):
            continue
        stats_rows = [r for r in store.eval_stats(u["unit_id"], u["best_round"]) if r["task"] == SEVERITY]
        row = {"protocol": u["protocol"], "method": u["method"], "backbone": u["backbone"], "seed": u["seed"],
               "fold": u["fold"], "round": u["best_round"]}
        for split in ("val", "test"):
            cms = [np.asarray(json.loads(r["cm"]), dtype=np.int64) for r in stats_rows if r["split"] == split]
            m = multiclass_metrics(sum(cms)) if cms else {"n": 0, "acc": np.nan, "f1": np.nan}
            row |= {f"{split}_n": m["n"], f"{split}_acc": m["acc"], f"{split}_f1": m["f1"]}
        row["sites"] = ",".join(sorted({r["site"] for r in stats_rows if r["split"] in ("val", "test")}))
        rows.append(row)
    cols = ["protocol", "method", "backbone", "seed", "fold", "round", "val_n", "val_acc", "val_f1",
            "test_n", "test_acc", "test_f1", "sites"]
    return sort_rows(pd.DataFrame(rows, columns=cols), ["protocol", "method", "backbone", "seed", "fold"])


def severity_summary(severity: pd.DataFrame) -> pd.DataFrame:
    """Per (protocol, method): mean over folds within each backbone, then over backbones."""
    cols = ["val_acc", "val_f1", "test_acc", "test_f1"]
    per_model = severity.groupby(["protocol", "method", "backbone", "seed"], as_index=False, sort=False)[cols].mean()
    return sort_rows(mean_over_backbones(per_model, ["protocol", "method"], cols), ["protocol", "method"])


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
    out = {"n": int(len(d)), "mean_a": float(np.mean(a)) if len(a) else np.nan,
           "mean_b": float(np.mean(b)) if len(b) else np.nan,
           "t": np.nan, "t_p": np.nan, "w": np.nan, "w_p": np.nan, "note": ""}
    if len(d) < 2:
        dropped = int((~keep).sum())
        out["note"] = (f"not tested: {len(d)} pair(s), at least 2 needed"
                       + (f" ({dropped} without a value, e.g. a std over one fold)" if dropped else ""))
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


def compare_methods(backbones: pd.DataFrame, treatment: str = TREATMENT,
                    baselines: Sequence[str] = BASELINES) -> pd.DataFrame:
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
                rows.append({**head, "metric": "-", "summary": "-", "alternative": "-", "n": 0,
                             "note": f"not tested: no {' or '.join(missing)} results"})
                continue
            pairs = here[here["method"] == treatment].merge(here[here["method"] == base], on="backbone",
                                                            suffixes=("_a", "_b"))
            for summary, (suffix, alternative) in SUMMARIES.items():
                for metric in TESTED_METRICS:
                    col = f"{metric}{suffix}"
                    res = paired_test(pairs[f"{col}_a"], pairs[f"{col}_b"], alternative)
                    rows.append({**head, "metric": metric, "summary": summary, "alternative": alternative, **res,
                                 "t_stars": stars(res["t_p"]), "w_stars": stars(res["w_p"])})
    cols = ["protocol", "comparison", "metric", "summary", "alternative", "n", "mean_a", "mean_b",
            "t", "t_p", "t_stars", "w", "w_p", "w_stars", "note"]
    return pd.DataFrame(rows, columns=cols)


# ---- plots ---------------------------------------------------------------------------------------------
def _ordered_methods(methods: pd.Series) -> list[str]:
    return sort_rows(pd.DataFrame({"method": pd.unique(methods)}), ["method"])["method"].tolist()


def _figure(width: float, height: float, ncols: int = 1, nrows: int = 1):
    from matplotlib.figure import Figure  # the Agg canvas; no pyplot state, no display needed

    fig = Figure(figsize=(width, height), layout="constrained")
    return fig, fig.subplots(nrows, ncols, squeeze=False).ravel()


def plot_roc(records: pd.DataFrame, title: str, path: Path) -> Path:
    """One ROC curve per method from its histograms pooled over backbones, seeds and folds."""
    fig, (ax,) = _figure(5.5, 5)
    groups = records["method"].map(method_group)
    for method in _ordered_methods(groups):
        hist = np.sum(np.stack(records.loc[groups == method, "hist"]), axis=0)
        if hist[0].sum() == 0 or hist[1].sum() == 0:
            continue
        fpr, tpr = roc_from_hist(hist)
        ax.plot(fpr, tpr, label=f"{method} (AUC {auc_from_hist(hist):.3f})")
    ax.plot([0, 1], [0, 1], ls=":", color="grey", lw=1)
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title=title, xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right", fontsize="small")
    fig.savefig(path, dpi=110)
    return path


def plot_centres(centres: pd.DataFrame, title: str, path: Path) -> Path:
    """Grouped bars: ACC and AUC per centre (mean over backbones), one bar per method."""
    methods = _ordered_methods(centres["method"])
    labels = sorted(centres["centre"].unique(), key=str)
    x = np.arange(len(labels))
    width = 0.8 / max(1, len(methods))
    fig, axes = _figure(max(6.0, 0.9 * len(labels) * max(1, len(methods)) / 2 + 3), 6.5, nrows=2)
    for ax, metric, label in zip(axes, ("acc", "auc"), ("ACC", "AUC")):
        for i, method in enumerate(methods):
            values = centres[centres["method"] == method].set_index("centre")[metric].reindex(labels)
            ax.bar(x + (i - (len(methods) - 1) / 2) * width, values.to_numpy(dtype=float), width, label=method)
        ax.set(ylabel=label, ylim=(0, 1), xticks=x, xticklabels=labels)
    axes[-1].set_xlabel("centre")
    fig.suptitle(title)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncols=min(6, len(methods)),
               fontsize="small")
    fig.savefig(path, dpi=110)
    return path


def learning_curves(store: RunStore, units: Sequence[sqlite3.Row]) -> pd.DataFrame:
    """Per finished unit and round: the monitored validation loss and the mean training loss over sites."""
    ids = {u["unit_id"] for u in units}
    m = pd.read_sql("SELECT unit_id, round, site, task, split, name, value FROM metrics "
                    "WHERE (site='*' AND split='val' AND name='monitored_loss') "
                    "OR (site<>'*' AND task='all' AND split='train' AND name='loss')", store.db)
    m = m[m["unit_id"].isin(ids)]
    monitored = m[m["name"] == "monitored_loss"].groupby(["unit_id", "round"])["value"].mean().rename("monitored_loss")
    train = m[m["name"] == "loss"].groupby(["unit_id", "round"])["value"].mean().rename("train_loss")
    curves = pd.concat([monitored, train], axis=1).reset_index()
    info = pd.DataFrame([{k: u[k] for k in ("unit_id", "protocol", "method", "backbone", "fold", "seed", "best_round")}
                         for u in units])
    curves = info.merge(curves, on="unit_id") if len(curves) else info.iloc[:0].assign(
        round=[], monitored_loss=[], train_loss=[])
    return sort_rows(curves, ["protocol", "method", "backbone", "fold", "seed", "round"])


def plot_learning_curves(curves: pd.DataFrame, title: str, path: Path) -> Path:
    """One panel per method, one line per unit: the monitored validation loss per round; a dot marks the selected round."""
    from matplotlib.ticker import MaxNLocator

    groups = _ordered_methods(curves["method"].map(method_group))
    ncols = min(3, len(groups))
    nrows = math.ceil(len(groups) / ncols)
    fig, axes = _figure(4.2 * ncols, 3.2 * nrows, ncols=ncols, nrows=nrows)
    for ax, group in zip(axes, groups):
        units = curves[curves["method"].map(method_group) == group]
        for _, u in units.groupby("unit_id", sort=False):
            label = f"{u['backbone'].iloc[0]} fold {u['fold'].iloc[0]} seed {u['seed'].iloc[0]}"
            u = u.dropna(subset=["monitored_loss"])
            line, = ax.plot(u["round"], u["monitored_loss"], lw=1, alpha=0.8, label=label)
            best = u[u["round"] == u["best_round"]]
            ax.plot(best["round"], best["monitored_loss"], "o", ms=4, color=line.get_color())
        ax.set(title=group, xlabel="round", ylabel="monitored val loss")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if units["unit_id"].nunique() <= 8:
            ax.legend(fontsize="x-small")
    for ax in axes[len(groups):]:
        ax.set_visible(False)
    fig.suptitle(title)
    fig.savefig(path, dpi=110)
    return path


# ---- formatting ----------------------------------------------------------------------------------------
HEADERS = {"acc": "ACC", "f1": "F1 (weighted)", "gmean": "G-mean (sqrt TPR x TNR)",
           "gmean_weighted": "G-mean (imblearn weighted)", "auc": "AUC [95% CI]", "sensitivity": "sens",
           "specificity": "spec", "n_backbones": "backbones", "n_folds": "folds", "site_models": "site models",
           "val_acc": "val ACC", "val_f1": "val F1", "test_acc": "test ACC", "test_f1": "test F1",
           "val_n": "val n", "test_n": "test n", "t": "t", "t_p": "p (t)", "t_stars": "sig (t)",
           "w": "W", "w_p": "p (W)", "w_stars": "sig (W)", "mean_a": "mean A", "mean_b": "mean B", "alternative": "H1"}


def _header(col: str) -> str:
    if col.endswith(("_fold_mean", "_fold_std")):
        metric, how = col.rsplit("_fold_", 1)
        return f"{_header(metric).split(' [')[0]} fold {'sd' if how == 'std' else 'mean'}"
    return HEADERS.get(col, col)


def _base(col: str) -> str:
    for affix in ("_fold_mean", "_fold_std"):
        col = col.removesuffix(affix)
    return col.removeprefix("val_").removeprefix("test_")


def _cell(col: str, v) -> str:
    if v is None or (isinstance(v, (float, np.floating)) and not np.isfinite(v)):
        return "-"
    if isinstance(v, (float, np.floating, int, np.integer)) and not isinstance(v, bool):
        base = _base(col)
        if base in PERCENT_METRICS:
            return f"{100 * v:.1f}"
        if base.startswith("auc") or col in ("threshold", "mean_a", "mean_b", "t", "w"):
            return f"{v:.3f}"
        if col.endswith("_p"):
            return f"{v:.2g}" if v < 0.001 else f"{v:.3f}"
        return str(int(v)) if float(v).is_integer() else f"{v:.3f}"
    return str(v)


def display_frame(df: pd.DataFrame) -> pd.DataFrame:
    """Strings for markdown and LaTeX: rates in %, AUC with its interval, readable headers."""
    df = df.drop(columns=[c for c in ("hist", "cm") if c in df.columns])
    out = pd.DataFrame({c: [_cell(c, v) for v in df[c]] for c in df.columns}, index=range(len(df)))
    if "auc_lo" in df.columns:
        has = df["auc_lo"].notna().to_numpy()
        out.loc[has, "auc"] = [f"{a} [{lo}, {hi}]" for a, lo, hi in
                               zip(out.loc[has, "auc"], out.loc[has, "auc_lo"], out.loc[has, "auc_hi"])]
        out = out.drop(columns=["auc_lo", "auc_hi"])
    return out.rename(columns=_header)


def to_markdown_table(df: pd.DataFrame) -> str:
    shown = display_frame(df)
    if shown.empty:
        return "(no rows)"
    lines = ["| " + " | ".join(shown.columns) + " |", "|" + "---|" * len(shown.columns)]
    lines += ["| " + " | ".join(row) + " |" for row in shown.itertuples(index=False)]
    return "\n".join(lines)


def write_table(df: pd.DataFrame, out_dir: Path, stem: str, title: str, note: str = "") -> tuple[list[Path], str]:
    """<stem>.csv (raw values), <stem>.md and <stem>.tex (formatted). Returns the paths and the markdown."""
    raw = df.drop(columns=[c for c in ("hist", "cm") if c in df.columns])
    paths = [out_dir / f"{stem}.{ext}" for ext in ("csv", "md", "tex")]
    raw.to_csv(paths[0], index=False)
    md = f"## {title}\n\n" + (f"{note}\n\n" if note else "") + to_markdown_table(df) + "\n"
    paths[1].write_text(md)
    paths[2].write_text(display_frame(df).to_latex(index=False, escape=True, caption=title, label=f"tab:{stem}"))
    return paths, md


def tests_markdown(tests: pd.DataFrame, title: str) -> str:
    """The paired tests, naming the test, n and p in every row."""
    lines = [f"## {title}", "",
             "One-tailed paired tests across backbones (scipy.stats.ttest_rel and scipy.stats.wilcoxon). H1 for the",
             "pooled metric and the fold mean: MDMT greater; for the fold std: MDMT less (more stable).",
             "Stars: * p<0.05, ** p<0.01, *** p<0.001.", "",
             "| comparison | metric | on | H1 | n | mean A | mean B | paired t-test | Wilcoxon signed-rank | note |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in tests.itertuples(index=False):
        t = "-" if pd.isna(r.t_p) else f"t={r.t:.3f}, n={r.n}, p={_cell('t_p', r.t_p)}{r.t_stars}"
        w = "-" if pd.isna(r.w_p) else f"W={r.w:.1f}, n={r.n}, p={_cell('w_p', r.w_p)}{r.w_stars}"
        h1 = {"greater": "A > B", "less": "A < B"}.get(r.alternative, "-")
        lines.append(f"| {r.comparison} | {_header(r.metric).split(' [')[0]} | {r.summary} | {h1} | {r.n} "
                     f"| {_cell(r.metric, r.mean_a)} | {_cell(r.metric, r.mean_b)} | {t} | {w} | {r.note} |")
    return "\n".join(lines) + "\n"


# ---- the report ----------------------------------------------------------------------------------------
METHOD_NOTE = ("Mean over backbones of the metrics on each backbone's pooled predictions (every fold's held-out or "
               "test counts at that fold's own threshold, summed). ACC, F1, G-mean, sens, spec in %. AUC interval: "
               "stratified bootstrap of the mean over backbones from their pooled histograms. 'local': mean over "
               "the single-site models (no interval).")


def _write_protocol(protocol: str, records: pd.DataFrame, out_dir: Path, n_boot: int,
                    seed: int) -> tuple[list[Path], list[str], PrognosisTables]:
    """The prognosis tables and plots of one protocol."""
    name = PROTOCOL_TITLES.get(protocol, protocol)
    t = prognosis_tables(records, n_boot, seed)
    files: list[Path] = []
    sections: list[str] = []
    specs = [
        (t.methods, f"methods_{protocol}", f"{name}: mean over backbones (pooled folds)", METHOD_NOTE),
        (t.backbones, f"backbones_{protocol}", f"{name}: per backbone",
         "Pooled predictions of all folds, plus each metric's mean and sample std (ddof 1) over folds."),
        (t.centres, f"centres_{protocol}", f"{name}: per centre (mean over backbones)",
         "Each centre's held-out (LOCO) or test (CV, pooled over folds) predictions at each fold's threshold."),
        (t.folds, f"folds_{protocol}", f"{name}: per fold", "One row per model and fold, at the selected round."),
    ]
    if len(t.local_sites):
        specs.append((t.local_sites, f"local_sites_{protocol}", f"{name}: single-site models per fold", ""))
    for df, stem, title, note in specs:
        paths, md = write_table(df, out_dir, stem, title, note)
        files += paths
        sections.append(md)
    files.append(plot_roc(records, f"ROC ({name}, pooled)", out_dir / f"roc_{protocol}.png"))
    files.append(plot_centres(t.centres, f"{name}: per centre, mean over backbones", out_dir / f"centres_{protocol}.png"))
    return files, sections, t


def _write_tests(backbones: pd.DataFrame, out_dir: Path) -> tuple[list[Path], str]:
    """tests.csv, tests.md and tests.tex: MDMT against its baselines, per protocol."""
    tests = compare_methods(backbones)
    protocols = list(dict.fromkeys(tests["protocol"]))
    md = "\n".join(tests_markdown(tests[tests["protocol"] == p], f"{PROTOCOL_TITLES.get(p, p)}: paired tests")
                   for p in protocols)
    paths = [out_dir / f"tests.{ext}" for ext in ("csv", "md", "tex")]
    tests.to_csv(paths[0], index=False)
    paths[1].write_text(md)
    paths[2].write_text(display_frame(tests).to_latex(
        index=False, escape=True, caption="Paired one-tailed tests of MDMT against its baselines", label="tab:tests"))
    return paths, md


def _write_severity(store: RunStore, units: list[sqlite3.Row], out_dir: Path) -> tuple[list[Path], list[str]]:
    """severity.* (per unit) and severity_methods.* (mean over backbones); nothing if no unit trains severity."""
    severity = severity_table(store, units)
    if severity.empty:
        return [], []
    files, sections = [], []
    note = ("Accuracy and weighted F1 (%) at the selected round: 'val' = the severity sites' validation rows, "
            "'test' = the consensus test set.")
    for df, stem, title in ((severity_summary(severity), "severity_methods", "severity: mean over backbones"),
                            (severity, "severity", "severity per model and fold")):
        paths, md = write_table(df, out_dir, stem, title, note)
        files += paths
        sections.append(md)
    return files, sections


def _write_learning_curves(store: RunStore, units: list[sqlite3.Row], out_dir: Path) -> list[Path]:
    """learning_curves.csv and one learning_<protocol>.png per protocol."""
    curves = learning_curves(store, units)
    files = [out_dir / "learning_curves.csv"]
    curves.to_csv(files[0], index=False)
    for protocol in dict.fromkeys(curves["protocol"]):
        files.append(plot_learning_curves(curves[curves["protocol"] == protocol],
                                          f"learning curves ({PROTOCOL_TITLES.get(protocol, protocol)})",
                                          out_dir / f"learning_{protocol}.png"))
    return files


def write_report(store: RunStore, out_dir: Path, n_boot: int = 1000, seed: int = 0) -> str:
    """Write every table, test and plot of the store's finished units into ``out_dir``; return a summary:
    the main table of each protocol in markdown and the files written."""
    units = finished_units(store)
    if not units:
        return f"{store.path}: no finished unit (status 'done' with a selected round) yet; nothing to report"
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MDMTError(f"{out_dir}: cannot create the report folder ({exc.strerror}); choose another --out") from None

    records = prognosis_records(store, units)
    files: list[Path] = []
    sections: list[str] = []
    main: list[str] = []
    backbones = []
    for protocol in sort_rows(records[["protocol"]].drop_duplicates(), ["protocol"])["protocol"]:
        written, mds, tables = _write_protocol(protocol, records[records["protocol"] == protocol], out_dir, n_boot, seed)
        files += written
        sections += mds
        main.append(mds[0])
        backbones.append(tables.backbones)
    if backbones:
        written, md = _write_tests(pd.concat(backbones, ignore_index=True), out_dir)
        files += written
        sections.append(md)
    written, mds = _write_severity(store, units, out_dir)
    files += written
    sections += mds
    files += _write_learning_curves(store, units, out_dir)
    _, loco_csv, loco_md = write_loco_report(store, out_dir, n_boot=n_boot, seed=seed)
    files += [loco_csv, loco_md]

    figures = [f"![{p.stem}]({p.name})" for p in files if p.suffix == ".png"]
    (out_dir / "report.md").write_text("# Results\n\n" + "\n".join(sections) + "\n## Figures\n\n"
                                       + "\n\n".join(figures) + "\n")
    files.insert(0, out_dir / "report.md")

    head = "\n".join(main) if main else "No prognosis results (no finished unit scores a held-out or test split)."
    return head + f"\nwrote {len(files)} files to {out_dir}:\n" + "\n".join(f"  {p.name}" for p in files)


# ---- the LOCO table (also read by the dashboard and the loco driver) ----------------------------------
def loco_table(store: RunStore, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """One row per (method, backbone, held-out centre) at its selected round, plus 'mean' and 'pooled' rows.

    'mean' averages the per-centre metrics; 'pooled' computes them on the held-out centres' predictions
    pooled together (summed confusion counts and score histograms).
    """
    rows = []
    pooled: dict[tuple[str, str, int], list[tuple[np.ndarray, np.ndarray]]] = {}
    for u in store.units():
        if u["protocol"] != "loco" or u["fold"] == "-" or u["status"] != "done" or u["best_round"] is None:
            continue
        k, scored = unit_prognosis(store, u)
        if not scored:
            continue
        hist = scored[0][1]
        cm = cm_at_bin(hist, k)
        m = prognosis_summary(cm, hist, n_boot=n_boot, seed=seed)
        m["threshold"] = k / HIST_BINS
        rows.append({"method": u["method"], "backbone": u["backbone"], "seed": u["seed"], "centre": u["fold"],
                     "round": u["best_round"], **{k: m[k] for k in TABLE_METRICS}})
        pooled.setdefault((u["method"], u["backbone"], u["seed"]), []).append((cm, hist))
    df = pd.DataFrame(rows)
    if df.empty:
        return pd.DataFrame(columns=["method", "backbone", "seed", "centre", "round", *TABLE_METRICS])
    out = []
    for (method, backbone, seed_), grp in df.groupby(["method", "backbone", "seed"], sort=True):
        grp = grp.sort_values("centre")
        out.append(grp)
        mean = {k: float(grp[k].mean()) for k in TABLE_METRICS}
        mean["n"] = int(grp["n"].sum())
        mean["auc_lo"] = mean["auc_hi"] = float("nan")  # an interval of a mean of centres is not a bootstrap CI
        out.append(pd.DataFrame([{"method": method, "backbone": backbone, "seed": seed_, "centre": "mean",
                                  "round": np.nan, **mean}]))
        parts = pooled[(method, backbone, seed_)]
        m = prognosis_summary(sum(p[0] for p in parts), sum(p[1] for p in parts), n_boot=n_boot, seed=seed)
        m["threshold"] = float("nan")  # each centre keeps its own fold's threshold
        out.append(pd.DataFrame([{"method": method, "backbone": backbone, "seed": seed_, "centre": "pooled",
                                  "round": np.nan, **{k: m[k] for k in TABLE_METRICS}}]))
    return pd.concat(out, ignore_index=True)


def _fmt(v: float, pct: bool = True) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{100 * v:.1f}" if pct else f"{v:.3f}"


def to_markdown(df: pd.DataFrame) -> str:
    head = ("| method | backbone | centre | n | ACC | F1 (weighted) | G-mean | G-mean (weighted) | AUC [95% CI] "
            "| sens | spec | round | threshold |")
    lines = [head, "|" + "---|" * 13]
    for r in df.itertuples(index=False):
        auc = _fmt(r.auc, False)
        if not pd.isna(r.auc_lo):
            auc += f" [{_fmt(r.auc_lo, False)}, {_fmt(r.auc_hi, False)}]"
        rnd = "" if pd.isna(r.round) else str(int(r.round))
        lines.append(f"| {r.method} | {r.backbone} | {r.centre} | {int(r.n)} | {_fmt(r.acc)} | {_fmt(r.f1)} | "
                     f"{_fmt(r.gmean)} | {_fmt(r.gmean_weighted)} | {auc} | {_fmt(r.sensitivity)} | "
                     f"{_fmt(r.specificity)} | {rnd} | {'' if pd.isna(r.threshold) else f'{r.threshold:.3f}'} |")
    return "\n".join(lines)


def write_loco_report(store: RunStore, out_dir: Path, n_boot: int = 1000, seed: int = 0) -> tuple[pd.DataFrame, Path, Path]:
    df = loco_table(store, n_boot=n_boot, seed=seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out_dir / "loco.csv", out_dir / "loco.md"
    df.to_csv(csv_path, index=False)
    md_path.write_text(
        "# Leave-one-centre-out results (prognosis, held-out centre at the selected round)\n\n"
        "ACC, F1, G-mean, sensitivity and specificity in %; 'mean' averages the centres, 'pooled' scores the\n"
        "held-out centres' predictions together. G-mean = sqrt(TPR x TNR); G-mean (weighted) = imbalanced-learn's\n"
        f"weighted variant used by the paper's code. AUC interval: stratified bootstrap, {n_boot} resamples.\n"
        "threshold: the P(SEVERE) cut-off, chosen on the training sites' validation (Youden's J) unless fixed\n"
        "by the run config's 'threshold'; the held-out centre never influences it.\n\n"
        + to_markdown(df) + "\n"
    )
    return df, csv_path, md_path
