"""The Flower side of a round's records: arrays to and from ArrayRecords, and the replies sorted by site
(or by the message they answer) with a status for every one addressed (the decisions themselves live in
mdmt.fed)."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, Message

from mdmt.fed.packing import PACKED, is_packed, pack_arrays, unpack_arrays


def to_record(arrays: dict[str, np.ndarray], packed: bool = False) -> ArrayRecord:
    """One Flower Array per tensor, or (``packed``) one for all of them (mdmt.fed.packing)."""
    if packed:
        return ArrayRecord({PACKED: Array(pack_arrays(arrays))})
    return ArrayRecord({k: Array(np.asarray(v, order="C")) for k, v in arrays.items()})  # a 0-d buffer stays 0-d


def from_record(rec: ArrayRecord, source: str = "the reply") -> dict[str, np.ndarray]:
    """The arrays of a record in either layout; a packed one is checked (ProtocolError)."""
    if is_packed(rec.keys()):
        return unpack_arrays(rec[PACKED].numpy(), source)
    return {k: v.numpy() for k, v in rec.items()}


def error_text(msg: Message) -> str:
    """The status of an error reply: its reason's last line, or its code."""
    return f"error: {msg.error.reason.strip().splitlines()[-1][:300] if msg.error.reason else msg.error.code}"


def _sort_replies(replies: Iterable[Message], key) -> tuple[dict, dict]:
    """Valid replies and statuses (ok or error: ...) under ``key(reply)``; a reply keyed None is dropped."""
    good, status = {}, {}
    for msg in replies:
        k = key(msg)
        if k is None:
            continue
        if msg.has_error():
            status[k] = error_text(msg)
        else:
            good[k], status[k] = msg, "ok"
    return good, status


def collect(
    replies: Iterable[Message], site_of: dict[int, str], expected: Iterable[str]
) -> tuple[dict[str, Message], dict[str, str]]:
    """Valid replies by site, and a status for every expected site: ok, error: ..., or no reply."""
    good, got = _sort_replies(replies, lambda m: site_of.get(m.metadata.src_node_id, f"node-{m.metadata.src_node_id}"))
    return good, {s: "no reply" for s in expected} | got


def collect_by_message(replies: Iterable[Message], sent: list[Message]) -> tuple[dict[int, Message], dict[int, str]]:
    """Valid replies by the index of the sent message they answer, and a status for every sent message:
    ok, error: ..., or no reply. A reply is matched by the id of the message it answers and counts only
    when it comes from the node that message went to."""
    index = {msg.metadata.message_id: i for i, msg in enumerate(sent)}

    def answered(msg: Message) -> int | None:
        i = index.get(msg.metadata.reply_to_message_id)
        return i if i is not None and msg.metadata.src_node_id == sent[i].metadata.dst_node_id else None

    good, got = _sort_replies(replies, answered)
    return good, {i: "no reply" for i in range(len(sent))} | got
