"""Task-aware federated averaging on plain numpy state dicts.

The backbone is averaged over every site that trained, weighted by its training samples. Each head is
averaged only over the sites that trained it, weighted by that task's sample counts; a head no site
trained this round keeps the previous global value. Integer buffers keep their dtype.

The robust rules take the same sites for each tensor but no weights (a count is the site's own word):
``median`` is the coordinate-wise median (numpy), ``trimmed-mean`` the coordinate-wise mean after the
largest and smallest values are cut (scipy.stats.trim_mean; :func:`trim_count` values from each end).
One site, however far its update, then moves a coordinate no further than the honest sites' range.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy.stats import trim_mean

from mdmt.ml.naming import head_of

# How sites' updates are combined: task-aware FedAvg; FedProx adds its proximal term at the sites; FedBN keeps
# every site's BatchNorm statistics at the site; median and trimmed-mean are robust to a few bad updates.
ROBUST = ("median", "trimmed-mean")
AGGREGATIONS = ("fedavg", "fedprox", "fedbn", *ROBUST)
TRIM_FRACTION = 0.2  # trimmed-mean: the share of the sites cut from each end (at least one of 3 or more)


@dataclass
class SiteUpdate:
    site: str
    arrays: dict[str, np.ndarray]
    n_examples: int
    n_task: dict[str, int]


def _weighted_mean(values: list[np.ndarray], weights: list[float], dtype: np.dtype) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    acc = sum(wi * v.astype(np.float64) for wi, v in zip(w, values))
    if np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.bool_):
        return np.rint(acc).astype(dtype)
    return np.asarray(acc, dtype=dtype)


def trim_count(n: int) -> int:
    """trimmed-mean: how many values are cut from each end of ``n``."""
    return max(1, int(TRIM_FRACTION * n)) if n >= 3 else 0


def _robust(values: list[np.ndarray], rule: str, dtype: np.dtype) -> np.ndarray:
    stack = np.stack([v.astype(np.float64) for v in values])
    if rule == "median":
        acc = np.median(stack, axis=0)
    else:  # trim_mean cuts int(proportion * n) from each end; the half keeps that whole
        acc = trim_mean(stack, (trim_count(len(values)) + 0.5) / len(values), axis=0)
    if np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.bool_):
        return np.rint(acc).astype(dtype)
    return np.asarray(acc, dtype=dtype)


def _contributions(key: str, updates: list[SiteUpdate]) -> list[tuple[np.ndarray, int]]:
    """(array, weight) of every site that trained what ``key`` belongs to: the backbone, or one head."""
    task = head_of(key)
    if task is None:
        return [(u.arrays[key], u.n_examples) for u in updates if u.n_examples > 0]
    return [(u.arrays[key], u.n_task.get(task, 0)) for u in updates if u.n_task.get(task, 0) > 0]


def task_aware_fedavg(
    previous: dict[str, np.ndarray],
    updates: list[SiteUpdate],
    keep: Callable[[str], bool] | None = None,
    rule: str = "fedavg",
) -> dict[str, np.ndarray]:
    """The new global state; ``previous`` supplies keys nobody trained and the dtypes. Keys for which
    ``keep`` is true are not averaged (FedBN: the sites keep their own BatchNorm statistics). ``rule``
    median or trimmed-mean: the robust rule over the same sites, unweighted."""
    if not updates:
        return dict(previous)
    out: dict[str, np.ndarray] = {}
    for key, prev in previous.items():
        contrib = [] if keep is not None and keep(key) else _contributions(key, updates)
        if not contrib:
            out[key] = prev
            continue
        vals, weights = zip(*contrib)
        if rule in ROBUST:
            out[key] = _robust(list(vals), rule, prev.dtype)
        else:
            out[key] = _weighted_mean(list(vals), list(weights), prev.dtype)
    return out
