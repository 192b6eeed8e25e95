"""One round trip of several units in lockstep (server/app.py FlowerRounds over a grid that answers in this
process): a site daemon gets one message holding all its units, a simulated site one message per unit, and
each reply counts only for the message it answers and only from the node that message went to."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

from mdmt.fed import protocol as P
from mdmt.fed.plan import SiteInfo
from mdmt.fed.steps import SiteTask, UnitStep, site_messages
from mdmt.server.app import FlowerRounds
from mdmt.store import UnitKey

NODE = {"BIG": 11, "SMALL": 12, "DAEMON": 13}


def _steps(n: int) -> list[UnitStep]:
    tasks = {s: SiteTask(train=True, splits=("val",)) for s in NODE}
    return [
        UnitStep(UnitKey("mdmt", "resnet18", "loco", str(i), 0), None, {"w": np.full(3, i, np.float32)}, {}, tasks)
        for i in range(n)
    ]


class AnsweringGrid:
    """Answers every message as a site would: per unit it carries, the unit's weight back as metrics.
    ``forge`` adds a reply to SMALL's first message that claims to come from DAEMON's node."""

    def __init__(self, forge: bool = False):
        self.sent: list[Message] = []
        self.forge = forge

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for k, msg in enumerate(messages):
            msg.metadata.__dict__["_message_id"] = f"m{k}"
            self.sent.append(msg)
            content = RecordDict()
            for j in P.unit_indices(msg.content.config_records):
                w = msg.content[P.record_name(P.ARRAYS, j)]["w"].numpy()
                content[P.record_name(P.METRICS, j)] = MetricRecord({"unit": float(w[0])})
                content[P.record_name(P.ARRAYS, j)] = ArrayRecord({"w": Array(w + 1)})
            replies.append(Message(content, reply_to=msg))
        if self.forge:
            first_small = next(m for m in messages if m.metadata.dst_node_id == NODE["SMALL"])
            forged = Message(RecordDict({P.METRICS: MetricRecord({"unit": -1.0})}), reply_to=first_small)
            forged.metadata.__dict__["_src_node_id"] = NODE["DAEMON"]
            replies.append(forged)  # last, where it would overwrite the real one if it counted
        return replies

    def get_node_ids(self):
        return list(NODE.values())


def _rounds(grid) -> FlowerRounds:
    sites = {s: SiteInfo(s, "prognosis", {}, "h", simulated=s != "DAEMON") for s in NODE}
    return FlowerRounds(grid, dict(NODE), 60.0, None, sites)


def test_simulated_sites_get_one_message_per_unit_and_a_daemon_one_for_all(task_identity):
    steps = _steps(3)
    assert site_messages(steps, {"BIG", "SMALL"}) == [
        ("BIG", [(0, steps[0].tasks["BIG"])]),
        ("BIG", [(1, steps[1].tasks["BIG"])]),
        ("BIG", [(2, steps[2].tasks["BIG"])]),
        ("DAEMON", [(i, steps[i].tasks["DAEMON"]) for i in range(3)]),
        ("SMALL", [(0, steps[0].tasks["SMALL"])]),
        ("SMALL", [(1, steps[1].tasks["SMALL"])]),
        ("SMALL", [(2, steps[2].tasks["SMALL"])]),
    ]
    grid = AnsweringGrid()
    replies = _rounds(grid)._send(steps)
    per_node = {n: sum(m.metadata.dst_node_id == n for m in grid.sent) for n in NODE.values()}
    assert per_node == {11: 3, 12: 3, 13: 1}
    # every (site, unit) got its own unit's answer back, whichever message carried it
    assert sorted(replies) == sorted((s, i) for s in NODE for i in range(3))
    for (site, i), rep in replies.items():
        assert rep.status == "ok" and rep.metrics == {"unit": float(i)}, (site, i, rep)
        np.testing.assert_array_equal(rep.update["w"], np.full(3, i + 1, np.float32))


def test_a_reply_from_another_node_does_not_count(task_identity):
    replies = _rounds(AnsweringGrid(forge=True))._send(_steps(2))
    assert replies[("SMALL", 0)].metrics == {"unit": 0.0}  # the forged reply (unit -1) was ignored
    assert all(r.status == "ok" for r in replies.values())
