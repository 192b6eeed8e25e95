"""`mdmt experiment`: a grid run as real Flower simulations; killed midway, a rerun finishes only the
missing units and every process the killed sweep started is gone."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from shared.errors import ConfigError
from shared.experiment import plan_groups, read_experiment

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent


def _write_config(path: Path, fed: Path, ws: Path) -> Path:
    path.write_text(
        f'fed-dir = "{fed}"\nworkspace = "{ws}"\nsites = "A,B,BRIXIA"\nmethod = "stl_prognosis,mdmt"\n'
        'backbone = "resnet18"\nprotocol = "loco"\nholdouts = "A,B"\nimage-size = 32\nnum-rounds = 2\n'
        "batch-size = 16\nselect-after = 0\npatience = 0\nlr-patience = 0\nseed = 0\n"
    )
    return path


def _units(store: Path) -> dict[str, tuple[str, float]]:
    if not store.is_file():
        return {}
    db = sqlite3.connect(store, timeout=30)
    try:
        return {u: (st, started) for u, st, started in db.execute("SELECT unit_id, status, started FROM units")}
    finally:
        db.close()


def _marked(marker: str) -> list[int]:
    needle = f"MDMT_TEST_MARK={marker}".encode()
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                environ = (entry / "environ").read_bytes()
                state = (entry / "stat").read_text().split(") ", 1)[1][0]
            except OSError:
                continue
            if needle in environ and state != "Z":
                out.append(int(entry.name))
    return out


def test_killed_sweep_resumes_with_only_the_missing_units(small_federation, tmp_path):
    ws = tmp_path / "ws"
    cfg = _write_config(tmp_path / "grid.toml", small_federation, ws)
    store = ws / "store.sqlite"
    marker = uuid.uuid4().hex
    env = os.environ | {"MDMT_TEST_MARK": marker, "FLWR_TELEMETRY_ENABLED": "0"}
    cmd = [sys.executable, "-m", "shared.cli", "experiment", str(cfg)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            if any(st == "done" for st, _ in _units(store).values()):
                break
            time.sleep(0.5)
        assert proc.poll() is None, "the sweep ended before it could be interrupted"
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, out
    deadline = time.monotonic() + 30
    while _marked(marker) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _marked(marker) == [], "processes of the interrupted sweep are still running"

    before = _units(store)
    done_before = {u: started for u, (st, started) in before.items() if st == "done"}
    assert 1 <= len(done_before) < 4

    rerun = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert f"4 units in 1 group(s), {4 - len(done_before)} to run" in rerun.stdout
    after = _units(store)
    assert sorted(after) == sorted(["stl_prognosis/resnet18/loco/A/seed0", "stl_prognosis/resnet18/loco/B/seed0",
                                    "mdmt/resnet18/loco/A/seed0", "mdmt/resnet18/loco/B/seed0"])
    assert all(st == "done" for st, _ in after.values())
    # Units finished before the kill were not run again.
    assert {u: after[u][1] for u in done_before} == done_before
    assert (ws / "reports").is_dir()
    assert _marked(marker) == []


def test_groups_split_by_backbone_and_protocol_with_workers(small_federation, tmp_path):
    cfg = _write_config(tmp_path / "grid.toml", small_federation, tmp_path / "ws")
    values, _ = read_experiment(cfg, {"backbone": "resnet18,mobilenet_v2", "protocol": "loco,cv"})
    groups = plan_groups(values, workers=2)
    assert [(g.protocol, g.backbone) for g in groups] == [
        ("loco", "resnet18"), ("loco", "mobilenet_v2"), ("cv", "resnet18"), ("cv", "mobilenet_v2")]
    assert len(plan_groups(values, workers=1)) == 2


def test_experiment_file_errors_name_the_key(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('method = "mdmt"\n[synth]\nscales = 1\n')
    with pytest.raises(ConfigError, match=r"unknown key\(s\) in \[synth\]: scales"):
        read_experiment(bad)
