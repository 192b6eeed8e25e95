"""The federation's split file: LOCO and patient-level k-fold CV, reproducible, and the same LOCO
splits the trainer uses."""

from __future__ import annotations

import subprocess
import sys

import pandas as pd
import pytest

from mdmt.data.manifest import list_sites, read_manifest
from mdmt.data.splits import federation_splits
from mdmt.fed.config import RunConfig
from mdmt.fed.sitedata import SiteLocation, manifest_splits

PROG = ["A", "B", "C", "D", "E", "F"]


@pytest.fixture(scope="module")
def tables(small_federation):
    t = {s: read_manifest(small_federation / s) for s in list_sites(small_federation)}
    # plant a consensus set on BRIXIA: its rows must be test under every protocol
    b = t["BRIXIA"].copy()
    b["ConsensusTestset"] = ["1" if i % 10 == 0 else "0" for i in range(len(b))]
    t["BRIXIA"] = b
    return t


@pytest.fixture(scope="module")
def splits(tables):
    return federation_splits(tables, PROG, seed=0)


def _patients(tables):
    return {(s, img): pid for s, t in tables.items() for img, pid in zip(t["image"], t["patient_id"])}


def test_loco_holds_out_each_centre_entirely(splits, tables):
    loco = splits[splits["protocol"] == "loco"]
    assert sorted(loco["fold"].unique()) == PROG
    for h in PROG:
        fold = loco[loco["fold"] == h]
        assert (fold.loc[fold["site"] == h, "role"] == "test").all()
        others = fold[(fold["site"] != h) & (fold["site"] != "BRIXIA")]
        assert set(others["role"]) == {"train", "val"}
        assert len(fold) == sum(len(t) for t in tables.values())


def test_cv_each_image_tested_once_and_val_is_next_fold(splits):
    cv = splits[(splits["protocol"] == "cv") & (splits["site"] != "BRIXIA")]
    tested = cv[cv["role"] == "test"].groupby(["site", "image"]).size()
    assert (tested == 1).all() and len(tested) == cv[["site", "image"]].drop_duplicates().shape[0]
    wide = cv.pivot_table(index=["site", "image"], columns="fold", values="role", aggfunc="first")
    for k in range(5):
        nxt = str((k + 1) % 5)
        # an image tested in fold k+1 is the validation of fold k
        assert ((wide[nxt] == "test") == (wide[str(k)] == "val")).all()


def test_no_patient_straddles_roles_within_a_fold(splits, tables):
    pid = _patients(tables)
    s = splits.assign(pid=[pid[(a, b)] for a, b in zip(splits["site"], splits["image"])])
    roles = s.groupby(["protocol", "fold", "site", "pid"])["role"].nunique()
    assert (roles == 1).all()


def test_cv_is_stratified_by_class_within_each_centre(splits, tables):
    cv = splits[(splits["protocol"] == "cv") & (splits["role"] == "test") & (splits["site"] == "F")]
    labels = tables["F"].set_index("image")["prognosis"]
    per_fold = cv.assign(y=cv["image"].map(labels)).groupby("fold")["y"].value_counts().unstack(fill_value=0)
    assert (per_fold["MILD"] >= 1).all() and (per_fold["SEVERE"] >= 1).all()
    assert per_fold.sum(axis=1).max() - per_fold.sum(axis=1).min() <= 2


def test_consensus_set_is_test_everywhere(splits, tables):
    b = tables["BRIXIA"]
    patients = set(b.loc[b["ConsensusTestset"] == "1", "patient_id"])
    consensus = set(b.loc[b["patient_id"].isin(patients), "image"])  # the set and its patients' other images
    rows = splits[(splits["site"] == "BRIXIA") & splits["image"].isin(consensus)]
    assert len(rows) == len(consensus) * (len(PROG) + 5) and (rows["role"] == "test").all()
    assert not consensus & set(splits[(splits["site"] == "BRIXIA") & (splits["role"] == "train")]["image"])


def test_reproducible_from_the_seed(tables, splits):
    pd.testing.assert_frame_equal(federation_splits(tables, PROG, seed=0), splits)
    assert not federation_splits(tables, PROG, seed=1)["role"].equals(splits["role"])


def test_trainer_uses_the_same_loco_splits(small_federation, splits):
    cfg = RunConfig(fed_dir=str(small_federation))
    loc = SiteLocation("B", small_federation / "B", small_federation, small_federation)
    trainer = manifest_splits(cfg, loc)
    fold = splits[(splits["protocol"] == "loco") & (splits["fold"] == "A") & (splits["site"] == "B")]
    assert dict(zip(fold["image"], fold["role"])) == trainer.to_dict()


def test_cli_writes_the_split_file(small_federation, tmp_path):
    out = tmp_path / "splits.csv"
    r = subprocess.run(
        [sys.executable, "-m", "mdmt.ops.cli", "splits", str(small_federation), "--out", str(out)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    df = pd.read_csv(out, dtype=str)
    assert list(df.columns) == ["site", "image", "protocol", "fold", "role"]
    assert set(df["protocol"]) == {"loco", "cv"} and "split file:" in r.stdout
