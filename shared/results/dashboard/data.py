"""Data access for the dashboard: plain functions from run store files to pandas frames (no Dash here).

Every call opens its own read-only connection and closes it, so a store that a run is writing to is
read consistently (WAL) and never locked by the dashboard.
"""

from __future__ import annotations

import hashlib
import json
import math
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from mdmt.errors import DataError, MDMTError
from mdmt.ml.methods import PROGNOSIS, SEVERITY
from mdmt.ml.metrics import (
    HIST_BINS,
    LEGACY_HIST_BINS,
    as_layout,
    auc_from_hist,
    binary_metrics,
    cm_at_bin,
    dense_counts,
    edge_bin,
    multiclass_metrics,
    roc_from_hist,
)
from mdmt.results.report import compare_methods, finished_units, loco_table, prognosis_records, prognosis_tables
from mdmt.store import RunStore, UnitKey

STORE_FILE = "store.sqlite"


@dataclass(frozen=True)
class Source:
    """One run store; its units are the dashboard's runs."""

    label: str
    path: Path


def resolve_sources(paths: list[str]) -> list[Source]:
    """Store files (or workspace folders holding store.sqlite) -> sources with short unique labels.

    A missing store is a one-line DataError: the dashboard has nothing to show and nothing to wait for.
    """
    out: list[Source] = []
    for p in paths:
        path = Path(p).expanduser()
        if path.is_dir():
            path = path / STORE_FILE
        if not path.is_file():
            raise DataError(f"{path}: run store not found; run an experiment first or pass --store PATH")
        try:
            RunStore(path, readonly=True).close()
        except sqlite3.Error as exc:
            raise DataError(f"{path}: cannot open the run store ({exc})") from None
        label = path.parent.name or str(path)
        if any(s.label == label for s in out):
            label = f"{label}#{len(out) + 1}"
        out.append(Source(label, path.resolve()))
    return out


@contextmanager
def opened(path: Path) -> Iterator[RunStore]:
    store = RunStore(path, readonly=True)
    try:
        yield store
    finally:
        store.close()


def _tables(db: sqlite3.Connection) -> set[str]:
    return {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}


# ---- the data version: a cheap fingerprint polled by the browser --------------------------------------
_VERSION_SQL = (
    "SELECT (SELECT count(*) FROM units), (SELECT group_concat(unit_id || ':' || status || ':' || rounds_done || ':' "
    "|| coalesce(best_round, '') || ':' || coalesce(ended, ''), ',') FROM units), "
    "(SELECT coalesce(max(rowid), 0) FROM metrics), (SELECT count(*) FROM metrics), "
    "(SELECT coalesce(max(rowid), 0) FROM eval_stats), (SELECT count(*) FROM eval_stats), "
    "(SELECT coalesce(max(rowid), 0) FROM participation), (SELECT count(*) FROM participation)"
)


def data_version(sources: list[Source]) -> str:
    """Changes whenever a row is added, replaced or deleted, or a unit changes status (INSERT OR REPLACE
    gives the new row a new rowid, so max(rowid) and the counts together see every write)."""
    parts: list[str] = []
    for src in sources:
        try:
            with opened(src.path) as st:
                if not {"units", "metrics", "eval_stats", "participation"} <= _tables(st.db):
                    parts.append("no-tables")
                    continue
                parts.append(repr(tuple(st.db.execute(_VERSION_SQL).fetchone())))
        except (sqlite3.Error, MDMTError) as exc:
            parts.append(f"error:{exc}")
    return hashlib.sha1("|".join(parts).encode()).hexdigest()[:16]


# ---- runs --------------------------------------------------------------------------------------------
def _loads(text: str | None, default):
    try:
        return json.loads(text) if text else default
    except (TypeError, ValueError):
        return default


def _unit_dict(src_index: int, src: Source, row: sqlite3.Row) -> dict:
    u = dict(row)
    cfg = _loads(u.get("config"), {})
    u["store"] = src.label
    u["store_index"] = src_index
    u["config"] = cfg
    u["num_rounds"] = cfg.get("num-rounds")
    u["train_sites"] = [s for s in (u.get("train_sites") or "").split(",") if s]
    u["eval_sites"] = _loads(u.get("eval_sites"), {})
    return u


