"""The oracle ceiling of a synthetic federation beside the results: read from the ``synth.json`` at the root of
each units' ``fed-dir`` (mdmt.data.synth writes it), or one line saying why there is none."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from mdmt.store import RunStore

CEILING_COLUMNS = ["fed_dir", "source", "n", "oracle_acc", "oracle_auc"]
NOT_SYNTHETIC = "no oracle ceiling: not a synthetic federation"


def unit_fed_dir(unit: sqlite3.Row) -> str | None:
    """The run config's 'fed-dir' of a unit (None when the config has none or is not JSON)."""
    try:
        value = json.loads(unit["config"] or "{}").get("fed-dir")
    except (json.JSONDecodeError, AttributeError):
        return None
    return str(value) if value else None


def resolve_fed_dir(fed_dir: str, store_path: Path, cwd: Path | None = None) -> Path | None:
    """The federation folder: an absolute path as is; a relative one against the current folder, then against
    the store's folder and each folder above it (a store in docs/results/<name>/ of a checkout whose fed-dir
    is relative to the checkout's root). An absolute path that is gone (a store made in another checkout) is
    looked for by its last two parts the same way. None if no candidate is a folder."""
    path = Path(fed_dir).expanduser()
    if path.is_absolute():
        if path.is_dir():
            return path
        path = Path(*path.parts[-2:])
    folder = Path(store_path).resolve().parent
    for base in (Path.cwd() if cwd is None else cwd, folder, *folder.parents):
        if (base / path).is_dir():
            return base / path
    return None


def shown_path(fed_dir: str, folder: Path, cwd: Path | None = None) -> str:
    """The fed-dir as a report shows it: as the units' config names it, but an absolute path inside the
    current folder relative to it (run configs hold absolute paths; a report committed with a checkout
    names no machine's folders)."""
    if not Path(fed_dir).is_absolute():
        return fed_dir
    base, resolved = (Path.cwd() if cwd is None else cwd).resolve(), folder.resolve()
    return resolved.relative_to(base).as_posix() if resolved.is_relative_to(base) else fed_dir


def read_ceiling(fed_dir: str, folder: Path) -> tuple[list[dict], str]:
    """Rows of the ceiling in ``folder``/synth.json and the line shown under the methods table."""
    summary = folder / "synth.json"
    if not summary.is_file():
        return [], f"{NOT_SYNTHETIC} ({fed_dir} holds no synth.json)"
    try:
        ceiling = json.loads(summary.read_text())["ceiling"]
        gen, exact = ceiling.get("generated") or {}, ceiling.get("exact") or {}
    except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        return [], f"no oracle ceiling: {summary} has no readable 'ceiling' ({type(exc).__name__}: {exc})"
    rows = []
    if gen:
        rows.append(
            {
                "fed_dir": fed_dir,
                "source": "generated",
                "n": gen.get("n"),
                "oracle_acc": gen.get("acc_bayes"),
                "oracle_auc": gen.get("auc"),
            }
        )
    if exact:
        rows.append(
            {
                "fed_dir": fed_dir,
                "source": "model (exact)",
                "n": np.nan,
                "oracle_acc": exact.get("acc"),
                "oracle_auc": exact.get("auc"),
            }
        )
    if not rows:
        return [], f"no oracle ceiling: {summary} has an empty 'ceiling'"
    parts = []
    if gen:
        parts.append(
            f"ACC {_pct(gen.get('acc_bayes'))}, AUC {_dec(gen.get('auc'))} on the federation's {gen.get('n')} "
            "prognosis patients (Bayes rule on the exact global score)"
        )
    if exact:
        parts.append(f"the generative model exactly: ACC {_pct(exact.get('acc'))}, AUC {_dec(exact.get('auc'))}")
    return rows, f"Oracle ceiling ({fed_dir}, synth.json): " + "; ".join(parts) + "."


def _pct(v) -> str:
    return "-" if v is None else f"{100 * float(v):.1f}%"


def _dec(v) -> str:
    return "-" if v is None else f"{float(v):.3f}"


def oracle_ceilings(
    store: RunStore, units: Iterable[sqlite3.Row], cwd: Path | None = None
) -> tuple[pd.DataFrame, dict[str | None, str]]:
    """The ceiling rows of every fed-dir the units ran on (fed_dir, source, n, oracle ACC, oracle AUC; source
    'generated' = the federation's actual prognosis patients, 'model (exact)' = the generative model) and, per
    fed-dir (None: units without one), one line: the ceiling, or why there is none. Never raises on a missing
    or non-synthetic folder."""
    fed_dirs = list(dict.fromkeys(unit_fed_dir(u) for u in units))
    rows: list[dict] = []
    lines: dict[str | None, str] = {}
    for fed_dir in fed_dirs:
        if fed_dir is None:
            lines[fed_dir] = "no oracle ceiling: the units' config names no fed-dir"
            continue
        folder = resolve_fed_dir(fed_dir, store.path, cwd)
        if folder is None:
            lines[fed_dir] = (
                f"no oracle ceiling: fed-dir {fed_dir} not found (looked in the current folder and above the store)"
            )
            continue
        found, lines[fed_dir] = read_ceiling(shown_path(fed_dir, folder, cwd), folder)
        rows += found
    return pd.DataFrame(rows, columns=CEILING_COLUMNS), lines
