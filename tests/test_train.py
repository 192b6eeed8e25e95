"""Local training and evaluation (shared.train) on every available device: the loop learns, masks
unused tasks, and its evaluation statistics add up. On a GPU machine the CUDA case runs too
(bf16 autocast, channels_last, pinned host batches)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shared.model import build_model
from shared.train import HIST_BINS, TaskData, evaluate, train_local

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _toy(n: int, size: int = 32, seed: int = 0) -> TaskData:
    """Bright blob = SEVERE / high severity class; prognosis labels on half the samples only."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    img = rng.normal(60, 20, (n, size, size))
    img[y == 1, size // 4 : size // 2, size // 4 : size // 2] += 120
    y_prog = np.where(np.arange(n) % 2 == 0, y, -1).astype(np.int64)
    y_sev = np.where(np.arange(n) % 2 == 1, 3 * y, -1).astype(np.int64)
    return TaskData(np.clip(img, 0, 255).astype(np.uint8), y_prog, y_sev, [f"img{i}" for i in range(n)])


@pytest.mark.parametrize("device", DEVICES)
def test_local_training_learns_and_reports_counts(device):
    data = _toy(96)
    model = build_model("resnet18", seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    first = train_local(model, data, epochs=1, batch_size=16, lr=1e-3, device=device, seed=0)
    last = first
    for s in range(1, 6):
        last = train_local(model, data, epochs=1, batch_size=16, lr=1e-3, device=device, seed=s)
    assert first.n_task == {"prognosis": 48, "severity": 48} and first.n_examples == 96
    assert first.steps == 6 and np.isfinite(last.loss)
    assert last.loss < first.loss
    after = model.state_dict()
    assert any(not torch.equal(before[k], after[k].cpu()) for k in before if before[k].is_floating_point())
    ev = evaluate(model, data, batch_size=32, device=device)
    assert ev.n == {"prognosis": 48, "severity": 48}
    assert ev.prog_cm.sum() == 48 and ev.sev_cm.sum() == 48 and ev.prog_hist.shape == (2, HIST_BINS)
    assert ev.prog_hist.sum() == 48 and (ev.prog_hist.sum(1) == ev.prog_cm.sum(1)).all()
    assert len(ev.predictions) == 96
    acc = np.trace(ev.prog_cm) / ev.prog_cm.sum()
    assert acc > 0.8, acc


def test_method_mask_excludes_unused_task():
    data = _toy(32)
    masked = TaskData(data.images, data.y_prog, np.full_like(data.y_sev, -1), data.ids)
    model = build_model("resnet18", seed=0)
    sev_before = {k: v.clone() for k, v in model.heads["severity"].state_dict().items()}
    res = train_local(model, masked, epochs=1, batch_size=8, device="cpu", seed=0)
    # only the 16 prognosis-labelled samples train; the severity head is left exactly as it was
    assert res.n_examples == 16 and res.n_task["severity"] == 0
    for k, v in model.heads["severity"].state_dict().items():
        assert torch.equal(v, sev_before[k])


def test_steps_override_epochs():
    model = build_model("resnet18", seed=0)
    res = train_local(model, _toy(40), epochs=5, steps=3, batch_size=8, device="cpu")
    assert res.steps == 3


def test_same_seed_same_weights():
    data = _toy(32)
    a, b = build_model("resnet18", seed=0), build_model("resnet18", seed=0)
    train_local(a, data, epochs=1, batch_size=8, device="cpu", seed=7)
    train_local(b, data, epochs=1, batch_size=8, device="cpu", seed=7)
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
