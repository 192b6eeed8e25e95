"""Planning a federated run, with no Flower types: which units a config holds, which node is which site,
for one unit who trains and who is evaluated on which splits, and whether the store already holds that
unit's result (same id and same fingerprint) or holds another result under its id."""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mdmt.errors import ConfigError, ProtocolError
from mdmt.fed import protocol as P
from mdmt.fed.config import OPERATIONAL_KEYS, RunConfig
from mdmt.ml.methods import PROGNOSIS, TASKS, Method, get_method, local_site, role_tasks
from mdmt.store import RunStore, UnitKey

log = logging.getLogger("mdmt")


@dataclass
class SiteInfo:
    site: str
    role: str
    counts: dict[str, int]  # "<split>-<task>" -> labelled images
    manifest_hash: str
    simulated: bool = False  # a simulation node (Flower's partition-id), not a site daemon

    @classmethod
    def from_summary(cls, s: dict[str, Any]) -> SiteInfo:
        """A site's query reply; one that speaks another message contract (or names none) is refused."""
        version = s.get(P.CONTRACT_VERSION_KEY)
        if str(version) != str(P.CONTRACT_VERSION):
            said = "no contract version" if version is None else f"message contract {version}"
            raise ProtocolError(
                f"site {s.get('site', '?')}: its summary has {said}, this server speaks message contract "
                f"{P.CONTRACT_VERSION}; run the same mdmt version at the site and the server"
            )
        counts = {k: int(v) for k, v in s.items() if k.endswith(("-prognosis", "-severity"))}
        return cls(
            str(s["site"]), str(s["role"]), counts, str(s["manifest-hash"]), str(s.get(P.NODE_KIND)) == P.SIMULATION
        )


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
    found: list[tuple[SiteInfo, int]], expected: set[str], waited_s: float
) -> tuple[dict[str, SiteInfo], dict[str, int]]:
    """(site -> info, site -> node id) from the nodes that answered the discovery query. Every configured
    site must answer before any training: a missing one stops the run with one line that says how to start
    it (``num-supernodes`` in a simulation, the site's daemon in a deployment). ``min-sites`` applies to the
    rounds after discovery only."""
    sites: dict[str, SiteInfo] = {}
    node_of: dict[str, int] = {}
    for info, node in found:
        if info.site in node_of and node_of[info.site] != node:
            first = node_of[info.site]
            raise ConfigError(
                f"two nodes claim site '{info.site}' (nodes {first} and {node}); neither is used: each site must "
                "run exactly one node, so stop the other one (or register the site's key), then submit again"
            )
        sites[info.site], node_of[info.site] = info, node
    missing = sorted(expected - set(sites))
    if missing or not sites:
        simulated = any(info.simulated for info, _ in found)
        hint = (
            f'run the simulation with --federation-config "num-supernodes={len(expected)}" (one node per site)'
            if simulated
            else f"start the site daemons of {', '.join(missing)} (mdmt deploy supernode-cmd), then submit again"
        )
        answered = ", ".join(sorted(sites)) or "none"
        raise ConfigError(
            f"only {len(sites)} of {len(expected)} configured sites answered within {waited_s:.0f}s "
            f"({answered}); missing: {', '.join(missing) or 'all'}; {hint}"
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


# ---- a unit's identity: id + fingerprint ---------------------------------------------------------------


def file_digest(path: str) -> str:
    """sha256 of a file's bytes ('' for no file): a weights file is part of a unit by its content."""
    if not path:
        return ""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# Packages whose code does not change a unit's result: the report, the dashboard and the command line.
NOT_TRAINING_CODE = ("results", "ops")


def code_digest(package: Path, extra: dict[str, Path]) -> str:
    """sha256 (16 hex digits) over the .py files of ``package`` but its NOT_TRAINING_CODE folders and the
    folders named in ``extra``, and over every .py file of each ``extra`` folder (mounted at its name),
    each file by its path in the package and its bytes."""
    h = hashlib.sha256()
    files = []
    for prefix, root in {"": package, **extra}.items():
        for f in root.rglob("*.py"):
            rel = f.relative_to(root)
            if not prefix and rel.parts[0] in (*NOT_TRAINING_CODE, *extra):
                continue
            files.append(((Path(prefix) / rel).as_posix(), f))
    for rel, f in sorted(files):
        h.update(rel.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


@functools.lru_cache(maxsize=1)
def training_code_digest() -> str:
    """The digest of the training code this process runs: the mdmt package (data, ml, fed, store) with
    its ServerApp and ClientApp packages, without the report, dashboard and command line. Units with the
    same digest came from the same training code, whatever else changed in the checkout."""
    extra = {}
    for sub in ("server", "client"):
        spec = importlib.util.find_spec(f"mdmt.{sub}")
        if spec is not None and spec.submodule_search_locations:
            extra[sub] = Path(list(spec.submodule_search_locations)[0])
    return code_digest(Path(__file__).resolve().parent.parent, extra)


def unit_recipe(cfg: RunConfig, plan: UnitPlan, sites: dict[str, SiteInfo], starts_from: str = "") -> dict[str, Any]:
    """Everything that defines a unit's result: its training and evaluation sites with their manifest
    hashes, every run-config key that changes results (all but mdmt.fed.config.OPERATIONAL_KEYS), the
    content of the weights file, the fingerprint of the unit it starts from (ft), and the digest of the
    training code (training_code_digest)."""
    involved = sorted(set(plan.train_sites) | set(plan.eval_splits))
    return {
        "unit": plan.key.unit_id,
        "train-sites": list(plan.train_sites),
        "pooled": sorted({s for x in plan.train_messages.values() for s in str(x.get(P.CFG_POOL, "")).split(",") if s}),
        "evaluate": {s: list(sp) for s, sp in sorted(plan.eval_splits.items())},
        "manifests": {s: sites[s].manifest_hash for s in involved if s in sites},
        "recipe": {k: v for k, v in sorted(cfg.to_mapping().items()) if k not in OPERATIONAL_KEYS}
        | {"num-rounds": unit_rounds(cfg, plan.key)},
        "weights": file_digest(cfg.weights),
        "starts-from": starts_from,
        "code": training_code_digest(),
    }


def fingerprint(recipe: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()[:16]


def recipe_differences(stored: dict[str, Any] | None, now: dict[str, Any]) -> str:
    """What differs between a stored unit's recipe and this run's, as one short phrase."""
    if not stored:
        return "it was stored before fingerprints were kept (fingerprint unknown)"
    out = []
    for key in ("code", "train-sites", "pooled", "evaluate", "manifests", "weights", "starts-from"):
        if stored.get(key) != now.get(key):
            label = {
                "code": "training code",
                "manifests": "manifest hashes",
                "starts-from": "the unit it starts from",
            }.get(key, key)
            out.append(f"{label} {_short(stored.get(key))} (now {_short(now.get(key))})")
    old, new = stored.get("recipe", {}), now.get("recipe", {})
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            out.append(f"{key} {old.get(key, '(absent)')} (now {new.get(key, '(absent)')})")
    return "; ".join(out[:6]) + ("; ..." if len(out) > 6 else "") if out else "nothing visible"


def _short(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(map(str, value)) or "none"
    if isinstance(value, dict):
        return ",".join(f"{k}:{str(v)[:8]}" for k, v in value.items()) or "none"
    return str(value)[:16] or "none"


@dataclass
class Decision:
    """What a run does with one unit: run it (from round 1), resume it, skip it (done with the same
    fingerprint), or refuse (a done unit with another fingerprint, without ``rerun``)."""

    key: UnitKey
    action: str  # run | resume | skip | refuse
    fingerprint: str
    recipe: dict[str, Any]
    reason: str = ""


def decide_units(cfg: RunConfig, keys: list[UnitKey], sites: dict[str, SiteInfo], store: RunStore) -> list[Decision]:
    """Decide every unit of a run from the store before anything trains. A unit is done for this run
    only with the same id and fingerprint; a done unit with another fingerprint is refused (one line
    naming what differs) unless ``rerun`` is set; an interrupted or running one with the same fingerprint
    is resumed; anything else runs from round 1."""
    planned: dict[str, str] = {}
    out = []
    for key in keys:
        plan = plan_unit(key, sites)
        src = source_unit(key)
        src_fp = planned.get(src.unit_id, "") if src else ""
        recipe = unit_recipe(cfg, plan, sites, src_fp)
        fp = planned[key.unit_id] = fingerprint(recipe)
        row = store.unit(key)
        if row is None:
            out.append(Decision(key, "run", fp, recipe))
            continue
        same = row["fingerprint"] == fp
        if same and row["status"] == "done":
            out.append(Decision(key, "skip", fp, recipe, "already done with the same fingerprint"))
        elif same and row["status"] in ("running", "interrupted"):
            out.append(Decision(key, "resume", fp, recipe))
        elif not same and row["status"] == "done" and not cfg.rerun:
            stored = json.loads(row["recipe"]) if row["recipe"] else None
            out.append(
                Decision(
                    key,
                    "refuse",
                    fp,
                    recipe,
                    f"unit {key.unit_id} in {store.path} is a result of another recipe: "
                    f"{recipe_differences(stored, recipe)}; run with --rerun (run-config rerun = true) to "
                    "replace it, or use another workspace",
                )
            )
        else:
            out.append(Decision(key, "run", fp, recipe))
    return out


def source_unit(key: UnitKey) -> UnitKey | None:
    """The unit whose selected model this unit starts from (ft's phase 1), or None for a unit that starts
    from the seeded initial model. A phase-1 method run per fold (or under CV) is that fold's unit;
    otherwise the one unit of the backbone and seed (fold "-")."""
    source = get_method(key.method).init_from
    if not source:
        return None
    first = get_method(source)
    fold = key.fold if (key.protocol == "cv" or first.loco) else "-"
    return UnitKey(first.name, key.backbone, key.protocol, fold, key.seed)


def best_checkpoint(cfg: RunConfig, key: UnitKey) -> Path:
    """Where a unit's selected model is kept in the workspace."""
    return cfg.workspace_path / "checkpoints" / key.slug / "best.pt"


def expected_sites(cfg: RunConfig, list_sites) -> set[str]:
    """The sites a run must find at discovery: ``sites``, else every site folder of ``fed-dir`` (read
    with ``list_sites`` where the coordinator has that folder, as in a simulation)."""
    if cfg.site_list:
        return set(cfg.site_list)
    return set(list_sites(Path(cfg.fed_path)))
