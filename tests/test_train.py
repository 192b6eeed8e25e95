"""Local training and evaluation (mdmt.ml.train) on every available device: the loop learns, masks
unused tasks, and its evaluation statistics add up. On a GPU machine the CUDA case runs too
(bf16 autocast, channels_last, pinned host batches)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mdmt.ml.metrics import HIST_BINS
from mdmt.ml.model import build_model
from mdmt.ml.taskdata import TaskData
from mdmt.ml.train import evaluate, train_local

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


@pytest.mark.parametrize(
    "device",
    ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))],
)
def test_feeder_take_gathers_the_same_batch_as_a_host_copy(device):
    from mdmt.ml.augment import PaperAugment
    from mdmt.ml.train import Feeder

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (40, 24, 24), dtype=np.uint8)
    dev = torch.device(device)
    feed = Feeder(dev, images)
    assert (feed.resident is not None) == (device == "cuda")  # on a GPU the whole uint8 set is copied once
    idx = rng.permutation(40)[:9]
    torch.testing.assert_close(feed.take(idx), feed(images[idx]))
    a = feed.take(idx, PaperAugment(), torch.Generator(device=dev).manual_seed(3))
    b = feed(images[idx], PaperAugment(), torch.Generator(device=dev).manual_seed(3))
    torch.testing.assert_close(a, b)
    assert a.shape == (9, 3, 24, 24)


@pytest.mark.slow
def test_compiled_training_follows_eager_training():
    data = TaskData(
        np.random.default_rng(1).integers(0, 256, (24, 32, 32), dtype=np.uint8),
        np.array([0, 1] * 12),
        np.array([-1] * 24),
    )
    runs = []
    for compiled in (False, True):
        model = build_model("resnet18", seed=0)
        for m in model.modules():  # compiled dropout draws other random numbers than eager dropout
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        res = train_local(model, data, steps=3, batch_size=8, seed=5, compile_model=compiled)
        runs.append((res, {k: v.detach().clone() for k, v in model.named_parameters()}))
    (eager, we), (comp, wc) = runs
    assert comp.steps == eager.steps == 3
    assert comp.loss == pytest.approx(eager.loss, rel=1e-3)
    # Adam moves a weight whose gradient is near zero by up to lr per step either way, so rounding
    # differences of the compiled kernels may flip such steps: bound them, and the typical difference.
    diffs = torch.cat([(wc[k] - we[k]).abs().flatten() for k in we])
    assert diffs.max() <= 2 * 3 * 1e-3 and diffs.mean() < 1e-4


@pytest.mark.parametrize(
    "n, batch, sizes", [(9, 8, [9]), (17, 8, [8, 9]), (16, 8, [8, 8]), (1, 8, [1]), (10, 8, [8, 2])]
)
def test_a_lone_last_sample_joins_the_previous_batch(n, batch, sizes):
    from mdmt.ml.train import _batches

    chunks = _batches(n, batch, np.random.default_rng(0))
    assert [len(c) for c in chunks] == sizes and sorted(np.concatenate(chunks).tolist()) == list(range(n))
