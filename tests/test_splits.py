"""assign_splits: deterministic, patient-grouped, stratified train/val; overrides; tiny sites."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from mdmt.data.splits import assign_splits, split_counts, stratum_labels


def make_site(n_rows=300, seed=0, severity=False, both=False):
    """A site with 1-3 images per patient; prognosis labels (and/or brixia) per patient."""
    rng = np.random.default_rng(seed)
    rows, pid = [], 0
    while len(rows) < n_rows:
        pid += 1
        prog = "SEVERE" if rng.random() < 0.4 else "MILD"
        brix = "".join(str(v) for v in rng.integers(0, 4, 6))
        for _ in range(int(rng.integers(1, 4))):
            if len(rows) == n_rows:
                break
            p = prog if (not severity or both) else ""
            b = brix if (severity or both) else ""
            rows.append(
                {"image": f"img{len(rows)}.dcm", "patient_id": f"P{pid}", "prognosis": p, "brixia": b, "split": ""}
            )
    return pd.DataFrame(rows)


def splits_per_patient(df, splits):
    return df.assign(s=splits).groupby("patient_id")["s"].nunique()


def test_deterministic_and_site_dependent():
    df = make_site()
    a = assign_splits(df, "hospA", seed=0)
    b = assign_splits(df, "hospA", seed=0)
    pd.testing.assert_series_equal(a, b)
    assert list(a.index) == list(df.index) and set(a) == {"train", "val"}
    assert not a.equals(assign_splits(df, "hospB", seed=0))
    assert not a.equals(assign_splits(df, "hospA", seed=1))
    # row order does not matter: a shuffled copy gets the same split per row
    shuffled = df.sample(frac=1.0, random_state=3)
    pd.testing.assert_series_equal(assign_splits(shuffled, "hospA", seed=0).sort_index(), a)


def test_patients_never_straddle_splits():
    df = make_site()
    splits = assign_splits(df, "hospA", seed=0)
    assert splits_per_patient(df, splits).max() == 1


@pytest.mark.parametrize("kind", ["prognosis", "severity", "both"])
def test_stratified_roughly_ten_percent_per_class(kind):
    df = make_site(severity=kind != "prognosis", both=kind == "both")
    splits = assign_splits(df, "hospA", seed=0, val_fraction=0.1)
    frac = (splits == "val").mean()
    assert 0.06 <= frac <= 0.15
    labels = df["prognosis"].where(df["prognosis"] != "", stratum_labels(df))
    for lab, idx in df.groupby(labels).groups.items():
        if len(idx) >= 40:
            share = (splits[idx] == "val").mean()
            assert 0.03 <= share <= 0.20, (lab, share)


def test_user_override_respected_and_followed_by_patient():
    df = make_site()
    df.loc[0:29, "split"] = "test"
    df.loc[30:34, "split"] = "val"
    pid_of_0 = df.at[0, "patient_id"]
    df.loc[df["patient_id"] == pid_of_0, "split"] = ""
    df.at[0, "split"] = "test"  # one image of this patient overridden, the others free
    splits = assign_splits(df, "hospA", seed=0)
    assert (splits[0:29] == "test").all() and (splits[30:34] == "val").all()
    assert (splits[df["patient_id"] == pid_of_0] == "test").all()
    assert set(splits) == {"train", "val", "test"}
    free = df["split"] == ""
    assert 0 < (splits[free] == "val").sum() < free.sum()


@pytest.mark.parametrize("n_patients", [0, 1, 2, 3, 5, 9, 12])
def test_tiny_sites_do_not_crash(n_patients):
    rows = [
        {
            "image": f"i{k}.dcm",
            "patient_id": f"P{k}",
            "prognosis": "MILD" if k % 3 else "SEVERE",
            "brixia": "",
            "split": "",
        }
        for k in range(n_patients)
    ]
    df = pd.DataFrame(rows, columns=["image", "patient_id", "prognosis", "brixia", "split"])
    splits = assign_splits(df, "tiny", seed=0)
    assert len(splits) == n_patients
    if n_patients >= 2:
        assert (splits == "val").sum() >= 1 and (splits == "train").sum() >= 1
    elif n_patients == 1:
        assert list(splits) == ["train"]


def test_single_free_patient_becomes_val_beside_train_overrides():
    df = pd.DataFrame(
        {
            "image": ["a", "b", "c"],
            "patient_id": ["P1", "P2", "P3"],
            "prognosis": ["MILD"] * 3,
            "brixia": [""] * 3,
            "split": ["train", "train", ""],
        }
    )
    assert list(assign_splits(df, "s", 0)) == ["train", "train", "val"]


def test_split_counts_table():
    df = make_site(60, both=True)
    splits = assign_splits(df, "hospA", seed=0)
    table = split_counts(df, splits)
    assert list(table.index) == ["train", "val", "test"]
    assert table["images"].sum() == 60 and table.loc["test", "images"] == 0
    assert table[["MILD", "SEVERE"]].to_numpy().sum() == 60
    assert table[["b0", "b1", "b2", "b3"]].to_numpy().sum() == 60
