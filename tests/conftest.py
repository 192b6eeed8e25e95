"""Expensive fixtures, built once per test session: a small synthetic federation and one short real
Flower simulation over it (their outputs are read by several test modules)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Nothing a test starts may touch the user's ~/.flwr, uv cache or telemetry.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")


@pytest.fixture(scope="session")
def small_federation(tmp_path_factory) -> Path:
    """All seven sites at a small scale, DICOMs of ~96 px."""
    from mdmt.data.synth import synthesize

    out = tmp_path_factory.mktemp("fed") / "federation"
    synthesize(out, scale=0.04, image_size=96, seed=0, progress=False)
    return out


@pytest.fixture(scope="session")
def sim_run(small_federation, tmp_path_factory):
    """A real `flwr run` simulation through the LOCO driver: sites A, B, C and BRIXIA, A held out,
    every method, 2 rounds. Returns (config, table, printed lines)."""
    from mdmt.ops.loco import loco, prepare_config

    ws = tmp_path_factory.mktemp("ws")
    values = {
        "fed-dir": str(small_federation),
        "workspace": str(ws),
        "method": "mdmt,stl_prognosis,centralised_mdmt,stl_severity",
        "backbone": "resnet18",
        "num-rounds": 2,
        "image-size": 32,
        "holdouts": "A",
        "sites": "A,B,C,BRIXIA",
        "batch-size": 16,
        "seed": 0,
    }
    lines: list[str] = []
    table = loco(values, cpus_per_client=1.0, echo=lines.append)
    return prepare_config(values), table, lines
