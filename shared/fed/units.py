"""Server-side logic of a federated unit, with no Flower types: plan who trains and who is
evaluated, aggregate, select the best round, stop early, checkpoint and log every metric.

server/app.py supplies a ``Rounds`` object that moves arrays to and from the sites through Flower.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from mdmt.errors import ConfigError
from mdmt.fed import protocol as P
from mdmt.fed.aggregate import SiteUpdate, task_aware_fedavg
from mdmt.fed.checkpoint import arrays_digest, load_checkpoint, save_checkpoint
from mdmt.fed.config import RunConfig
from mdmt.ml.methods import PROGNOSIS, SEVERITY, TASKS, Method, get_method, local_site, role_tasks
from mdmt.ml.metrics import HIST_BINS, auc_from_hist, binary_metrics, cm_at_bin, multiclass_metrics, threshold_bin
from mdmt.ml.model import build_model
from mdmt.ml.naming import is_bn_stat
from mdmt.ml.train import TrainResult
from mdmt.seeding import derive_seed
from mdmt.store import RunStore, UnitKey

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


class ServerLR:
    """The learning rate the server sends each round: torch's ReduceLROnPlateau on the training sites'
    monitored validation loss (a round counts as an epoch); lr-patience 0 keeps it constant."""

    def __init__(self, cfg: RunConfig):

        self._param = torch.nn.Parameter(torch.zeros(1))
        self._opt = torch.optim.SGD([self._param], lr=cfg.lr)
        self._sched = (
            torch.optim.lr_scheduler.ReduceLROnPlateau(
                self._opt, mode="min", factor=cfg.lr_factor, patience=cfg.lr_patience, min_lr=cfg.min_lr
            )
            if cfg.lr_patience > 0
            else None
        )

    @property
    def lr(self) -> float:
        return float(self._opt.param_groups[0]["lr"])

    def step(self, val_loss: float) -> None:
        if self._sched is not None and not math.isnan(val_loss):
            self._sched.step(val_loss)

    def state(self) -> dict[str, Any]:
        return {"lr": self.lr, "scheduler": self._sched.state_dict() if self._sched is not None else None}

    def restore(self, state: dict[str, Any]) -> None:
        self._opt.param_groups[0]["lr"] = float(state["lr"])
        if self._sched is not None and state.get("scheduler") is not None:
            self._sched.load_state_dict(state["scheduler"])


@dataclass
class TrainRound:
    """What one training round trip brought back."""

    arrays: dict[str, np.ndarray]  # the task-aware average (see aggregate_replies)
    trained: dict[str, TrainResult]  # what each site that answered reported
    status: dict[str, str]  # every addressed site: ok, error: ..., no reply
    bytes: dict[str, tuple[int, int]] = field(default_factory=dict)  # site -> (bytes sent to it, bytes back)
    totals: dict[str, int] = field(default_factory=dict)  # secure aggregation: the summed counts (no per-site ones)


class Rounds(Protocol):
    """Moves arrays to the sites and back; implemented with Flower in server/."""

    def train(self, rnd: int, arrays: dict[str, np.ndarray], plan: UnitPlan, config: dict[str, Any]) -> TrainRound:
        """Send a train message to each of ``plan.train_messages`` and aggregate the replies."""

    def evaluate(
        self, rnd: int, arrays: dict[str, np.ndarray], plan: UnitPlan, config: dict[str, Any]
    ) -> tuple[dict[str, dict[str, P.SiteEval]], dict[str, str]]:
        """Send an evaluate message to each of ``plan.eval_splits``; returns site -> split -> statistics,
        and each site's status."""


@dataclass
class Selection:
    """Best round by the monitored task's validation loss over the training sites; early stopping in rounds."""

    patience: int = 0
    select_after: int = 0
    best_round: int | None = None
    best_loss: float = math.inf
    since_best: int = 0

    def update(self, rnd: int, loss: float) -> bool:
        """Record a round's loss; True when it becomes the selected round.

        Rounds up to ``select_after`` are only a fallback (kept in case the run ends that early); the
        first round after them replaces the fallback whatever its loss.
        """
        eligible = rnd > self.select_after
        fallback = self.best_round is None or self.best_round <= self.select_after
        better = not math.isnan(loss) and (self.best_round is None or loss < self.best_loss)
        if not math.isnan(loss) and ((eligible and fallback) or better):
            self.best_round, self.best_loss, self.since_best = rnd, loss, 0
            return True
        self.since_best += 1
        return False

    def should_stop(self, rnd: int) -> bool:
        return self.patience > 0 and rnd > self.select_after and self.since_best >= self.patience

    def state(self) -> dict[str, Any]:
        return {"best_round": self.best_round, "best_loss": self.best_loss, "since_best": self.since_best}

    def restore(self, state: dict[str, Any]) -> None:
        self.best_round, self.best_loss, self.since_best = state["best_round"], state["best_loss"], state["since_best"]


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
    method = get_method(key.method)
    if not method.init_from:
        return initial_arrays(cfg, key.backbone), "init"
    first = get_method(method.init_from)
    src = UnitKey(
        first.name, key.backbone, key.protocol, key.fold if (key.protocol == "cv" or first.loco) else "-", key.seed
    )
    path = cfg.workspace_path / "checkpoints" / src.slug / "best.pt"
    if store.unit_status(src) != "done" or not path.is_file():
        raise ConfigError(
            f"unit {key.unit_id} starts from {src.unit_id}, which has not finished "
            f"(status {store.unit_status(src)}, checkpoint {path})"
        )
    state = load_checkpoint(path)["state_dict"]
    return {k: v.numpy().copy() for k, v in state.items()}, src.unit_id


