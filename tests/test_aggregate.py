"""Task-aware FedAvg: each head is averaged only over the sites that trained it."""

import numpy as np

from mdmt.fed.aggregate import SiteUpdate, task_aware_fedavg


def _state(v: float, nbt: int = 5) -> dict:
    return {
        "backbone.conv.weight": np.full((2, 2), v, dtype=np.float32),
        "backbone.bn.num_batches_tracked": np.array(nbt, dtype=np.int64),
        "heads.prognosis.0.weight": np.full(3, v, dtype=np.float32),
        "heads.severity.2.weight": np.full(4, v, dtype=np.float32),
    }


def test_heads_averaged_only_over_sites_that_trained_them():
    prev = _state(0.0)
    ups = [
        SiteUpdate("A", _state(1.0, 7), 10, {"prognosis": 10, "severity": 0}),
        SiteUpdate("B", _state(2.0, 9), 30, {"prognosis": 30, "severity": 0}),
        SiteUpdate("BRIXIA", _state(10.0, 20), 60, {"prognosis": 0, "severity": 60}),
    ]
    out = task_aware_fedavg(prev, ups)
    # backbone: all three sites, by samples
    np.testing.assert_allclose(out["backbone.conv.weight"], (10 * 1 + 30 * 2 + 60 * 10) / 100)
    # prognosis head: A and B only, by their prognosis counts; BRIXIA's value does not leak in
    np.testing.assert_allclose(out["heads.prognosis.0.weight"], (10 * 1 + 30 * 2) / 40)
    # severity head: BRIXIA alone
    np.testing.assert_allclose(out["heads.severity.2.weight"], 10.0)
    # integer buffers keep their dtype
    assert out["backbone.bn.num_batches_tracked"].dtype == np.int64
    assert int(out["backbone.bn.num_batches_tracked"]) == round((10 * 7 + 30 * 9 + 60 * 20) / 100)
    assert out["backbone.conv.weight"].dtype == np.float32


def test_head_nobody_trained_keeps_previous_value():
    prev = _state(0.5)
    ups = [SiteUpdate("A", _state(1.0), 10, {"prognosis": 10, "severity": 0})]
    out = task_aware_fedavg(prev, ups)
    np.testing.assert_array_equal(out["heads.severity.2.weight"], prev["heads.severity.2.weight"])
    np.testing.assert_allclose(out["heads.prognosis.0.weight"], 1.0)


def test_both_labels_site_contributes_to_both_heads():
    prev = _state(0.0)
    ups = [
        SiteUpdate("DUAL", _state(4.0), 20, {"prognosis": 20, "severity": 20}),
        SiteUpdate("BRIXIA", _state(1.0), 60, {"prognosis": 0, "severity": 60}),
    ]
    out = task_aware_fedavg(prev, ups)
    np.testing.assert_allclose(out["heads.prognosis.0.weight"], 4.0)
    np.testing.assert_allclose(out["heads.severity.2.weight"], (20 * 4 + 60 * 1) / 80)
