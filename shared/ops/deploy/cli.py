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
- ``submit`` / ``status`` / ``stop``: federated jobs on the deployment (:mod:`mdmt.ops.jobs`).

No Flower app classes here; ``cryptography`` is imported only by the verbs that need it.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

from mdmt.errors import ConfigError
from mdmt.ops.deploy.commands import (
    DEFAULT_CONNECTION,
    command_text,
    exec_command,
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
from mdmt.ops.deploy.siteconfig import (
    DEFAULT_SUPERLINK_PORT,
    DEFAULT_SUPERNODE_PORT,
    DEVICES_HELP,
    SiteConfig,
    check_device,
    load_site_config,
    write_site_config,
)
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


def cmd_connection(a: argparse.Namespace) -> None:
    home = a.flwr_home or os.environ.get("FLWR_HOME") or str(Path.home() / ".flwr")
    path = write_connection(home, a.name, a.address, a.ca)
    print(f"connection '{a.name}' -> {a.address} (TLS, CA {Path(a.ca).expanduser().resolve()}) in {path}")


def cmd_check(a: argparse.Namespace, echo: Callable[[str], None] = print) -> None:
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

    s = sub.add_parser("check", help="at a site: coordinator, TLS, key pair, data, device; ends READY or NOT READY")
    s.add_argument("--config", required=True, help="the site config file")
    s.add_argument("--offline", action="store_true", help="skip the coordinator (data and key only)")
    s.add_argument("--timeout", type=float, default=5.0, help="seconds for the connection checks (default 5)")
    s.add_argument("--sample", type=int, default=5, help="images decoded for statistics (default 5)")
    s.add_argument(
        "--unit-dir",
        default=str(SYSTEMD_UNIT_DIR),
        help=f"where the systemd units are installed, for the network drop-in check (default {SYSTEMD_UNIT_DIR})",
    )
    s.set_defaults(fn=cmd_check)
    add_job_verbs(sub)


def add_arguments(subparsers) -> argparse.ArgumentParser:
    """Add the ``deploy`` verb and its sub-verbs to the ``mdmt`` sub-parsers; each sub-verb sets ``fn``."""
    p = subparsers.add_parser("deploy", help="certificates, site keys and configs, service commands, site checks")
    _add_verbs(p.add_subparsers(dest="deploy_verb", required=True, metavar="VERB"))
    return p
