"""Secure aggregation (Flower's SecAgg+) carrying task-aware FedAvg.

Fast tests check the packing against mdmt.fed.aggregate.task_aware_fedavg and run Flower's own SecAgg+
workflow and client mod in this process. The slow test runs a real Flower simulation (4 sites, one of
which breaks the public bound) and inspects every reply its ServerApp received."""

from __future__ import annotations

import copy
import json
import pickle
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.common.secure_aggregation.secaggplus_constants import Stage

from mdmt.client.secagg import secure_aggregation_mod
from mdmt.errors import ConfigError
from mdmt.fed import protocol as P
from mdmt.fed.aggregate import SiteUpdate, task_aware_fedavg
from mdmt.fed.secagg import (
    COUNT_KEYS,
    MODULUS,
    SecAggBoundError,
    SecAggSpec,
    count_key,
    error_bound,
    layout,
    pack_update,
    quantization_range,
    skip_for,
    unpack_sum,
)
from mdmt.ml.methods import PROGNOSIS, SEVERITY
from mdmt.ml.naming import head_of, is_bn_stat
from mdmt.server.secagg import secure_train_round

APP = Path(__file__).parent / "secagg_app"
sys.path.insert(0, str(APP))
from secagg_check.task import OVER_BOUND, SPEC, local_update, tiny_model  # noqa: E402


def _updates(reference, parts, rnd):
    out = []
    for p in parts:
        arrays, m = local_update(reference, p, rnd)
        out.append((p, arrays, m))
    return out


def _plain(reference, updates):
    return task_aware_fedavg(
        reference,
        [
            SiteUpdate(str(p), a, m[P.NUM_EXAMPLES], {PROGNOSIS: m["n-prognosis"], SEVERITY: m["n-severity"]})
            for p, a, m in updates
        ],
    )


def _pack(reference, arrays, m, spec=SPEC, skip=None):
    return pack_update(
        arrays, reference, m[P.NUM_EXAMPLES], {PROGNOSIS: m["n-prognosis"], SEVERITY: m["n-severity"]}, spec, skip
    )


def _max_err(secure, plain, bound):
    """Largest |secure - plain| over float keys, and whether every float entry is within the bound plus one
    float32 ulp and every integer entry is equal (the sites' step counts keep the plaintext means of
    integer buffers at .48, far from a half-integer)."""
    worst, ok = 0.0, True
    for key, p in plain.items():
        assert secure[key].shape == p.shape and secure[key].dtype == p.dtype, key
        diff = np.abs(secure[key].astype(np.float64) - p.astype(np.float64))
        b = bound.get(count_key(head_of(key)), 0.0)
        if np.issubdtype(p.dtype, np.floating):
            ok &= bool(np.all(diff <= b + np.spacing(np.abs(p).astype(np.float32)).astype(np.float64)))
            worst = max(worst, float(diff.max()) if diff.size else 0.0)
        else:
            ok &= bool(np.all(diff == 0))
    return worst, ok


# --- packing, without Flower -------------------------------------------------------------------------------


def test_exact_sum_of_packed_updates_unpacks_to_task_aware_fedavg():
    ref = tiny_model()
    ups = _updates(ref, [0, 1, 2], 1)
    total = sum(_pack(ref, a, m) for _, a, m in ups)
    new, counts = unpack_sum(total, ref, SPEC)
    assert counts == {P.NUM_EXAMPLES: 125, "n-prognosis": 70, "n-severity": 75}
    plain = _plain(ref, ups)
    for key in ref:
        assert new[key].dtype == ref[key].dtype, key
        np.testing.assert_allclose(new[key], plain[key], rtol=0, atol=1e-6, err_msg=key)
    assert new["backbone.bn1.num_batches_tracked"] == plain["backbone.bn1.num_batches_tracked"] == 18


def test_zero_dim_buffer_may_come_back_as_one_element():
    ref = tiny_model()
    ref1 = dict(ref, **{"backbone.bn1.num_batches_tracked": ref["backbone.bn1.num_batches_tracked"].reshape(1)})
    arrays, m = local_update(ref, 0, 1)
    np.testing.assert_array_equal(_pack(ref1, arrays, m), _pack(ref, arrays, m))
    new, _ = unpack_sum(_pack(ref, arrays, m), ref, SPEC)
    assert new["backbone.bn1.num_batches_tracked"].shape == () and new["backbone.bn1.num_batches_tracked"] == 15


