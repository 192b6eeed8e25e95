"""The backbone registry: the paper's 18 backbones by name, their library and pooled feature width.

Torch-free, so a run config can name and check a backbone without loading a framework; mdmt.ml.model
builds them.
"""

from __future__ import annotations

from dataclasses import dataclass

from mdmt.errors import ConfigError


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    library: str  # torchvision | timm
    feature_width: int


BACKBONES: dict[str, BackboneSpec] = {
    s.name: s
    for s in (
        BackboneSpec("densenet121", "torchvision", 1024),
        BackboneSpec("densenet161", "torchvision", 2208),
        BackboneSpec("densenet169", "torchvision", 1664),
        BackboneSpec("densenet201", "torchvision", 1920),
        BackboneSpec("googlenet", "torchvision", 1024),
        BackboneSpec("mobilenet_v2", "torchvision", 1280),
        BackboneSpec("resnet18", "torchvision", 512),
        BackboneSpec("resnet34", "torchvision", 512),
        BackboneSpec("resnet50", "torchvision", 2048),
        BackboneSpec("resnet101", "torchvision", 2048),
        BackboneSpec("wide_resnet50_2", "torchvision", 2048),
        BackboneSpec("shufflenet_v2_x0_5", "torchvision", 1024),
        BackboneSpec("shufflenet_v2_x1_0", "torchvision", 1024),
        BackboneSpec("efficientnet_b0", "timm", 1280),
        BackboneSpec("efficientnet_b1_pruned", "timm", 1280),
        BackboneSpec("efficientnet_es", "timm", 1280),
        BackboneSpec("efficientnet_es_pruned", "timm", 1280),
        BackboneSpec("efficientnet_lite0", "timm", 1280),
    )
}


def get_backbone_spec(name: str) -> BackboneSpec:
    try:
        return BACKBONES[name]
    except KeyError:
        raise ConfigError(f"unknown backbone '{name}'; valid: {', '.join(BACKBONES)}") from None
