"""``mdmt deploy``: what a coordinator and a hospital install.

- ``certs``: a CA and the SuperLink's TLS certificate (SANs given by the user), and their rotation; the CA
  key is kept in its own folder, apart from the one the SuperLink reads;
- ``site-key``: a site's SuperNode authentication key (ECDSA P-384, OpenSSH format);
- ``site-config``: a site config file (site, data folder, device, coordinator, CA, key, workspace);
- ``site-network``: the systemd drop-in that lets a site's SuperNode unit reach only the coordinator;
- ``supernode-cmd`` / ``superlink-cmd``: the ``flower-supernode`` / ``flower-superlink`` command lines
  (printed, or executed in place, which is what the systemd units and the compose file do);
- ``connection``: the SuperLink connection the ``flwr`` CLI uses (``flwr run``, ``flwr supernode register``);
- ``check``: run at a site before joining: coordinator (TCP, TLS against the CA), key pair, data, device;
  with ``--proxy`` at the coordinator: the nginx config in front of the SuperLink (:mod:`mdmt.ops.deploy.proxy`);
- ``proxy-config`` / ``proxy-cmd``: that nginx config (the sites reach the Fleet API only; the Control API
  stays on the SuperLink's loopback port for the operator), written for Debian's nginx or run in the foreground;
- ``register-site``: register a site's key and record its node id in the site registry (:mod:`mdmt.fed.identity`);
- ``app-hash``: the sha256 of an app bundle, which a site pins as ``approved-app`` (:mod:`mdmt.ops.deploy.appguard`);
- ``submit`` / ``status`` / ``stop``: federated jobs on the deployment (:mod:`mdmt.ops.jobs`).

No Flower app classes here; ``cryptography`` is imported only by the verbs that need it.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from mdmt.errors import ConfigError
from mdmt.fed.approved import fab_sha256
from mdmt.ops.deploy.commands import (
    DEFAULT_CONNECTION,
    command_text,
    exec_command,
    register_site,
    superlink_command,
    supernode_command,
    write_connection,
)
from mdmt.ops.deploy.files import (
    CA_BUNDLE,
    CA_CERT,
    CA_KEY,
    SERVER_CERT,
    SERVER_KEY,
    default_ca_dir,
    site_key_paths,
)
from mdmt.ops.deploy.network import DROPIN_NAME, SYSTEMD_UNIT_DIR, network_dropin, write_network_dropin
from mdmt.ops.deploy.proxy import (
    DEFAULT_OPERATOR_PORT,
    DEFAULT_PROXY_CONF,
    ProxySettings,
    check_proxy,
    nginx_argv,
    server_block,
    write_proxy_config,
    write_standalone,
)
from mdmt.ops.deploy.siteconfig import (
    DEFAULT_SUPERLINK_PORT,
    DEFAULT_SUPERNODE_PORT,
    DEVICES_HELP,
    SiteConfig,
    check_device,
    check_site_name,
    load_site_config,
    write_site_config,
)
from mdmt.ops.flwr_app import flwr_app_dir
from mdmt.ops.jobs import add_job_verbs


def cmd_certs(a: argparse.Namespace) -> None:
    from mdmt.ops.deploy.pki import make_certs  # deferred: cryptography (only the certs and site-key verbs need it)

    w = make_certs(
        a.out, a.san or [], days=a.days, ca_days=a.ca_days, rotate=a.rotate, new_ca=a.new_ca, ca_dir=a.ca_dir or None
    )
    out, key = Path(w["out"]), Path(w["ca_key"])
    for moved in w.get("moved", []):
        print(f"moved the CA key {moved} into {w['ca_dir']}: the folder the SuperLink reads no longer holds it")
    print(f"CA: {out / CA_CERT} ({w['ca']}; valid until {w['ca_not_after']}), key {key} (not in {out})")
    print(f"SuperLink certificate: {out / SERVER_CERT}, key {out / SERVER_KEY} (valid until {w['server_not_after']})")
    print(f"  names: {', '.join(w['sans'])}")
    if w.get("archived"):
        print(f"replaced files moved to {w['archived']}")
    if w.get("archived_key"):
        print(f"the replaced CA key moved to {w['archived_key']}")
    if w.get("bundle"):
        print(f"CA bundle (new + previous CA) for sites during the switch: {w['bundle']}")
    print(
        f"the SuperLink reads {out}; sites need only {out / (CA_BUNDLE if w.get('bundle') else CA_CERT)}; "
        f"keep {key} offline when not issuing certificates"
    )


def cmd_site_key(a: argparse.Namespace) -> None:
    from mdmt.ops.deploy.pki import check_key_pair, make_site_key  # deferred: cryptography (certs/site-key only)

    private, public = make_site_key(a.site, a.out, force=a.force)
    print(f"private key: {private} (keep it at the site, mode 600)")
    print(f"public key:  {public}  {check_key_pair(private).rsplit(', ', 1)[1]}")
    print("send the public key to the coordinator, who registers it:")
    print(f"  flwr supernode register {public.name} {DEFAULT_CONNECTION} --name {a.site}")


def cmd_site_config(a: argparse.Namespace) -> None:
    out = Path(a.out).expanduser().resolve()
    key = Path(a.key).expanduser() if a.key else site_key_paths(out.parent, a.site)[0]

    def absolute(p: str | Path) -> Path:
        return Path(p).expanduser().resolve()

    cfg = SiteConfig(
        site=a.site,
        data_dir=absolute(a.data_dir),
        coordinator=a.coordinator,
        ca=absolute(a.ca),
        key=absolute(key),
        workspace=absolute(a.workspace or out.parent / "workspace"),
        cache_dir=absolute(a.cache_dir) if a.cache_dir else None,
        device=a.device,
        supernode_port=a.supernode_port,
        approved_app=a.approved_app,
        source="mdmt deploy site-config",
    )
    check_device(cfg.device)
    write_site_config(cfg, out, force=a.force)
    print(f"wrote {out}")
    print(f"next: mdmt deploy check --config {out}")
    print(f"with the systemd unit: mdmt deploy site-network {out} (as root: the unit may reach the coordinator)")


def cmd_site_network(a: argparse.Namespace) -> None:
    cfg = load_site_config(Path(a.config).expanduser().absolute())  # the drop-in names the file it came from
    named = Path(a.config).name
    if named.startswith("site-") and named.endswith(".toml") and named[5:-5] != cfg.site:
        raise ConfigError(
            f"{cfg.source}: the unit mdmt-supernode@{named[5:-5]} reads this file but its 'site' is "
            f"{cfg.site!r}; make them agree (the drop-in is named after 'site')"
        )
    if a.print:
        print(network_dropin(cfg, a.allow or [])[0], end="")
        return
    path, addresses = write_network_dropin(cfg, a.unit_dir, a.allow or [])
    reach = f"{', '.join(addresses)} and loopback" if addresses else "loopback"
    print(f"wrote {path}: mdmt-supernode@{cfg.site} may reach {reach} only")
    print(f"next: systemctl daemon-reload && systemctl restart mdmt-supernode@{cfg.site}")


def cmd_supernode_cmd(a: argparse.Namespace) -> None:
    cfg = load_site_config(a.config)
    argv, env = supernode_command(cfg)
    if a.exec:
        exec_command(argv, env, [cfg.workspace])
    print(command_text(argv, env))


def cmd_superlink_cmd(a: argparse.Namespace) -> None:
    argv, env = superlink_command(a.certs, a.state_dir, host=a.host, port=a.port, database=not a.in_memory)
    stray = Path(a.certs).expanduser() / CA_KEY
    if stray.exists():
        ca_dir = default_ca_dir(a.certs)
        print(
            f"warning: {stray}: the CA key is in the folder the SuperLink reads; move it out: "
            f"install -d -m 700 {ca_dir} && mv {stray} {ca_dir}/",
            file=sys.stderr,
        )
    if a.exec:
        exec_command(argv, env, [Path(a.state_dir).expanduser()])
    print(command_text(argv, env))


def _proxy_settings(a: argparse.Namespace) -> ProxySettings:
    return ProxySettings(
        listen=a.listen,
        superlink=a.superlink,
        certs=Path(a.certs).expanduser().resolve(),
        max_body_mb=a.max_body_mb,
        timeout_s=a.proxy_timeout,
    ).validate()


def cmd_proxy_config(a: argparse.Namespace) -> None:
    settings = _proxy_settings(a)
    if a.print:
        print(server_block(settings), end="")
        return
    path = write_proxy_config(settings, a.out, force=a.force)
    print(f"wrote {path}: sites reach {settings.listen} (Fleet API and /health only); the SuperLink stays on")
    print(f"  {settings.superlink}, where the operator's flwr reaches the Control API")
    print(f"next: nginx -t && systemctl reload nginx; then mdmt deploy check --proxy {path}")


def cmd_proxy_cmd(a: argparse.Namespace) -> None:
    settings = _proxy_settings(a)
    prefix = Path(a.prefix).expanduser().resolve()
    argv = nginx_argv(prefix / "nginx.conf", prefix)
    if a.exec:
        write_standalone(settings, prefix)
        exec_command(argv, {}, [prefix])
    print(command_text(argv, {}))


def cmd_register_site(a: argparse.Namespace) -> None:
    if a.node_id:  # a key registered before (flwr supernode register): record its node id only
        # deferred: the registry module is needed by this branch only
        from mdmt.fed.identity import record_node

        check_site_name(a.site)
        try:
            key = Path(a.public_key).expanduser().read_bytes()
        except OSError as exc:
            raise ConfigError(f"--public-key {a.public_key}: cannot be read ({exc.strerror or exc})") from None
        record_node(a.registry, a.node_id, a.site, key)
        print(f"site {a.site}: node {a.node_id} recorded in {a.registry} (not registered again)")
    else:
        node = register_site(a.public_key, a.site, a.connection, a.registry)
        print(f"site {a.site}: key {a.public_key} registered as node {node}; recorded in {a.registry}")
    print(f"runs check the sites' claims with the run config key site-registry = {str(a.registry)!r}")


def cmd_app_hash(a: argparse.Namespace) -> None:
    if not a.app:  # the app `mdmt deploy submit` sends, as this installed version writes it
        with tempfile.TemporaryDirectory() as tmp:
            print(_built_hash(flwr_app_dir(Path(tmp))))
        return
    path = Path(a.app).expanduser().resolve()
    if path.is_file():
        print(fab_sha256(path.read_bytes()))
        return
    if not (path / "pyproject.toml").is_file():
        raise ConfigError(f"{path}: neither an app folder (with pyproject.toml) nor a .fab file")
    print(_built_hash(path))


def _built_hash(path: Path) -> str:
    with tempfile.TemporaryDirectory() as tmp:  # `flwr build`: the very bytes `flwr run` sends
        res = subprocess.run(
            [_flwr(), "build", "--app", str(path)], cwd=tmp, capture_output=True, text=True, stdin=subprocess.DEVNULL
        )
        fabs = list(Path(tmp).glob("*.fab"))
        if res.returncode != 0 or len(fabs) != 1:
            detail = " ".join((res.stdout + res.stderr).split())[-300:]
            raise ConfigError(f"{path}: flwr build failed: {detail}")
        return fab_sha256(fabs[0].read_bytes())


def _flwr() -> str:
    cand = Path(sys.executable).parent / "flwr"
    return str(cand) if cand.exists() else "flwr"


def cmd_connection(a: argparse.Namespace) -> None:
    home = a.flwr_home or os.environ.get("FLWR_HOME") or str(Path.home() / ".flwr")
    path = write_connection(home, a.name, a.address, a.ca)
    print(f"connection '{a.name}' -> {a.address} (TLS, CA {Path(a.ca).expanduser().resolve()}) in {path}")


def cmd_check(a: argparse.Namespace, echo: Callable[[str], None] = print) -> None:
    if not a.config and not a.proxy:
        raise ConfigError("mdmt deploy check: give --config SITE.toml (at a site) or --proxy NGINX.conf (coordinator)")
    if a.proxy:
        cmd_check_proxy(a, echo)
    if a.config:
        cmd_check_site(a, echo)


def cmd_check_proxy(a: argparse.Namespace, echo: Callable[[str], None] = print) -> None:
    from mdmt.ops.deploy.checks import CheckReport  # deferred: pydicom and pandas (the site checks' imports)

    report = CheckReport("coordinator")
    for item in check_proxy(a.proxy, network=not a.offline, timeout=a.timeout):
        report.add(*item)
    echo(f"mdmt deploy check: the proxy in front of the SuperLink ({a.proxy})")
    for line in report.lines():
        echo(line)
    if not report.ready:
        sys.stdout.flush()
        raise SystemExit(1)


def cmd_check_site(a: argparse.Namespace, echo: Callable[[str], None] = print) -> None:
    cfg = load_site_config(a.config)
    echo(f"mdmt deploy check: site {cfg.site} ({cfg.source})")
    # deferred: pydicom and pandas (mdmt.ops.deploy.checks reads the site's images); building the parser needs neither
    from mdmt.ops.deploy.checks import check_site

    report = check_site(cfg, network=not a.offline, timeout=a.timeout, sample=a.sample, unit_dir=a.unit_dir)
    for line in report.lines():
        echo(line)
    if not report.ready:
        sys.stdout.flush()
        raise SystemExit(1)


def _add_verbs(sub) -> None:
    s = sub.add_parser("certs", help="create the CA and the SuperLink's TLS certificate, or rotate them")
    s.add_argument(
        "--out", required=True, help="the folder the SuperLink reads: ca.pem, server.pem, server.key (never ca.key)"
    )
    s.add_argument(
        "--ca-dir",
        default="",
        help="the CA key's folder, mode 700, apart from --out (default: <out>-ca, e.g. /etc/mdmt/certs-ca); "
        "a ca.key found in --out is moved there",
    )
    s.add_argument(
        "--san",
        action="append",
        metavar="DNS:NAME|IP:ADDR",
        help="a name sites use to reach the SuperLink (repeatable); localhost and 127.0.0.1 are always "
        "added; on --rotate the current certificate's names are kept when none is given",
    )
    s.add_argument("--days", type=int, default=397, help="server certificate lifetime in days (default 397)")
    s.add_argument("--ca-days", type=int, default=3650, help="CA lifetime in days (default 3650)")
    s.add_argument("--rotate", action="store_true", help="new server key and certificate from the same CA")
    s.add_argument("--new-ca", action="store_true", help="new CA too; writes ca-bundle.pem (new + previous CA)")
    s.set_defaults(fn=cmd_certs)

    s = sub.add_parser("site-key", help="create a site's SuperNode key pair (ECDSA P-384, OpenSSH format)")
    s.add_argument("--site", required=True)
    s.add_argument("--out", required=True, help="folder for site-<SITE> and site-<SITE>.pub")
    s.add_argument("--force", action="store_true", help="replace an existing key (it must be registered again)")
    s.set_defaults(fn=cmd_site_key)

    s = sub.add_parser("site-config", help="write a site config file (site, data, coordinator, CA, key, device)")
    s.add_argument("--site", required=True, help="the site name the coordinator sees")
    s.add_argument("--data-dir", required=True, help="the site folder (manifest.csv and images)")
    s.add_argument("--coordinator", required=True, metavar="HOST:PORT", help="the SuperLink's address")
    s.add_argument("--ca", required=True, help="the federation CA certificate (ca.pem)")
    s.add_argument("--key", default="", help="the site's private key (default: site-<SITE> next to --out)")
    s.add_argument("--workspace", default="", help="the site's own output folder (default: workspace/ next to --out)")
    s.add_argument("--cache-dir", default="", help="image cache folder (default: <workspace>/cache)")
    s.add_argument("--device", default="auto", help=f"{DEVICES_HELP} (default auto)")
    s.add_argument(
        "--supernode-port",
        type=int,
        default=DEFAULT_SUPERNODE_PORT,
        help=f"the SuperNode's local API port (default {DEFAULT_SUPERNODE_PORT}; unique per host)",
    )
    s.add_argument(
        "--approved-app",
        default="",
        metavar="SHA256",
        help="the only app bundle this site runs ('mdmt deploy app-hash APP'); empty: any app the SuperLink sends",
    )
    s.add_argument("--out", required=True, help="the config file to write, e.g. /etc/mdmt/site-A.toml")
    s.add_argument("--force", action="store_true", help="replace an existing file")
    s.set_defaults(fn=cmd_site_config)

    s = sub.add_parser(
        "site-network", help="write the systemd drop-in that lets a site's unit reach only the coordinator"
    )
    s.add_argument("config", help="a site config file")
    s.add_argument(
        "--allow",
        action="append",
        metavar="IP[/PREFIX]",
        help="another address the unit may reach (repeatable), e.g. the coordinator's when its name does not "
        "resolve here",
    )
    s.add_argument(
        "--unit-dir",
        default=str(SYSTEMD_UNIT_DIR),
        help=f"where the units are installed (default {SYSTEMD_UNIT_DIR}); writes mdmt-supernode@SITE.service.d/"
        f"{DROPIN_NAME} there",
    )
    s.add_argument("--print", action="store_true", help="print the drop-in instead of writing it")
    s.set_defaults(fn=cmd_site_network)

    s = sub.add_parser("supernode-cmd", help="print (or --exec) the site's flower-supernode command")
    s.add_argument("config", help="a site config file")
    s.add_argument("--exec", action="store_true", help="replace this process with the SuperNode (systemd, compose)")
    s.set_defaults(fn=cmd_supernode_cmd)

    s = sub.add_parser("superlink-cmd", help="print (or --exec) the coordinator's flower-superlink command")
    s.add_argument("--certs", required=True, help="the folder of 'mdmt deploy certs'")
    s.add_argument("--state-dir", required=True, help="SuperLink state: state.db, flwr-home/, uv-cache/")
    s.add_argument("--host", default="0.0.0.0", help="address to bind (default 0.0.0.0)")
    s.add_argument("--port", type=int, default=DEFAULT_SUPERLINK_PORT, help=f"default {DEFAULT_SUPERLINK_PORT}")
    s.add_argument("--in-memory", action="store_true", help="keep no state database (runs are lost on restart)")
    s.add_argument("--exec", action="store_true", help="replace this process with the SuperLink (systemd, compose)")
    s.set_defaults(fn=cmd_superlink_cmd)

    s = sub.add_parser("connection", help="add the SuperLink connection that 'flwr run' / 'flwr supernode' use")
    s.add_argument("--address", required=True, metavar="HOST:PORT")
    s.add_argument("--ca", required=True, help="the federation CA certificate")
    s.add_argument("--name", default=DEFAULT_CONNECTION, help=f"connection name (default {DEFAULT_CONNECTION})")
    s.add_argument("--flwr-home", default="", help="default: $FLWR_HOME or ~/.flwr")
    s.set_defaults(fn=cmd_connection)

    s = sub.add_parser(
        "check",
        help="at a site: coordinator, TLS, key pair, data, device; at the coordinator (--proxy): the control "
        "plane; ends READY or NOT READY",
    )
    s.add_argument("--config", default="", help="the site config file")
    s.add_argument(
        "--proxy",
        default="",
        metavar="NGINX_CONF",
        help="at the coordinator: the nginx config of 'mdmt deploy proxy-config' (only the Fleet API exposed, "
        "the SuperLink not on a public address, and a live probe that a Control API call is refused)",
    )
    s.add_argument("--offline", action="store_true", help="skip the coordinator (data and key only)")
    s.add_argument("--timeout", type=float, default=5.0, help="seconds for the connection checks (default 5)")
    s.add_argument("--sample", type=int, default=5, help="images decoded for statistics (default 5)")
    s.add_argument(
        "--unit-dir",
        default=str(SYSTEMD_UNIT_DIR),
        help=f"where the systemd units are installed, for the network drop-in check (default {SYSTEMD_UNIT_DIR})",
    )
    s.set_defaults(fn=cmd_check)

    def proxy_arguments(s) -> None:
        s.add_argument(
            "--certs", required=True, help="the folder of 'mdmt deploy certs' (server.pem, server.key, ca.pem)"
        )
        s.add_argument(
            "--listen",
            default=f"0.0.0.0:{DEFAULT_SUPERLINK_PORT}",
            metavar="HOST:PORT",
            help=f"where the sites connect (default 0.0.0.0:{DEFAULT_SUPERLINK_PORT})",
        )
        s.add_argument(
            "--superlink",
            default=f"127.0.0.1:{DEFAULT_OPERATOR_PORT}",
            metavar="HOST:PORT",
            help=f"the SuperLink (superlink-cmd --host/--port; default 127.0.0.1:{DEFAULT_OPERATOR_PORT})",
        )
        s.add_argument("--max-body-mb", type=int, default=64, help="largest request body in MB (default 64)")
        s.add_argument("--proxy-timeout", type=int, default=600, help="read/send timeouts in seconds (default 600)")

    s = sub.add_parser(
        "proxy-config",
        help="write the nginx config that exposes only the Fleet API to the sites (the SuperLink on loopback)",
    )
    proxy_arguments(s)
    s.add_argument("--out", default=str(DEFAULT_PROXY_CONF), help=f"default {DEFAULT_PROXY_CONF}")
    s.add_argument("--force", action="store_true", help="replace an existing file")
    s.add_argument("--print", action="store_true", help="print the config instead of writing it")
    s.set_defaults(fn=cmd_proxy_config)

    s = sub.add_parser(
        "proxy-cmd", help="print (or --exec) nginx in the foreground on its own config (containers, tests)"
    )
    proxy_arguments(s)
    s.add_argument("--prefix", default="/tmp/mdmt-nginx", help="nginx's config, pid, logs and temp files")
    s.add_argument("--exec", action="store_true", help="write the config and replace this process with nginx")
    s.set_defaults(fn=cmd_proxy_cmd)

    s = sub.add_parser(
        "register-site",
        help="register a site's public key with the SuperLink (flwr supernode register) and record its node id "
        "for the site in the site registry",
    )
    s.add_argument("--site", required=True)
    s.add_argument("--public-key", required=True, help="the site's site-<SITE>.pub")
    s.add_argument(
        "--registry", required=True, help="the site registry file, e.g. /var/lib/mdmt-coordinator/sites.json"
    )
    s.add_argument(
        "--connection", default=DEFAULT_CONNECTION, help=f"the operator's connection (default {DEFAULT_CONNECTION})"
    )
    s.add_argument(
        "--node-id",
        type=int,
        default=0,
        help="record a key registered before (its node id from 'flwr supernode list') instead of registering it",
    )
    s.set_defaults(fn=cmd_register_site)

    s = sub.add_parser("app-hash", help="print the sha256 of an app bundle (a site's 'approved-app')")
    s.add_argument(
        "app",
        nargs="?",
        default="",
        help="an app folder (the bundle flwr run builds from it) or a .fab file; default: the app "
        "'mdmt deploy submit' sends, as this installed version writes it",
    )
    s.set_defaults(fn=cmd_app_hash)
    add_job_verbs(sub)


def add_arguments(subparsers) -> argparse.ArgumentParser:
    """Add the ``deploy`` verb and its sub-verbs to the ``mdmt`` sub-parsers; each sub-verb sets ``fn``."""
    p = subparsers.add_parser("deploy", help="certificates, site keys and configs, service commands, site checks")
    _add_verbs(p.add_subparsers(dest="deploy_verb", required=True, metavar="VERB"))
    return p
