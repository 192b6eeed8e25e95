"""Differentially private local training (DP-SGD with Opacus): no Flower types.

* :func:`prepare_for_dp` turns any registry model into one Opacus can train: every BatchNorm (subclasses
  such as timm's ``BatchNormAct2d`` included) becomes a :class:`GroupNormDP` (GroupNorm, a copy of its
  output, then the fused activation if any), and every in-place activation becomes out-of-place. Opacus'
  per-sample-gradient hooks wrap a hooked module's output in a view that must not be modified in place
  (``out += identity`` after a norm in ResNets, ``F.relu(x, inplace=True)`` in GoogLeNet and DenseNet);
  the copy after each norm makes those later in-place operations act on a plain tensor. The result is
  deterministic, so the server and every site build the same parameter names and shapes.
* :class:`DPSettings` holds the privacy parameters; :meth:`DPSettings.resolve` fills delta and the noise
  multiplier for one site.
* :func:`make_private_training` wraps a model and its optimiser with Opacus' ``PrivacyEngine`` (Poisson
  sampling over an index loader); :class:`DPRound` is what ``mdmt.ml.train.train_local`` takes to run its
  one training loop as DP-SGD.
* :func:`save_accountant` / :func:`load_accountant` keep the accountant's history across processes, and
  :func:`would_exceed` checks a round against the epsilon budget before any training.

Loss scaling: Opacus' ``loss_reduction="mean"`` assumes the loss is the mean over the batch of
per-sample losses (it rescales each per-sample gradient by the batch size). The MDMT loss is therefore
taken with ``norm="batch"`` (each task's masked sum divided by the batch size), which makes a sample's
gradient independent of the other samples in its batch, as the per-sample clipping bound requires.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mdmt.errors import ConfigError, DataError
from mdmt.seeding import derive_seed

ACCOUNTANTS = ("rdp", "prv")
GROUP_CHOICES = (32, 16, 8, 4, 2, 1)

# The kebab-case keys the settings are read from; error messages name them.
KEYS = {
    "noise_multiplier": "dp-noise-multiplier",
    "target_epsilon": "dp-target-epsilon",
    "epochs": "dp-epochs",
    "max_grad_norm": "dp-max-grad-norm",
    "delta": "dp-delta",
    "epsilon_budget": "dp-epsilon-budget",
    "accountant": "dp-accountant",
    "secure_mode": "dp-secure-mode",
}


# ---- model preparation -------------------------------------------------------------------------


def group_count(channels: int) -> int:
    """The largest of 32, 16, 8, 4, 2, 1 that divides ``channels``."""
    return next(g for g in GROUP_CHOICES if channels % g == 0)


class GroupNormDP(nn.Module):
    """GroupNorm replacing a BatchNorm; its output is copied before the (optional) fused activation so
    that no later in-place operation touches the output of the module Opacus hooks."""

    def __init__(
        self,
        num_channels: int,
        eps: float = 1e-5,
        affine: bool = True,
        act: nn.Module | None = None,
        drop: nn.Module | None = None,
    ):
        super().__init__()
        self.norm = nn.GroupNorm(group_count(num_channels), num_channels, eps=eps, affine=affine)
        self.drop = drop if drop is not None else nn.Identity()
        self.act = act if act is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(self.norm(x).clone()))


def _group_norm_for(bn: nn.modules.batchnorm._BatchNorm) -> GroupNormDP:
    act = getattr(bn, "act", None)  # timm BatchNormAct2d keeps its activation and dropout
    drop = getattr(bn, "drop", None)
    gn = GroupNormDP(
        bn.num_features,
        eps=bn.eps,
        affine=bn.affine,
        act=act if isinstance(act, nn.Module) else None,
        drop=drop if isinstance(drop, nn.Module) else None,
    )
    if bn.affine:
        with torch.no_grad():
            gn.norm.weight.copy_(bn.weight)
            gn.norm.bias.copy_(bn.bias)
    ref = next(bn.parameters(), None)
    if ref is not None:
        gn.to(device=ref.device, dtype=ref.dtype)
    return gn


def _replace_batchnorms(module: nn.Module) -> None:
    for name, child in list(module.named_children()):
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            setattr(module, name, _group_norm_for(child))
        else:
            _replace_batchnorms(child)


def _no_inplace(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(getattr(m, "inplace", None), bool) and m.inplace:
            m.inplace = False


def dp_problems(model: nn.Module) -> list[str]:
    """Why Opacus cannot train ``model`` (empty when it can): its validator's errors, BatchNorm subclasses
    it does not flag, and trainable layers holding buffers."""
    # deferred: opacus (slow to import; only DP runs need it)
    from opacus.grad_sample import GradSampleModule

    # deferred: opacus (slow to import; only DP runs need it)
    from opacus.validators import ModuleValidator

    out = [
        f"{name or type(model).__name__}: {type(m).__name__} is a BatchNorm"
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
    ]
    out += [str(e).splitlines()[0][:200] for e in ModuleValidator.validate(model, strict=False)]
    out += [str(e).splitlines()[0][:200] for e in GradSampleModule.validate(model, strict=False)]
    return out


def prepare_for_dp(model: nn.Module) -> nn.Module:
    """Make ``model`` trainable with Opacus (in place where possible; use the returned module).

    BatchNorms become :class:`GroupNormDP` (affine parameters copied, groups = the largest of 32..1 that
    divides the channels), in-place activations become out-of-place, and whatever else Opacus'
    ``ModuleValidator`` rejects is fixed by its own fixers. Raises :class:`ConfigError` if a problem remains.
    """
    # deferred: opacus (slow to import; only DP runs need it)
    from opacus.validators import ModuleValidator

    was_training = model.training
    if isinstance(model, nn.modules.batchnorm._BatchNorm):
        model = _group_norm_for(model)
    _replace_batchnorms(model)
    _no_inplace(model)
    model.train()
    if ModuleValidator.validate(model, strict=False):
        model = ModuleValidator.fix(model)
        _no_inplace(model)
        model.train()
    problems = dp_problems(model)
    if problems:
        raise ConfigError(f"model cannot be trained with differential privacy: {problems[0]}")
    model.train(was_training)
    return model


# ---- settings ----------------------------------------------------------------------------------


def sample_rate_for(n_samples: int, batch_size: int) -> float:
    """Opacus' Poisson sampling rate for a loader of ``batch_size`` over ``n_samples`` (1 / its length)."""
    return 1.0 / math.ceil(n_samples / batch_size)


