"""The simulation launcher's command line: each simulated site's CPU and GPU share, and Ray kept on
loopback unless a cluster of several machines is named."""

from __future__ import annotations

from pathlib import Path

import pytest

from mdmt.errors import ConfigError
from mdmt.ops.launch import RAY_LOOPBACK_ENV, LocalSimulation, on_this_machine
from mdmt.ops.loco import gpus_for_sites


def _resources(cmd: list[str]) -> str:
    return cmd[cmd.index("--federation-config") + 1]


def test_sites_get_their_share_of_cpus_and_gpus(tmp_path):
    sim = LocalSimulation(tmp_path / "home")
    try:
        assert _resources(sim.flwr_run_command(Path("app"), Path("run.toml"), 7)) == (
            "num-supernodes=7 client-resources-num-cpus=1"
        )
        cmd = sim.flwr_run_command(Path("app"), Path("run.toml"), 7, cpus_per_client=0.5, gpus_per_client=0.25)
        assert _resources(cmd) == "num-supernodes=7 client-resources-num-cpus=0.5 client-resources-num-gpus=0.25"
    finally:
        sim.stop()
    assert gpus_for_sites(7, 0.25) == 0.25 and gpus_for_sites(7, 0) == 0.0
    with pytest.raises(ConfigError, match="--gpus-per-client must be >= 0"):
        gpus_for_sites(7, -1)
    import torch

    expected = min(1.0, torch.cuda.device_count() / 7) if torch.cuda.device_count() else 0.0
    assert gpus_for_sites(7, None) == expected


@pytest.mark.parametrize(
    "address, local",
    [
        ("", True),
        ("127.0.0.1:6379", True),
        ("localhost:6379", True),
        ("ray://127.0.0.1:10001", True),
        ("10.1.2.3:6379", False),
        ("head.example.org:6379", False),
    ],
)
def test_ray_stays_on_loopback_unless_a_cluster_of_machines_is_named(address, local, tmp_path, monkeypatch):
    assert on_this_machine(address) is local
    monkeypatch.delenv(RAY_LOOPBACK_ENV, raising=False)
    if address:
        monkeypatch.setenv("RAY_ADDRESS", address)
    else:
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
    sim = LocalSimulation(tmp_path / "home")
    try:
        assert (sim.env().get(RAY_LOOPBACK_ENV) == "0") is local
    finally:
        sim.stop()


def test_stopping_ends_a_process_started_after_the_first_look(tmp_path):
    """A parent outside the token (like Ray's daemons) starts one more marked child half a second after its
    first child is ended; stopping waits for things to settle and ends that child too."""
    import os
    import subprocess
    import sys
    import time
    import uuid

    from mdmt.ops.launch import TOKEN_VAR, end_processes, processes_with_token

    token = uuid.uuid4().hex
    marked = dict(os.environ, **{TOKEN_VAR: token})
    script = (
        "import subprocess, sys, time\n"
        "env = eval(sys.argv[1])\n"
        "child = subprocess.Popen(['sleep', '120'], env=env)\n"
        "open(sys.argv[2], 'w').close()\n"
        "child.wait(); time.sleep(0.5)\n"
        "subprocess.Popen(['sleep', '120'], env=env, start_new_session=True)\n"
    )
    ready = tmp_path / "ready"
    parent = subprocess.Popen([sys.executable, "-c", script, repr(marked), str(ready)])
    try:
        deadline = time.monotonic() + 30
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        first = processes_with_token(token)
        assert len(first) == 1
        end_processes(lambda: processes_with_token(token), grace=10)
        assert parent.wait(timeout=10) == 0
        assert processes_with_token(token) == []  # the replacement child was ended as well
    finally:
        if parent.poll() is None:
            parent.kill()
        end_processes(lambda: processes_with_token(token), grace=1)


def test_stopping_ends_descendants_that_do_not_show_the_token(tmp_path):
    """A marked parent starts a child with an empty environment (as a process that writes its title over
    its environment looks): the token alone misses it, the process tree does not, and stopping ends both."""
    import os
    import subprocess
    import sys
    import time
    import uuid

    from mdmt.ops.launch import TOKEN_VAR, descendants, end_processes, is_running, processes_with_token

    token = uuid.uuid4().hex
    child_pid = tmp_path / "child.pid"
    script = (
        "import subprocess, sys, time\n"
        "child = subprocess.Popen(['/bin/sleep', '120'], env={})\n"
        "open(sys.argv[1], 'w').write(str(child.pid))\n"
        "time.sleep(120)\n"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", script, str(child_pid)], env=dict(os.environ, **{TOKEN_VAR: token})
    )
    try:
        deadline = time.monotonic() + 30
        while not child_pid.exists() or not child_pid.read_text():
            assert time.monotonic() < deadline and parent.poll() is None
            time.sleep(0.05)
        child = int(child_pid.read_text())
        assert processes_with_token(token) == [parent.pid]  # the child shows no token
        assert descendants({parent.pid}) == [child] and descendants({child}) == []

        def find() -> list[int]:
            marked = set(processes_with_token(token))
            return sorted(marked | set(descendants(marked)))

        end_processes(find, grace=5)
        parent.wait(timeout=10)
        assert not is_running(child) and not is_running(parent.pid)
    finally:
        if parent.poll() is None:
            parent.kill()
        end_processes(lambda: processes_with_token(token), grace=1)
