"""A site daemon's own rules, applied to every message the server sends (deployment only: a simulation
node, which Flower's partition-id names, keeps the run config's word on everything).

The server is not trusted. What the site decides from its own config and its own records:

* Paths. The run config's path keys (``protocol.RUN_PATH_KEYS``) are ignored: the site's data, workspace
  and cache are its node config's, its crop source is its site config's ``crop-source``, the server-only
  ``store``, ``weights`` and ``site-registry`` are never read. Each ignored key gets one line in the
  site's ``policy.log`` (once per run). ``pool-sites`` naming another site is refused: a site trains on
  its own data only.
* Size. An ``image-size`` above the site's ``max-image-size`` is refused (default 512).
* Differential privacy. With ``dp-required`` (or a ``dp-min-noise`` or an ``epsilon-budget``) a training
  round without DP-SGD is refused; with ``dp-min-noise`` one whose noise multiplier is below it. The
  server's ``dp-delta`` is ignored (the site uses 1/(10 N)). ``epsilon-budget`` bounds what the site's
  data (by manifest hash) spends over every unit: epsilons of the units add up (sequential composition),
  so a new unit-id starts its own accountant but not a new budget, and the server's
  ``dp-epsilon-budget`` can only lower what is left.
* Splits. A unit that trains here evaluates ``val`` and ``test`` only; ``all`` and ``train`` are for a
  unit in which the site is held out. The site keeps which units it trained in and which it evaluated in
  full (``policy/units.json`` in its workspace): training in a unit after evaluating all of its rows in
  it, and evaluating all or train rows in a unit it trained in, are refused.
* Histograms. A split with fewer labelled prognosis rows than ``min-hist-n`` sends its score histogram
  coarsened to ``COARSE_BINS`` bins per class (default 20 rows).

A refusal is a :class:`SiteRefusal`; the ClientApp's outermost mod turns it (and any failure) into an
error reply with one scrubbed line (mdmt.fed.scrub) and keeps serving the next message.
"""

from __future__ import annotations

import fcntl
import json
import time
import traceback
from collections.abc import Iterable, Mapping
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from mdmt.data.manifest import manifest_hash
from mdmt.errors import MDMTError
from mdmt.fed import protocol as P
from mdmt.fed.config import RunConfig
from mdmt.fed.node import NodeConfig
from mdmt.fed.sitedata import SiteLocation, locate_site
from mdmt.ml.metrics import HIST_BINS

POLICY_LOG = "policy.log"  # one line per ignored key and per refusal, in the site's workspace
ERROR_LOG = "errors.log"  # the full text of every failure; only a scrubbed line leaves the site
UNITS_FILE = Path("policy") / "units.json"
TRAINED, HELD_OUT = "trained", "held-out"  # a unit's role at this site, as the site recorded it
WIDE_SPLITS = frozenset({"all", "train"})  # splits only a held-out site evaluates
COARSE_BINS = 10  # score-histogram bins per class of a split below min-hist-n (of HIST_BINS)
_LOGGED: set[tuple[str, int, str]] = set()  # (workspace, run, key): ignored keys already logged


class SiteRefusal(MDMTError):
    """The site's policy refuses a message; the message is one line meant for the coordinator."""