def test_head_nobody_trained_keeps_previous_value():
    ref = tiny_model()
    ups = _updates(ref, [0, 3], 2)  # both prognosis-only sites
    new, counts = unpack_sum(sum(_pack(ref, a, m) for _, a, m in ups), ref, SPEC)
    assert counts["n-severity"] == 0
    np.testing.assert_array_equal(new["heads.severity.2.weight"], ref["heads.severity.2.weight"])
    assert not np.allclose(new["heads.prognosis.0.weight"], ref["heads.prognosis.0.weight"])


def test_every_packed_entry_is_within_the_unit_interval():
    ref = tiny_model()
    for _, a, m in _updates(ref, [0, 1, 2], 1):
        vec = _pack(ref, a, m)
        assert vec.dtype == np.float64 and np.all(np.abs(vec) <= 1.0)
        assert vec.size == sum(e.size for e in layout(ref)) + len(COUNT_KEYS)


def test_site_refuses_update_or_count_outside_the_bounds():
    ref = tiny_model()
    arrays, m = local_update(ref, OVER_BOUND, 1)
    with pytest.raises(
        SecAggBoundError, match=r"'backbone.conv1.weight' reaches .* above secagg-clip 0.5; raise secagg-clip"
    ):
        _pack(ref, arrays, m)
    arrays, m = local_update(ref, 0, 1)
    with pytest.raises(SecAggBoundError, match=r"count 'num-examples' = 40 exceeds secagg-count-scale 10"):
        _pack(ref, arrays, m, spec=SecAggSpec(clip=0.5, count_scale=10))
    bad = dict(arrays, **{"heads.prognosis.0.bias": np.array([np.nan, 0], np.float32)})
    with pytest.raises(SecAggBoundError, match="'heads.prognosis.0.bias' holds a non-finite value"):
        _pack(ref, bad, m)
    with pytest.raises(SecAggBoundError, match="lacks key 'backbone.bn1.bias'"):
        _pack(ref, {k: v for k, v in arrays.items() if k != "backbone.bn1.bias"}, m)


def test_fedbn_leaves_batchnorm_statistics_out_of_the_sum():
    ref = tiny_model()
    skip = skip_for("fedbn")
    ups = _updates(ref, [0, 1, 2], 1)
    total = sum(_pack(ref, a, m, skip=skip) for _, a, m in ups)
    assert total.size == sum(v.size for k, v in ref.items() if not is_bn_stat(k)) + len(COUNT_KEYS)
    new, _ = unpack_sum(total, ref, SPEC, skip)
    for key in ("backbone.bn1.running_mean", "backbone.bn1.running_var", "backbone.bn1.num_batches_tracked"):
        np.testing.assert_array_equal(new[key], ref[key])
    assert skip_for("fedavg") is None and skip_for("fedprox") is None


def test_quantization_range_never_wraps_and_spec_is_checked():
    for n in range(1, 200):
        t = quantization_range(n)
        assert t & (t - 1) == 0 and n * t < MODULUS and t <= 2**30
        assert 2 * n * t >= MODULUS or t == 2**30  # the largest such power of two
    with pytest.raises(ConfigError, match="secagg-count-scale = 100000000 is too large for 3 sites"):
        SecAggSpec(count_scale=100_000_000).check_sites(3)
    with pytest.raises(ConfigError, match="secagg-clip must be a positive number"):
        SecAggSpec(clip=0.0)
    with pytest.raises(ConfigError, match="lacks secagg-count-scale"):
        SecAggSpec.from_config({"secagg-clip": 1.0, "secagg-int-clip": 2.0})
    assert SecAggSpec.from_config(SPEC.to_config()) == SPEC


def test_unpack_refuses_a_vector_of_another_layout():
    ref = tiny_model()
    with pytest.raises(Exception, match="summed vector has 5 entries, the model layout 158"):
        unpack_sum(np.zeros(5), ref, SPEC)


# --- Flower's SecAgg+ workflow and mod, in this process ------------------------------------------------------


