"""Planning a unit (who trains, who is evaluated on what), model selection and early stopping."""

import pytest

from shared.config import RunConfig
from shared.errors import ConfigError
from shared.federated import Selection, SiteInfo, plan_unit, unit_keys
from shared.store import UnitKey


def _sites():
    def info(name, role, p=10, s=0):
        counts = {f"{split}-{task}": n for split in ("train", "all") for task, n in (("prognosis", p), ("severity", s))}
        return SiteInfo(name, role, counts, "hash-" + name)

    return {
        "A": info("A", "prognosis"), "B": info("B", "prognosis"), "C": info("C", "prognosis"),
        "BRIXIA": info("BRIXIA", "severity", p=0, s=50), "DUAL": info("DUAL", "both", p=5, s=5),
    }


def _key(method, fold):
    return UnitKey(method, "resnet18", "loco", fold, 0)


def test_mdmt_trains_every_site_but_the_held_out_one():
    plan = plan_unit(_key("mdmt", "B"), _sites())
    assert plan.train_sites == ["A", "BRIXIA", "C", "DUAL"]
    assert set(plan.train_messages) == set(plan.train_sites) and "B" not in plan.train_messages
    assert plan.eval_splits["B"] == ("all",) and plan.eval_splits["A"] == ("val",)


def test_stl_prognosis_skips_severity_only_sites():
    plan = plan_unit(_key("stl_prognosis", "A"), _sites())
    assert plan.train_sites == ["B", "C", "DUAL"]


def test_stl_severity_has_no_held_out_centre():
    plan = plan_unit(_key("stl_severity", "-"), _sites())
    assert plan.holdout is None and plan.train_sites == ["BRIXIA", "DUAL"]
    assert set(plan.eval_splits.values()) == {("val",)}


def test_centralised_pools_into_one_train_message():
    plan = plan_unit(_key("centralised_mdmt", "C"), _sites())
    assert len(plan.train_messages) == 1
    (extra,) = plan.train_messages.values()
    assert extra["pool-sites"] == "A,B,BRIXIA,DUAL"


def test_held_out_centre_must_hold_prognosis_labels():
    with pytest.raises(ConfigError, match="BRIXIA.*no prognosis labels"):
        plan_unit(_key("mdmt", "BRIXIA"), _sites())
    with pytest.raises(ConfigError, match="not a site"):
        plan_unit(_key("mdmt", "Z"), _sites())


def test_unit_keys_expand_methods_backbones_and_folds():
    cfg = RunConfig(method="mdmt,stl_severity", backbone="resnet18,mobilenet_v2", holdouts="A,B")
    ids = [k.unit_id for k in unit_keys(cfg)]
    assert len(ids) == 2 * (2 + 1)
    assert "stl_severity/mobilenet_v2/loco/-/seed0" in ids and "mdmt/resnet18/loco/B/seed0" in ids


def test_selection_keeps_best_round_and_stops_after_patience():
    sel = Selection(patience=2, select_after=1)
    losses = [0.5, 0.9, 0.6, 0.7, 0.8, 0.4]
    stopped_at = None
    for rnd, loss in enumerate(losses, start=1):
        sel.update(rnd, loss)
        if sel.should_stop(rnd):
            stopped_at = rnd
            break
    # round 1 is a fallback only; from round 2 on the best is round 3 (0.6); rounds 4 and 5 don't improve
    assert sel.best_round == 3 and stopped_at == 5


def test_ft_is_preceded_by_its_phase_one_and_local_expands_per_site():
    roles = {"A": "prognosis", "B": "prognosis", "C": "prognosis", "BRIXIA": "severity"}
    cfg = RunConfig(method="ft,local", backbone="resnet18", holdouts="A,B")
    ids = [k.unit_id for k in unit_keys(cfg, roles)]
    assert ids == ["stl_severity/resnet18/loco/-/seed0", "ft/resnet18/loco/A/seed0", "ft/resnet18/loco/B/seed0",
                   "local:B/resnet18/loco/A/seed0", "local:C/resnet18/loco/A/seed0",
                   "local:A/resnet18/loco/B/seed0", "local:C/resnet18/loco/B/seed0"]
    with pytest.raises(ConfigError, match="needs the federation's sites"):
        unit_keys(cfg)


def test_local_unit_trains_one_site_and_tests_the_held_out_centre():
    plan = plan_unit(_key("local:C", "A"), _sites())
    assert plan.train_sites == ["C"] and set(plan.eval_splits) == {"A", "C"}
    assert plan.eval_splits["A"] == ("all",)


def test_cv_units_train_every_site_and_evaluate_val_and_test():
    cfg = RunConfig(method="mdmt,ft", backbone="resnet18", protocol="cv", folds="0,3")
    ids = [k.unit_id for k in unit_keys(cfg)]
    assert ids == ["mdmt/resnet18/cv/0/seed0", "mdmt/resnet18/cv/3/seed0", "stl_severity/resnet18/cv/0/seed0",
                   "ft/resnet18/cv/0/seed0", "stl_severity/resnet18/cv/3/seed0", "ft/resnet18/cv/3/seed0"]
    plan = plan_unit(UnitKey("mdmt", "resnet18", "cv", "3", 0), _sites())
    assert plan.holdout is None and plan.train_sites == ["A", "B", "BRIXIA", "C", "DUAL"]
    assert set(plan.eval_splits.values()) == {("val", "test")}