def _append(path: Path, line: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        fh.write(f"{time.time():.3f} {line}\n")


def log_policy(workspace: Path, run_id: int, text: str) -> None:
    """One line in the site's policy log (its workspace): a key ignored, a message refused, a reply withheld."""
    _append(workspace / POLICY_LOG, f"run {run_id}: {' '.join(str(text).split())}")


def site_workspace(node_config: Mapping[str, Any]) -> Path | None:
    """A site daemon's workspace folder from its node config alone (None: a simulation node, or a node
    config that does not name one)."""
    try:
        node = NodeConfig.from_flower(node_config)
    except (KeyError, MDMTError):
        return None
    return node.workspace / "sites" / node.site


def log_failure(workspace: Path, run_id: int, exc: BaseException) -> None:
    """The whole failure, traceback included, on the site's own disk."""
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    _append(workspace / ERROR_LOG, f"run {run_id}:\n{text}")


def refuse(loc: SiteLocation, run_id: int, reason: str) -> SiteRefusal:
    log_policy(loc.workspace, run_id, f"refused: {reason}")
    return SiteRefusal(reason)


# ---- the site's config --------------------------------------------------------------------------
def site_context(run_config: Mapping[str, Any], node_config: Mapping[str, Any], run_id: int = 0):
    """(run config, site location) of a message. A site daemon's run config has every path key replaced
    by the site's own values, and its image size checked against the site's maximum."""
    cfg = RunConfig.from_mapping(run_config)
    loc = locate_site(cfg, node_config)
    node = loc.node
    if node is None:
        return cfg, loc
    if cfg.image_size > node.max_image_size:
        raise refuse(loc, run_id, "'image-size' is above this site's max-image-size")
    for key in P.RUN_PATH_KEYS:
        sent = str(run_config.get(key, "") or "")
        if sent and (str(loc.workspace), run_id, key) not in _LOGGED:
            _LOGGED.add((str(loc.workspace), run_id, key))
            log_policy(loc.workspace, run_id, f"ignored '{key}' from the server; the site's own value is used")
    if run_config.get("dp-delta") and (str(loc.workspace), run_id, "dp-delta") not in _LOGGED:
        _LOGGED.add((str(loc.workspace), run_id, "dp-delta"))
        log_policy(loc.workspace, run_id, "ignored 'dp-delta' from the server; the site uses 1/(10 N)")
    own: dict[str, Any] = {
        "fed-dir": str(loc.site_dir.parent),
        "workspace": str(node.workspace),
        "cache-dir": str(loc.cache_root),
        "crop-source": node.crop_source,
        "dp-delta": 0.0,
    }
    known = set(RunConfig.keys())  # a server-only path key is emptied: the site never reads it
    changes = {k.replace("-", "_"): own.get(k, "") for k in (*P.RUN_PATH_KEYS, "dp-delta") if k in known}
    return cfg.replace(**changes), loc


def check_contract(config: Mapping[str, Any], loc: SiteLocation | None = None, run_id: int = 0) -> None:
    """A query names the contract version the server speaks; another version than the site's is refused.
    A query without it (a server older than the version key) is refused too."""
    sent = config.get(P.CONTRACT_VERSION_KEY)
    if sent is None or str(sent) != str(P.CONTRACT_VERSION):
        spoken = "no message-contract version" if sent is None else f"message contract {sent}"
        reason = f"the server speaks {spoken}, this site {P.CONTRACT_VERSION}; update the older side"
        if loc is not None:
            log_policy(loc.workspace, run_id, f"refused: {reason}")
        raise SiteRefusal(reason)


# ---- which units the site trained in ------------------------------------------------------------
@contextmanager
def _units(loc: SiteLocation):
    path = loc.workspace / UNITS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        roles = json.loads(path.read_text()) if path.is_file() else {}
        before = dict(roles)
        yield roles
        if roles != before:
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(roles, indent=1, sort_keys=True))
            tmp.replace(path)


def unit_roles(loc: SiteLocation) -> dict[str, str]:
    """unit-id -> trained | held-out, as this site recorded them."""
    with _units(loc) as roles:
        return dict(roles)


def check_units(cfg: RunConfig, loc: SiteLocation, configs: Iterable[Mapping[str, Any]], run_id: int = 0) -> None:
    """Every unit of a train/evaluate message against the site's policy, before any work; then the units'
    roles recorded. Raises :class:`SiteRefusal` with the first rule a unit breaks."""
    node = loc.node
    if node is None:
        return
    configs = list(configs)
    with _units(loc) as roles:
        plan = {}
        for config in configs:
            unit = str(config.get(P.CFG_UNIT, "") or "")
            if not unit:
                raise refuse(loc, run_id, f"'{P.CFG_UNIT}' is missing")
            pool = [s for s in str(config.get(P.CFG_POOL, "") or "").split(",") if s]
            if any(s != loc.site for s in pool):
                raise refuse(loc, run_id, f"'{P.CFG_POOL}': a site trains on its own data only")
            train = bool(int(config.get(P.CFG_TRAIN, 0) or 0))
            wide = {s for s in str(config.get(P.CFG_SPLIT, "") or "").split(",") if s} & WIDE_SPLITS
            role = plan.get(unit, roles.get(unit))
            if train and wide:
                raise refuse(loc, run_id, "a unit that trains here evaluates its val and test splits only")
            if train and role == HELD_OUT:
                raise refuse(loc, run_id, "this unit evaluated all of this site's rows; it cannot train here")
            if wide and role == TRAINED:
                raise refuse(loc, run_id, "this site trained in this unit; it evaluates its val and test splits only")
            # a budget or a noise floor means DP too: training without DP-SGD has no epsilon bound
            needs_dp = {"dp-required": node.dp_required, "dp-min-noise": node.dp_min_noise > 0}
            needs_dp["epsilon-budget"] = node.epsilon_budget > 0
            if train and not cfg.dp and any(needs_dp.values()):
                rule = next(k for k, v in needs_dp.items() if v)
                raise refuse(loc, run_id, f"this site trains only with DP-SGD ({rule}); the run has dp = false")
            if train and 0 < cfg.dp_noise_multiplier < node.dp_min_noise:
                raise refuse(loc, run_id, "'dp-noise-multiplier' is below this site's dp-min-noise")
            if train:
                plan[unit] = TRAINED
            elif wide:
                plan[unit] = HELD_OUT
        roles.update(plan)


