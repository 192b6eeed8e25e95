"""The backbone registry: every paper backbone builds offline by name with its registered width."""

import pytest
import torch

from mdmt.errors import ConfigError
from mdmt.ml.backbones import BACKBONES
from mdmt.ml.model import build_model
from mdmt.ml.naming import head_of


def test_registry_has_the_papers_18_backbones():
    paper = {
        "densenet121",
        "densenet161",
        "densenet169",
        "densenet201",
        "googlenet",
        "mobilenet_v2",
        "resnet18",
        "resnet34",
        "resnet50",
        "resnet101",
        "wide_resnet50_2",
        "shufflenet_v2_x0_5",
        "shufflenet_v2_x1_0",
        "efficientnet_b0",
        "efficientnet_b1_pruned",
        "efficientnet_es",
        "efficientnet_es_pruned",
        "efficientnet_lite0",
    }
    assert set(BACKBONES) == paper


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_backbone_builds_and_both_heads_answer(name):
    model = build_model(name, seed=0)
    assert model.training
    model.eval()
    with torch.no_grad():
        lp, ls = model(torch.randn(2, 3, 64, 64))
    assert lp.shape == (2, 2) and ls.shape == (2, 4)
    assert model.heads["prognosis"][0].in_features == BACKBONES[name].feature_width
    keys = model.state_dict().keys()
    assert {head_of(k) for k in keys} == {None, "prognosis", "severity"}


def test_unknown_backbone_lists_valid_names():
    with pytest.raises(ConfigError, match="valid: .*resnet18"):
        build_model("resnet9000")


def test_seeded_build_is_reproducible():
    a = build_model("resnet18", seed=3).state_dict()
    b = build_model("resnet18", seed=3).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_local_weights_file_is_loaded(tmp_path):
    import torchvision

    src = torchvision.models.resnet18(weights=None)
    torch.nn.init.constant_(src.conv1.weight, 0.25)
    path = tmp_path / "r18.pth"
    torch.save(src.state_dict(), path)
    model = build_model("resnet18", weights=str(path))
    assert torch.all(model.backbone.conv1.weight == 0.25)


def test_bad_weights_file_is_one_line_error(tmp_path):
    path = tmp_path / "bad.pth"
    path.write_text("not a checkpoint")
    with pytest.raises(ConfigError) as err:
        build_model("resnet18", weights=str(path))
    assert "bad.pth" in str(err.value) and "\n" not in str(err.value)


def test_pretrained_offline_is_one_line_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", "/nonexistent-torch-home")
    with pytest.raises(ConfigError) as err:
        build_model("resnet18", pretrained=True)
    assert "weights=" in str(err.value) and "\n" not in str(err.value)
