"""Did every backbone learn? The training sites' pooled prognosis validation AUC per method and backbone, at
the selected round and at the last round, and how many units' selected-round AUC is above chance beyond
its bootstrap interval. Validation data only: the held-out and test rows never enter it."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

import numpy as np
import pandas as pd

from mdmt.ml.methods import PROGNOSIS
from mdmt.ml.metrics import auc_ci
from mdmt.results.report.records import method_group, sort_rows, train_validation, trains
from mdmt.store import RunStore

VALIDATION_COLUMNS = [
    "protocol",
    "method",
    "backbone",
    "n_units",
    "val_auc_selected",
    "val_auc_last",
    "n_above_chance",
]


def unit_validation(
    store: RunStore, units: Sequence[sqlite3.Row], curves: pd.DataFrame, n_boot: int = 1000, seed: int = 0
) -> pd.DataFrame:
    """Per unit that trains prognosis: the pooled validation AUC at the selected round (with its stratified
    bootstrap interval, mdmt.ml.metrics.auc_ci) and at the unit's last round with validation histograms."""
    rows = []
    for u in units:
        if trains(u["method"], PROGNOSIS) is False:
            continue
        hist = train_validation(u, store.eval_stats(u["unit_id"], u["best_round"]))
        curve = curves[(curves["unit_id"] == u["unit_id"])].dropna(subset=["val_auc"])
        if hist is None or curve.empty:
            continue
        lo, hi = auc_ci(hist, n_boot=n_boot, seed=seed)
        last = curve.loc[curve["round"].idxmax()]
        selected = curve.loc[curve["round"] == u["best_round"], "val_auc"]
        rows.append(
            {
                "unit_id": u["unit_id"],
                "protocol": u["protocol"],
                "method": method_group(u["method"]),
                "backbone": u["backbone"],
                "round": u["best_round"],
                "val_auc_selected": float(selected.iloc[0]) if len(selected) else np.nan,
                "val_auc_lo": lo,
                "val_auc_hi": hi,
                "last_round": int(last["round"]),
                "val_auc_last": float(last["val_auc"]),
            }
        )
    cols = [
        "unit_id",
        "protocol",
        "method",
        "backbone",
        "round",
        "val_auc_selected",
        "val_auc_lo",
        "val_auc_hi",
        "last_round",
        "val_auc_last",
    ]
    return pd.DataFrame(rows, columns=cols)


def validation_table(per_unit: pd.DataFrame) -> pd.DataFrame:
    """Per (protocol, method, backbone): the number of units, the mean over them of the pooled validation AUC
    at the selected and at the last round, and how many units' selected-round interval lies above 0.5."""
    if per_unit.empty:
        return pd.DataFrame(columns=VALIDATION_COLUMNS)
    out = (
        per_unit.assign(above=per_unit["val_auc_lo"] > 0.5)
        .groupby(["protocol", "method", "backbone"], as_index=False, sort=False)
        .agg(
            n_units=("unit_id", "size"),
            val_auc_selected=("val_auc_selected", "mean"),
            val_auc_last=("val_auc_last", "mean"),
            n_above_chance=("above", "sum"),
        )
    )
    out["n_above_chance"] = out["n_above_chance"].astype(int)
    return sort_rows(out[VALIDATION_COLUMNS], ["protocol", "method", "backbone"])


def mean_validation_curves(curves: pd.DataFrame) -> pd.DataFrame:
    """Per (protocol, method group, backbone, round): the mean over that backbone's units (seeds and folds) of
    the pooled validation AUC, and how many units have a value at that round."""
    cols = ["protocol", "method", "backbone", "round", "val_auc", "n_units"]
    c = curves.dropna(subset=["val_auc"])
    if c.empty:
        return pd.DataFrame(columns=cols)
    c = c.assign(method=c["method"].map(method_group))
    out = c.groupby(["protocol", "method", "backbone", "round"], as_index=False, sort=False).agg(
        val_auc=("val_auc", "mean"), n_units=("unit_id", "nunique")
    )
    return sort_rows(out[cols], ["protocol", "method", "backbone", "round"])