def list_runs(sources: list[Source]) -> tuple[list[dict], list[str]]:
    """(units of every store, one-line problems with stores that could not be read)."""
    runs, problems = [], []
    for i, src in enumerate(sources):
        try:
            with opened(src.path) as st:
                if "units" not in _tables(st.db):
                    continue
                runs += [_unit_dict(i, src, r) for r in st.units()]
        except (sqlite3.Error, MDMTError) as exc:
            problems.append(f"{src.path}: {exc}")
    return runs, problems


def fmt_time(t: float | None) -> str:
    if t is None or (isinstance(t, float) and math.isnan(t)):
        return ""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


# ---- one unit ----------------------------------------------------------------------------------------
@dataclass
class UnitData:
    info: dict
    metrics: pd.DataFrame  # round, site, task, split, name, value
    stats: list[dict] = field(default_factory=list)  # round, site, task, split, n, loss_sum, cm, hist (arrays)
    participation: pd.DataFrame = field(default_factory=pd.DataFrame)  # round, site, kind, status, detail

    @property
    def rounds(self) -> list[int]:
        r = set(self.metrics["round"].astype(int)) | set(self.participation.get("round", pd.Series([], dtype=int)))
        return sorted(int(x) for x in r)


def load_unit(sources: list[Source], store_index: int, unit_id: str) -> UnitData | None:
    if not 0 <= store_index < len(sources):
        return None
    src = sources[store_index]
    with opened(src.path) as st:
        row = st.db.execute("SELECT * FROM units WHERE unit_id=?", (unit_id,)).fetchone()
        if row is None:
            return None
        metrics = pd.read_sql_query(
            "SELECT round, site, task, split, name, value FROM metrics WHERE unit_id=? "
            "ORDER BY round, site, task, split",
            st.db,
            params=(unit_id,),
        )
        stats = [
            {
                "round": r["round"],
                "site": r["site"],
                "task": r["task"],
                "split": r["split"],
                "n": r["n"],
                "loss_sum": r["loss_sum"],
                "cm": np.asarray(_loads(r["cm"], []), dtype=np.int64),
                "hist": None if r["hist"] is None else _stored_hist(_loads(r["hist"], [])),
            }
            for r in st.eval_stats(unit_id)
        ]
        part = pd.read_sql_query(
            "SELECT round, site, kind, status, detail FROM participation WHERE unit_id=? ORDER BY round, site, kind",
            st.db,
            params=(unit_id,),
        )
    metrics["value"] = pd.to_numeric(metrics["value"], errors="coerce")
    return UnitData(_unit_dict(store_index, src, row), metrics, stats, part)


def _stored_hist(values) -> np.ndarray:
    """A stored score histogram in the current bin layout (a store's older layout is converted); any other
    length is kept as it is, and left out where histograms are summed."""
    hist = dense_counts(values) if isinstance(values, dict) else np.asarray(values, dtype=np.int64)
    return as_layout(hist) if hist.size in (2 * HIST_BINS, 2 * LEGACY_HIST_BINS) else hist


def _site_auc(ud: UnitData, rnd: int, site: str, split: str) -> float | None:
    """The prognosis AUC stored for one site's split (the exact one the site sent), None when absent."""
    m = ud.metrics
    hit = m[(m["round"] == rnd) & (m.site == site) & (m.task == PROGNOSIS) & (m.split == split) & (m.name == "auc")]
    return None if hit.empty else float(hit["value"].iloc[0])


def round_thresholds(ud: UnitData) -> dict[int, float]:
    m = ud.metrics
    t = m[(m.site == "*") & (m.name == "threshold")]
    return {int(r): float(v) for r, v in zip(t["round"], t["value"]) if not pd.isna(v)}


