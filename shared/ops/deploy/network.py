"""A site SuperNode's network restriction (``mdmt deploy site-network``): the systemd drop-in
``mdmt-supernode@<SITE>.service.d/network.conf`` that lets the unit, and the ClientApp processes it starts,
reach the coordinator and loopback only; and the check that it still names the coordinator's address.

The unit file itself denies every address but loopback (``IPAddressDeny=any``, ``IPAddressAllow=localhost``).
systemd expands no variables in ``IPAddressAllow=``, so the coordinator's address cannot come from the site
config when the unit starts: this drop-in is written from the config instead, and written again when the
coordinator's address changes."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Sequence
from pathlib import Path

from mdmt.errors import ConfigError, MDMTError
from mdmt.ops.deploy.files import make_dir, write_public
from mdmt.ops.deploy.siteconfig import SiteConfig, parse_address

SYSTEMD_UNIT_DIR = Path("/etc/systemd/system")
SUPERNODE_TEMPLATE = "mdmt-supernode@.service"
DROPIN_NAME = "network.conf"
RESOLV_CONF = Path("/etc/resolv.conf")
# What systemd's ``localhost`` keyword in IPAddressAllow= stands for.
LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))


def dropin_path(site: str, unit_dir: str | Path = SYSTEMD_UNIT_DIR) -> Path:
    """``<unit_dir>/mdmt-supernode@<site>.service.d/network.conf``."""
    return Path(unit_dir) / f"mdmt-supernode@{site}.service.d" / DROPIN_NAME


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None


def _unique(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))


def coordinator_addresses(cfg: SiteConfig, resolve: bool = True) -> list[str]:
    """The coordinator's IP addresses: the literal address of the config, or what its host name resolves to
    here (``[]`` for a host name when ``resolve`` is off). ConfigError when the name does not resolve."""
    host, port = parse_address(cfg.coordinator, f"{cfg.source}: 'coordinator'")
    literal = _ip(host)
    if literal is not None:
        return [str(literal)]
    if not resolve:
        return []
    try:
        infos = socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError) as exc:
        raise ConfigError(
            f"{cfg.source}: the coordinator's host {host!r} does not resolve here "
            f"({getattr(exc, 'strerror', None) or exc}); give its address with --allow IP"
        ) from None
    return _unique([str(_ip(info[4][0])) for info in infos if _ip(info[4][0]) is not None])


def nameservers(resolv_conf: str | Path = RESOLV_CONF) -> list[str]:
    """The DNS servers of ``resolv.conf`` that are not on loopback (loopback is always allowed)."""
    try:
        lines = Path(resolv_conf).read_text(errors="replace").splitlines()
    except OSError:
        return []
    found = []
    for line in lines:
        words = line.split()
        if len(words) >= 2 and words[0] == "nameserver":
            ip = _ip(words[1])
            if ip is not None and not ip.is_loopback:
                found.append(str(ip))
    return _unique(found)


def _allow_values(allow: Sequence[str]) -> list[str]:
    out = []
    for item in allow:
        try:
            net = ipaddress.ip_network(str(item).strip(), strict=False)
        except ValueError:
            raise ConfigError(
                f"--allow {item!r}: not an IP address or network (e.g. 10.0.0.5 or 10.0.0.0/24)"
            ) from None
        out.append(str(net.network_address) if net.num_addresses == 1 else str(net))
    return out


def network_dropin(
    cfg: SiteConfig, allow: Sequence[str] = (), resolv_conf: str | Path = RESOLV_CONF
) -> tuple[str, list[str]]:
    """(the drop-in's text, the addresses it allows besides loopback) for the site ``cfg``: the coordinator's
    addresses, the DNS servers when the coordinator is a host name (the SuperNode resolves it), and ``allow``."""
    host, _ = parse_address(cfg.coordinator, f"{cfg.source}: 'coordinator'")
    extra = _allow_values(list(allow))
    try:
        coordinator = coordinator_addresses(cfg)
    except ConfigError:
        if not extra:
            raise
        coordinator = []
    dns = [] if _ip(host) is not None else [a for a in nameservers(resolv_conf) if a not in coordinator]
    unit = f"mdmt-supernode@{cfg.site}"
    lines = [
        f"# Written by 'mdmt deploy site-network {cfg.source}': {unit} (the SuperNode and the ClientApp",
        "# processes it starts) may reach the coordinator and this host's loopback, no other address.",
        f"# Write it again when the coordinator's address changes, then: systemctl daemon-reload && "
        f"systemctl restart {unit}",
        "[Service]",
        "IPAddressDeny=any",
        "IPAddressAllow=localhost",
    ]
    if coordinator:
        lines += [f"# the coordinator, {cfg.coordinator}"] + [f"IPAddressAllow={a}" for a in coordinator]
    if dns:
        lines += [f"# DNS servers of {resolv_conf}: the SuperNode resolves {host}"]
        lines += [f"IPAddressAllow={a}" for a in dns]
    if extra:
        lines += ["# given with --allow"] + [f"IPAddressAllow={a}" for a in extra]
    return "\n".join(lines) + "\n", _unique(coordinator + dns + extra)


def write_network_dropin(
    cfg: SiteConfig, unit_dir: str | Path = SYSTEMD_UNIT_DIR, allow: Sequence[str] = ()
) -> tuple[Path, list[str]]:
    """Write (or replace) the site's drop-in under ``unit_dir``; returns (its path, the addresses allowed)."""
    text, addresses = network_dropin(cfg, allow)
    path = dropin_path(cfg.site, unit_dir)
    make_dir(path.parent, "systemd drop-in")
    try:
        write_public(path, text.encode())
    except OSError as exc:
        raise MDMTError(
            f"{path}: cannot be written ({exc.strerror or exc}); run as root, or pass --print and install it yourself"
        ) from None
    return path, addresses


def allowed_networks(path: Path) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """The networks a drop-in's ``IPAddressAllow=`` lines name (``localhost`` as loopback)."""
    nets = []
    for line in path.read_text(errors="replace").splitlines():
        key, _, value = line.strip().partition("=")
        if key.strip() != "IPAddressAllow":
            continue
        for word in value.split():
            if word == "localhost":
                nets += LOOPBACK
                continue
            try:
                nets.append(ipaddress.ip_network(word, strict=False))
            except ValueError:
                continue
    return nets


def check_dropin(cfg: SiteConfig, unit_dir: str | Path = SYSTEMD_UNIT_DIR, resolve: bool = True):
    """(ok, detail) about the site's drop-in, or None where the SuperNode unit is not installed. Not ok: the
    unit denies every address but loopback and no drop-in, or one that misses the coordinator's address."""
    path = dropin_path(cfg.site, unit_dir)
    template = Path(unit_dir) / SUPERNODE_TEMPLATE
    fix = f"write it with 'mdmt deploy site-network {cfg.source}', then systemctl daemon-reload"
    try:
        if not path.is_file():
            if template.is_file() and "IPAddressDeny=any" in template.read_text(errors="replace"):
                return False, f"{path} not found: mdmt-supernode@{cfg.site} may reach loopback only; {fix}"
            return None
        allowed = allowed_networks(path)
    except OSError as exc:
        return False, f"{path}: cannot be read ({exc.strerror or exc})"
    try:
        needed = coordinator_addresses(cfg, resolve)
    except ConfigError:
        needed = []  # the coordinator check names a host that does not resolve
    missing = [a for a in needed if not any(ipaddress.ip_address(a) in net for net in allowed)]
    if missing:
        return False, f"{path} does not allow {', '.join(missing)} (the coordinator, {cfg.coordinator}); {fix}"
    if not needed:
        return True, f"{path} present (the coordinator's address not compared: its name was not resolved)"
    return True, f"{path}: the unit may reach the coordinator ({', '.join(needed)}) and loopback only"
