"""The training recipe: augmentation, class weighting, FedProx, FedBN and the server-owned learning rate."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mdmt.fed.aggregate import SiteUpdate, task_aware_fedavg
from mdmt.fed.config import RunConfig
from mdmt.fed.selection import ServerLR
from mdmt.ml.augment import PaperAugment
from mdmt.ml.loss import mdmt_loss
from mdmt.ml.model import build_model
from mdmt.ml.naming import is_bn_stat
from mdmt.ml.taskdata import TaskData
from mdmt.ml.train import adapt_bn, balanced_class_weights, train_local


def _batch(n=6, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, size, size, generator=g)


def test_augment_off_is_identity_and_flip_alone_mirrors():
    x = _batch()
    gen = torch.Generator().manual_seed(0)
    assert torch.allclose(PaperAugment(p=0.0)(x, gen), x, atol=1e-6)
    flip_only = PaperAugment(p=1.0, shift=0.0, zoom=(1.0, 1.0), rotate_deg=0.0, elastic_alpha=(0.0, 0.0))
    assert torch.allclose(flip_only(x, torch.Generator().manual_seed(1)), torch.flip(x, dims=[3]), atol=1e-5)


def test_augment_is_seeded_per_sample_and_keeps_shape_and_range():
    x = _batch(n=8)
    aug = PaperAugment()
    a = aug(x, torch.Generator().manual_seed(3))
    b = aug(x, torch.Generator().manual_seed(3))
    c = aug(x, torch.Generator().manual_seed(4))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, c)
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    changed = [(not torch.allclose(a[i], x[i], atol=1e-4)) for i in range(len(x))]
    assert any(changed)  # with p = 0.5 per transform, some samples move


def test_balanced_class_weights_match_scikit_learn_and_the_weighted_loss_matches_torch():
    from sklearn.utils.class_weight import compute_class_weight

    y_prog = np.array([0, 0, 0, 1, -1, 0], dtype=np.int64)
    y_sev = np.array([-1, 2, 2, 3, 1, -1], dtype=np.int64)
    data = TaskData(np.zeros((6, 8, 8), np.uint8), y_prog, y_sev)
    w = balanced_class_weights(data)
    assert np.allclose(
        w["prognosis"].numpy(), compute_class_weight("balanced", classes=np.array([0, 1]), y=y_prog[y_prog >= 0])
    )
    sev_present = compute_class_weight("balanced", classes=np.array([1, 2, 3]), y=y_sev[y_sev >= 0])
    assert np.allclose(w["severity"].numpy(), [1.0, *sev_present])
    logits = torch.randn(6, 2, generator=torch.Generator().manual_seed(0))
    got = mdmt_loss(
        logits, torch.zeros(6, 4), torch.from_numpy(y_prog), torch.full((6,), -1), class_weights=w
    ).prognosis
    keep = y_prog >= 0
    want = torch.nn.CrossEntropyLoss(weight=w["prognosis"])(logits[keep], torch.from_numpy(y_prog[keep]))
    assert torch.allclose(got, want, atol=1e-6)


def _site_data(n=24, size=32, seed=0):
    rng = np.random.default_rng(seed)
    return TaskData(rng.integers(0, 255, (n, size, size), dtype=np.uint8), rng.integers(0, 2, n), np.full(n, -1))


def test_fedprox_keeps_the_local_model_near_the_global_one():
    torch.manual_seed(0)
    start = build_model("resnet18", seed=0).state_dict()
    moved = {}
    for mu in (0.0, 100.0):
        model = build_model("resnet18", seed=0)
        model.load_state_dict(start)
        train_local(model, _site_data(), epochs=2, batch_size=8, lr=1e-2, seed=1, augment=None, prox_mu=mu)
        moved[mu] = sum(
            float(((p - start[k]) ** 2).sum())
            for k, p in model.state_dict().items()
            if k.startswith("backbone") and p.dtype.is_floating_point and not is_bn_stat(k)
        )
    assert moved[100.0] < 0.5 * moved[0.0]


def test_fedbn_never_averages_batchnorm_statistics():
    prev = {"backbone.bn1.running_mean": np.zeros(3, np.float32), "backbone.bn1.weight": np.zeros(3, np.float32)}
    ups = [
        SiteUpdate(
            s,
            {"backbone.bn1.running_mean": np.full(3, v, np.float32), "backbone.bn1.weight": np.full(3, v, np.float32)},
            10,
            {"prognosis": 10, "severity": 0},
        )
        for s, v in (("A", 1.0), ("B", 3.0))
    ]
    out = task_aware_fedavg(prev, ups, keep=is_bn_stat)
    assert np.array_equal(out["backbone.bn1.running_mean"], prev["backbone.bn1.running_mean"])
    assert np.allclose(out["backbone.bn1.weight"], 2.0)


def test_adapt_bn_re_estimates_statistics_on_the_scored_images():
    model = build_model("resnet18", seed=0)
    bn = (
        model.backbone.bn1
        if hasattr(model.backbone, "bn1")
        else next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    )
    before = bn.running_mean.clone()
    adapt_bn(model, _site_data(n=16), batch_size=8)
    assert not torch.allclose(bn.running_mean, before) and not model.training


def test_server_lr_is_reduced_on_a_plateau_of_the_validation_loss():
    lr = ServerLR(RunConfig(lr=1e-3, lr_patience=2, lr_factor=0.5, min_lr=1e-8))
    seen = []
    for loss in (1.0, 0.9, 0.95, 0.95, 0.95, 0.95, float("nan")):
        lr.step(loss)
        seen.append(lr.lr)
    # 0.9 is the best; after more than 2 rounds without improvement the rate halves, and NaN changes nothing.
    assert seen == [1e-3, 1e-3, 1e-3, 1e-3, 5e-4, 5e-4, 5e-4]
    assert ServerLR(RunConfig(lr=1e-3, lr_patience=0)).lr == 1e-3


def test_recipe_keys_are_validated_with_the_key_name():
    from mdmt.errors import ConfigError

    with pytest.raises(ConfigError, match="'aggregation' is 'fedsgd'"):
        RunConfig.from_mapping({"aggregation": "fedsgd"})
    with pytest.raises(ConfigError, match="'lr-factor' must be in"):
        RunConfig.from_mapping({"lr-factor": 1.5})
    with pytest.raises(ConfigError, match="'folds' has '7'"):
        RunConfig.from_mapping({"protocol": "cv", "folds": "0,7"})


@pytest.mark.parametrize("side, sigma", [(16, 0.5), (64, 1.75), (256, 7.0)])
def test_separable_blur_equals_torchvision_gaussian_blur(side, sigma):
    import math

    from torchvision.transforms.v2.functional import gaussian_blur

    from mdmt.ml.augment import separable_gaussian_blur

    k = 2 * int(math.ceil(3 * sigma)) + 1
    x = torch.rand(3, 2, side, side, generator=torch.Generator().manual_seed(side)) * 2 - 1
    np.testing.assert_allclose(
        separable_gaussian_blur(x, k, sigma).numpy(), gaussian_blur(x, [k, k], [sigma, sigma]).numpy(), atol=1e-6
    )
