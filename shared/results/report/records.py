"""Reading finished units from the run store: prognosis records, learning curves, and the reading order of
methods and protocols that every table follows."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd

from mdmt.errors import DataError
from mdmt.ml.methods import METHODS, PROGNOSIS
from mdmt.ml.metrics import HIST_BINS, as_layout, auc_from_hist, cm_at_bin, edge_p, threshold_bin
from mdmt.store import RunStore

LOCAL_PREFIX = "local:"  # local:<SITE>: one model trained on that site alone
LOCAL = "local"  # the method name that groups the site models in method tables
METHOD_ORDER = ("stl_prognosis", "stl_severity", "ft", "mdmt", "centralised_mdmt", LOCAL)
PROTOCOL_ORDER = ("loco", "cv")
PROTOCOL_TITLES = {"loco": "leave-one-centre-out", "cv": "k-fold cross-validation"}


# ---- naming and ordering -------------------------------------------------------------------------------
def method_group(method: str) -> str:
    """The method a unit counts under in method tables: every local:<SITE> model is 'local'."""
    return LOCAL if method.startswith(LOCAL_PREFIX) else method


def trains(method: str, task: str) -> bool | None:
    """Does a registered method train ``task``? None for methods outside the registry (ft, local:<SITE>)."""
    m = METHODS.get(method)
    return None if m is None else task in m.tasks


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


# ---- reading the store ---------------------------------------------------------------------------------
def finished_units(store: RunStore) -> list[sqlite3.Row]:
    """Units that count in a report: status 'done' with a selected round."""
    try:
        units = store.units()
    except sqlite3.Error as exc:
        raise DataError(f"{store.path}: not a readable run store ({exc})") from None
    return [u for u in units if u["status"] == "done" and u["best_round"] is not None]


def _hist(row: sqlite3.Row) -> np.ndarray:
    return as_layout(json.loads(row["hist"]))


def _site_aucs(store: RunStore, unit_id: str, rnd: int) -> dict[tuple[str, str], float]:
    """(site, split) -> the prognosis AUC stored for the round: the exact AUC the site sent (a store written
    before sites sent it holds its histogram's AUC there)."""
    rows = store.db.execute(
        "SELECT site, split, value FROM metrics WHERE unit_id=? AND round=? AND task=? AND name='auc'",
        (unit_id, rnd, PROGNOSIS),
    ).fetchall()
    return {(r["site"], r["split"]): float("nan") if r["value"] is None else float(r["value"]) for r in rows}


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


def train_validation(unit: sqlite3.Row, rows: Iterable[sqlite3.Row]) -> np.ndarray | None:
    """The prognosis validation histograms (split 'val') of the unit's training sites among ``rows`` (eval_stats
    rows of one round), summed; None if there is none."""
    train_sites = set((unit["train_sites"] or "").split(","))
    val = [
        _hist(r)
        for r in rows
        if r["task"] == PROGNOSIS and r["split"] == "val" and r["site"] in train_sites and r["hist"] is not None
    ]
    return sum(val) if val else None


def hist_aucs(hists: np.ndarray) -> np.ndarray:
    """The AUC of each of many (2, HIST_BINS) histograms at once, as mdmt.ml.metrics.auc_from_hist computes it
    for one (scores at the bin centres, ties within a bin counted one half); NaN where a class is empty."""
    hists = np.asarray(hists, dtype=float).reshape(-1, 2, HIST_BINS)
    h0, h1 = hists[:, 0], hists[:, 1]
    below = np.cumsum(h0, axis=1) - h0  # MILD scores strictly below each bin
    pairs = h0.sum(axis=1) * h1.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(pairs > 0, (h1 * (below + 0.5 * h0)).sum(axis=1) / pairs, np.nan)


def validation_aucs(store: RunStore, units: Iterable[sqlite3.Row]) -> pd.DataFrame:
    """Per unit and round: the prognosis validation AUC of the unit's training sites pooled (their 'val'
    histograms summed) and the number of those validation images."""
    frames = []
    for u in units:
        rows = store.db.execute(
            "SELECT round, site, task, split, hist FROM eval_stats WHERE unit_id=? AND task=? AND split='val' "
            "AND hist IS NOT NULL ORDER BY round",
            (u["unit_id"], PROGNOSIS),
        ).fetchall()
        by_round: dict[int, list[sqlite3.Row]] = {}
        for r in rows:
            by_round.setdefault(r["round"], []).append(r)
        pooled = {rnd: train_validation(u, rs) for rnd, rs in by_round.items()}
        pooled = {rnd: h for rnd, h in pooled.items() if h is not None}
        if not pooled:
            continue
        hists = np.stack(list(pooled.values()))
        frames.append(
            pd.DataFrame(
                {
                    "unit_id": u["unit_id"],
                    "round": list(pooled),
                    "val_auc": hist_aucs(hists),
                    "val_n": hists.sum(axis=(1, 2)),
                }
            )
        )
    cols = ["unit_id", "round", "val_auc", "val_n"]
    return pd.concat(frames, ignore_index=True)[cols] if frames else pd.DataFrame(columns=cols)


def unit_prognosis(store: RunStore, unit: sqlite3.Row) -> tuple[int, list[tuple[str, np.ndarray, float]]]:
    """A unit's decision threshold bin and its scored (site, prognosis histogram, AUC) at the selected round.

    The threshold comes from the pooled validation histograms of the unit's training sites (or the config's
    fixed value). Scored: under LOCO the held-out centre; under CV every site's test split. The AUC is the
    exact one the site computed on its split, or the histogram's where the store has none.
    """
    rows = [
        r
        for r in store.eval_stats(unit["unit_id"], unit["best_round"])
        if r["task"] == PROGNOSIS and r["hist"] is not None
    ]
    k = threshold_bin(_threshold_rule(unit), train_validation(unit, rows))
    if unit["protocol"] == "loco":
        picked = [r for r in rows if r["site"] == unit["fold"]][:1]
    elif unit["protocol"] == "cv":
        picked = [r for r in rows if r["split"] == "test"]
    else:
        picked = []
    aucs = _site_aucs(store, unit["unit_id"], unit["best_round"]) if picked else {}
    scored = []
    for r in picked:
        hist = _hist(r)
        auc = aucs.get((r["site"], r["split"]))
        scored.append((r["site"], hist, auc_from_hist(hist) if auc is None else auc))
    return k, scored


def prognosis_records(store: RunStore, units: Iterable[sqlite3.Row]) -> pd.DataFrame:
    """One row per (unit, scored site): the site's histogram, its confusion counts at the unit's threshold
    and the AUC the site sent for the split."""
    rows = []
    for u in units:
        if trains(u["method"], PROGNOSIS) is False:
            continue
        k, scored = unit_prognosis(store, u)
        for site, hist, auc in scored:
            rows.append(
                {
                    "protocol": u["protocol"],
                    "method": u["method"],
                    "backbone": u["backbone"],
                    "seed": u["seed"],
                    "fold": u["fold"],
                    "round": u["best_round"],
                    "site": site,
                    "threshold": edge_p(k),
                    "cm": cm_at_bin(hist, k),
                    "hist": hist,
                    "auc": auc,
                }
            )
    cols = ["protocol", "method", "backbone", "seed", "fold", "round", "site", "threshold", "cm", "hist", "auc"]
    return pd.DataFrame(rows, columns=cols)


def learning_curves(store: RunStore, units: Sequence[sqlite3.Row]) -> pd.DataFrame:
    """Per finished unit and round: the monitored validation loss, the mean training loss over sites and the
    pooled prognosis validation AUC of the training sites (validation_aucs)."""
    ids = {u["unit_id"] for u in units}
    m = pd.read_sql(
        "SELECT unit_id, round, site, task, split, name, value FROM metrics "
        "WHERE (site='*' AND split='val' AND name='monitored_loss') "
        "OR (site<>'*' AND task='all' AND split='train' AND name='loss')",
        store.db,
    )
    m = m[m["unit_id"].isin(ids)]
    monitored = m[m["name"] == "monitored_loss"].groupby(["unit_id", "round"])["value"].mean().rename("monitored_loss")
    train = m[m["name"] == "loss"].groupby(["unit_id", "round"])["value"].mean().rename("train_loss")
    curves = pd.concat([monitored, train], axis=1).reset_index()
    val = validation_aucs(store, units)
    if not len(curves):
        curves = val.assign(monitored_loss=np.nan, train_loss=np.nan)
    elif len(val):
        curves = curves.merge(val, on=["unit_id", "round"], how="outer")
    else:
        curves = curves.assign(val_auc=np.nan, val_n=np.nan)
    info = pd.DataFrame(
        [{k: u[k] for k in ("unit_id", "protocol", "method", "backbone", "fold", "seed", "best_round")} for u in units]
    )
    curves = (
        info.merge(curves, on="unit_id")
        if len(curves)
        else info.iloc[:0].assign(round=[], monitored_loss=[], train_loss=[], val_auc=[], val_n=[])
    )
    return sort_rows(curves, ["protocol", "method", "backbone", "fold", "seed", "round"])
