"""The server survives hostile replies: every reply is checked (mdmt.fed.validate) before it is read or
aggregated, a reply that fails counts as its site missing the round with status ``rejected: <reason>``, and
the robust rules (median, trimmed-mean) bound what one poisoned update can do. The last tests run a real
Flower simulation (tests/hostile_app) in which one site corrupts its replies a different way every round."""

from __future__ import annotations

import math
import shutil
import sqlite3
import time
from pathlib import Path

import numpy as np
import pytest
import tomli_w

from mdmt.errors import ConfigError
from mdmt.fed import protocol as P
from mdmt.fed.aggregate import SiteUpdate, task_aware_fedavg, trim_count
from mdmt.fed.compress import encode_update
from mdmt.fed.config import RunConfig
from mdmt.fed.plan import SiteInfo, UnitPlan, map_sites
from mdmt.fed.steps import SiteReply, SiteTask, UnitStep, assemble
from mdmt.fed.validate import Rejected, check_metrics, check_update, count_limits
from mdmt.ml.methods import get_method
from mdmt.ml.metrics import HIST_BINS
from mdmt.store import UnitKey

APP = Path(__file__).parent / "hostile_app"
BOUND = 100.0
MODEL = {
    "backbone.conv.weight": np.zeros((4, 3), np.float32),
    "backbone.bn.running_mean": np.zeros(3, np.float32),
    "backbone.bn.num_batches_tracked": np.array(5, np.int64),
    "heads.prognosis.weight": np.zeros((2, 3), np.float32),
    "heads.severity.weight": np.zeros((4, 3), np.float32),
}
DECLARED = {"B": {"train-prognosis": 9, "val-prognosis": 3, "val-severity": 0, "all-prognosis": 12}}


def _eval(n_prog: int = 3, n_sev: int = 0) -> dict:
    hist = [0] * (2 * HIST_BINS)
    hist[0] = n_prog
    cm_sev = [0] * 16
    cm_sev[0] = n_sev
    return {
        P.NUM_EXAMPLES: n_prog + n_sev,
        "n-prognosis": n_prog,
        "n-severity": n_sev,
        "loss-sum-prognosis": 1.5,
        "loss-sum-severity": 0.0,
        "cm-prognosis": [n_prog, 0, 0, 0],
        "hist-prognosis": hist,
        P.AUC_KEY: float("nan"),  # one class only
        "cm-severity": cm_sev,
    }


def _metrics(**changes) -> dict:
    """An honest train reply of site B that also evaluated its validation rows."""
    m = {f"val/{k}": v for k, v in _eval().items()}
    m |= {
        P.NUM_EXAMPLES: 9,
        "n-prognosis": 9,
        "n-severity": 0,
        "train-loss": 0.7,
        "train-loss-prognosis": 0.7,
        "train-loss-severity": 0.0,
        "steps": 1,
        "seconds": 0.1,
        "epsilon": float("nan"),
        "dp-refused": 0,
    }
    return m | changes


def _check(m: dict) -> None:
    check_metrics(m, train=True, splits=("val",), limits=count_limits(DECLARED, "B"))


def _weights(shift: float = 0.01) -> dict[str, np.ndarray]:
    return {k: np.asarray(v + (shift if v.dtype.kind == "f" else 1), dtype=v.dtype) for k, v in MODEL.items()}


# ---- metrics --------------------------------------------------------------------------------------------


def test_an_honest_reply_passes():
    _check(_metrics())
    weights, norm = check_update(_weights(), MODEL, "none", BOUND)
    assert set(weights) == set(MODEL) and 0 < norm < 1