def aggregate_replies(
    previous: dict[str, np.ndarray],
    replies: dict[str, tuple[dict[str, np.ndarray], TrainResult]],
    aggregation: str = "fedavg",
) -> dict[str, np.ndarray]:
    """Task-aware FedAvg of the sites' returned arrays, weighted by their reported counts; under fedbn the
    BatchNorm statistics are not averaged (each site keeps its own)."""
    updates = [SiteUpdate(s, arr, t.n_examples, t.n_task) for s, (arr, t) in sorted(replies.items())]
    return task_aware_fedavg(previous, updates, keep=is_bn_stat if aggregation == "fedbn" else None)


Evals = dict[str, dict[str, P.SiteEval]]  # site -> split -> statistics


def _train_val(plan: UnitPlan, evals: Evals) -> list[P.SiteEval]:
    return [evals[s]["val"] for s in plan.train_sites if "val" in evals.get(s, {})]


def monitored_val_loss(plan: UnitPlan, evals: Evals) -> float:
    """The monitored task's validation loss over the training sites: what selects rounds, reduces the lr
    and stops early. Held-out and test rows never enter it."""
    task = plan.method.monitor
    vals = _train_val(plan, evals)
    n = sum(e.n[task] for e in vals)
    return sum(e.loss_sum[task] for e in vals) / n if n else float("nan")


def validation_hist(plan: UnitPlan, evals: Evals) -> np.ndarray | None:
    """The training sites' validation histograms of P(SEVERE), pooled."""
    hists = [e.prog_hist for e in _train_val(plan, evals)]
    return sum(hists) if hists else None


def eval_rows(plan: UnitPlan, evals: Evals, threshold: str = "val") -> tuple[list, list]:
    """(metrics rows, eval_stats rows) for the store. Prognosis confusion metrics use the round's decision
    threshold (see mdmt.ml.metrics.threshold_bin), logged as a metric of site '*'."""
    metrics, stats = [], []
    k = threshold_bin(threshold, validation_hist(plan, evals))
    metrics.append(("*", PROGNOSIS, "val", "threshold", k / HIST_BINS))
    for site, split, ev in ((s, sp, e) for s, per in sorted(evals.items()) for sp, e in sorted(per.items())):
        if ev.n[PROGNOSIS]:
            m = binary_metrics(cm_at_bin(ev.prog_hist, k))
            m["auc"] = auc_from_hist(ev.prog_hist)
            m["loss"] = ev.mean_loss(PROGNOSIS)
            metrics += [(site, PROGNOSIS, split, name, v) for name, v in m.items()]
            stats.append(
                {
                    "site": site,
                    "task": PROGNOSIS,
                    "split": split,
                    "n": ev.n[PROGNOSIS],
                    "loss_sum": ev.loss_sum[PROGNOSIS],
                    "cm": ev.prog_cm.tolist(),
                    "hist": ev.prog_hist.tolist(),
                }
            )
        if ev.n[SEVERITY]:
            m = multiclass_metrics(ev.sev_cm)
            m["loss"] = ev.mean_loss(SEVERITY)
            metrics += [(site, SEVERITY, split, name, v) for name, v in m.items()]
            stats.append(
                {
                    "site": site,
                    "task": SEVERITY,
                    "split": split,
                    "n": ev.n[SEVERITY],
                    "loss_sum": ev.loss_sum[SEVERITY],
                    "cm": ev.sev_cm.tolist(),
                    "hist": None,
                }
            )
    return metrics, stats


