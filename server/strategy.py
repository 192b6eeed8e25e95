"""Task-aware FedAvg as a Flower strategy: node selection by the unit's plan, heads averaged only over
the sites that trained them. The decisions themselves live in mdmt.fed.units."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from mdmt.errors import ProtocolError
from mdmt.fed import protocol as P
from mdmt.fed.compress import decode_update
from mdmt.fed.plan import UnitPlan
from mdmt.fed.units import aggregate_replies
from mdmt.ml.outcomes import TrainResult


def to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def from_record(rec: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in rec.items()}


class TaskAwareFedAvg(FedAvg):
    """FedAvg whose train/evaluate messages go to the sites a unit's plan names, per-site config included."""

    def __init__(
        self,
        plan: UnitPlan,
        node_of: dict[str, int],
        previous: dict[str, np.ndarray],
        aggregation: str = "fedavg",
        compression: str = "none",
    ):
        super().__init__(arrayrecord_key=P.ARRAYS, configrecord_key=P.CONFIG, weighted_by_key=P.NUM_EXAMPLES)
        self.plan, self.node_of = plan, node_of
        self.site_of = {n: s for s, n in node_of.items()}
        self.previous, self.aggregation, self.compression = previous, aggregation, compression
        self.train_status: dict[str, str] = {}
        self.trained: dict[str, TrainResult] = {}
        self.bytes_up: dict[str, int] = {}

    def _messages(
        self, arrays: ArrayRecord, config: ConfigRecord, per_site: dict[str, dict[str, Any]], kind: str
    ) -> list[Message]:
        return [
            Message(
                RecordDict({P.ARRAYS: arrays, P.CONFIG: ConfigRecord(dict(config) | extra)}),
                dst_node_id=self.node_of[site],
                message_type=kind,
            )
            for site, extra in per_site.items()
        ]

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self._messages(arrays, config, self.plan.train_messages, MessageType.TRAIN)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        splits = {s: {P.CFG_SPLIT: ",".join(sp)} for s, sp in self.plan.eval_splits.items()}
        return self._messages(arrays, config, splits, MessageType.EVALUATE)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies_by_site, self.train_status = collect(replies, self.site_of, self.plan.train_messages)
        got = {}
        for s, m in replies_by_site.items():
            try:
                got[s] = (
                    decode_update(from_record(m.content[P.ARRAYS]), self.previous, self.compression),
                    P.read_train(dict(m.content[P.METRICS])),
                )
            except ProtocolError as exc:  # a malformed update counts as that site missing the round
                self.train_status[s] = f"error: {exc}"
        self.bytes_up = {s: int(m.content[P.ARRAYS].count_bytes()) for s, m in replies_by_site.items()}
        self.trained = {s: t for s, (_, t) in got.items()}
        if not got:
            return None, None
        self.previous = aggregate_replies(self.previous, got, self.aggregation)
        return to_record(self.previous), MetricRecord(
            {P.NUM_EXAMPLES: sum(t.n_examples for t in self.trained.values())}
        )

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        replies_by_site, self.eval_status = collect(replies, self.site_of, self.plan.eval_splits)
        self.evals = {
            s: P.read_split_evals(dict(m.content[P.METRICS]), list(self.plan.eval_splits[s]))
            for s, m in replies_by_site.items()
        }
        return MetricRecord(
            {P.NUM_EXAMPLES: sum(sum(e.n.values()) for per in self.evals.values() for e in per.values())}
        )


def collect(
    replies: Iterable[Message], site_of: dict[int, str], expected: Iterable[str]
) -> tuple[dict[str, Message], dict[str, str]]:
    """Valid replies by site, and a status for every expected site: ok, error: ..., or no reply."""
    good: dict[str, Message] = {}
    status = {s: "no reply" for s in expected}
    for msg in replies:
        site = site_of.get(msg.metadata.src_node_id, f"node-{msg.metadata.src_node_id}")
        if msg.has_error():
            status[site] = (
                f"error: {msg.error.reason.strip().splitlines()[-1][:300] if msg.error.reason else msg.error.code}"
            )
        else:
            good[site] = msg
            status[site] = "ok"
    return good, status
