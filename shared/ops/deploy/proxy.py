"""The operator-only control plane: an nginx reverse proxy (Debian's nginx) in front of the SuperLink.

Flower 1.42's SuperLink serves the Control API (``/v1/control/``: submit, stop and list runs, register
SuperNode keys; no user authentication in the open-source build), the Fleet API (``/v1/fleet/``), the
ServerApp's runtime API (``/v1/runtime/``) and ``/health``, ``/docs``, ``/openapi.json`` on ONE host:port
(``flwr/superlink/main.py``, ``create_app``). A SuperNode calls only the Fleet API
(``flwr/supernode/fleet_http_client.py``: register/activate/deactivate/unregister-node, heartbeat,
pull/push-messages, get-run, get-fab, push/pull-object, confirm-message-received), and ``mdmt deploy check``
at a site reads ``/health``. So:

- the SuperLink listens on loopback (or the operator's network) only, where the operator's ``flwr`` reaches
  the Control API;
- nginx listens on the sites' address, terminates TLS with the federation's server certificate, and
  forwards ``/v1/fleet/`` and ``= /health`` to the SuperLink over TLS on loopback (the same certificate,
  verified against the federation CA under the name ``localhost``, which ``mdmt deploy certs`` always
  adds); every other path is answered 403 by nginx itself.

SuperNode authentication goes through untouched: a node signs a timestamp with its key and sends it in the
``flwr-public-key``, ``flwr-signature`` and ``flwr-timestamp`` headers
(``flwr/supernode/node_auth_http_interceptor.py``), which nginx forwards as they are (no underscores).
Messages travel in objects of at most 5 MiB (``FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE``) and app bundles of at
most 10 MB; the body limit and timeouts below leave room for both, and bodies are streamed, not buffered.
"""

from __future__ import annotations

import ipaddress
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from mdmt.errors import ConfigError, MDMTError
from mdmt.ops.deploy.files import CA_CERT, SERVER_CERT, SERVER_KEY, make_dir, write_public
from mdmt.ops.deploy.siteconfig import DEFAULT_SUPERLINK_PORT, format_address, parse_address

FLEET_PREFIX = "/v1/fleet/"
HEALTH = "/health"
CONTROL_PROBE = "/v1/control/list-runs"  # a Control API call the proxy must refuse
DEFAULT_OPERATOR_PORT = 9091  # the SuperLink behind the proxy; the sites keep DEFAULT_SUPERLINK_PORT
DEFAULT_PROXY_CONF = Path("/etc/nginx/conf.d/mdmt-superlink.conf")
UPSTREAM_NAME = "localhost"  # the name nginx verifies the SuperLink's certificate against
REFUSED_TEXT = "not exposed to sites"
TEMP_KINDS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")


@dataclass(frozen=True)
class ProxySettings:
    """What the proxy config is written from: the sites' address, the SuperLink's, the certificate folder."""

    listen: str = f"0.0.0.0:{DEFAULT_SUPERLINK_PORT}"
    superlink: str = f"127.0.0.1:{DEFAULT_OPERATOR_PORT}"
    certs: Path = Path("/etc/mdmt/certs")
    max_body_mb: int = 64
    timeout_s: int = 600

    def validate(self) -> ProxySettings:
        lhost, lport = parse_address(self.listen, "--listen")
        shost, sport = parse_address(self.superlink, "--superlink")
        if (lhost, lport) == (shost, sport):
            raise ConfigError(f"--listen {self.listen} and --superlink {self.superlink}: must differ")
        if _is_wildcard(shost):
            raise ConfigError(
                f"--superlink {self.superlink}: the SuperLink's own address (loopback, e.g. 127.0.0.1:"
                f"{DEFAULT_OPERATOR_PORT}), not a wildcard"
            )
        for name in (SERVER_CERT, SERVER_KEY, CA_CERT):
            path = Path(self.certs) / name
            if any(c in str(path) for c in ";{}\"'\n\\ "):
                raise ConfigError(f"--certs {self.certs}: use a path without spaces, quotes, ';' or braces")
        if not 1 <= self.max_body_mb <= 1024 or not 30 <= self.timeout_s <= 86400:
            raise ConfigError("--max-body-mb must be 1-1024 and --timeout 30-86400 seconds")
        return self


