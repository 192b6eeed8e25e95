"""The published layouts end to end, as a user types it: `mdmt synth --layout`, `mdmt import`,
`mdmt loco` (a real Flower simulation), each a separate process."""

from __future__ import annotations

import subprocess
import sys

import pandas as pd
import pytest

pytestmark = pytest.mark.slow


def _mdmt(*args, cwd):
    r = subprocess.run([sys.executable, "-m", "mdmt.ops.cli", *map(str, args)], capture_output=True, text=True, cwd=cwd)
    assert r.returncode == 0, f"mdmt {' '.join(map(str, args))} failed:\n{r.stderr[-2000:]}"
    return r.stdout


def test_synth_layouts_import_and_loco(tmp_path):
    _mdmt(
        "synth",
        tmp_path / "aif",
        "--layout",
        "aiforcovid",
        "--scale",
        0.03,
        "--image-size",
        64,
        "--quiet",
        cwd=tmp_path,
    )
    _mdmt("synth", tmp_path / "brx", "--layout", "brixia", "--scale", 0.03, "--image-size", 64, "--quiet", cwd=tmp_path)
    out = _mdmt("import", "aiforcovid", tmp_path / "aif", tmp_path / "fed", "--quiet", cwd=tmp_path)
    assert "A " in out and "rejected: 0" in out
    _mdmt("import", "brixia", tmp_path / "brx", tmp_path / "fed", "--quiet", cwd=tmp_path)
    brixia = pd.read_csv(tmp_path / "fed" / "BRIXIA" / "manifest.csv", dtype=str, keep_default_na=False)
    assert brixia["brixia"].str.fullmatch(r"[0-3]{6}").all()
    out = _mdmt(
        "loco",
        "--fed",
        tmp_path / "fed",
        "--method",
        "mdmt",
        "--holdouts",
        "B",
        "--rounds",
        1,
        "--image-size",
        32,
        "--workspace",
        tmp_path / "ws",
        "--set",
        "sites=A,B,BRIXIA",
        cwd=tmp_path,
    )
    assert "| mdmt | resnet18 | B |" in out and "| mdmt | resnet18 | pooled |" in out
    table = pd.read_csv(tmp_path / "ws" / "reports" / "loco.csv")
    b = table[table["centre"] == "B"].iloc[0]
    assert b["n"] == len(pd.read_csv(tmp_path / "fed" / "B" / "manifest.csv"))
