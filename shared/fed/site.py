"""What a site does when a message arrives, with no Flower types: find its data, train, evaluate.

The ClientApp in client/ only translates Flower messages to these calls and back.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from mdmt.data.ingest import ingest_and_load_site
from mdmt.data.manifest import list_sites, manifest_hash, read_manifest
from mdmt.data.splits import cv_roles, site_splits
from mdmt.errors import ConfigError, DataError
from mdmt.fed import protocol as P
from mdmt.fed.config import RunConfig
from mdmt.fed.node import SITE, NodeConfig
from mdmt.ml.augment import get_augment
from mdmt.ml.methods import PROGNOSIS, SEVERITY, get_method
from mdmt.ml.model import build_model
from mdmt.ml.naming import is_bn_stat
from mdmt.ml.privacy import DPRound, steps_per_epoch
from mdmt.ml.train import TaskData, adapt_bn, evaluate, resolve_device, train_local
from mdmt.seeding import derive_seed

SPLIT_CHOICES = ("train", "val", "test", "all")


@dataclass(frozen=True)
class SiteLocation:
    site: str
    site_dir: Path
    workspace: Path  # the site's own folder for predictions and its message log; never sent anywhere
    cache_root: Path
    device: str = ""  # deployment: the site's own device choice (node_config 'device'); empty = the run config's
    simulated: bool = False  # a simulation node (partition-id), not a site daemon


def locate_site(cfg: RunConfig, node_config: Mapping[str, Any]) -> SiteLocation:
    """Deployment: node_config ``site`` (+ ``data-dir``, ``workspace``). Simulation: partition-id -> site."""
    if SITE in node_config:
        node = NodeConfig.from_flower(node_config, cfg.fed_path, cfg.workspace_path)
        site, site_dir, ws, cache, device = node.site, node.data_dir, node.workspace, node.cache_path, node.device
    elif "partition-id" in node_config:
        sites = list(cfg.site_list) or list_sites(cfg.fed_path)
        pid = int(node_config["partition-id"])
        if pid >= len(sites):
            raise ConfigError(
                f"simulation node {pid} has no site: the federation has {len(sites)} sites ({', '.join(sites)}); "
                f"set num-supernodes={len(sites)}"
            )
        site = sites[pid]
        site_dir = cfg.fed_path / site
        ws, cache = cfg.workspace_path, cfg.cache_path
        device = ""
    else:
        raise ConfigError("node_config has neither 'site' (deployment) nor 'partition-id' (simulation)")
    return SiteLocation(site, site_dir, ws / "sites" / site, cache, device, simulated=SITE not in node_config)


def pooled_locations(cfg: RunConfig, loc: SiteLocation, pool: str) -> list[SiteLocation]:
    """The sites a centralised reference pools (simulation only: every site folder is on this machine)."""
    if not pool:
        return [loc]
    out = []
    for s in pool.split(","):
        d = cfg.fed_path / s
        if not d.is_dir():
            raise DataError(f"{d}: pooled site folder not found (centralised runs need every site's data locally)")
        out.append(SiteLocation(s, d, loc.workspace, loc.cache_root, loc.device))
    return out


def _load(cfg: RunConfig, loc: SiteLocation):
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


def _round_splits(cfg: RunConfig, loc: SiteLocation, round_config: Mapping[str, Any]) -> pd.Series:
    return image_splits(cfg, loc, str(round_config.get(P.CFG_PROTOCOL, "loco")), str(round_config.get(P.CFG_FOLD, "-")))


def load_split(
    cfg: RunConfig, loc: SiteLocation, split: str, tasks: tuple[str, ...], sd=None, splits: pd.Series | None = None
) -> TaskData:
    """The site's rows of one split, with targets of tasks outside ``tasks`` masked to -1."""
    if split not in SPLIT_CHOICES:
        raise ConfigError(f"split '{split}' is not one of {', '.join(SPLIT_CHOICES)}")
    sd = sd if sd is not None else _load(cfg, loc)
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

    sd, splits = _load(cfg, loc), manifest_splits(cfg, loc)
    out: dict[str, Any] = {
        "site": loc.site,
        "role": sd.role,
        "manifest-hash": manifest_hash(loc.site_dir),
        P.NODE_KIND: P.SIMULATION if loc.simulated else P.DEPLOYMENT,
    }
    for split in SPLIT_CHOICES:
        d = load_split(cfg, loc, split, (PROGNOSIS, SEVERITY), sd=sd, splits=splits)
        c = d.counts()
        out[f"{split}-prognosis"] = c[PROGNOSIS]
        out[f"{split}-severity"] = c[SEVERITY]
    return out