def _is_wildcard(host: str) -> bool:
    return host in ("0.0.0.0", "::", "*", "")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def server_block(s: ProxySettings, access_log: str = "", error_log: str = "") -> str:
    """The nginx ``server`` block (http context; what goes into /etc/nginx/conf.d/)."""
    s = s.validate()
    certs = Path(s.certs)
    shost, sport = parse_address(s.superlink)
    upstream = f"https://{format_address(shost, sport)}"
    lhost, lport = parse_address(s.listen)
    listen = f"[{lhost}]:{lport}" if ":" in lhost else f"{lhost}:{lport}"
    forward = [
        f"        proxy_pass {upstream};",
        "        proxy_http_version 1.1;",
        '        proxy_set_header Connection "";',
        "        proxy_set_header X-Forwarded-For $remote_addr;",
        "        proxy_ssl_verify on;",
        f"        proxy_ssl_trusted_certificate {certs / CA_CERT};",
        f"        proxy_ssl_name {UPSTREAM_NAME};",
        "        proxy_ssl_server_name on;",
        "        proxy_request_buffering off;",
        "        proxy_buffering off;",
    ]
    lines = [
        "# Written by 'mdmt deploy proxy-config': the sites reach the SuperLink's Fleet API (and /health) here;",
        "# the Control API (/v1/control/), the ServerApp runtime API and everything else are refused (403).",
        f"# The SuperLink listens on {s.superlink} only, where the operator's flwr CLI reaches it.",
        "server {",
        f"    listen {listen} ssl;",
        "    server_name _;",
        f"    ssl_certificate {certs / SERVER_CERT};",
        f"    ssl_certificate_key {certs / SERVER_KEY};",
        "    ssl_protocols TLSv1.2 TLSv1.3;",
        f"    client_max_body_size {s.max_body_mb}m;",
        "    proxy_connect_timeout 30s;",
        f"    proxy_read_timeout {s.timeout_s}s;",
        f"    proxy_send_timeout {s.timeout_s}s;",
        f"    client_body_timeout {s.timeout_s}s;",
        f"    send_timeout {s.timeout_s}s;",
    ]
    if access_log:
        lines.append(f"    access_log {access_log};")
    if error_log:
        lines.append(f"    error_log {error_log};")
    lines += [f"    location ^~ {FLEET_PREFIX} {{", *forward, "    }"]
    lines += [f"    location = {HEALTH} {{", *forward, "    }"]
    lines += ["    location / {", f'        return 403 "{REFUSED_TEXT}\\n";', "    }", "}"]
    return "\n".join(lines) + "\n"


def standalone_conf(s: ProxySettings, prefix: str | Path) -> str:
    """A whole nginx.conf that runs in the foreground under ``prefix`` (no root needed for a high port):
    what :class:`mdmt.ops.deploy.loopback.Loopback` starts."""
    prefix = Path(prefix)
    temp = "\n".join(
        f"    {kind}_temp_path {prefix / 'tmp' / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    block = server_block(s, access_log=str(prefix / "access.log"), error_log=str(prefix / "error.log"))
    return (
        f"pid {prefix / 'nginx.pid'};\n"
        f"error_log {prefix / 'error.log'};\n"
        "events { worker_connections 256; }\n"
        "worker_processes 1;\n"
        "http {\n"
        f"{temp}\n"
        "    default_type application/octet-stream;\n"
        + "".join(f"    {line}\n" if line else "\n" for line in block.splitlines())
        + "}\n"
    )


def write_proxy_config(s: ProxySettings, out: str | Path, force: bool = False) -> Path:
    out = Path(out).expanduser()
    text = server_block(s)
    if out.exists() and not force:
        raise ConfigError(f"{out} already exists; pass --force to replace it")
    make_dir(out.parent, "nginx config")
    try:
        write_public(out, text.encode())
    except OSError as exc:
        raise MDMTError(f"{out}: cannot be written ({exc.strerror or exc}); run as root or pass --print") from None
    return out


def nginx_binary() -> str | None:
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if Path(p).is_file()), None
    )


