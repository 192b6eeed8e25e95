"""Planning a unit (who trains, who is evaluated on what), model selection and early stopping."""

import pytest
import torch

from mdmt.errors import ConfigError
from mdmt.fed.config import RunConfig
from mdmt.fed.plan import SiteInfo, plan_unit, unit_keys
from mdmt.fed.selection import Selection
from mdmt.store import UnitKey


def _sites():
    def info(name, role, p=10, s=0):
        counts = {f"{split}-{task}": n for split in ("train", "all") for task, n in (("prognosis", p), ("severity", s))}
        return SiteInfo(name, role, counts, "hash-" + name)

    return {
        "A": info("A", "prognosis"),
        "B": info("B", "prognosis"),
        "C": info("C", "prognosis"),
        "BRIXIA": info("BRIXIA", "severity", p=0, s=50),
        "DUAL": info("DUAL", "both", p=5, s=5),
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
    assert ids == [
        "stl_severity/resnet18/loco/-/seed0",
        "ft/resnet18/loco/A/seed0",
        "ft/resnet18/loco/B/seed0",
        "local:B/resnet18/loco/A/seed0",
        "local:C/resnet18/loco/A/seed0",
        "local:A/resnet18/loco/B/seed0",
        "local:C/resnet18/loco/B/seed0",
    ]
    with pytest.raises(ConfigError, match="needs the federation's sites"):
        unit_keys(cfg)


def test_local_unit_trains_one_site_and_tests_the_held_out_centre():
    plan = plan_unit(_key("local:C", "A"), _sites())
    assert plan.train_sites == ["C"] and set(plan.eval_splits) == {"A", "C"}
    assert plan.eval_splits["A"] == ("all",)


def test_cv_units_train_every_site_and_evaluate_val_and_test():
    cfg = RunConfig(method="mdmt,ft", backbone="resnet18", protocol="cv", folds="0,3")
    ids = [k.unit_id for k in unit_keys(cfg)]
    assert ids == [
        "mdmt/resnet18/cv/0/seed0",
        "mdmt/resnet18/cv/3/seed0",
        "stl_severity/resnet18/cv/0/seed0",
        "ft/resnet18/cv/0/seed0",
        "stl_severity/resnet18/cv/3/seed0",
        "ft/resnet18/cv/3/seed0",
    ]
    plan = plan_unit(UnitKey("mdmt", "resnet18", "cv", "3", 0), _sites())
    assert plan.holdout is None and plan.train_sites == ["A", "B", "BRIXIA", "C", "DUAL"]
    assert set(plan.eval_splits.values()) == {("val", "test")}


# ---- k-of-n rounds: a site that does not answer ------------------------------------------------


class ScriptedRounds:
    """A Rounds whose sites answer as scripted: ``absent[round]`` are the sites that miss that round."""

    def __init__(self, absent, loss=lambda seen: 8.0 / max(seen, 1)):
        self.absent, self.loss = absent, loss

    def step(self, steps):
        return [self._unit(st) for st in steps]

    def _unit(self, st):
        import numpy as np

        from mdmt.fed import protocol as P
        from mdmt.fed.steps import StepResult
        from mdmt.ml.metrics import HIST_BINS
        from mdmt.ml.outcomes import TrainResult

        rnd, seen = int(st.config[P.CFG_ROUND]), int(st.config[P.CFG_EVAL_ROUND])
        gone = self.absent.get(rnd, set()) if st.trains else set()
        hist = np.zeros((2, HIST_BINS), dtype=np.int64)
        hist[0, 10], hist[1, 150] = 4, 4
        ev = P.SiteEval(
            {"prognosis": 8, "severity": 0},
            {"prognosis": 8.0 * self.loss(seen), "severity": 0.0},
            np.zeros((2, 2), dtype=np.int64),
            hist,
            np.zeros((4, 4), dtype=np.int64),
        )
        one = TrainResult(10, {"prognosis": 10, "severity": 0}, 0.5, {"prognosis": 0.5, "severity": 0.0}, 1, 0.1)
        trained = {s: one for s, task in st.tasks.items() if task.train and s not in gone}
        arrays = {k: v + np.asarray(rnd, v.dtype) if v.dtype.kind == "f" else v for k, v in st.arrays.items()}
        res = StepResult(arrays if trained else None, trained, {}, {}, {})
        for s, task in st.tasks.items():
            status = res.train_status if task.train else res.eval_status
            status[s] = "no reply" if s in gone else "ok"
            if task.splits and s not in gone:
                res.evals[s] = {sp: ev for sp in task.splits}
        return res


def _kofn_sites():
    def info(name):
        counts = {f"{sp}-prognosis": 10 for sp in ("train", "val", "all")}
        return SiteInfo(name, "prognosis", counts, "hash-" + name)

    return {s: info(s) for s in ("A", "B", "C")}


def test_a_round_goes_on_without_a_missing_site_and_logs_who_left_and_rejoined(tmp_path):
    from mdmt.fed.units import run_units
    from mdmt.store import RunStore

    cfg = _oneshot_cfg(tmp_path, method="mdmt", num_rounds=4, min_sites=1)
    key = _key("mdmt", "A")
    store = RunStore(tmp_path / "store.sqlite")
    try:
        run_units(cfg, _kofn_sites(), ScriptedRounds({2: {"B"}, 3: {"B"}}), store)
        unit = {u["unit_id"]: dict(u) for u in store.units()}[key.unit_id]
        events = [(e["round"], e["kind"], e["detail"]) for e in store.events(key.unit_id)]
        part = {(p["round"], p["site"], p["kind"]): p["status"] for p in store.participation(key.unit_id)}
    finally:
        store.close()
    assert unit["status"] == "done" and unit["rounds_done"] == 4
    assert events == [(2, "missing", "B: no reply"), (4, "rejoined", "B")]
    assert [part[(r, "B", "train")] for r in (1, 2, 3, 4)] == ["ok", "no reply", "no reply", "ok"]
    assert all(part[(r, "C", "train")] == "ok" for r in (1, 2, 3, 4))


def test_too_few_sites_fail_the_unit_naming_the_missing_ones(tmp_path):
    from mdmt.fed.units import run_units
    from mdmt.store import RunStore

    cfg = _oneshot_cfg(tmp_path, method="mdmt", min_sites=2)
    key = _key("mdmt", "A")
    store = RunStore(tmp_path / "store.sqlite")
    try:
        with pytest.raises(RuntimeError) as exc:
            run_units(cfg, _kofn_sites(), ScriptedRounds({2: {"B", "C"}}), store)
        unit = {u["unit_id"]: dict(u) for u in store.units()}[key.unit_id]
    finally:
        store.close()
    assert str(exc.value) == "round 2: only 0 of 2 sites trained (min-sites 2); missing: B (no reply), C (no reply)"
    assert unit["status"] == "failed" and unit["message"] == str(exc.value) and unit["rounds_done"] == 1


def test_discovery_needs_every_configured_site_and_says_how_to_start_it():
    from dataclasses import replace

    from mdmt.errors import ConfigError
    from mdmt.fed.plan import map_sites

    found = [(info, n) for n, info in enumerate(_kofn_sites().values())]
    sites, node_of = map_sites(found, {"A", "B", "C"}, waited_s=120)
    assert set(sites) == {"A", "B", "C"} and node_of == {"A": 0, "B": 1, "C": 2}
    # a deployment: name the site daemons to start
    with pytest.raises(ConfigError) as err:
        map_sites(found[:1], {"A", "B", "C"}, waited_s=120)
    assert str(err.value) == (
        "only 1 of 3 configured sites answered within 120s (A); missing: B, C; start the site daemons of B, C "
        "(mdmt deploy supernode-cmd), then submit again"
    )
    # a simulation: name num-supernodes
    simulated = [(replace(info, simulated=True), n) for info, n in found[:2]]
    with pytest.raises(
        ConfigError, match=r'missing: C; run the simulation with --federation-config "num-supernodes=3"'
    ):
        map_sites(simulated, {"A", "B", "C"}, waited_s=0)
    with pytest.raises(ConfigError, match="two nodes claim site 'A'"):
        map_sites([found[0], (found[0][0], 7)], {"A"}, waited_s=1)
    with pytest.raises(ConfigError, match="only 0 of 0 configured sites answered"):
        map_sites([], set(), waited_s=5)


# ---- rounds in one round trip: what is evaluated when, and resume --------------------------------


class FlakyRounds(ScriptedRounds):
    """ScriptedRounds that raises once, at the round trip that would train round ``fail_at``."""

    def __init__(self, fail_at=None, **kw):
        super().__init__({}, **kw)
        self.fail_at, self.calls = fail_at, []

    def step(self, steps):
        from mdmt.fed import protocol as P

        rounds = [int(s.config[P.CFG_ROUND]) for s in steps if s.trains]
        if self.fail_at is not None and self.fail_at in rounds:
            self.fail_at = None
            raise KeyboardInterrupt("stopped")
        self.calls.append([(s.key.method, int(s.config[P.CFG_ROUND]), s.trains, dict(s.tasks)) for s in steps])
        return super().step(steps)


def _oneshot_cfg(tmp_path, **kw):
    values = dict(
        method="mdmt,stl_prognosis",
        holdouts="A",
        backbone="resnet18",
        image_size=32,
        num_rounds=3,
        workspace=str(tmp_path),
        patience=0,
        select_after=0,
        lr_patience=0,
    )
    return RunConfig(**(values | kw))


def test_held_out_rows_every_n_rounds_and_at_the_selected_round(tmp_path):
    from mdmt.fed.units import run_units
    from mdmt.store import RunStore

    store = RunStore(tmp_path / "store.sqlite")
    rounds = FlakyRounds()
    try:
        run_units(_oneshot_cfg(tmp_path, holdout_eval_every=2, concurrent_units=2), _kofn_sites(), rounds, store)
        held = sorted(
            {
                (r["unit_id"].split("/")[0], r["round"])
                for r in store.db.execute("SELECT unit_id, round FROM eval_stats WHERE site='A'")
            }
        )
        best = {u["unit_id"].split("/")[0]: u["best_round"] for u in store.units()}
        statuses = {u["status"] for u in store.units()}
    finally:
        store.close()
    assert statuses == {"done"}
    # the scripted validation loss falls every round: round 3 is selected; A evaluated at 2 (every 2) and 3
    assert best == {"mdmt": 3, "stl_prognosis": 3}
    assert held == [("mdmt", 2), ("mdmt", 3), ("stl_prognosis", 2), ("stl_prognosis", 3)]
    # one round trip per round for both units together, then the last round's validation
    assert len(rounds.calls) == 4 and all(len(c) == 2 for c in rounds.calls)
    assert [c[0][2] for c in rounds.calls] == [True, True, True, False]  # trips 1-3 train, trip 4 only validates
    first = rounds.calls[0][0][3]
    assert "A" not in first and all(t.train and not t.splits for t in first.values())  # round 1: nothing to evaluate


def test_an_interrupted_unit_continues_after_its_last_round_and_ends_where_an_uninterrupted_one_does(tmp_path):
    from mdmt.fed.checkpoint import load_checkpoint
    from mdmt.fed.units import run_units
    from mdmt.store import RunStore

    def final(ws, fail_at):
        store = RunStore(ws / "store.sqlite")
        try:
            cfg = _oneshot_cfg(ws, method="mdmt")
            if fail_at is not None:
                with pytest.raises(KeyboardInterrupt):
                    run_units(cfg, _kofn_sites(), FlakyRounds(fail_at), store)
                assert store.units()[0]["status"] == "interrupted"
            run_units(cfg, _kofn_sites(), FlakyRounds(), store)
            unit = dict(store.units()[0])
            events = [e["kind"] for e in store.events(unit["unit_id"])]
        finally:
            store.close()
        ck = load_checkpoint(ws / "checkpoints" / "mdmt__resnet18__loco__A__seed0" / "latest.pt")
        return unit, events, ck["state_dict"]

    ref_unit, _, ref = final(tmp_path / "straight", None)
    unit, events, got = final(tmp_path / "interrupted", 3)
    assert unit["status"] == ref_unit["status"] == "done" and unit["best_round"] == ref_unit["best_round"] == 3
    assert "resumed" in events
    assert all(torch.equal(got[k], ref[k]) for k in ref)


def test_an_earlier_selected_round_is_scored_on_the_held_out_centre_at_the_end(tmp_path):
    from mdmt.fed.units import run_units
    from mdmt.store import RunStore

    store = RunStore(tmp_path / "store.sqlite")
    rounds = FlakyRounds(loss=lambda seen: float(seen))  # validation gets worse: round 1 stays selected
    try:
        run_units(_oneshot_cfg(tmp_path, method="mdmt", holdout_eval_every=2), _kofn_sites(), rounds, store)
        unit = store.units()[0]
        held = sorted({r[0] for r in store.db.execute("SELECT round FROM eval_stats WHERE site='A'")})
    finally:
        store.close()
    assert unit["status"] == "done" and unit["best_round"] == 1
    assert held == [1, 2, 3]  # 2: every 2 rounds; 3: with the last validation; 1: the selected model, at the end
    assert [c[0][2] for c in rounds.calls] == [True, True, True, False, False]
    assert set(rounds.calls[-1][0][3]) == {"A"}  # the last trip: the held-out centre scores the selected model


def test_simulated_nodes_serve_the_largest_sites_first(small_federation, tmp_path):
    """Flower hands a round's messages to its workers in partition-id order: the largest site is node 0,
    whatever order the config names the sites in, and every node still serves the site it was given."""
    from mdmt.data.manifest import read_manifest
    from mdmt.fed.sitedata import locate_site
    from mdmt.ops.loco import prepare_config

    cfg = prepare_config({"fed-dir": str(small_federation), "workspace": str(tmp_path), "sites": "A,B,C,BRIXIA"})
    sizes = [len(read_manifest(small_federation / s)) for s in cfg.site_list]
    assert cfg.site_list[0] == "BRIXIA" and sorted(cfg.site_list) == ["A", "B", "BRIXIA", "C"]
    assert sizes == sorted(sizes, reverse=True), dict(zip(cfg.site_list, sizes))
    served = [locate_site(cfg, {"partition-id": i}).site for i in range(len(cfg.site_list))]
    assert served == list(cfg.site_list)
    # without a site list, the same rule over every site folder of the federation
    bare = RunConfig.from_mapping({"fed-dir": str(small_federation), "workspace": str(tmp_path)})
    assert locate_site(bare, {"partition-id": 0}).site == "BRIXIA"


def test_the_node_order_follows_a_changed_manifest(small_federation, tmp_path):
    """The order is read once per process per manifest version: a manifest that grows moves its site."""
    import shutil

    import pandas as pd

    from mdmt.data.manifest import MANIFEST, dispatch_order

    fed = tmp_path / "fed"
    for site in ("A", "B", "BRIXIA"):
        (fed / site).mkdir(parents=True)
        shutil.copy(small_federation / site / MANIFEST, fed / site / MANIFEST)
    assert dispatch_order(fed)[0] == "BRIXIA"
    a = pd.read_csv(fed / "A" / MANIFEST, dtype=str, keep_default_na=False)
    n_brixia = len(pd.read_csv(fed / "BRIXIA" / MANIFEST))
    copies = [a.assign(image=a["image"].str.replace(".dcm", f"_{k}.dcm")) for k in range(n_brixia // len(a) + 1)]
    pd.concat(copies).to_csv(fed / "A" / MANIFEST, index=False)
    assert dispatch_order(fed) == ["A", "BRIXIA", "B"]
