"""Server-side logic of a federated unit, with no Flower types: plan who trains and who is
evaluated, aggregate, select the best round, stop early, checkpoint and log every metric.

server/app.py supplies a ``Rounds`` object that moves arrays to and from the sites through Flower.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from shared import protocol as P
from shared.train import TrainResult
from shared.aggregate import SiteUpdate, task_aware_fedavg
from shared.checkpoint import save_checkpoint
from shared.config import RunConfig
from shared.errors import ConfigError
from shared.methods import PROGNOSIS, SEVERITY, TASKS, Method, get_method, role_tasks
from shared.metrics import HIST_BINS, auc_from_hist, binary_metrics, cm_at_bin, multiclass_metrics, threshold_bin
from shared.model import build_model
from shared.seeding import derive_seed
from shared.store import RunStore, UnitKey

log = logging.getLogger("mdmt")


@dataclass
class SiteInfo:
    site: str
    role: str
    counts: dict[str, int]  # "<split>-<task>" -> labelled images
    manifest_hash: str

    @classmethod
    def from_summary(cls, s: dict[str, Any]) -> "SiteInfo":
        counts = {k: int(v) for k, v in s.items() if k.endswith(("-prognosis", "-severity"))}
        return cls(str(s["site"]), str(s["role"]), counts, str(s["manifest-hash"]))


@dataclass
class UnitPlan:
    key: UnitKey
    method: Method
    holdout: str | None
    train_sites: list[str]  # sites whose data trains the model
    train_messages: dict[str, dict[str, Any]]  # site that receives a train message -> extra config
    eval_splits: dict[str, str]  # site -> split it evaluates


def unit_keys(cfg: RunConfig) -> list[UnitKey]:
    """Every (method, backbone, fold) of a config; a method without LOCO runs once (fold '-')."""
    keys = []
    for backbone in cfg.backbones:
        for m in cfg.methods:
            method = get_method(m)
            folds = cfg.holdout_list if method.loco else ("-",)
            if method.loco and not folds:
                raise ConfigError(f"method '{m}' needs at least one held-out centre in 'holdouts'")
            keys.extend(UnitKey(m, backbone, cfg.protocol, f, cfg.seed) for f in folds)
    return keys


def plan_unit(key: UnitKey, sites: dict[str, SiteInfo]) -> UnitPlan:
    method = get_method(key.method)
    holdout = None if key.fold == "-" else key.fold
    if holdout is not None:
        if holdout not in sites:
            raise ConfigError(f"held-out centre '{holdout}' is not a site of this federation ({', '.join(sorted(sites))})")
        if PROGNOSIS not in role_tasks(sites[holdout].role):
            raise ConfigError(f"held-out centre '{holdout}' has no prognosis labels (role {sites[holdout].role})")
    train_sites = []
    for name in sorted(sites):
        info = sites[name]
        if name == holdout or not method.trains(role_tasks(info.role)):
            continue
        if sum(info.counts.get(f"train-{t}", 0) for t in method.tasks) > 0:
            train_sites.append(name)
    if not train_sites:
        raise ConfigError(f"method '{key.method}' has no site to train on (sites: {', '.join(sorted(sites))})")
    if method.pooled:
        messages = {train_sites[0]: {P.CFG_POOL: ",".join(train_sites)}}
    else:
        messages = {s: {} for s in train_sites}
    evals = {s: "val" for s in train_sites}
    if holdout is not None:
        evals[holdout] = "all"
    return UnitPlan(key, method, holdout, train_sites, messages, evals)


@dataclass
class TrainRound:
    """What one training round trip brought back."""

    arrays: dict[str, np.ndarray]  # the task-aware average (see aggregate_replies)
    trained: dict[str, TrainResult]  # what each site that answered reported
    status: dict[str, str]  # every addressed site: ok, error: ..., no reply
    bytes: dict[str, tuple[int, int]] = field(default_factory=dict)  # site -> (bytes sent to it, bytes back)


class Rounds(Protocol):
    """Moves arrays to the sites and back; implemented with Flower in server/."""

    def train(self, rnd: int, arrays: dict[str, np.ndarray], plan: UnitPlan, config: dict[str, Any]) -> TrainRound:
        """Send a train message to each of ``plan.train_messages`` and aggregate the replies."""

    def evaluate(self, rnd: int, arrays: dict[str, np.ndarray], plan: UnitPlan, config: dict[str, Any]
                 ) -> tuple[dict[str, P.SiteEval], dict[str, str]]:
        """Send an evaluate message to each of ``plan.eval_splits``; returns their statistics and status."""


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


def initial_arrays(cfg: RunConfig, backbone: str) -> dict[str, np.ndarray]:
    """The model every site starts from: seeded from the config, the weights file loaded here only."""
    model = build_model(backbone, weights=cfg.weights, pretrained=cfg.pretrained, seed=derive_seed(cfg.seed, "init", backbone))
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def aggregate_replies(previous: dict[str, np.ndarray], replies: dict[str, tuple[dict[str, np.ndarray], TrainResult]]
                      ) -> dict[str, np.ndarray]:
    """Task-aware FedAvg of the sites' returned arrays, weighted by their reported counts."""
    updates = [SiteUpdate(s, arr, t.n_examples, t.n_task) for s, (arr, t) in sorted(replies.items())]
    return task_aware_fedavg(previous, updates)


def monitored_val_loss(plan: UnitPlan, evals: dict[str, P.SiteEval]) -> float:
    task = plan.method.monitor
    total = sum(evals[s].loss_sum[task] for s in plan.train_sites if s in evals)
    n = sum(evals[s].n[task] for s in plan.train_sites if s in evals)
    return total / n if n else float("nan")


