"""The choices the training recipe offers, each named once. The modules that act on them (mdmt.ml.loss,
mdmt.ml.augment, mdmt.ml.train) and the run config (mdmt.fed.config) both import them from here, so a
config is checked without loading torch."""

from __future__ import annotations

LOSS_NORMS = ("task", "batch")  # a task's loss term over that task's samples in the batch, or the whole batch
AUGMENTS = ("paper", "none")  # the paper's shift, zoom, flip, rotation and elastic deformation, or none
CLASS_WEIGHTS = ("none", "balanced")  # balanced: scikit-learn's inverse class frequency of a site's rows
DEVICES = ("auto", "cpu", "cuda")  # auto: cuda when one is visible
