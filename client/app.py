"""ClientApp: a site answers three kinds of message. QUERY: which site am I, what labels do I hold.
TRAIN and EVALUATE: a round of one or more units (mdmt.fed.protocol): statistics of the model received on
the requested splits, and, for a TRAIN, local training on the site's cache from that model."""

from __future__ import annotations

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from mdmt.client.mods import message_log_mod, site_guard_mod
from mdmt.client.secagg import secure_aggregation_mod
from mdmt.fed import protocol as P
from mdmt.fed.compress import encode_update
from mdmt.fed.packing import PACKED, is_packed, pack_arrays, unpack_arrays
from mdmt.fed.policy import check_contract, check_units, site_context
from mdmt.fed.sitedata import site_summary
from mdmt.fed.timing import MessageTimer

# The guard outermost: every reply (SecAgg+ stages included) passes its contract check and reply log, and
# every failure leaves as a scrubbed error reply. Then SecAgg+: the message log records the one train
# message a secure round hands to train().
app = ClientApp(mods=[site_guard_mod, secure_aggregation_mod, message_log_mod])


@app.query()
def query(msg: Message, context: Context) -> Message:
    cfg, loc = site_context(context.run_config, context.node_config, context.run_id)
    config = msg.content.config_records.get(P.CONFIG) if msg.content else None
    check_contract(dict(config or {}), loc, context.run_id)
    summary = site_summary(cfg, loc)
    return Message(RecordDict({P.SITE: ConfigRecord(summary)}), reply_to=msg)


def step(msg: Message, context: Context) -> Message:
    """A round's message: for each unit it carries, evaluate the model received on the config's splits,
    then train from it when the config says so (mdmt.fed.site.run_step holds the logic). The site's own
    timing log gets where the time went (mdmt.fed.timing)."""
    timer = MessageTimer(msg.metadata.created_at)
    # deferred: torch (mdmt.fed.site); a query message needs none
    from mdmt.fed.site import run_step

    timer.mark("imported")

    # Load: config and site; the site's policy checks every unit before any work (mdmt.fed.policy).
    cfg, loc = site_context(context.run_config, context.node_config, context.run_id)
    indices = P.unit_indices(msg.content.config_records)
    check_units(cfg, loc, [dict(msg.content[P.record_name(P.CONFIG, i)]) for i in indices], context.run_id)
    content, rounds = RecordDict(), []
    for i in indices:
        # Each unit: its global model and round config in, its statistics and update out.
        arrays = msg.content[P.record_name(P.ARRAYS, i)]
        round_config = dict(msg.content[P.record_name(P.CONFIG, i)])
        rounds.append(int(round_config.get(P.CFG_ROUND, 0)))
        # the model: one packed Array (mdmt.fed.packing, checked) or one Array per tensor; the reply alike
        packed = is_packed(arrays.keys())
        state = unpack_arrays(arrays[PACKED].numpy()) if packed else {k: v.numpy() for k, v in arrays.items()}
        new_state, metrics = run_step(cfg, loc, state, round_config)
        content[P.record_name(P.METRICS, i)] = MetricRecord(metrics)
        if new_state is not None:  # the update: an fp16/int8 difference from the global model, or the weights
            update = encode_update(new_state, state, str(round_config.get(P.CFG_COMPRESSION, "none")))
            items = {PACKED: pack_arrays(update)} if packed else update
            content[P.record_name(P.ARRAYS, i)] = ArrayRecord({k: Array(v) for k, v in items.items()})
    timer.write(loc.workspace, context.run_id, rounds)
    return Message(content, reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    return step(msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return step(msg, context)