def steps_per_epoch(n_samples: int, batch_size: int) -> int:
    return math.ceil(n_samples / batch_size)


@dataclass(frozen=True)
class DPSettings:
    """DP-SGD parameters. Give either ``noise_multiplier`` or ``target_epsilon`` with ``epochs`` (the
    total number of local epochs the noise must cover, e.g. rounds x local epochs). ``delta`` None means
    1 / (10 N) with N the site's training samples. ``epsilon_budget`` 0 means no budget."""

    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    epochs: int = 0
    max_grad_norm: float = 1.0
    delta: float | None = None
    epsilon_budget: float = 0.0
    accountant: str = "rdp"
    secure_mode: bool = False

    def __post_init__(self) -> None:
        k = KEYS
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ConfigError(
                f"{k['noise_multiplier']} or {k['target_epsilon']}: set exactly one of the two "
                f"(got {self.noise_multiplier} and {self.target_epsilon})"
            )
        if self.noise_multiplier is not None and not self.noise_multiplier > 0:
            raise ConfigError(f"{k['noise_multiplier']} must be > 0 (got {self.noise_multiplier})")
        if self.target_epsilon is not None:
            if not self.target_epsilon > 0:
                raise ConfigError(f"{k['target_epsilon']} must be > 0 (got {self.target_epsilon})")
            if int(self.epochs) < 1:
                raise ConfigError(
                    f"{k['epochs']} must be >= 1 with {k['target_epsilon']}: the total local epochs "
                    f"the noise must cover (got {self.epochs})"
                )
        if not self.max_grad_norm > 0:
            raise ConfigError(f"{k['max_grad_norm']} must be > 0 (got {self.max_grad_norm})")
        if self.delta is not None and not 0 < self.delta < 1:
            raise ConfigError(f"{k['delta']} must be in (0, 1), well below 1/N (got {self.delta})")
        if self.epsilon_budget < 0:
            raise ConfigError(f"{k['epsilon_budget']} must be >= 0, 0 = no budget (got {self.epsilon_budget})")
        if self.accountant not in ACCOUNTANTS:
            raise ConfigError(f"{k['accountant']} '{self.accountant}' is not one of: {', '.join(ACCOUNTANTS)}")
        if self.secure_mode and importlib.util.find_spec("torchcsprng") is None:
            raise ConfigError(
                f"{k['secure_mode']} = true needs the torchcsprng package; install it or set {k['secure_mode']} = false"
            )

    @property
    def resolved(self) -> bool:
        return self.noise_multiplier is not None and self.delta is not None

    def delta_for(self, n_samples: int) -> float:
        if n_samples < 1:
            raise ConfigError("differential privacy needs at least one training sample at the site")
        delta = self.delta if self.delta is not None else 1.0 / (10 * n_samples)
        if delta >= 1.0 / n_samples:
            raise ConfigError(
                f"{KEYS['delta']} = {delta:g} must be < 1/N = {1.0 / n_samples:g} for N = {n_samples} "
                f"training samples; lower it or leave it empty for 1/(10 N)"
            )
        return delta

    def resolve(self, n_samples: int, batch_size: int) -> DPSettings:
        """These settings for one site: delta filled in and, with a target epsilon, the noise multiplier
        computed by Opacus for ``epochs`` epochs at this site's sampling rate (the target is then dropped:
        the result carries the noise multiplier only)."""
        if batch_size < 1:
            raise ConfigError(f"batch-size must be >= 1 (got {batch_size})")
        delta = self.delta_for(n_samples)
        noise = self.noise_multiplier
        if noise is None:
            # deferred: opacus (slow to import; only DP runs need it)
            from opacus.accountants.utils import get_noise_multiplier

            try:
                noise = get_noise_multiplier(
                    target_epsilon=self.target_epsilon,
                    target_delta=delta,
                    sample_rate=sample_rate_for(n_samples, batch_size),
                    epochs=int(self.epochs),
                    accountant=self.accountant,
                )
            except ValueError as exc:
                raise ConfigError(
                    f"{KEYS['target_epsilon']} = {self.target_epsilon} cannot be reached with "
                    f"delta {delta:g} ({str(exc).rstrip('.')}); raise it"
                ) from None
        return replace(self, noise_multiplier=float(noise), target_epsilon=None, delta=float(delta))


