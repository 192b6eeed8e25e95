"""Secure aggregation (SecAgg+) inside the project's own app: a real simulation with it on gives the
plaintext run's model within the quantisation bound, and the store keeps only summed counts."""

from __future__ import annotations

import sqlite3

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.slow

UNIT = "mdmt__resnet18__loco__A__seed0"


def _run(fed, ws, secure: bool):
    from mdmt.ops.loco import loco

    loco(
        {
            "fed-dir": str(fed),
            "workspace": str(ws),
            "method": "mdmt",
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
    return torch.load(ws / "checkpoints" / UNIT / "latest.pt", weights_only=True)["state_dict"]


def test_secure_aggregate_equals_the_plaintext_one(small_federation, tmp_path):
    plain = _run(small_federation, tmp_path / "plain", secure=False)
    secure = _run(small_federation, tmp_path / "secure", secure=True)
    assert set(plain) == set(secure)
    worst = 0.0
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
    totals = dict(
        db.execute("SELECT task, value FROM metrics WHERE split='train' AND name='n' AND site='*'").fetchall()
    )
    db.close()
    assert per_site_n == 0 and totals["all"] > 0 and totals["prognosis"] > 0 and totals["severity"] > 0
