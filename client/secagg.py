"""The site's side of a secure-aggregation round: Flower's ``secaggplus_mod`` around the train handler,
with the handler's reply turned into the vector SecAgg+ masks (see mdmt.fed.secagg).

Only TRAIN messages that carry SecAgg+ configs go through the protocol; every other message reaches the
handlers unchanged, so the mod can stay on the ClientApp whether or not a run uses secure aggregation.
The reply that leaves the site holds the masked vector and the training metrics without the per-task
counts: the counts travel inside the masked vector."""

from __future__ import annotations

from flwr.app import ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import ndarrays_to_parameters
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common.recorddict_compat import parameters_to_arrayrecord

from mdmt.fed import protocol as P
from mdmt.fed.secagg import COUNT_KEYS, SecAggSpec, count_key, pack_update, skip_for
from mdmt.ml.methods import TASKS

# Entries per array of the masked vector: keeps every serialised piece of the reply at 8 MiB or less.
CHUNK = 1 << 20


def secagg_reply(request: Message, reply: Message) -> Message:
    """The train handler's reply (arrays + metrics) as the SecAgg+ input: the packed vector as legacy
    FitRes parameters with weight 1, and the metrics minus the counts. The local arrays stay here."""
    if reply.has_error():
        reason = (reply.error.reason or str(reply.error.code)).strip().splitlines()[-1]
        raise RuntimeError(f"local training failed before secure aggregation: {reason}")
    config = dict(request.content[P.CONFIG])
    spec = SecAggSpec.from_config(config)
    reference = {k: v.numpy() for k, v in request.content[P.ARRAYS].items()}
    local = {k: v.numpy() for k, v in reply.content[P.ARRAYS].items()}
    metrics = dict(reply.content[P.METRICS])
    vec = pack_update(
        local,
        reference,
        int(metrics[P.NUM_EXAMPLES]),
        {t: int(metrics[count_key(t)]) for t in TASKS},
        spec,
        skip_for(str(config.get(P.CFG_AGGREGATION, "fedavg"))),
    )
    public = {k: v for k, v in metrics.items() if k not in COUNT_KEYS}
    chunks = [vec[i : i + CHUNK] for i in range(0, vec.size, CHUNK)]
    content = RecordDict(
        {
            "fitres.parameters": parameters_to_arrayrecord(ndarrays_to_parameters(chunks), keep_input=False),
            "fitres.num_examples": MetricRecord({"num_examples": 1}),
            "fitres.metrics": ConfigRecord(public),
            "fitres.status": ConfigRecord({"code": 0, "message": "Success"}),
        }
    )
    return Message(content, reply_to=request)


def secure_aggregation_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """SecAgg+ for secure train rounds; a plain pass-through for everything else."""
    if msg.metadata.message_type != MessageType.TRAIN or RECORD_KEY_CONFIGS not in msg.content.config_records:
        return call_next(msg, context)

    def train_and_pack(m: Message, c: Context) -> Message:
        return secagg_reply(m, call_next(m, c))

    return secaggplus_mod(msg, context, train_and_pack)
