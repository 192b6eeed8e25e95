"""Zero trust on a real TLS deployment on loopback (mdmt.ops.deploy.loopback.Loopback with ``proxy=True``):
an operator-only control plane behind nginx, site identity from keys, and sites that run only the app
their operator approved. One deployment for the module: the SuperLink on one loopback port (the
operator's), nginx on another (the sites'), three SuperNodes connected through nginx:

- A: an honest site; B: an honest site that pinned the sha256 of the approved app bundle;
- C: a node whose key is registered for site C but whose node config claims site A (an impostor).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mdmt.fed.approved import fab_sha256
from mdmt.ops.deploy import commands, proxy
from mdmt.ops.deploy.loopback import CONNECTION, Loopback

needs_nginx = pytest.mark.skipif(
    proxy.nginx_binary() is None, reason="nginx is not installed (CI installs Debian's: apt-get install nginx)"
)

SERVER = """\
import json
import logging
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from mdmt.fed.config import RunConfig
from mdmt.logs import setup_logging
from mdmt.server.app import discover_sites

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    setup_logging()  # as the project's ServerApp: the 'mdmt' log goes to the SuperLink's output
    cfg = RunConfig.from_mapping(context.run_config)
    records = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logging.getLogger("mdmt").addHandler(handler)
    try:
        result = {"sites": discover_sites(grid, cfg, wait_s=60.0)[1]}
    except Exception as exc:
        result = {"error": str(exc)}
    result["log"] = records
    out = Path(cfg.workspace) / "discovery.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result))
"""

# Importing the app leaves a mark named after the site's workspace: proof that a site ran its code.
CLIENT = """\
import os
from pathlib import Path

Path({marks!r}, Path(os.environ["FLWR_HOME"]).parent.name).touch()

from mdmt.client.app import app as project_app  # noqa: E402

app = project_app
"""

PYPROJECT = """\
[build-system]
requires = ["setuptools>=69"]
build-backend = "setuptools.build_meta"

[project]
name = "mdmt-control-check"
version = "0.1.0"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "mdmt"

[tool.flwr.app.components]
serverapp = "control_check.server_app:app"
clientapp = "control_check.client_app:app"