class LocalGrid:
    """Delivers each message (a deep copy, as the wire would) to a site's mod chain in this process."""

    def __init__(self, partition_of: dict[int, int]):
        self.partition_of = partition_of
        self.contexts = {n: Context(1, n, {"partition-id": p}, RecordDict(), {}) for n, p in partition_of.items()}
        self.handled: list[tuple[int, str]] = []
        self.configs: dict[int, dict] = {}

    def handler(self, msg: Message, context: Context) -> Message:
        self.handled.append((msg.metadata.dst_node_id, msg.metadata.message_type))
        self.configs[msg.metadata.dst_node_id] = dict(msg.content[P.CONFIG])
        reference = {k: v.numpy() for k, v in msg.content[P.ARRAYS].items()}
        local, metrics = local_update(
            reference, int(context.node_config["partition-id"]), int(msg.content[P.CONFIG][P.CFG_ROUND])
        )
        return Message(
            RecordDict(
                {P.ARRAYS: ArrayRecord({k: Array(v) for k, v in local.items()}), P.METRICS: MetricRecord(metrics)}
            ),
            reply_to=msg,
        )

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            msg = copy.deepcopy(msg)
            node = msg.metadata.dst_node_id
            try:
                replies.append(secure_aggregation_mod(msg, self.contexts[node], self.handler))
            except Exception as exc:  # what a ClientApp runtime turns into an error reply
                replies.append(Message(Error(0, f"{type(exc).__name__}: {exc}"), reply_to=msg))
        return replies


def test_in_process_secaggplus_with_a_refusing_site_equals_plaintext(task_identity):
    partition_of = {101: 0, 102: 1, 103: 2, 104: OVER_BOUND}
    grid = LocalGrid(partition_of)
    ref = tiny_model()
    res = secure_train_round(grid, partition_of, ref, {P.CFG_ROUND: 1}, spec=SPEC)
    assert res.status[104].startswith(
        "error: SecAggBoundError: secure aggregation: |update| of 'backbone.conv1.weight'"
    )
    assert res.included == [101, 102, 103]
    assert res.counts == {P.NUM_EXAMPLES: 125, "n-prognosis": 70, "n-severity": 75}
    sent = local_update(ref, 0, 1)[1]
    assert res.metrics[101] == {k: v for k, v in sent.items() if k not in COUNT_KEYS}
    worst, ok = _max_err(res.arrays, _plain(ref, _updates(ref, [0, 1, 2], 1)), res.bound)
    assert ok, (worst, res.bound)
    assert res.bound == error_bound(SPEC, 3, res.counts, quantization_range(4))
    # A second round on the same contexts (SecAgg+ state restarts at setup) without the refusing site.
    res2 = secure_train_round(grid, [101, 102, 103], res.arrays, {P.CFG_ROUND: 2}, spec=SPEC)
    worst2, ok2 = _max_err(res2.arrays, _plain(res.arrays, _updates(res.arrays, [0, 1, 2], 2)), res2.bound)
    assert res2.included == [101, 102, 103] and ok2, (worst2, res2.bound)


def test_too_few_sites_left_halts_and_keeps_the_model(task_identity):
    partition_of = {101: 0, 102: 1, 103: OVER_BOUND}
    grid = LocalGrid(partition_of)
    ref = tiny_model()
    res = secure_train_round(
        grid,
        partition_of,
        ref,
        {P.CFG_ROUND: 1},
        spec=SPEC,
        reconstruction_threshold=3,
        extra={101: {P.CFG_POOL: "A,B"}},
    )
    assert grid.configs[101][P.CFG_POOL] == "A,B" and P.CFG_POOL not in grid.configs[102]
    assert grid.configs[102]["secagg-clip"] == SPEC.clip
    assert res.status[103].startswith("error: SecAggBoundError")
    assert res.status[101] == res.status[102] == "no result: SecAgg+ halted (too few sites left)"
    assert res.included == [] and res.counts == {}
    assert all(np.array_equal(res.arrays[k], ref[k]) for k in ref)


def test_mod_passes_plain_messages_through(task_identity):
    grid = LocalGrid({101: 0})
    ref = tiny_model()
    msg = Message(
        RecordDict(
            {P.ARRAYS: ArrayRecord({k: Array(v) for k, v in ref.items()}), P.CONFIG: ConfigRecord({P.CFG_ROUND: 1})}
        ),
        dst_node_id=101,
        message_type=MessageType.TRAIN,
    )
    reply = grid.send_and_receive([msg])[0]
    assert not reply.has_error() and P.ARRAYS in reply.content.array_records
    assert grid.handled == [(101, MessageType.TRAIN)]


def test_secure_round_needs_two_sites(task_identity):
    with pytest.raises(ConfigError, match="at least 2 training sites per round, got 1"):
        secure_train_round(LocalGrid({101: 0}), [101], tiny_model(), {P.CFG_ROUND: 1}, spec=SPEC)


