"""A site's side of a run without torch: which site a node is and where its files are, its cached images
split by protocol, and the summary it answers the discovery query with (so a query needs no framework).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mdmt.data.ingest import ingest_and_load_site
from mdmt.data.manifest import dispatch_order, manifest_hash, read_manifest
from mdmt.data.splits import cv_roles, site_splits
from mdmt.errors import ConfigError, DataError
from mdmt.fed import protocol as P
from mdmt.fed.config import RunConfig
from mdmt.fed.node import SITE, NodeConfig
from mdmt.ml.methods import PROGNOSIS, SEVERITY
from mdmt.ml.taskdata import TaskData

SPLIT_CHOICES = ("train", "val", "test", "all")


@dataclass(frozen=True)
class SiteLocation:
    site: str
    site_dir: Path
    workspace: Path  # the site's own folder for predictions and its message log; never sent anywhere
    cache_root: Path
    device: str = ""  # deployment: the site's own device choice (node_config 'device'); empty = the run config's
    simulated: bool = False  # a simulation node (partition-id), not a site daemon
    node: NodeConfig | None = None  # deployment: the site's own node config, its policy (mdmt.fed.policy) included


def locate_site(cfg: RunConfig, node_config: Mapping[str, Any]) -> SiteLocation:
    """Deployment: node_config ``site`` (+ ``data-dir``, ``workspace``). Simulation: partition-id -> site."""
    if SITE in node_config:
        node = NodeConfig.from_flower(node_config)
        site, site_dir, ws, cache, device = node.site, node.data_dir, node.workspace, node.cache_path, node.device
    elif "partition-id" in node_config:
        sites = list(cfg.site_list) or dispatch_order(cfg.fed_path)
        pid = int(node_config["partition-id"])
        if pid >= len(sites):
            raise ConfigError(
                f"simulation node {pid} has no site: the federation has {len(sites)} sites ({', '.join(sites)}); "
                f"set num-supernodes={len(sites)}"
            )
        site = sites[pid]
        site_dir = cfg.fed_path / site
        ws, cache = cfg.workspace_path, cfg.cache_path
        device, node = "", None
    else:
        raise ConfigError("node_config has neither 'site' (deployment) nor 'partition-id' (simulation)")
    return SiteLocation(site, site_dir, ws / "sites" / site, cache, device, simulated=node is None, node=node)


def pooled_locations(cfg: RunConfig, loc: SiteLocation, pool: str) -> list[SiteLocation]:
    """The sites a centralised reference pools (simulation only: every site folder is on this machine). A
    site daemon trains on its own data only."""
    if not pool or (loc.node is not None and pool == loc.site):
        return [loc]
    if loc.node is not None:
        raise ConfigError("'pool-sites': a site trains on its own data only (pooling is for simulations)")
    out = []
    for s in pool.split(","):
        d = cfg.fed_path / s
        if not d.is_dir():
            raise DataError(f"{d}: pooled site folder not found (centralised runs need every site's data locally)")
        out.append(SiteLocation(s, d, loc.workspace, loc.cache_root, loc.device))
    return out


def load_data(cfg: RunConfig, loc: SiteLocation):
    """The site's cache, built first when it is missing or stale."""
    return ingest_and_load_site(
        loc.site_dir,
        loc.cache_root,
        image_size=cfg.image_size,
        crop=cfg.crop,
        voi=cfg.voi,
        crop_source=cfg.crop_source or None,
        workers=cfg.num_workers,
    )


def manifest_splits(cfg: RunConfig, loc: SiteLocation) -> pd.Series:
    """image -> train/val/test, computed on the whole manifest (the same rule as ``mdmt splits``), so a
    file that later fails to decode never shifts another patient's split."""

    df = read_manifest(loc.site_dir)
    return pd.Series(site_splits(df, loc.site, cfg.seed, cfg.val_fraction).to_numpy(), index=df["image"].to_numpy())


def image_splits(cfg: RunConfig, loc: SiteLocation, protocol: str = "loco", fold: str = "-") -> pd.Series:
    """image -> train/val/test of the site under a protocol: loco uses :func:`manifest_splits` (a held-out
    centre evaluates 'all'); cv fold k uses the site's own patient-level k-fold assignment."""
    if protocol != "cv":
        return manifest_splits(cfg, loc)

    df = read_manifest(loc.site_dir)
    return pd.Series(cv_roles(df, loc.site, cfg.seed, int(fold), cfg.cv_folds).to_numpy(), index=df["image"].to_numpy())


def round_splits(cfg: RunConfig, loc: SiteLocation, round_config: Mapping[str, Any]) -> pd.Series:
    return image_splits(cfg, loc, str(round_config.get(P.CFG_PROTOCOL, "loco")), str(round_config.get(P.CFG_FOLD, "-")))


def load_split(
    cfg: RunConfig, loc: SiteLocation, split: str, tasks: tuple[str, ...], sd=None, splits: pd.Series | None = None
) -> TaskData:
    """The site's rows of one split, with targets of tasks outside ``tasks`` masked to -1."""
    if split not in SPLIT_CHOICES:
        raise ConfigError(f"split '{split}' is not one of {', '.join(SPLIT_CHOICES)}")
    sd = sd if sd is not None else load_data(cfg, loc)
    table = sd.table
    if split == "all":
        mask = np.ones(len(table), dtype=bool)
    else:
        splits = splits if splits is not None else manifest_splits(cfg, loc)
        mask = (table["image"].map(splits) == split).to_numpy()
    y_prog = table["y_prog"].to_numpy(dtype=np.int64).copy()
    y_sev = table["y_sev"].to_numpy(dtype=np.int64).copy()
    if PROGNOSIS not in tasks:
        y_prog[:] = -1
    if SEVERITY not in tasks:
        y_sev[:] = -1
    ids = [f"{loc.site}/{i}" for i in table["image"]]
    return TaskData(sd.images, y_prog, y_sev, ids).subset(mask)


def site_summary(cfg: RunConfig, loc: SiteLocation) -> dict[str, Any]:
    """Role, manifest hash and label counts per split: what the server needs to plan, nothing more."""

    sd, splits = load_data(cfg, loc), manifest_splits(cfg, loc)
    out: dict[str, Any] = {
        "site": loc.site,
        "role": sd.role,
        "manifest-hash": manifest_hash(loc.site_dir),
        P.NODE_KIND: P.SIMULATION if loc.simulated else P.DEPLOYMENT,
        P.CONTRACT_VERSION_KEY: P.CONTRACT_VERSION,
    }
    for split in SPLIT_CHOICES:
        d = load_split(cfg, loc, split, (PROGNOSIS, SEVERITY), sd=sd, splits=splits)
        c = d.counts()
        out[f"{split}-prognosis"] = c[PROGNOSIS]
        out[f"{split}-severity"] = c[SEVERITY]
    return out
