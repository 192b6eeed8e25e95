"""The Flower side of a round's records: arrays to and from ArrayRecords, and the replies sorted by site
(or by the message they answer) with a status for every one addressed (the decisions themselves live in
mdmt.fed)."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, Message


def to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def from_record(rec: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in rec.items()}


def error_text(msg: Message) -> str:
    """The status of an error reply: its reason's last line, or its code."""
    return f"error: {msg.error.reason.strip().splitlines()[-1][:300] if msg.error.reason else msg.error.code}"


def collect(
    replies: Iterable[Message], site_of: dict[int, str], expected: Iterable[str]
) -> tuple[dict[str, Message], dict[str, str]]:
    """Valid replies by site, and a status for every expected site: ok, error: ..., or no reply."""
    good: dict[str, Message] = {}
    status = {s: "no reply" for s in expected}
    for msg in replies:
        site = site_of.get(msg.metadata.src_node_id, f"node-{msg.metadata.src_node_id}")
        if msg.has_error():
            status[site] = error_text(msg)
        else:
            good[site] = msg
            status[site] = "ok"
    return good, status


def collect_by_message(replies: Iterable[Message], sent: list[Message]) -> tuple[dict[int, Message], dict[int, str]]:
    """Valid replies by the index of the sent message they answer, and a status for every sent message:
    ok, error: ..., or no reply. A reply is matched by the id of the message it answers and counts only
    when it comes from the node that message went to."""
    index = {msg.metadata.message_id: i for i, msg in enumerate(sent)}
    good: dict[int, Message] = {}
    status = {i: "no reply" for i in range(len(sent))}
    for msg in replies:
        i = index.get(msg.metadata.reply_to_message_id)
        if i is None or msg.metadata.src_node_id != sent[i].metadata.dst_node_id:
            continue
        if msg.has_error():
            status[i] = error_text(msg)
        else:
            good[i] = msg
            status[i] = "ok"
    return good, status