def nginx_argv(conf: str | Path, prefix: str | Path) -> list[str]:
    """nginx in the foreground on a standalone config (:func:`write_standalone`), its errors on stderr."""
    nginx = nginx_binary()
    if not nginx:
        raise MDMTError("nginx is not installed; install Debian's: apt-get install -y nginx")
    return [nginx, "-e", "stderr", "-p", str(prefix), "-c", str(conf), "-g", "daemon off;"]


def write_standalone(s: ProxySettings, prefix: str | Path) -> Path:
    """``<prefix>/nginx.conf`` (:func:`standalone_conf`) and nginx's temp folders; returns the config."""
    prefix = Path(prefix)
    for kind in TEMP_KINDS:
        make_dir(prefix / "tmp" / kind, "nginx")
    conf = prefix / "nginx.conf"
    conf.write_text(standalone_conf(s, prefix))
    return conf


# ---- the check ------------------------------------------------------------------------------------------
_LOCATION = re.compile(r"location\s+(=|\^~|~\*?)?\s*(\S+)\s*\{([^{}]*)\}", re.S)
_LISTEN = re.compile(r"^\s*listen\s+([^;]+);", re.M)
_PROXY_PASS = re.compile(r"proxy_pass\s+(\w+)://([^;/\s]+)")


@dataclass(frozen=True)
class ProxyConf:
    """What :func:`read_proxy_conf` found in an nginx config."""

    listens: list[tuple[str, int, bool]]  # (host, port, ssl)
    locations: list[tuple[str, str, bool, str]]  # (modifier, path, forwards, upstream host:port)
    unread: int  # location blocks with nested blocks (not checked)


def read_proxy_conf(text: str) -> ProxyConf:
    text = re.sub(r"#[^\n]*", "", text)
    listens = []
    for m in _LISTEN.finditer(text):
        words = m.group(1).split()
        addr = words[0]
        if addr.isdigit():
            host, port = "0.0.0.0", int(addr)
        else:
            host, port = parse_address(addr.replace("*", "0.0.0.0"), "listen")
        listens.append((host, port, "ssl" in words[1:]))
    locations = []
    for m in _LOCATION.finditer(text):
        pp = _PROXY_PASS.search(m.group(3))
        locations.append((m.group(1) or "", m.group(2), pp is not None, pp.group(2) if pp else ""))
    unread = len(re.findall(r"\blocation\b", text)) - len(locations)
    return ProxyConf(listens, locations, unread)


def _exposed(modifier: str, path: str) -> str | None:
    """Why a forwarding location exposes more than the sites need, or None."""
    if modifier == "=" and path == HEALTH:
        return None
    if modifier in ("", "^~") and path.startswith(FLEET_PREFIX):
        return None
    named = f"{modifier} {path}".strip()
    return f"location {named} forwards to the SuperLink (only {FLEET_PREFIX} and = {HEALTH} may)"


def check_proxy_text(text: str) -> list[tuple[str, str, str]]:
    """(status, topic, detail) items about an nginx config in front of the SuperLink."""
    ok, fail, warn = "ok", "FAIL", "warn"
    conf = read_proxy_conf(text)
    items: list[tuple[str, str, str]] = []
    if not conf.listens:
        items.append((fail, "listen", "no listen directive"))
    for host, port, tls in conf.listens:
        where = format_address(host, port)
        items.append((ok, "listen", f"{where} with TLS") if tls else (fail, "listen", f"{where} without 'ssl'"))
    if conf.unread:
        items.append((warn, "locations", f"{conf.unread} location block(s) with nested blocks were not checked"))
    forwards = [loc for loc in conf.locations if loc[2]]
    bad = [why for loc in forwards if (why := _exposed(loc[0], loc[1]))]
    items += [(fail, "control", why) for why in bad]
    catch_all = [loc for loc in conf.locations if loc[0] == "" and loc[1] == "/"]
    if not catch_all or catch_all[0][2]:
        items.append((fail, "control", "no 'location /' answering 403: paths not named are not refused explicitly"))
    elif not bad:
        items.append((ok, "control", f"only {FLEET_PREFIX} and {HEALTH} are forwarded; everything else 403"))
    if not any(loc[1].startswith(FLEET_PREFIX) for loc in forwards):
        items.append((fail, "fleet", f"{FLEET_PREFIX} is not forwarded: SuperNodes cannot connect"))
    for up in sorted({loc[3] for loc in forwards}):
        host, _ = parse_address(up, "proxy_pass")
        if _is_loopback(host):
            items.append((ok, "upstream", f"the SuperLink at {up} (loopback)"))
        else:
            items.append((warn, "upstream", f"the SuperLink at {up}: make sure only the operator's network reaches it"))
    return items


