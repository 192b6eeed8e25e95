"""mdmt.results.runs and `mdmt runs list|export|delete` on a hand-made run store."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pandas as pd
import pytest

from mdmt.errors import MDMTError
from mdmt.ops.cli import main
from mdmt.results import runs
from mdmt.store import RunStore, UnitKey

ROOT = Path(__file__).resolve().parents[1]
KEYS = [
    UnitKey("mdmt", "resnet18", "loco", "A", 0),
    UnitKey("mdmt", "resnet18", "loco", "B", 0),
    UnitKey("stl_prognosis", "resnet18", "loco", "A", 0),
    UnitKey("mdmt", "densenet121", "cv", "0", 0),
]


@pytest.fixture
def store_path(tmp_path) -> Path:
    """Four units: two finished with two rounds each, one failed before any round, one running."""
    path = tmp_path / "store.sqlite"
    st = RunStore(path)
    for i, key in enumerate(KEYS):
        st.start_unit(key, ["B", "C"], {"A": "all"}, {"seed": 0}, {})
        if i == 2:
            st.finish_unit(key, "failed", None, "round 1: only 0 of 2 sites trained")
            continue
        for rnd in (1, 2):
            st.log_round(
                key,
                rnd,
                [("*", "prognosis", "val", "monitored_loss", 1.0 / rnd), ("B", "all", "train", "loss", 2.0 / rnd)],
                [
                    {
                        "site": "A",
                        "task": "prognosis",
                        "split": "all",
                        "n": 4,
                        "loss_sum": 1.0,
                        "cm": [[1, 1], [1, 1]],
                        "hist": None,
                    }
                ],
                [("B", "train", "ok", "")],
            )
        if i != 3:
            st.finish_unit(key, "done", 2)
    st.close()
    return path


def _count(path: Path, table: str, unit_id: str) -> int:
    db = sqlite3.connect(path)
    try:
        return db.execute(f"SELECT count(*) FROM {table} WHERE unit_id=?", (unit_id,)).fetchone()[0]
    finally:
        db.close()


def test_list_filters_by_pattern_and_formats_times(store_path):
    st = RunStore(store_path, readonly=True)
    try:
        everything = runs.list_units(st, [])
        mdmt_loco = runs.list_units(st, ["mdmt/*/loco/*"])
        two = runs.list_units(st, ["*/cv/*", "stl_*"])
        none = runs.list_units(st, ["nothing*"])
    finally:
        st.close()
    assert list(everything.columns) == runs.UNIT_COLUMNS
    assert len(everything) == 4
    assert mdmt_loco["unit_id"].tolist() == ["mdmt/resnet18/loco/A/seed0", "mdmt/resnet18/loco/B/seed0"]
    assert sorted(two["unit_id"]) == ["mdmt/densenet121/cv/0/seed0", "stl_prognosis/resnet18/loco/A/seed0"]
    row = everything.set_index("unit_id").loc["mdmt/resnet18/loco/A/seed0"]
    assert row["status"] == "done" and row["rounds_done"] == 2 and row["best_round"] == 2
    assert abs((datetime.fromisoformat(row["ended"]) - datetime.now().astimezone()).total_seconds()) < 600
    running = everything.set_index("unit_id").loc["mdmt/densenet121/cv/0/seed0"]
    assert running["ended"] == "" and pd.isna(running["best_round"])
    failed = everything.set_index("unit_id").loc["stl_prognosis/resnet18/loco/A/seed0"]
    assert failed["message"] == "round 1: only 0 of 2 sites trained"
    text = runs.format_units(everything)
    assert "4 unit(s): 2 done, 1 failed, 1 running" in text and "mdmt/resnet18/loco/B/seed0" in text
    assert runs.format_units(none) == "no matching units"


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_export_long_table(store_path, tmp_path, suffix):
    out = tmp_path / f"units{suffix}"
    st = RunStore(store_path, readonly=True)
    try:
        msg = runs.export_units(st, out, ["mdmt/resnet18/*", "stl_*"])
    finally:
        st.close()
    df = pd.read_csv(out) if suffix == ".csv" else pd.read_parquet(out)
    assert msg == f"exported 3 unit(s) and 8 metric row(s) to {out}"
    # two finished units x 2 rounds x 2 metrics, plus one row for the failed unit without metrics
    assert len(df) == 9 and set(df["unit_id"]) == {k.unit_id for k in KEYS[:3]}
    loss = df[(df.unit_id == KEYS[1].unit_id) & (df.name == "loss") & (df["round"] == 2)]
    assert loss["value"].tolist() == [1.0] and loss["site"].tolist() == ["B"]
    assert df[df.unit_id == KEYS[2].unit_id]["name"].isna().all()


def test_export_unknown_suffix_is_a_one_line_error(store_path, tmp_path, capsys):
    st = RunStore(store_path, readonly=True)
    try:
        with pytest.raises(MDMTError, match=r"units\.xlsx: unknown export format '\.xlsx'; name the file"):
            runs.export_units(st, tmp_path / "units.xlsx", [])
    finally:
        st.close()
    assert main(["runs", "export", "--store", str(store_path), "--out", str(tmp_path / "u.json")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown export format '.json'" in err and not (tmp_path / "u.json").exists()


def test_delete_needs_yes_then_removes_every_row(store_path, capsys):
    target = KEYS[0].unit_id
    assert main(["runs", "delete", "mdmt/resnet18/loco/A/*", "--store", str(store_path)]) == 0
    out = capsys.readouterr().out
    assert "would delete 1 unit(s)" in out and target in out and "--yes" in out
    assert _count(store_path, "units", target) == 1 and _count(store_path, "metrics", target) == 4

    assert main(["runs", "delete", "mdmt/resnet18/loco/A/*", "--store", str(store_path), "--yes"]) == 0
    out = capsys.readouterr().out
    assert "deleted 1 unit(s) and their rows (4 metrics, 2 eval_stats, 2 participation)" in out
    for table in ("units", "metrics", "eval_stats", "participation"):
        assert _count(store_path, table, target) == 0, table
    other = KEYS[1].unit_id
    assert _count(store_path, "units", other) == 1 and _count(store_path, "metrics", other) == 4

    assert main(["runs", "delete", "nothing*", "--store", str(store_path), "--yes"]) == 0
    assert "no matching units" in capsys.readouterr().out


def test_cli_list_and_export_in_a_subprocess(store_path, tmp_path):
    def mdmt(*args):
        return subprocess.run(
            [sys.executable, "-m", "mdmt.ops.cli", "runs", *args, "--store", str(store_path)],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )

    r = mdmt("list", "*/loco/*")
    assert r.returncode == 0, r.stderr
    assert "3 unit(s): 2 done, 1 failed" in r.stdout and "cv" not in r.stdout
    r = mdmt("export", "--out", str(tmp_path / "all.parquet"))
    assert r.returncode == 0, r.stderr
    assert len(pd.read_parquet(tmp_path / "all.parquet")) == 4 * 3 + 1
    r = subprocess.run(
        [sys.executable, "-m", "mdmt.ops.cli", "runs", "list", "--store", str(tmp_path / "missing.sqlite")],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert r.returncode == 2 and "run store not found" in r.stderr and "Traceback" not in r.stderr