[tool.flwr.app.config]
fed-dir = {fed!r}
workspace = {ws!r}
sites = "A,B"
site-registry = {registry!r}
round-timeout = 90.0
device = "cpu"
"""


def _app(root: Path, fed: Path, ws: Path, registry: Path, marks: Path, extra: str = "") -> Path:
    """An app bundle's folder: the discovery ServerApp above, the project's ClientApp behind a mark."""
    pkg = root / "control_check"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "server_app.py").write_text(SERVER)
    (pkg / "client_app.py").write_text(CLIENT.format(marks=str(marks)) + extra)
    (root / "pyproject.toml").write_text(
        PYPROJECT.format(fed=str(fed), ws=str(ws), registry=str(registry)).replace("'", '"')
    )
    return root


def _fab_hash(app: Path) -> str:
    # deferred: Flower's CLI build (the bytes `flwr run` sends)
    from flwr.cli.build import build_fab_from_disk

    return fab_sha256(build_fab_from_disk(app))


def _mdmt(capsys, *argv) -> tuple[int, str]:
    from mdmt.ops.cli import main

    capsys.readouterr()
    rc = main(["deploy", *(str(a) for a in argv)])
    got = capsys.readouterr()
    return rc, got.out + got.err


def _result(ws: Path, lb: Loopback, timeout: float = 120.0) -> dict:
    path = ws / "discovery.json"
    deadline = time.monotonic() + timeout
    while not path.is_file():
        assert time.monotonic() < deadline, f"no discovery result: {lb.log('superlink')[-3000:]}"
        assert lb.procs["superlink"].poll() is None, lb.log("superlink")[-3000:]
        time.sleep(1.0)
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def deployment(tmp_path_factory, small_federation):
    root = tmp_path_factory.mktemp("control-plane")
    marks = root / "marks"
    marks.mkdir()
    lb = Loopback(root / "deploy", small_federation, proxy=True)
    try:
        lb.start_superlink()
        approved = _app(root / "approved", small_federation, root / "ws-approved", lb.registry, marks)
        res = subprocess.run(
            [str(Path(sys.executable).parent / "mdmt"), "deploy", "app-hash", str(approved)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        pinned = res.stdout.strip()
        assert res.returncode == 0 and pinned == _fab_hash(approved), res.stderr
        lb.add_site("A")
        lb.add_site("B", approved_app=pinned)
        lb.add_site("C", claim="A", data_dir=small_federation / "A")
        yield lb, root, approved, marks
    finally:
        lb.stop(grace=5.0)


@needs_nginx
def test_the_sites_listener_refuses_the_control_api_and_the_operators_loopback_accepts_it(deployment):
    lb, root, approved, _ = deployment
    # What a site (or anyone on the sites' network) can reach: nginx, with the federation's CA.
    outsider = root / "outsider-flwr"
    commands.write_connection(outsider, "sites-side", lb.site_address, lb.ca)
    flwr = str(Path(sys.executable).parent / "flwr")
    env = {"FLWR_HOME": str(outsider)}
    res = lb.run("outsider-run", [flwr, "run", str(approved), "sites-side"], env, timeout=120)
    assert res.returncode != 0 and "403 Forbidden" in lb.log("outsider-run"), lb.log("outsider-run")
    key = lb.sites_dir / "site-C.pub"
    res = lb.run("outsider-register", [flwr, "supernode", "register", str(key), "sites-side"], env, timeout=120)
    assert res.returncode != 0 and "403 Forbidden" in lb.log("outsider-register"), lb.log("outsider-register")
    # nginx answered both itself: the SuperLink never saw a Control API call from the sites' side.
    access = (lb.proxy_dir / "access.log").read_text()
    refused = [line for line in access.splitlines() if "/v1/control/" in line]
    assert refused and all('" 403 ' in line for line in refused), access[-2000:]
    assert any("/v1/fleet/pull-messages" in line and '" 200 ' in line for line in access.splitlines())

    # The operator's CLI on the SuperLink's loopback port: it lists runs (the sites registered through it).
    res = lb.flwr("operator-ls", "ls", CONNECTION, "--format", "json")
    assert res.returncode == 0, lb.log("operator-ls")
    assert json.loads(lb.registry.read_text())["nodes"].keys().__len__() == 3

    # `mdmt deploy check --proxy`: the config, the SuperLink's bind address, and the live probe.
    items = proxy.check_proxy(lb.proxy_dir / "nginx.conf", timeout=5)
    assert [i for i in items if i[0] == "FAIL"] == [], items
    assert ("ok", "probe", f"{proxy.CONTROL_PROBE} on {lb.site_address}: refused (403)") in items
    assert ("ok", "superlink", f"listens on 127.0.0.1 port {lb.port} only") in items


@needs_nginx
def test_an_impostor_is_refused_and_the_pinned_site_runs_only_the_approved_app(deployment):
    lb, root, approved, marks = deployment
    ws = root / "ws-approved"
    assert lb.flwr("run-approved", "run", str(approved), CONNECTION).returncode == 0, lb.log("run-approved")
    got = _result(ws, lb)
    registry = {int(n): e["site"] for n, e in json.loads(lb.registry.read_text())["nodes"].items()}
    node = {site: n for n, site in registry.items()}
    # C's key claims A: refused and logged; the run goes on with the real A and B.
    assert got.get("sites") == {"A": node["A"], "B": node["B"]}, got
    why = f"node {node['C']} claims site 'A' but its key is registered for site 'C'"
    assert any(why in line for line in got["log"]), got["log"]
    assert {p.name for p in marks.iterdir()} == {"ws-A", "ws-B", "ws-C"}  # the approved app ran everywhere

    # Another bundle (one line more): the pinned site refuses it before unpacking it; the others run it.
    for p in marks.iterdir():
        p.unlink()
    ws2 = root / "ws-modified"
    modified = _app(root / "modified", lb.fed, ws2, lb.registry, marks, extra="# changed\n")
    assert _fab_hash(modified) != _fab_hash(approved)
    assert lb.flwr("run-modified", "run", str(modified), CONNECTION).returncode == 0, lb.log("run-modified")
    got = _result(ws2, lb)
    assert f"node-{node['B']}: error" in got.get("error", ""), got
    assert "site B runs only the approved app" in got["error"], got
    assert {p.name for p in marks.iterdir()} == {"ws-A", "ws-C"}
    apps = lb.site_configs["B"].workspace / "flwr-home" / "apps"
    assert not any("control-check" in str(p) and _fab_hash(modified)[:8] in str(p) for p in apps.rglob("*"))
    assert "not installed, not imported, no data read" in lb.log("supernode-B")
    shutil.rmtree(root / "modified")


# ---- without processes ----------------------------------------------------------------------------------


def test_the_proxy_config_forwards_only_the_fleet_api_and_check_flags_an_exposed_control_api(tmp_path, capsys):
    certs = tmp_path / "certs"
    out = tmp_path / "conf.d" / "mdmt.conf"
    rc, _ = _mdmt(capsys, "proxy-config", "--certs", certs, "--out", out)
    text = out.read_text()
    assert rc == 0 and "listen 0.0.0.0:9092 ssl;" in text and "proxy_pass https://127.0.0.1:9091;" in text
    assert "client_max_body_size 64m;" in text and "proxy_ssl_verify on;" in text
    assert [i for i in proxy.check_proxy_text(text) if i[0] != "ok"] == []
    conf = proxy.read_proxy_conf(text)
    assert {(m, p) for m, p, fwd, _ in conf.locations if fwd} == {("^~", "/v1/fleet/"), ("=", "/health")}
    # The same file with the catch-all forwarding too: the Control API is exposed.
    exposed = text.replace('return 403 "not exposed to sites\\n";', "proxy_pass https://127.0.0.1:9091;")
    assert exposed != text
    fails = [i for i in proxy.check_proxy_text(exposed) if i[0] == "FAIL"]
    assert any("location / forwards to the SuperLink" in d for _, _, d in fails), fails
    # `mdmt deploy check --proxy` without the network: NOT READY on the exposed file, one line per problem.
    out.write_text(exposed)
    with pytest.raises(SystemExit) as stop:
        _mdmt(capsys, "check", "--proxy", out, "--offline")
    assert stop.value.code == 1
    assert "NOT READY: control: location / forwards to the SuperLink" in capsys.readouterr().out
    # A wildcard SuperLink address is refused when the config is written, in one line.
    rc, text = _mdmt(capsys, "proxy-config", "--certs", certs, "--superlink", "0.0.0.0:9091", "--print")
    assert rc != 0 and "--superlink 0.0.0.0:9091: the SuperLink's own address" in text and "Traceback" not in text


def test_the_site_registry_maps_keys_to_sites_and_refuses_a_wrong_claim(tmp_path, capsys):
    from mdmt.errors import ConfigError
    from mdmt.fed.identity import check_claim, load_registry, record_node

    path = tmp_path / "sites.json"
    record_node(path, 11, "A", b"key-a")
    record_node(path, 12, "C", b"key-c")
    record_node(path, 13, "C", b"key-c2")  # C's key replaced: the old node id goes
    reg = load_registry(path)
    assert reg == {11: "A", 13: "C"}
    assert check_claim(reg, 11, "A") is None
    assert check_claim(reg, 13, "A") == "node 13 claims site 'A' but its key is registered for site 'C'"
    assert "not in the site registry" in check_claim(reg, 12, "C")
    # A key registered before the registry existed: its node id recorded with the deploy verb.
    (tmp_path / "site-B.pub").write_bytes(b"key-b")
    rc, out = _mdmt(
        capsys,
        "register-site",
        "--site",
        "B",
        "--public-key",
        tmp_path / "site-B.pub",
        "--registry",
        path,
        "--node-id",
        "14",
    )
    assert rc == 0 and load_registry(path) == {11: "A", 13: "C", 14: "B"}, out
    path.write_text("[]")
    with pytest.raises(ConfigError, match="sites.json: no 'nodes' table"):
        load_registry(path)


def test_the_clientapp_check_refuses_another_bundle_before_unpacking_it(tmp_path):
    import types

    from mdmt.client.appguard import AppNotApproved, wrap
    from mdmt.ops.deploy.appguard import install_guard

    approved, other = b"the approved bundle", b"another bundle"
    unpacked = []
    ctx = types.SimpleNamespace(node_config={"site": "B", "approved-app": fab_sha256(approved)})
    flower = types.SimpleNamespace(
        pull_task_input=lambda client: ("msg", ctx, "run", "fab"),
        install_from_fab=lambda content, **kw: unpacked.append(content),
    )
    wrap(flower)
    assert flower.pull_task_input(None) == ("msg", ctx, "run", "fab")
    with pytest.raises(AppNotApproved, match=r"site B runs only the approved app .* no data read"):
        flower.install_from_fab(other, skip_prompt=True)
    flower.install_from_fab(approved, skip_prompt=True)
    assert unpacked == [approved]
    ctx.node_config = {"site": "B"}  # nothing pinned: any bundle
    flower.install_from_fab(other)
    assert unpacked == [approved, other]

    # The folder first on the SuperNode's PATH: our flwr-clientapp, and the other task programs refused.
    folder = install_guard(tmp_path)
    assert "mdmt.client.appguard" in (folder / "flwr-clientapp").read_text()
    res = subprocess.run([str(folder / "flwr-agentapp"), "--token", "t"], capture_output=True, text=True, timeout=30)
    assert res.returncode == 1 and "refused" in res.stderr