# --- a real Flower simulation -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sim_out(tmp_path_factory):
    """`flwr run` of tests/secagg_app on a simulation SuperLink this test starts (and stops by PID):
    round 1 with 4 sites, one refusing; round 2 with the 3 others; round 3 on the resnet18 layout."""
    from mdmt.ops.launch import LocalSimulation, processes_with_token

    home = tmp_path_factory.mktemp("secagg")
    out = home / "out"
    out.mkdir()
    run_config = home / "run.toml"
    run_config.write_text(f'out-dir = "{out}"\nnum-sites = 4\nresnet18 = true\n')
    t0 = time.monotonic()
    with LocalSimulation(home) as sim:
        with open(home / "flwr.log", "wb") as fh:
            rc = sim.run(APP, run_config, num_supernodes=4, cpus_per_client=1.0, output=fh)
        token = sim.token
    assert rc == 0, (home / "flwr.log").read_text()[-3000:]
    assert processes_with_token(token) == []
    return out, time.monotonic() - t0


def _load(out: Path, rnd: int):
    info = json.loads((out / f"round{rnd}.json").read_text())
    ref = dict(np.load(out / f"reference{rnd}.npz"))
    secure = dict(np.load(out / f"secure{rnd}.npz"))
    with open(out / f"received{rnd}.pkl", "rb") as fh:
        received = pickle.load(fh)
    return info, ref, secure, received


@pytest.mark.slow
def test_simulation_secure_aggregate_equals_plaintext_task_aware_aggregate(sim_out):
    out, _ = sim_out
    for rnd in (1, 2, 3):
        info, ref, secure, _ = _load(out, rnd)
        assert sorted(info["included"]) == [0, 1, 2]
        assert info["counts"] == {P.NUM_EXAMPLES: 125, "n-prognosis": 70, "n-severity": 75}
        worst, ok = _max_err(secure, _plain(ref, _updates(ref, [0, 1, 2], rnd)), info["bound"])
        assert ok, f"round {rnd}: error {worst} above the bound {info['bound']}"
    info1 = json.loads((out / "round1.json").read_text())
    assert info1["status"][str(OVER_BOUND)].startswith(
        "error: secure aggregation: |update| of 'backbone.conv1.weight' reaches"
    )
    assert "raise secagg-clip on the server" in info1["status"][str(OVER_BOUND)]


@pytest.mark.slow
def test_simulation_server_only_ever_received_masked_vectors(sim_out):
    out, _ = sim_out
    for rnd in (1, 2, 3):
        info, ref, _, received = _load(out, rnd)
        t = info["quantization_range"]
        ups = {p: (a, m) for p, a, m in _updates(ref, [0, 1, 2], rnd)}
        collected = [r for r in received if r["stage"] == Stage.COLLECT_MASKED_VECTORS and r["error"] is None]
        assert sorted(r["partition"] for r in collected) == [0, 1, 2]
        # No reply of any stage carried an array: the only model data that arrived is the masked vector.
        assert all(r["arrays"] == 0 for r in received if r["error"] is None)
        masked_sum = np.zeros(collected[0]["masked"].size, dtype=np.int64)
        packed_sum = np.zeros(masked_sum.size - 1)
        for r in collected:
            arrays, m = ups[r["partition"]]
            packed = _pack(ref, arrays, m)[: masked_sum.size - 1]
            masked = r["masked"]
            # Flower prepends the weight factor; read the rest as if it were merely quantised.
            as_plain = masked[1:].astype(np.float64) * 2.0 / t - 1.0
            assert np.mean(np.abs(as_plain - packed)) > 0.3
            assert abs(np.corrcoef(as_plain, packed)[0, 1]) < 0.35
            assert 0.35 < masked.mean() / MODULUS < 0.65
            assert not set(r["fitres_metrics"]) & set(COUNT_KEYS)
            if "payload" in r:  # tiny rounds: every byte the reply carried
                assert packed.tobytes()[:64] not in r["payload"]
                for key, v in arrays.items():
                    if v.size >= 4:
                        assert v.tobytes() not in r["payload"], (rnd, r["partition"], key)
            masked_sum = (masked_sum + masked) % MODULUS
            packed_sum += packed
        # Even the sum of the masked vectors is masked until the sites' shares remove the private masks.
        assert np.mean(np.abs(masked_sum[1:] * 2.0 / t - 3 - packed_sum)) > 0.3


@pytest.mark.slow
def test_simulation_timing_and_upload_size(sim_out):
    out, seconds = sim_out
    assert seconds < 150
    info = json.loads((out / "round3.json").read_text())
    n = sum(v.size for v in np.load(out / "reference3.npz").values()) + len(COUNT_KEYS) + 1
    assert all(b >= 8 * n for b in info["bytes_up"].values())  # int64 masked entries: 2x the fp32 model
