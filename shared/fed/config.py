"""One configuration schema, fed by Flower's run_config, CLI flags and TOML files.

Keys are kebab-case (as in ``[tool.flwr.app.config]``). Unknown keys and bad values fail at start-up
with a one-line :class:`~mdmt.errors.ConfigError` naming the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import tomli_w

from mdmt.data.options import CROP_MODES, MIN_IMAGE_SIZE, PROTOCOLS, VOI_MODES, cache_root
from mdmt.errors import ConfigError
from mdmt.fed.aggregate import AGGREGATIONS, ROBUST
from mdmt.fed.compress import MODES as COMPRESSION_MODES
from mdmt.ml.backbones import BACKBONES
from mdmt.ml.methods import METHODS
from mdmt.ml.options import AUGMENTS, CLASS_WEIGHTS, DEVICES, LOSS_NORMS

# Keys that do not change a unit's result: where data and results are, how fast and on what it runs, how a
# run is driven, and which units a run selects (a unit's own method, backbone, fold and seed are its id).
# Every other key is part of a unit's fingerprint (mdmt.fed.plan.unit_recipe); the weights file counts by
# its content.
OPERATIONAL_KEYS = frozenset(
    {
        "method",
        "backbone",
        "holdouts",
        "folds",
        "sites",
        "seed",
        "protocol",
        "weights",
        "fed-dir",
        "workspace",
        "cache-dir",
        "store",
        "device",
        "torch-compile",
        "num-workers",
        "round-timeout",
        "min-sites",
        "rerun",
        "concurrent-units",
        "holdout-eval-every",
        "site-cache",
        "site-cache-mb",
        "pack-arrays",
        "update-norm-bound",
        "site-registry",
    }
)


def _split_list(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in str(value).split(",") if v.strip())


@dataclass(frozen=True)
class RunConfig:
    """Everything a run needs; every field has a default and a kebab-case key."""

    method: str = "mdmt"  # comma-separated list: mdmt, stl_prognosis, stl_severity, ft, local, centralised_mdmt
    backbone: str = "resnet18"  # comma-separated list of registry names
    weights: str = ""  # local weights file for the backbone (server only)
    pretrained: bool = False  # ImageNet weights (needs a local file or a reachable hub)
    protocol: str = "loco"  # loco (leave one centre out) | cv (patient-level k-fold at every site)
    holdouts: str = "A"  # loco: comma-separated held-out prognosis centres, one fold each
    cv_folds: int = 5  # cv: number of folds (test = fold k, validation = fold k+1)
    folds: str = ""  # cv: comma-separated folds to run (empty = all)
    fed_dir: str = "runs/demo-federation"
    sites: str = ""  # simulation: the sites to run (empty = all sites of fed-dir); ops.loco orders them
    workspace: str = "runs"
    cache_dir: str = ""  # empty = <workspace>/cache
    store: str = ""  # empty = <workspace>/store.sqlite
    image_size: int = 64
    crop: str = "lung"  # lung (built-in heuristic) | boxes (a box table) | masks (a mask folder) | none
    crop_source: str = ""  # boxes/masks: a table or folder; relative = inside each site; empty = the default name
    voi: str = "none"  # none | auto (apply the file's VOI LUT or first window)
    num_rounds: int = 3
    local_epochs: int = 1
    local_steps: int = 0  # > 0: a fixed number of optimiser steps per round instead of epochs
    batch_size: int = 32
    lr: float = 1e-3  # initial learning rate; the server owns it and sends it every round
    weight_decay: float = 1e-5
    lr_patience: int = 15  # rounds without a lower training-site validation loss before the lr is reduced; 0 = never
    lr_factor: float = 0.65
    min_lr: float = 1e-8
    loss_norm: str = "task"
    class_weight: str = "none"  # none | balanced (per site, inverse class frequency of its training rows)
    augment: str = "paper"  # paper (shift, zoom, flip, rotation, elastic; each p=0.5) | none
    # fedavg (task-aware) | fedprox | fedbn (BatchNorm statistics stay at the sites) | median | trimmed-mean (robust)
    aggregation: str = "fedavg"
    proximal_mu: float = 0.01  # fedprox: weight of the proximal term
    ft_phase1_rounds: int = 0  # ft: rounds of its STL-severity phase 1 (0 = num-rounds)
    dp: bool = False  # DP-SGD at every site (Opacus); the model is built with GroupNorm instead of BatchNorm
    dp_noise_multiplier: float = 0.0  # > 0: this noise; 0: derive it from dp-target-epsilon
    dp_target_epsilon: float = 0.0  # > 0: noise chosen so the whole run (num-rounds x local epochs) spends this
    dp_max_grad_norm: float = 1.0  # per-sample clipping norm
    dp_delta: float = 0.0  # 0 = 1 / (10 N), N = the site's training samples
    dp_epsilon_budget: float = 0.0  # > 0: a site refuses to train once a round would take it past this epsilon
    dp_accountant: str = "rdp"  # rdp | prv
    secure_aggregation: bool = False  # SecAgg+: the server only sees the masked sum of the sites' updates
    secagg_clip: float = 8.0  # public bound on |local - global| of every weight; a site past it refuses the round
    secagg_count_scale: int = 0  # public bound on a site's training count; 0 = the largest the sites reported
    update_compression: str = "fp16"  # fp16 | int8 | none: how a site's update (local - global) travels back
    patience: int = 65  # rounds without improvement before early stop; 0 = never stop early
    select_after: int = 40  # rounds before model selection may pick a round
    val_fraction: float = 0.1
    threshold: str = (
        "val"  # prognosis decision threshold: "val" (Youden's J on the training sites' validation) or a number
    )
    seed: int = 0
    device: str = "auto"
    torch_compile: bool = False  # local training's forward pass through torch.compile (long rounds on a GPU)
    num_workers: int = 0  # processes decoding DICOM files when a site builds its cache (0 = one per CPU core)
    round_timeout: float = 3600.0
    min_sites: int = 1  # rounds after discovery go on with at least this many training sites (k of n)
    rerun: bool = False  # a done unit whose fingerprint differs is run again (its stored result replaced)
    concurrent_units: int = 6  # units the server advances together, one round trip per round for all
    holdout_eval_every: int = 1  # held-out and test splits are evaluated every N rounds, and at the selected round
    site_cache: bool = True  # a process serving sites keeps their data and built models between messages
    site_cache_mb: int = 4096  # the byte budget of that cache (least recently used first out)
    pack_arrays: bool = True  # a unit's model and update travel as one Flower Array (mdmt.fed.packing)
    # The largest L2 norm of (site weights - global weights) over the float tensors that the server accepts
    # from a site in one round (mdmt.fed.validate); 0 = no bound. Honest norms measured on the synthetic
    # federation (resnet18, lr 1e-3, Adam): 7 after 1 step, 29 after 5, 285 after 200 (32 px), 288 after 15
    # (64 px, 3 epochs); Adam moves a weight about lr per step: lr x steps x sqrt(weights) (docs/robustness.md).
    update_norm_bound: float = 10000.0
    site_registry: str = ""  # deployment, server only: the node-id -> site file of registered keys (mdmt.fed.identity)

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def keys(cls) -> list[str]:
        return [f.name.replace("_", "-") for f in fields(cls)]

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], source: str = "run config") -> RunConfig:
        known = {f.name.replace("_", "-"): f for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in values.items():
            k = key.replace("_", "-")
            if k not in known:
                raise ConfigError(f"{source}: unknown key '{key}'; valid keys: {', '.join(sorted(known))}")
            kwargs[known[k].name] = _coerce(k, known[k], value, source)
        cfg = cls(**kwargs)
        cfg.validate(source)
        return cfg

    def replace(self, **changes: Any) -> RunConfig:
        cfg = dataclasses.replace(self, **changes)
        cfg.validate()
        return cfg

    def write_toml(self, path: Path) -> Path:
        """The full config as a TOML file of run-config keys (what ``flwr run --run-config`` reads)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(tomli_w.dumps(self.to_mapping()).encode())
        return path

    def to_mapping(self) -> dict[str, Any]:
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self)}

    # ---- validation ---------------------------------------------------------------------------
    def validate(self, source: str = "run config") -> None:

        def bad(key: str, msg: str) -> ConfigError:
            return ConfigError(f"{source}: '{key}' {msg}")

        for m in self.methods:
            if m not in METHODS:
                raise bad("method", f"has unknown method '{m}'; valid: {', '.join(METHODS)}")
        if not self.methods:
            raise bad("method", "is empty; give at least one method")
        for b in self.backbones:
            if b not in BACKBONES:
                raise bad("backbone", f"has unknown backbone '{b}'; valid: {', '.join(BACKBONES)}")
        if not self.backbones:
            raise bad("backbone", "is empty; give at least one backbone")
        choices = {
            "protocol": (self.protocol, PROTOCOLS),
            "loss-norm": (self.loss_norm, LOSS_NORMS),
            "device": (self.device, DEVICES),
            "aggregation": (self.aggregation, AGGREGATIONS),
            "augment": (self.augment, AUGMENTS),
            "class-weight": (self.class_weight, CLASS_WEIGHTS),
            "update-compression": (self.update_compression, COMPRESSION_MODES),
        }

        choices["crop"] = (self.crop, CROP_MODES)
        choices["voi"] = (self.voi, VOI_MODES)
        for key, (val, allowed) in choices.items():
            if val not in allowed:
                raise bad(key, f"is '{val}'; allowed: {', '.join(allowed)}")
        positive = {"image-size": self.image_size, "num-rounds": self.num_rounds, "batch-size": self.batch_size}
        for key, val in positive.items():
            if val <= 0:
                raise bad(key, f"must be > 0, got {val}")
        if self.image_size < MIN_IMAGE_SIZE:
            raise bad("image-size", f"must be at least {MIN_IMAGE_SIZE} pixels, got {self.image_size}")
        if self.num_workers < 0:
            raise bad("num-workers", f"must be >= 0 (0 = one per CPU core), got {self.num_workers}")
        at_least = {
            "local-epochs": (self.local_epochs, 0),
            "local-steps": (self.local_steps, 0),
            "weight-decay": (self.weight_decay, 0),
            "min-sites": (self.min_sites, 1),
            "concurrent-units": (self.concurrent_units, 1),
            "holdout-eval-every": (self.holdout_eval_every, 1),
            "site-cache-mb": (self.site_cache_mb, 1),
            "seed": (self.seed, 0),
            "dp-noise-multiplier": (self.dp_noise_multiplier, 0),
            "dp-target-epsilon": (self.dp_target_epsilon, 0),
            "dp-epsilon-budget": (self.dp_epsilon_budget, 0),
            "dp-delta": (self.dp_delta, 0),
        }
        for key, (val, low) in at_least.items():
            if val < low:
                raise bad(key, f"must be >= {low}, got {val}")
        for key, val in {"round-timeout": self.round_timeout, "dp-max-grad-norm": self.dp_max_grad_norm}.items():
            if val <= 0:
                raise bad(key, f"must be > 0, got {val}")
        if self.dp_delta >= 1:
            raise bad("dp-delta", f"must be below 1 (0 = 1/(10 N)), got {self.dp_delta}")
        if self.local_epochs <= 0 and self.local_steps <= 0:
            raise bad("local-epochs", "and 'local-steps' are both 0; set one of them > 0")
        if self.lr <= 0:
            raise bad("lr", f"must be > 0, got {self.lr}")
        if self.threshold != "val":
            try:
                ok = 0.0 < float(self.threshold) < 1.0
            except ValueError:
                ok = False
            if not ok:
                raise bad("threshold", f"is '{self.threshold}'; use 'val' or a number between 0 and 1")
        if not 0.0 < self.val_fraction < 0.5:
            raise bad("val-fraction", f"must be in (0, 0.5), got {self.val_fraction}")
        if self.patience < 0 or self.select_after < 0 or self.lr_patience < 0 or self.ft_phase1_rounds < 0:
            raise bad("patience", "'select-after', 'lr-patience' and 'ft-phase1-rounds' must be >= 0")
        if not 0.0 < self.lr_factor < 1.0:
            raise bad("lr-factor", f"must be in (0, 1), got {self.lr_factor}")
        if self.proximal_mu < 0 or self.min_lr < 0:
            raise bad("proximal-mu", "and 'min-lr' must be >= 0")
        if self.dp:
            self.dp_settings(epochs=1)  # raises with the key name
            if self.aggregation in ("fedprox", "fedbn"):
                raise bad(
                    "aggregation",
                    f"is '{self.aggregation}'; with dp = true use fedavg (DP-SGD replaces the "
                    "gradients FedProx adds to, and the DP model has no BatchNorm for FedBN)",
                )
        if self.update_norm_bound < 0:
            raise bad("update-norm-bound", f"must be >= 0 (0 = no bound), got {self.update_norm_bound}")
        if self.secure_aggregation and self.aggregation in ROBUST:
            raise bad(
                "aggregation",
                f"is '{self.aggregation}'; secure aggregation gives the server only the sum of the updates, "
                "so use fedavg, fedprox or fedbn with it",
            )
        if self.secagg_clip <= 0 or self.secagg_count_scale < 0:
            raise bad("secagg-clip", "must be > 0 and 'secagg-count-scale' >= 0")
        if self.cv_folds < 2:
            raise bad("cv-folds", f"must be at least 2, got {self.cv_folds}")
        for f in self.fold_list:
            if not f.isdigit() or int(f) >= self.cv_folds:
                raise bad("folds", f"has '{f}'; use fold numbers 0..{self.cv_folds - 1}")

    def dp_settings(self, epochs: int):
        """The DP-SGD settings of a site (mdmt.ml.privacy.DPSettings); ``epochs``: the local epochs the whole
        run takes at that site, which a target epsilon is spread over."""
        # deferred: torch (mdmt.ml.privacy); reading a config needs no torch
        from mdmt.ml.privacy import DPSettings

        return DPSettings(
            noise_multiplier=self.dp_noise_multiplier or None,
            target_epsilon=self.dp_target_epsilon or None,
            epochs=max(int(epochs), 1),
            max_grad_norm=self.dp_max_grad_norm,
            delta=self.dp_delta or None,
            epsilon_budget=self.dp_epsilon_budget,
            accountant=self.dp_accountant,
        )

    def check_server_files(self, source: str = "run config") -> None:
        """Files only the server reads (the sites never need the weights file: they get the model from it)."""
        if self.weights and not Path(self.weights).is_file():
            raise ConfigError(f"{source}: 'weights' file not found: {self.weights}")

    # ---- derived values -----------------------------------------------------------------------
    @property
    def methods(self) -> tuple[str, ...]:
        return _split_list(self.method)

    @property
    def backbones(self) -> tuple[str, ...]:
        return _split_list(self.backbone)

    @property
    def holdout_list(self) -> tuple[str, ...]:
        return _split_list(self.holdouts)

    @property
    def fold_list(self) -> tuple[str, ...]:
        return _split_list(self.folds)

    @property
    def cv_fold_list(self) -> tuple[str, ...]:
        return self.fold_list or tuple(str(k) for k in range(self.cv_folds))

    @property
    def site_list(self) -> tuple[str, ...]:
        return _split_list(self.sites)

    @property
    def workspace_path(self) -> Path:
        return Path(self.workspace).expanduser().resolve()

    @property
    def cache_path(self) -> Path:
        return cache_root(self.workspace_path, self.cache_dir or None)

    @property
    def store_path(self) -> Path:
        return Path(self.store).expanduser().resolve() if self.store else self.workspace_path / "store.sqlite"

    @property
    def fed_path(self) -> Path:
        return Path(self.fed_dir).expanduser().resolve()


def _coerce(key: str, f: dataclasses.Field, value: Any, source: str) -> Any:
    typ = f.type if isinstance(f.type, type) else {"int": int, "float": float, "bool": bool, "str": str}[f.type]
    try:
        if typ is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "1", "yes"):
                return True
            if str(value).lower() in ("false", "0", "no", ""):
                return False
            raise ValueError(value)
        if typ is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if typ is float:
            number = float(value)
            if not math.isfinite(number):
                raise ConfigError(f"{source}: '{key}' must be a finite number, got {value!r}")
            return number
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{source}: '{key}' must be {typ.__name__}, got {value!r}") from None


def load_toml(path: str | Path) -> dict[str, Any]:

    p = Path(path)
    try:
        return tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{p}: config file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: not valid TOML ({exc})") from None
