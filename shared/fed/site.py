"""What a site does when a train or evaluate message arrives, with no Flower types: train, evaluate
(finding its data and answering a query are torch-free, in mdmt.fed.sitedata).

The ClientApp in client/ only translates Flower messages to these calls and back.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from mdmt.fed import protocol as P
from mdmt.fed.config import RunConfig
from mdmt.fed.policy import privacy_dir, safe_unit_name, site_dp_settings, small_split_histogram
from mdmt.fed.sitedata import SiteLocation, image_splits, load_split, pooled_locations
from mdmt.fed.timing import stage
from mdmt.fed.warm import model_for, site_rows
from mdmt.ml.augment import get_augment
from mdmt.ml.methods import PROGNOSIS, SEVERITY, get_method
from mdmt.ml.model import build_model
from mdmt.ml.naming import is_bn_stat
from mdmt.ml.privacy import DPRound, steps_per_epoch
from mdmt.ml.taskdata import TaskData
from mdmt.ml.train import adapt_bn, evaluate, resolve_device, train_local
from mdmt.seeding import derive_seed


def _model(
    cfg: RunConfig, backbone: str, state: dict[str, torch.Tensor], device: torch.device
) -> tuple[torch.nn.Module, Any]:
    """The model holding ``state``, and its compiled forward when ``torch-compile`` is on: from this
    process's warm cache (``site-cache``), or built afresh."""
    if cfg.site_cache:
        built = model_for(cfg, backbone, state, device)
        return built.module, built.forward
    model = build_model(backbone, dp=cfg.dp)
    model.load_state_dict(state, strict=True)
    return model, None


def _rows(
    cfg: RunConfig, loc: SiteLocation, split: str, tasks: tuple[str, ...], round_config: Mapping[str, Any]
) -> TaskData:
    protocol, fold = str(round_config.get(P.CFG_PROTOCOL, "loco")), str(round_config.get(P.CFG_FOLD, "-"))
    if cfg.site_cache:
        return site_rows(cfg, loc, split, tasks, protocol, fold)
    return load_split(cfg, loc, split, tasks, splits=image_splits(cfg, loc, protocol, fold))


def unit_file_name(loc: SiteLocation, unit_id: str) -> str:
    """A unit's name in the site's folders (a site daemon keeps only safe characters of what it was sent)."""
    return safe_unit_name(unit_id) if loc.node is not None else str(unit_id).replace("/", "__")


def _fedbn_file(loc: SiteLocation, round_config: Mapping[str, Any]) -> Path:
    return loc.workspace / "fedbn" / (unit_file_name(loc, str(round_config[P.CFG_UNIT])) + ".pt")


def _fedbn(round_config: Mapping[str, Any]) -> bool:
    return str(round_config.get(P.CFG_AGGREGATION, "fedavg")) == "fedbn"


def run_train(cfg: RunConfig, loc: SiteLocation, state: dict[str, torch.Tensor], round_config: Mapping[str, Any]):
    """One round of local training; returns (new state dict, train metrics dict)."""
    method = get_method(str(round_config[P.CFG_METHOD]))
    locs = pooled_locations(cfg, loc, str(round_config.get(P.CFG_POOL, "")))
    with stage("data"):
        data = TaskData.concat([_rows(cfg, l, "train", method.tasks, round_config) for l in locs])
    bn_file = _fedbn_file(loc, round_config)
    if (
        _fedbn(round_config) and bn_file.is_file()
    ):  # FedBN: this site's own BatchNorm statistics replace the global ones
        state = state | torch.load(bn_file, map_location="cpu")
    device = resolve_device(loc.device or cfg.device)
    with stage("model"):
        model, forward = _model(cfg, str(round_config[P.CFG_BACKBONE]), state, device)
    seed = derive_seed(cfg.seed, "train", loc.site, round_config[P.CFG_UNIT], int(round_config[P.CFG_ROUND]))
    with stage("train"):
        res = train_local(
            model,
            data,
            epochs=cfg.local_epochs,
            steps=cfg.local_steps,
            batch_size=cfg.batch_size,
            lr=float(round_config[P.CFG_LR]),
            weight_decay=cfg.weight_decay,
            loss_norm=cfg.loss_norm,
            device=device,
            seed=seed,
            augment=get_augment(cfg.augment),
            class_weight=cfg.class_weight,
            prox_mu=float(round_config.get(P.CFG_PROX_MU, 0.0)),
            compile_model=cfg.torch_compile,
            forward=forward,
            dp=dp_round(cfg, loc, data, str(round_config[P.CFG_UNIT])) if cfg.dp else None,
        )
    new_state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if _fedbn(round_config):
        bn_file.parent.mkdir(parents=True, exist_ok=True)
        torch.save({k: v for k, v in new_state.items() if is_bn_stat(k)}, bn_file)
    return new_state, P.train_metrics(res)


