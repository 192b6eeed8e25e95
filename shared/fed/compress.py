"""Update compression: what a site sends back after training is its update (local - global), not its
weights, so it can travel in fewer bits.

- ``fp16``: every floating-point update as float16 (half the bytes). A tensor whose update would not
  fit float16 (|value| > 65504) travels as float32.
- ``int8``: every floating-point update as int8 with one float32 scale per tensor (symmetric, round to
  nearest; a quarter of the bytes).
- ``none``: the site's weights as they are (float32).
Integer buffers (BatchNorm's ``num_batches_tracked``) always travel as they are. The server, which sent
the global model, adds the decoded update back (:func:`decode_update`) before aggregating.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from mdmt.errors import ProtocolError

MODES = ("fp16", "int8", "none")
SCALE = "::scale"  # int8: the key of a tensor's scale is its name + SCALE


def _numpy(v: Any) -> np.ndarray:
    if hasattr(v, "detach"):
        v = v.detach().cpu().numpy()
    return np.asarray(v)


def encode_update(local: Mapping[str, Any], base: Mapping[str, Any], mode: str) -> dict[str, np.ndarray]:
    """The arrays a site sends for its ``local`` weights, given the global weights ``base`` it received."""
    if mode not in MODES:
        raise ValueError(f"update compression '{mode}': allowed {', '.join(MODES)}")
    out: dict[str, np.ndarray] = {}
    for name, value in local.items():
        v = _numpy(value)
        if mode == "none" or v.dtype.kind != "f":
            out[name] = np.asarray(v, order="C")
            continue
        delta = v.astype(np.float32) - _numpy(base[name]).astype(np.float32)
        if mode == "fp16":
            with np.errstate(over="ignore"):
                half = delta.astype(np.float16)
            out[name] = half if np.isfinite(half).all() else delta
        else:
            peak = float(np.abs(delta).max()) if delta.size else 0.0
            scale = peak / 127.0 if peak > 0 else 1.0
            out[name] = np.clip(np.rint(delta / scale), -127, 127).astype(np.int8)
            out[name + SCALE] = np.array([scale], dtype=np.float32)
    return out


def decode_update(
    received: Mapping[str, np.ndarray], base: Mapping[str, np.ndarray], mode: str
) -> dict[str, np.ndarray]:
    """A site's weights from what it sent (:func:`encode_update`) and the global weights it was sent."""
    if mode == "none":
        return {k: np.asarray(v) for k, v in received.items()}
    missing = [k for k in base if k not in received]
    if missing:
        raise ProtocolError(f"update is missing {len(missing)} tensor(s), e.g. '{missing[0]}'")
    out: dict[str, np.ndarray] = {}
    for name, ref in base.items():
        v = np.asarray(received[name])
        if ref.dtype.kind != "f":
            out[name] = v
            continue
        if v.dtype == np.int8:
            if name + SCALE not in received:
                raise ProtocolError(f"int8 update of '{name}' arrived without its scale")
            delta = v.astype(np.float32) * np.float32(np.asarray(received[name + SCALE]).reshape(-1)[0])
        elif v.dtype.kind == "f":
            delta = v.astype(np.float32)
        else:
            raise ProtocolError(f"update of '{name}' has dtype {v.dtype}; expected a float or int8 update")
        if delta.shape != ref.shape:
            raise ProtocolError(f"update of '{name}' has shape {delta.shape}, the model {ref.shape}")
        out[name] = (ref.astype(np.float32) + delta).astype(ref.dtype)
    return out


def payload_bytes(arrays: Mapping[str, np.ndarray]) -> int:
    """Bytes of the arrays themselves (what a round trip carries, before message framing)."""
    return int(sum(np.asarray(v).nbytes for v in arrays.values()))
