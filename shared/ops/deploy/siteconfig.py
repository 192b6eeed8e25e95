"""A site's config file (``mdmt deploy site-config``): who the site is, where its data are, how its
SuperNode reaches the coordinator; and the checks of its values (site name, ``host:port``, device)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mdmt.errors import ConfigError
from mdmt.fed.node import NodeConfig
from mdmt.ops.deploy.files import make_dir, write_public

DEFAULT_SUPERLINK_PORT = 9092
DEFAULT_SUPERNODE_PORT = 9094
DEVICES_HELP = "auto, cpu, cuda or cuda:N"
SITE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
DEVICE_RE = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")


def check_site_name(site: str, source: str = "--site") -> str:
    if not SITE_NAME_RE.match(site or ""):
        raise ConfigError(
            f"{source} {site!r}: a site name is 1-64 letters, digits, '_' or '-', starting with a "
            "letter or digit (it names the node in every table)"
        )
    return site


def parse_address(address: str, source: str = "--coordinator") -> tuple[str, int]:
    """``host:port`` or ``[ipv6]:port`` -> (host, port)."""
    text = str(address).strip()
    if "://" in text:
        raise ConfigError(f"{source} {address!r}: give host:port without a URL prefix (TLS is always on)")
    m = re.match(r"^\[([0-9A-Fa-f:.]+)\]:(\d+)$", text) or re.match(r"^([^\s:\[\]]+):(\d+)$", text)
    if not m:
        raise ConfigError(f"{source} {address!r}: expected host:port, e.g. coord.example.org:{DEFAULT_SUPERLINK_PORT}")
    port = int(m.group(2))
    if not 0 < port < 65536:
        raise ConfigError(f"{source} {address!r}: port must be 1-65535")
    return m.group(1), port


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def check_device(device: str, source: str = "--device") -> str:
    if not DEVICE_RE.match(str(device)):
        raise ConfigError(f"{source} {device!r}: use {DEVICES_HELP}")
    return str(device)


@dataclass(frozen=True)
class SiteConfig:
    """What a hospital's SuperNode needs: who it is, where its data are, how it reaches the coordinator."""

    site: str
    data_dir: Path
    coordinator: str
    ca: Path
    key: Path
    workspace: Path
    cache_dir: Path | None = None
    device: str = "auto"
    supernode_port: int = DEFAULT_SUPERNODE_PORT
    source: str = field(default="site config", compare=False)

    @property
    def public_key(self) -> Path:
        return self.key.with_name(self.key.name + ".pub")

    @property
    def node(self) -> NodeConfig:
        """What the SuperNode's ``--node-config`` tells the site. The site's own device wins over the run
        config's (``cuda:N`` is narrowed by CUDA_VISIBLE_DEVICES, so the node sees plain ``cuda``)."""
        return NodeConfig(
            self.site,
            self.data_dir,
            self.workspace,
            self.cache_dir,
            "cuda" if self.device.startswith("cuda") else self.device,
        )

    @property
    def cache_root(self) -> Path:
        return self.node.cache_path

    def validate(self) -> SiteConfig:
        check_site_name(self.site, f"{self.source}: 'site'")
        parse_address(self.coordinator, f"{self.source}: 'coordinator'")
        check_device(self.device, f"{self.source}: 'device'")
        if not 0 < int(self.supernode_port) < 65536:
            raise ConfigError(f"{self.source}: 'supernode-port' must be 1-65535, got {self.supernode_port}")
        for key in ("data-dir", "ca", "key", "workspace", "cache-dir"):
            value = getattr(self, key.replace("-", "_"))
            if value is not None and any(c in str(value) for c in '"\\\n'):
                raise ConfigError(
                    f"{self.source}: '{key}' {str(value)!r} contains a double quote, a backslash or "
                    "a line break; use a path without them"
                )
        return self