@pytest.mark.parametrize(
    "changes, reason",
    [
        ({"train-loss": float("nan")}, "'train-loss' must be a finite number"),
        ({"train-loss": float("inf")}, "'train-loss' must be a finite number"),
        ({"n-prognosis": float("nan")}, "'n-prognosis' must be a whole number"),
        ({"n-prognosis": 10**12, P.NUM_EXAMPLES: 10**12}, "'n-prognosis' is 1000000000000, above the 9"),
        ({"n-prognosis": -1}, "'n-prognosis' is negative"),
        ({"steps": "many"}, "'steps' must be a whole number"),
        ({P.NUM_EXAMPLES: 20}, "a training row carries one or both labels"),
        ({"val/cm-prognosis": [3, 0, 0]}, "split val: 'cm-prognosis' has 3 entries; the contract has 4"),
        ({"val/cm-prognosis": [3] + [0] * 10**6}, "has 1000001 entries"),
        ({"val/cm-prognosis": [2, 0, 0, 0]}, "'cm-prognosis' adds up to 2, its count is 3"),
        ({"val/hist-prognosis": [4] + [0] * (2 * HIST_BINS - 1)}, "'hist-prognosis' has an entry outside [0, 3]"),
        ({"val/n-prognosis": 10**12}, "split val: 'n-prognosis' is 1000000000000, above the 3"),
        ({"val/loss-sum-prognosis": -1.0}, "'loss-sum-prognosis' must be a finite number >= 0"),
        ({"val/auc-prognosis": 0.7}, "'auc-prognosis' is 0.7 but a prognosis class has no rows; it must be NaN"),
        ({"val/auc-prognosis": "0.7"}, "'auc-prognosis' must be a number"),
        ({"dp-refused": 2}, "'dp-refused' must be 0 or 1"),
    ],
)
def test_hostile_metrics_are_rejected_with_one_line(changes, reason):
    with pytest.raises(Rejected) as exc:
        _check(_metrics(**changes))
    assert reason in str(exc.value) and "\n" not in str(exc.value)


@pytest.mark.parametrize(
    "key", ["n-prognosis", "train-loss", "val/cm-severity", "val/num-examples", "val/auc-prognosis"]
)
def test_a_missing_key_is_rejected(key):
    m = _metrics()
    del m[key]
    with pytest.raises(Rejected, match=f"lack '{key.split('/')[-1]}'"):
        _check(m)


def test_a_split_auc_must_be_one_its_histogram_allows():
    """Both classes: MILD in bins 10 and 3500, SEVERE in 3500 and 5000. Of the 4 pairs 3 are won outright and
    1 is a tie inside bin 3500, so the exact AUC lies in [0.75, 1]."""
    hist = [0] * (2 * HIST_BINS)
    hist[10] = hist[3500] = hist[HIST_BINS + 3500] = hist[HIST_BINS + 5000] = 1
    ev = {f"val/{k}": v for k, v in _eval().items()} | {
        "val/n-prognosis": 4,
        "val/num-examples": 4,
        "val/cm-prognosis": [1, 1, 1, 1],
        "val/hist-prognosis": hist,
    }
    limits = {"val": {"prognosis": 4, "severity": 0}}
    for ok in (0.75, 0.875, 1.0):
        check_metrics(ev | {"val/auc-prognosis": ok}, train=False, splits=("val",), limits=limits)
    for bad, reason in (
        (0.5, "the split's histogram allows [0.750000, 1.000000] only"),
        (float("nan"), "must be a number in [0, 1] when both prognosis classes have rows"),
        (float("inf"), "must be a finite number"),
        (-0.1, "must be a finite number >= 0"),
        (1.5, "must be a number in [0, 1]"),
    ):
        with pytest.raises(Rejected) as exc:
            check_metrics(ev | {"val/auc-prognosis": bad}, train=False, splits=("val",), limits=limits)
        assert reason in str(exc.value) and "\n" not in str(exc.value), bad


def test_count_limits_pool_the_pooled_sites_and_all_is_the_sum_of_the_splits():
    declared = {
        "B": {"train-prognosis": 9, "val-prognosis": 1, "test-prognosis": 2},
        "C": {"train-prognosis": 5, "train-severity": 4},
    }
    limits = count_limits(declared, "B", pooled=["B", "C"])
    assert limits["train"] == {"prognosis": 14, "severity": 4}
    assert limits["all"]["prognosis"] == 12 and limits["val"]["prognosis"] == 1
    assert count_limits(declared, "B", protocol="cv")["val"]["prognosis"] == 12  # cv: any split is part of all
    assert count_limits(declared, "X") is None


# ---- update ---------------------------------------------------------------------------------------------


