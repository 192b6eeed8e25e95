"""The Flower side of a round's records: arrays to and from ArrayRecords, and the replies sorted by site
with a status for every site addressed (the decisions themselves live in mdmt.fed)."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, Message


def to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def from_record(rec: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in rec.items()}


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
