"""A whole deployment on one machine's loopback, built with the deploy verbs' own pieces: the coordinator's
CA and TLS certificate, a ``flower-superlink`` with SuperNode authentication and its SQLite state, the
operator's ``flwr`` connection, and per site a key pair registered under the site's name (and recorded in
the site registry, :mod:`mdmt.fed.identity`), a site config and a ``flower-supernode``. ``mdmt bench
--sections deploy`` measures rounds on it.

With ``proxy=True`` it runs the operator-only layout (:mod:`mdmt.ops.deploy.proxy`): the SuperLink on one
loopback port for the operator's ``flwr``, nginx on another for the sites, whose SuperNodes connect through it.

Every process it starts carries a private token in its environment, so :meth:`Loopback.stop` ends exactly
those processes (and the SuperExec, ServerApp and ClientApp processes Flower starts under them), by PID.
"""

from __future__ import annotations

import os
import ssl
import subprocess
import sys
import time
import uuid
from pathlib import Path

from mdmt.errors import MDMTError
from mdmt.ops.deploy import commands, files, pki, proxy, siteconfig
from mdmt.ops.launch import TOKEN_VAR, descendants, end_processes, free_port, is_running, processes_with_token

CONNECTION = "mdmt-loopback"


class Loopback:
    """A TLS SuperLink and one SuperNode per site on 127.0.0.1, under ``root``; a context manager."""

    def __init__(self, root: str | Path, fed: str | Path, device: str = "cpu", proxy: bool = False):
        self.root, self.fed, self.device = Path(root).resolve(), Path(fed).resolve(), device
        self.proxy = proxy
        self.proxy_dir = self.root / "coordinator" / "nginx"
        self.proxy_port = 0
        self.registry = self.root / "coordinator" / "site-registry.json"
        self.token = uuid.uuid4().hex
        self.logs = self.root / "logs"
        self.certs = self.root / "coordinator" / "certs"
        self.state = self.root / "coordinator" / "state"
        self.sites_dir = self.root / "sites"
        self.flwr_home = self.root / "operator-flwr"
        self.port = 0
        self.procs: dict[str, subprocess.Popen] = {}
        self.site_configs: dict[str, siteconfig.SiteConfig] = {}

    # ---- processes ----------------------------------------------------------------------------
    def env(self, extra: dict[str, str]) -> dict[str, str]:
        env = os.environ.copy()
        env.update(commands.BASE_ENV)
        env.update(extra)
        env[TOKEN_VAR] = self.token
        if "PATH" not in extra:  # a site's PATH (its flwr-clientapp guard first) already has this environment's
            env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
        return env

    def start(self, name: str, argv: list[str], extra: dict[str, str]) -> subprocess.Popen:
        self.logs.mkdir(parents=True, exist_ok=True)
        with open(self.logs / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(
                argv,
                env=self.env(extra),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                cwd=self.root,
            )
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace") if path.is_file() else ""

    def run(self, name: str, argv: list[str], extra: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
        """Run a command to its end, its output in logs/<name>.log."""
        self.logs.mkdir(parents=True, exist_ok=True)
        with open(self.logs / f"{name}.log", "ab") as log:
            return subprocess.run(
                argv,
                env=self.env(extra),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.root,
                timeout=timeout,
            )

    def alive(self) -> list[int]:
        """The live processes this deployment started, and theirs. nginx rewrites its process title over
        its environment, so the token cannot find it: the processes started here and every process below
        them or below a token-bearing one are added by PID (mdmt.ops.launch.descendants)."""
        started = {proc.pid for proc in self.procs.values() if proc.poll() is None}
        found = set(processes_with_token(self.token)) | started
        found |= set(descendants(found))
        return [p for p in sorted(found) if is_running(p)]

    def stop(self, grace: float = 15.0) -> None:
        end_processes(self.alive, grace)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass

    def __enter__(self) -> Loopback:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- the coordinator ----------------------------------------------------------------------
    def start_superlink(self, timeout: float = 90.0) -> subprocess.Popen:
        """Certificates (made once), then the SuperLink on a free port (the same port on a restart)."""
        if not (self.certs / files.SERVER_CERT).is_file():
            pki.make_certs(self.certs, ["IP:127.0.0.1", "DNS:localhost"])
        self.port = self.port or free_port()
        argv, env = commands.superlink_command(self.certs, self.state, host="127.0.0.1", port=self.port)
        proc = self.start("superlink", argv, env)
        self.wait_healthy(proc, timeout)
        commands.write_connection(self.flwr_home, CONNECTION, self.address, self.ca)
        if self.proxy:
            self.start_proxy(timeout)
        return proc

    def start_proxy(self, timeout: float = 60.0) -> subprocess.Popen:
        """nginx in front of the SuperLink, on its own loopback port (the same port on a restart)."""
        self.proxy_port = self.proxy_port or free_port()
        settings = proxy.ProxySettings(listen=self.site_address, superlink=self.address, certs=self.certs)
        conf = proxy.write_standalone(settings, self.proxy_dir)
        proc = self.start("nginx", proxy.nginx_argv(conf, self.proxy_dir), {})
        self.wait_healthy(proc, timeout, self.site_address, "nginx")
        return proc

    @property
    def site_address(self) -> str:
        """Where the sites' SuperNodes connect: nginx with ``proxy``, else the SuperLink itself."""
        return f"127.0.0.1:{self.proxy_port}" if self.proxy else self.address

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def ca(self) -> Path:
        return self.certs / files.CA_CERT

    def wait_healthy(self, proc: subprocess.Popen, timeout: float, address: str = "", name: str = "superlink") -> None:
        import httpx  # deferred: only a running deployment needs it

        address = address or self.address
        ctx = ssl.create_default_context(cafile=str(self.ca))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise MDMTError(f"{name} exited with {proc.returncode}; see {self.logs / f'{name}.log'}")
            try:
                if httpx.get(f"https://{address}/health", verify=ctx, timeout=2).is_success:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise MDMTError(f"{name} did not answer on {address} within {timeout:.0f}s")

    def flwr(self, name: str, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        """The operator's ``flwr`` CLI on this deployment's connection (its output in logs/<name>.log)."""
        flwr = str(Path(sys.executable).parent / "flwr")
        return self.run(name, [flwr, *args], {"FLWR_HOME": str(self.flwr_home)}, timeout)

    # ---- the sites ----------------------------------------------------------------------------
    def register(self, site: str, public: Path) -> int:
        """Register a site's key on the operator's connection and record it in the site registry."""
        env = self.env({"FLWR_HOME": str(self.flwr_home)})
        return commands.register_site(public, site, CONNECTION, self.registry, env)

    def add_site(
        self, site: str, claim: str = "", data_dir: Path | None = None, approved_app: str = ""
    ) -> subprocess.Popen:
        """A key pair (made once) registered under the site's name, a site config, and its SuperNode.
        ``claim``: the site its node config names (default ``site``: an honest site); ``approved_app``: the
        sha256 of the only app bundle the site runs."""
        private, public = files.site_key_paths(self.sites_dir, site)
        if not private.is_file():
            pki.make_site_key(site, self.sites_dir)
            self.register(site, public)
        claim = claim or site
        cfg = siteconfig.SiteConfig(
            site=claim,
            data_dir=data_dir or self.fed / claim,
            coordinator=self.site_address,
            ca=self.ca,
            key=private,
            workspace=self.sites_dir / f"ws-{site}",
            device=self.device,
            supernode_port=free_port(),
            approved_app=approved_app,
        ).validate()
        self.site_configs[site] = cfg
        argv, env = commands.supernode_command(cfg)
        return self.start(f"supernode-{site}", argv, env)

    def site_workspace(self, site: str) -> Path:
        """Where the site's own files (its message and reply logs among them) are."""
        cfg = self.site_configs[site]
        return cfg.workspace / "sites" / cfg.site