def _bad_update(case: str) -> tuple[dict, str]:
    w = _weights()
    if case == "nan":
        w["backbone.conv.weight"][0, 0] = np.nan
    elif case == "inf":
        w["heads.prognosis.weight"][1, 2] = np.inf
    elif case == "scalar for (4,3)":
        w["backbone.conv.weight"] = np.array(0.5, np.float32)
    elif case == "wrong shape":
        w["backbone.conv.weight"] = np.zeros((3, 4), np.float32)
    elif case == "missing key":
        del w["heads.severity.weight"]
    elif case == "extra key":
        w["backbone.extra"] = np.zeros(2, np.float32)
    elif case == "wrong dtype":
        w["backbone.conv.weight"] = w["backbone.conv.weight"].astype(np.complex64)
    elif case == "int for float":
        w["backbone.conv.weight"] = w["backbone.conv.weight"].astype(np.int32)
    elif case == "negative counter":
        w["backbone.bn.num_batches_tracked"] = np.array(-3, np.int64)
    elif case == "oversized":
        w["backbone.conv.weight"] = np.full((4, 3), 40.0, np.float32)  # norm 138.6 > 100
    reason = {
        "nan": "'backbone.conv.weight' is not finite",
        "inf": "'heads.prognosis.weight' is not finite",
        "scalar for (4,3)": "'backbone.conv.weight' has shape (); the model's is (4, 3)",
        "wrong shape": "has shape (3, 4); the model's is (4, 3)",
        "missing key": "the update lacks 1 tensor(s), e.g. 'heads.severity.weight'",
        "extra key": "the update has 1 tensor(s) the model has not, e.g. 'backbone.extra'",
        "wrong dtype": "has dtype complex64; expected a float tensor",
        "int for float": "has dtype int32; expected a float tensor",
        "negative counter": "'backbone.bn.num_batches_tracked' holds a value outside [0, 2**53)",
        "oversized": "the update's norm 138.6 is above update-norm-bound 100",
    }[case]
    return w, reason


@pytest.mark.parametrize(
    "case",
    [
        "nan",
        "inf",
        "scalar for (4,3)",
        "wrong shape",
        "missing key",
        "extra key",
        "wrong dtype",
        "int for float",
        "negative counter",
        "oversized",
    ],
)
def test_hostile_updates_are_rejected(case):
    w, reason = _bad_update(case)
    with pytest.raises(Rejected) as exc:
        check_update(w, MODEL, "none", BOUND)
    assert reason in str(exc.value)


def test_a_one_value_buffer_may_travel_as_shape_1_or_0d():
    sent = _weights() | {"backbone.bn.num_batches_tracked": np.array([6], np.int64)}  # a checkpoint's layout
    weights, _ = check_update(sent, MODEL, "none", BOUND)
    assert weights["backbone.bn.num_batches_tracked"].shape == ()
    model = MODEL | {"backbone.bn.num_batches_tracked": np.array([5], np.int64)}
    assert check_update(_weights(), model, "fp16", BOUND)[0]["backbone.bn.num_batches_tracked"].shape == (1,)


@pytest.mark.parametrize("mode", ["fp16", "int8"])
def test_compressed_updates_are_checked_after_decoding(mode):
    sent = encode_update(_weights(), MODEL, mode)
    weights, norm = check_update(sent, MODEL, mode, BOUND)
    assert weights["backbone.conv.weight"].shape == (4, 3) and norm < 1
    bad = dict(sent) | {"backbone.conv.weight": np.ones(1, sent["backbone.conv.weight"].dtype)}
    with pytest.raises(Rejected, match="has shape"):
        check_update(bad, MODEL, mode, BOUND)
    if mode == "int8":  # a huge scale decodes to Inf
        scale = "backbone.conv.weight::scale"
        with pytest.raises(Rejected, match="not finite once decoded"):
            check_update(dict(sent) | {scale: np.array([3e38], np.float32)}, MODEL, mode, BOUND)
    else:
        big = dict(sent) | {"backbone.conv.weight": np.full((4, 3), 60000, np.float16)}
        with pytest.raises(Rejected, match="above update-norm-bound"):
            check_update(big, MODEL, mode, BOUND)


# ---- assemble: a rejected reply is a missed round, never a failed run ----------------------------------


def _step(aggregation: str = "fedavg") -> UnitStep:
    key = UnitKey("mdmt", "resnet18", "loco", "A", 0)
    plan = UnitPlan(key, get_method("mdmt"), "A", ["B", "C", "D"], {}, {})
    config = {P.CFG_COMPRESSION: "none", P.CFG_AGGREGATION: aggregation}
    tasks = {s: SiteTask(train=True, splits=("val",)) for s in ("B", "C", "D")}
    return UnitStep(key, plan, dict(MODEL), config, tasks)


