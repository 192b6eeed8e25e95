"""``mdmt bench``'s records and shared helpers: the settings, each figure and its printed line, the device
description, and the synthetic federation the ingest, round and scaling sections measure on."""

from __future__ import annotations

import os
import platform
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SECTIONS = ("train", "bytes", "ingest", "round", "warm", "scaling", "deploy")


@dataclass
class Settings:
    quick: bool = False
    device: str = "auto"
    backbone: str = "resnet18"
    image_size: int = 256
    batch_size: int = 128
    steps: int = 50
    compile: str = "auto"  # auto (both on a GPU, eager only on a CPU) | on | off
    scale: float = 1.0  # synthetic federation size for round/ingest (1.0 = the published datasets' counts)
    sim_image_size: int = 64
    rounds: int = 3
    scaling_sites: tuple[int, ...] = (2, 7, 20, 50)
    scaling_rounds: int = 2
    warm_units: int = 0  # LOCO units of the warm section (0 = one per prognosis centre)
    deploy_rounds: int = 20  # rounds of the deploy section's job (packed arrays)
    deploy_baseline_rounds: int = 3  # rounds of the same job with one Flower Array per tensor (0 = not run)
    workspace: Path = Path("runs/bench")
    fed_dir: Path | None = None  # an existing synthetic federation instead of making one at ``scale``

    @classmethod
    def for_mode(cls, quick: bool, **over: Any) -> Settings:
        s = (
            cls(
                quick=True,
                image_size=64,
                batch_size=32,
                steps=6,
                scale=0.04,
                sim_image_size=32,
                rounds=2,
                scaling_rounds=1,
                warm_units=2,
                deploy_rounds=3,
                deploy_baseline_rounds=0,
            )
            if quick
            else cls()
        )
        for k, v in over.items():
            if v is not None:
                setattr(s, k, v)
        return s


@dataclass
class Figure:
    section: str
    name: str
    value: float | None
    unit: str
    device: str
    settings: str
    note: str = ""

    def line(self) -> str:
        if self.value is None:
            shown = "not measured"
        elif self.unit == "MiB":
            shown = f"{self.value:,.1f} MiB"
        elif self.unit in ("img/s", "B") or abs(self.value) >= 100:
            shown = f"{self.value:,.0f} {self.unit}".rstrip()
        else:
            shown = f"{self.value:.3f} {self.unit}".rstrip()
        return f"{self.section:8} {self.name:44} {shown:>18}   {self.device}; {self.settings}" + (
            f" ({self.note})" if self.note else ""
        )


@dataclass
class Bench:
    settings: Settings
    command: str
    echo: Callable[[str], None] = print
    figures: list[Figure] = field(default_factory=list)

    def add(self, *args: Any, **kw: Any) -> Figure:
        f = Figure(*args, **kw)
        self.figures.append(f)
        self.echo(f.line())
        return f


def device_name(device) -> str:
    # deferred: torch, pydicom and flwr load per section, which is skipped where one is missing
    import torch

    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__})"
    return (
        f"CPU {platform.processor() or platform.machine()} x{os.cpu_count()} threads {torch.get_num_threads()} "
        f"(torch {torch.__version__})"
    )


def federation(s: Settings) -> Path:
    """The synthetic federation the round and ingest sections use (made once per scale)."""
    # deferred: torch, pydicom and flwr load per section, which is skipped where one is missing
    from mdmt.data.synth import synthesize

    if s.fed_dir is not None:
        return Path(s.fed_dir).resolve()
    fed = s.workspace / f"federation-{s.scale:g}"
    if not (fed / "BRIXIA" / "manifest.csv").is_file():
        synthesize(fed, scale=s.scale, image_size=max(64, min(s.image_size, 320)), seed=0, progress=False)
    return fed


def short_device(s: Settings) -> str:
    # deferred: torch, pydicom and flwr load per section, which is skipped where one is missing
    from mdmt.ml.train import resolve_device

    device = resolve_device(s.device)
    return device_name(device).split(" (torch")[0]


def fed_label(fed: Path) -> str:
    # deferred: torch, pydicom and flwr load per section, which is skipped where one is missing
    from mdmt.data.manifest import list_sites, read_manifest

    return f"federation {fed.name} ({sum(len(read_manifest(fed / x)) for x in list_sites(fed))} images)"
