"""One secure-aggregation train round over a Flower Grid: Flower's SecAgg+ workflow (its four stages,
its key agreement, secret sharing and masking) carries the sites' packed task-aware updates, and the
server unpacks the unmasked sum (see mdmt.fed.secagg).

SecAgg+ lives in Flower's legacy layer: it needs a LegacyContext with a legacy Strategy and sends the
strategy's FitIns as the train message. Here a small strategy only names the nodes and receives the
aggregate, and the train message each node gets is the project's own (arrays + config), so the sites'
train handler is the one that plain rounds use. The sites' ClientApp needs mdmt.client.secagg's mod."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common import FitIns, FitRes, Parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid

from mdmt.errors import ConfigError
from mdmt.fed import protocol as P
from mdmt.fed.secagg import MODULUS, SecAggSpec, error_bound, skip_for, unpack_sum
from mdmt.server.strategy import to_record


@dataclass
class SecureRound:
    """What one secure train round brought back."""

    arrays: dict[str, np.ndarray]  # the task-aware average (the reference itself when the round failed)
    counts: dict[str, int]  # summed over the included sites: num-examples, n-prognosis, n-severity
    metrics: dict[int, dict[str, Any]]  # node -> its training metrics without counts
    status: dict[int, str]  # every addressed node: ok (inside the sum), error: ..., or no reply
    bound: dict[str, float] = field(default_factory=dict)  # count key -> max |secure - plaintext| (float keys)
    quantization_range: int = 0
    bytes_up: dict[int, int] = field(default_factory=dict)  # node -> bytes of its masked vector

    @property
    def included(self) -> list[int]:
        return sorted(n for n, s in self.status.items() if s == "ok")


def error_line(msg: Message) -> str:
    """The last line of an error reply's reason, without the wrapper Flower's runtimes add around it."""
    lines = (msg.error.reason or "").strip().splitlines()
    if not lines:
        return f"error code {msg.error.code}"
    return lines[-1].split("occurred. Message: ", 1)[-1].removesuffix("'>").strip()[:300]


class _Watch:
    """The grid, seen through: remembers each node's first error and the size of its masked vector."""

    def __init__(self, grid: Grid):
        self._grid = grid
        self.errors: dict[int, str] = {}
        self.bytes_up: dict[int, int] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        for msg in replies:
            src = msg.metadata.src_node_id
            if msg.has_error():
                self.errors.setdefault(src, error_line(msg))
                continue
            cfg = msg.content.config_records.get(RECORD_KEY_CONFIGS)
            if cfg is not None and Key.MASKED_PARAMETERS in cfg:
                self.bytes_up[src] = sum(len(b) for b in cfg[Key.MASKED_PARAMETERS])
        return replies


class _Collector(Strategy):
    """The legacy strategy SecAgg+ needs: it names the nodes and keeps the unmasked aggregate."""

    def __init__(self, proxies: list[ClientProxy]):
        self.proxies = proxies
        self.aggregate: list[np.ndarray] | None = None
        self.results: list[tuple[ClientProxy, FitRes]] = []

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return None

    def configure_fit(self, server_round: int, parameters: Parameters, client_manager: ClientManager):
        return [(p, FitIns(parameters, {})) for p in self.proxies]

    def aggregate_fit(self, server_round: int, results, failures):
        self.results = list(results)
        if self.results:
            self.aggregate = parameters_to_ndarrays(self.results[0][1].parameters)
        return None, {}

    def configure_evaluate(self, server_round: int, parameters: Parameters, client_manager: ClientManager):
        return []

    def aggregate_evaluate(self, server_round: int, results, failures):
        return None, {}

    def evaluate(self, server_round: int, parameters: Parameters):
        return None


class _TaskAwareSecAggPlus(SecAggPlusWorkflow):
    """SecAgg+ whose train message to each node is the project's own content, not legacy FitIns."""

    def __init__(self, contents: dict[int, RecordDict], **kwargs: Any):
        super().__init__(**kwargs)
        self._contents = contents

    def setup_stage(self, grid, context, state) -> bool:
        ok = super().setup_stage(grid, context, state)
        state.nid_to_fitins = {nid: self._contents[nid] for nid in state.nid_to_fitins}
        return ok


DEFAULT_SPEC = SecAggSpec()  # frozen: one shared default is safe


def secure_train_round(
    grid: Grid,
    node_ids: Iterable[int],
    arrays: Mapping[str, np.ndarray],
    config: Mapping[str, Any],
    *,
    spec: SecAggSpec = DEFAULT_SPEC,
    extra: Mapping[int, Mapping[str, Any]] | None = None,
    num_shares: int | float = 1.0,
    reconstruction_threshold: int | float = 0.67,
    timeout: float | None = None,
) -> SecureRound:
    """Send a train message (``arrays`` + ``config`` + ``extra[node]``) to every node through SecAgg+ and
    return the task-aware average of the updates inside the secure sum.

    The server only ever holds masked vectors and their unmasked sum. Nodes that fail or drop before
    sending their masked vector are left out of the sum (SecAgg+ removes their masks) and reported in
    ``status``; when fewer remain than the reconstruction threshold the round fails and ``arrays`` comes
    back unchanged."""
    nodes = sorted(set(int(n) for n in node_ids))
    if len(nodes) < 2:
        raise ConfigError(
            f"secure aggregation needs at least 2 training sites per round, got {len(nodes)}; "
            "turn secure-aggregation off for single-site units"
        )
    t = spec.check_sites(len(nodes))
    reference = {k: np.asarray(v) for k, v in arrays.items()}
    record = to_record(reference)
    base = dict(config) | spec.to_config()
    extra = extra or {}
    contents = {n: RecordDict({P.ARRAYS: record, P.CONFIG: ConfigRecord(base | dict(extra.get(n, {})))}) for n in nodes}
    watch = _Watch(grid)
    collector = _Collector([GridClientProxy(n, watch, 0) for n in nodes])
    context = LegacyContext(
        Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={}), strategy=collector
    )
    context.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord()
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord(
        {WorkflowKey.CURRENT_ROUND: int(config.get(P.CFG_ROUND, 1))}
    )
    workflow = _TaskAwareSecAggPlus(
        contents,
        num_shares=num_shares,
        reconstruction_threshold=reconstruction_threshold,
        max_weight=1.0,
        clipping_range=1.0,
        quantization_range=t,
        modulus_range=MODULUS,
        timeout=timeout,
    )
    workflow(watch, context)

    included = {p.node_id: dict(r.metrics) for p, r in collector.results} if collector.aggregate is not None else {}
    status = {
        n: "ok" if n in included else (f"error: {watch.errors[n]}" if n in watch.errors else "no reply") for n in nodes
    }
    if collector.aggregate is None:
        status = {
            n: "no result: SecAgg+ halted (too few sites left)" if s == "no reply" else s for n, s in status.items()
        }
        return SecureRound(dict(reference), {}, {}, status, quantization_range=t, bytes_up=watch.bytes_up)
    # SecAgg+ returns the mean of the included vectors (each weighted 1): times their number is the sum.
    total = np.concatenate([np.ravel(a) for a in collector.aggregate]) * len(included)
    new, counts = unpack_sum(total, reference, spec, skip_for(str(base.get(P.CFG_AGGREGATION, "fedavg"))))
    return SecureRound(
        new,
        counts,
        included,
        status,
        error_bound(spec, len(included), counts, t),
        t,
        {n: watch.bytes_up[n] for n in included if n in watch.bytes_up},
    )
