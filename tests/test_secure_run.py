"""Secure aggregation (SecAgg+) inside the project's own app: a real simulation with it on gives the
plaintext run's models within the quantisation bound, and the store keeps only summed counts. The two
units run in lockstep; each unit's training goes through its own SecAgg+ round."""

from __future__ import annotations

import sqlite3

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.slow

UNITS = ("mdmt__resnet18__loco__A__seed0", "stl_prognosis__resnet18__loco__A__seed0")


def _run(fed, ws, secure: bool):
    from mdmt.ops.loco import loco

    loco(
        {
            "fed-dir": str(fed),
            "workspace": str(ws),
            "method": "mdmt,stl_prognosis",
            "concurrent-units": 2,
            "backbone": "resnet18",
            "num-rounds": 1,
            "image-size": 32,
            "holdouts": "A",
            "sites": "A,B,C,BRIXIA",
            "batch-size": 16,
            "seed": 0,
            "select-after": 0,
            "patience": 0,
            "secure-aggregation": secure,
            "update-compression": "none",
        },
        echo=lambda *_: None,
    )  # the plaintext reference: float32 weights
    return [torch.load(ws / "checkpoints" / u / "latest.pt", weights_only=True)["state_dict"] for u in UNITS]


def test_secure_aggregate_equals_the_plaintext_one(small_federation, tmp_path):
    plains = _run(small_federation, tmp_path / "plain", secure=False)
    secures = _run(small_federation, tmp_path / "secure", secure=True)
    worst = 0.0
    for plain, secure in zip(plains, secures):
        assert set(plain) == set(secure)
        for k, want in plain.items():
            got = secure[k]
            assert got.shape == want.shape and got.dtype == want.dtype, k
            if want.dtype.is_floating_point:
                worst = max(worst, float((got - want).abs().max()))
            else:
                assert torch.equal(got, want), k
    # docs/secagg.md: 2 k B S / (T C) before the float32 cast (about 5e-8 here) plus one float32 ulp.
    assert worst <= 5e-8 + float(np.spacing(np.float32(4.0))), worst
    assert worst > 0.0  # the values really went through the quantised secure sum

    db = sqlite3.connect(tmp_path / "secure" / "store.sqlite")
    per_site_n = db.execute("SELECT count(*) FROM metrics WHERE split='train' AND name='n' AND site != '*'").fetchone()[
        0
    ]
    totals = {  # the summed counts of each unit (the last round's, one round here)
        unit: dict(
            db.execute(
                "SELECT task, value FROM metrics WHERE split='train' AND name='n' AND site='*' AND unit_id=?", (unit,)
            ).fetchall()
        )
        for unit in ("mdmt/resnet18/loco/A/seed0", "stl_prognosis/resnet18/loco/A/seed0")
    }
    held_out = db.execute("SELECT DISTINCT unit_id FROM eval_stats WHERE site='A'").fetchall()
    db.close()
    mdmt, stl = totals.values()
    assert per_site_n == 0 and mdmt["all"] > 0 and mdmt["prognosis"] > 0 and mdmt["severity"] > 0, totals
    assert stl["prognosis"] > 0 and not stl.get("severity"), totals  # stl_prognosis trains no severity head
    assert len(held_out) == 2  # both units were scored on the held-out centre
