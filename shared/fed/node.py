"""A site daemon's node config: the keys ``flower-supernode --node-config`` carries, written by
``mdmt deploy supernode-cmd`` and read by the site when a message arrives. Simulation nodes carry
Flower's ``partition-id`` instead (see :func:`mdmt.fed.site.locate_site`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mdmt.data.options import cache_root

SITE, DATA_DIR, WORKSPACE, CACHE_DIR, DEVICE = "site", "data-dir", "workspace", "cache-dir", "device"
KEYS = (SITE, DATA_DIR, WORKSPACE, CACHE_DIR, DEVICE)


@dataclass(frozen=True)
class NodeConfig:
    """Who a deployed site is and where its data, workspace and cache are, on its own disk."""

    site: str
    data_dir: Path
    workspace: Path
    cache_dir: Path | None = None  # None: the workspace's default cache folder
    device: str = ""  # the site's own device choice, which wins over the run config's; "" = the run config's

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
        return " ".join(f'{k}="{v}"' for k, v in items)

    @classmethod
    def from_flower(cls, values: Mapping[str, Any], fed_path: Path, workspace: Path) -> NodeConfig:
        """The node config a SuperNode was started with; ``data-dir`` and ``workspace`` fall back to the
        run config's federation folder and workspace."""
        site = str(values[SITE])

        def path(key: str, default: Path | None) -> Path | None:
            v = str(values.get(key, "") or "")
            return Path(v).expanduser().resolve() if v else default

        return cls(
            site,
            path(DATA_DIR, fed_path / site),
            path(WORKSPACE, workspace),
            path(CACHE_DIR, None),
            str(values.get(DEVICE, "") or ""),
        )
