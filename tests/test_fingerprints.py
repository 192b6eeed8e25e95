"""A unit's identity is its id plus its fingerprint: what a run does with each unit of the store (skip,
resume, run, refuse), the store's migration from schema 1, and the workspace lock."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import textwrap

import pytest

from mdmt.fed import plan
from mdmt.fed.config import RunConfig
from mdmt.fed.plan import SiteInfo, code_digest, decide_units, unit_keys
from mdmt.fed.workspace import OWNER_ENV, WorkspaceBusy, WorkspaceLock, read_holder
from mdmt.store import UNKNOWN_FINGERPRINT, RunStore, UnitKey


def _site(name: str, role: str = "prognosis", manifest: str = "") -> SiteInfo:
    task = "prognosis" if role == "prognosis" else "severity"
    counts = {f"{sp}-{task}": 10 for sp in ("train", "val", "test", "all")}
    return SiteInfo(name, role, counts, manifest or f"hash-{name}")


def _sites(*names: str, **manifests: str) -> dict[str, SiteInfo]:
    return {n: _site(n, "severity" if n == "BRIXIA" else "prognosis", manifests.get(n, "")) for n in names}


def _cfg(**kw) -> RunConfig:
    return RunConfig.from_mapping({"method": "mdmt", "holdouts": "A", "num-rounds": 2} | kw)


def _store_done(store: RunStore, cfg: RunConfig, sites: dict[str, SiteInfo]) -> UnitKey:
    """Record the config's first unit as done, with the fingerprint this run plans for it."""
    d = decide_units(cfg, unit_keys(cfg), sites, store)[0]
    store.start_unit(d.key, d.recipe["train-sites"], {}, {}, {}, "", d.fingerprint, d.recipe)
    store.finish_unit(d.key, "done", 2)
    return d.key


def _decide(cfg, sites, store):
    return decide_units(cfg, unit_keys(cfg), sites, store)[0]


def test_a_unit_trained_on_fewer_sites_is_not_the_unit_of_more(tmp_path):
    store = RunStore(tmp_path / "store.sqlite")
    two = _sites("A", "B", "BRIXIA")
    _store_done(store, _cfg(), two)
    assert _decide(_cfg(), two, store).action == "skip"
    seven = _sites("A", "B", "C", "D", "BRIXIA")
    refused = _decide(_cfg(), seven, store)
    assert refused.action == "refuse"
    assert "train-sites B,BRIXIA (now B,BRIXIA,C,D)" in refused.reason and "--rerun" in refused.reason
    assert "\n" not in refused.reason
    assert _decide(_cfg(rerun=True), seven, store).action == "run"


def test_a_changed_recipe_key_or_manifest_is_never_the_old_result(tmp_path):
    store = RunStore(tmp_path / "store.sqlite")
    sites = _sites("A", "B", "BRIXIA")
    _store_done(store, _cfg(), sites)
    for change, fragment in (
        (_cfg(**{"num-rounds": 3}), "num-rounds 2 (now 3)"),
        (_cfg(lr=0.01), "lr 0.001 (now 0.01)"),
    ):
        d = _decide(change, sites, store)
        assert d.action == "refuse" and fragment in d.reason, d.reason
    moved = _sites("A", "B", "BRIXIA", B="hash-B-v2")
    assert "manifest hashes" in _decide(_cfg(), moved, store).reason
    # Keys that do not change results keep the unit.
    same = _cfg(**{"round-timeout": 60, "num-workers": 1, "min-sites": 2, "device": "cpu", "workspace": "elsewhere"})
    assert _decide(same, sites, store).action == "skip"


def test_interrupted_units_resume_and_failed_ones_run_again(tmp_path):
    store = RunStore(tmp_path / "store.sqlite")
    sites = _sites("A", "B", "BRIXIA")
    d = _decide(_cfg(), sites, store)
    store.start_unit(d.key, ["B", "BRIXIA"], {}, {}, {}, "", d.fingerprint, d.recipe)
    assert _decide(_cfg(), sites, store).action == "resume"  # running: its owner is gone
    assert store.mark_interrupted() == [d.key.unit_id] and store.unit_status(d.key) == "interrupted"
    assert _decide(_cfg(), sites, store).action == "resume"
    assert _decide(_cfg(lr=0.01), sites, store).action == "run"  # another recipe: not resumed, not refused
    store.finish_unit(d.key, "failed", None, "boom")
    assert _decide(_cfg(), sites, store).action == "run"


