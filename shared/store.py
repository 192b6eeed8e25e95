"""The versioned SQLite run store: one writer per process, many readers (reports, dashboard).

The unit of work is (method, backbone, protocol, fold, seed), whatever grouping of Flower runs executed it.
Every per-round, per-site, per-task metric is a row of ``metrics``; the sufficient statistics behind
them (confusion counts, score histograms) are kept in ``eval_stats`` so pooled metrics and ROC curves
can be recomputed without the sites.

A unit's identity is its id plus its fingerprint (``units.fingerprint``, with what it covers in
``units.recipe``): the training and evaluation sites, their manifest hashes and every recipe key that
changes the result. A unit is done for a run only when both match (mdmt.fed.plan decides). Statuses:
running, done, failed, interrupted.

Schema versions: 1 (no fingerprints), 2. A version-1 store is migrated when opened for writing: its
units get the fingerprint ``unknown``, which matches no run, so they are never reused.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mdmt.errors import DataError

SCHEMA_VERSION = 2
UNKNOWN_FINGERPRINT = "unknown"  # units stored before fingerprints existed
STATUSES = ("running", "done", "failed", "interrupted")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS units (
    unit_id TEXT PRIMARY KEY,
    method TEXT NOT NULL, backbone TEXT NOT NULL, protocol TEXT NOT NULL, fold TEXT NOT NULL, seed INTEGER NOT NULL,
    status TEXT NOT NULL, started REAL, ended REAL, rounds_done INTEGER NOT NULL DEFAULT 0, best_round INTEGER,
    train_sites TEXT, eval_sites TEXT, flwr_run_id TEXT, config TEXT, manifest_hashes TEXT, message TEXT,
    fingerprint TEXT NOT NULL DEFAULT 'unknown', recipe TEXT
);
CREATE TABLE IF NOT EXISTS metrics (
    unit_id TEXT NOT NULL, round INTEGER NOT NULL, site TEXT NOT NULL, task TEXT NOT NULL, split TEXT NOT NULL,
    name TEXT NOT NULL, value REAL,
    PRIMARY KEY (unit_id, round, site, task, split, name)
);
CREATE TABLE IF NOT EXISTS eval_stats (
    unit_id TEXT NOT NULL, round INTEGER NOT NULL, site TEXT NOT NULL, task TEXT NOT NULL, split TEXT NOT NULL,
    n INTEGER NOT NULL, loss_sum REAL NOT NULL, cm TEXT NOT NULL, hist TEXT,
    PRIMARY KEY (unit_id, round, site, task, split)
);
CREATE TABLE IF NOT EXISTS participation (
    unit_id TEXT NOT NULL, round INTEGER NOT NULL, site TEXT NOT NULL, kind TEXT NOT NULL, status TEXT NOT NULL,
    detail TEXT, PRIMARY KEY (unit_id, round, site, kind)
);
CREATE TABLE IF NOT EXISTS events (
    unit_id TEXT NOT NULL, time REAL NOT NULL, round INTEGER NOT NULL, kind TEXT NOT NULL, detail TEXT
);
"""


def sparse_counts(table: list[list[int]]) -> dict[str, Any]:
    """A table of counts (a score histogram: one row per class) as the store keeps it: its shape and its
    nonzero cells as [row, column, count]. A split's few hundred scores fill few of the thousands of bins,
    so this is what keeps the store small (mdmt.ml.metrics.as_layout reads it back)."""
    rows = [list(map(int, row)) for row in table]
    cells = [[i, j, c] for i, row in enumerate(rows) for j, c in enumerate(row) if c]
    return {"shape": [len(rows), len(rows[0]) if rows else 0], "nonzero": cells}


@dataclass(frozen=True)
class UnitKey:
    method: str
    backbone: str
    protocol: str
    fold: str
    seed: int

    @property
    def unit_id(self) -> str:
        return f"{self.method}/{self.backbone}/{self.protocol}/{self.fold}/seed{self.seed}"

    @property
    def slug(self) -> str:
        return self.unit_id.replace("/", "__")


