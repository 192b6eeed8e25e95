"""The prognosis tables of one or more protocols (per fold, backbone, centre and method) and the severity
tables, as pandas frames of raw values."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from mdmt.ml.methods import SEVERITY
from mdmt.ml.metrics import multiclass_metrics, prognosis_summary
from mdmt.results.report.records import LOCAL, LOCAL_PREFIX, sort_rows, trains
from mdmt.results.report.stats import TESTED_METRICS, mean_auc_interval
from mdmt.store import RunStore

SUMMARY_METRICS = ("n", "acc", "f1", "gmean", "gmean_weighted", "auc", "auc_lo", "auc_hi", "sensitivity", "specificity")


# ---- prognosis tables ----------------------------------------------------------------------------------
def summarise(records: pd.DataFrame, keys: Sequence[str], n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Per group of ``keys``: metrics on the group's pooled predictions (summed confusion counts, each at its
    own fold's threshold, and summed histograms), with the AUC's bootstrap interval. A group of one record
    keeps the AUC its site sent (column 'auc'). Keeps the pooled histogram in column 'hist'."""
    rows = []
    for key, grp in records.groupby(list(keys), sort=False):
        cm, hist = np.sum(np.stack(grp["cm"]), axis=0), np.sum(np.stack(grp["hist"]), axis=0)
        # one site's split: the exact AUC its site sent; pooled predictions: the summed histograms' AUC
        exact = grp["auc"].iloc[0] if len(grp) == 1 and "auc" in grp else None
        m = prognosis_summary(cm, hist, n_boot=n_boot, seed=seed, auc=exact)
        rows.append(
            {
                **dict(zip(keys, key)),
                "n_folds": grp["fold"].nunique(),
                **{c: m[c] for c in SUMMARY_METRICS},
                "hist": hist,
            }
        )
    return pd.DataFrame(rows, columns=[*keys, "n_folds", *SUMMARY_METRICS, "hist"])


def group_local(df: pd.DataFrame, keys: Sequence[str]) -> pd.DataFrame:
    """Replace the local:<SITE> rows by one 'local' row per group of ``keys`` (which include 'method'): the
    mean of each metric over the site models. A mean of models has no pooled histogram, so no AUC interval."""
    local = df["method"].str.startswith(LOCAL_PREFIX)
    if not local.any():
        return df
    first = {"n", "n_folds", "round"}
    cols = [
        c
        for c in df.columns
        if c not in keys and c not in ("hist", "cm", "auc_lo", "auc_hi") and pd.api.types.is_numeric_dtype(df[c])
    ]
    means = (
        df[local]
        .assign(method=LOCAL)
        .groupby(list(keys), as_index=False, sort=False)
        .agg(**{c: (c, "max" if c in first else "mean") for c in cols}, site_models=("method", "size"))
    )
    means["auc_lo"] = means["auc_hi"] = np.nan
    return pd.concat([df[~local], means], ignore_index=True)


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


def method_table(backbones: pd.DataFrame, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """The paper's table: per (protocol, method) the mean over backbones of the metrics on each backbone's
    pooled predictions; AUC interval: bootstrap of that mean from the backbones' pooled histograms."""
    cols = [c for c in SUMMARY_METRICS if c not in ("auc_lo", "auc_hi")]
    out = mean_over_backbones(backbones, ["protocol", "method"], cols)
    intervals = pd.DataFrame(
        [
            (protocol, method, *mean_auc_interval(grp, n_boot, seed))
            for (protocol, method), grp in backbones.groupby(["protocol", "method"], sort=False)
        ],
        columns=["protocol", "method", "auc_lo", "auc_hi"],
    )
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
    centres = mean_over_backbones(
        per_site, ["protocol", "method", "site"], [c for c in SUMMARY_METRICS if c not in ("auc_lo", "auc_hi")]
    )
    centres = sort_rows(centres.rename(columns={"site": "centre"}), ["protocol", "method", "centre"])
    return PrognosisTables(folds, local_sites, centres, backbones, method_table(backbones, n_boot, seed))


# ---- severity ------------------------------------------------------------------------------------------
def severity_table(store: RunStore, units: Iterable[sqlite3.Row]) -> pd.DataFrame:
    """Per unit that trains severity: accuracy and weighted F1 at the selected round on the severity sites'
    validation rows ('val') and on the consensus test set ('test'), confusion counts summed over sites."""
    rows = []
    for u in units:
        if not trains(u["method"], SEVERITY):
            continue
        stats_rows = [r for r in store.eval_stats(u["unit_id"], u["best_round"]) if r["task"] == SEVERITY]
        row = {
            "protocol": u["protocol"],
            "method": u["method"],
            "backbone": u["backbone"],
            "seed": u["seed"],
            "fold": u["fold"],
            "round": u["best_round"],
        }
        for split in ("val", "test"):
            cms = [np.asarray(json.loads(r["cm"]), dtype=np.int64) for r in stats_rows if r["split"] == split]
            m = multiclass_metrics(sum(cms)) if cms else {"n": 0, "acc": np.nan, "f1": np.nan}
            row |= {f"{split}_n": m["n"], f"{split}_acc": m["acc"], f"{split}_f1": m["f1"]}
        row["sites"] = ",".join(sorted({r["site"] for r in stats_rows if r["split"] in ("val", "test")}))
        rows.append(row)
    cols = [
        "protocol",
        "method",
        "backbone",
        "seed",
        "fold",
        "round",
        "val_n",
        "val_acc",
        "val_f1",
        "test_n",
        "test_acc",
        "test_f1",
        "sites",
    ]
    return sort_rows(pd.DataFrame(rows, columns=cols), ["protocol", "method", "backbone", "seed", "fold"])


def severity_summary(severity: pd.DataFrame) -> pd.DataFrame:
    """Per (protocol, method): mean over folds within each backbone, then over backbones."""
    cols = ["val_acc", "val_f1", "test_acc", "test_f1"]
    per_model = severity.groupby(["protocol", "method", "backbone", "seed"], as_index=False, sort=False)[cols].mean()
    return sort_rows(mean_over_backbones(per_model, ["protocol", "method"], cols), ["protocol", "method"])