def listening(port: int) -> list[str]:
    """The local addresses a TCP socket listens on at ``port`` (from /proc/net/tcp and tcp6)."""
    found = []
    for name, v6 in (("tcp", False), ("tcp6", True)):
        try:
            rows = Path(f"/proc/net/{name}").read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            cols = row.split()
            if len(cols) < 4 or cols[3] != "0A":  # LISTEN
                continue
            hexaddr, hexport = cols[1].split(":")
            if int(hexport, 16) != port:
                continue
            raw = bytes.fromhex(hexaddr)
            if v6:
                raw = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
                found.append(str(ipaddress.IPv6Address(raw)))
            else:
                found.append(str(ipaddress.IPv4Address(raw[::-1])))
    return sorted(set(found))


def check_superlink_bind(superlink: str) -> tuple[str, str, str]:
    """Whether the SuperLink behind the proxy listens on a public (wildcard) address."""
    host, port = parse_address(superlink, "proxy_pass")
    addrs = listening(port)
    if not addrs:
        return "warn", "superlink", f"nothing listens on port {port} here (is the SuperLink running?)"
    public = [a for a in addrs if a in ("0.0.0.0", "::")]
    if public:
        return (
            "FAIL",
            "superlink",
            f"listens on {', '.join(public)} port {port}: every network of this host reaches the Control API; "
            f"start it with --host 127.0.0.1 (mdmt deploy superlink-cmd --host 127.0.0.1 --port {port})",
        )
    other = [a for a in addrs if not _is_loopback(a)]
    if other:
        return "warn", "superlink", f"listens on {', '.join(other)}: make sure only the operator's network reaches it"
    return "ok", "superlink", f"listens on {', '.join(addrs)} port {port} only"


def probe(listen: str, timeout: float = 5.0) -> list[tuple[str, str, str]]:
    """Ask the proxy, as a site would, for a Control API call (must be 403) and /health (must be 200)."""
    import httpx  # deferred: httpx (about 0.4 s to import); only the live probe uses it

    host, port = parse_address(listen, "listen")
    where = format_address("127.0.0.1" if _is_wildcard(host) else host, port)
    # No certificate check here: the probe sends nothing secret and only reads status codes.
    try:
        with httpx.Client(verify=False, timeout=timeout) as client:
            control = client.post(f"https://{where}{CONTROL_PROBE}", content=b"")
            health = client.get(f"https://{where}{HEALTH}")
    except httpx.HTTPError as exc:
        return [("warn", "probe", f"{where} not reached ({exc.__class__.__name__}); the live check was skipped")]
    items = [
        ("ok", "probe", f"{CONTROL_PROBE} on {where}: refused (403)")
        if control.status_code == 403
        else ("FAIL", "probe", f"{CONTROL_PROBE} on {where} answered {control.status_code}: the Control API is exposed")
    ]
    items.append(
        ("ok", "probe", f"{HEALTH} on {where}: 200 (forwarded)")
        if health.status_code == 200
        else ("warn", "probe", f"{HEALTH} on {where} answered {health.status_code}: is the SuperLink up?")
    )
    return items


def check_proxy(conf: str | Path, network: bool = True, timeout: float = 5.0) -> list[tuple[str, str, str]]:
    """The coordinator's side of ``mdmt deploy check --proxy``: the config, the SuperLink's bind address,
    and (``network``) a live probe on the sites' listener."""
    path = Path(conf).expanduser()
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"--proxy {path}: cannot be read ({exc.strerror or exc})") from None
    items = check_proxy_text(text)
    conf_read = read_proxy_conf(text)
    for up in sorted({loc[3] for loc in conf_read.locations if loc[2]}):
        items.append(check_superlink_bind(up))
    if network:
        for host, port, _ in conf_read.listens:
            items += probe(format_address(host, port), timeout)
    return items