# ---- differential privacy ------------------------------------------------------------------------
def privacy_dir(loc: SiteLocation) -> Path:
    """Where the site keeps its accountant files: per data set (manifest hash) at a site daemon."""
    base = loc.workspace / "privacy"
    return base if loc.node is None else base / manifest_hash(loc.site_dir)


def site_dp_settings(loc: SiteLocation, settings, accountant_file: Path, run_id: int = 0):
    """A site daemon's DP settings of one round (``settings`` resolved, mdmt.ml.privacy.DPSettings): its
    noise floor checked, and the epsilon budget left to this unit after every other unit on the same
    data (sequential composition) set as the round's budget."""
    # deferred: torch and opacus (mdmt.ml.privacy); only a DP round needs them
    from mdmt.ml.privacy import composed_epsilon

    node = loc.node
    if node is None:
        return settings
    if node.dp_min_noise > 0 and float(settings.noise_multiplier) < node.dp_min_noise:
        raise refuse(loc, run_id, "the round's noise multiplier is below this site's dp-min-noise")
    if node.epsilon_budget <= 0:
        return settings
    others = [p for p in sorted(accountant_file.parent.glob("*.json")) if p.name != accountant_file.name]
    left = node.epsilon_budget - composed_epsilon(others)
    budget = min(left, settings.epsilon_budget) if settings.epsilon_budget > 0 else left
    return replace(settings, epsilon_budget=max(budget, 1e-12))  # 0 would mean "no budget"


# ---- what an evaluation sends ----------------------------------------------------------------------
def coarsen_histogram(hist: np.ndarray, bins: int = COARSE_BINS) -> np.ndarray:
    """A (2, HIST_BINS) score histogram with each run of HIST_BINS / bins bins merged into its middle
    bin: the same shape (the contract's), ``bins`` distinct scores per class."""
    hist = np.asarray(hist)
    width = HIST_BINS // bins
    out = np.zeros_like(hist)
    sums = hist.reshape(hist.shape[0], bins, width).sum(axis=2)
    out[:, width // 2 :: width] = sums
    return out


def small_split_histogram(loc: SiteLocation, hist: np.ndarray, n_prognosis: int) -> np.ndarray:
    """The histogram a split sends: coarsened at a site daemon when the split has fewer than
    ``min-hist-n`` labelled prognosis rows."""
    if loc.node is None or n_prognosis >= loc.node.min_hist_n:
        return hist
    return coarsen_histogram(hist)


def safe_unit_name(unit_id: str) -> str:
    """A unit-id as one file or folder name (the server chooses unit-ids)."""
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in str(unit_id).replace("/", "__"))
    return name.lstrip(".") or "_"


def coarsening_effect(csv_paths: Iterable[Path], bins: int = COARSE_BINS) -> list[dict[str, Any]]:
    """For each per-sample predictions file a site wrote (``predictions/<unit>/round-*-<split>.csv``):
    the prognosis AUC from its exact scores, from the histogram a split sends, and from that histogram
    coarsened to ``bins`` bins; what coarsening costs a small centre (docs/privacy.md)."""
    # deferred: pandas and scikit-learn (slow to import; only this measurement reads predictions files)
    import pandas as pd
    from sklearn.metrics import roc_auc_score

    # deferred: with the two above, for this measurement only
    from mdmt.ml.metrics import auc_from_hist, score_histogram

    rows = []
    for path in csv_paths:
        df = pd.read_csv(path)
        df = df[df["y_prog"] >= 0]
        y, p = df["y_prog"].to_numpy(), df["p_severe"].to_numpy()
        if len(set(y)) < 2:
            continue
        hist = score_histogram(y, p)
        rows.append(
            {
                "file": str(path),
                "n": int(len(y)),
                "exact": float(roc_auc_score(y, p)),
                "hist": auc_from_hist(hist),
                "coarse": auc_from_hist(coarsen_histogram(hist, bins)),
            }
        )
    return rows
