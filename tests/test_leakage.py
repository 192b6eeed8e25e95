"""No leakage from the held-out centre: it is in no training or validation split of its fold, and the
round selection, the learning-rate schedule and the decision threshold do not depend on its data.

Real Flower simulations run the same MDMT and STL units three ways: cold (sites rebuild everything per
message, one unit at a time), warm (sites keep their data and models between messages), and warm with the
units in lockstep, where the held-out centre's labels are also flipped and its images shuffled. Everything
the server decides must come out bit-identical between the first and the last, and the final models of all
three runs too: the runs are deterministic (seeds from the config and the site names, replies aggregated
in site order, never in arrival order, the same arithmetic whether a site is warm or not).
"""

from __future__ import annotations

import json
import shutil
import sqlite3

import pytest
import torch

from mdmt.data.manifest import read_manifest, write_manifest
from mdmt.data.splits import federation_splits
from mdmt.fed.checkpoint import load_checkpoint
from mdmt.ml.metrics import as_layout

pytestmark = pytest.mark.slow

SITES = "A,B,C,BRIXIA"
UNITS = ("mdmt__resnet18__loco__A__seed0", "stl_prognosis__resnet18__loco__A__seed0")
MODES = {
    "original": {"site-cache": False, "concurrent-units": 1, "pack-arrays": False},  # one Flower Array per tensor
    "warm": {"site-cache": True, "concurrent-units": 1},
    "altered": {"site-cache": True, "concurrent-units": 2},
}


def _decisions(store_path):
    db = sqlite3.connect(store_path)
    try:
        best = db.execute("SELECT best_round FROM units WHERE unit_id='mdmt/resnet18/loco/A/seed0'").fetchone()[0]
        rows = db.execute(
            "SELECT round, name, value FROM metrics WHERE unit_id='mdmt/resnet18/loco/A/seed0' AND "
            "(site='*' OR split IN ('train', 'val')) ORDER BY round, site, task, split, name"
        ).fetchall()
        held = db.execute(
            "SELECT round, hist FROM eval_stats WHERE unit_id='mdmt/resnet18/loco/A/seed0' AND site='A' ORDER BY round"
        ).fetchall()
    finally:
        db.close()
    # wall times and transport sizes (a packed record's bytes differ from per-tensor ones) are not decisions
    skip = ("seconds", "train_seconds", "bytes_down", "bytes_up")
    return best, [(r, n, v) for r, n, v in rows if n not in skip], held


@pytest.fixture(scope="module")
def twin_runs(small_federation, tmp_path_factory):
    from mdmt.ops.loco import loco

    altered = tmp_path_factory.mktemp("altered") / "federation"
    shutil.copytree(small_federation, altered)
    man = read_manifest(altered / "A")
    man["prognosis"] = man["prognosis"].map({"MILD": "SEVERE", "SEVERE": "MILD"})
    files = [altered / "A" / p for p in man["image"]]
    blobs = [f.read_bytes() for f in files]
    for f, b in zip(files, blobs[::-1]):  # every image now sits under another patient's row
        f.write_bytes(b)
    write_manifest(altered / "A", man)
    out = {}
    for name, fed in (("original", small_federation), ("warm", small_federation), ("altered", altered)):
        ws = tmp_path_factory.mktemp(f"ws-{name}")
        loco(
            {
                "fed-dir": str(fed),
                "workspace": str(ws),
                "method": "mdmt,stl_prognosis",
                "backbone": "resnet18",
                "num-rounds": 3,
                "image-size": 32,
                "holdouts": "A",
                "sites": SITES,
                "batch-size": 16,
                "seed": 0,
                "select-after": 0,
                "patience": 0,
                "lr-patience": 1,
                "lr-factor": 0.5,
            }
            | MODES[name],
            echo=lambda *_: None,
        )
        out[name] = _decisions(ws / "store.sqlite")
        out[name + "-models"] = [load_checkpoint(ws / "checkpoints" / u / "latest.pt")["state_dict"] for u in UNITS]
    return out


def test_held_out_centre_is_in_no_training_or_validation_split(small_federation):
    from mdmt.data.manifest import list_sites

    tables = {s: read_manifest(small_federation / s) for s in list_sites(small_federation)}
    splits = federation_splits(tables, ["A", "B", "C", "D", "E", "F"], seed=0)
    for centre in "ABCDEF":
        fold = splits[(splits["protocol"] == "loco") & (splits["fold"] == centre)]
        own = fold[fold["site"] == centre]
        assert len(own) == len(tables[centre]) and set(own["role"]) == {"test"}
        others = fold[fold["site"] != centre]
        assert not set(zip(own["site"], own["image"])) & set(zip(others["site"], others["image"]))


def test_selection_threshold_and_lr_ignore_the_held_out_centre(twin_runs):
    best_a, decisions_a, held_a = twin_runs["original"]
    best_b, decisions_b, held_b = twin_runs["altered"]
    assert best_a == best_b
    # Monitored loss, lr, threshold and every training-site train/val metric: identical, round by round.
    assert decisions_a == decisions_b
    names = {n for _, n, _ in decisions_a}
    assert {"monitored_loss", "lr", "threshold"} <= names
    # ... while the held-out centre itself did change (its histograms are mirrored by the label flip).
    assert [h for _, h in held_a] != [h for _, h in held_b]
    hist_a, hist_b = (as_layout(json.loads(held[-1][1])) for held in (held_a, held_b))  # nonzero cells
    assert hist_a[0].sum() == hist_b[1].sum() and hist_a[1].sum() == hist_b[0].sum()


@pytest.mark.parametrize("other", ["warm", "altered"])
def test_the_final_models_are_bit_identical_cold_warm_and_in_lockstep(twin_runs, other):
    """cold with one Flower Array per tensor; warm and in lockstep with packed arrays (the default)"""
    for a, b in zip(twin_runs["original-models"], twin_runs[f"{other}-models"]):
        assert a.keys() == b.keys() and len(a) > 100
        different = [k for k in a if not torch.equal(a[k], b[k])]
        assert different == [], f"{len(different)} tensors differ, e.g. {different[:3]}"
