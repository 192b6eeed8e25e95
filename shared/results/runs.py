"""List, export and delete units of a run store (``mdmt runs list|export|delete``)."""

from __future__ import annotations

import fnmatch
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd

from mdmt.errors import MDMTError
from mdmt.store import RunStore

UNIT_COLUMNS = [
    "unit_id",
    "method",
    "backbone",
    "protocol",
    "fold",
    "seed",
    "status",
    "rounds_done",
    "best_round",
    "started",
    "ended",
    "message",
]
EXPORT_FORMATS = (".csv", ".parquet")


def _iso(ts: float | None) -> str:
    """A Unix time as local ISO 8601 with its UTC offset; '' when unset."""
    if ts is None or pd.isna(ts):
        return ""
    return datetime.fromtimestamp(float(ts), tz=UTC).astimezone().isoformat(timespec="seconds")


def matches(unit_id: str, patterns: list[str]) -> bool:
    """Shell-style (fnmatch, case-sensitive) match against any pattern; no pattern matches everything."""
    return not patterns or any(fnmatch.fnmatchcase(unit_id, p) for p in patterns)


def list_units(store: RunStore, patterns: list[str]) -> pd.DataFrame:
    """The units whose id matches any of ``patterns``, one row each, times as ISO strings."""
    rows = [{c: u[c] for c in UNIT_COLUMNS} for u in store.units() if matches(u["unit_id"], patterns)]
    df = pd.DataFrame(rows, columns=UNIT_COLUMNS)
    df["started"] = df["started"].map(_iso)
    df["ended"] = df["ended"].map(_iso)
    df["best_round"] = df["best_round"].astype("Int64")
    df["message"] = df["message"].fillna("")
    return df


def format_units(df: pd.DataFrame) -> str:
    """A plain-text table of ``list_units`` with a count per status."""
    if df.empty:
        return "no matching units"
    counts = ", ".join(f"{n} {status}" for status, n in df["status"].value_counts().sort_index().items())
    shown = df.drop(columns=["method", "backbone", "protocol", "fold", "seed"]).astype("string").fillna("-")
    shown = shown.replace("", "-")
    left = {c: f"{{:<{int(shown[c].str.len().max())}}}".format for c in shown.columns}
    return shown.to_string(index=False, formatters=left, justify="left") + f"\n{len(df)} unit(s): {counts}"


def export_units(store: RunStore, path: Path, patterns: list[str]) -> str:
    """Write the matching units and their metric rows as one long table (a unit without metrics keeps one
    row with empty metric columns) to a .csv or .parquet file."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in EXPORT_FORMATS:
        raise MDMTError(f"{path}: unknown export format '{path.suffix}'; name the file *.csv or *.parquet")
    units = list_units(store, patterns)
    metrics = pd.read_sql("SELECT unit_id, round, site, task, split, name, value FROM metrics", store.db)
    long = units.merge(metrics[metrics["unit_id"].isin(units["unit_id"])], on="unit_id", how="left")
    long["round"] = long["round"].astype("Int64")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if suffix == ".csv":
            long.to_csv(path, index=False)
        else:
            long.to_parquet(path, index=False)
    except OSError as exc:
        raise MDMTError(f"{path}: cannot write the export ({exc.strerror or exc}); choose another --out") from None
    n_metrics = int(long["name"].notna().sum())
    return f"exported {len(units)} unit(s) and {n_metrics} metric row(s) to {path}"


def delete_units(store: RunStore, patterns: list[str], yes: bool) -> str:
    """Without ``yes``: list what would be deleted. With it: delete those units and every row they own."""
    units = list_units(store, patterns)
    if units.empty:
        return "no matching units; nothing to delete"
    listing = "\n".join(f"  {u} ({s})" for u, s in zip(units["unit_id"], units["status"]))
    if not yes:
        return (
            f"would delete {len(units)} unit(s) with their metrics, eval_stats and participation rows:\n"
            f"{listing}\nrun again with --yes to delete them"
        )
    counts = store.delete_units(units["unit_id"].tolist())
    rows = ", ".join(f"{counts[t]} {t}" for t in ("metrics", "eval_stats", "participation"))
    return f"deleted {counts['units']} unit(s) and their rows ({rows}):\n{listing}"
