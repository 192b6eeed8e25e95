"""A site's own log of the messages it received, kept in the site's workspace."""

from __future__ import annotations

import csv
import fcntl
import json
import time
from pathlib import Path
from typing import Any

import pandas as pd

from mdmt.fed import protocol as P
from mdmt.ml.metrics import HIST_BINS

MESSAGE_LOG = "messages.csv"
COLUMNS = ("time", "run_id", "message_type", "unit_id", "round", "split")


def append_message_log(site_workspace: Path, *, run_id: int, message_type: str, config: dict[str, Any]) -> None:
    site_workspace.mkdir(parents=True, exist_ok=True)
    path = site_workspace / MESSAGE_LOG
    row = [
        f"{time.time():.3f}",
        run_id,
        message_type,
        config.get(P.CFG_UNIT, ""),
        config.get(P.CFG_ROUND, ""),
        config.get(P.CFG_SPLIT, ""),
    ]
    with open(path, "a", newline="") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        if fh.tell() == 0:
            csv.writer(fh).writerow(COLUMNS)
        csv.writer(fh).writerow(row)


def read_message_log(site_workspace: Path) -> pd.DataFrame:
    path = Path(site_workspace) / MESSAGE_LOG
    if not path.is_file():
        return pd.DataFrame(columns=list(COLUMNS))
    return pd.read_csv(path, dtype=str, keep_default_na=False)


# ---- what a site sends back --------------------------------------------------------------------
REPLY_LOG = "replies.jsonl"


def append_reply_log(
    site_workspace: Path,
    *,
    run_id: int,
    message_type: str,
    unit_id: str,
    description: dict[str, Any],
    error: dict[str, Any] | None = None,
    stage: str = "",
) -> None:
    """One line per reply the site sent, error replies and SecAgg+ stages included: record names, array
    names/shapes/dtypes, metric and config keys with the kind of each value (never array contents); an
    error reply's code and the one line it carried; the SecAgg+ stage the reply answered."""

    site_workspace.mkdir(parents=True, exist_ok=True)
    entry = {
        "time": round(time.time(), 3),
        "run_id": run_id,
        "message_type": message_type,
        "unit_id": unit_id,
        "records": description,
    }
    if error is not None:
        entry["error"] = error
    if stage:
        entry["stage"] = stage
    line = json.dumps(entry, sort_keys=True)
    with open(site_workspace / REPLY_LOG, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        fh.write(line + "\n")


def value_kind(v: Any) -> dict[str, Any]:
    """How a metric or config value is described in the reply log: its type, and its length for lists;
    strings are kept (they are identifiers such as the site name, role or manifest hash)."""
    if isinstance(v, (list, tuple)):
        kinds = sorted({type(x).__name__ for x in v})
        return {"type": "list", "len": len(v), "items": kinds}
    if isinstance(v, str):
        return {"type": "str", "value": v}
    return {"type": type(v).__name__}


def read_reply_log(site_workspace: Path) -> list[dict[str, Any]]:

    path = Path(site_workspace) / REPLY_LOG
    if not path.is_file():
        return []
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip()]


# What a SecAgg+ stage reply may hold (Flower's secaggplus_mod around mdmt.client.secagg.secagg_reply):
# public keys, encrypted shares, the masked vector, node ids; the training report without its counts.
SECAGG_CONFIGS = "secaggplus_configs"
SECAGG_KEYS = frozenset({"pk1", "pk2", "dsts", "ctxts", "masked_params", "nids", "shares"})
SCALE = "::scale"  # mdmt.fed.compress: an int8 update's per-tensor scale


def _shape(shape) -> list[int]:
    """A shape as compared: a 0-d buffer and its one-element form are the same (a model restored from a
    checkpoint may carry num_batches_tracked either way)."""
    return [1] if list(shape) == [] else [int(d) for d in shape]


def _arrays_match(items: dict[str, Any], shapes: dict[str, list[int]]) -> bool:
    """The model's names and shapes exactly, or an int8 update: those plus a one-value scale per tensor."""
    got = {k: _shape(v["shape"]) for k, v in items.items()}
    scales = {k for k in got if k.endswith(SCALE)}
    return {k: v for k, v in got.items() if k not in scales} == {k: _shape(v) for k, v in shapes.items()} and all(
        k[: -len(SCALE)] in shapes and got[k] == [1] for k in scales
    )


