"""ClientApp mods. ``message_log_mod`` keeps the site's own record of every message it received
(time, run, message type, unit, round, split): the site's audit trail of what it was asked to do."""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable

from shared.config import RunConfig
from shared.site import locate_site
from shared.audit import append_message_log


def message_log_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    cfg = RunConfig.from_mapping(context.run_config)
    loc = locate_site(cfg, context.node_config)
    config = dict(msg.content.config_records.get("config", {})) if msg.content else {}
    append_message_log(loc.workspace, run_id=context.run_id, message_type=msg.metadata.message_type, config=config)
    return call_next(msg, context)
