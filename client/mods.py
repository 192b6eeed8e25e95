"""ClientApp mods. ``message_log_mod`` keeps the site's own record of every message it received, one line
per unit it carries (time, run, train or evaluate for that unit, unit, round, split), and of what it sent
back (record names, array names and shapes, metric keys and value kinds): the site's audit trail of what
it was asked and what left it."""

from __future__ import annotations

from flwr.app import ArrayRecord, Context, Message, MessageType
from flwr.clientapp.typing import ClientAppCallable

from mdmt.fed import protocol as P
from mdmt.fed.audit import append_message_log, append_reply_log, value_kind
from mdmt.fed.config import RunConfig
from mdmt.fed.packing import PACKED, is_packed, unpack_arrays
from mdmt.fed.sitedata import locate_site


def message_log_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    cfg = RunConfig.from_mapping(context.run_config)
    loc = locate_site(cfg, context.node_config)
    records = msg.content.config_records if msg.content else {}
    configs = [dict(records[P.record_name(P.CONFIG, i)]) for i in P.unit_indices(records)] or [{}]
    for config in configs:  # one line per unit the message carries: "train" only for a unit this site trains
        kind = msg.metadata.message_type
        if P.CFG_TRAIN in config:
            kind = MessageType.TRAIN if int(config[P.CFG_TRAIN]) else MessageType.EVALUATE
        append_message_log(loc.workspace, run_id=context.run_id, message_type=kind, config=config)
    reply = call_next(msg, context)
    if not reply.has_error():
        append_reply_log(
            loc.workspace,
            run_id=context.run_id,
            message_type=msg.metadata.message_type,
            unit_id=",".join(str(c.get(P.CFG_UNIT, "")) for c in configs),
            description=describe(reply),
        )
    return reply


def describe(reply: Message) -> dict:
    """Names, shapes and kinds of everything in a reply; never array contents. A packed record
    (mdmt.fed.packing) is described by the tensors it holds."""
    out = {}
    for name, rec in reply.content.items():
        if isinstance(rec, ArrayRecord) and is_packed(rec.keys()):  # the tensors inside the one buffer
            items = {
                k: {"shape": list(a.shape), "dtype": str(a.dtype)}
                for k, a in unpack_arrays(rec[PACKED].numpy()).items()
            }
            out[name] = {"kind": type(rec).__name__, "packed": True, "items": items}
            continue
        if isinstance(rec, ArrayRecord):
            items = {k: {"shape": list(a.shape), "dtype": a.dtype} for k, a in rec.items()}
        else:
            items = {k: value_kind(v) for k, v in rec.items()}
        out[name] = {"kind": type(rec).__name__, "items": items}
    return out
