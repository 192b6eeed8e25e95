"""A simulation joins a Ray cluster that is already running (RAY_ADDRESS), instead of starting its own:
the way to spread a grid over several machines, exercised here with one head on loopback."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

from mdmt.ops.launch import RAY_LOOPBACK_ENV, end_processes, processes_with_token

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_unit_runs_on_a_ray_head_started_beforehand(small_federation, tmp_path):
    token, port = uuid.uuid4().hex, _free_port()
    head_tmp = Path(tempfile.mkdtemp(prefix="mdmt-rayhead-"))  # Ray's socket paths must stay short
    env = dict(os.environ, MDMT_PROCESS_TOKEN=token, RAY_USAGE_STATS_ENABLED="0")
    env[RAY_LOOPBACK_ENV] = "0"  # the head binds loopback only
    start = [
        str(BIN / "ray"),
        "start",
        "--head",
        "--node-ip-address",
        "127.0.0.1",
        "--port",
        str(port),
        "--num-cpus",
        "2",
        "--temp-dir",
        str(head_tmp),
        "--include-dashboard",
        "false",
        "--disable-usage-stats",
    ]
    try:
        subprocess.run(start, env=env, check=True, capture_output=True, timeout=180)
        logs = head_tmp / "session_latest" / "logs"
        drivers_before = set(logs.glob("python-core-driver-*.log"))
        run = [
            str(BIN / "mdmt"),
            "loco",
            "--fed",
            str(small_federation),
            "--workspace",
            str(tmp_path / "ws"),
            "--method",
            "mdmt",
            "--holdouts",
            "A",
            "--rounds",
            "1",
            "--image-size",
            "32",
            "--batch-size",
            "16",
            "--set",
            "sites=A,B,BRIXIA",
        ]
        r = subprocess.run(
            run, env=dict(env, RAY_ADDRESS=f"127.0.0.1:{port}"), capture_output=True, text=True, timeout=900
        )
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        assert "| mdmt | resnet18 | A |" in r.stdout
        # The simulation's driver and its site actors ran in this head's session, not in a Ray of their own.
        drivers = set(logs.glob("python-core-driver-*.log")) - drivers_before
        assert drivers, "no driver of the simulation connected to the running head"
        assert any("ClientAppActor" in p.read_text(errors="replace") for p in logs.glob("*") if p.is_file())
    finally:
        end_processes(lambda: processes_with_token(token))  # the head and everything it started, by PID
        shutil.rmtree(head_tmp, ignore_errors=True)
    assert not processes_with_token(token)
