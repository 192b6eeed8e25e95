"""Everything a site sent in a real simulation run, checked against what may leave a hospital: model
arrays with the model's own names and shapes, scalar metrics, fixed-size aggregate evaluation counts,
and the query reply's identifiers. No image data, no per-sample values, no file paths."""

from __future__ import annotations

import pytest

from mdmt.fed.audit import read_reply_log, reply_problems
from mdmt.ml.model import build_model

pytestmark = pytest.mark.slow


def _model_shapes() -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in build_model("resnet18").state_dict().items()}


def test_every_reply_of_the_run_holds_only_allowed_content(sim_run):
    cfg, _, _ = sim_run
    shapes = _model_shapes()
    seen = {}
    for site in ("A", "B", "C", "BRIXIA"):
        entries = read_reply_log(cfg.workspace_path / "sites" / site)
        assert entries, f"site {site} logged no reply"
        for e in entries:
            assert reply_problems(e, shapes) == [], (site, e["message_type"], reply_problems(e, shapes))
            seen.setdefault(site, set()).add(e["message_type"])
    assert seen["A"] == {"query", "evaluate"}  # the held-out centre never trains
    # every evaluated split carries its exact AUC: one float beside its histogram
    evals = [e for e in read_reply_log(cfg.workspace_path / "sites" / "A") if e["message_type"] == "evaluate"]
    assert evals and all(e["records"]["metrics"]["items"]["all/auc-prognosis"]["type"] == "float" for e in evals)
    assert {"query", "train", "evaluate"} <= seen["B"] and {"query", "train", "evaluate"} <= seen["BRIXIA"]
    trains = [e for e in read_reply_log(cfg.workspace_path / "sites" / "B") if e["message_type"] == "train"]
    assert all(set(e["records"]["arrays"]["items"]) == set(shapes) for e in trains)


def test_the_check_catches_images_per_sample_values_and_paths():
    shapes = _model_shapes()
    image = {"records": {"arrays": {"kind": "ArrayRecord", "items": {"x": {"shape": [16, 64, 64], "dtype": "uint8"}}}}}
    per_sample = {
        "records": {
            "metrics": {
                "kind": "MetricRecord",
                "items": {"val/hist-prognosis": {"type": "list", "len": 37, "items": ["float"]}},
            }
        }
    }
    path = {
        "records": {
            "site": {
                "kind": "ConfigRecord",
                "items": {"site": {"type": "str", "value": "/data/hospital/A/images/A_0001.dcm"}},
            }
        }
    }
    extra_key = {"records": {"metrics": {"kind": "MetricRecord", "items": {"p-severe": {"type": "float"}}}}}
    scores_as_auc = {
        "records": {
            "metrics": {
                "kind": "MetricRecord",
                "items": {"val/auc-prognosis": {"type": "list", "len": 37, "items": ["float"]}},
            }
        }
    }
    auc_as_int = {"records": {"metrics": {"kind": "MetricRecord", "items": {"val/auc-prognosis": {"type": "int"}}}}}
    one_auc = {"records": {"metrics": {"kind": "MetricRecord", "items": {"val/auc-prognosis": {"type": "float"}}}}}
    assert reply_problems(one_auc, shapes) == []
    for bad in (image, per_sample, path, extra_key, scores_as_auc, auc_as_int):
        assert reply_problems(bad, shapes), bad
