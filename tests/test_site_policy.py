"""The server as attacker: a site daemon (a node config built from a site config, as a SuperNode has)
refuses what its own policy forbids and keeps serving the next honest message; what leaves it is a
contract reply or an error reply with one scrubbed line, and its reply log has a line for each.

Every message goes through the real ClientApp (mdmt.client.app.app) as real Flower Messages."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.common.config import parse_config_args

from mdmt.client.app import app
from mdmt.client.mods import site_guard_mod
from mdmt.errors import ProtocolError
from mdmt.fed import protocol as P
from mdmt.fed.audit import read_reply_log
from mdmt.fed.config import RunConfig
from mdmt.fed.plan import SiteInfo
from mdmt.fed.policy import COARSE_BINS, POLICY_LOG, unit_roles
from mdmt.fed.scrub import scrub_exception, scrub_text
from mdmt.fed.units import initial_arrays
from mdmt.fed.validate import check_eval
from mdmt.ops.deploy.siteconfig import SiteConfig

U1, U2 = "mdmt/resnet18/loco/A/seed0", "mdmt/resnet18/loco/A/seed1"


def _node_config(fed: Path, ws: Path, **policy) -> dict:
    """What flower-supernode parses from the --node-config that `mdmt deploy supernode-cmd` writes."""
    site = SiteConfig(
        site="B", data_dir=fed / "B", coordinator="127.0.0.1:9092", ca=ws / "ca.pem", key=ws / "k", workspace=ws
    )
    site = dataclasses.replace(site, **policy).validate()
    return parse_config_args([site.node.to_flower()])


def _run_config(attacker: Path, **kw) -> dict:
    values = {
        "fed-dir": str(attacker / "fed"),  # the server's paths: the site must use none of them
        "workspace": str(attacker / "ws"),
        "cache-dir": str(attacker / "cache"),
        "crop-source": "/etc/mdmt/boxes.csv",
        "image-size": 32,
        "batch-size": 8,
        "local-steps": 1,
        "num-rounds": 2,
        "augment": "none",
        "device": "cpu",
        "dp": True,
        "dp-noise-multiplier": 1.0,
    }
    return values | kw


def _round_config(unit: str, *, train: int, split: str = "", **kw) -> dict:
    return {
        P.CFG_ROUND: 1,
        P.CFG_UNIT: unit,
        P.CFG_METHOD: "mdmt",
        P.CFG_BACKBONE: "resnet18",
        P.CFG_PROTOCOL: "loco",
        P.CFG_FOLD: "A",
        P.CFG_LR: 1e-3,
        P.CFG_AGGREGATION: "fedavg",
        P.CFG_TRAIN: train,
        P.CFG_SPLIT: split,
    } | kw


class Site:
    """Sends real Flower Messages to the real ClientApp, as one site's SuperNode would hand them over."""

    def __init__(self, node_config: dict, attacker: Path):
        self.node_config, self.attacker = node_config, attacker
        self.arrays = {
            dp: initial_arrays(RunConfig.from_mapping({"dp": dp, "dp-noise-multiplier": 1.0}), "resnet18")
            for dp in (True, False)
        }

    def send(self, kind: str, config: dict | None = None, **run) -> Message:
        run_config = _run_config(self.attacker, **run)
        content = RecordDict()
        if config is not None:
            content[P.CONFIG] = ConfigRecord(config)
        if kind != MessageType.QUERY:
            content[P.ARRAYS] = ArrayRecord({k: Array(v) for k, v in self.arrays[run_config["dp"]].items()})
        msg = Message(content, dst_node_id=7, message_type=kind)
        return app(msg, Context(1, 7, self.node_config, RecordDict(), run_config))


def _refused(reply: Message, words: str) -> None:
    assert reply.has_error() and reply.error.code == P.ERR_REFUSED, reply.error if reply.has_error() else reply
    assert words in reply.error.reason, reply.error.reason