def round_config(cfg: RunConfig, key: UnitKey, rnd: int, lr: float) -> dict[str, Any]:
    """What every site receives with a round's messages."""
    return {
        P.CFG_ROUND: rnd,
        P.CFG_UNIT: key.unit_id,
        P.CFG_METHOD: key.method,
        P.CFG_BACKBONE: key.backbone,
        P.CFG_PROTOCOL: key.protocol,
        P.CFG_FOLD: key.fold,
        P.CFG_LR: lr,
        P.CFG_AGGREGATION: cfg.aggregation,
        P.CFG_PROX_MU: cfg.proximal_mu if cfg.aggregation == "fedprox" else 0.0,
        # SecAgg+ masks the weights themselves, in its own fixed-point encoding
        P.CFG_COMPRESSION: "none" if cfg.secure_aggregation else cfg.update_compression,
    }


def train_rows(tr: TrainRound) -> list[tuple[str, str, str, str, float]]:
    rows = []
    for s, t in tr.trained.items():
        rows += [(s, "all", "train", "loss", t.loss), (s, "all", "train", "seconds", t.seconds)]
        if not tr.totals:  # under secure aggregation the server knows only the summed counts
            rows += [(s, PROGNOSIS, "train", "n", t.n_task[PROGNOSIS]), (s, SEVERITY, "train", "n", t.n_task[SEVERITY])]
        rows += [(s, task, "train", "loss", t.loss_task[task]) for task in TASKS if t.n_task[task]]
        if not math.isnan(t.epsilon):
            rows.append((s, "all", "train", "epsilon", t.epsilon))
    rows += [
        (s, "all", "train", name, v)
        for s, (down, up) in tr.bytes.items()
        for name, v in (("bytes_down", down), ("bytes_up", up))
    ]
    names = {P.NUM_EXAMPLES: ("all", "n"), "n-prognosis": (PROGNOSIS, "n"), "n-severity": (SEVERITY, "n")}
    rows += [("*", names[k][0], "train", names[k][1], v) for k, v in tr.totals.items() if k in names]
    return rows


def run_unit(
    cfg: RunConfig, plan: UnitPlan, sites: dict[str, SiteInfo], rounds: Rounds, store: RunStore, flwr_run_id: str = ""
) -> int | None:
    """Run one unit to completion; returns the selected round."""
    key = plan.key
    hashes = {s: sites[s].manifest_hash for s in plan.train_sites}
    ckpt_dir = cfg.workspace_path / "checkpoints" / key.slug
    sel = Selection(cfg.patience, cfg.select_after)
    lr = ServerLR(cfg)
    n_rounds = unit_rounds(cfg, key)
    resumed = resume_state(cfg, key, store, ckpt_dir / "latest.pt")
    if resumed is not None:
        arrays, conf, done = resumed["arrays"], resumed["config"], resumed["round"]
        sel.restore(resumed["selection"])
        lr.restore(resumed["lr"])
        for s in resumed["refused"]:
            plan.train_messages.pop(s, None)
        detail = f"from {ckpt_dir / 'latest.pt'} (round {done}, arrays sha256 {arrays_digest(arrays)})"
        store.resume_unit(key, done, detail)
        log.info("unit %s: resumed after round %d %s", key.unit_id, done, detail)
    else:
        arrays, start = starting_arrays(cfg, key, store)
        conf = cfg.to_mapping() | {
            "method": key.method,
            "backbone": key.backbone,
            "fold": key.fold,
            "num-rounds": n_rounds,
            "starts-from": start,
        }
        store.start_unit(
            key, plan.train_sites, {s: ",".join(sp) for s, sp in plan.eval_splits.items()}, conf, hashes, flwr_run_id
        )
        done = 0
    refused: list[str] = list(resumed["refused"]) if resumed is not None else []
    absent: set[str] = set()  # training sites that missed the last round they were asked to train
    log.info(
        "unit %s: train on %s, evaluate %s",
        key.unit_id,
        ",".join(plan.train_sites),
        ",".join(f"{s}:{'+'.join(sp)}" for s, sp in plan.eval_splits.items()),
    )
    for rnd in range(done + 1, n_rounds + 1):
        message_config = round_config(cfg, key, rnd, lr.lr)
        started = time.perf_counter()
        tr = rounds.train(rnd, arrays, plan, message_config)
        train_wall = time.perf_counter() - started
        arrays, trained, train_status = tr.arrays, tr.trained, tr.status
        missing = {s: st for s, st in train_status.items() if s not in trained}
        if len(trained) < max(1, min(cfg.min_sites, len(plan.train_messages))):
            msg = (
                f"round {rnd}: only {len(trained)} of {len(plan.train_messages)} sites trained (min-sites "
                f"{cfg.min_sites}); missing: {', '.join(f'{s} ({st})' for s, st in missing.items())}"
            )
            store.finish_unit(key, "failed", sel.best_round, msg)
            raise RuntimeError(msg)
        _note_absences(store, key, rnd, missing, trained, absent)
        for s, t in trained.items():
            if t.dp_refused:  # its privacy budget is spent: evaluate-only from now on
                plan.train_messages.pop(s, None)
                refused.append(s)
                train_status[s] = f"refused: privacy budget (epsilon {t.epsilon:.3f} of {cfg.dp_epsilon_budget})"
                log.info("unit %s round %d: site %s stops training: %s", key.unit_id, rnd, s, train_status[s])
        evals, eval_status = rounds.evaluate(rnd, arrays, plan, message_config)
        metrics, stats = eval_rows(plan, evals, cfg.threshold)
        metrics += train_rows(tr)
        val_loss = monitored_val_loss(plan, evals)
        metrics += [("*", plan.method.monitor, "val", "monitored_loss", val_loss), ("*", "all", "train", "lr", lr.lr)]
        # the server's view of the round: wall time of the training round trip and of the whole round
        metrics += [
            ("*", "all", "round", "train_seconds", train_wall),
            ("*", "all", "round", "seconds", time.perf_counter() - started),
        ]
        improved = sel.update(rnd, val_loss)
        lr.step(val_loss)
        participation = [(s, "train", st, "") for s, st in train_status.items()]
        participation += [(s, "evaluate", st, ",".join(plan.eval_splits.get(s, ()))) for s, st in eval_status.items()]
        store.log_round(key, rnd, metrics, stats, participation)
        meta = dict(round=rnd, unit_id=key.unit_id, config=conf, manifest_hashes=hashes)
        if improved:
            save_checkpoint(ckpt_dir / "best.pt", arrays, **meta, extra={"threshold": _threshold_value(metrics)})
        # latest.pt last: it is what a resumed run continues from (server state included).
        save_checkpoint(
            ckpt_dir / "latest.pt",
            arrays,
            **meta,
            extra={"selection": sel.state(), "lr": lr.state(), "refused": list(refused)},
        )
        log.info(
            "unit %s round %d: monitored val loss %.4f%s", key.unit_id, rnd, val_loss, " (best)" if improved else ""
        )
        if sel.should_stop(rnd):
            log.info("unit %s: early stop after round %d (best %s)", key.unit_id, rnd, sel.best_round)
            break
        if not plan.train_messages:
            log.info("unit %s: every training site has spent its privacy budget; stop after round %d", key.unit_id, rnd)
            break
    store.finish_unit(key, "done", sel.best_round)
    return sel.best_round


