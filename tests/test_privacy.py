"""DP-SGD with Opacus through the one training loop (train_local with a DPRound): every paper backbone
takes a real private step after prepare_for_dp, the accountant survives a restart, the budget check agrees
with the epsilon reached and refuses the round that would pass it, a head without labels stays put."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from opacus.validators import ModuleValidator
from torch import nn

from mdmt.errors import ConfigError, DataError
from mdmt.ml.backbones import BACKBONES
from mdmt.ml.model import MDMTNet, build_model
from mdmt.ml.outcomes import TrainResult
from mdmt.ml.privacy import (
    DPRound,
    DPSettings,
    GroupNormDP,
    PrivateTraining,
    group_count,
    load_accountant,
    make_private_training,
    prepare_for_dp,
    projected_epsilon,
    read_accountant,
    sample_rate_for,
    steps_per_epoch,
    would_exceed,
)
from mdmt.ml.taskdata import TaskData
from mdmt.ml.train import train_local, trainable_parameters


@pytest.fixture(autouse=True)
def one_thread():
    # Two threads on a shared 2-core machine are far slower than one.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def task_data(n: int, size: int = 32, seed: int = 0, prog: bool = True, sev: bool = True) -> TaskData:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, size, size), dtype=np.uint8)
    y_prog = rng.integers(0, 2, n) if prog else np.full(n, -1)
    y_sev = rng.integers(0, 4, n) if sev else np.full(n, -1)
    return TaskData(images, y_prog.astype(np.int64), y_sev.astype(np.int64))


def tiny_model(seed: int = 0) -> MDMTNet:
    torch.manual_seed(seed)
    backbone = nn.Sequential(
        nn.Conv2d(3, 12, 3, stride=2),
        nn.BatchNorm2d(12),
        nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )
    return prepare_for_dp(MDMTNet(backbone, 12))


def private(model, data: TaskData, settings: DPSettings, batch_size: int = 4, seed: int = 0, tasks=None):
    tasks = tasks or [t for t, c in data.counts().items() if c > 0]
    opt = torch.optim.SGD(trainable_parameters(model, tasks), lr=0.05)
    return make_private_training(model, opt, n_samples=len(data), batch_size=batch_size, seed=seed, settings=settings)


def dp_train(
    model,
    data: TaskData,
    settings: DPSettings,
    *,
    steps: int = 0,
    epochs: int = 1,
    batch_size: int = 4,
    seed: int = 0,
    file=None,
    meta=None,
) -> TrainResult:
    return train_local(
        model,
        data,
        steps=steps,
        epochs=epochs,
        batch_size=batch_size,
        lr=0.05,
        seed=seed,
        dp=DPRound(settings, file, dict(meta or {})),
    )


def history(path) -> list:
    return read_accountant(path)["history"]


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


SETTINGS = DPSettings(noise_multiplier=1.0, max_grad_norm=1.0)


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_every_backbone_takes_a_real_dp_step(name, tmp_path):
    model = prepare_for_dp(build_model(name, seed=0))
    twin = prepare_for_dp(build_model(name, seed=0))
    assert not [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert any(isinstance(m, GroupNormDP) for m in model.modules())
    assert ModuleValidator.validate(model, strict=False) == []
    assert not [n for n, m in model.named_modules() if getattr(m, "inplace", False) is True]
    # The server and every site build the same prepared model.
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes == {k: tuple(v.shape) for k, v in twin.state_dict().items()}
    assert all(torch.equal(v, twin.state_dict()[k]) for k, v in model.state_dict().items())

    before = snapshot(model)
    data = task_data(4)
    settings = SETTINGS.resolve(len(data), 4)
    result = dp_train(model, data, settings, steps=1, file=tmp_path / "acct.json")
    assert result.steps == 1 and result.n_examples == 4 and not result.dp_refused
    after = snapshot(model)
    assert after.keys() == before.keys()
    assert all(not torch.equal(before[k], after[k]) for k in before), "a parameter did not move"
    assert all(torch.isfinite(v).all() for v in after.values())
    assert all(p.requires_grad for p in model.parameters())  # Opacus' wrapping is undone
    assert sum(h[2] for h in history(tmp_path / "acct.json")) == 1
    assert result.epsilon > 0
    assert result.epsilon == pytest.approx(projected_epsilon(history(tmp_path / "acct.json"), settings, 0, 1.0))


def test_group_count_and_fused_activation():
    assert [group_count(c) for c in (1280, 24, 40, 12, 6, 3)] == [32, 8, 8, 4, 2, 1]
    from timm.layers import BatchNormAct2d

    bn = BatchNormAct2d(24, act_layer=nn.SiLU)
    nn.init.normal_(bn.weight)
    gn = prepare_for_dp(nn.Sequential(bn))[0]
    assert isinstance(gn, GroupNormDP) and gn.norm.num_groups == 8
    assert isinstance(gn.act, nn.SiLU) and gn.act.inplace is False
    assert torch.equal(gn.norm.weight, bn.weight)
    x = torch.randn(2, 24, 5, 5)
    assert torch.allclose(gn(x), nn.functional.silu(nn.functional.group_norm(x, 8, bn.weight, bn.bias, bn.eps)))


def test_accountant_survives_a_restart(tmp_path):
    data = task_data(24, size=16)
    settings = SETTINGS.resolve(len(data), 4)
    path = tmp_path / "run-1" / "privacy" / "A.json"
    first = dp_train(tiny_model(), data, settings, steps=3, file=path, meta={"site": "A"})
    assert first.epsilon > 0
    assert [p.name for p in path.parent.iterdir()] == ["A.json"]  # no temporary file left behind
    doc = json.loads(path.read_text())
    assert doc["mechanism"] == "rdp" and sum(h[2] for h in doc["history"]) == 3
    assert doc["meta"] == {"site": "A", "delta": settings.delta}

    # A new process (a fresh model and engine) continues from the saved history.
    saved = history(path)
    second = dp_train(tiny_model(), data, settings, steps=2, seed=1, file=path, meta={"site": "A"})
    assert second.epsilon > first.epsilon
    assert second.epsilon == pytest.approx(projected_epsilon(saved, settings, 2, sample_rate_for(24, 4)), rel=1e-9)
    assert sum(h[2] for h in history(path)) == 5

    missing = private(tiny_model(), data, settings)
    load_accountant(missing.engine, tmp_path / "none.json")
    assert missing.epsilon() == 0.0


def test_accountant_file_errors_are_one_line(tmp_path):
    data = task_data(12, size=16)
    path = tmp_path / "A.json"
    dp_train(tiny_model(), data, SETTINGS.resolve(len(data), 4), steps=1, file=path)
    prv = private(tiny_model(), data, DPSettings(noise_multiplier=1.0, accountant="prv").resolve(len(data), 4))
    with pytest.raises(ConfigError, match="dp-accountant") as err:
        load_accountant(prv.engine, path)
    assert "\n" not in str(err.value)
    path.write_text("{not json")
    pt = private(tiny_model(), data, SETTINGS.resolve(len(data), 4))
    with pytest.raises(DataError, match="A.json") as err:
        load_accountant(pt.engine, path)
    assert "\n" not in str(err.value)


def test_prv_accountant_round_trip(tmp_path):
    data = task_data(12, size=16)
    settings = DPSettings(noise_multiplier=1.0, accountant="prv").resolve(len(data), 4)
    eps = dp_train(tiny_model(), data, settings, steps=2, file=tmp_path / "B.json").epsilon
    assert eps > 0
    again = private(tiny_model(), data, settings)
    load_accountant(again.engine.accountant, tmp_path / "B.json")
    assert again.epsilon() == pytest.approx(eps)


def test_budget_check_matches_the_epsilon_reached(tmp_path):
    data = task_data(20, size=16)
    base = SETTINGS.resolve(len(data), 4)
    q = sample_rate_for(len(data), 4)
    eps4, eps5 = projected_epsilon([], base, 4, q), projected_epsilon([], base, 5, q)
    assert 0 < eps4 < eps5
    settings = DPSettings(noise_multiplier=1.0, epsilon_budget=(eps4 + eps5) / 2).resolve(len(data), 4)
    assert not would_exceed([], settings, 4, q)
    assert would_exceed([], settings, 5, q)

    path = tmp_path / "A.json"
    model = tiny_model()
    four = dp_train(model, data, settings, steps=4, file=path)
    assert not four.dp_refused and four.epsilon == pytest.approx(eps4, rel=1e-9)
    assert four.epsilon <= settings.epsilon_budget
    assert not would_exceed(history(path), settings, 0, q)
    assert would_exceed(history(path), settings, 1, q)
    before = snapshot(model)
    refused = dp_train(model, data, settings, steps=1, file=path)  # one more step would pass the budget
    assert refused.dp_refused and refused.steps == 0 and refused.n_examples == 0
    assert refused.epsilon == pytest.approx(eps4, rel=1e-9)
    assert all(torch.equal(v, snapshot(model)[k]) for k, v in before.items())
    assert sum(h[2] for h in history(path)) == 4
    over = dp_train(model, data, base, steps=1, file=path)  # the step the check refused really overspends
    assert over.epsilon > settings.epsilon_budget
    assert over.epsilon == pytest.approx(eps5, rel=1e-9)
    assert not would_exceed(history(path), DPSettings(noise_multiplier=1.0).resolve(len(data), 4), 10**6, q)


def test_a_head_without_labels_at_the_site_does_not_move():
    model = prepare_for_dp(build_model("resnet18", seed=0))
    data = task_data(8, prog=True, sev=False)
    before = snapshot(model)
    result = dp_train(model, data, SETTINGS.resolve(len(data), 4), steps=2)
    assert result.n_task == {"prognosis": 8, "severity": 0}
    assert result.loss_task["severity"] == 0.0 and result.loss_task["prognosis"] > 0
    after = snapshot(model)
    sev = [k for k in before if k.startswith("heads.severity.")]
    others = [k for k in before if not k.startswith("heads.severity.")]
    assert sev and all(torch.equal(before[k], after[k]) for k in sev)
    assert all(not torch.equal(before[k], after[k]) for k in others)
    assert all(p.requires_grad for p in model.parameters())  # unfrozen again once the round ends


def test_empty_poisson_batches_still_take_a_noisy_step(tmp_path, monkeypatch):
    data = task_data(40, size=16)
    settings = SETTINGS.resolve(len(data), 1)  # sampling rate 1/40: about a third of the batches are empty
    noise_only = []
    step = PrivateTraining.noise_step
    monkeypatch.setattr(PrivateTraining, "noise_step", lambda self: (noise_only.append(1), step(self)))
    model = tiny_model()
    before = snapshot(model)
    result = dp_train(model, data, settings, epochs=1, batch_size=1, file=tmp_path / "acct.json")
    assert result.steps == steps_per_epoch(40, 1) == 40
    assert 0 < len(noise_only) < 40
    assert sum(h[2] for h in history(tmp_path / "acct.json")) == 40
    assert result.epsilon == pytest.approx(projected_epsilon([], settings, 40, 1 / 40), rel=1e-9)
    after = snapshot(model)
    assert all(not torch.equal(before[k], after[k]) for k in before)


def test_same_seed_same_private_update():
    data = task_data(16, size=16)
    settings = SETTINGS.resolve(len(data), 4)
    runs = []
    for seed in (3, 3, 4):
        model = tiny_model()
        dp_train(model, data, settings, steps=4, seed=seed)
        runs.append(snapshot(model))
    assert all(torch.equal(v, runs[1][k]) for k, v in runs[0].items())
    assert not all(torch.equal(v, runs[2][k]) for k, v in runs[0].items())


def test_target_epsilon_sets_the_noise_for_the_planned_epochs():
    n, bs, epochs = 50, 5, 3
    settings = DPSettings(target_epsilon=2.0, epochs=epochs).resolve(n, bs)
    assert settings.delta == pytest.approx(1 / (10 * n))
    assert settings.noise_multiplier > 0
    spent = projected_epsilon([], settings, epochs * steps_per_epoch(n, bs), sample_rate_for(n, bs))
    assert 1.9 < spent <= 2.0


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({}, "dp-noise-multiplier"),
        ({"noise_multiplier": 1.0, "target_epsilon": 3.0, "epochs": 1}, "dp-target-epsilon"),
        ({"noise_multiplier": 0.0}, "dp-noise-multiplier"),
        ({"target_epsilon": 3.0}, "dp-epochs"),
        ({"noise_multiplier": 1.0, "max_grad_norm": 0}, "dp-max-grad-norm"),
        ({"noise_multiplier": 1.0, "epsilon_budget": -1}, "dp-epsilon-budget"),
        ({"noise_multiplier": 1.0, "accountant": "moments"}, "dp-accountant"),
        ({"noise_multiplier": 1.0, "delta": 1.5}, "dp-delta"),
    ],
)
def test_bad_settings_are_one_line_errors(kwargs, key):
    with pytest.raises(ConfigError, match=key) as err:
        DPSettings(**kwargs)
    assert "\n" not in str(err.value)


def test_delta_must_be_below_one_over_n():
    with pytest.raises(ConfigError, match="dp-delta .*1/N") as err:
        DPSettings(noise_multiplier=1.0, delta=0.01).resolve(100, 8)
    assert "\n" not in str(err.value)
    assert DPSettings(noise_multiplier=1.0, delta=0.009).resolve(100, 8).delta == 0.009
    with pytest.raises(ConfigError, match="dp-target-epsilon"):
        DPSettings(target_epsilon=1e-9, epochs=50).resolve(100, 100)


def test_an_unprepared_model_is_refused():
    model = build_model("resnet18", seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ConfigError, match="prepare_for_dp") as err:
        make_private_training(model, opt, n_samples=8, batch_size=4, seed=0, settings=SETTINGS)
    assert "\n" not in str(err.value)
