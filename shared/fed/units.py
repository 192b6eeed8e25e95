"""Running a federated unit on the server, with no Flower types: round by round, aggregate, evaluate,
select the best round, stop early, checkpoint and log every metric (the plan comes from mdmt.fed.plan,
the decisions over rounds from mdmt.fed.selection).

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

from mdmt.errors import ConfigError
from mdmt.fed import protocol as P
from mdmt.fed.aggregate import SiteUpdate, task_aware_fedavg
from mdmt.fed.checkpoint import arrays_digest, load_checkpoint, save_checkpoint
from mdmt.fed.config import RunConfig
from mdmt.fed.plan import Decision, SiteInfo, UnitPlan, decide_units, plan_unit, unit_keys, unit_rounds
from mdmt.fed.selection import Selection, ServerLR
from mdmt.ml.methods import PROGNOSIS, SEVERITY, TASKS, get_method
from mdmt.ml.metrics import HIST_BINS, auc_from_hist, binary_metrics, cm_at_bin, multiclass_metrics, threshold_bin
from mdmt.ml.model import build_model
from mdmt.ml.naming import is_bn_stat
from mdmt.ml.outcomes import TrainResult
from mdmt.seeding import derive_seed
from mdmt.store import UNKNOWN_FINGERPRINT, RunStore, UnitKey

log = logging.getLogger("mdmt")


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


def run_units(
    cfg: RunConfig, sites: dict[str, SiteInfo], rounds: Rounds, store: RunStore, flwr_run_id: str = ""
) -> list[Decision]:
    """Every unit of the config, decided from the store first (mdmt.fed.plan.decide_units): a refused unit
    stops the run before anything trains; done units are skipped; interrupted ones continue."""
    keys = unit_keys(cfg, {s: i.role for s, i in sites.items()})
    decisions = decide_units(cfg, keys, sites, store)
    refused = [d for d in decisions if d.action == "refuse"]
    if refused:
        more = f" ({len(refused) - 1} more unit(s) likewise)" if len(refused) > 1 else ""
        raise ConfigError(refused[0].reason + more)
    for d in decisions:
        if d.action == "skip":
            log.info("unit %s: already done (fingerprint %s), skipped", d.key.unit_id, d.fingerprint)
            continue
        run_unit(cfg, plan_unit(d.key, sites), sites, rounds, store, flwr_run_id, d.fingerprint, d.recipe)
    return decisions


def run_unit(
    cfg: RunConfig,
    plan: UnitPlan,
    sites: dict[str, SiteInfo],
    rounds: Rounds,
    store: RunStore,
    flwr_run_id: str = "",
    fingerprint: str = UNKNOWN_FINGERPRINT,
    recipe: dict[str, Any] | None = None,
) -> int | None:
    """Run one unit to completion; returns the selected round. A unit stored as running or interrupted
    with the same fingerprint continues after its last complete round. If the run is stopped (SIGINT,
    SIGTERM, an exception), the unit is marked interrupted on the way out."""
    key = plan.key
    try:
        return _run_unit(cfg, plan, sites, rounds, store, flwr_run_id, fingerprint, recipe)
    except BaseException as exc:
        if store.unit_status(key) == "running":
            why = " ".join(str(exc).split())[:200] or exc.__class__.__name__
            store.finish_unit(key, "interrupted", None, f"{exc.__class__.__name__}: {why}")
            log.warning("unit %s: interrupted (%s)", key.unit_id, exc.__class__.__name__)
        raise


def _run_unit(
    cfg: RunConfig,
    plan: UnitPlan,
    sites: dict[str, SiteInfo],
    rounds: Rounds,
    store: RunStore,
    flwr_run_id: str,
    fingerprint: str,
    recipe: dict[str, Any] | None,
) -> int | None:
    key = plan.key
    hashes = {s: sites[s].manifest_hash for s in plan.train_sites}
    ckpt_dir = cfg.workspace_path / "checkpoints" / key.slug
    sel = Selection(cfg.patience, cfg.select_after)
    lr = ServerLR(cfg)
    n_rounds = unit_rounds(cfg, key)
    resumed = resume_state(key, store, ckpt_dir / "latest.pt", fingerprint)
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
            key,
            plan.train_sites,
            {s: ",".join(sp) for s, sp in plan.eval_splits.items()},
            conf,
            hashes,
            flwr_run_id,
            fingerprint,
            recipe,
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


def resume_state(key: UnitKey, store: RunStore, latest: Path, fingerprint: str) -> dict[str, Any] | None:
    """What an interrupted unit continues from: its last complete round's checkpoint (global arrays,
    selection, early-stopping and learning-rate state, sites out of privacy budget), when the store marks
    the unit running or interrupted with this fingerprint, the checkpoint is that unit's, and the store
    logged exactly that round. None = start from round 1."""
    row = store.unit(key)
    if row is None or row["status"] not in ("running", "interrupted") or not latest.is_file():
        return None
    if row["fingerprint"] != fingerprint:
        log.info("unit %s: the interrupted run had another fingerprint; starting again", key.unit_id)
        return None
    ck = load_checkpoint(latest)
    if ck.get("unit_id") != key.unit_id or "selection" not in ck or int(row["rounds_done"]) < int(ck["round"]):
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