def _model(cfg: RunConfig, backbone: str, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    model = build_model(backbone, dp=cfg.dp)
    model.load_state_dict(state, strict=True)
    return model


def _fedbn_file(loc: SiteLocation, round_config: Mapping[str, Any]) -> Path:
    return loc.workspace / "fedbn" / (str(round_config[P.CFG_UNIT]).replace("/", "__") + ".pt")


def _fedbn(round_config: Mapping[str, Any]) -> bool:
    return str(round_config.get(P.CFG_AGGREGATION, "fedavg")) == "fedbn"


def run_train(cfg: RunConfig, loc: SiteLocation, state: dict[str, torch.Tensor], round_config: Mapping[str, Any]):
    """One round of local training; returns (new state dict, train metrics dict)."""
    method = get_method(str(round_config[P.CFG_METHOD]))
    locs = pooled_locations(cfg, loc, str(round_config.get(P.CFG_POOL, "")))
    data = TaskData.concat(
        [load_split(cfg, l, "train", method.tasks, splits=_round_splits(cfg, l, round_config)) for l in locs]
    )
    bn_file = _fedbn_file(loc, round_config)
    if (
        _fedbn(round_config) and bn_file.is_file()
    ):  # FedBN: this site's own BatchNorm statistics replace the global ones
        state = state | torch.load(bn_file, map_location="cpu")
    model = _model(cfg, str(round_config[P.CFG_BACKBONE]), state)
    seed = derive_seed(cfg.seed, "train", loc.site, round_config[P.CFG_UNIT], int(round_config[P.CFG_ROUND]))
    res = train_local(
        model,
        data,
        epochs=cfg.local_epochs,
        steps=cfg.local_steps,
        batch_size=cfg.batch_size,
        lr=float(round_config[P.CFG_LR]),
        weight_decay=cfg.weight_decay,
        loss_norm=cfg.loss_norm,
        device=resolve_device(loc.device or cfg.device),
        seed=seed,
        augment=get_augment(cfg.augment),
        class_weight=cfg.class_weight,
        prox_mu=float(round_config.get(P.CFG_PROX_MU, 0.0)),
        compile_model=cfg.torch_compile,
        dp=dp_round(cfg, loc, data, str(round_config[P.CFG_UNIT])) if cfg.dp else None,
    )
    new_state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if _fedbn(round_config):
        bn_file.parent.mkdir(parents=True, exist_ok=True)
        torch.save({k: v for k, v in new_state.items() if is_bn_stat(k)}, bn_file)
    return new_state, P.train_metrics(res)


def privacy_file(loc: SiteLocation, unit_id: str) -> Path:
    """Where a site keeps the accountant history of one unit: on its own disk, so a restarted daemon or a
    rerun of the unit continues the epsilon instead of starting from zero."""
    return loc.workspace / "privacy" / (unit_id.replace("/", "__") + ".json")


def dp_round(cfg: RunConfig, loc: SiteLocation, data: TaskData, unit_id: str) -> DPRound | None:
    """The DP-SGD settings of this site's round: a target epsilon is spread over every local epoch the
    whole run takes here (rounds x local epochs, or the epochs that the local steps amount to). None when
    the site has no labelled row (nothing to train, nothing to account)."""
    n = len(data.labelled())
    if n == 0:
        return None
    per_epoch = steps_per_epoch(n, cfg.batch_size)
    epochs = cfg.num_rounds * (cfg.local_epochs if cfg.local_steps <= 0 else math.ceil(cfg.local_steps / per_epoch))
    settings = cfg.dp_settings(epochs).resolve(n, cfg.batch_size)
    return DPRound(settings, privacy_file(loc, unit_id), {"site": loc.site, "unit": unit_id})


def run_evaluate(
    cfg: RunConfig, loc: SiteLocation, state: dict[str, torch.Tensor], round_config: Mapping[str, Any]
) -> dict[str, Any]:
    """Score both tasks on each requested split; per-sample predictions are written to the site's own
    workspace. Under FedBN a training site uses its own BatchNorm statistics and any other site (a
    held-out centre) re-estimates them on the rows it evaluates."""
    splits = [sp for sp in str(round_config[P.CFG_SPLIT]).split(",") if sp]
    roles = _round_splits(cfg, loc, round_config)
    bn_file = _fedbn_file(loc, round_config)
    if _fedbn(round_config) and bn_file.is_file():
        state = state | torch.load(bn_file, map_location="cpu")
    device = resolve_device(loc.device or cfg.device)
    out_dir = loc.workspace / "predictions" / str(round_config[P.CFG_UNIT]).replace("/", "__")
    out_dir.mkdir(parents=True, exist_ok=True)
    sd = _load(cfg, loc)  # the site's cache, read once for every split
    model = _model(cfg, str(round_config[P.CFG_BACKBONE]), state)
    results = {}
    for split in splits:
        data = load_split(cfg, loc, split, (PROGNOSIS, SEVERITY), sd=sd, splits=roles)
        if _fedbn(round_config) and not bn_file.is_file():  # statistics reset and re-estimated per split
            adapt_bn(model, data, batch_size=max(cfg.batch_size, 64), device=device)
        res = evaluate(model, data, batch_size=max(cfg.batch_size, 64), device=device)
        res.predictions.to_csv(out_dir / f"round-{int(round_config[P.CFG_ROUND]):03d}-{split}.csv", index=False)
        results[split] = res
    return P.split_eval_metrics(results)
