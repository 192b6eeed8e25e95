"""Federated experiments on a deployment: ``mdmt deploy submit|status|stop`` and the supervisor.

A job is one run config submitted to a SuperLink with ``flwr run``. Its record lives in the config's
workspace (``jobs/<name>.json``): the connection, the Flower run ids it has used, and its state. The
supervisor (``submit --watch``) follows the current Flower run and, when it ends without finishing every
unit or when the SuperLink went away under it, submits the same config again. The ServerApp skips units
that are done and continues an interrupted unit after its last complete round (``latest.pt``), so a
resubmission continues at round k+1 instead of starting over.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mdmt.errors import ConfigError, MDMTError
from mdmt.fed.config import RunConfig, load_toml
from mdmt.fed.plan import unit_keys
from mdmt.ml.methods import get_method
from mdmt.ops.deploy.commands import BASE_ENV, DEFAULT_CONNECTION
from mdmt.ops.flwr_app import flwr_app_dir
from mdmt.store import RunStore

FINISHED = "finished"


@dataclass
class Job:
    name: str
    config: str  # the submitted config file, as given
    run_config: str  # the full run config written for flwr run
    connection: str
    flwr_home: str
    app: str
    store: str
    units: list[str]
    run_ids: list[int] = field(default_factory=list)
    state: str = "submitted"  # submitted, running, completed, stopped, failed
    restarts: int = 0
    message: str = ""

    @property
    def path(self) -> Path:
        return job_path(Path(self.run_config).parent.parent, self.name)

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=1))
        os.replace(tmp, self.path)

    @classmethod
    def load(cls, path: Path) -> Job:
        try:
            return cls(**json.loads(path.read_text()))
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such job; submit it with 'mdmt deploy submit CONFIG'") from None
        except (json.JSONDecodeError, TypeError) as exc:
            raise ConfigError(f"{path}: not a job record ({exc}); remove it and submit again") from None


def job_path(workspace: Path, name: str) -> Path:
    return workspace / "jobs" / f"{name}.json"


def load_job_config(path: str | Path) -> RunConfig:
    """A deployment run config: the run-config keys of pyproject.toml, with the coordinator's paths."""
    values = load_toml(path)
    cfg = RunConfig.from_mapping(values, source=str(path))
    cfg.check_server_files(str(path))
    if not cfg.site_list:
        raise ConfigError(
            f"{path}: 'sites' is empty; name the site daemons of the deployment (e.g. sites = \"A,B,BRIXIA\")"
        )
    return cfg.replace(workspace=str(cfg.workspace_path), store=str(cfg.store_path))


def unit_ids(cfg: RunConfig) -> list[str]:
    """The units a job must finish; a per-site method (local) is planned by the server from the sites' roles."""
    if any(get_method(m).per_site for m in cfg.methods):
        return []
    return [k.unit_id for k in unit_keys(cfg)]


class Flower:
    """The ``flwr`` CLI against one SuperLink connection, with JSON output."""

    def __init__(self, connection: str, flwr_home: str):
        self.connection, self.flwr_home = connection, flwr_home

    def env(self) -> dict[str, str]:
        env = os.environ.copy()
        env.update(BASE_ENV)
        if self.flwr_home:
            env["FLWR_HOME"] = self.flwr_home
        env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
        return env

    def call(self, *args: str, timeout: float = 120.0) -> dict[str, Any]:
        argv = [str(Path(sys.executable).parent / "flwr"), *args, "--format", "json"]
        try:
            res = subprocess.run(
                argv, env=self.env(), capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
            )
        except subprocess.TimeoutExpired:
            return {"success": False, "error-message": f"flwr {args[0]} did not answer within {timeout:.0f}s"}
        start = res.stdout.find("{")
        try:
            return (
                json.loads(res.stdout[start:])
                if start >= 0
                else {"success": False, "error-message": (res.stderr or res.stdout).strip()[-300:]}
            )
        except json.JSONDecodeError:
            return {"success": False, "error-message": res.stdout.strip()[-300:]}

    def run(self, app: str, run_config: str) -> int:
        out = self.call("run", app, self.connection, "--run-config", run_config, timeout=600)
        if not out.get("success") or not out.get("run-id"):
            raise MDMTError(f"flwr run on connection '{self.connection}' failed: {_error(out)}")
        return int(out["run-id"])

    def status(self, run_id: int) -> tuple[str | None, str]:
        """(status text such as 'running' or 'finished:failed', details); None when the SuperLink is unreachable."""
        out = self.call("ls", self.connection, "--run-id", str(run_id), timeout=60)
        if not out.get("success"):
            err = _error(out)
            # a SuperLink restarted without its database no longer knows the run
            return (f"{FINISHED}:lost", err) if "not found" in err.lower() else (None, err)
        runs = out.get("runs") or []
        return (str(runs[0]["status"]), str(runs[0].get("status-details", ""))) if runs else (None, "run not found")

    def stop(self, run_id: int) -> tuple[bool, str]:
        out = self.call("stop", str(run_id), self.connection, timeout=60)
        return bool(out.get("success")), _error(out)