def global_metrics(ud: UnitData) -> pd.DataFrame:
    """Per round and evaluated split: prognosis metrics on the split's sites pooled (summed histograms, cut
    at the round's decision threshold when one is logged, else the stored 0.5 confusion counts; a split
    of one site keeps the exact AUC that site sent) and severity accuracy/F1 on the summed confusion
    matrices."""
    thresholds = round_thresholds(ud)
    groups: dict[tuple[int, str], dict[str, list[dict]]] = {}
    for s in ud.stats:
        groups.setdefault((int(s["round"]), s["split"]), {}).setdefault(s["task"], []).append(s)
    rows = []
    for (rnd, split), by_task in sorted(groups.items()):
        sites = sorted({s["site"] for rows_ in by_task.values() for s in rows_})
        row: dict = {"round": rnd, "split": split, "sites": ",".join(sites)}
        prog = by_task.get(PROGNOSIS, [])
        if prog:
            hists = [s["hist"] for s in prog if s["hist"] is not None and s["hist"].size == 2 * HIST_BINS]
            hist = sum(hists) if hists and len(hists) == len(prog) else None
            thr = thresholds.get(rnd)
            if hist is not None and thr is not None:
                cm = cm_at_bin(hist, edge_bin(thr))
            else:
                cm, thr = sum(s["cm"].reshape(2, 2) for s in prog), 0.5
            m = binary_metrics(cm)
            auc = auc_from_hist(hist) if hist is not None else float("nan")
            if len(prog) == 1:
                sent = _site_auc(ud, rnd, prog[0]["site"], split)
                auc = auc if sent is None else sent
            row.update(
                {
                    "threshold": thr,
                    "prog_n": m["n"],
                    "prog_acc": m["acc"],
                    "prog_f1": m["f1"],
                    "prog_gmean": m["gmean"],
                    "prog_auc": auc,
                }
            )
        sev = by_task.get(SEVERITY, [])
        if sev:
            shapes = {s["cm"].shape for s in sev}
            if len(shapes) == 1:
                m = multiclass_metrics(sum(s["cm"] for s in sev))
                row.update({"sev_n": m["n"], "sev_acc": m["acc"], "sev_f1": m["f1"]})
        rows.append(row)
    cols = [
        "round",
        "split",
        "sites",
        "threshold",
        "prog_n",
        "prog_acc",
        "prog_f1",
        "prog_gmean",
        "prog_auc",
        "sev_n",
        "sev_acc",
        "sev_f1",
    ]
    return pd.DataFrame(rows).reindex(columns=cols)


def site_metrics(ud: UnitData) -> pd.DataFrame:
    """Evaluation metrics per round x site x task x split (wide: one column per metric name)."""
    m = ud.metrics
    m = m[(m.site != "*") & (m.task.isin([PROGNOSIS, SEVERITY])) & (m.split != "train")]
    names = [n for n in ("n", "acc", "f1", "gmean", "auc", "sensitivity", "specificity", "loss") if n in set(m.name)]
    if m.empty:
        return pd.DataFrame(columns=["round", "site", "task", "split", *names])
    wide = (
        m[m.name.isin(names)]
        .set_index(["round", "site", "task", "split", "name"])["value"]
        .unstack("name")
        .reset_index()
    )
    wide.columns.name = None
    return wide.reindex(columns=["round", "site", "task", "split", *names]).sort_values(["site", "task", "round"])


def loss_curves(ud: UnitData) -> dict[str, pd.DataFrame]:
    """train: (round, site, value) training loss; val: (round, site, task, split, value); monitored: (round, value)."""
    m = ud.metrics
    train = m[(m.task == "all") & (m.split == "train") & (m.name == "loss")][["round", "site", "value"]]
    val = m[(m.site != "*") & (m.split != "train") & (m.name == "loss")][["round", "site", "task", "split", "value"]]
    mon = m[(m.site == "*") & (m.name == "monitored_loss")][["round", "task", "value"]]
    return {"train": train, "val": val, "monitored": mon}


