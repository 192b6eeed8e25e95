"""ClientApp: a site answers three kinds of message. QUERY: which site am I, what labels do I hold.
TRAIN and EVALUATE: a round of one or more units (mdmt.fed.protocol): statistics of the model received on
the requested splits, and, for a TRAIN, local training on the site's cache from that model."""

from __future__ import annotations

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from mdmt.client.mods import message_log_mod
from mdmt.client.secagg import secure_aggregation_mod
from mdmt.fed import protocol as P
from mdmt.fed.compress import encode_update
from mdmt.fed.config import RunConfig
from mdmt.fed.packing import PACKED, is_packed, pack_arrays, unpack_arrays
from mdmt.fed.sitedata import locate_site, site_summary
from mdmt.fed.timing import MessageTimer

# SecAgg+ first: the message log then records the one train message a secure round hands to train().
app = ClientApp(mods=[secure_aggregation_mod, message_log_mod])


@app.query()
def query(msg: Message, context: Context) -> Message:
    cfg = RunConfig.from_mapping(context.run_config)
    summary = site_summary(cfg, locate_site(cfg, context.node_config))
    return Message(RecordDict({P.SITE: ConfigRecord(summary)}), reply_to=msg)


def step(msg: Message, context: Context) -> Message:
    """A round's message: for each unit it carries, evaluate the model received on the config's splits,
    then train from it when the config says so (mdmt.fed.site.run_step holds the logic). The site's own
    timing log gets where the time went (mdmt.fed.timing)."""
    timer = MessageTimer(msg.metadata.created_at)
    # deferred: torch (mdmt.fed.site); a query message needs none
    from mdmt.fed.site import run_step

    timer.mark("imported")

    # Load: config and site.
    cfg = RunConfig.from_mapping(context.run_config)
    loc = locate_site(cfg, context.node_config)
    content, rounds = RecordDict(), []
    for i in P.unit_indices(msg.content.config_records):
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
