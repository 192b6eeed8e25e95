"""One round of several units at once, with no Flower types: what each site is asked to do for each unit
(evaluate the model it receives on some splits, then train from it or not), what comes back, and the
task-aware average of the trained models.

server/app.py implements :class:`Rounds` with Flower: one round trip per round for every unit, its messages
laid out by :func:`site_messages`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from mdmt.fed import protocol as P
from mdmt.fed.aggregate import SiteUpdate, task_aware_fedavg
from mdmt.fed.plan import UnitPlan
from mdmt.fed.validate import Rejected, check_metrics, check_update, count_limits, status_of
from mdmt.ml.naming import is_bn_stat
from mdmt.ml.outcomes import TrainResult
from mdmt.store import UnitKey

log = logging.getLogger("mdmt")


@dataclass(frozen=True)
class SiteTask:
    """What one site does for one unit this round: evaluate the model it receives on ``splits``, then
    train from it when ``train`` (with the per-site ``extra`` config, e.g. the sites a pooled unit pools)."""

    train: bool
    splits: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class UnitStep:
    """One unit's part of a round: the model its sites receive, the round config, each site's task."""

    key: UnitKey
    plan: UnitPlan
    arrays: dict[str, np.ndarray]
    config: dict[str, Any]
    tasks: dict[str, SiteTask]

    @property
    def trains(self) -> bool:
        return any(t.train for t in self.tasks.values())


Evals = dict[str, dict[str, P.SiteEval]]  # site -> split -> statistics


@dataclass
class StepResult:
    """What one unit's part of a round brought back."""

    arrays: dict[str, np.ndarray] | None  # the task-aware average of the trained models; None: none trained
    trained: dict[str, TrainResult]  # what each site that trained reported
    train_status: dict[str, str]  # every site asked to train: ok, error: ..., rejected: ..., no reply
    evals: Evals  # the statistics of the model sent, per site and split
    eval_status: dict[str, str]  # every site asked only to evaluate
    bytes: dict[str, tuple[int, int]] = field(default_factory=dict)  # site -> (bytes sent to it, bytes back)
    totals: dict[str, int] = field(default_factory=dict)  # secure aggregation: the summed counts (no per-site ones)


class Rounds(Protocol):
    """Moves the units' models to the sites and back; implemented with Flower in server/."""

    def step(self, steps: list[UnitStep]) -> list[StepResult]:
        """Run one round of every unit in ``steps`` (one round trip for all of them); the results
        in the same order."""


def aggregate_replies(
    previous: dict[str, np.ndarray],
    replies: dict[str, tuple[dict[str, np.ndarray], TrainResult]],
    aggregation: str = "fedavg",
) -> dict[str, np.ndarray]:
    """Task-aware FedAvg of the sites' returned arrays, weighted by their reported counts; under fedbn the
    BatchNorm statistics are not averaged (each site keeps its own); median and trimmed-mean take the
    robust rule over the same sites (mdmt.fed.aggregate)."""
    updates = [SiteUpdate(s, arr, t.n_examples, t.n_task) for s, (arr, t) in sorted(replies.items())]
    return task_aware_fedavg(previous, updates, keep=is_bn_stat if aggregation == "fedbn" else None, rule=aggregation)


@dataclass
class SiteReply:
    """One unit's part of one site's reply, as plain data: its metrics and, after training, its update
    (still encoded as the round's update compression says)."""

    status: str  # ok | error: ... | rejected: ... | no reply
    metrics: dict[str, Any] = field(default_factory=dict)
    update: dict[str, np.ndarray] | None = None
    bytes_down: int = 0  # the model sent for this unit
    bytes_up: int = 0  # the update it sent back


def site_entries(steps: list[UnitStep]) -> dict[str, list[tuple[int, SiteTask]]]:
    """site -> [(unit index, task)]: what goes into each site's one message of the round, in site name
    order and unit order."""
    out: dict[str, list[tuple[int, SiteTask]]] = {}
    for i, step in enumerate(steps):
        for site, task in sorted(step.tasks.items()):
            out.setdefault(site, []).append((i, task))
    return dict(sorted(out.items()))


