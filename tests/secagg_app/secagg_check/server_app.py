"""ServerApp of the check: secure rounds through mdmt.server.secagg over a grid that records every reply the
ServerApp receives, written to ``out-dir`` for the test to inspect."""

from __future__ import annotations

import json
import pickle
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.serverapp import Grid, ServerApp

from mdmt.fed import protocol as P
from mdmt.server.secagg import secure_train_round
from secagg_check.task import OVER_BOUND, SPEC, resnet18_model, tiny_model

app = ServerApp()


class RecordingGrid:
    """The grid, with a record of every reply: its stage, sender, error, how many arrays its ArrayRecords
    hold, its metrics, the masked vector (collect stage) and, with ``payload``, all its raw bytes."""

    def __init__(self, grid: Grid, payload: bool):
        self._grid, self.payload, self.replies = grid, payload, []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        stage = next(
            (
                m.content.config_records[RECORD_KEY_CONFIGS][Key.STAGE]
                for m in messages
                if RECORD_KEY_CONFIGS in m.content.config_records
            ),
            None,
        )
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        self.replies += [self._describe(r, stage) for r in replies]
        return replies

    def _describe(self, msg: Message, stage: str | None) -> dict[str, Any]:
        d: dict[str, Any] = {
            "stage": stage,
            "src": msg.metadata.src_node_id,
            "error": msg.error.reason if msg.has_error() else None,
        }
        if msg.has_error():
            return d
        content = msg.content
        d["arrays"] = sum(len(rec) for rec in content.array_records.values())
        d["array_records"] = sorted(content.array_records)
        d["config_records"] = {name: sorted(rec) for name, rec in content.config_records.items()}
        d["metrics"] = {name: dict(rec) for name, rec in content.metric_records.items()}
        if "fitres.metrics" in content.config_records:
            d["fitres_metrics"] = dict(content.config_records["fitres.metrics"])
        cfg = content.config_records.get(RECORD_KEY_CONFIGS)
        if stage == Stage.COLLECT_MASKED_VECTORS and cfg is not None:
            parts = [bytes_to_ndarray(b).ravel() for b in cfg[Key.MASKED_PARAMETERS]]
            masked = np.concatenate(parts)
            d["masked"] = masked if self.payload else masked[:20000]
        if self.payload:
            blobs = [a.data for rec in content.array_records.values() for a in rec.values()]
            for rec in content.config_records.values():
                for v in rec.values():
                    items = v if isinstance(v, list) else [v]
                    blobs += [b for b in items if isinstance(b, bytes)]
            d["payload"] = b"".join(blobs)
        return d


def _partitions(grid: Grid, n: int, wait_s: float = 120.0) -> dict[int, int]:
    deadline = time.monotonic() + wait_s
    while len(list(grid.get_node_ids())) < n:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(list(grid.get_node_ids()))} of {n} nodes connected")
        time.sleep(0.5)
    msgs = [
        Message(
            RecordDict({P.CONFIG: ConfigRecord({P.CONTRACT_VERSION_KEY: P.CONTRACT_VERSION})}),
            dst_node_id=node,
            message_type=MessageType.QUERY,
        )
        for node in grid.get_node_ids()
    ]
    return {int(r.content[P.SITE]["partition"]): r.metadata.src_node_id for r in grid.send_and_receive(msgs)}


def _round(
    grid: Grid,
    out: Path,
    rnd: int,
    node_of: dict[int, int],
    parts: list[int],
    reference: dict[str, np.ndarray],
    payload: bool,
) -> dict[str, np.ndarray]:
    rec = RecordingGrid(grid, payload)
    t0 = time.monotonic()
    res = secure_train_round(
        rec,
        [node_of[p] for p in parts],
        reference,
        {P.CFG_ROUND: rnd, P.CFG_AGGREGATION: "fedavg"},
        spec=SPEC,
        timeout=600,
    )
    seconds = time.monotonic() - t0
    part_of = {n: p for p, n in node_of.items()}
    np.savez(out / f"reference{rnd}.npz", **reference)
    np.savez(out / f"secure{rnd}.npz", **res.arrays)
    (out / f"round{rnd}.json").write_text(
        json.dumps(
            {
                "status": {part_of[n]: s for n, s in res.status.items()},
                "counts": res.counts,
                "bound": res.bound,
                "quantization_range": res.quantization_range,
                "included": [part_of[n] for n in res.included],
                "metrics": {part_of[n]: m for n, m in res.metrics.items()},
                "bytes_up": {part_of[n]: b for n, b in res.bytes_up.items()},
                "seconds": seconds,
            }
        )
    )
    for r in rec.replies:
        r["partition"] = part_of.get(r["src"])
    with open(out / f"received{rnd}.pkl", "wb") as fh:
        pickle.dump(rec.replies, fh)
    return res.arrays


@app.main()
def main(grid: Grid, context: Context) -> None:
    out = Path(str(context.run_config["out-dir"]))
    n = int(context.run_config["num-sites"])
    node_of = _partitions(grid, n)
    good = [p for p in sorted(node_of) if p != OVER_BOUND]
    arrays = _round(grid, out, 1, node_of, sorted(node_of), tiny_model(), payload=True)
    _round(grid, out, 2, node_of, good, arrays, payload=True)
    if bool(context.run_config["resnet18"]):
        _round(grid, out, 3, node_of, good, resnet18_model(), payload=False)
