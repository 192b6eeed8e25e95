"""The Flower processes of a deployment: the site's ``flower-supernode`` and the coordinator's
``flower-superlink`` command lines (printed, or executed in place, which is what the systemd units and the
compose file do), and the SuperLink connection the ``flwr`` CLI uses (``flwr run``, ``flwr supernode register``)."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import tomli_w

from mdmt.errors import ConfigError, MDMTError
from mdmt.ops.deploy.appguard import install_guard
from mdmt.ops.deploy.files import CA_CERT, SERVER_CERT, SERVER_KEY, make_dir
from mdmt.ops.deploy.siteconfig import DEFAULT_SUPERLINK_PORT, SiteConfig, format_address, parse_address

DEFAULT_CONNECTION = "mdmt"

# Every process a deployment starts gets these: no telemetry, no per-run dependency installation.
BASE_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
}


def _bin(name: str) -> str:
    """A console script of this Python environment (also when it is not on PATH)."""
    cand = Path(sys.executable).parent / name
    return str(cand) if cand.exists() else (shutil.which(name) or name)


def node_config_string(cfg: SiteConfig) -> str:
    """The ``--node-config`` value that ``mdmt.fed.site.locate_site`` reads."""
    return cfg.node.to_flower()


def device_env(device: str) -> dict[str, str]:
    """How the site's device choice reaches the ClientApp processes: through the CUDA devices they see.
    ``cpu`` hides every GPU; ``cuda:N`` shows only GPU N; ``auto``/``cuda`` leave the choice alone."""
    if device == "cpu":
        return {"CUDA_VISIBLE_DEVICES": ""}
    if device.startswith("cuda:"):
        return {"CUDA_VISIBLE_DEVICES": device.split(":", 1)[1]}
    return {}


def supernode_command(cfg: SiteConfig) -> tuple[list[str], dict[str, str]]:
    """(argv, environment additions) of the site's ``flower-supernode``. Runtime dependency installation
    stays off (the SuperNode's default; ``--allow-runtime-dependency-installation`` is never passed). Its
    PATH starts with the site's ``flwr-clientapp`` guard (:mod:`mdmt.ops.deploy.appguard`), written here."""
    host, port = parse_address(cfg.coordinator)
    argv = [
        _bin("flower-supernode"),
        "--superlink",
        format_address(host, port),
        "--root-certificates",
        str(cfg.ca),
        "--auth-supernode-private-key",
        str(cfg.key),
        "--node-config",
        node_config_string(cfg),
        "--isolation",
        "subprocess",
        "--host",
        "127.0.0.1",
        "--port",
        str(cfg.supernode_port),
    ]
    env = dict(BASE_ENV)
    env.update({"FLWR_HOME": str(cfg.workspace / "flwr-home"), "UV_CACHE_DIR": str(cfg.workspace / "uv-cache")})
    env.update(device_env(cfg.device))
    # The SuperExec starts flwr-clientapp by name: ours (the approved-app check) comes first on PATH.
    env["PATH"] = os.pathsep.join([str(install_guard(cfg.workspace)), _bindir(), os.environ.get("PATH", "")])
    return argv, env


def _bindir() -> str:
    return str(Path(sys.executable).parent)


def superlink_command(
    certs: str | Path,
    state_dir: str | Path,
    host: str = "0.0.0.0",
    port: int = DEFAULT_SUPERLINK_PORT,
    database: bool = True,
) -> tuple[list[str], dict[str, str]]:
    """(argv, environment additions) of the coordinator's ``flower-superlink``: TLS with the CA folder of
    ``mdmt deploy certs``, SuperNode authentication on, runtime dependency installation off, state in
    ``state_dir`` (its SQLite database, FLWR_HOME and uv cache)."""
    certs, state_dir = Path(certs).expanduser().resolve(), Path(state_dir).expanduser().resolve()
    for name in (CA_CERT, SERVER_CERT, SERVER_KEY):
        if not (certs / name).is_file():
            raise ConfigError(
                f"{certs / name}: not found; create the certificates with 'mdmt deploy certs --out {certs}'"
            )
    if not 0 < int(port) < 65536:
        raise ConfigError(f"--port {port}: must be 1-65535")
    argv = [
        _bin("flower-superlink"),
        "--ssl-ca-certfile",
        str(certs / CA_CERT),
        "--ssl-certfile",
        str(certs / SERVER_CERT),
        "--ssl-keyfile",
        str(certs / SERVER_KEY),
        "--enable-supernode-auth",
        "--disable-runtime-dependency-installation",
        "--isolation",
        "subprocess",
        "--host",
        host,
        "--port",
        str(int(port)),
    ]
    if database:
        argv += ["--database", str(state_dir / "state.db")]
    env = dict(BASE_ENV)
    env.update({"FLWR_HOME": str(state_dir / "flwr-home"), "UV_CACHE_DIR": str(state_dir / "uv-cache")})
    return argv, env


def command_text(argv: list[str], env: dict[str, str]) -> str:
    """A shell line: ``env K=V ... program args`` (quoted)."""
    return shlex.join(["env", *(f"{k}={v}" for k, v in env.items()), *argv])


def exec_command(argv: list[str], env: dict[str, str], dirs: list[Path]) -> None:
    """Create ``dirs``, then replace this process with ``argv`` (environment plus ``env``, this Python
    environment's scripts first on PATH); returns only by raising MDMTError when it cannot start."""
    for d in dirs:
        make_dir(d, "state")
    full = os.environ.copy()
    full.update(env)
    if "PATH" not in env:  # Flower starts its helpers by name: use this environment's (a given PATH has it)
        full["PATH"] = _bindir() + os.pathsep + full.get("PATH", "")
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        if os.path.isabs(argv[0]):
            os.execve(argv[0], argv, full)
        else:
            os.execvpe(argv[0], argv, full)
    except OSError as exc:
        raise MDMTError(
            f"cannot start {argv[0]} ({exc.strerror or exc}); install this project in the environment"
        ) from None


def write_connection(flwr_home: str | Path, name: str, address: str, ca: str | Path, default: bool = True) -> Path:
    """Add or replace the SuperLink connection ``name`` in ``flwr_home/config.toml`` (TLS with ``ca``)."""
    import tomllib  # deferred: tomllib is Python 3.11+ and requires-python allows 3.10

    parse_address(address, "--address")
    if not re.match(r"^[A-Za-z0-9_-]+$", name):
        raise ConfigError(f"--name {name!r}: a connection name is letters, digits, '_' or '-'")
    ca = Path(ca).expanduser().resolve()
    if not ca.is_file():
        raise ConfigError(f"--ca {ca}: CA certificate not found")
    home = Path(flwr_home).expanduser()
    make_dir(home, "FLWR_HOME")
    path = home / "config.toml"
    try:
        data = tomllib.loads(path.read_text()) if path.is_file() else {}
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc}); fix or move it") from None
    link = data.setdefault("superlink", {})
    link[name] = {"address": address, "root-certificates": str(ca)}
    if default or "default" not in link:
        link["default"] = name
    path.write_text(tomli_w.dumps(data))
    return path


