"""The server's per-unit decisions over rounds: the learning rate it sends (reduced on a plateau of the
training sites' validation loss) and the selected round with early stopping."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from mdmt.fed.config import RunConfig


class ServerLR:
    """The learning rate the server sends each round: torch's ReduceLROnPlateau on the training sites'
    monitored validation loss (a round counts as an epoch); lr-patience 0 keeps it constant."""

    def __init__(self, cfg: RunConfig):

        self._param = torch.nn.Parameter(torch.zeros(1))
        self._opt = torch.optim.SGD([self._param], lr=cfg.lr)
        self._sched = (
            torch.optim.lr_scheduler.ReduceLROnPlateau(
                self._opt, mode="min", factor=cfg.lr_factor, patience=cfg.lr_patience, min_lr=cfg.min_lr
            )
            if cfg.lr_patience > 0
            else None
        )

    @property
    def lr(self) -> float:
        return float(self._opt.param_groups[0]["lr"])

    def step(self, val_loss: float) -> None:
        if self._sched is not None and not math.isnan(val_loss):
            self._sched.step(val_loss)

    def state(self) -> dict[str, Any]:
        return {"lr": self.lr, "scheduler": self._sched.state_dict() if self._sched is not None else None}

    def restore(self, state: dict[str, Any]) -> None:
        self._opt.param_groups[0]["lr"] = float(state["lr"])
        if self._sched is not None and state.get("scheduler") is not None:
            self._sched.load_state_dict(state["scheduler"])


@dataclass
class Selection:
    """Best round by the monitored task's validation loss over the training sites; early stopping in rounds."""

    patience: int = 0
    select_after: int = 0
    best_round: int | None = None
    best_loss: float = math.inf
    since_best: int = 0

    def update(self, rnd: int, loss: float) -> bool:
        """Record a round's loss; True when it becomes the selected round.

        Rounds up to ``select_after`` are only a fallback (kept in case the run ends that early); the
        first round after them replaces the fallback whatever its loss.
        """
        eligible = rnd > self.select_after
        fallback = self.best_round is None or self.best_round <= self.select_after
        better = not math.isnan(loss) and (self.best_round is None or loss < self.best_loss)
        if not math.isnan(loss) and ((eligible and fallback) or better):
            self.best_round, self.best_loss, self.since_best = rnd, loss, 0
            return True
        self.since_best += 1
        return False

    def should_stop(self, rnd: int) -> bool:
        return self.patience > 0 and rnd > self.select_after and self.since_best >= self.patience

    def state(self) -> dict[str, Any]:
        return {"best_round": self.best_round, "best_loss": self.best_loss, "since_best": self.since_best}

    def restore(self, state: dict[str, Any]) -> None:
        self.best_round, self.best_loss, self.since_best = state["best_round"], state["best_loss"], state["since_best"]
