"""Task-aware federated averaging on plain numpy state dicts.

The backbone is averaged over every site that trained, weighted by its training samples. Each head is
averaged only over the sites that trained it, weighted by that task's sample counts; a head no site
trained this round keeps the previous global value. Integer buffers keep their dtype.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from mdmt.ml.naming import head_of

# How sites' updates are combined: task-aware FedAvg; FedProx adds its proximal term at the sites; FedBN keeps
# every site's BatchNorm statistics at the site.
AGGREGATIONS = ("fedavg", "fedprox", "fedbn")


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


def task_aware_fedavg(
    previous: dict[str, np.ndarray], updates: list[SiteUpdate], keep: Callable[[str], bool] | None = None
) -> dict[str, np.ndarray]:
    """The new global state; ``previous`` supplies keys nobody trained and the dtypes. Keys for which
    ``keep`` is true are not averaged (FedBN: the sites keep their own BatchNorm statistics)."""
    if not updates:
        return dict(previous)
    out: dict[str, np.ndarray] = {}
    for key, prev in previous.items():
        if keep is not None and keep(key):
            out[key] = prev
            continue
        task = head_of(key)
        if task is None:
            contrib = [(u.arrays[key], u.n_examples) for u in updates if u.n_examples > 0]
        else:
            contrib = [(u.arrays[key], u.n_task.get(task, 0)) for u in updates if u.n_task.get(task, 0) > 0]
        if not contrib:
            out[key] = prev
            continue
        vals, weights = zip(*contrib)
        out[key] = _weighted_mean(list(vals), list(weights), prev.dtype)
    return out