def site_messages(steps: list[UnitStep], simulated: set[str]) -> list[tuple[str, list[tuple[int, SiteTask]]]]:
    """The messages of a round trip, as (site, [(unit index, task)]), in site name order.

    A site daemon gets one message holding its part of every unit: a deployed message costs the site a
    process start and the server a poll, whatever it carries. A simulated site gets one message per
    unit: there a message costs little, and Flower's workers serve any node, so a large site's units
    train side by side on workers that the small sites have left idle, instead of one after another.
    """
    out: list[tuple[str, list[tuple[int, SiteTask]]]] = []
    for site, entries in site_entries(steps).items():
        out += [(site, [e]) for e in entries] if site in simulated else [(site, entries)]
    return out


def entry_config(step: UnitStep, task: SiteTask) -> dict[str, Any]:
    """The round config one site receives for one unit: the unit's, its task, and its per-site extras."""
    return dict(step.config) | {P.CFG_TRAIN: int(task.train), P.CFG_SPLIT: ",".join(task.splits)} | task.extra


def read_reply(
    step: UnitStep,
    site: str,
    task: SiteTask,
    r: SiteReply,
    declared: Mapping[str, Mapping[str, int]] | None = None,
    norm_bound: float = 0.0,
) -> tuple[dict[str, P.SiteEval], tuple[dict[str, np.ndarray], TrainResult] | None]:
    """One unit's part of one site's reply, checked (mdmt.fed.validate) before it is read: the statistics of
    each split and, after training, (the site's weights, its report). Raises Rejected."""
    pooled = [p for p in str(task.extra.get(P.CFG_POOL, "")).split(",") if p]
    limits = count_limits(declared, site, pooled, step.key.protocol) if declared is not None else None
    check_metrics(r.metrics, train=task.train, splits=task.splits, limits=limits)
    evals = P.read_split_evals(r.metrics, list(task.splits)) if task.splits else {}
    if not task.train:
        return evals, None
    weights, _ = check_update(r.update, step.arrays, str(step.config.get(P.CFG_COMPRESSION, "none")), norm_bound)
    return evals, (weights, P.read_train(r.metrics))


def assemble(
    steps: list[UnitStep],
    replies: dict[tuple[str, int], SiteReply],
    declared: Mapping[str, Mapping[str, int]] | None = None,
    norm_bound: float = 0.0,
) -> list[StepResult]:
    """Each unit's result from the sites' replies (keyed by (site, unit index)): statuses, evaluation
    statistics, and the task-aware average of the decoded updates. Every reply is checked first against
    the contract, the counts the sites declared (``declared``: site -> {"<split>-<task>": n}) and the
    update-norm bound; a reply that fails, or that cannot be read at all, counts as that site missing
    the round (status ``rejected: <reason>``). Nothing a reply holds raises out of here."""
    out = []
    for i, step in enumerate(steps):
        got: dict[str, tuple[dict[str, np.ndarray], TrainResult]] = {}
        res = StepResult(None, {}, {}, {}, {})
        for site, task in sorted(step.tasks.items()):
            r = replies.get((site, i), SiteReply("no reply"))
            status = res.train_status if task.train else res.eval_status
            if r.status != "ok":
                status[site] = r.status
                continue
            try:
                evals, trained = read_reply(step, site, task, r, declared, norm_bound)
            except Rejected as exc:
                status[site] = status_of(str(exc))
            except Exception as exc:  # anything else a reply could provoke: that reply only, never the run
                status[site] = status_of(f"unreadable ({type(exc).__name__}: {exc})")
            else:
                status[site] = "ok"
                if evals:
                    res.evals[site] = evals
                if trained is not None:
                    got[site] = trained
                    res.bytes[site] = (r.bytes_down, r.bytes_up)
            if status[site] != "ok":
                log.warning("unit %s: the reply of site %s is %s", step.key.unit_id, site, status[site])
        res.trained = {s: t for s, (_, t) in got.items()}
        if got:
            res.arrays = aggregate_replies(step.arrays, got, str(step.config.get(P.CFG_AGGREGATION, "fedavg")))
        out.append(res)
    return out