def validation_hist(plan: UnitPlan, evals: dict[str, P.SiteEval]) -> np.ndarray | None:
    """The training sites' validation histograms of P(SEVERE), pooled."""
    hists = [evals[s].prog_hist for s in plan.train_sites if s in evals and plan.eval_splits.get(s) == "val"]
    return sum(hists) if hists else None


def eval_rows(plan: UnitPlan, evals: dict[str, P.SiteEval], threshold: str = "val") -> tuple[list, list]:
    """(metrics rows, eval_stats rows) for the store. Prognosis confusion metrics use the round's decision
    threshold (see shared.metrics.threshold_bin), logged as a metric of site '*'."""
    metrics, stats = [], []
    k = threshold_bin(threshold, validation_hist(plan, evals))
    metrics.append(("*", PROGNOSIS, "val", "threshold", k / HIST_BINS))
    for site, ev in sorted(evals.items()):
        split = plan.eval_splits[site]
        if ev.n[PROGNOSIS]:
            m = binary_metrics(cm_at_bin(ev.prog_hist, k))
            m["auc"] = auc_from_hist(ev.prog_hist)
            m["loss"] = ev.mean_loss(PROGNOSIS)
            metrics += [(site, PROGNOSIS, split, name, v) for name, v in m.items()]
            stats.append({"site": site, "task": PROGNOSIS, "split": split, "n": ev.n[PROGNOSIS],
                          "loss_sum": ev.loss_sum[PROGNOSIS], "cm": ev.prog_cm.tolist(), "hist": ev.prog_hist.tolist()})
        if ev.n[SEVERITY]:
            m = multiclass_metrics(ev.sev_cm)
            m["loss"] = ev.mean_loss(SEVERITY)
            metrics += [(site, SEVERITY, split, name, v) for name, v in m.items()]
            stats.append({"site": site, "task": SEVERITY, "split": split, "n": ev.n[SEVERITY],
                          "loss_sum": ev.loss_sum[SEVERITY], "cm": ev.sev_cm.tolist(), "hist": None})
    return metrics, stats


def run_unit(cfg: RunConfig, plan: UnitPlan, sites: dict[str, SiteInfo], rounds: Rounds, store: RunStore,
             flwr_run_id: str = "") -> int | None:
    """Run one unit to completion; returns the selected round."""
    key = plan.key
    hashes = {s: sites[s].manifest_hash for s in plan.train_sites}
    conf = cfg.to_mapping() | {"method": key.method, "backbone": key.backbone, "fold": key.fold}
    store.start_unit(key, plan.train_sites, plan.eval_splits, conf, hashes, flwr_run_id)
    ckpt_dir = cfg.workspace_path / "checkpoints" / key.slug
    arrays = initial_arrays(cfg, key.backbone)
    sel = Selection(cfg.patience, cfg.select_after)
    log.info("unit %s: train on %s, evaluate %s", key.unit_id, ",".join(plan.train_sites),
             ",".join(f"{s}:{sp}" for s, sp in plan.eval_splits.items()))
    for rnd in range(1, cfg.num_rounds + 1):
        rcfg = {P.CFG_ROUND: rnd, P.CFG_UNIT: key.unit_id, P.CFG_METHOD: key.method, P.CFG_BACKBONE: key.backbone,
                P.CFG_FOLD: key.fold, P.CFG_LR: cfg.lr}
        tr = rounds.train(rnd, arrays, plan, rcfg)
        arrays, trained, train_status = tr.arrays, tr.trained, tr.status
        if len(trained) < max(1, min(cfg.min_sites, len(plan.train_messages))):
            missing = ", ".join(f"{s} ({st})" for s, st in train_status.items() if s not in trained)
            msg = f"round {rnd}: only {len(trained)} of {len(plan.train_messages)} sites trained; missing: {missing}"
            store.finish_unit(key, "failed", sel.best_round, msg)
            raise RuntimeError(msg)
        evals, eval_status = rounds.evaluate(rnd, arrays, plan, rcfg)
        metrics, stats = eval_rows(plan, evals, cfg.threshold)
        for s, t in trained.items():
            metrics += [(s, "all", "train", "loss", t.loss), (s, "all", "train", "seconds", t.seconds),
                        (s, PROGNOSIS, "train", "n", t.n_task[PROGNOSIS]), (s, SEVERITY, "train", "n", t.n_task[SEVERITY])]
            metrics += [(s, task, "train", "loss", t.loss_task[task]) for task in TASKS if t.n_task[task]]
        metrics += [(s, "all", "train", name, v) for s, (down, up) in tr.bytes.items()
                    for name, v in (("bytes_down", down), ("bytes_up", up))]
        val_loss = monitored_val_loss(plan, evals)
        metrics.append(("*", plan.method.monitor, "val", "monitored_loss", val_loss))
        improved = sel.update(rnd, val_loss)
        participation = [(s, "train", st, "") for s, st in train_status.items()]
        participation += [(s, "evaluate", st, plan.eval_splits.get(s, "")) for s, st in eval_status.items()]
        store.log_round(key, rnd, metrics, stats, participation)
        save_checkpoint(ckpt_dir / "latest.pt", arrays, round=rnd, unit_id=key.unit_id, config=conf, manifest_hashes=hashes)
        if improved:
            save_checkpoint(ckpt_dir / "best.pt", arrays, round=rnd, unit_id=key.unit_id, config=conf, manifest_hashes=hashes)
        log.info("unit %s round %d: monitored val loss %.4f%s", key.unit_id, rnd, val_loss, " (best)" if improved else "")
        if sel.should_stop(rnd):
            log.info("unit %s: early stop after round %d (best %s)", key.unit_id, rnd, sel.best_round)
            break
    store.finish_unit(key, "done", sel.best_round)
    return sel.best_round
