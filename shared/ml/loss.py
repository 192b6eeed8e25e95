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

from mdmt.ml.options import LOSS_NORMS


@dataclass
class LossTerms:
    total: torch.Tensor
    prognosis: torch.Tensor
    severity: torch.Tensor


def masked_term(
    logits: torch.Tensor, target: torch.Tensor, norm: str, class_weight: torch.Tensor | None = None
) -> torch.Tensor:
    """One task's term; ``target`` is -1 where the sample has no label for this task. With
    ``class_weight`` each sample's loss is scaled by its class's weight and a ``task`` term is the
    weighted mean (as ``torch.nn.CrossEntropyLoss(weight=...)`` computes it)."""
    mask = (target >= 0).float()
    tgt = target.clamp_min(0)
    per_sample = F.cross_entropy(logits.float(), tgt, reduction="none")
    if class_weight is not None:
        mask = mask * class_weight.to(per_sample.device, torch.float32)[tgt]
    summed = (per_sample * mask).sum()
    if norm == "task":
        return summed / mask.sum().clamp_min(1e-12)  # no label in the batch: exactly 0
    if norm == "batch":
        return summed / max(int(target.shape[0]), 1)
    raise ValueError(f"loss normalisation '{norm}' is not one of {', '.join(LOSS_NORMS)}")


def mdmt_loss(
    logits_prog: torch.Tensor,
    logits_sev: torch.Tensor,
    y_prog: torch.Tensor,
    y_sev: torch.Tensor,
    norm: str = "task",
    class_weights: dict[str, torch.Tensor] | None = None,
) -> LossTerms:
    cw = class_weights or {}
    lp = masked_term(logits_prog, y_prog, norm, cw.get("prognosis"))
    ls = masked_term(logits_sev, y_sev, norm, cw.get("severity"))
    return LossTerms(lp + ls, lp, ls)
