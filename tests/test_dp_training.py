"""DP-SGD at the sites: epsilon per round in the store, a budget that stops a site's training (it stays
evaluate-only), and an accountant that survives a restart of the site's process."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mdmt.fed import protocol as P
from mdmt.fed.config import RunConfig
from mdmt.fed.site import privacy_file, run_train
from mdmt.fed.sitedata import locate_site
from mdmt.fed.units import initial_arrays

ROOT = Path(__file__).resolve().parent.parent
UNIT = "mdmt/resnet18/loco/A/seed0"


def _cfg(fed: Path, ws: Path, **kw) -> RunConfig:
    values = {
        "fed-dir": str(fed),
        "workspace": str(ws),
        "image-size": 32,
        "batch-size": 8,
        "num-rounds": 3,
        "dp": True,
        "dp-noise-multiplier": 1.0,
        "augment": "none",
        "seed": 0,
    } | kw
    return RunConfig.from_mapping(values)


def _round(cfg: RunConfig, rnd: int, state=None):
    loc = locate_site(cfg, {"site": "B", "data-dir": str(cfg.fed_path / "B"), "workspace": cfg.workspace})
    state = state if state is not None else {k: torch.from_numpy(v) for k, v in initial_arrays(cfg, "resnet18").items()}
    round_config = {
        P.CFG_ROUND: rnd,
        P.CFG_UNIT: UNIT,
        P.CFG_METHOD: "mdmt",
        P.CFG_BACKBONE: "resnet18",
        P.CFG_PROTOCOL: "loco",
        P.CFG_FOLD: "A",
        P.CFG_LR: 1e-3,
        P.CFG_AGGREGATION: "fedavg",
        P.CFG_PROX_MU: 0.0,
    }
    new, metrics = run_train(cfg, loc, state, round_config)
    return new, metrics, loc


_SECOND_ROUND = """
import json, sys
from tests.test_dp_training import _cfg, _round
from pathlib import Path
cfg = _cfg(Path(sys.argv[1]), Path(sys.argv[2]), **json.loads(sys.argv[3]))
_, m, _ = _round(cfg, 2)
print(json.dumps({"epsilon": m["epsilon"], "refused": m["dp-refused"], "n": m["num-examples"]}))
"""


def _second_round_in_a_new_process(fed: Path, ws: Path, **kw) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", _SECOND_ROUND, str(fed), str(ws), json.dumps(kw)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_dp_model_has_no_batchnorm_and_epsilon_continues_after_a_restart(small_federation, tmp_path):
    cfg = _cfg(small_federation, tmp_path)
    state0 = {k: torch.from_numpy(v) for k, v in initial_arrays(cfg, "resnet18").items()}
    assert not any(k.endswith("running_mean") for k in state0)
    new, m1, loc = _round(cfg, 1, state0)
    assert m1["epsilon"] > 0 and m1["dp-refused"] == 0 and m1["num-examples"] > 0
    assert set(new) == set(state0) and any(not torch.equal(new[k], state0[k]) for k in state0)
    saved = json.loads(privacy_file(loc, UNIT).read_text())
    assert len(saved["history"]) == 1
    # The site's process restarts: a fresh interpreter reads the history from disk and goes on from it.
    m2 = _second_round_in_a_new_process(small_federation, tmp_path)
    assert m2["epsilon"] > m1["epsilon"]
    from opacus.accountants import RDPAccountant

    from mdmt.ml.privacy import epsilon_spent, read_accountant

    acc = RDPAccountant()
    acc.history = [tuple(h) for h in read_accountant(privacy_file(loc, UNIT))["history"]]
    assert sum(h[2] for h in acc.history) == 2 * sum(h[2] for h in saved["history"])
    assert abs(epsilon_spent(acc, saved["meta"]["delta"]) - m2["epsilon"]) < 1e-9


def test_a_site_past_its_budget_refuses_to_train(small_federation, tmp_path):
    cfg = _cfg(small_federation, tmp_path)
    _, m1, _ = _round(cfg, 1)
    budget = m1["epsilon"] * 1.05  # round 2 would overshoot it
    m2 = _second_round_in_a_new_process(small_federation, tmp_path, **{"dp-epsilon-budget": budget})
    assert m2["refused"] == 1 and m2["n"] == 0 and abs(m2["epsilon"] - m1["epsilon"]) < 1e-9


def test_dp_settings_errors_name_the_key():
    from mdmt.errors import ConfigError

    with pytest.raises(ConfigError, match="dp-noise-multiplier or dp-target-epsilon"):
        RunConfig.from_mapping({"dp": True})
    with pytest.raises(ConfigError, match="'aggregation' is 'fedprox'; with dp = true"):
        RunConfig.from_mapping({"dp": True, "dp-noise-multiplier": 1.0, "aggregation": "fedprox"})


@pytest.mark.slow
def test_simulation_logs_epsilon_and_stops_a_site_at_its_budget(small_federation, tmp_path):
    """A real Flower run: every training site reports its epsilon each round; a site whose next round
    would pass the budget stops training and is still evaluated."""
    from mdmt.ops.loco import loco

    ws = tmp_path / "ws"
    # Budget between BRIXIA's epsilon after 1 and after 2 rounds (it has far more rows, so it spends
    # the least per round; the small sites pass the budget already at round 1 or 2).
    values = {
        "fed-dir": str(small_federation),
        "workspace": str(ws),
        "method": "mdmt",
        "backbone": "resnet18",
        "num-rounds": 3,
        "image-size": 32,
        "holdouts": "A",
        "sites": "A,B,BRIXIA",
        "batch-size": 8,
        "seed": 0,
        "dp": True,
        "dp-noise-multiplier": 1.0,
        "dp-epsilon-budget": 3.0,
        "augment": "none",
        "select-after": 0,
        "patience": 0,
        "lr-patience": 0,
    }
    loco(values, echo=lambda *_: None)
    db = sqlite3.connect(ws / "store.sqlite")
    eps = db.execute(
        "SELECT site, round, value FROM metrics WHERE unit_id=? AND name='epsilon' ORDER BY site, round", (UNIT,)
    ).fetchall()
    part = db.execute(
        "SELECT site, round, kind, status FROM participation WHERE unit_id=? ORDER BY round", (UNIT,)
    ).fetchall()
    db.close()
    by_site: dict[str, list[float]] = {}
    for site, _, v in eps:
        by_site.setdefault(site, []).append(v)
    assert set(by_site) == {"B", "BRIXIA"}
    for site, values_ in by_site.items():
        assert all(0 < v <= 3.0 + 1e-9 for v in values_), (site, values_)
        assert values_ == sorted(values_)
    refused = [(s, r) for s, r, k, st in part if k == "train" and st.startswith("refused: privacy budget")]
    assert refused, part
    for site, rnd in refused:
        later_train = [r for s, r, k, _ in part if s == site and k == "train" and r > rnd]
        later_eval = [r for s, r, k, st in part if s == site and k == "evaluate" and r > rnd and st == "ok"]
        assert later_train == [] and (rnd == 3 or later_eval), (site, rnd, part)
