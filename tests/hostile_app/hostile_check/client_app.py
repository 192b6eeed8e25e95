"""The project's ClientApp (mdmt.client.app) behind one more, outermost mod: at the site HOSTILE the mod
corrupts its train replies, one way per unit and round (ATTACKS), or, when the round's aggregation is
robust, adds a large update within the norm bound to the backbone (POISON_SHARE of the bound). Every site
also leaves what it received and sent under ``<workspace>/hostile/`` for the test to read."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MessageType, MetricRecord
from flwr.clientapp import ClientApp

from mdmt.client.app import app as project
from mdmt.fed import protocol as P
from mdmt.fed.aggregate import ROBUST
from mdmt.fed.compress import decode_update, encode_update
from mdmt.fed.config import RunConfig
from mdmt.fed.packing import PACKED, is_packed, pack_arrays, unpack_arrays
from mdmt.fed.sitedata import locate_site
from mdmt.ml.naming import head_of, is_bn_stat

HOSTILE = "C"
# An honest site's own failure, whose text names a path, a DICOM file and a patient id: the site's guard
# must send the coordinator none of them. (site, method, round) of the evaluation that fails.
FAULT = ("A", "mdmt", 2)
FAULT_TEXT = "cannot read /srv/hospital-a/dicom/PAT-0042/IM-0001-0007.dcm: truncated pixel data"
POISON_SHARE = 0.9  # robust rounds: the poisoned update's norm, as a share of update-norm-bound
ATTACKS = {  # (method, round) -> what the hostile site sends
    ("mdmt", 1): "nan",
    ("mdmt", 2): "inf",
    ("mdmt", 3): "scalar",
    ("mdmt", 4): "missing-key",
    ("stl_prognosis", 1): "dtype",
    ("stl_prognosis", 2): "forged-count",
    ("stl_prognosis", 3): "oversized",
    ("stl_prognosis", 4): "eval-range",
}


def _arrays(rec: ArrayRecord) -> tuple[dict[str, np.ndarray], bool]:
    packed = is_packed(rec.keys())
    return (unpack_arrays(rec[PACKED].numpy()) if packed else {k: v.numpy() for k, v in rec.items()}), packed


def _record(arrays: dict[str, np.ndarray], packed: bool) -> ArrayRecord:
    items = {PACKED: pack_arrays(arrays)} if packed else arrays
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in items.items()})


def _float_keys(model: dict[str, np.ndarray]) -> list[str]:
    return [k for k, v in model.items() if v.dtype.kind == "f"]


def _corrupt(attack: str, sent: dict, model: dict, metrics: dict, bound: float, mode: str) -> None:
    """Corrupt the reply's encoded update ``sent`` and ``metrics`` in place."""
    first = _float_keys(model)[0]
    big = max(_float_keys(model), key=lambda k: model[k].size)
    if attack == "nan":
        sent[big] = np.full_like(sent[big], np.nan)
    elif attack == "inf":
        sent[big] = sent[big].copy()
        sent[big].flat[0] = np.inf
    elif attack == "scalar":  # one value for a whole tensor (numpy would broadcast it)
        sent[first] = np.asarray(sent[first]).reshape(-1)[:1].copy()
    elif attack == "missing-key":
        metrics.pop("n-prognosis")
    elif attack == "dtype":
        sent[big] = np.asarray(sent[big]).astype(np.int32)
    elif attack == "forged-count":
        metrics |= {P.NUM_EXAMPLES: 10**12, "n-prognosis": 10**12}
    elif attack == "oversized":  # twice the bound, spread over every float weight
        weights = decode_update(sent, model, mode)
        step = 2 * bound / math.sqrt(sum(model[k].size for k in _float_keys(model)))
        sent.clear()
        sent |= encode_update({k: v + step if v.dtype.kind == "f" else v for k, v in weights.items()}, model, mode)
    elif attack == "eval-range":
        key = "val/hist-prognosis"
        metrics[key] = [int(metrics["val/n-prognosis"]) + 1, *list(metrics[key])[1:]]


def _poison(sent: dict, model: dict, bound: float, mode: str) -> None:
    """A backbone update of POISON_SHARE x the bound (accepted: it is within it)."""
    weights = decode_update(sent, model, mode)
    keys = [k for k in _float_keys(model) if head_of(k) is None and not is_bn_stat(k)]
    step = POISON_SHARE * bound / math.sqrt(sum(model[k].size for k in keys))
    sent.clear()
    sent |= encode_update({k: v + step if k in keys else v for k, v in weights.items()}, model, mode)


def attacker_mod(msg: Message, context: Context, call_next) -> Message:
    reply = call_next(msg, context)
    if msg.metadata.message_type != MessageType.TRAIN or reply.has_error():
        return reply
    cfg = RunConfig.from_mapping(context.run_config)
    site = locate_site(cfg, context.node_config).site
    out = Path(cfg.workspace_path) / "hostile"
    out.mkdir(parents=True, exist_ok=True)
    for i in P.unit_indices(msg.content.config_records):
        conf = dict(msg.content[P.record_name(P.CONFIG, i)])
        aname, mname = P.record_name(P.ARRAYS, i), P.record_name(P.METRICS, i)
        if aname not in reply.content.array_records:
            continue
        model, _ = _arrays(msg.content[aname])
        sent, packed = _arrays(reply.content[aname])
        metrics = dict(reply.content[mname])
        rnd, method, mode = int(conf[P.CFG_ROUND]), str(conf[P.CFG_METHOD]), str(conf[P.CFG_COMPRESSION])
        tag = f"{method}-r{rnd}"
        np.savez(out / f"global-{tag}.npz", **model)  # the global model of round rnd - 1
        if site == HOSTILE and str(conf[P.CFG_AGGREGATION]) in ROBUST:
            _poison(sent, model, cfg.update_norm_bound, mode)
        elif site == HOSTILE and (method, rnd) in ATTACKS:
            _corrupt(ATTACKS[(method, rnd)], sent, model, metrics, cfg.update_norm_bound, mode)
        if str(conf[P.CFG_AGGREGATION]) in ROBUST:  # what this site's update decodes to, for the test
            np.savez(out / f"site-{site}-{tag}.npz", **decode_update(sent, model, mode))
        reply.content[aname] = _record(sent, packed)
        reply.content[mname] = MetricRecord(metrics)
    return reply


app = ClientApp(mods=[attacker_mod])


@app.query()
def query(msg: Message, context: Context) -> Message:
    return project(msg, context)


@app.train()
def train(msg: Message, context: Context) -> Message:
    return project(msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    site = locate_site(RunConfig.from_mapping(context.run_config), context.node_config).site
    configs = [dict(msg.content[P.record_name(P.CONFIG, i)]) for i in P.unit_indices(msg.content.config_records)]
    if any((site, str(c[P.CFG_METHOD]), int(c[P.CFG_ROUND])) == FAULT for c in configs):
        return _failing(msg, context)
    return project(msg, context)


def _failing(msg: Message, context: Context) -> Message:
    """The project's ClientApp with the site's step failing as a corrupt file would make it fail."""
    # deferred: the site's step module, patched for this one message only
    import mdmt.fed.site as site_module

    def broken(*args, **kwargs):
        raise OSError(FAULT_TEXT)

    honest = site_module.run_step
    site_module.run_step = broken
    try:
        return project(msg, context)
    finally:
        site_module.run_step = honest