def privacy_file(loc: SiteLocation, unit_id: str) -> Path:
    """Where a site keeps the accountant history of one unit: on its own disk, so a restarted daemon or a
    rerun of the unit continues the epsilon instead of starting from zero. A site daemon keeps them per
    data set (manifest hash), where its epsilon budget adds them up (mdmt.fed.policy)."""
    return privacy_dir(loc) / (unit_file_name(loc, unit_id) + ".json")


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
    file = privacy_file(loc, unit_id)
    settings = site_dp_settings(loc, settings, file)
    return DPRound(settings, file, {"site": loc.site, "unit": unit_id})


def run_evaluate(
    cfg: RunConfig, loc: SiteLocation, state: dict[str, torch.Tensor], round_config: Mapping[str, Any]
) -> dict[str, Any]:
    """Score both tasks on each requested split; per-sample predictions are written to the site's own
    workspace. Under FedBN a training site uses its own BatchNorm statistics and any other site (a
    held-out centre) re-estimates them on the rows it evaluates."""
    splits = [sp for sp in str(round_config.get(P.CFG_SPLIT, "")).split(",") if sp]
    if not splits:
        return {}
    bn_file = _fedbn_file(loc, round_config)
    if _fedbn(round_config) and bn_file.is_file():
        state = state | torch.load(bn_file, map_location="cpu")
    device = resolve_device(loc.device or cfg.device)
    out_dir = loc.workspace / "predictions" / unit_file_name(loc, str(round_config[P.CFG_UNIT]))
    out_dir.mkdir(parents=True, exist_ok=True)
    with stage("model"):
        model, _ = _model(cfg, str(round_config[P.CFG_BACKBONE]), state, device)
    rnd = int(round_config.get(P.CFG_EVAL_ROUND, round_config[P.CFG_ROUND]))
    results = {}
    for split in splits:
        with stage("data"):
            data = _rows(cfg, loc, split, (PROGNOSIS, SEVERITY), round_config)
        with stage("evaluate"):
            if _fedbn(round_config) and not bn_file.is_file():  # statistics reset and re-estimated per split
                adapt_bn(model, data, batch_size=max(cfg.batch_size, 64), device=device)
            res = evaluate(model, data, batch_size=max(cfg.batch_size, 64), device=device)
            res.predictions.to_csv(out_dir / f"round-{rnd:03d}-{split}.csv", index=False)
        # A small split's histogram is coarsened; its exact AUC (one number, res.prog_auc) is sent as for
        # any split: the full histogram a larger split sends gives that number too (docs/privacy.md).
        results[split] = replace(res, prog_hist=small_split_histogram(loc, res.prog_hist, res.n[PROGNOSIS]))
    return P.split_eval_metrics(results)


def run_step(
    cfg: RunConfig, loc: SiteLocation, state: dict[str, torch.Tensor], round_config: Mapping[str, Any]
) -> tuple[dict[str, torch.Tensor] | None, dict[str, Any]]:
    """One unit's part of a round at this site: evaluate the model received on the config's splits (the
    validation of the round before), then train from it when the config says so. ``state`` may hold
    numpy arrays (as a message brings them). Returns (the trained state, or None, and the reply's metrics)."""
    state = {k: torch.as_tensor(v) for k, v in state.items()}
    metrics = run_evaluate(cfg, loc, state, round_config)
    if not int(round_config.get(P.CFG_TRAIN, 0)):
        return None, metrics
    new_state, trained = run_train(cfg, loc, state, round_config)
    return new_state, metrics | trained
