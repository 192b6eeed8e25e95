"""A real Flower simulation (`flwr run` against a SuperLink the driver started): the held-out centre
never receives a train message, metrics reach the store, and every process started is stopped."""

from __future__ import annotations

import sqlite3

import pytest

from mdmt.fed.audit import read_message_log
from mdmt.store import RunStore

pytestmark = pytest.mark.slow


def test_held_out_site_never_trains_and_metrics_reach_store(sim_run):
    cfg, table, _ = sim_run
    sites_ws = cfg.workspace_path / "sites"
    logs = {s: read_message_log(sites_ws / s) for s in ("A", "B", "C", "BRIXIA")}
    # Every site was asked who it is; the held-out centre A only ever evaluated.
    for site, df in logs.items():
        assert "query" in set(df["message_type"]), site
    assert "train" not in set(logs["A"]["message_type"])
    # 3 LOCO methods x 2 rounds; stl_severity has no held-out centre and never asks A anything
    assert (logs["A"]["message_type"] == "evaluate").sum() == 6
    assert set(logs["A"]["split"][logs["A"]["message_type"] == "evaluate"]) == {"all"}
    # mdmt and stl_severity train the severity site; stl_prognosis never does.
    brixia_train = logs["BRIXIA"][logs["BRIXIA"]["message_type"] == "train"]
    assert set(brixia_train["unit_id"]) == {"mdmt/resnet18/loco/A/seed0", "stl_severity/resnet18/loco/-/seed0"}
    # the centralised reference pools B, C and BRIXIA into one simulated site: one train message per round, to B
    central = "centralised_mdmt/resnet18/loco/A/seed0"
    for s, n in (("B", 2), ("C", 0), ("BRIXIA", 0)):
        train = logs[s][logs[s]["message_type"] == "train"]
        assert (train["unit_id"] == central).sum() == n, s
    for s in ("B", "C"):
        prog_units = {"mdmt/resnet18/loco/A/seed0", "stl_prognosis/resnet18/loco/A/seed0"}
        train = logs[s][logs[s]["message_type"] == "train"]
        assert train["unit_id"].isin(prog_units).sum() == 4, s

    db = sqlite3.connect(cfg.store_path)
    units = dict(db.execute("SELECT unit_id, status FROM units").fetchall())
    assert units == {
        "mdmt/resnet18/loco/A/seed0": "done",
        "stl_prognosis/resnet18/loco/A/seed0": "done",
        "centralised_mdmt/resnet18/loco/A/seed0": "done",
        "stl_severity/resnet18/loco/-/seed0": "done",
    }
    rows = db.execute(
        "SELECT round, site, task, split, name FROM metrics WHERE unit_id='mdmt/resnet18/loco/A/seed0'"
    ).fetchall()
    assert {r[0] for r in rows} == {1, 2}
    assert (1, "A", "prognosis", "all", "auc") in rows and (2, "A", "prognosis", "all", "acc") in rows
    assert (2, "BRIXIA", "severity", "val", "acc") in rows
    assert (1, "*", "prognosis", "val", "threshold") in rows
    sizes = dict(
        db.execute(
            "SELECT name, value FROM metrics WHERE unit_id='mdmt/resnet18/loco/A/seed0' AND round=1 AND site='B' "
            "AND name IN ('bytes_down', 'bytes_up')"
        ).fetchall()
    )
    # the full fp32 model goes out (resnet18 with both heads is ~45 MB); the update comes back as fp16
    # (update-compression's default): half, but for the few integer buffers that travel as they are
    assert 40e6 < sizes["bytes_down"] < 50e6
    assert sizes["bytes_up"] == pytest.approx(sizes["bytes_down"] / 2, rel=0.001)
    trained = db.execute("SELECT DISTINCT site FROM participation WHERE kind='train' AND status='ok'").fetchall()
    assert "A" not in {t[0] for t in trained}


