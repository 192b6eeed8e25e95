"""DP-SGD with Opacus: every paper backbone takes a real private step after prepare_for_dp, the
accountant survives a restart, the budget check agrees with the epsilon reached, a head without labels
stays put."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from opacus.validators import ModuleValidator
from torch import nn

from mdmt.errors import ConfigError, DataError
from mdmt.ml.model import BACKBONES, MDMTNet, build_model
from mdmt.ml.privacy import (
    DPSettings,
    GroupNormDP,
    dp_train_steps,
    epsilon_spent,
    group_count,
    load_accountant,
    make_private_training,
    prepare_for_dp,
    projected_epsilon,
    read_accountant,
    sample_rate_for,
    save_accountant,
    steps_per_epoch,
    trainable_parameters,
    would_exceed,
)
from mdmt.ml.train import TaskData


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
        nn.Conv2d(3, 12, 3, stride=2), nn.BatchNorm2d(12), nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
    )
    return prepare_for_dp(MDMTNet(backbone, 12))


def private(model, data: TaskData, settings: DPSettings, batch_size: int = 4, seed: int = 0, tasks=None):
    tasks = tasks or [t for t, c in data.counts().items() if c > 0]
    opt = torch.optim.SGD(trainable_parameters(model, tasks), lr=0.05)
    return make_private_training(model, opt, n_samples=len(data), batch_size=batch_size, seed=seed,
                                 settings=settings)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


SETTINGS = DPSettings(noise_multiplier=1.0, max_grad_norm=1.0)


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_every_backbone_takes_a_real_dp_step(name):
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
    pt = private(model, data, SETTINGS.resolve(len(data), 4))
    result = dp_train_steps(pt, data, steps=1)
    assert result.steps == 1 and result.samples_seen == 4  # sampling rate 1: the whole batch
    trained = pt.close()
    after = snapshot(trained)
    assert after.keys() == before.keys()
    assert all(not torch.equal(before[k], after[k]) for k in before), "a parameter did not move"
    assert all(torch.isfinite(v).all() for v in after.values())
    assert result.epsilon > 0 and result.epsilon == pytest.approx(epsilon_spent(pt.engine, pt.settings.delta))


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
    pt = private(tiny_model(), data, settings)
    dp_train_steps(pt, data, steps=3)
    eps = pt.epsilon()
    assert eps > 0
    path = tmp_path / "run-1" / "privacy" / "A.json"
    save_accountant(pt.engine, path, site="A")
    assert [p.name for p in path.parent.iterdir()] == ["A.json"]  # no temporary file left behind
    doc = json.loads(path.read_text())
    assert doc["mechanism"] == "rdp" and sum(h[2] for h in doc["history"]) == 3 and doc["meta"] == {"site": "A"}

    fresh = private(tiny_model(), data, settings, seed=1)
    assert fresh.epsilon() == 0.0
    load_accountant(fresh.engine, path)
    assert fresh.epsilon() == pytest.approx(eps, rel=1e-12)
    saved = read_accountant(path)["history"]
    dp_train_steps(fresh, data, steps=2)
    assert fresh.epsilon() > eps
    assert fresh.epsilon() == pytest.approx(projected_epsilon(saved, settings, 2, fresh.sample_rate), rel=1e-9)
    assert sum(h[2] for h in fresh.engine.accountant.history) == 5

    missing = private(tiny_model(), data, settings)
    load_accountant(missing.engine, tmp_path / "none.json")
    assert missing.epsilon() == 0.0


def test_accountant_file_errors_are_one_line(tmp_path):
    data = task_data(12, size=16)
    pt = private(tiny_model(), data, SETTINGS.resolve(len(data), 4))
    dp_train_steps(pt, data, steps=1)
    path = save_accountant(pt.engine, tmp_path / "A.json")
    prv = private(tiny_model(), data, DPSettings(noise_multiplier=1.0, accountant="prv").resolve(len(data), 4))
    with pytest.raises(ConfigError, match="dp-accountant") as err:
        load_accountant(prv.engine, path)
    assert "\n" not in str(err.value)
    path.write_text("{not json")
    with pytest.raises(DataError, match="A.json") as err:
        load_accountant(pt.engine, path)
    assert "\n" not in str(err.value)


def test_prv_accountant_round_trip(tmp_path):
    data = task_data(12, size=16)
    settings = DPSettings(noise_multiplier=1.0, accountant="prv").resolve(len(data), 4)
    pt = private(tiny_model(), data, settings)
    dp_train_steps(pt, data, steps=2)
    eps = pt.epsilon()
    assert eps > 0
    save_accountant(pt.engine, tmp_path / "B.json")
    again = private(tiny_model(), data, settings)
    load_accountant(again.engine.accountant, tmp_path / "B.json")
    assert again.epsilon() == pytest.approx(eps)


def test_budget_check_matches_the_epsilon_reached():
    data = task_data(20, size=16)
    base = SETTINGS.resolve(len(data), 4)
    q = sample_rate_for(len(data), 4)
    eps4, eps5 = projected_epsilon([], base, 4, q), projected_epsilon([], base, 5, q)
    assert 0 < eps4 < eps5
    settings = DPSettings(noise_multiplier=1.0, epsilon_budget=(eps4 + eps5) / 2).resolve(len(data), 4)
    assert not would_exceed([], settings, 4, q)
    assert would_exceed([], settings, 5, q)

    pt = private(tiny_model(), data, settings)
    assert pt.sample_rate == q
    dp_train_steps(pt, data, steps=4)
    assert pt.epsilon() == pytest.approx(eps4, rel=1e-9) and pt.epsilon() <= settings.epsilon_budget
    assert not would_exceed(pt.engine, settings, 0, q)
    assert would_exceed(pt.engine, settings, 1, q) and pt.would_exceed(1)
    dp_train_steps(pt, data, steps=1)  # the step the check refused really overspends
    assert pt.epsilon() > settings.epsilon_budget
    assert pt.epsilon() == pytest.approx(eps5, rel=1e-9)
    assert not would_exceed(pt.engine, DPSettings(noise_multiplier=1.0).resolve(len(data), 4), 10**6, q)


def test_a_head_without_labels_at_the_site_does_not_move():
    model = prepare_for_dp(build_model("resnet18", seed=0))
    data = task_data(8, prog=True, sev=False)
    before = snapshot(model)
    pt = private(model, data, SETTINGS.resolve(len(data), 4))
    opt_params = {id(p) for p in pt.optimizer.params}
    assert not any(id(p) in opt_params for p in model.heads["severity"].parameters())
    result = dp_train_steps(pt, data, steps=2)
    assert result.loss_count["severity"] == 0 and result.loss_sum["severity"] == 0.0
    assert result.loss_count["prognosis"] == result.samples_seen > 0
    trained = pt.close()
    after = snapshot(trained)
    sev = [k for k in before if k.startswith("heads.severity.")]
    others = [k for k in before if not k.startswith("heads.severity.")]
    assert sev and all(torch.equal(before[k], after[k]) for k in sev)
    assert all(not torch.equal(before[k], after[k]) for k in others)
    assert all(p.requires_grad for p in trained.parameters())  # unfrozen again after close()


def test_empty_poisson_batches_still_take_a_noisy_step():
    data = task_data(40, size=16)
    settings = SETTINGS.resolve(len(data), 1)  # sampling rate 1/40: about a third of the batches are empty
    pt = private(tiny_model(), data, settings, batch_size=1)
    before = snapshot(pt.module)
    result = dp_train_steps(pt, data, epochs=1)
    assert result.steps == steps_per_epoch(40, 1) == 40
    assert result.empty_batches > 0 and result.samples_seen > 0
    assert sum(h[2] for h in pt.engine.accountant.history) == 40
    assert result.epsilon == pytest.approx(projected_epsilon([], settings, 40, 1 / 40), rel=1e-9)
    after = snapshot(pt.module)
    assert all(not torch.equal(before[k], after[k]) for k in before)


def test_same_seed_same_private_update():
    data = task_data(16, size=16)
    settings = SETTINGS.resolve(len(data), 4)
    runs = []
    for seed in (3, 3, 4):
        pt = private(tiny_model(), data, settings, seed=seed)
        result = dp_train_steps(pt, data, steps=4)
        runs.append((snapshot(pt.close()), result.samples_seen))
    assert runs[0][1] == runs[1][1]
    assert all(torch.equal(v, runs[1][0][k]) for k, v in runs[0][0].items())
    assert not all(torch.equal(v, runs[2][0][k]) for k, v in runs[0][0].items())


def test_target_epsilon_sets_the_noise_for_the_planned_epochs():
    n, bs, epochs = 50, 5, 3
    settings = DPSettings(target_epsilon=2.0, epochs=epochs).resolve(n, bs)
    assert settings.delta == pytest.approx(1 / (10 * n))
    assert settings.noise_multiplier > 0
    spent = projected_epsilon([], settings, epochs * steps_per_epoch(n, bs), sample_rate_for(n, bs))
    assert 1.9 < spent <= 2.0


@pytest.mark.parametrize("kwargs, key", [
    ({}, "dp-noise-multiplier"),
    ({"noise_multiplier": 1.0, "target_epsilon": 3.0, "epochs": 1}, "dp-target-epsilon"),
    ({"noise_multiplier": 0.0}, "dp-noise-multiplier"),
    ({"target_epsilon": 3.0}, "dp-epochs"),
    ({"noise_multiplier": 1.0, "max_grad_norm": 0}, "dp-max-grad-norm"),
    ({"noise_multiplier": 1.0, "epsilon_budget": -1}, "dp-epsilon-budget"),
    ({"noise_multiplier": 1.0, "accountant": "moments"}, "dp-accountant"),
    ({"noise_multiplier": 1.0, "delta": 1.5}, "dp-delta"),
])
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