def _honest(shift: float) -> SiteReply:
    return SiteReply("ok", _metrics(), _weights(shift))


@pytest.mark.parametrize(
    "reply, reason",
    [
        (SiteReply("ok", _metrics(), _bad_update("nan")[0]), "not finite"),
        (SiteReply("ok", _metrics(), _bad_update("scalar for (4,3)")[0]), "has shape ()"),
        (SiteReply("ok", _metrics(**{"n-prognosis": 10**12, P.NUM_EXAMPLES: 10**12}), _weights()), "above the 9"),
        (SiteReply("ok", _metrics(**{P.NUM_EXAMPLES: float("nan")}), _weights()), "whole number"),
        (SiteReply("ok", {"val/n-prognosis": 1}, _weights()), "lack 'n-severity'"),
        (SiteReply("ok", _metrics(), None), "the reply carries no update"),
        (SiteReply("ok", ["not", "a", "record"], _weights()), "metrics must be a record"),
        (SiteReply("ok", _metrics(), _weights() | {"backbone.conv.weight": object()}), "is not an array"),
    ],
)
def test_a_hostile_reply_leaves_the_site_out_and_the_model_finite(reply, reason):
    declared = {s: DECLARED["B"] for s in ("B", "C", "D")}
    replies = {("B", 0): _honest(0.01), ("C", 0): reply, ("D", 0): _honest(0.03)}
    (res,) = assemble([_step()], replies, declared, BOUND)
    assert res.train_status["B"] == res.train_status["D"] == "ok"
    assert res.train_status["C"].startswith("rejected: ") and reason in res.train_status["C"]
    assert sorted(res.trained) == ["B", "D"] and "C" not in res.evals
    assert all(np.isfinite(v).all() for v in res.arrays.values())
    assert np.allclose(res.arrays["backbone.conv.weight"], 0.02)  # the mean of B and D only


class _HostileGrid:
    """Answers a round trip as three sites: B without metrics, C with a packed buffer that is no .npz,
    D honestly."""

    NODES = {"B": 11, "C": 12, "D": 13}

    def send_and_receive(self, messages, *, timeout=None):
        from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

        replies = []
        for k, msg in enumerate(messages):
            msg.metadata.__dict__["_message_id"] = f"m{k}"
            node = msg.metadata.dst_node_id
            content = RecordDict({P.ARRAYS: ArrayRecord({k: Array(v) for k, v in _weights().items()})})
            if node != self.NODES["B"]:
                content[P.METRICS] = MetricRecord(_metrics())
            if node == self.NODES["C"]:
                content[P.ARRAYS] = ArrayRecord({"npz": Array(np.arange(10, dtype=np.uint8))})
            replies.append(Message(content, reply_to=msg))
        return replies

    def get_node_ids(self):
        return list(self.NODES.values())


def test_a_round_trip_with_unreadable_replies_goes_on(task_identity):
    from mdmt.server.app import FlowerRounds

    grid = _HostileGrid()
    sites = {s: SiteInfo(s, "prognosis", DECLARED["B"], "h") for s in grid.NODES}
    (res,) = FlowerRounds(grid, dict(grid.NODES), 5.0, None, sites).step([_step()])
    assert res.train_status["B"] == "rejected: the reply has no metrics"
    assert res.train_status["C"].startswith("rejected: site C's arrays: the packed arrays are not an .npz buffer")
    assert res.train_status["D"] == "ok" and sorted(res.trained) == ["D"]
    assert np.allclose(res.arrays["backbone.conv.weight"], 0.01)


# ---- robust rules ---------------------------------------------------------------------------------------


def _robust_case(rule: str) -> tuple[float, float]:
    """How far one poisoned site (norm 0.9 x BOUND, accepted) moves the backbone under ``rule`` and under
    task-aware FedAvg, with four honest sites."""
    rng = np.random.default_rng(0)
    honest = [
        SiteUpdate(s, {k: (v + rng.normal(0, 0.01, v.shape)).astype(v.dtype) for k, v in MODEL.items()}, 10, {})
        for s in "BCDE"
    ]
    bad = {k: v.copy() for k, v in MODEL.items()}
    bad["backbone.conv.weight"] = np.full((4, 3), 0.9 * BOUND / math.sqrt(12), np.float32)
    assert check_update(bad, MODEL, "none", BOUND)[1] <= BOUND  # the poison passes the norm bound
    updates = [*honest, SiteUpdate("X", bad, 10, {})]

    def moved(out):
        return float(np.linalg.norm(out["backbone.conv.weight"] - MODEL["backbone.conv.weight"]))

    return moved(task_aware_fedavg(MODEL, updates, rule=rule)), moved(task_aware_fedavg(MODEL, updates))


