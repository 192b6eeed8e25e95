"""How the MDMT network's tensors are named and sized: which state-dict keys belong to a task's head,
which are BatchNorm running statistics, how many classes each head predicts.

Torch-free: the server aggregates plain arrays by these names without loading a framework.
"""

from __future__ import annotations

from mdmt.ml.methods import PROGNOSIS, SEVERITY

NUM_CLASSES = {PROGNOSIS: 2, SEVERITY: 4}
HEAD_PREFIX = {PROGNOSIS: "heads.prognosis.", SEVERITY: "heads.severity."}
BN_STAT_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")


def head_of(key: str) -> str | None:
    """The task whose head owns a state-dict key, or None for a backbone key."""
    for task, prefix in HEAD_PREFIX.items():
        if key.startswith(prefix):
            return task
    return None


def is_bn_stat(key: str) -> bool:
    """A BatchNorm running statistic (what FedBN keeps at the site)."""
    return key.rsplit(".", 1)[-1] in BN_STAT_SUFFIXES
