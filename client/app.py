"""ClientApp: a site answers three kinds of message. QUERY: which site am I, what labels do I hold.
TRAIN: local training on the site's cache. EVALUATE: sufficient statistics for both tasks."""

from __future__ import annotations

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from mdmt.client.mods import message_log_mod
from mdmt.client.secagg import secure_aggregation_mod
from mdmt.fed import protocol as P
from mdmt.fed.compress import encode_update
from mdmt.fed.config import RunConfig
from mdmt.fed.sitedata import locate_site, site_summary

# SecAgg+ first: the message log then records the one train message a secure round hands to train().
app = ClientApp(mods=[secure_aggregation_mod, message_log_mod])


@app.query()
def query(msg: Message, context: Context) -> Message:
    cfg = RunConfig.from_mapping(context.run_config)
    summary = site_summary(cfg, locate_site(cfg, context.node_config))
    return Message(RecordDict({P.SITE: ConfigRecord(summary)}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    # deferred: torch (mdmt.fed.site); a query message needs none
    from mdmt.fed.site import run_train

    # Load: config, site, global model.
    cfg = RunConfig.from_mapping(context.run_config)
    loc = locate_site(cfg, context.node_config)
    state = msg.content[P.ARRAYS].to_torch_state_dict()
    # Train locally (mdmt.fed.site holds the logic).
    round_config = dict(msg.content[P.CONFIG])
    new_state, metrics = run_train(cfg, loc, state, round_config)
    # Reply: the update (fp16/int8 difference from the global model, or the weights) and counts per task.
    update = encode_update(new_state, state, str(round_config.get(P.CFG_COMPRESSION, "none")))
    content = RecordDict(
        {P.ARRAYS: ArrayRecord({k: Array(v) for k, v in update.items()}), P.METRICS: MetricRecord(metrics)}
    )
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    # deferred: torch (mdmt.fed.site); a query message needs none
    from mdmt.fed.site import run_evaluate

    cfg = RunConfig.from_mapping(context.run_config)
    loc = locate_site(cfg, context.node_config)
    state = msg.content[P.ARRAYS].to_torch_state_dict()
    metrics = run_evaluate(cfg, loc, state, dict(msg.content[P.CONFIG]))
    return Message(RecordDict({P.METRICS: MetricRecord(metrics)}), reply_to=msg)