@pytest.mark.parametrize("rule", ["median", "trimmed-mean"])
def test_one_poisoned_site_moves_the_robust_aggregate_less_than_the_mean(rule):
    robust, mean = _robust_case(rule)
    assert robust < 0.05  # within the honest sites' spread
    assert mean > 0.9 * BOUND / 5 * 0.99  # the mean moves by the poison's share


def test_robust_rules_are_task_aware_and_keep_dtypes():
    a = {k: np.full_like(v, 1) for k, v in MODEL.items()}
    b = {k: np.full_like(v, 2) for k, v in MODEL.items()}
    c = {k: np.full_like(v, 9) for k, v in MODEL.items()}
    ups = [
        SiteUpdate("A", a, 5, {"prognosis": 5}),
        SiteUpdate("B", b, 5, {"prognosis": 5, "severity": 5}),
        SiteUpdate("C", c, 5, {"severity": 5}),
    ]
    med = task_aware_fedavg(MODEL, ups, rule="median")
    assert np.all(med["backbone.conv.weight"] == 2)  # median of 1, 2, 9
    assert np.all(med["heads.prognosis.weight"] == 1.5)  # A and B trained it
    assert np.all(med["heads.severity.weight"] == 5.5)  # B and C trained it
    assert med["backbone.bn.num_batches_tracked"].dtype == np.int64
    trimmed = task_aware_fedavg(MODEL, ups, rule="trimmed-mean")
    assert np.all(trimmed["backbone.conv.weight"] == 2)  # 1 and 9 cut
    assert [trim_count(n) for n in (2, 3, 5, 10, 11)] == [0, 1, 1, 2, 2]


def test_robust_rule_config_and_norm_bound_are_validated():
    assert RunConfig.from_mapping({"aggregation": "median"}).aggregation == "median"
    with pytest.raises(ConfigError, match="secure aggregation gives the server only the sum"):
        RunConfig.from_mapping({"aggregation": "trimmed-mean", "secure-aggregation": True})
    with pytest.raises(ConfigError, match="'update-norm-bound' must be >= 0"):
        RunConfig.from_mapping({"update-norm-bound": -1})


# ---- discovery ------------------------------------------------------------------------------------------


def _info(site: str) -> SiteInfo:
    return SiteInfo(site, "prognosis", {"train-prognosis": 5}, "h")


def test_two_claims_to_one_site_at_discovery_name_the_site_and_both_nodes():
    with pytest.raises(ConfigError) as exc:
        map_sites([(_info("A"), 11), (_info("B"), 12), (_info("A"), 13)], {"A", "B"}, waited_s=1)
    assert "two nodes claim site 'A' (nodes 11 and 13)" in str(exc.value) and "\n" not in str(exc.value)


class _Grid:
    """A grid whose nodes answer the discovery query with the site each claims."""

    def __init__(self, claims: dict[int, str]):
        self.claims, self.online = claims, set(claims)

    def get_node_ids(self):
        return sorted(self.online)


def test_a_node_claiming_an_online_site_mid_run_is_refused(monkeypatch, caplog):
    from mdmt.server import app as server

    grid = _Grid({1: "A", 2: "B"})
    monkeypatch.setattr(
        server,
        "query_sites",
        lambda g, nodes, timeout: ([(_info(g.claims[n]), n) for n in nodes], {n: "ok" for n in nodes}),
    )
    rounds = server.FlowerRounds(grid, {"A": 1, "B": 2}, 5.0, None, {"A": _info("A"), "B": _info("B")})
    grid.claims[3], grid.online = "A", {1, 2, 3}
    with caplog.at_level("WARNING", logger="mdmt"):
        rounds.refresh()
    assert rounds.node_of == {"A": 1, "B": 2}
    assert "node 3 claims site A, which node 1 serves and is still online; node 3 is refused" in caplog.text
    grid.online = {2, 3}  # A's node has gone: the refused claimant now takes its place
    rounds.refresh()
    assert rounds.node_of == {"A": 3, "B": 2}


