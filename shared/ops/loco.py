"""The LOCO driver: one Flower simulation whose ServerApp iterates every (method, held-out centre) unit.

Steps: validate the config, take the workspace (one writer at a time), ingest every site (cached), decide
from the store which units are left (the same decision the ServerApp makes: id and fingerprint), and only
when some are, start a private simulation SuperLink on free ports, ``flwr run`` the app against it and stop
every process it started; then write the result table.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

import pandas as pd

from mdmt.data.ingest import ingest_site
from mdmt.data.manifest import dispatch_order, list_sites, read_manifest, site_role
from mdmt.errors import ConfigError, MDMTError
from mdmt.fed.config import RunConfig
from mdmt.fed.plan import Decision, SiteInfo, decide_units, unit_keys
from mdmt.fed.sitedata import locate_site, site_summary
from mdmt.fed.workspace import WorkspaceLock
from mdmt.ops.flwr_app import flwr_app_dir
from mdmt.ops.launch import LocalSimulation
from mdmt.results.report.loco import report_run
from mdmt.store import RunStore


def prognosis_sites(fed: Path) -> list[str]:
    return [s for s in list_sites(fed) if site_role(read_manifest(fed / s)) in ("prognosis", "both")]


def site_roles(cfg: RunConfig) -> dict[str, str]:
    """site -> role of the config's sites, read from their manifests (simulation: all data is local)."""
    return {s: site_role(read_manifest(cfg.fed_path / s)) for s in cfg.site_list}


def prepare_config(values: dict[str, Any]) -> RunConfig:
    """The full, validated config of a simulation: absolute paths, every site named, holdouts defaulted."""
    cfg = RunConfig.from_mapping(values, source="loco")
    cfg.check_server_files("loco")
    fed = cfg.fed_path
    available = list_sites(fed)
    sites = list(cfg.site_list) or available
    for s in sites:
        if s not in available:
            raise ConfigError(f"loco: site '{s}' is not a site of {fed} ({', '.join(available)})")
    holdouts = cfg.holdout_list if values.get("holdouts") else tuple(s for s in prognosis_sites(fed) if s in sites)
    prog = set(prognosis_sites(fed))
    for h in holdouts:
        if h not in sites:
            raise ConfigError(f"loco: held-out centre '{h}' is not among the sites ({', '.join(sites)})")
        if h not in prog:
            raise ConfigError(
                f"loco: held-out centre '{h}' has no prognosis labels; LOCO holds out prognosis centres "
                f"({', '.join(sorted(prog & set(sites)))})"
            )
    return cfg.replace(
        fed_dir=str(fed),
        workspace=str(cfg.workspace_path),
        sites=",".join(dispatch_order(fed, sites)),  # partition-id order
        holdouts=",".join(holdouts),
        cache_dir=str(cfg.cache_path),
        store=str(cfg.store_path),
    )


def ingest_sites(cfg: RunConfig, echo=print) -> None:
    """Decode and cache every site of the config once (later runs reuse the cache); says how many files
    each site turned away and where they are listed."""
    for site in cfg.site_list:
        summary = ingest_site(
            cfg.fed_path / site,
            cfg.cache_path,
            image_size=cfg.image_size,
            crop=cfg.crop,
            progress=True,
            voi=cfg.voi,
            crop_source=cfg.crop_source or None,
            workers=cfg.num_workers,
        )
        if summary["rejected"]:
            echo(f"site {site}: {summary['rejected']} file(s) rejected, listed in {summary['rejected_file']}")


def local_sites(cfg: RunConfig) -> dict[str, SiteInfo]:
    """What each simulated site would answer to the discovery query, read here (all data is local)."""
    infos = [
        SiteInfo.from_summary(site_summary(cfg, locate_site(cfg, {"partition-id": i})))
        for i in range(len(cfg.site_list))
    ]
    return {info.site: info for info in infos}


def plan_run(cfg: RunConfig, store: RunStore) -> list[Decision]:
    """The units of a simulation and what the run does with each (mdmt.fed.plan.decide_units); a refused
    unit raises before anything starts."""
    sites = local_sites(cfg)
    decisions = decide_units(cfg, unit_keys(cfg, {s: i.role for s, i in sites.items()}), sites, store)
    refused = [d for d in decisions if d.action == "refuse"]
    if refused:
        more = f" ({len(refused) - 1} more unit(s) likewise)" if len(refused) > 1 else ""
        raise MDMTError(refused[0].reason + more)
    return decisions


def gpus_for_sites(n_sites: int, gpus_per_client: float | None) -> float:
    """The share of a GPU each simulated site gets: as asked, or with None every visible GPU split
    evenly between the sites (at most one each); 0 without a GPU."""
    if gpus_per_client is not None:
        if gpus_per_client < 0:
            raise ConfigError(f"--gpus-per-client must be >= 0, got {gpus_per_client}")
        return float(gpus_per_client)
    # deferred: torch (counting the GPUs); the driver loads it for the site summaries anyway
    import torch

    count = torch.cuda.device_count()
    return min(1.0, count / max(n_sites, 1)) if count else 0.0