def _note_absences(
    store: RunStore, key: UnitKey, rnd: int, missing: dict[str, str], trained: dict[str, TrainResult], absent: set[str]
) -> None:
    """k-of-n rounds: a round goes on without the sites that did not answer in time; log who left and who
    came back (the participation rows hold every round's status as well)."""
    for s, st in sorted(missing.items()):
        log.warning(
            "unit %s round %d: site %s missing (%s); the round goes on with %d site(s)",
            key.unit_id,
            rnd,
            s,
            st,
            len(trained),
        )
        if s not in absent:
            store.log_event(key, rnd, "missing", f"{s}: {st}")
        absent.add(s)
    for s in sorted(absent & set(trained)):
        log.info("unit %s round %d: site %s rejoined", key.unit_id, rnd, s)
        store.log_event(key, rnd, "rejoined", s)
        absent.discard(s)


def resume_state(cfg: RunConfig, key: UnitKey, store: RunStore, latest: Path) -> dict[str, Any] | None:
    """What an interrupted unit continues from: its last complete round's checkpoint (global arrays,
    selection, early-stopping and learning-rate state, sites out of privacy budget), when the store
    still marks the unit running, the checkpoint is that unit's, and the store logged exactly that round.
    None = start from round 1."""
    if store.unit_status(key) != "running" or not latest.is_file():
        return None
    ck = load_checkpoint(latest)
    row = next((u for u in store.units() if u["unit_id"] == key.unit_id), None)
    if (
        ck.get("unit_id") != key.unit_id
        or "selection" not in ck
        or row is None
        or int(row["rounds_done"]) < int(ck["round"])
    ):
        return None
    expected = cfg.to_mapping() | {"method": key.method, "backbone": key.backbone, "num-rounds": unit_rounds(cfg, key)}
    if {k: ck["config"].get(k) for k in expected} != expected:
        log.info("unit %s: config changed since the interrupted run; starting again", key.unit_id)
        return None
    return {
        "arrays": {k: v.numpy().copy() for k, v in ck["state_dict"].items()},
        "config": ck["config"],
        "round": int(ck["round"]),
        "selection": ck["selection"],
        "lr": ck["lr"],
        "refused": ck.get("refused", []),
    }


def _threshold_value(metrics: list[tuple[str, str, str, str, float]]) -> float:
    return next(float(v) for s, _, _, name, v in metrics if s == "*" and name == "threshold")