# ---- a real Flower simulation with one hostile site ------------------------------------------------------

SITES = "A,B,C,BRIXIA"
EXPECTED = {  # (method, round) -> what the store must say of the hostile site's train reply
    ("mdmt", 1): "'backbone.",  # NaN: not finite
    ("mdmt", 2): "is not finite",
    ("mdmt", 3): "has shape (1,)",
    ("mdmt", 4): "metrics lack 'n-prognosis'",
    ("stl_prognosis", 1): "has dtype int32",
    ("stl_prognosis", 2): "'n-prognosis' is 1000000000000, above the 9 the site declared",
    ("stl_prognosis", 3): "above update-norm-bound",
    ("stl_prognosis", 4): "'hist-prognosis' has an entry outside [0, 1]",
}


def _hostile_app(home: Path) -> Path:
    """tests/hostile_app with a pyproject naming its ClientApp, the project's ServerApp and every key of
    the run-config schema (mdmt.ops.flwr_app)."""
    from mdmt.ops.flwr_app import app_manifest

    app = home / "app"
    shutil.copytree(APP, app, ignore=shutil.ignore_patterns("__pycache__"))
    manifest = app_manifest()
    manifest["project"]["name"] = "mdmt-hostile-check"
    manifest["tool"]["flwr"]["app"]["components"]["clientapp"] = "hostile_check.client_app:app"
    (app / "pyproject.toml").write_text(tomli_w.dumps(manifest))
    return app


@pytest.fixture(scope="module")
def hostile_runs(small_federation, tmp_path_factory):
    """Two `flwr run`s on one simulation SuperLink this fixture starts (and stops by PID): fedavg with
    every attack (2 units x 4 rounds, packed arrays, no compression), then median with a poisoned update
    within the bound (1 round, one Flower Array per tensor, fp16 updates)."""
    from mdmt.ops.launch import LocalSimulation, processes_with_token
    from mdmt.ops.loco import ingest_sites, prepare_config

    home = tmp_path_factory.mktemp("hostile")
    app = _hostile_app(home)
    common = {
        "fed-dir": str(small_federation),
        "backbone": "shufflenet_v2_x0_5",
        "image-size": 32,
        "holdouts": "A",
        "sites": SITES,
        "batch-size": 16,
        "seed": 0,
        "select-after": 0,
        "patience": 0,
    }
    attacks = {"method": "mdmt,stl_prognosis", "num-rounds": 4, "update-compression": "none", "pack-arrays": True}
    median = {"method": "mdmt", "num-rounds": 1, "aggregation": "median", "update-compression": "fp16"}
    runs = {"attacks": common | attacks, "median": common | median | {"pack-arrays": False}}
    t0 = time.monotonic()
    cfgs = {}
    with LocalSimulation(home / "flwr") as sim:
        for name, values in runs.items():
            cfg = cfgs[name] = prepare_config(values | {"workspace": str(home / name)})
            ingest_sites(cfg, echo=lambda *_: None)
            with open(home / f"{name}.log", "wb") as fh:
                rc = sim.run(app, cfg.write_toml(home / f"{name}.toml"), num_supernodes=4, output=fh)
            assert rc == 0, (home / f"{name}.log").read_text()[-3000:]
            with sqlite3.connect(cfg.store_path) as db:
                status = db.execute("SELECT unit_id, status, message FROM units").fetchall()
            assert status and all(st == "done" for _, st, _ in status), status
        token = sim.token
    assert processes_with_token(token) == []
    return cfgs, time.monotonic() - t0


def _latest(cfg: RunConfig, unit: str) -> dict[str, np.ndarray]:
    import torch

    path = cfg.workspace_path / "checkpoints" / unit.replace("/", "__") / "latest.pt"
    return {k: v.numpy() for k, v in torch.load(path, weights_only=True)["state_dict"].items()}


def _float_distance(a: dict, b: dict, keys=None) -> float:
    keys = [k for k in (keys or b) if b[k].dtype.kind == "f"]
    return math.sqrt(sum(float(np.square(a[k].astype(np.float64) - b[k].astype(np.float64)).sum()) for k in keys))