def _secagg_problems(rec_name: str, rec: dict[str, Any]) -> list[str] | None:
    """Problems of one record of a SecAgg+ reply (None: not a SecAgg+ record)."""
    kind, items = rec["kind"], rec["items"]
    if rec_name == SECAGG_CONFIGS and kind == "ConfigRecord":
        return [f"{rec_name}.{k}: not a SecAgg+ reply key" for k in items if k not in SECAGG_KEYS]
    if rec_name == "fitres.parameters" and kind == "ArrayRecord":  # emptied by secaggplus_mod
        return [f"{rec_name}: holds arrays after masking"] if items else []
    if rec_name == "fitres.num_examples" and kind == "MetricRecord":
        return [] if set(items) == {"num_examples"} else [f"{rec_name}: keys other than num_examples"]
    if rec_name == "fitres.status" and kind == "ConfigRecord":
        ok = set(items) == {"code", "message"} and items["message"].get("value") == "Success"
        return [] if ok else [f"{rec_name}: not a plain success status"]
    if rec_name == "fitres.metrics" and kind == "ConfigRecord":
        return [
            f"{rec_name}.{k}: not a scalar training metric"
            for k, v in items.items()
            if k not in P.TRAIN_KEYS or v["type"] not in ("int", "float")
        ]
    return None


def reply_problems(
    entry: dict[str, Any],
    model_shapes: dict[str, list[int]],
    record_shapes: dict[str, dict[str, list[int]]] | None = None,
) -> list[str]:
    """What in one logged reply is not allowed to leave a site (empty = nothing). Allowed: model arrays
    with exactly the model's names and shapes (``record_shapes``: per record name, the arrays the
    request carried; otherwise ``model_shapes``), an int8 update's scales beside them; scalar metrics of
    the protocol's keys; the evaluation's fixed-size aggregate counts (confusion matrices, score
    histograms) and each split's exact prognosis AUC (one float, ``auc-prognosis``); the query reply's
    identifiers and counts; SecAgg+ stage replies."""

    problems: list[str] = []
    list_len = {"cm-prognosis": 4, "hist-prognosis": 2 * HIST_BINS, "cm-severity": 16}
    summary_keys = {"site", "role", "manifest-hash", P.NODE_KIND, P.CONTRACT_VERSION_KEY}
    for rec_name, rec in entry["records"].items():
        kind, items = rec["kind"], rec["items"]
        secagg = _secagg_problems(rec_name, rec)
        if secagg is not None:
            problems.extend(secagg)
            continue
        if kind == "ArrayRecord":
            shapes = (record_shapes or {}).get(rec_name, model_shapes)
            if rec_name.split(".")[0] != P.ARRAYS or not _arrays_match(items, shapes):
                problems.append(f"{rec_name}: arrays differ from the model's parameter names and shapes")
            continue
        for key, v in items.items():
            base = key.split("/", 1)[1] if "/" in key else key
            if kind == "MetricRecord":
                allowed = base in P.TRAIN_KEYS or base in P.EVAL_KEYS
                if not allowed:
                    problems.append(f"{rec_name}.{key}: not a protocol metric")
                elif v["type"] == "list" and list_len.get(base) != v["len"]:
                    problems.append(f"{rec_name}.{key}: a list of {v['len']} values (per-sample data?)")
                elif v["type"] == "str":
                    problems.append(f"{rec_name}.{key}: a string metric")
                elif base == P.AUC_KEY and v["type"] != "float":
                    problems.append(f"{rec_name}.{key}: the split's AUC must be one float")
            elif kind == "ConfigRecord" and rec_name == P.SITE:
                if not (key in summary_keys or key.endswith(("-prognosis", "-severity"))):
                    problems.append(f"{rec_name}.{key}: not part of the site summary")
                if v["type"] == "list":
                    problems.append(f"{rec_name}.{key}: a list in the site summary")
                if v["type"] == "str" and ("/" in v["value"] or "\\" in v["value"] or "." in v["value"]):
                    problems.append(f"{rec_name}.{key}: looks like a path or file name: {v['value']!r}")
            else:
                problems.append(f"{rec_name}: unexpected {kind}")
    return problems