SITE_CONFIG_KEYS = (
    "site",
    "data-dir",
    "coordinator",
    "ca",
    "key",
    "workspace",
    "cache-dir",
    "device",
    "supernode-port",
)
_REQUIRED_KEYS = ("site", "data-dir", "coordinator", "ca", "key", "workspace")


def _toml_str(value: Any) -> str:
    return json.dumps(str(value), ensure_ascii=False)


def site_config_text(cfg: SiteConfig) -> str:
    lines = [
        "# MDMT site configuration: read by 'mdmt deploy supernode-cmd' and 'mdmt deploy check'.",
        "# Relative paths are relative to this file's folder.",
        f"site = {_toml_str(cfg.site)}  # the name the coordinator sees in every table",
        f"data-dir = {_toml_str(cfg.data_dir)}  # the site folder: manifest.csv and its images (may be read-only)",
        f"coordinator = {_toml_str(cfg.coordinator)}  # the SuperLink, host:port",
        f"ca = {_toml_str(cfg.ca)}  # the federation CA certificate (or a CA bundle during a CA rotation)",
        f"key = {_toml_str(cfg.key)}  # this site's private key; its public half is the same path + .pub",
        f"workspace = {_toml_str(cfg.workspace)}  # message log, predictions, cache; never sent anywhere",
        f"cache-dir = {_toml_str(cfg.cache_dir or '')}  # empty: <workspace>/cache",
        f"device = {_toml_str(cfg.device)}  # {DEVICES_HELP}",
        f"supernode-port = {int(cfg.supernode_port)}  # the SuperNode's local API (loopback; unique per host)",
    ]
    return "\n".join(lines) + "\n"


def write_site_config(cfg: SiteConfig, out: str | Path, force: bool = False) -> Path:
    out = Path(out).expanduser()
    cfg.validate()
    if out.exists() and not force:
        raise ConfigError(f"{out} already exists; pass --force to replace it")
    make_dir(out.parent, "config")
    write_public(out, site_config_text(cfg).encode())
    return out


def load_site_config(path: str | Path) -> SiteConfig:
    """Read and validate a site config file; one-line ConfigError naming the file and key otherwise."""
    import tomllib  # deferred: tomllib is Python 3.11+ and requires-python allows 3.10

    path = Path(path).expanduser()
    try:
        values = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: site config not found; write one with 'mdmt deploy site-config'") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the site config ({exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    unknown = sorted(set(values) - set(SITE_CONFIG_KEYS))
    if unknown:
        raise ConfigError(f"{path}: unknown key '{unknown[0]}'; valid keys: {', '.join(SITE_CONFIG_KEYS)}")
    missing = [k for k in _REQUIRED_KEYS if not str(values.get(k, "")).strip()]
    if missing:
        raise ConfigError(f"{path}: missing key '{missing[0]}'; required: {', '.join(_REQUIRED_KEYS)}")
    for k in SITE_CONFIG_KEYS:
        v = values.get(k)
        if k == "supernode-port":
            if v is not None and (not isinstance(v, int) or isinstance(v, bool)):
                raise ConfigError(f"{path}: 'supernode-port' must be an integer, got {v!r}")
        elif v is not None and not isinstance(v, str):
            raise ConfigError(f"{path}: '{k}' must be a string, got {v!r}")
    base = path.resolve().parent

    def p(key: str) -> Path | None:
        v = str(values.get(key, "") or "").strip()
        return (base / Path(v).expanduser()).resolve() if v else None

    cfg = SiteConfig(
        site=values["site"],
        data_dir=p("data-dir"),
        coordinator=values["coordinator"].strip(),
        ca=p("ca"),
        key=p("key"),
        workspace=p("workspace"),
        cache_dir=p("cache-dir"),
        device=str(values.get("device", "auto") or "auto"),
        supernode_port=int(values.get("supernode-port", DEFAULT_SUPERNODE_PORT)),
        source=str(path),
    )
    return cfg.validate()