def register_site(
    public_key: str | Path,
    site: str,
    connection: str,
    registry: str | Path,
    env: dict[str, str] | None = None,
    timeout: float = 120.0,
) -> int:
    """Register a site's public key with the SuperLink (``flwr supernode register KEY CONNECTION --name
    SITE``, on the operator's Control API) and record the node id Flower gave it for the site in
    ``registry`` (:mod:`mdmt.fed.identity`); returns the node id."""
    import json  # deferred: only registration parses flwr's JSON answer

    from mdmt.fed.identity import record_node  # deferred: the registry is written only here

    public = Path(public_key).expanduser()
    try:
        key = public.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{public}: cannot read the public key ({exc.strerror or exc})") from None
    argv = [_bin("flwr"), "supernode", "register", str(public), connection, "--name", site, "--format", "json"]
    res = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    try:
        answer = json.loads(res.stdout[res.stdout.index("{") :])
        node_id = int(answer["node-id"])
    except (ValueError, KeyError, TypeError):
        detail = " ".join((res.stdout + res.stderr).split())[-400:]
        hint = (
            "; it was registered before: record it with --node-id N (N from 'flwr supernode list')"
            if "already in use" in detail
            else ""
        )
        detail = detail or f"exit {res.returncode}"
        raise MDMTError(f"registering site {site} ({public}) failed: {detail}{hint}") from None
    record_node(registry, node_id, site, key)
    return node_id
