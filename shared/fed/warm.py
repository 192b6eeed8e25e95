"""The warm site: what a process that serves sites keeps between messages.

In a simulation every Ray actor lives for the whole run and any actor may serve any site, so a process
keeps, per site, the opened uint8 cache with its split assignment and the rows of each split it has
used, and, per backbone, a built model (and its compiled forward) that each message reloads with
``load_state_dict``. A byte budget (``site-cache-mb``) bounds what it holds, least recently used first.

Every entry is keyed by what defines it: the site folder, its manifest (content hash, checked against the
file's size and time on every use), the cache folder's ``meta.json``, image size, crop, VOI, crop source,
seed, validation share, protocol, fold and folds for the rows; backbone, DP, device and compilation for
the model. A changed manifest or a rebuilt cache is a new key, so the old entry is never used again. The
ingest check runs once per key and process. Nothing in here decides a result: FedBN statistics, privacy
accountants and every model weight still come from the message and the site's own files each time.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from mdmt.data.cache import META, SiteData, cache_dir_for
from mdmt.data.manifest import MANIFEST
from mdmt.fed.config import RunConfig
from mdmt.fed.sitedata import SiteLocation, image_splits, load_data, load_split
from mdmt.ml.model import build_model
from mdmt.ml.taskdata import TaskData


def _stamp(path: Path) -> tuple[int, int]:
    try:
        st = path.stat()
    except OSError:
        return (0, 0)
    return (st.st_mtime_ns, st.st_size)


@dataclass
class SiteRows:
    """One site's opened cache and the rows of the splits asked for so far."""

    data: SiteData
    splits: dict[tuple[str, str], pd.Series] = field(default_factory=dict)  # (protocol, fold) -> image -> split
    rows: dict[tuple, TaskData] = field(default_factory=dict)

    def nbytes(self) -> int:
        return sum(int(r.images.nbytes) for r in self.rows.values())


@dataclass
class BuiltModel:
    module: torch.nn.Module
    forward: Callable | None = None  # the compiled forward, compiled once

    def nbytes(self) -> int:
        return sum(int(p.numel() * p.element_size()) for p in self.module.state_dict().values())


class WarmCache:
    """A least-recently-used map with a byte budget; thread-safe (an actor may run threads)."""

    def __init__(self) -> None:
        self.entries: OrderedDict[tuple, Any] = OrderedDict()
        self.lock = threading.Lock()
        self.budget = 0
        self.hits = self.misses = 0

    def get(self, key: tuple, build: Callable[[], Any]) -> Any:
        with self.lock:
            if key in self.entries:
                self.entries.move_to_end(key)
                self.hits += 1
                return self.entries[key]
        value = build()
        with self.lock:
            self.misses += 1
            self.entries[key] = value
            self.entries.move_to_end(key)
        return value

    def fit(self, budget: int) -> None:
        """Evict least recently used entries until the rest fits ``budget`` bytes (the newest stays)."""
        with self.lock:
            self.budget = budget
            while len(self.entries) > 1 and sum(v.nbytes() for v in self.entries.values()) > budget:
                self.entries.popitem(last=False)

    def clear(self) -> None:
        with self.lock:
            self.entries.clear()


CACHE = WarmCache()  # one per process: the actors of a simulation, or a site worker


def _data_key(cfg: RunConfig, loc: SiteLocation) -> tuple:
    cdir = cache_dir_for(loc.site_dir, loc.cache_root, cfg.image_size, cfg.crop, cfg.voi)
    return (
        "rows",
        str(loc.site_dir),
        str(loc.cache_root),
        cfg.image_size,
        cfg.crop,
        cfg.voi,
        cfg.crop_source,
        _stamp(loc.site_dir / MANIFEST),
        _stamp(cdir / META),
        cfg.seed,
        cfg.val_fraction,
        cfg.cv_folds,
    )


def site_rows(
    cfg: RunConfig, loc: SiteLocation, split: str, tasks: tuple[str, ...], protocol: str, fold: str
) -> TaskData:
    """The site's rows of one split (as :func:`mdmt.fed.sitedata.load_split`), from this process's cache."""
    entry: SiteRows = CACHE.get(_data_key(cfg, loc), lambda: SiteRows(load_data(cfg, loc)))
    which = (protocol, fold)
    if which not in entry.splits:
        entry.splits[which] = image_splits(cfg, loc, protocol, fold)
    key = (split, tuple(tasks), protocol, fold)
    if key not in entry.rows:
        entry.rows[key] = load_split(cfg, loc, split, tasks, sd=entry.data, splits=entry.splits[which])
    CACHE.fit(cfg.site_cache_mb << 20)
    return entry.rows[key]


def model_for(cfg: RunConfig, backbone: str, state: dict[str, torch.Tensor], device: torch.device) -> BuiltModel:
    """A model of ``backbone`` holding ``state`` (every tensor, strictly), built once per process; with
    ``torch-compile`` its compiled forward too, compiled once."""
    key = ("model", backbone, cfg.dp, str(device), cfg.torch_compile)

    def build() -> BuiltModel:
        module = build_model(backbone, dp=cfg.dp).to(device)
        return BuiltModel(module, torch.compile(module) if cfg.torch_compile else None)

    built: BuiltModel = CACHE.get(key, build)
    built.module.load_state_dict(state, strict=True)
    CACHE.fit(cfg.site_cache_mb << 20)
    return built