def _error(out: dict[str, Any]) -> str:
    return str(out.get("error-message") or out.get("error") or "no details").strip().splitlines()[-1][:300]


def read_store(store_path: str | Path, read: Callable[[RunStore], Any], empty: Any) -> Any:
    """``read(store)`` on the job's run store, opened read-only; ``empty`` while there is nothing to read:
    the store does not exist yet, or the ServerApp has created the file but not yet written its tables."""
    if not Path(store_path).is_file():
        return empty
    store = RunStore(store_path, readonly=True)
    try:
        if not store.db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='meta'").fetchone():
            return empty
        if not store.db.execute("SELECT 1 FROM meta WHERE key='schema_version'").fetchone():
            return empty  # the schema is written before the version: a store without it is being created
        return read(store)
    finally:
        store.close()


def unit_progress(store_path: str | Path, wanted: list[str]) -> dict[str, dict[str, Any]]:
    """unit id -> status, rounds done and message, from the store (empty when there is none yet)."""
    rows = read_store(store_path, lambda store: {u["unit_id"]: dict(u) for u in store.units()}, {})
    return {u: rows[u] for u in (wanted or rows) if u in rows}


def all_done(job: Job) -> bool:
    prog = unit_progress(job.store, job.units)
    if job.units:
        return all(prog.get(u, {}).get("status") == "done" for u in job.units)
    return bool(prog) and all(p["status"] == "done" for p in prog.values())


def submit(
    config: str | Path,
    connection: str,
    flwr_home: str = "",
    app: str | Path = "",
    name: str = "",
    echo: Callable[[str], None] = print,
) -> Job:
    """Submit a run config (or resubmit the job of that config when it did not finish)."""

    cfg = load_job_config(config)
    name = name or Path(config).stem
    if not cfg.site_registry:
        echo(
            f"job {name}: the config sets no site-registry, so a node's claimed site is not checked against "
            "its key (docs/security.md); record the sites' keys with 'mdmt deploy register-site'"
        )
    path = job_path(cfg.workspace_path, name)
    flwr_home = flwr_home or os.environ.get("FLWR_HOME", "")
    if path.is_file():
        job = Job.load(path)
        job.connection, job.flwr_home, job.restarts = connection, flwr_home, 0
        if job.state == "completed" and all_done(job):
            echo(f"job {name}: already completed (runs {', '.join(map(str, job.run_ids))}); store {job.store}")
            return job
        if job.run_ids:
            status, _ = Flower(connection, flwr_home).status(job.run_ids[-1])
            if status is not None and not status.startswith(FINISHED):
                echo(f"job {name}: run {job.run_ids[-1]} is {status}; watching it instead of submitting again")
                return job
    else:
        app = Path(app).resolve() if app else flwr_app_dir(cfg.workspace_path / "flwr")
        job = Job(
            name, str(Path(config).resolve()), "", connection, flwr_home, str(app), str(cfg.store_path), unit_ids(cfg)
        )
    stamp = time.strftime("%Y%m%d-%H%M%S")
    job.run_config = str(cfg.write_toml(cfg.workspace_path / "configs" / f"deploy-{name}-{stamp}.toml"))
    return _submit_run(job, echo)


