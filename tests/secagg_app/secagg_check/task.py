"""The check's sites and their deterministic updates (no Flower): the test rebuilds every update from
these functions to compute the plaintext task-aware aggregate."""

from __future__ import annotations

import numpy as np

from mdmt.fed import protocol as P
from mdmt.fed.secagg import SecAggSpec
from mdmt.ml.naming import head_of

# partition -> (n_examples, n_prognosis, n_severity): a prognosis-only site, a severity-only site, a
# site with both labels, and a site whose round-1 update breaks the public bound.
SITES = {0: (40, 40, 0), 1: (25, 0, 25), 2: (60, 30, 50), 3: (30, 30, 0)}
OVER_BOUND = 3
SPEC = SecAggSpec(clip=0.5, count_scale=100)
NOISE = 0.05


def tiny_model() -> dict[str, np.ndarray]:
    """The project's key layout (backbone, BatchNorm buffers, both heads) at a few dozen entries."""
    rng = np.random.default_rng(7)
    shapes = {
        "backbone.conv1.weight": (4, 3, 3, 3),
        "backbone.bn1.weight": (4,),
        "backbone.bn1.bias": (4,),
        "backbone.bn1.running_mean": (4,),
        "backbone.bn1.running_var": (4,),
        "heads.prognosis.0.weight": (2, 4),
        "heads.prognosis.0.bias": (2,),
        "heads.severity.2.weight": (4, 4),
        "heads.severity.2.bias": (4,),
    }
    out = {k: rng.normal(0, 0.3, s).astype(np.float32) for k, s in shapes.items()}
    out["backbone.bn1.num_batches_tracked"] = np.array(12, dtype=np.int64)
    return out


def resnet18_model() -> dict[str, np.ndarray]:
    from mdmt.ml.model import build_model

    return {k: v.detach().cpu().numpy().copy() for k, v in build_model("resnet18", seed=0).state_dict().items()}


def counts(partition: int) -> dict[str, int]:
    n_ex, n_p, n_s = SITES[partition]
    return {P.NUM_EXAMPLES: n_ex, "n-prognosis": n_p, "n-severity": n_s}


def local_update(
    reference: dict[str, np.ndarray], partition: int, rnd: int
) -> tuple[dict[str, np.ndarray], dict[str, float | int]]:
    """What site ``partition`` returns in round ``rnd``: heads of tasks it has no labels for unchanged,
    everything else moved by seeded noise, integer buffers advanced by its step count."""
    c = counts(partition)
    rng = np.random.default_rng([partition, rnd])
    out: dict[str, np.ndarray] = {}
    for key, ref in reference.items():
        head = head_of(key)
        if head is not None and c[f"n-{head}"] == 0:
            out[key] = ref.copy()
        elif np.issubdtype(ref.dtype, np.integer):
            out[key] = np.asarray(ref + 3 * (partition + 1), dtype=ref.dtype)
        else:
            out[key] = (ref + NOISE * rng.standard_normal(ref.shape, dtype=np.float32)).astype(ref.dtype)
    if partition == OVER_BOUND and rnd == 1:
        first = next(k for k, v in reference.items() if np.issubdtype(v.dtype, np.floating))
        out[first] = out[first] + np.float32(2 * SPEC.clip)
    metrics = c | {
        "train-loss": 0.1 * (partition + 1),
        "train-loss-prognosis": 0.2,
        "train-loss-severity": 0.3,
        "steps": 3 * (partition + 1),
        "seconds": 0.01,
    }
    return out, metrics
