"""The ways a user starts a run, with real processes: `flwr run .` from the checkout against Flower's own
auto-started local SuperLink (offline, too few nodes refused before training, the LOCO table written at
the end), and `mdmt loco` twice at once on one workspace, interrupted with SIGINT, resumed, and re-run
once finished (no simulation started)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from mdmt.ops.launch import end_processes, processes_with_token

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _units(store: Path) -> dict[str, str]:
    if not store.is_file():
        return {}
    db = sqlite3.connect(store)
    try:
        return dict(db.execute("SELECT unit_id, status FROM units").fetchall())
    finally:
        db.close()


def test_flwr_run_from_the_checkout(small_federation, tmp_path):
    """The README's line: `flwr run . --stream --run-config FILE --federation-config num-supernodes=N`, with
    a private Flower home and free ports, and no dependency-installation setting in the caller's
    environment (make install put it into the virtual environment)."""
    token, ray_tmp = uuid.uuid4().hex, Path(tempfile.mkdtemp(prefix="mdmt-ray-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLWR_", "MDMT_WORKSPACE"))}
    env.update(
        FLWR_HOME=str(tmp_path / "flwr-home"),
        FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(_free_port()),
        FLWR_LOCAL_CONTROL_API_PORT=str(_free_port()),
        FLWR_TELEMETRY_ENABLED="0",
        UV_CACHE_DIR=str(tmp_path / "uv"),
        RAY_TMPDIR=str(ray_tmp),
        MDMT_PROCESS_TOKEN=token,
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
    )
    ws = tmp_path / "ws"
    config = tmp_path / "run.toml"
    config.write_text(
        f'fed-dir = "{small_federation}"\nworkspace = "{ws}"\nsites = "A,B,BRIXIA"\nmethod = "mdmt"\n'
        'holdouts = "A"\nnum-rounds = 1\nimage-size = 32\nbatch-size = 16\n'
    )

    def flwr_run(nodes: int) -> subprocess.CompletedProcess:
        cmd = [
            str(BIN / "flwr"),
            "run",
            ".",
            "--stream",
            "--run-config",
            str(config),
            "--federation-config",
            f"num-supernodes={nodes}",
        ]
        return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)

    try:
        short = flwr_run(2)
        out = short.stdout + short.stderr
        line = next(ln for ln in out.splitlines() if "configured sites answered" in ln)
        assert "only 2 of 3 configured sites answered" in line and "missing: BRIXIA" in line
        assert "num-supernodes=3" in line
        assert "Traceback" not in out, out[-3000:]
        assert _units(ws / "store.sqlite") == {}  # stopped before any training

        full = flwr_run(3)
        out = full.stdout + full.stderr
        assert full.returncode == 0, out[-3000:]
        assert "| mdmt | resnet18 | A |" in out and "LOCO table" in out, out[-3000:]
        assert _units(ws / "store.sqlite") == {"mdmt/resnet18/loco/A/seed0": "done"}
        assert (ws / "reports" / "loco.md").is_file() and (ws / "reports" / "loco.csv").is_file()
        assert list((ws / "configs").glob("serverapp-*.toml")) and list((ws / "logs").glob("serverapp-*.log"))
        assert "uv sync" not in (tmp_path / "flwr-home" / "local-superlink" / "superlink.log").read_text()
    finally:
        # Flower leaves its local SuperLink running: stop it and everything it started, by PID.
        end_processes(lambda: processes_with_token(token, f"RAY_TMPDIR={ray_tmp}"))
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert not processes_with_token(token)


def test_two_runs_on_one_workspace_then_sigint_then_resume(small_federation, tmp_path):
    ws = tmp_path / "ws"
    # "round 1:" is logged when round 1's validation arrives with round 2's training (one trip per round), so
    # rounds 3-5 are left to interrupt
    flags = "--method mdmt --holdouts A --rounds 5 --image-size 32 --batch-size 16 --set sites=A,B,C,BRIXIA"
    cmd = [str(BIN / "mdmt"), "loco", "--fed", str(small_federation), "--workspace", str(ws), *flags.split()]
    env = {k: v for k, v in os.environ.items() if k != "MDMT_WORKSPACE_OWNER"}
    env["PYTHONUNBUFFERED"] = "1"  # "round 1:" must reach the pipe when it is printed, not when the run ends
    # A run started as a background job (`make test &`) inherits SIGINT ignored; the first run here must take
    # Ctrl-C as a terminal user's run does.
    first = subprocess.Popen(
        cmd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    lines: list[str] = []
    try:
        for line in first.stdout:  # wait until a unit is training
            lines.append(line)
            if "round 1:" in line:
                break
        second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2, second.stdout + second.stderr
        assert second.stderr.strip().count("\n") == 0 and "Traceback" not in second.stderr
        assert f"is in use by process {first.pid}" in second.stderr and "--wait" in second.stderr
        first.send_signal(signal.SIGINT)
        rest, _ = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 130, "".join(lines) + rest
    statuses = _units(ws / "store.sqlite")
    assert "interrupted" in statuses.values() and "running" not in statuses.values(), statuses

    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert set(_units(ws / "store.sqlite").values()) == {"done"}
    db = sqlite3.connect(ws / "store.sqlite")
    resumed = db.execute("SELECT unit_id, detail FROM events WHERE kind='resumed'").fetchall()
    db.close()
    assert resumed, "the interrupted unit started again from round 1"

    # Finished work is not redone: no simulation starts, the table comes from the store.
    logs = set((ws / "logs").glob("flwr-*.log"))
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    seconds = time.perf_counter() - t0
    print(f"mdmt loco on a finished workspace: {seconds:.1f} s")
    assert done.returncode == 0 and "no simulation started" in done.stdout, done.stdout + done.stderr
    assert "| mdmt | resnet18 | pooled |" in done.stdout
    assert set((ws / "logs").glob("flwr-*.log")) == logs