# ---- accounting --------------------------------------------------------------------------------


def _accountant_of(obj: Any):
    # deferred: opacus (slow to import; only DP runs need it)
    from opacus.accountants.accountant import IAccountant

    if isinstance(obj, IAccountant):
        return obj
    acc = getattr(obj, "accountant", None)
    if isinstance(acc, IAccountant):
        return acc
    acc = getattr(getattr(obj, "engine", None), "accountant", None)
    if isinstance(acc, IAccountant):
        return acc
    raise TypeError(f"expected a PrivacyEngine or an Opacus accountant, got {type(obj).__name__}")


def _history_of(obj: Any) -> list[tuple[float, float, int]]:
    if isinstance(obj, (list, tuple)):
        hist = obj
    else:
        hist = _accountant_of(obj).history
    return [(float(s), float(q), int(n)) for s, q, n in hist]


def _epsilon(history: Sequence[tuple[float, float, int]], mechanism: str, delta: float) -> float:
    # deferred: opacus (slow to import; only DP runs need it)
    from opacus.accountants import create_accountant

    if not history:
        return 0.0
    acc = create_accountant(mechanism=mechanism)
    acc.history = [tuple(h) for h in history]
    return float(acc.get_epsilon(delta=delta))


def epsilon_spent(engine: Any, delta: float) -> float:
    """Epsilon spent so far by ``engine`` (a PrivacyEngine, a :class:`PrivateTraining` or an accountant)."""
    acc = _accountant_of(engine)
    return _epsilon(_history_of(acc), acc.mechanism(), delta)


def projected_epsilon(history: Any, settings: DPSettings, steps: int, sample_rate: float) -> float:
    """Epsilon after ``steps`` more steps at ``sample_rate`` on top of ``history`` (a list of Opacus
    ``(noise_multiplier, sample_rate, steps)`` entries, an accountant or an engine). ``settings`` must be
    resolved (:meth:`DPSettings.resolve`)."""
    if not settings.resolved:
        raise ValueError("projected_epsilon needs resolved settings: call settings.resolve(n_samples, batch_size)")
    hist = _history_of(history)
    if steps > 0:
        hist.append((float(settings.noise_multiplier), float(sample_rate), int(steps)))
    return _epsilon(hist, settings.accountant, float(settings.delta))