def run_simulation(
    cfg: RunConfig,
    cpus_per_client: float = 1.0,
    echo=print,
    tag: str = "",
    ingest: bool = True,
    on_start=None,
    gpus_per_client: float | None = None,
) -> Path:
    """Run every unit of ``cfg`` in one Flower simulation; returns the log file. Raises on failure.

    ``tag`` names this simulation's Flower home, config and log, so several can run side by side.
    ``on_start(sim)`` is called once the SuperLink runs (``mdmt bench`` measures the run's memory there).
    """
    ws = cfg.workspace_path
    if ingest:
        ingest_sites(cfg, echo)
    stamp = time.strftime("%Y%m%d-%H%M%S") + (f"-{tag}" if tag else "")
    run_cfg = cfg.write_toml(ws / "configs" / f"run-{stamp}.toml")
    log_path = ws / "logs" / f"flwr-{stamp}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    n_sites = len(cfg.site_list)
    echo(f"flower simulation: {n_sites} sites, units: {len(unit_keys(cfg, site_roles(cfg)))}, log: {log_path}")
    app_dir = flwr_app_dir(ws / "flwr")
    gpus = gpus_for_sites(n_sites, gpus_per_client)
    try:
        with LocalSimulation(ws / "flwr" / (tag or "main")) as sim, open(log_path, "wb") as log:
            if on_start is not None:
                on_start(sim)
            proc = subprocess.Popen(
                [*sim.flwr_run_command(app_dir, run_cfg, n_sites, cpus_per_client, gpus)],
                env=sim.env(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=app_dir,
            )
            _follow(proc, log_path, echo)
    finally:
        _mark_stale(cfg)  # every process of the simulation has stopped by now
    if proc.returncode != 0:
        raise MDMTError(f"flwr run exited with code {proc.returncode}: {_last_error(log_path)}; see {log_path}")
    _check_units(cfg, log_path)
    return log_path


def _follow(proc: subprocess.Popen, log_path: Path, echo) -> None:
    """Echo the server's own progress lines while the run goes on."""
    pos = 0
    while True:
        done = proc.poll() is not None
        with open(log_path, "rb") as fh:
            fh.seek(pos)
            chunk = fh.read()
        nl = chunk.rfind(b"\n")
        if nl >= 0:
            for line in chunk[: nl + 1].decode(errors="replace").splitlines():
                if " mdmt " in line and ("round" in line or "unit" in line or "sites:" in line):
                    echo("  " + line.split(" mdmt ", 1)[1].replace("INFO ", "", 1))
            pos += nl + 1
        if done:
            break
        time.sleep(0.5)


def _last_error(log_path: Path) -> str:
    """The most telling line of a failed run's log (Flower prints errors in a box)."""
    lines = [l.strip(" │╭╮╰╯─") for l in log_path.read_text(errors="replace").splitlines()]
    lines = [l.strip() for l in lines if l.strip()]
    ours = [l.split(" mdmt ERROR ", 1)[1] for l in lines if " mdmt ERROR " in l]  # the ServerApp's one line
    if ours:
        return ours[-1][:300]
    for marker in ("Error:", "error:", "Exception", "Error"):
        hits = [l for l in lines if marker in l]
        if hits:
            return hits[-1][:300]
    return lines[-1][:300] if lines else "no output"


def _mark_stale(cfg: RunConfig) -> None:
    """Units of this simulation still 'running' once it has ended were interrupted (its ServerApp may
    have been killed before it could say so)."""
    store = RunStore(cfg.store_path)
    try:
        store.mark_interrupted([k.unit_id for k in unit_keys(cfg, site_roles(cfg))], "its simulation ended")
    finally:
        store.close()


def _check_units(cfg: RunConfig, log_path: Path) -> None:
    store = RunStore(cfg.store_path)
    try:
        status = {u["unit_id"]: (u["status"], u["message"]) for u in store.units()}
    finally:
        store.close()
    bad = [
        (k.unit_id, status.get(k.unit_id, ("not run", "")))
        for k in unit_keys(cfg, site_roles(cfg))
        if status.get(k.unit_id, ("",))[0] != "done"
    ]
    if bad:
        first = "; ".join(f"{u}: {st}{' (' + msg + ')' if msg else ''}" for u, (st, msg) in bad[:3])
        raise MDMTError(
            f"{len(bad)} unit(s) did not finish: {first}; last error: {_last_error(log_path)}; see {log_path}"
        )


def loco(
    values: dict[str, Any],
    cpus_per_client: float = 1.0,
    echo=print,
    wait: bool = False,
    gpus_per_client: float | None = None,
) -> pd.DataFrame:
    """Run the LOCO units of a config that are not done yet, then print and write the table."""
    cfg = prepare_config(values)
    t0 = time.perf_counter()
    with WorkspaceLock(cfg.workspace_path).acquire(wait=wait, echo=echo):
        store = RunStore(cfg.store_path)
        try:
            for unit in store.mark_interrupted(message="its run ended without a word (the workspace was free)"):
                echo(f"unit {unit}: left running by a run that is gone; it continues from its last round")
            ingest_sites(cfg, echo)
            decisions = plan_run(cfg, store)
        finally:
            store.close()
        left = [d for d in decisions if d.action != "skip"]
        if left:
            run_simulation(cfg, cpus_per_client, echo, ingest=False, gpus_per_client=gpus_per_client)
        else:
            echo(f"all {len(decisions)} units are done with the same fingerprint; no simulation started")
        store = RunStore(cfg.store_path)
        try:
            shown, table = report_run(store, cfg.workspace_path, cfg.methods, cfg.backbones)
        finally:
            store.close()
    echo("")
    echo(table)
    echo(f"\nwall time {time.perf_counter() - t0:.0f} s")
    return shown
