"""Task-aware federated averaging as one secure sum (no Flower types here).

Each site turns its update into one vector whose entries all lie in [-1, 1]:

    for every backbone key   (n_examples / S) * (local - global) / B
    for every head key       (n_task     / S) * (local - global) / B
    three last entries       n_examples / S,  n_prognosis / S,  n_severity / S

with S = ``count_scale`` (a public upper bound on any site's count) and B = ``clip`` (a public bound on
|local - global|; ``int_clip`` for integer buffers). The site checks both bounds and refuses to send a
vector that would break them, so the secure sum never clips. The server sees only the sum over sites:
it reads the summed counts from the last entries (rounded to integers) and divides each key's summed
weighted update by its task's total, which is exactly :func:`mdmt.fed.aggregate.task_aware_fedavg`
written as a sum. A head no site trained this round keeps its previous value.

Flower's SecAgg+ maps each entry x to an integer in [0, T] by stochastic rounding of (x + 1) * T / 2,
so each site's entry carries an error below 2 / T and a sum over k sites below 2k / T. For a key
weighted by a count whose total is C, the averaged value then differs from the plaintext average by
less than ``2 k B S / (T C)`` (see :func:`error_bound`), before the final cast to the key's dtype.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from mdmt.errors import ConfigError, MDMTError
from mdmt.fed import protocol as P
from mdmt.ml.methods import TASKS
from mdmt.ml.naming import head_of, is_bn_stat

# Keys of the ConfigRecord that carry the public packing parameters to the sites.
CFG_CLIP = "secagg-clip"
CFG_INT_CLIP = "secagg-int-clip"
CFG_COUNT_SCALE = "secagg-count-scale"

# The counts that travel inside the summed vector, in this order (the last entries).
COUNT_KEYS = (P.NUM_EXAMPLES,) + tuple(f"n-{t}" for t in TASKS)

# SecAgg+ arithmetic is modulo 2**32; every site's quantised entry lies in [0, T].
MODULUS = 2**32


class SecAggBoundError(MDMTError):
    """A site's update or count lies outside the public bounds of the secure sum."""


def count_key(task: str | None) -> str:
    """The count that weights a key of ``task`` (None: the backbone)."""
    return P.NUM_EXAMPLES if task is None else f"n-{task}"


def skip_for(aggregation: str) -> Callable[[str], bool] | None:
    """Keys left out of the secure sum: under fedbn the BatchNorm statistics stay at the sites."""
    return is_bn_stat if aggregation == "fedbn" else None


