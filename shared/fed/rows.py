"""What a round writes to the run store: the evaluation rows (metrics and sufficient statistics, with the
round's decision threshold), the training rows, and the monitored validation loss that selects rounds."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from mdmt.fed import protocol as P
from mdmt.fed.config import RunConfig
from mdmt.fed.plan import UnitPlan
from mdmt.fed.steps import Evals, StepResult
from mdmt.ml.methods import PROGNOSIS, SEVERITY, TASKS
from mdmt.ml.metrics import auc_from_hist, binary_metrics, cm_at_bin, edge_p, multiclass_metrics, threshold_bin
from mdmt.store import UnitKey


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


def eval_rows(plan: UnitPlan, evals: Evals, threshold: str = "val", k: int | None = None) -> tuple[list, list]:
    """(metrics rows, eval_stats rows) for the store. Prognosis confusion metrics use the round's decision
    threshold (see mdmt.ml.metrics.threshold_bin): decided here from this round's validation and logged as a
    metric of site '*', or given as the histogram bin ``k`` decided when the round's validation came in."""
    metrics, stats = [], []
    if k is None:
        k = threshold_bin(threshold, validation_hist(plan, evals))
        metrics.append(("*", PROGNOSIS, "val", "threshold", edge_p(k)))
    for site, split, ev in ((s, sp, e) for s, per in sorted(evals.items()) for sp, e in sorted(per.items())):
        if ev.n[PROGNOSIS]:
            m = binary_metrics(cm_at_bin(ev.prog_hist, k))
            m["auc"] = split_auc(ev)
            m["loss"] = ev.mean_loss(PROGNOSIS)
            metrics += [(site, PROGNOSIS, split, name, v) for name, v in m.items()]
            stats.append(_stat(site, PROGNOSIS, split, ev, ev.prog_cm, ev.prog_hist))
        if ev.n[SEVERITY]:
            m = multiclass_metrics(ev.sev_cm)
            m["loss"] = ev.mean_loss(SEVERITY)
            metrics += [(site, SEVERITY, split, name, v) for name, v in m.items()]
            stats.append(_stat(site, SEVERITY, split, ev, ev.sev_cm))
    return metrics, stats


def split_auc(ev: P.SiteEval) -> float:
    """The AUC of one site's split: the exact value the site sent, or (a reply without it) its histogram's."""
    return auc_from_hist(ev.prog_hist) if ev.prog_auc is None else ev.prog_auc


def _stat(site: str, task: str, split: str, ev, cm: np.ndarray, hist: np.ndarray | None = None) -> dict:
    """One eval_stats row: the sufficient statistics a site sent for one task and split (a score histogram
    for prognosis only)."""
    return {
        "site": site,
        "task": task,
        "split": split,
        "n": ev.n[task],
        "loss_sum": ev.loss_sum[task],
        "cm": cm.tolist(),
        "hist": None if hist is None else hist.tolist(),
    }


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


def train_rows(tr: StepResult) -> list[tuple[str, str, str, str, float]]:
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
