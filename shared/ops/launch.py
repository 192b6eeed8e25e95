"""Start and stop a local Flower simulation SuperLink that this process owns.

``flwr run`` against ``:local:`` would start a detached SuperLink on fixed ports, reuse any SuperLink
that answers there, write to ~/.flwr and leave the process running. Instead we start
``flower-superlink --simulation`` ourselves on free loopback ports, with a private FLWR_HOME, Ray temp
folder and uv cache, and address it explicitly. Every process we start (and its Ray daemons, which
re-parent to init) carries a private token in its environment; stopping ends exactly those processes.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx

from mdmt.errors import MDMTError

CONNECTION = "mdmt-local"
TOKEN_VAR = "MDMT_PROCESS_TOKEN"
_ACTIVE: set[LocalSimulation] = set()  # started in this process and not yet stopped


RAY_LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": Ray uses 127.0.0.1, for a cluster of one machine


def on_this_machine(ray_address: str) -> bool:
    """No Ray cluster named, or one on loopback: the simulation's Ray stays on this machine."""
    host = ray_address.split("://")[-1].rsplit(":", 1)[0].strip("[]")
    return not ray_address or host in ("localhost", "::1") or host.startswith("127.")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _bin(name: str) -> str:
    """A console script of this Python environment (also when it is not on PATH)."""
    cand = Path(sys.executable).parent / name
    return str(cand) if cand.exists() else (shutil.which(name) or name)


def processes_with_token(token: str, *extra: str) -> list[int]:
    """PIDs whose environment holds ``MDMT_PROCESS_TOKEN=<token>`` or any of the ``extra`` entries."""
    pids = []
    needles = [f"{TOKEN_VAR}={token}".encode(), *(e.encode() for e in extra)]
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if any(n + b"\0" in environ + b"\0" for n in needles):
            pids.append(int(entry.name))
    return pids


def descendants(roots: set[int]) -> list[int]:
    """Every PID whose chain of parents (from /proc/<pid>/stat) leads to one of ``roots``, roots excluded.
    This finds the processes that do not show an environment: one that wrote its title over it (nginx),
    or a fork caught before it could be read."""
    parent_of = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parent_of[int(stat.parent.name)] = int(fields[1])
        except (OSError, IndexError, ValueError):
            continue
    found, frontier = set(), set(roots)
    while frontier:
        frontier = {pid for pid, parent in parent_of.items() if parent in frontier and pid not in found}
        found |= frontier
    return sorted(found - set(roots))