class RunStore:
    def __init__(self, path: str | Path, readonly: bool = False):
        self.path = Path(path)
        if readonly:
            if not self.path.is_file():
                raise DataError(f"{self.path}: run store not found; run an experiment first")
            self.db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=30)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(self.path, timeout=30)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.executescript(_SCHEMA)
            self._check_version()
        self.db.row_factory = sqlite3.Row

    def _check_version(self) -> None:
        row = self.db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        if row is None:
            with self.db:
                self.db.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            return
        version = int(row[0])
        if version == 1:
            self._migrate_from_v1()
        elif version != SCHEMA_VERSION:
            raise DataError(f"{self.path}: run store schema v{version}, this version reads v{SCHEMA_VERSION}")

    def _migrate_from_v1(self) -> None:
        """v1 -> v2: every stored unit gets the fingerprint 'unknown' (never reused by a run)."""
        columns = {r[1] for r in self.db.execute("PRAGMA table_info(units)")}
        with self.db:
            if "fingerprint" not in columns:
                self.db.execute(
                    f"ALTER TABLE units ADD COLUMN fingerprint TEXT NOT NULL DEFAULT '{UNKNOWN_FINGERPRINT}'"
                )
            if "recipe" not in columns:
                self.db.execute("ALTER TABLE units ADD COLUMN recipe TEXT")
            self.db.execute("UPDATE meta SET value=? WHERE key='schema_version'", (str(SCHEMA_VERSION),))

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        with self.db:
            yield self.db

    # ---- units ----------------------------------------------------------------------------------
    def unit_status(self, key: UnitKey) -> str | None:
        row = self.db.execute("SELECT status FROM units WHERE unit_id=?", (key.unit_id,)).fetchone()
        return row[0] if row else None

    def start_unit(
        self,
        key: UnitKey,
        train_sites: list[str],
        eval_sites: dict[str, str],
        config: dict[str, Any],
        manifest_hashes: dict[str, str],
        flwr_run_id: str = "",
        fingerprint: str = UNKNOWN_FINGERPRINT,
        recipe: dict[str, Any] | None = None,
    ) -> None:
        with self.tx() as db:
            for table in ("metrics", "eval_stats", "participation", "events"):
                db.execute(f"DELETE FROM {table} WHERE unit_id=?", (key.unit_id,))
            db.execute(
                "INSERT OR REPLACE INTO units (unit_id, method, backbone, protocol, fold, seed, status, started, "
                "rounds_done, train_sites, eval_sites, flwr_run_id, config, manifest_hashes, fingerprint, recipe) "
                "VALUES (?,?,?,?,?,?, 'running', ?, 0, ?, ?, ?, ?, ?, ?, ?)",
                (
                    key.unit_id,
                    key.method,
                    key.backbone,
                    key.protocol,
                    key.fold,
                    key.seed,
                    time.time(),
                    ",".join(train_sites),
                    json.dumps(eval_sites),
                    flwr_run_id,
                    json.dumps(config),
                    json.dumps(manifest_hashes),
                    fingerprint,
                    json.dumps(recipe) if recipe is not None else None,
                ),
            )

    def resume_unit(self, key: UnitKey, after_round: int, detail: str = "") -> None:
        """Continue an interrupted unit: rows of rounds after ``after_round`` go, the rest stay; the resume
        itself is kept as an event (``detail``: where it continued from)."""
        with self.tx() as db:
            for table in ("metrics", "eval_stats", "participation"):
                db.execute(f"DELETE FROM {table} WHERE unit_id=? AND round>?", (key.unit_id, after_round))
            db.execute(
                "UPDATE units SET status='running', rounds_done=?, message='' WHERE unit_id=?",
                (after_round, key.unit_id),
            )
            db.execute(
                "INSERT INTO events VALUES (?,?,?,?,?)", (key.unit_id, time.time(), after_round, "resumed", detail)
            )

    def log_event(self, key: UnitKey, rnd: int, kind: str, detail: str = "") -> None:
        """Something that happened to a unit outside its metrics: a resume, a site that left or rejoined."""
        with self.tx() as db:
            db.execute("INSERT INTO events VALUES (?,?,?,?,?)", (key.unit_id, time.time(), rnd, kind, detail))

    def events(self, unit_id: str) -> list[sqlite3.Row]:
        return self.db.execute("SELECT * FROM events WHERE unit_id=? ORDER BY time, rowid", (unit_id,)).fetchall()

    def participation(self, unit_id: str) -> list[sqlite3.Row]:
        return self.db.execute(
            "SELECT * FROM participation WHERE unit_id=? ORDER BY round, site, kind", (unit_id,)
        ).fetchall()

    def unit(self, key: UnitKey) -> sqlite3.Row | None:
        return self.db.execute("SELECT * FROM units WHERE unit_id=?", (key.unit_id,)).fetchone()

    def mark_interrupted(self, unit_ids: list[str] | None = None, message: str = "") -> list[str]:
        """Running units (all of them, or those named) become interrupted; returns their ids. A unit left
        running by a process that no longer holds the workspace was interrupted without a word (SIGKILL,
        out of memory): the next owner calls this first."""
        rows = self.db.execute("SELECT unit_id FROM units WHERE status='running'").fetchall()
        ids = [r[0] for r in rows if unit_ids is None or r[0] in unit_ids]
        with self.tx() as db:
            db.executemany(
                "UPDATE units SET status='interrupted', ended=?, message=? WHERE unit_id=?",
                [(time.time(), message, u) for u in ids],
            )
        return ids

    def finish_unit(self, key: UnitKey, status: str, best_round: int | None, message: str = "") -> None:
        with self.tx() as db:
            db.execute(
                "UPDATE units SET status=?, ended=?, best_round=?, message=? WHERE unit_id=?",
                (status, time.time(), best_round, message, key.unit_id),
            )

    def units(self) -> list[sqlite3.Row]:
        return self.db.execute("SELECT * FROM units ORDER BY unit_id").fetchall()

    # ---- per round ------------------------------------------------------------------------------
    def log_round(
        self,
        key: UnitKey,
        rnd: int,
        metrics: list[tuple[str, str, str, str, float]],
        stats: list[dict[str, Any]],
        participation: list[tuple[str, str, str, str]],
    ) -> None:
        """metrics: (site, task, split, name, value); stats: eval_stats rows;
        participation: (site, kind, status, detail)."""
        with self.tx() as db:
            db.executemany(
                "INSERT OR REPLACE INTO metrics VALUES (?,?,?,?,?,?,?)",
                [(key.unit_id, rnd, s, t, sp, n, None if v is None else float(v)) for s, t, sp, n, v in metrics],
            )
            db.executemany(
                "INSERT OR REPLACE INTO eval_stats VALUES (?,?,?,?,?,?,?,?,?)",
                [
                    (
                        key.unit_id,
                        rnd,
                        r["site"],
                        r["task"],
                        r["split"],
                        int(r["n"]),
                        float(r["loss_sum"]),
                        json.dumps(r["cm"]),
                        json.dumps(sparse_counts(r["hist"])) if r.get("hist") is not None else None,
                    )
                    for r in stats
                ],
            )
            db.executemany(
                "INSERT OR REPLACE INTO participation VALUES (?,?,?,?,?,?)",
                [(key.unit_id, rnd, s, k, st, d) for s, k, st, d in participation],
            )
            db.execute("UPDATE units SET rounds_done=MAX(rounds_done, ?) WHERE unit_id=?", (rnd, key.unit_id))

    def eval_stats(self, unit_id: str, rnd: int | None = None) -> list[sqlite3.Row]:
        if rnd is None:
            return self.db.execute(
                "SELECT * FROM eval_stats WHERE unit_id=? ORDER BY round, site", (unit_id,)
            ).fetchall()
        return self.db.execute(
            "SELECT * FROM eval_stats WHERE unit_id=? AND round=? ORDER BY site", (unit_id, rnd)
        ).fetchall()

    def metrics(self, unit_id: str) -> list[sqlite3.Row]:
        return self.db.execute(
            "SELECT * FROM metrics WHERE unit_id=? ORDER BY round, site, task, name", (unit_id,)
        ).fetchall()

    # ---- housekeeping ---------------------------------------------------------------------------
    def delete_units(self, unit_ids: list[str]) -> dict[str, int]:
        """Delete units and their metrics, eval_stats and participation rows in one transaction.
        Returns the number of rows deleted per table."""
        counts: dict[str, int] = {}
        with self.tx() as db:
            for table in ("metrics", "eval_stats", "participation", "events", "units"):
                cur = db.executemany(f"DELETE FROM {table} WHERE unit_id=?", [(u,) for u in unit_ids])
                counts[table] = max(cur.rowcount, 0)
        return counts