def would_exceed(history: Any, settings: DPSettings, steps: int, sample_rate: float) -> bool:
    """True when ``steps`` more DP-SGD steps would push epsilon past ``settings.epsilon_budget``
    (never with no budget). Computed with the accountant's own analysis, without training."""
    if settings.epsilon_budget <= 0:
        return False
    return projected_epsilon(history, settings, steps, sample_rate) > settings.epsilon_budget


def save_accountant(engine: Any, path: str | os.PathLike, **meta: Any) -> Path:
    """Write the accountant's mechanism and history (plus JSON-able ``meta``) to ``path`` atomically."""
    acc = _accountant_of(engine)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"mechanism": acc.mechanism(), "history": [list(h) for h in _history_of(acc)], "meta": meta}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(doc, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_accountant(path: str | os.PathLike) -> dict | None:
    """The saved ``{"mechanism", "history", "meta"}`` at ``path``, or None when there is none yet."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        doc = json.loads(path.read_text())
        history = [(float(s), float(q), int(n)) for s, q, n in doc["history"]]
        mechanism = str(doc["mechanism"])
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(
            f"privacy accountant file {path} is unreadable ({exc.__class__.__name__}); "
            f"restore it from a backup, never delete it to reset epsilon"
        ) from None
    return {"mechanism": mechanism, "history": history, "meta": doc.get("meta", {})}


def saved_epsilon(path: str | os.PathLike) -> float:
    """Epsilon of the history saved at ``path``, at the delta it was saved with (0 when none yet)."""
    doc = read_accountant(path)
    if doc is None or not doc["history"]:
        return 0.0
    delta = doc["meta"].get("delta")
    if not isinstance(delta, (int, float)) or not 0 < delta < 1:
        raise DataError(f"privacy accountant file {path} has no delta; restore it from a backup")
    return _epsilon(doc["history"], doc["mechanism"], float(delta))


def composed_epsilon(paths: Sequence[str | os.PathLike]) -> float:
    """Epsilon of one data set over several accountant files (one per unit that trained on it): the sum
    of each file's epsilon, sequential composition (its delta is the sum of theirs). A conservative bound
    that holds whatever mechanisms and deltas the units used."""
    return float(sum(saved_epsilon(p) for p in paths))


def load_accountant(engine_or_accountant: Any, path: str | os.PathLike):
    """Load the history saved at ``path`` into the accountant (nothing happens when the file does not
    exist yet); returns the accountant."""
    acc = _accountant_of(engine_or_accountant)
    doc = read_accountant(path)
    if doc is None:
        return acc
    if doc["mechanism"] != acc.mechanism():
        raise ConfigError(
            f"{KEYS['accountant']} is '{acc.mechanism()}' but {path} was written by the "
            f"'{doc['mechanism']}' accountant; keep {KEYS['accountant']} = {doc['mechanism']} for this run"
        )
    acc.load_state_dict({"history": list(doc["history"]), "mechanism": doc["mechanism"]})
    return acc


# ---- private training --------------------------------------------------------------------------


@dataclass
class PrivateTraining:
    """What :func:`make_private_training` returns: Opacus' wrapped model and optimiser, the Poisson
    index loader (batches are ``[LongTensor of sample indices]``), the engine and the resolved settings."""

    model: nn.Module  # opacus GradSampleModule; the trained module is model._module
    optimizer: torch.optim.Optimizer  # opacus DPOptimizer
    loader: torch.utils.data.DataLoader  # opacus DPDataLoader
    engine: Any  # opacus PrivacyEngine
    settings: DPSettings
    sample_rate: float
    n_samples: int
    frozen: list[nn.Parameter] = field(default_factory=list)

    @property
    def module(self) -> nn.Module:
        return self.model._module

    def epsilon(self) -> float:
        return epsilon_spent(self.engine, float(self.settings.delta))

    def would_exceed(self, steps: int) -> bool:
        return would_exceed(self.engine, self.settings, steps, self.sample_rate)

    def noise_step(self) -> None:
        """A Poisson batch with no sample: the update is noise only (zero per-sample gradients), and the
        accountant counts the step, as the sampled Gaussian mechanism's analysis assumes."""
        self.optimizer.zero_grad(set_to_none=True)
        for p in self.optimizer.params:
            p.grad_sample = p.new_zeros((0, *p.shape))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def close(self) -> nn.Module:
        """Remove Opacus' hooks, unfreeze what was frozen and return the plain trained module."""
        module = self.model.to_standard_module()
        for p in self.frozen:
            p.requires_grad_(True)
        self.frozen = []
        return module


def make_private_training(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    n_samples: int,
    batch_size: int,
    seed: int,
    settings: DPSettings,
) -> PrivateTraining:
    """Wrap ``model`` (prepared with :func:`prepare_for_dp`) and ``optimizer`` with Opacus' PrivacyEngine:
    per-sample clipping to ``max_grad_norm``, Gaussian noise, Poisson sampling over ``torch.arange(n_samples)``.

    Parameters of ``model`` that are not in ``optimizer`` are frozen (``requires_grad`` off until
    :meth:`PrivateTraining.close`) so that they get no per-sample gradient and do not move. With
    ``secure_mode`` off, sampling and noise come from generators seeded by ``seed``.
    """
    # deferred: opacus (slow to import; only DP runs need it)
    from opacus import PrivacyEngine

    if n_samples < 1:
        raise ConfigError("differential privacy needs at least one training sample at the site")
    resolved = settings if settings.resolved else settings.resolve(n_samples, batch_size)
    resolved.delta_for(n_samples)
    model.train()
    problems = dp_problems(model)
    if problems:
        raise ConfigError(f"model is not ready for differential privacy ({problems[0]}); build it with prepare_for_dp")
    in_opt = {id(p) for g in optimizer.param_groups for p in g["params"]}
    frozen = [p for p in model.parameters() if p.requires_grad and id(p) not in in_opt]
    for p in frozen:
        p.requires_grad_(False)
    device = next(model.parameters()).device
    sample_gen = noise_gen = None
    if not resolved.secure_mode:
        sample_gen = torch.Generator().manual_seed(derive_seed(seed, "dp", "sampling"))
        noise_gen = torch.Generator(device=device).manual_seed(derive_seed(seed, "dp", "noise"))
    index = torch.utils.data.TensorDataset(torch.arange(n_samples))
    loader = torch.utils.data.DataLoader(index, batch_size=batch_size, generator=sample_gen)
    engine = PrivacyEngine(accountant=resolved.accountant, secure_mode=resolved.secure_mode)
    try:
        private_model, private_opt, private_loader = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=float(resolved.noise_multiplier),
            max_grad_norm=float(resolved.max_grad_norm),
            loss_reduction="mean",
            poisson_sampling=True,
            noise_generator=noise_gen,
        )
    except BaseException:
        for p in frozen:
            p.requires_grad_(True)
        raise
    return PrivateTraining(
        private_model,
        private_opt,
        private_loader,
        engine,
        resolved,
        float(private_loader.sample_rate),
        n_samples,
        frozen,
    )