def test_the_server_as_attacker_is_refused_and_the_site_keeps_serving(small_federation, tmp_path, task_identity):
    ws, attacker = tmp_path / "site-ws", tmp_path / "attacker"
    site = Site(_node_config(small_federation, ws, dp_required=True, dp_min_noise=0.5, min_hist_n=10**6), attacker)
    site_ws = ws / "sites" / "B"

    # The query: answered from the site's own folders, whatever paths the run config names.
    reply = site.send(MessageType.QUERY, {P.CONTRACT_VERSION_KEY: P.CONTRACT_VERSION})
    summary = dict(reply.content[P.SITE])
    assert summary[P.CONTRACT_VERSION_KEY] == P.CONTRACT_VERSION and summary["site"] == "B"
    assert SiteInfo.from_summary(summary).site == "B"
    assert not attacker.exists() and (ws / "cache").is_dir()
    log = (site_ws / POLICY_LOG).read_text()
    for key in ("fed-dir", "workspace", "cache-dir", "crop-source"):
        assert f"ignored '{key}'" in log

    # Another contract version, an oversized image, pooling, no DP, too little noise: refused.
    _refused(site.send(MessageType.QUERY, {P.CONTRACT_VERSION_KEY: P.CONTRACT_VERSION + 1}), "message contract")
    _refused(site.send(MessageType.QUERY, {}), "no message-contract version")
    _refused(
        site.send(MessageType.QUERY, {P.CONTRACT_VERSION_KEY: P.CONTRACT_VERSION}, image_size=100000), "max-image-size"
    )
    _refused(site.send(MessageType.TRAIN, _round_config(U1, train=1, **{P.CFG_POOL: "A,B"})), "own data only")
    _refused(site.send(MessageType.TRAIN, _round_config(U1, train=1), dp=False), "dp-required")
    _refused(site.send(MessageType.TRAIN, _round_config(U1, train=1), **{"dp-noise-multiplier": 0.1}), "dp-min-noise")
    assert unit_roles(_loc(site)) == {}  # nothing refused was recorded as done
    assert not any("100000" in p.name for p in (ws / "cache").rglob("*"))

    # The next honest message is served: DP training in unit 1, then its validation with a coarse histogram.
    reply = site.send(MessageType.TRAIN, _round_config(U1, train=1))
    assert not reply.has_error(), reply.error
    eps1 = float(reply.content[P.METRICS]["epsilon"])
    assert eps1 > 0 and reply.content[P.METRICS]["dp-refused"] == 0 and P.ARRAYS in reply.content.array_records
    reply = site.send(MessageType.EVALUATE, _round_config(U1, train=0, split="val"))
    hist = np.asarray(reply.content[P.METRICS]["val/hist-prognosis"]).reshape(2, -1)
    assert hist.sum() == reply.content[P.METRICS]["val/n-prognosis"] > 0
    width = hist.shape[1] // COARSE_BINS  # every count sits in the middle bin of a coarse bin
    assert (np.flatnonzero(hist.sum(axis=0)) % width == width // 2).all()
    # its exact AUC is sent as for any split, and agrees with the coarse histogram (the server's check)
    assert isinstance(reply.content[P.METRICS][f"val/{P.AUC_KEY}"], float)
    check_eval(dict(reply.content[P.METRICS]), "val", None)

    # The unit it trained in never evaluates its train rows or all of them.
    _refused(site.send(MessageType.EVALUATE, _round_config(U1, train=0, split="val,train")), "val and test")
    _refused(site.send(MessageType.EVALUATE, _round_config(U1, train=0, split="all")), "val and test")
    assert unit_roles(_loc(site)) == {U1: "trained"}

    # A new unit-id does not reset the site's budget, nor does the server's own budget raise it.
    site.node_config = _node_config(
        small_federation, ws, dp_required=True, dp_min_noise=0.5, min_hist_n=10**6, epsilon_budget=1.5 * eps1
    )
    reply = site.send(MessageType.TRAIN, _round_config(U2, train=1), **{"dp-epsilon-budget": 1000.0})
    assert not reply.has_error() and reply.content[P.METRICS]["dp-refused"] == 1
    assert reply.content[P.METRICS]["num-examples"] == 0
    # A unit the site is held out of may evaluate all its rows, and can then never train here.
    reply = site.send(MessageType.EVALUATE, _round_config("mdmt/resnet18/loco/B/seed0", train=0, split="all"))
    assert not reply.has_error() and reply.content[P.METRICS]["all/n-prognosis"] > 0
    _refused(site.send(MessageType.TRAIN, _round_config("mdmt/resnet18/loco/B/seed0", train=1)), "cannot train")

    # Every reply is in the site's reply log, the error replies with their code.
    entries = read_reply_log(site_ws)
    assert len(entries) == 14
    assert sum("error" in e for e in entries) == 9
    assert all(e["error"]["code"] == P.ERR_REFUSED for e in entries if "error" in e)


def _loc(site: Site):
    from mdmt.fed.policy import site_context

    return site_context(_run_config(site.attacker), site.node_config)[1]


SECRET = "/data/hospital-B/images/P012345/IMG_0001.dcm"


def test_an_error_reply_carries_neither_paths_nor_file_names(small_federation, tmp_path, task_identity):
    ws = tmp_path / "ws"
    node_config = _node_config(small_federation, ws)

    def failing(msg: Message, context: Context) -> Message:
        raise RuntimeError(f"cannot decode {SECRET} (patient 20231234, series 1.2.840.113619.2.55)")

    msg = Message(RecordDict({P.CONFIG: ConfigRecord({P.CFG_UNIT: U1})}), dst_node_id=7, message_type="evaluate")
    reply = site_guard_mod(msg, Context(1, 7, node_config, RecordDict(), _run_config(tmp_path)), failing)
    assert reply.has_error() and reply.error.code == P.ERR_FAILED
    reason = reply.error.reason
    for secret in ("/data", "hospital", "P012345", "IMG_0001", ".dcm", "20231234", "1.2.840"):
        assert secret not in reason, reason
    assert reason.startswith("RuntimeError: cannot decode <path>") and "\n" not in reason
    entries = read_reply_log(ws / "sites" / "B")
    assert entries[-1]["error"] == {"code": P.ERR_FAILED, "reason": reason} and entries[-1]["unit_id"] == U1
    assert SECRET in (ws / "sites" / "B" / "errors.log").read_text()  # the whole text stays at the site

    # A real failure of the real app: a data folder that is not there, named after a patient.
    missing = tmp_path / "hospital" / "P012345"
    node_config = parse_config_args([f'site="B" data-dir="{missing}" workspace="{ws}"'])
    reply = app(
        Message(RecordDict(), dst_node_id=7, message_type="query"), Context(1, 7, node_config, RecordDict(), {})
    )
    assert reply.has_error() and str(tmp_path) not in reply.error.reason and "P012345" not in reply.error.reason


@pytest.mark.parametrize(
    "text, kept, gone",
    [
        ("open /srv/pacs/B/1234/IM-0001-0002.dcm failed", "open <path> failed", "IM-0001"),
        ("images/A_0001.dcm: no pixel data", "<path>: no pixel data", "A_0001"),
        ("C:\\PACS\\study\\x.dcm unreadable", "<path> unreadable", "PACS"),
        ("file B_0042.dcm rejected", "file <file> rejected", "B_0042"),
        ("row for P7781 and 00012345 broke", "row for <id> and <id> broke", "7781"),
        ("'image-size' must be >= 32, got 16", "'image-size' must be >= 32, got 16", "<"),
    ],
)
def test_scrubbing_replaces_paths_files_and_ids(text, kept, gone):
    assert scrub_text(text) == kept and gone not in scrub_text(text)
    assert scrub_exception(ValueError(text)) == f"ValueError: {kept}"


def test_a_reply_that_breaks_the_contract_is_withheld(small_federation, tmp_path, task_identity):
    ws = tmp_path / "ws"

    def leaking(msg: Message, context: Context) -> Message:
        return Message(RecordDict({P.METRICS: MetricRecord({"p-severe": [0.1, 0.9, 0.4]})}), reply_to=msg)

    msg = Message(RecordDict(), dst_node_id=7, message_type="evaluate")
    ctx = Context(1, 7, _node_config(small_federation, ws), RecordDict(), _run_config(tmp_path))
    reply = site_guard_mod(msg, ctx, leaking)
    assert reply.has_error() and reply.error.code == P.ERR_BLOCKED and "p-severe" in reply.error.reason
    assert read_reply_log(ws / "sites" / "B")[-1]["error"]["code"] == P.ERR_BLOCKED


def test_the_server_refuses_a_summary_of_another_contract():
    summary = {"site": "B", "role": "both", "manifest-hash": "ab", P.NODE_KIND: P.DEPLOYMENT}
    now, other = P.CONTRACT_VERSION, P.CONTRACT_VERSION + 1
    with pytest.raises(ProtocolError, match=rf"site B: its summary has no contract version.* contract {now}"):
        SiteInfo.from_summary(summary)
    with pytest.raises(ProtocolError, match=rf"site B: its summary has message contract {other}, this server .* {now}"):
        SiteInfo.from_summary(summary | {P.CONTRACT_VERSION_KEY: other})
    assert SiteInfo.from_summary(summary | {P.CONTRACT_VERSION_KEY: P.CONTRACT_VERSION}).site == "B"


def test_site_config_policy_values_are_checked(tmp_path):
    from mdmt.errors import ConfigError
    from mdmt.ops.deploy.siteconfig import load_site_config

    base = 'site = "B"\ndata-dir = "d"\ncoordinator = "c:1"\nca = "c"\nkey = "k"\nworkspace = "w"\n'
    for extra, message in [
        ('approved-app = "abc"', "'approved-app' must be 64 hex"),
        ("dp-required = 1", "'dp-required' must be true or false"),
        ("epsilon-budget = -1.0", "'epsilon-budget' must be a finite number >= 0"),
        ("max-image-size = 8", "'max-image-size' must be at least"),
        ('min-hist-n = "x"', "'min-hist-n' must be an integer"),
    ]:
        (tmp_path / "s.toml").write_text(base + extra + "\n")
        with pytest.raises(ConfigError, match=message) as err:
            load_site_config(tmp_path / "s.toml")
        assert "\n" not in str(err.value)
    (tmp_path / "s.toml").write_text(base + f'approved-app = "{"Ab" * 32}"\nepsilon-budget = 2\n')
    node = load_site_config(tmp_path / "s.toml").node
    assert node.approved_app == "ab" * 32 and node.epsilon_budget == 2.0
    assert json.dumps(node.to_flower()).count("approved-app") == 1


def test_a_secagg_stage_reply_is_checked_and_logged(small_federation, tmp_path, task_identity):
    ws = tmp_path / "ws"
    setup = {"stage": "setup", "sample_num": 3, "share_num": 3, "threshold": 2, "clipping_range": 8.0}
    setup |= {"target_range": 1 << 16, "mod_range": 1 << 24, "max_weight": 1000.0}
    msg = Message(RecordDict({"secaggplus_configs": ConfigRecord(setup)}), dst_node_id=7, message_type="train")
    ctx = Context(1, 7, _node_config(small_federation, ws), RecordDict(), _run_config(tmp_path))
    reply = app(msg, ctx)
    assert not reply.has_error(), reply.error
    entry = read_reply_log(ws / "sites" / "B")[-1]
    assert entry["stage"] == "setup" and set(entry["records"]["secaggplus_configs"]["items"]) == {"pk1", "pk2"}


def test_a_simulation_node_keeps_the_run_configs_word(small_federation, tmp_path):
    from mdmt.fed.policy import check_units, site_context

    run = {"fed-dir": str(small_federation), "workspace": str(tmp_path), "image-size": 1024, "crop-source": "b.csv"}
    cfg, loc = site_context(run, {"partition-id": 1})
    assert loc.node is None and (cfg.image_size, cfg.crop_source, cfg.fed_path) == (1024, "b.csv", small_federation)
    check_units(cfg, loc, [_round_config(U1, train=1, split="all", **{P.CFG_POOL: "A,B,C"})])
    assert not (loc.workspace / "policy").exists() and not (loc.workspace / POLICY_LOG).exists()


def test_the_reply_check_takes_a_restored_zero_dim_buffer_for_the_same_shape():
    from mdmt.fed.audit import reply_problems

    def entry(shape):
        items = {"bn.num_batches_tracked": {"shape": shape, "dtype": "int64"}}
        return {"records": {P.ARRAYS: {"kind": "ArrayRecord", "items": items}}}

    shapes = {"bn.num_batches_tracked": [1]}  # a model restored from a checkpoint
    assert reply_problems(entry([]), shapes) == [] and reply_problems(entry([1]), {"bn.num_batches_tracked": []}) == []
    assert reply_problems(entry([2]), shapes)