class LocalSimulation:
    """A simulation SuperLink on free ports under ``home`` (its FLWR_HOME); use as a context manager."""

    def __init__(self, home: Path, log_file: Path | None = None):
        self.home = Path(home).resolve()
        self.token = uuid.uuid4().hex
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self.log_file = log_file or self.home / "superlink.log"
        # Ray's socket paths must stay short: its temp folder goes under /tmp, not the workspace.
        self.ray_tmp = Path(tempfile.mkdtemp(prefix="mdmt-ray-"))

    def env(self) -> dict[str, str]:
        env = os.environ.copy()
        env.update(
            {
                "FLWR_HOME": str(self.home),
                "FLWR_TELEMETRY_ENABLED": "0",
                "FLWR_DISABLE_UPDATE_CHECK": "1",
                "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
                "UV_CACHE_DIR": str(self.home / "uv-cache"),
                "RAY_TMPDIR": str(self.ray_tmp),
                "RAY_USAGE_STATS_ENABLED": "0",
                TOKEN_VAR: self.token,
            }
        )
        if on_this_machine(env.get("RAY_ADDRESS", "")):
            # Ray binds its processes to loopback instead of the host's network address.
            env.setdefault(RAY_LOOPBACK_ENV, "0")
        # The SuperLink spawns Flower's other executables by name: they must come from this environment.
        bindir = str(Path(sys.executable).parent)
        env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
        return env

    def start(self, timeout: float = 60.0) -> LocalSimulation:
        self.home.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        control = free_port()
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "127.0.0.1:{self.port}"\ninsecure = true\n'
        )
        cmd = [
            _bin("flower-superlink"),
            "--insecure",
            "--simulation",
            "--isolation",
            "subprocess",
            "--disable-runtime-dependency-installation",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--control-api-address",
            f"127.0.0.1:{control}",
        ]
        log = open(self.log_file, "ab")
        self.proc = subprocess.Popen(
            cmd, env=self.env(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise MDMTError(f"flower-superlink exited with code {self.proc.returncode}; see {self.log_file}")
            if self._healthy():
                return self
            time.sleep(0.3)
        self.stop()
        raise MDMTError(
            f"flower-superlink did not answer on 127.0.0.1:{self.port} within {timeout:.0f}s; see {self.log_file}"
        )

    def _healthy(self) -> bool:

        try:
            return httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=1.0).is_success
        except httpx.HTTPError:
            return False

    def flwr_run_command(
        self,
        app_dir: Path,
        run_config: Path,
        num_supernodes: int,
        cpus_per_client: float = 1.0,
        gpus_per_client: float = 0.0,
    ) -> list[str]:
        """``flwr run`` of the app against this SuperLink, streaming its logs until the run ends. Each
        simulated site gets ``cpus_per_client`` CPUs and ``gpus_per_client`` of a GPU (Ray hides the GPUs
        from a site that gets none)."""

        def num(x: float) -> str:
            return str(int(x)) if float(x).is_integer() else f"{x:g}"

        resources = f"num-supernodes={num_supernodes} client-resources-num-cpus={num(cpus_per_client)}"
        if gpus_per_client > 0:
            resources += f" client-resources-num-gpus={num(gpus_per_client)}"
        return [
            _bin("flwr"),
            "run",
            str(app_dir),
            CONNECTION,
            "--run-config",
            str(run_config),
            "--stream",
            "--federation-config",
            resources,
        ]

    def run(
        self, app_dir: Path, run_config: Path, num_supernodes: int, cpus_per_client: float = 1.0, output=None
    ) -> int:
        """Run the app to completion; returns flwr's exit code."""
        return subprocess.run(
            self.flwr_run_command(app_dir, run_config, num_supernodes, cpus_per_client),
            env=self.env(),
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            cwd=app_dir,
        ).returncode

    def processes(self) -> list[int]:
        """The live processes of this simulation: those with its token or its Ray temp folder in their
        environment, the SuperLink, and every process any of them started."""
        found = set(processes_with_token(self.token, f"RAY_TMPDIR={self.ray_tmp}"))
        if self.proc is not None and self.proc.poll() is None:
            found.add(self.proc.pid)
        return [p for p in sorted(found | set(descendants(found))) if is_running(p)]

    def stop(self, grace: float = 10.0) -> None:
        """End every process this simulation started (by PID, found by :meth:`processes`), then clean up."""
        # Ray's agents are started without our token but with our private Ray temp folder; what any of
        # them started is ended too, whatever its environment shows.
        end_processes(self.processes, grace)
        if self.proc is not None:
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        shutil.rmtree(self.ray_tmp, ignore_errors=True)

    def __enter__(self) -> LocalSimulation:
        _ACTIVE.add(self)
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
        _ACTIVE.discard(self)


def stop_all() -> None:
    """Stop every simulation this process still runs (an interrupted sweep with several workers)."""
    for sim in list(_ACTIVE):
        sim.stop()
        _ACTIVE.discard(sim)


def end_processes(find, grace: float = 10.0, settle: float = 1.0) -> None:
    """SIGTERM every PID that ``find()`` returns (live ones only), then SIGKILL what is left after ``grace``
    seconds. The SIGKILL phase looks again every 0.2 s and kills what it finds until nothing has turned up
    for ``settle`` seconds (at most ``grace`` seconds): a process that a dying parent (a SuperLink, Ray)
    started after the first look is ended too."""
    _signal_all(find, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(is_running(p) for p in find()):
        time.sleep(0.2)
    deadline = time.monotonic() + grace
    quiet = time.monotonic()
    while time.monotonic() < deadline and time.monotonic() - quiet < settle:
        if _signal_all(find, signal.SIGKILL):
            quiet = time.monotonic()
        time.sleep(0.2)


def _signal_all(find, sig: int) -> int:
    """Send ``sig`` to every live PID of ``find()``; returns how many there were."""
    live = [p for p in find() if is_running(p)]
    for pid in live:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
    return len(live)


def is_running(pid: int) -> bool:
    """Whether a PID is a live process (not gone, not a zombie)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False
