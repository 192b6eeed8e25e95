"""Planning a federated run, with no Flower types: which units a config holds, which node is which site,
and for one unit who trains and who is evaluated on which splits."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from mdmt.errors import ConfigError
from mdmt.fed import protocol as P
from mdmt.fed.config import RunConfig
from mdmt.ml.methods import PROGNOSIS, TASKS, Method, get_method, local_site, role_tasks
from mdmt.store import UnitKey

log = logging.getLogger("mdmt")


@dataclass
class SiteInfo:
    site: str
    role: str
    counts: dict[str, int]  # "<split>-<task>" -> labelled images
    manifest_hash: str

    @classmethod
    def from_summary(cls, s: dict[str, Any]) -> SiteInfo:
        counts = {k: int(v) for k, v in s.items() if k.endswith(("-prognosis", "-severity"))}
        return cls(str(s["site"]), str(s["role"]), counts, str(s["manifest-hash"]))


@dataclass
class UnitPlan:
    key: UnitKey
    method: Method
    holdout: str | None
    train_sites: list[str]  # sites whose data trains the model
    train_messages: dict[str, dict[str, Any]]  # site that receives a train message -> extra config
    eval_splits: dict[str, tuple[str, ...]]  # site -> the splits it evaluates every round

    @property
    def protocol(self) -> str:
        return self.key.protocol


def _folds(cfg: RunConfig, method: Method) -> tuple[str, ...]:
    if cfg.protocol == "cv":
        return cfg.cv_fold_list
    if not method.loco:
        return ("-",)
    if not cfg.holdout_list:
        raise ConfigError(f"method '{method.name}' needs at least one held-out centre in 'holdouts'")
    return cfg.holdout_list


def unit_keys(cfg: RunConfig, roles: dict[str, str] | None = None) -> list[UnitKey]:
    """Every (method, backbone, fold) of a config, in run order.

    A method without LOCO runs once under loco (fold '-'); under cv every method runs every fold. A
    method that starts from another's model (ft) is preceded by that method's unit of the same fold
    rule. The local method becomes one unit per training site ('local:<site>'), which needs ``roles``
    (site -> role) to know the sites.
    """
    keys: list[UnitKey] = []

    def add(name: str, backbone: str, fold: str) -> None:
        k = UnitKey(name, backbone, cfg.protocol, fold, cfg.seed)
        if k not in keys:
            keys.append(k)

    for backbone in cfg.backbones:
        for m in cfg.methods:
            method = get_method(m)
            for fold in _folds(cfg, method):
                if method.init_from:
                    first = get_method(method.init_from)
                    add(first.name, backbone, fold if (cfg.protocol == "cv" or first.loco) else "-")
                if method.per_site:
                    if roles is None:
                        raise ConfigError(f"method '{m}' needs the federation's sites to plan its units")
                    for site in sorted(roles):
                        if site != fold and method.trains(role_tasks(roles[site])):
                            add(f"{m}:{site}", backbone, fold)
                else:
                    add(m, backbone, fold)
    return keys


def map_sites(
    found: list[tuple[SiteInfo, int]], expected: set[str], min_sites: int, waited_s: float
) -> tuple[dict[str, SiteInfo], dict[str, int]]:
    """(site -> info, site -> node id) from the nodes that answered the discovery query. Missing configured
    sites are named: the run goes on without them when at least ``min_sites`` answered, else it fails."""
    sites: dict[str, SiteInfo] = {}
    node_of: dict[str, int] = {}
    for info, node in found:
        if info.site in node_of:
            raise RuntimeError(f"two nodes claim site '{info.site}'; each site must run exactly one node")
        sites[info.site], node_of[info.site] = info, node
    missing = sorted(expected - set(sites))
    if missing and len(sites) < max(1, min_sites):
        raise RuntimeError(
            f"only {len(sites)} of {len(expected)} sites connected within {waited_s:.0f}s "
            f"(min-sites {min_sites}); missing: {', '.join(missing)}"
        )
    if not sites:
        raise RuntimeError(f"no site node connected within {waited_s:.0f}s")
    if missing:
        log.warning(
            "sites not connected after %.0fs: %s; the run goes on with %d of %d (min-sites %d)",
            waited_s,
            ", ".join(missing),
            len(sites),
            len(expected),
            min_sites,
        )
    log.info("sites: %s", ", ".join(f"{s} ({i.role})" for s, i in sorted(sites.items())))
    return sites, node_of


def plan_unit(key: UnitKey, sites: dict[str, SiteInfo]) -> UnitPlan:
    method = get_method(key.method)
    cv = key.protocol == "cv"
    holdout = None if (cv or key.fold == "-") else key.fold
    if holdout is not None:
        if holdout not in sites:
            raise ConfigError(
                f"held-out centre '{holdout}' is not a site of this federation ({', '.join(sorted(sites))})"
            )
        if PROGNOSIS not in role_tasks(sites[holdout].role):
            raise ConfigError(f"held-out centre '{holdout}' has no prognosis labels (role {sites[holdout].role})")
    only = local_site(key.method)
    if only is not None and only not in sites:
        raise ConfigError(f"unit {key.unit_id}: site '{only}' is not connected ({', '.join(sorted(sites))})")
    pool = "all" if cv else "train"  # under cv every site's rows rotate through train/val/test
    train_sites = []
    for name in sorted(sites):
        info = sites[name]
        if name == holdout or not method.trains(role_tasks(info.role)) or (only is not None and name != only):
            continue
        if sum(info.counts.get(f"{pool}-{t}", 0) for t in method.tasks) > 0:
            train_sites.append(name)
    if not train_sites:
        raise ConfigError(f"method '{key.method}' has no site to train on (sites: {', '.join(sorted(sites))})")
    if method.pooled:
        messages = {train_sites[0]: {P.CFG_POOL: ",".join(train_sites)}}
    else:
        messages = {s: {} for s in train_sites}
    evals: dict[str, tuple[str, ...]] = {}
    for s in train_sites:
        has_test = cv or any(sites[s].counts.get(f"test-{t}", 0) > 0 for t in TASKS)
        evals[s] = ("val", "test") if has_test else ("val",)
    if holdout is not None:
        evals[holdout] = ("all",)
    return UnitPlan(key, method, holdout, train_sites, messages, evals)


def secagg_count_scale(plan: UnitPlan, sites: dict[str, SiteInfo]) -> int:
    """The public count bound of a secure round: the largest training count a site of the unit reported."""
    pool = "all" if plan.protocol == "cv" else "train"
    return max(
        [sum(sites[s].counts.get(f"{pool}-{t}", 0) for t in TASKS) for s in plan.train_messages if s in sites] + [1]
    )


def unit_rounds(cfg: RunConfig, key: UnitKey) -> int:
    """Rounds of a unit: stl_severity (FT's phase 1) may get its own count."""
    if key.method == "stl_severity" and cfg.ft_phase1_rounds > 0:
        return cfg.ft_phase1_rounds
    return cfg.num_rounds
