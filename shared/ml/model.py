"""Backbone registry and the two-head MDMT network.

All 18 backbones of the paper build offline by name (torchvision ``weights=None`` / timm
``pretrained=False``). A local weights file can be loaded into the backbone; only the server needs it,
because it sends the initial model to the sites.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from mdmt.errors import ConfigError
from mdmt.ml.backbones import get_backbone_spec
from mdmt.ml.methods import PROGNOSIS, SEVERITY
from mdmt.ml.naming import NUM_CLASSES
from mdmt.ml.privacy import prepare_for_dp

# ImageNet normalisation, the statistics the paper's pretrained backbones expect.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _strip_torchvision_head(model: nn.Module) -> nn.Module:
    for attr in ("fc", "classifier"):
        if hasattr(model, attr):
            setattr(model, attr, nn.Identity())
            return model
    raise ConfigError(f"{type(model).__name__}: no classifier to remove")


def _load_state_file(path: str) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConfigError(
            f"weights file {path}: cannot be loaded as a PyTorch state dict ({exc.__class__.__name__})"
        ) from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ConfigError(f"weights file {path}: expected a state dict, got {type(state).__name__}")
    return state


def build_backbone(name: str, weights: str = "", pretrained: bool = False) -> tuple[nn.Module, int]:
    """The backbone without its classifier, returning pooled features, and its feature width."""
    spec = get_backbone_spec(name)
    if spec.library == "timm":
        # deferred: timm (slow to import; only its backbones need it)
        import timm

        kwargs: dict = {"num_classes": 0}
        if weights:
            kwargs.update(pretrained=True, pretrained_cfg_overlay={"file": str(Path(weights).resolve())})
        elif pretrained:
            kwargs["pretrained"] = True
        try:
            if pretrained and not weights and os.environ.get("MDMT_ALLOW_DOWNLOAD") != "1":
                os.environ.setdefault("HF_HUB_OFFLINE", "1")
            model = timm.create_model(name, **kwargs)
        except Exception as exc:
            raise ConfigError(_pretrained_error(name, weights, exc)) from None
        width = int(model.num_features)
    else:
        # deferred: torchvision (slow to import; only its backbones need it)
        import torchvision

        extra = {"aux_logits": False, "init_weights": True} if name == "googlenet" else {}
        try:
            model = torchvision.models.get_model(
                name, weights="DEFAULT" if pretrained and not weights else None, **extra
            )
        except Exception as exc:
            raise ConfigError(_pretrained_error(name, weights, exc)) from None
        model = _strip_torchvision_head(model)
        width = spec.feature_width
        if weights:
            state = _load_state_file(weights)
            state = {k: v for k, v in state.items() if not k.startswith(("fc.", "classifier."))}
            missing, unexpected = model.load_state_dict(state, strict=False)
            if unexpected or missing:
                raise ConfigError(
                    f"weights file {weights}: does not match {name} "
                    f"({len(missing)} missing, {len(unexpected)} unexpected keys, e.g. {(missing + unexpected)[0]})"
                )
    model.train()  # some timm builders return a model in eval mode
    if width != spec.feature_width:
        raise ConfigError(f"backbone {name}: feature width {width} differs from the registry's {spec.feature_width}")
    return model, width


def _pretrained_error(name: str, weights: str, exc: Exception) -> str:
    if weights:
        first = str(exc).splitlines()[0][:160]
        return f"weights file {weights}: cannot be loaded into {name} ({exc.__class__.__name__}: {first})"
    return (
        f"pretrained weights for {name} are not available offline; download them once elsewhere and pass "
        f"weights=/path/to/{name}.pth (set MDMT_ALLOW_DOWNLOAD=1 to let timm reach its hub)"
    )


def prognosis_head(width: int) -> nn.Sequential:
    """The paper's prognosis head: Linear(d,128)-ReLU-Dropout-Linear(128,32)-ReLU-Dropout-Linear(32,2)."""
    return nn.Sequential(
        nn.Linear(width, 128),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Linear(128, 32),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Linear(32, NUM_CLASSES[PROGNOSIS]),
    )


def severity_head(width: int) -> nn.Sequential:
    """The paper's brixia_Global head: ReLU-Dropout-Linear(d,4)."""
    return nn.Sequential(nn.ReLU(), nn.Dropout(0.5), nn.Linear(width, NUM_CLASSES[SEVERITY]))


class MDMTNet(nn.Module):
    """A shared backbone and two heads; one backbone pass serves both heads."""

    def __init__(self, backbone: nn.Module, width: int):
        super().__init__()
        self.backbone = backbone
        self.feature_width = width
        self.heads = nn.ModuleDict({PROGNOSIS: prognosis_head(width), SEVERITY: severity_head(width)})

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.backbone(x)
        if feats.ndim > 2:  # some backbones return unflattened pooled features
            feats = torch.flatten(feats, 1)
        return self.heads[PROGNOSIS](feats), self.heads[SEVERITY](feats)


def build_model(
    backbone: str, weights: str = "", pretrained: bool = False, seed: int | None = None, dp: bool = False
) -> MDMTNet:
    """The two-head model; with ``seed`` the random initialisation is reproducible. ``dp`` prepares it for
    DP-SGD (BatchNorm -> GroupNorm, no in-place ops; see mdmt.ml.privacy): server and sites must agree."""
    if seed is not None:
        torch.manual_seed(seed)
    bb, width = build_backbone(backbone, weights, pretrained)
    model = MDMTNet(bb, width)
    if dp:
        prepare_for_dp(model)
    return model