def quantization_range(n_sites: int, modulus: int = MODULUS) -> int:
    """The largest power of two T <= 2**30 with n_sites * T < modulus: the sum of n_sites entries in
    [0, T] (and of the n_sites weight factors T) never wraps around the modulus."""
    if n_sites < 1:
        raise ConfigError(f"secure aggregation needs at least one site, got {n_sites}")
    t = 1 << min(30, ((modulus - 1) // n_sites).bit_length() - 1)
    if t < 2:
        raise ConfigError(f"secure aggregation: {n_sites} sites leave no quantisation range below modulus {modulus}")
    return t


@dataclass(frozen=True)
class SecAggSpec:
    """The public bounds every site and the server agree on for one round."""

    clip: float = 8.0  # bound on |local - global| of every floating-point entry
    int_clip: float = float(2**20)  # bound on |local - global| of every integer entry (BatchNorm counters)
    count_scale: int = 100_000  # bound on any one site's count of examples per task

    def __post_init__(self) -> None:
        for key, value in ((CFG_CLIP, self.clip), (CFG_INT_CLIP, self.int_clip)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ConfigError(f"{key} must be a positive number, got {value!r}")
        if not (isinstance(self.count_scale, int) and self.count_scale >= 1):
            raise ConfigError(f"{CFG_COUNT_SCALE} must be a positive integer, got {self.count_scale!r}")

    def to_config(self) -> dict[str, Any]:
        return {CFG_CLIP: float(self.clip), CFG_INT_CLIP: float(self.int_clip), CFG_COUNT_SCALE: int(self.count_scale)}

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> SecAggSpec:
        missing = [k for k in (CFG_CLIP, CFG_INT_CLIP, CFG_COUNT_SCALE) if k not in cfg]
        if missing:
            raise ConfigError(
                f"secure aggregation: the train config lacks {', '.join(missing)}; "
                "the server must send the packing bounds with every secure round"
            )
        return cls(float(cfg[CFG_CLIP]), float(cfg[CFG_INT_CLIP]), int(cfg[CFG_COUNT_SCALE]))

    def check_sites(self, n_sites: int, modulus: int = MODULUS) -> int:
        """T for ``n_sites``; refuses a count scale whose summed counts could not be read back exactly."""
        t = quantization_range(n_sites, modulus)
        if 4 * n_sites * self.count_scale >= t:
            raise ConfigError(
                f"{CFG_COUNT_SCALE} = {self.count_scale} is too large for {n_sites} sites "
                f"(needs 4 * sites * scale < {t}); lower it"
            )
        return t


@dataclass(frozen=True)
class Entry:
    key: str
    shape: tuple[int, ...]
    dtype: np.dtype
    weight: str  # the count key that weights it
    integer: bool

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


def layout(reference: Mapping[str, np.ndarray], skip: Callable[[str], bool] | None = None) -> list[Entry]:
    """The order of the keys in the packed vector: the reference's own order, skipped keys left out."""
    out = []
    for key, arr in reference.items():
        if skip is not None and skip(key):
            continue
        arr = np.asarray(arr)
        integer = bool(np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.bool_))
        out.append(Entry(key, tuple(arr.shape), arr.dtype, count_key(head_of(key)), integer))
    return out


def pack_update(
    local: Mapping[str, np.ndarray],
    reference: Mapping[str, np.ndarray],
    n_examples: int,
    n_task: Mapping[str, int],
    spec: SecAggSpec,
    skip: Callable[[str], bool] | None = None,
) -> np.ndarray:
    """One site's contribution to the secure sum: float64, every entry in [-1, 1].

    ``reference`` is the global model the site received; ``local`` what it trained. Raises
    :class:`SecAggBoundError` (naming the key) when a count or an update lies outside ``spec``."""
    counts = {P.NUM_EXAMPLES: n_examples} | {count_key(t): n_task.get(t, 0) for t in TASKS}
    for key, c in counts.items():
        if int(c) != c or c < 0:
            raise SecAggBoundError(f"secure aggregation: count '{key}' = {c!r} must be a non-negative integer")
        if c > spec.count_scale:
            raise SecAggBoundError(
                f"secure aggregation: count '{key}' = {c} exceeds {CFG_COUNT_SCALE} "
                f"{spec.count_scale}; raise {CFG_COUNT_SCALE} on the server"
            )
    parts: list[np.ndarray] = []
    for e in layout(reference, skip):
        if e.key not in local:
            raise SecAggBoundError(
                f"secure aggregation: the update lacks key '{e.key}'; return every key of the global model"
            )
        w = counts[e.weight] / spec.count_scale
        if w == 0:
            parts.append(np.zeros(e.size))
            continue
        arr = np.asarray(local[e.key])
        if arr.size != e.size:  # () and (1,) are the same buffer: state dicts and records disagree on 0-d arrays
            raise SecAggBoundError(
                f"secure aggregation: '{e.key}' has shape {tuple(arr.shape)}, the global model {e.shape}"
            )
        d = arr.astype(np.float64).ravel() - np.asarray(reference[e.key], dtype=np.float64).ravel()
        peak = float(np.max(np.abs(d))) if d.size else 0.0
        bound, name = (spec.int_clip, CFG_INT_CLIP) if e.integer else (spec.clip, CFG_CLIP)
        if not math.isfinite(peak):
            raise SecAggBoundError(f"secure aggregation: '{e.key}' holds a non-finite value; the local model diverged")
        if peak > bound:
            raise SecAggBoundError(
                f"secure aggregation: |update| of '{e.key}' reaches {peak:.6g}, above {name} "
                f"{bound:g}; raise {name} on the server"
            )
        parts.append(d * (w / bound))
    parts.append(np.array([counts[k] / spec.count_scale for k in COUNT_KEYS], dtype=np.float64))
    return np.concatenate(parts)


def unpack_sum(
    total: np.ndarray, reference: Mapping[str, np.ndarray], spec: SecAggSpec, skip: Callable[[str], bool] | None = None
) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """The task-aware average from the sum of the sites' packed vectors, and the summed counts.

    Keys whose task no site trained, and skipped keys, keep the reference value; integer keys are
    rounded, every key keeps its dtype."""
    entries = layout(reference, skip)
    total = np.asarray(total, dtype=np.float64).ravel()
    expected = sum(e.size for e in entries) + len(COUNT_KEYS)
    if total.size != expected:
        raise MDMTError(
            f"secure aggregation: the summed vector has {total.size} entries, the model layout "
            f"{expected}; server and sites must pack the same keys"
        )
    scaled = total[-len(COUNT_KEYS) :] * spec.count_scale
    counts = {k: int(round(v)) for k, v in zip(COUNT_KEYS, scaled)}
    off = float(np.max(np.abs(scaled - np.round(scaled))))
    if off > 0.25:
        raise MDMTError(
            f"secure aggregation: the summed counts are {off:.3g} away from integers; the sum is "
            f"corrupt or {CFG_COUNT_SCALE} differs between sites"
        )
    out = {k: v for k, v in reference.items()}
    pos = 0
    for e in entries:
        seg = total[pos : pos + e.size]
        pos += e.size
        c = counts[e.weight]
        if c <= 0:
            continue
        bound = spec.int_clip if e.integer else spec.clip
        value = np.asarray(reference[e.key], dtype=np.float64) + (seg * (bound * spec.count_scale / c)).reshape(e.shape)
        out[e.key] = np.asarray(np.rint(value) if e.integer else value).astype(e.dtype)
    return out, counts


def error_bound(
    spec: SecAggSpec, n_sites: int, counts: Mapping[str, int], t: int, integer: bool = False
) -> dict[str, float]:
    """Per count key: the bound on |secure - plaintext average| of any entry it weights, before the
    cast to the key's dtype (add one unit in the last place of that dtype; integer keys may differ by
    one only where the plaintext mean lies within this bound of a half-integer)."""
    b = spec.int_clip if integer else spec.clip
    return {k: (2.0 * n_sites * b * spec.count_scale / (t * c) if c > 0 else 0.0) for k, c in counts.items()}
