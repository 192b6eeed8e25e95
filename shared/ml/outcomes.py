"""What a site's local training and evaluation produce, as plain data (no torch): the server reads
these types from the replies without loading a framework."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from mdmt.ml.methods import PROGNOSIS, SEVERITY

if TYPE_CHECKING:  # only a type here: reading a reply needs no pandas
    import pandas as pd


@dataclass
class TrainResult:
    n_examples: int
    n_task: dict[str, int]
    loss: float
    loss_task: dict[str, float]
    steps: int
    seconds: float
    epsilon: float = float("nan")  # DP-SGD: epsilon spent so far at this site for this unit
    dp_refused: bool = False  # DP-SGD: the site refused the round (its budget would be exceeded)

    @classmethod
    def untrained(cls, epsilon: float = float("nan"), refused: bool = False) -> TrainResult:
        """No step taken: the site has no labelled row, or refused a DP round that would exceed its budget."""
        return cls(
            0,
            {PROGNOSIS: 0, SEVERITY: 0},
            0.0,
            {PROGNOSIS: 0.0, SEVERITY: 0.0},
            0,
            0.0,
            epsilon=epsilon,
            dp_refused=refused,
        )


@dataclass
class EvalResult:
    """Sufficient statistics per task: the server computes ROC/AUC and pooled metrics from them."""

    n: dict[str, int]
    loss_sum: dict[str, float]
    prog_cm: np.ndarray  # 2x2 [true, pred]
    prog_hist: np.ndarray  # 2 x HIST_BINS: histogram of P(SEVERE) for true MILD (row 0) and SEVERE (row 1)
    sev_cm: np.ndarray  # 4x4 [true, pred]
    predictions: pd.DataFrame  # per-sample, stays at the site
    prog_auc: float = float("nan")  # the exact prognosis AUC of these rows (NaN when a class is absent)

    def mean_loss(self, task: str) -> float:
        return self.loss_sum[task] / self.n[task] if self.n[task] else float("nan")
