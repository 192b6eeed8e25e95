"""A site daemon's node config: the keys ``flower-supernode --node-config`` carries, written by
``mdmt deploy supernode-cmd`` and read by the site when a message arrives. Simulation nodes carry
Flower's ``partition-id`` instead (see :func:`mdmt.fed.site.locate_site`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mdmt.data.options import cache_root
from mdmt.errors import ConfigError

SITE, DATA_DIR, WORKSPACE, CACHE_DIR, DEVICE = "site", "data-dir", "workspace", "cache-dir", "device"
# The site's own policy (mdmt.fed.policy), from its site config: written only when it differs from the
# default, so a site config without these keys gives the node config it always gave.
CROP_SOURCE, DP_REQUIRED, DP_MIN_NOISE = "crop-source", "dp-required", "dp-min-noise"
EPSILON_BUDGET, MAX_IMAGE_SIZE, MIN_HIST_N, APPROVED_APP = (
    "epsilon-budget",
    "max-image-size",
    "min-hist-n",
    "approved-app",
)
POLICY_KEYS = (CROP_SOURCE, DP_REQUIRED, DP_MIN_NOISE, EPSILON_BUDGET, MAX_IMAGE_SIZE, MIN_HIST_N, APPROVED_APP)
KEYS = (SITE, DATA_DIR, WORKSPACE, CACHE_DIR, DEVICE, *POLICY_KEYS)
DEFAULT_MAX_IMAGE_SIZE = 512  # pixels: above it a site refuses (a cache of 100000-pixel images fills any disk)
DEFAULT_MIN_HIST_N = 20  # labelled prognosis rows: a split with fewer sends a coarsened score histogram


def _number(values: Mapping[str, Any], key: str, kind: type, default: Any) -> Any:
    v = values.get(key, "")
    if v == "" or v is None:
        return default
    try:
        if kind is bool:
            text = str(v).strip().lower()
            if text not in ("true", "false", "1", "0"):
                raise ValueError(v)
            return text in ("true", "1")
        out = kind(v)
    except (TypeError, ValueError):
        raise ConfigError(f"node config: '{key}' must be {kind.__name__}, got {v!r}") from None
    if out < 0:
        raise ConfigError(f"node config: '{key}' must be >= 0, got {v!r}")
    return out


@dataclass(frozen=True)
class NodeConfig:
    """Who a deployed site is and where its data, workspace and cache are, on its own disk."""

    site: str
    data_dir: Path
    workspace: Path
    cache_dir: Path | None = None  # None: the workspace's default cache folder
    device: str = ""  # the site's own device choice, which wins over the run config's; "" = the run config's
    crop_source: str = ""  # boxes/masks crop: the site's table or folder (relative = inside data-dir); "" = default
    dp_required: bool = False  # refuse to train without DP-SGD
    dp_min_noise: float = 0.0  # refuse to train with a noise multiplier below this (0 = no floor)
    epsilon_budget: float = 0.0  # the epsilon this site's data may spend over every unit (0 = no budget)
    max_image_size: int = DEFAULT_MAX_IMAGE_SIZE  # refuse an image-size above this
    min_hist_n: int = DEFAULT_MIN_HIST_N  # a split with fewer labelled prognosis rows sends a coarse histogram
    approved_app: str = ""  # sha256 of the approved app bundle ("" = none named)

    @property
    def cache_path(self) -> Path:
        return cache_root(self.workspace, self.cache_dir)

    def to_flower(self) -> str:
        """The ``--node-config`` value: space-separated ``key="value"`` pairs."""
        items = [(SITE, self.site), (DATA_DIR, self.data_dir), (WORKSPACE, self.workspace)]
        if self.cache_dir:
            items.append((CACHE_DIR, self.cache_dir))
        if self.device:
            items.append((DEVICE, self.device))
        default = NodeConfig("", Path(), Path())
        for key in POLICY_KEYS:
            value = getattr(self, key.replace("-", "_"))
            if value != getattr(default, key.replace("-", "_")):
                items.append((key, str(value).lower() if isinstance(value, bool) else value))
        return " ".join(f'{k}="{v}"' for k, v in items)

    @classmethod
    def from_flower(cls, values: Mapping[str, Any]) -> NodeConfig:
        """The node config a SuperNode was started with. ``data-dir`` and ``workspace`` are required: a
        site daemon never takes the folders it reads or writes from the server's run config."""
        site = str(values[SITE])
        for key in (DATA_DIR, WORKSPACE):
            if not str(values.get(key, "") or "").strip():
                raise ConfigError(
                    f"node config: '{key}' is missing; a site names its own folders "
                    "('mdmt deploy supernode-cmd' writes them from the site config)"
                )

        def path(key: str, default: Path | None) -> Path | None:
            v = str(values.get(key, "") or "")
            return Path(v).expanduser().resolve() if v else default

        return cls(
            site,
            path(DATA_DIR, None),
            path(WORKSPACE, None),
            path(CACHE_DIR, None),
            str(values.get(DEVICE, "") or ""),
            crop_source=str(values.get(CROP_SOURCE, "") or ""),
            dp_required=_number(values, DP_REQUIRED, bool, False),
            dp_min_noise=_number(values, DP_MIN_NOISE, float, 0.0),
            epsilon_budget=_number(values, EPSILON_BUDGET, float, 0.0),
            max_image_size=_number(values, MAX_IMAGE_SIZE, int, DEFAULT_MAX_IMAGE_SIZE),
            min_hist_n=_number(values, MIN_HIST_N, int, DEFAULT_MIN_HIST_N),
            approved_app=str(values.get(APPROVED_APP, "") or ""),
        )
