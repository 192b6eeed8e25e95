"""ClientApp of the check: the project's SecAgg+ mod around a train handler with the project's reply layout."""

from __future__ import annotations

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from mdmt.client.secagg import secure_aggregation_mod
from mdmt.fed import protocol as P
from secagg_check.task import local_update

app = ClientApp(mods=[secure_aggregation_mod])


@app.query()
def query(msg: Message, context: Context) -> Message:
    return Message(
        RecordDict({P.SITE: ConfigRecord({"partition": int(context.node_config["partition-id"])})}), reply_to=msg
    )


@app.train()
def train(msg: Message, context: Context) -> Message:
    reference = {k: v.numpy() for k, v in msg.content[P.ARRAYS].items()}
    local, metrics = local_update(
        reference, int(context.node_config["partition-id"]), int(msg.content[P.CONFIG][P.CFG_ROUND])
    )
    content = RecordDict(
        {P.ARRAYS: ArrayRecord({k: Array(v) for k, v in local.items()}), P.METRICS: MetricRecord(metrics)}
    )
    return Message(content, reply_to=msg)
