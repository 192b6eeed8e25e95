"""Global-model checkpoints: latest and best per unit, each with its full config and the training
sites' manifest hashes, so a result can always be traced to the data that produced it."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch


def save_checkpoint(
    path: Path,
    arrays: dict[str, np.ndarray],
    *,
    round: int,
    unit_id: str,
    config: dict[str, Any],
    manifest_hashes: dict[str, str],
    extra: dict[str, Any] | None = None,
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "state_dict": {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()},
        "round": round,
        "unit_id": unit_id,
        "config": config,
        "manifest_hashes": manifest_hashes,
        **(extra or {}),
    }
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def arrays_digest(arrays: dict[str, Any]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes of a model's arrays (numpy or torch), in name order: equal
    digests mean bit-for-bit equal weights."""

    h = hashlib.sha256()
    for name in sorted(arrays):
        v = arrays[name]
        a = np.ascontiguousarray(v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else v)
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain values only: no code runs
