"""Running the units of a config on the server, with no Flower types: decide them from the store, then
advance up to ``concurrent-units`` of them in lockstep, one round trip per round for all of them (each
unit's rounds are mdmt.fed.unitrun's). A unit that starts from another's model (ft) starts once that one
is done. Aggregation never depends on the order in which replies arrive (sites are taken in name order).

server/app.py supplies a ``Rounds`` object (mdmt.fed.steps) that moves the models through Flower.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from mdmt.errors import ConfigError
from mdmt.fed.checkpoint import load_checkpoint
from mdmt.fed.config import RunConfig
from mdmt.fed.plan import Decision, SiteInfo, best_checkpoint, decide_units, plan_unit, source_unit, unit_keys
from mdmt.fed.steps import Rounds
from mdmt.fed.unitrun import UnitRun
from mdmt.ml.model import build_model
from mdmt.seeding import derive_seed
from mdmt.store import RunStore, UnitKey

log = logging.getLogger("mdmt")


def initial_arrays(cfg: RunConfig, backbone: str) -> dict[str, np.ndarray]:
    """The model every site starts from: seeded from the config, the weights file loaded here only."""
    model = build_model(
        backbone,
        weights=cfg.weights,
        pretrained=cfg.pretrained,
        seed=derive_seed(cfg.seed, "init", backbone),
        dp=cfg.dp,
    )
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def starting_arrays(cfg: RunConfig, key: UnitKey, store: RunStore) -> tuple[dict[str, np.ndarray], str]:
    """The unit's starting model and where it came from: the seeded initial model, or, for a method that
    starts from another's (ft), that unit's selected checkpoint."""
    src = source_unit(key)
    if src is None:
        return initial_arrays(cfg, key.backbone), "init"
    path = best_checkpoint(cfg, src)
    if store.unit_status(src) != "done" or not path.is_file():
        raise ConfigError(
            f"unit {key.unit_id} starts from {src.unit_id}, which has not finished "
            f"(status {store.unit_status(src)}, checkpoint {path})"
        )
    state = load_checkpoint(path)["state_dict"]
    return {k: v.numpy().copy() for k, v in state.items()}, src.unit_id


def run_units(
    cfg: RunConfig, sites: dict[str, SiteInfo], rounds: Rounds, store: RunStore, flwr_run_id: str = ""
) -> list[Decision]:
    """Every unit of the config, decided from the store first (mdmt.fed.plan.decide_units): a refused unit
    stops the run before anything trains; done units are skipped; interrupted ones continue. The rest run
    up to ``concurrent-units`` at a time in lockstep. If the run is stopped (SIGINT, SIGTERM, an
    exception), the units in progress are marked interrupted on the way out."""
    keys = unit_keys(cfg, {s: i.role for s, i in sites.items()})
    decisions = decide_units(cfg, keys, sites, store)
    refused = [d for d in decisions if d.action == "refuse"]
    if refused:
        more = f" ({len(refused) - 1} more unit(s) likewise)" if len(refused) > 1 else ""
        raise ConfigError(refused[0].reason + more)
    for d in decisions:
        if d.action == "skip":
            log.info("unit %s: already done (fingerprint %s), skipped", d.key.unit_id, d.fingerprint)
    pending = [d for d in decisions if d.action != "skip"]
    active: list[UnitRun] = []
    try:
        while pending or active:
            for d in [d for d in pending if _startable(d.key, store, active)][: cfg.concurrent_units - len(active)]:
                pending.remove(d)
                arrays, start = starting_arrays(cfg, d.key, store)
                plan = plan_unit(d.key, sites)
                active.append(UnitRun(cfg, plan, sites, store, arrays, start, flwr_run_id, d.fingerprint, d.recipe))
            if not active:
                waiting = ", ".join(d.key.unit_id for d in pending)
                raise ConfigError(f"units {waiting} start from units that did not finish")
            steps = [u.next_step() for u in active]
            started = time.perf_counter()
            results = rounds.step(steps)
            seconds = time.perf_counter() - started
            for u, step, res in zip(active, steps, results):
                u.absorb(step, res, seconds)
            active = [u for u in active if not u.done]
    except BaseException as exc:
        why = " ".join(str(exc).split())[:200] or exc.__class__.__name__
        for u in active:
            if store.unit_status(u.key) == "running":
                store.finish_unit(u.key, "interrupted", None, f"{exc.__class__.__name__}: {why}")
                log.warning("unit %s: interrupted (%s)", u.key.unit_id, exc.__class__.__name__)
        raise
    return decisions


def _startable(key: UnitKey, store: RunStore, active: list[UnitRun]) -> bool:
    """A unit starts once the unit it starts from (if any) is done and no longer in progress."""
    src = source_unit(key)
    return src is None or (store.unit_status(src) == "done" and all(u.key != src for u in active))
