"""The indicator-masked multi-task loss.

L = sum_i [ I(x_i in t1) * L1(o1_i, y1_i) + I(x_i in t2) * L2(o2_i, y2_i) ], cross-entropy for both tasks.
Masks multiply per-sample losses (never index), so shapes stay static. A task term is normalised either
over that task's samples in the batch (``task``, the default) or over the whole batch (``batch``, the
paper code's behaviour). A batch with none of one task gives exactly zero for that term, never NaN.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class LossTerms:
    total: torch.Tensor
    prognosis: torch.Tensor
    severity: torch.Tensor


def masked_term(logits: torch.Tensor, target: torch.Tensor, norm: str) -> torch.Tensor:
    """One task's term; ``target`` is -1 where the sample has no label for this task."""
    mask = (target >= 0).to(logits.dtype)
    per_sample = F.cross_entropy(logits.float(), target.clamp_min(0), reduction="none")
    summed = (per_sample * mask.float()).sum()
    if norm == "task":
        return summed / mask.float().sum().clamp_min(1.0)
    if norm == "batch":
        return summed / max(int(target.shape[0]), 1)
    raise ValueError(f"loss normalisation '{norm}' is not 'task' or 'batch'")


def mdmt_loss(
    logits_prog: torch.Tensor,
    logits_sev: torch.Tensor,
    y_prog: torch.Tensor,
    y_sev: torch.Tensor,
    norm: str = "task",
    weight_prog: float = 1.0,
    weight_sev: float = 1.0,
) -> LossTerms:
    lp = masked_term(logits_prog, y_prog, norm)
    ls = masked_term(logits_sev, y_sev, norm)
    return LossTerms(weight_prog * lp + weight_sev * ls, lp, ls)