@pytest.mark.slow
def test_simulation_rejects_every_hostile_reply_and_completes(hostile_runs, record_property):
    cfgs, seconds = hostile_runs
    record_property("figures", f"two hostile-site simulations: {seconds:.0f} s")
    cfg = cfgs["attacks"]
    db = sqlite3.connect(cfg.store_path)
    units = dict(db.execute("SELECT unit_id, status FROM units").fetchall())
    rows = db.execute("SELECT unit_id, round, site, status FROM participation WHERE kind='train'").fetchall()
    scored = db.execute("SELECT unit_id, round, site, status FROM participation WHERE kind='evaluate'").fetchall()
    db.close()
    assert sorted(units.values()) == ["done", "done"], units
    rejected = {(u.split("/")[0], r): st for u, r, s, st in rows if s == "C" and st != "ok"}
    assert set(rejected) == set(EXPECTED), rejected
    for key, reason in EXPECTED.items():
        assert rejected[key].startswith("rejected: ") and reason in rejected[key], (key, rejected[key])
    assert all(st == "ok" for u, r, s, st in rows if s != "C")  # the honest sites were never turned away
    assert {s for _, _, s, _ in scored} == {"A", "B", "C", "BRIXIA"}
    # An honest site's failure reaches the coordinator as a code and a scrubbed line: no path, file or id.
    failed = [st for u, r, s, st in scored if st != "ok"]
    assert [(u.split("/")[0], s) for u, r, s, st in scored if st != "ok"] == [("mdmt", "A")], failed
    assert failed[0].startswith("error: ") and "OSError" in failed[0], failed
    for secret in ("/srv", "hospital-a", "PAT-0042", "IM-0001-0007", ".dcm"):
        assert secret not in failed[0], failed
    # The dashboard's participation grid shows the rejection with its reason, marked bad.
    from mdmt.results.dashboard import data as D
    from mdmt.results.dashboard.runs_page import _participation_cell

    ud = D.load_unit(D.resolve_sources([str(cfg.store_path)]), 0, "mdmt/shufflenet_v2_x0_5/loco/A/seed0")
    cell = _participation_cell(next(r for r in D.participation_grid(ud)[1] if r["round"] == 3)["cells"]["C"])
    assert "train rejected: " in cell.children and EXPECTED[("mdmt", 3)] in cell.children
    assert cell.className == "text bad"
    for method in ("mdmt", "stl_prognosis"):
        final = _latest(cfg, f"{method}/shufflenet_v2_x0_5/loco/A/seed0")
        before = dict(np.load(cfg.workspace_path / "hostile" / f"global-{method}-r4.npz"))
        assert all(np.isfinite(v).all() for v in final.values())
        assert _float_distance(final, before) <= cfg.update_norm_bound


@pytest.mark.slow
def test_simulation_median_bounds_what_a_poisoned_site_does(hostile_runs):
    from mdmt.ml.naming import head_of, is_bn_stat

    cfg = hostile_runs[0]["median"]
    out = cfg.workspace_path / "hostile"
    before = dict(np.load(out / "global-mdmt-r1.npz"))
    after = _latest(cfg, "mdmt/shufflenet_v2_x0_5/loco/A/seed0")
    sites = {s: dict(np.load(out / f"site-{s}-mdmt-r1.npz")) for s in ("B", "C", "BRIXIA")}
    keys = [k for k, v in before.items() if v.dtype.kind == "f" and head_of(k) is None and not is_bn_stat(k)]
    poison = _float_distance(sites["C"], before, keys)
    assert 0.85 * cfg.update_norm_bound < poison <= cfg.update_norm_bound  # accepted: within the bound
    for k in keys:  # the server took the coordinate-wise median of the three updates
        want = np.median(np.stack([sites[s][k] for s in sites]), axis=0)
        np.testing.assert_allclose(after[k], want, rtol=1e-6, atol=1e-6)
    moved = _float_distance(after, before, keys)
    weights = {"B": 9, "C": 9, "BRIXIA": 149}  # their training rows: what FedAvg would weight them by
    mean = {k: sum(w * sites[s][k].astype(np.float64) for s, w in weights.items()) / 167 for k in keys}
    assert moved < 0.01 * poison  # the poisoned site barely moved the median
    assert _float_distance(mean, before, keys) > 5 * moved  # and FedAvg would have moved it much more
