"""A site's config file (``mdmt deploy site-config``): who the site is, where its data are, how its
SuperNode reaches the coordinator; and the checks of its values (site name, ``host:port``, device)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mdmt.data.options import MIN_IMAGE_SIZE
from mdmt.errors import ConfigError
from mdmt.fed.node import DEFAULT_MAX_IMAGE_SIZE, DEFAULT_MIN_HIST_N, NodeConfig
from mdmt.ops.deploy.files import make_dir, write_public

DEFAULT_SUPERLINK_PORT = 9092
DEFAULT_SUPERNODE_PORT = 9094
DEVICES_HELP = "auto, cpu, cuda or cuda:N"
SITE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
DEVICE_RE = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")
SHA256_RE = re.compile(r"^([0-9a-fA-F]{64})?$")


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
    # The site's policy (mdmt.fed.policy): what no server message can change.
    crop_source: str = ""  # boxes/masks crop: the site's table or folder; relative = inside data-dir
    dp_required: bool = False
    dp_min_noise: float = 0.0
    epsilon_budget: float = 0.0
    max_image_size: int = DEFAULT_MAX_IMAGE_SIZE
    min_hist_n: int = DEFAULT_MIN_HIST_N
    approved_app: str = ""
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
            crop_source=self.crop_source,
            dp_required=self.dp_required,
            dp_min_noise=self.dp_min_noise,
            epsilon_budget=self.epsilon_budget,
            max_image_size=self.max_image_size,
            min_hist_n=self.min_hist_n,
            approved_app=self.approved_app.lower(),
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
        for key, low in (("dp-min-noise", 0), ("epsilon-budget", 0), ("min-hist-n", 0)):
            value = getattr(self, key.replace("-", "_"))
            if not value >= low or value != value or value == float("inf"):
                raise ConfigError(f"{self.source}: '{key}' must be a finite number >= {low}, got {value}")
        if not MIN_IMAGE_SIZE <= int(self.max_image_size):
            raise ConfigError(
                f"{self.source}: 'max-image-size' must be at least {MIN_IMAGE_SIZE} pixels, got {self.max_image_size}"
            )
        if not SHA256_RE.match(str(self.approved_app)):
            raise ConfigError(
                f"{self.source}: 'approved-app' must be 64 hex characters (the app bundle's sha256) or empty"
            )
        for key in ("data-dir", "ca", "key", "workspace", "cache-dir", "crop-source"):
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
    "crop-source",
    "dp-required",
    "dp-min-noise",
    "epsilon-budget",
    "max-image-size",
    "min-hist-n",
    "approved-app",
)
_POLICY_TYPES = {
    "dp-required": (bool,),
    "dp-min-noise": (int, float),
    "epsilon-budget": (int, float),
    "max-image-size": (int,),
    "min-hist-n": (int,),
}
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
        "# The site's policy: no server message changes it (docs/privacy.md, 'The site's policy').",
        f"crop-source = {_toml_str(cfg.crop_source)}  # boxes/masks crop table or folder; relative = inside "
        "data-dir; empty = the default name",
        f"dp-required = {str(bool(cfg.dp_required)).lower()}  # true: refuse to train without DP-SGD",
        f"dp-min-noise = {float(cfg.dp_min_noise)}  # refuse to train with a lower noise multiplier; 0 = no floor",
        f"epsilon-budget = {float(cfg.epsilon_budget)}  # epsilon this site's data may spend over all units; 0 = none",
        f"max-image-size = {int(cfg.max_image_size)}  # refuse a run whose image-size is larger",
        f"min-hist-n = {int(cfg.min_hist_n)}  # a split with fewer labelled rows sends a coarsened score histogram",
        f"approved-app = {_toml_str(cfg.approved_app)}  # sha256 of the approved app bundle; empty = none named",
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
        elif k in _POLICY_TYPES:
            kinds = _POLICY_TYPES[k]
            if v is not None and (not isinstance(v, kinds) or (bool not in kinds and isinstance(v, bool))):
                what = "true or false" if bool in kinds else "an integer" if kinds == (int,) else "a number"
                raise ConfigError(f"{path}: '{k}' must be {what}, got {v!r}")
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
        crop_source=str(values.get("crop-source", "") or "").strip(),
        dp_required=bool(values.get("dp-required", False)),
        dp_min_noise=float(values.get("dp-min-noise", 0.0)),
        epsilon_budget=float(values.get("epsilon-budget", 0.0)),
        max_image_size=int(values.get("max-image-size", DEFAULT_MAX_IMAGE_SIZE)),
        min_hist_n=int(values.get("min-hist-n", DEFAULT_MIN_HIST_N)),
        approved_app=str(values.get("approved-app", "") or "").strip(),
        source=str(path),
    )
    return cfg.validate()