def participation_grid(ud: UnitData) -> tuple[list[str], list[dict]]:
    """(sites, one dict per round: site -> {'train': status|None, 'evaluate': status|None, 'split': str}).

    A site that the unit addresses but that has no row for a round is 'missing'."""
    info = ud.info
    train_sites = list(info["train_sites"])
    eval_sites = dict(info["eval_sites"])
    p = ud.participation
    sites = sorted(set(train_sites) | set(eval_sites) | set(p["site"] if len(p) else []))
    rows = []
    for rnd in sorted(set(int(r) for r in p["round"])) if len(p) else []:
        pr = p[p["round"] == rnd]
        cells: dict[str, dict] = {}
        for site in sites:
            cell: dict = {"train": None, "evaluate": None, "split": eval_sites.get(site, "")}
            for kind in ("train", "evaluate"):
                hit = pr[(pr.site == site) & (pr.kind == kind)]
                if len(hit):
                    cell[kind] = str(hit.iloc[0]["status"])
                    if kind == "evaluate" and hit.iloc[0]["detail"]:
                        cell["split"] = str(hit.iloc[0]["detail"])
                elif (kind == "train" and site in train_sites) or (kind == "evaluate" and site in eval_sites):
                    cell[kind] = "missing"
            cells[site] = cell
        rows.append({"round": rnd, "cells": cells})
    return sites, rows


def named_per_site(ud: UnitData, names: tuple[str, ...]) -> pd.DataFrame:
    """(round, site, name, value) for metric names such as bytes_down/bytes_up or epsilon; empty if none."""
    m = ud.metrics
    return m[m.name.isin(names) & (m.site != "*")][["round", "site", "name", "value"]].reset_index(drop=True)


# ---- LOCO --------------------------------------------------------------------------------------------
_LOCO_CACHE: dict[tuple[str, str], pd.DataFrame] = {}
_LOCO_LOCK = threading.Lock()


def _per_store(cache: dict, src: Source, version: str, compute):
    """``compute(store)`` for one store, cached per (store, data version); older versions are dropped."""
    key = (str(src.path), version)
    with _LOCO_LOCK:
        hit = cache.get(key) if version else None
    if hit is None:
        with opened(src.path) as st:
            hit = compute(st)
        if version:
            with _LOCO_LOCK:
                for k in [k for k in cache if k[0] == key[0]]:
                    del cache[k]
                cache[key] = hit
    return hit


def loco_frame(sources: list[Source], version: str = "") -> tuple[pd.DataFrame, list[str]]:
    """mdmt.results.report.loco_table of every store, with a 'store' column; cached per data version."""
    frames, problems = [], []
    for src in sources:
        try:
            df = _per_store(
                _LOCO_CACHE, src, version, lambda st: loco_table(st) if "units" in _tables(st.db) else pd.DataFrame()
            )
        except (sqlite3.Error, MDMTError, ValueError) as exc:
            problems.append(f"{src.path}: {exc}")
            continue
        if len(df):
            frames.append(df.assign(store=src.label))
    if not frames:
        return pd.DataFrame(), problems
    return pd.concat(frames, ignore_index=True), problems


_PAPER_CACHE: dict[tuple[str, str], tuple[pd.DataFrame, pd.DataFrame]] = {}


def _paper(st) -> tuple[pd.DataFrame, pd.DataFrame]:
    units = finished_units(st) if "units" in _tables(st.db) else []
    records = prognosis_records(st, units) if units else pd.DataFrame()
    if records.empty:
        return pd.DataFrame(), pd.DataFrame()
    tables = prognosis_tables(records)  # the same bootstrap as mdmt report, so the intervals agree
    return tables.methods, compare_methods(tables.backbones)


def paper_tables(sources: list[Source], version: str = "") -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """The report's method table (mean over backbones of pooled fold predictions, per protocol) and its
    paired tests, for every store (mdmt.results.report does the computing); cached per data version."""
    methods, tests, problems = [], [], []
    for src in sources:
        try:
            hit = _per_store(_PAPER_CACHE, src, version, _paper)
        except (sqlite3.Error, MDMTError, ValueError) as exc:
            problems.append(f"{src.path}: {exc}")
            continue
        if len(hit[0]):
            methods.append(hit[0].assign(store=src.label))
            tests.append(hit[1].assign(store=src.label))
    if not methods:
        return pd.DataFrame(), pd.DataFrame(), problems
    return pd.concat(methods, ignore_index=True), pd.concat(tests, ignore_index=True), problems