@dataclass(frozen=True)
class DPRound:
    """DP-SGD for one round of local training (``mdmt.ml.train.train_local(dp=...)``): the settings, and
    the file where a site keeps its accountant history across rounds and restarts (None: none kept)."""

    settings: DPSettings
    accountant_file: Path | None = None
    meta: dict[str, Any] = field(default_factory=dict)  # written beside the history (site, unit)

    def wrap(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, *, n_samples: int, batch_size: int, seed: int
    ) -> PrivateTraining:
        """Opacus around ``model`` and ``optimizer``, its accountant continued from the site's history."""
        private = make_private_training(
            model, optimizer, n_samples=n_samples, batch_size=batch_size, seed=seed, settings=self.settings
        )
        if self.accountant_file is not None:
            load_accountant(private.engine, self.accountant_file)
        return private

    def refuse(self, private: PrivateTraining) -> float:
        """Undo the wrapping of a round that will not train; the epsilon spent so far."""
        eps = private.epsilon()
        private.close()
        return eps

    def finish(self, private: PrivateTraining) -> float:
        """Save the accountant history and unwrap the model; the epsilon spent so far."""
        if self.accountant_file is not None:
            save_accountant(private.engine, self.accountant_file, **self.meta, delta=private.settings.delta)
        eps = private.epsilon()
        private.close()
        return eps