def test_loco_table_has_centre_mean_and_pooled_rows(sim_run):
    cfg, table, lines = sim_run
    assert set(table["method"]) == {"mdmt", "stl_prognosis", "centralised_mdmt"}
    for method in ("mdmt", "stl_prognosis", "centralised_mdmt"):
        rows = table[table["method"] == method]
        assert list(rows["centre"]) == ["A", "mean", "pooled"]
        a = rows[rows["centre"] == "A"].iloc[0]
        # the held-out centre is scored on all its images
        store = RunStore(cfg.store_path, readonly=True)
        n_a = [
            r["n"]
            for r in store.eval_stats(f"{method}/resnet18/loco/A/seed0", int(a["round"]))
            if r["site"] == "A" and r["task"] == "prognosis"
        ]
        store.close()
        assert int(a["n"]) == n_a[0] > 0
        assert 0.0 <= a["acc"] <= 1.0 and a["auc_lo"] <= a["auc"] <= a["auc_hi"]
        assert 0.0 < a["threshold"] <= 1.0
        pooled = rows[rows["centre"] == "pooled"].iloc[0]
        assert pooled["n"] == a["n"] and pooled["acc"] == a["acc"]  # one centre: pooled == that centre
    assert any("| mdmt | resnet18 | pooled |" in line for line in lines)


def test_checkpoints_carry_config_and_manifest_hashes(sim_run):
    from mdmt.data.manifest import manifest_hash
    from mdmt.fed.checkpoint import load_checkpoint

    cfg, _, _ = sim_run
    ck = load_checkpoint(cfg.workspace_path / "checkpoints" / "mdmt__resnet18__loco__A__seed0" / "best.pt")
    assert ck["config"]["method"] == "mdmt" and ck["config"]["fold"] == "A"
    assert ck["manifest_hashes"] == {s: manifest_hash(cfg.fed_path / s) for s in ("B", "BRIXIA", "C")}
    latest = load_checkpoint(cfg.workspace_path / "checkpoints" / "mdmt__resnet18__loco__A__seed0" / "latest.pt")
    assert latest["round"] == 2
    assert set(ck["state_dict"]) == set(latest["state_dict"])


def test_driver_stopped_every_process_it_started(sim_run):
    from pathlib import Path

    cfg, _, _ = sim_run
    home = str(cfg.workspace_path / "flwr")
    leftovers = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if f"FLWR_HOME={home}".encode() in (entry / "environ").read_bytes():
                    leftovers.append(int(entry.name))
            except OSError:
                pass
    assert leftovers == [] or all(_zombie(p) for p in leftovers), leftovers


def _zombie(pid: int) -> bool:
    try:
        return open(f"/proc/{pid}/stat").read().split(") ", 1)[1][0] == "Z"
    except OSError:
        return True


def test_every_loco_auc_matches_sklearn_on_the_sites_predictions(sim_run):
    """The sites' per-sample predictions stay in their own workspace; the AUCs the server reports must
    still be theirs: a centre's AUC exactly (its site sent it), the pooled one within the stated bound
    (from the logit-binned histograms), and every per-site AUC in the store."""
    import numpy as np
    import pandas as pd
    from sklearn.metrics import roc_auc_score

    from mdmt.ml.metrics import POOLED_AUC_BOUND

    cfg, table, _ = sim_run
    sites_ws = cfg.workspace_path / "sites"

    def exact(site: str, unit_id: str, rnd: int, split: str) -> float:
        df = pd.read_csv(sites_ws / site / "predictions" / unit_id.replace("/", "__") / f"round-{rnd:03d}-{split}.csv")
        df = df[df["y_prog"] >= 0]
        return roc_auc_score(df["y_prog"], df["p_severe"]) if df["y_prog"].nunique() == 2 else float("nan")

    checked = 0
    for method in ("mdmt", "stl_prognosis", "centralised_mdmt"):
        rows = table[table["method"] == method].set_index("centre")
        unit_id = f"{method}/resnet18/loco/A/seed0"
        truth = exact("A", unit_id, int(rows.loc["A", "round"]), "all")
        assert not np.isnan(truth), method  # the small federation's centre A has both classes
        assert rows.loc["A", "auc"] == pytest.approx(truth, abs=1e-12), method
        assert rows.loc["mean", "auc"] == pytest.approx(truth, abs=1e-12), method
        assert abs(rows.loc["pooled", "auc"] - truth) <= POOLED_AUC_BOUND, method
        db = sqlite3.connect(cfg.store_path)
        stored = db.execute(
            "SELECT round, site, split, value FROM metrics WHERE unit_id=? AND task='prognosis' AND name='auc'",
            (unit_id,),
        ).fetchall()
        db.close()
        assert {(r, s) for r, s, _, _ in stored} >= {(1, "A"), (2, "A"), (1, "B"), (2, "B")}
        for rnd, site, split, value in stored:
            want = exact(site, unit_id, rnd, split)
            assert (value is None and np.isnan(want)) or value == pytest.approx(want, abs=1e-12), (unit_id, rnd, site)
            checked += 1
    assert checked >= 12