def loco_curves(sources: list[Source], table: pd.DataFrame) -> list[dict]:
    """For each held-out row of the LOCO table: the held-out site's histogram at the selected round, its ROC
    curve and its confusion matrix at the table's threshold; plus one pooled entry per method/backbone/seed."""
    out: list[dict] = []
    if table.empty:
        return out
    per_store = {s.label: (i, s) for i, s in enumerate(sources)}
    pooled: dict[tuple, list[tuple[np.ndarray, np.ndarray]]] = {}
    for r in table[~table["centre"].isin(["mean", "pooled"])].itertuples(index=False):
        _, src = per_store[r.store]
        unit_id = UnitKey(r.method, r.backbone, "loco", r.centre, int(r.seed)).unit_id
        with opened(src.path) as st:
            row = st.db.execute(
                "SELECT hist FROM eval_stats WHERE unit_id=? AND round=? AND site=? AND task=?",
                (unit_id, int(r.round), r.centre, PROGNOSIS),
            ).fetchone()
        if row is None or row["hist"] is None:
            continue
        hist = as_layout(json.loads(row["hist"]))
        thr = getattr(r, "threshold", 0.5)
        thr = 0.5 if thr is None or pd.isna(thr) else float(thr)
        cm = cm_at_bin(hist, edge_bin(thr))
        fpr, tpr = roc_from_hist(hist) if hist[0].sum() and hist[1].sum() else (np.array([]), np.array([]))
        out.append(
            {
                "store": r.store,
                "method": r.method,
                "backbone": r.backbone,
                "seed": int(r.seed),
                "centre": r.centre,
                "round": int(r.round),
                "threshold": thr,
                "cm": cm,
                "hist": hist,
                "fpr": fpr,
                "tpr": tpr,
                "auc": float(r.auc),  # the table's: the exact AUC the centre's site sent
            }
        )
        pooled.setdefault((r.store, r.method, r.backbone, int(r.seed)), []).append((cm, hist))
    for (store, method, backbone, seed), parts in pooled.items():
        if len(parts) < 2:  # one centre: its pooled curve is the centre's own
            continue
        hist = sum(p[1] for p in parts)
        fpr, tpr = roc_from_hist(hist) if hist[0].sum() and hist[1].sum() else (np.array([]), np.array([]))
        out.append(
            {
                "store": store,
                "method": method,
                "backbone": backbone,
                "seed": seed,
                "centre": "pooled",
                "round": None,
                "threshold": None,
                "cm": sum(p[0] for p in parts),
                "hist": hist,
                "fpr": fpr,
                "tpr": tpr,
                "auc": auc_from_hist(hist),
            }
        )
    return out


def loco_pending(runs: list[dict]) -> list[dict]:
    """LOCO units with a held-out centre that are not (yet) in the table: running or failed."""
    return [
        u
        for u in runs
        if u["protocol"] == "loco" and u["fold"] != "-" and (u["status"] != "done" or u.get("best_round") is None)
    ]


def comparison(table: pd.DataFrame) -> pd.DataFrame:
    """One row per (store, method, backbone, seed): the LOCO 'mean' and 'pooled' rows side by side."""
    if table.empty:
        return pd.DataFrame()
    keys = ["store", "method", "backbone", "seed"]
    centres = (
        table[~table["centre"].isin(["mean", "pooled"])]
        .groupby(keys)["centre"]
        .apply(lambda c: ",".join(sorted(c)))
        .rename("centres")
    )
    cols = ["n", "acc", "f1", "gmean", "auc", "auc_lo", "auc_hi"]
    mean = table[table["centre"] == "mean"].set_index(keys)[cols].add_prefix("mean_")
    pooled = table[table["centre"] == "pooled"].set_index(keys)[cols].add_prefix("pooled_")
    return pd.concat([centres, mean, pooled], axis=1).reset_index().sort_values(keys)