def test_ft_changes_with_the_unit_it_starts_from(tmp_path):
    store = RunStore(tmp_path / "store.sqlite")
    cfg = _cfg(method="ft")
    sites = _sites("A", "B", "BRIXIA")
    first = decide_units(cfg, unit_keys(cfg), sites, store)
    assert [d.key.method for d in first] == ["stl_severity", "ft"]
    assert first[1].recipe["starts-from"] == first[0].fingerprint
    other = decide_units(cfg, unit_keys(cfg), _sites("A", "B", "BRIXIA", BRIXIA="hash-BRIXIA-v2"), store)
    assert other[1].fingerprint != first[1].fingerprint  # BRIXIA trains only stl_severity, yet ft changes too


def test_a_store_of_schema_1_is_migrated_and_its_units_never_reused(tmp_path):
    path = tmp_path / "old.sqlite"
    db = sqlite3.connect(path)
    db.executescript(
        textwrap.dedent(
            """
            CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
            INSERT INTO meta VALUES ('schema_version', '1');
            CREATE TABLE units (unit_id TEXT PRIMARY KEY, method TEXT NOT NULL, backbone TEXT NOT NULL,
                protocol TEXT NOT NULL, fold TEXT NOT NULL, seed INTEGER NOT NULL, status TEXT NOT NULL,
                started REAL, ended REAL, rounds_done INTEGER NOT NULL DEFAULT 0, best_round INTEGER,
                train_sites TEXT, eval_sites TEXT, flwr_run_id TEXT, config TEXT, manifest_hashes TEXT, message TEXT);
            INSERT INTO units (unit_id, method, backbone, protocol, fold, seed, status, rounds_done)
                VALUES ('mdmt/resnet18/loco/A/seed0', 'mdmt', 'resnet18', 'loco', 'A', 0, 'done', 2);
            """
        )
    )
    db.commit()
    db.close()
    store = RunStore(path)
    row = store.units()[0]
    assert row["fingerprint"] == UNKNOWN_FINGERPRINT and row["status"] == "done"
    assert store.db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0] == "2"
    d = _decide(_cfg(), _sites("A", "B", "BRIXIA"), store)
    assert d.action == "refuse" and "stored before fingerprints were kept" in d.reason


def test_one_writer_per_workspace(tmp_path, monkeypatch):
    monkeypatch.delenv(OWNER_ENV, raising=False)
    ws = tmp_path / "ws"
    holder = (
        "import sys, time\n"
        "from mdmt.fed.workspace import WorkspaceLock\n"
        "lock = WorkspaceLock(sys.argv[1]).acquire()\n"
        "print('held', flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", holder, str(ws)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(WorkspaceBusy) as err:
            WorkspaceLock(ws).acquire()
        assert f"in use by process {proc.pid}" in str(err.value) and "--wait" in str(err.value)
        assert "\n" not in str(err.value)
        # A process the holder started (it inherits the owner token) joins the run instead.
        monkeypatch.setenv(OWNER_ENV, read_holder(ws)["owner"])
        joined = WorkspaceLock(ws).acquire()
        assert joined.joined and not joined.held_here
        monkeypatch.delenv(OWNER_ENV)
    finally:
        proc.kill()
        proc.wait()
    # The kernel let go with the process (SIGKILL included): the workspace is free again.
    with WorkspaceLock(ws) as lock:
        assert lock.held_here and read_holder(ws)["pid"] == os.getpid()
        assert json.loads((ws / "workspace.lock").read_text())["owner"] == os.environ[OWNER_ENV]
    assert OWNER_ENV not in os.environ


def test_a_unit_of_other_training_code_is_never_the_old_result(tmp_path, monkeypatch):
    # The digest covers the training code: a changed training module changes it, the report does not.
    pkg = tmp_path / "pkg"
    for rel in ("fed/plan.py", "ml/train.py", "results/report/tables.py", "ops/cli.py", "errors.py"):
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text(f"# {rel}\n")
    (tmp_path / "server").mkdir()
    (tmp_path / "server" / "app.py").write_text("# server\n")
    extra = {"server": tmp_path / "server"}
    base = code_digest(pkg, extra)
    (pkg / "results/report/tables.py").write_text("# a new table\n")
    (pkg / "ops/cli.py").write_text("# a new verb\n")
    assert code_digest(pkg, extra) == base
    (pkg / "ml/train.py").write_text("# another optimiser\n")
    assert code_digest(pkg, extra) != base
    (pkg / "ml/train.py").write_text("# ml/train.py\n")
    (tmp_path / "server" / "app.py").write_text("# another aggregation\n")
    assert code_digest(pkg, extra) != base
    # A store unit of other code is refused with one line naming it.
    store = RunStore(tmp_path / "store.sqlite")
    sites = _sites("A", "B", "BRIXIA")
    _store_done(store, _cfg(), sites)
    monkeypatch.setattr(plan, "training_code_digest", lambda: "0123456789abcdef")
    d = _decide(_cfg(), sites, store)
    assert d.action == "refuse" and "training code" in d.reason and "(now 0123456789abcdef)" in d.reason, d.reason
