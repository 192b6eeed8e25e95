"""A site's images with their per-task targets, as numpy arrays (no torch): what training and evaluation
read, and what a site counts to answer the discovery query."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from mdmt.ml.methods import PROGNOSIS, SEVERITY


@dataclass
class TaskData:
    """Images and per-task targets (-1 = no label for that task, or not used by the method)."""

    images: np.ndarray  # uint8 (N, S, S)
    y_prog: np.ndarray  # int64 (N,)
    y_sev: np.ndarray  # int64 (N,)
    ids: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def subset(self, mask: np.ndarray) -> TaskData:
        idx = np.flatnonzero(mask)
        ids = [self.ids[i] for i in idx] if self.ids else []
        return TaskData(np.asarray(self.images[idx]), self.y_prog[idx], self.y_sev[idx], ids)

    @staticmethod
    def concat(parts: list[TaskData]) -> TaskData:
        return TaskData(
            np.concatenate([p.images for p in parts]),
            np.concatenate([p.y_prog for p in parts]),
            np.concatenate([p.y_sev for p in parts]),
            [i for p in parts for i in p.ids],
        )

    def labelled(self) -> TaskData:
        """The rows that carry at least one label (the rows a site trains on)."""
        return self.subset((self.y_prog >= 0) | (self.y_sev >= 0))

    def counts(self) -> dict[str, int]:
        return {PROGNOSIS: int((self.y_prog >= 0).sum()), SEVERITY: int((self.y_sev >= 0).sum())}