def _submit_run(job: Job, echo: Callable[[str], None]) -> Job:
    run_id = Flower(job.connection, job.flwr_home).run(job.app, job.run_config)
    job.run_ids.append(run_id)
    job.state, job.message = "running", ""
    job.save()
    echo(f"job {job.name}: submitted as Flower run {run_id} on connection '{job.connection}'")
    return job


def watch(
    job: Job,
    poll: float = 10.0,
    max_restarts: int = 5,
    echo: Callable[[str], None] = print,
    log_dir: Path | None = None,
) -> int:
    """Follow the job until every unit is done (0), it was stopped (0) or it failed for good (1)."""
    flower = Flower(job.connection, job.flwr_home)
    lost_link = False
    follower = _follow_logs(flower, job, log_dir)
    try:
        while True:
            current = Job.load(job.path)  # `mdmt deploy stop` writes the record from another process
            if current.state == "stopped":
                echo(f"job {job.name}: stopped")
                return 0
            status, details = flower.status(job.run_ids[-1])
            if status is None:
                if not lost_link:
                    echo(f"job {job.name}: SuperLink unreachable ({details}); waiting for it")
                lost_link = True
                time.sleep(poll)
                continue
            if status.startswith(FINISHED) and all_done(job):
                job.state, job.message = "completed", ""
                job.save()
                echo(f"job {job.name}: completed (Flower runs {', '.join(map(str, job.run_ids))}); store {job.store}")
                return 0
            if status == f"{FINISHED}:stopped" and not lost_link:
                job.state, job.message = "stopped", "the Flower run was stopped"
                job.save()
                echo(f"job {job.name}: Flower run {job.run_ids[-1]} was stopped; not resubmitting")
                return 0
            if status.startswith(FINISHED) or lost_link:
                why = "the SuperLink restarted under it" if lost_link else f"it ended {status}: {details}"
                if job.restarts >= max_restarts:
                    job.state, job.message = (
                        "failed",
                        f"run {job.run_ids[-1]}: {why}; {max_restarts} resubmissions used",
                    )
                    job.save()
                    echo(f"job {job.name}: failed: {job.message}")
                    return 1
                if lost_link and not status.startswith(FINISHED):
                    flower.stop(job.run_ids[-1])  # its ServerApp died with the SuperLink; never run two
                job.restarts += 1
                echo(
                    f"job {job.name}: Flower run {job.run_ids[-1]} interrupted ({why}); resubmitting "
                    f"({job.restarts} of {max_restarts}); finished units are skipped, the current one resumes"
                )
                _submit_run(job, echo)
                lost_link = False
                _end(follower)
                follower = _follow_logs(flower, job, log_dir)
                continue
            time.sleep(poll)
    finally:
        _end(follower)


def _follow_logs(flower: Flower, job: Job, log_dir: Path | None) -> subprocess.Popen | None:
    """Stream the current run's server log (``flwr log``) into ``<log_dir>/<job>-run<id>.log``."""
    if log_dir is None:
        return None
    log_dir.mkdir(parents=True, exist_ok=True)
    run_id = job.run_ids[-1]
    with open(log_dir / f"{job.name}-run{run_id}.log", "ab") as fh:
        return subprocess.Popen(
            [str(Path(sys.executable).parent / "flwr"), "log", str(run_id), flower.connection, "--stream"],
            env=flower.env(),
            stdout=fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )


def _end(proc: subprocess.Popen | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def stop(job: Job, echo: Callable[[str], None] = print) -> None:
    job.state, job.message = "stopped", "stopped by the operator"
    job.save()
    if job.run_ids:
        ok, err = Flower(job.connection, job.flwr_home).stop(job.run_ids[-1])
        echo(f"job {job.name}: Flower run {job.run_ids[-1]} " + ("stopped" if ok else f"not stopped by Flower ({err})"))
    echo(f"job {job.name}: marked stopped; 'mdmt deploy submit' on the same config resumes it")


def status_lines(job: Job) -> list[str]:
    lines = [f"job {job.name}: {job.state}{' (' + job.message + ')' if job.message else ''}; config {job.config}"]
    if job.run_ids:
        st, details = Flower(job.connection, job.flwr_home).status(job.run_ids[-1])
        lines.append(
            f"Flower runs {', '.join(map(str, job.run_ids))}; current run {job.run_ids[-1]}: "
            f"{st or 'SuperLink unreachable'}{' (' + details + ')' if details and st else ''}; "
            f"resubmissions {job.restarts}"
        )
    prog = unit_progress(job.store, job.units)
    planned = job.units or list(prog)
    done = sum(1 for u in planned if prog.get(u, {}).get("status") == "done")
    lines.append(f"units: {done} of {len(planned)} done; store {job.store}")
    for u in planned:
        p = prog.get(u)
        if p is None:
            lines.append(f"  {u}: not started")
            continue
        lines.append(
            f"  {u}: {p['status']}, {p['rounds_done']} rounds"
            + (f", best round {p['best_round']}" if p.get("best_round") else "")
            + (f"; {p['message']}" if p.get("message") else "")
        )
    lines += _recent_events(job.store, planned)
    return lines


def _recent_events(store_path: str, units: list[str], limit: int = 8) -> list[str]:
    rows = read_store(
        store_path,
        lambda store: [(e["time"], u, e["round"], e["kind"], e["detail"]) for u in units for e in store.events(u)],
        [],
    )
    rows.sort()
    return [f"  event: {u} round {r}: {k} {d}".rstrip() for _, u, r, k, d in rows[-limit:]]


def find_job(config: str | Path, name: str = "") -> Job:
    cfg = RunConfig.from_mapping(load_toml(config), source=str(config))
    return Job.load(job_path(cfg.workspace_path, name or Path(config).stem))


# ---- the job verbs of ``mdmt deploy`` ------------------------------------------------------------


def _job(a: argparse.Namespace) -> Job:
    return find_job(a.config, a.name)


def cmd_submit(a: argparse.Namespace) -> None:
    job = submit(a.config, a.connection, a.flwr_home, a.app, a.name)
    if not a.watch:
        print(f"follow it with: mdmt deploy status {a.config}")
        return
    if job.state == "completed":
        return
    log_dir = Path(job.run_config).parent.parent / "logs"
    print(f"watching (every {a.poll:g}s; server logs in {log_dir})", flush=True)
    if (
        watch(job, poll=a.poll, max_restarts=a.max_restarts, log_dir=log_dir, echo=lambda line: print(line, flush=True))
        != 0
    ):
        raise SystemExit(1)


def cmd_status(a: argparse.Namespace) -> None:
    print("\n".join(status_lines(_job(a))))


def cmd_stop(a: argparse.Namespace) -> None:
    stop(_job(a))


def add_job_verbs(sub) -> None:
    """Add ``submit``, ``status`` and ``stop`` to the ``mdmt deploy`` sub-parsers; each sets ``fn``."""

    def common(s, flower: bool = False) -> None:
        s.add_argument("config", help="the job's run config (run-config keys of pyproject.toml; coordinator paths)")
        s.add_argument("--name", default="", help="job name (default: the config file's name)")
        if flower:
            s.add_argument(
                "--connection",
                default=DEFAULT_CONNECTION,
                help=f"SuperLink connection of 'mdmt deploy connection' (default {DEFAULT_CONNECTION})",
            )
            s.add_argument("--flwr-home", default="", help="default: $FLWR_HOME or ~/.flwr")

    s = sub.add_parser(
        "submit",
        help="submit a federated experiment to the SuperLink; --watch resubmits it "
        "after an interruption until every unit is done",
    )
    common(s, flower=True)
    s.add_argument(
        "--app",
        default="",
        help="a Flower app folder (default: the installed mdmt app, generated in the workspace's flwr/app)",
    )
    s.add_argument("--watch", action="store_true", help="stay and supervise the run (systemd: mdmt-job@.service)")
    s.add_argument("--poll", type=float, default=10.0, help="seconds between status checks (default 10)")
    s.add_argument("--max-restarts", type=int, default=5, help="resubmissions before giving up (default 5)")
    s.set_defaults(fn=cmd_submit)
    s = sub.add_parser("status", help="a submitted job: Flower run status, units and rounds done, events")
    common(s)
    s.set_defaults(fn=cmd_status)
    s = sub.add_parser("stop", help="stop a submitted job (its supervisor then stops too)")
    common(s)
    s.set_defaults(fn=cmd_stop)
