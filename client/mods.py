"""ClientApp mods.

``site_guard_mod`` (outermost) is what leaves the site: a failure becomes an error reply with an error
code and one scrubbed line (mdmt.fed.scrub; the full text stays in the site's errors.log), a reply that
breaks the message contract (mdmt.fed.audit.reply_problems) is withheld and an error reply sent instead,
and every reply, error replies and SecAgg+ stages included, gets a line in the site's reply log (record
names, array names and shapes, metric keys and value kinds).

``message_log_mod`` keeps the site's own record of every message it received, one line per unit it
carries (time, run, train or evaluate for that unit, unit, round, split): with the reply log, the site's
audit trail of what it was asked and what left it."""

from __future__ import annotations

import contextlib

from flwr.app import ArrayRecord, Context, Error, Message, MessageType
from flwr.clientapp.typing import ClientAppCallable

from mdmt.fed import protocol as P
from mdmt.fed.audit import SECAGG_CONFIGS, append_message_log, append_reply_log, reply_problems, value_kind
from mdmt.fed.packing import PACKED, is_packed, unpack_arrays
from mdmt.fed.policy import SiteRefusal, log_failure, log_policy, site_context, site_workspace
from mdmt.fed.scrub import scrub_exception, scrub_text


def _configs(msg: Message) -> list[dict]:
    records = msg.content.config_records if msg.content else {}
    return [dict(records[P.record_name(P.CONFIG, i)]) for i in P.unit_indices(records)]


def _error(msg: Message, code: int, reason: str) -> Message:
    return Message(Error(code=code, reason=reason), reply_to=msg)


def _shapes(rec: ArrayRecord) -> dict[str, list[int]]:
    if is_packed(rec.keys()):
        return {k: list(a.shape) for k, a in unpack_arrays(rec[PACKED].numpy()).items()}
    return {k: list(a.shape) for k, a in rec.items()}


def site_guard_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Outermost: nothing but a contract reply or a scrubbed error reply leaves the site; each is logged."""
    workspace = site_workspace(context.node_config)
    secagg = msg.content.config_records.get(SECAGG_CONFIGS) if msg.content else None
    stage = str(secagg.get("stage", "")) if secagg is not None else ""  # Flower's mod pops it
    try:
        _, loc = site_context(context.run_config, context.node_config, context.run_id)
        workspace = loc.workspace
        reply = call_next(msg, context)
    except Exception as exc:  # every failure becomes an error reply; the site serves the next message
        if workspace is not None:
            with contextlib.suppress(OSError):  # a full disk must not turn into an unscrubbed reply
                log_failure(workspace, context.run_id, exc)
        code = P.ERR_REFUSED if isinstance(exc, SiteRefusal) else P.ERR_FAILED
        reply = _error(msg, code, scrub_exception(exc))
    if reply.has_error():  # an error reply from within (Flower's mods) carries a scrubbed reason too
        reply = _error(msg, int(reply.error.code), scrub_text(reply.error.reason or ""))
        description, error = {}, {"code": int(reply.error.code), "reason": reply.error.reason}
    else:
        description, error = describe(reply), None
        arrays = msg.content.array_records if msg.content else {}
        shapes = {name: _shapes(rec) for name, rec in arrays.items()}
        problems = reply_problems({"records": description}, shapes.get(P.ARRAYS, {}), shapes)
        if problems:
            if workspace is not None:
                log_policy(workspace, context.run_id, f"withheld a reply: {'; '.join(problems)}")
            reason = f"the site withheld a reply that breaks the message contract: {scrub_text(problems[0])}"
            reply = _error(msg, P.ERR_BLOCKED, reason[:300])
            description, error = {}, {"code": P.ERR_BLOCKED, "reason": reply.error.reason}
    if workspace is not None:
        configs = _configs(msg)
        try:
            append_reply_log(
                workspace,
                run_id=context.run_id,
                message_type=msg.metadata.message_type,
                unit_id=",".join(str(c.get(P.CFG_UNIT, "")) for c in configs),
                description=description,
                error=error,
                stage=stage,
            )
        except OSError:  # a reply the site cannot log does not leave it
            reply = _error(msg, P.ERR_FAILED, "OSError: the site cannot write its reply log")
    return reply


def message_log_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    _, loc = site_context(context.run_config, context.node_config, context.run_id)
    for config in _configs(msg) or [
        {}
    ]:  # one line per unit the message carries: "train" only for a unit this site trains
        kind = msg.metadata.message_type
        if P.CFG_TRAIN in config:
            kind = MessageType.TRAIN if int(config[P.CFG_TRAIN]) else MessageType.EVALUATE
        append_message_log(loc.workspace, run_id=context.run_id, message_type=kind, config=config)
    return call_next(msg, context)


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
