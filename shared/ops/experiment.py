"""``mdmt experiment CONFIG.toml``: a grid of methods x backbones x protocols x folds as Flower simulations.

The TOML holds run-config keys (shared/config.py); ``protocol`` may list several ("loco,cv"), and an
optional ``[synth]`` table builds the synthetic federation first when ``fed-dir`` has no sites. Every
unit goes to the run store; units already done are skipped, so an interrupted sweep resumes where it
stopped. With ``--workers N`` independent groups of units (one backbone x protocol each) run as separate
simulations side by side, each with its own ports and Flower home.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from mdmt.data.manifest import list_sites
from mdmt.data.synth import format_summary, synthesize
from mdmt.errors import ConfigError, MDMTError
from mdmt.fed.config import RunConfig, load_toml
from mdmt.fed.workspace import WorkspaceLock
from mdmt.ops.launch import stop_all
from mdmt.ops.loco import ingest_sites, plan_run, prepare_config, run_simulation
from mdmt.results.report import write_report
from mdmt.store import RunStore

SYNTH_KEYS = {"scale", "image-size", "seed", "both-site"}


def read_experiment(path: str | Path, overrides: dict[str, Any] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(run-config values, synth options) of an experiment file, flags applied on top."""
    raw = load_toml(path)
    synth = raw.pop("synth", {}) or {}
    if not isinstance(synth, dict):
        raise ConfigError(f"{path}: 'synth' must be a table ([synth])")
    unknown = set(synth) - SYNTH_KEYS
    if unknown:
        raise ConfigError(
            f"{path}: unknown key(s) in [synth]: {', '.join(sorted(unknown))}; valid: {', '.join(sorted(SYNTH_KEYS))}"
        )
    values = dict(raw) | dict(overrides or {})
    return values, synth


def ensure_federation(values: dict[str, Any], synth: dict[str, Any], echo=print) -> None:
    """Build the synthetic federation named by ``fed-dir`` when the file asks for it and it is absent."""

    fed = Path(str(values.get("fed-dir", RunConfig().fed_dir))).expanduser()
    try:
        present = bool(list_sites(fed))
    except MDMTError:
        present = False
    if present:
        return
    if not synth:
        raise ConfigError(
            f"fed-dir {fed}: no federation there; create one (mdmt synth / mdmt import) or add a [synth] table"
        )

    echo(f"building the synthetic federation in {fed} ({synth})")
    echo(
        format_summary(
            synthesize(
                fed,
                scale=float(synth.get("scale", 1.0)),
                image_size=int(synth.get("image-size", 320)),
                seed=int(synth.get("seed", 0)),
                both_site=bool(synth.get("both-site", False)),
                progress=False,
            )
        )
    )


def plan_groups(values: dict[str, Any], workers: int) -> list[RunConfig]:
    """One validated config per simulation: all of a protocol's units together, or with several workers
    one group per backbone x protocol (ft's phase 1 stays with its ft units)."""
    protocols = [p.strip() for p in str(values.get("protocol", "loco")).split(",") if p.strip()]
    groups = []
    for proto in protocols:
        cfg = prepare_config(values | {"protocol": proto})
        if workers > 1:
            groups += [cfg.replace(backbone=b) for b in cfg.backbones]
        else:
            groups.append(cfg)
    return groups


def unit_progress(cfg: RunConfig, store: RunStore) -> tuple[int, int]:
    """(units of the group, units left to run): decided as the ServerApp decides (id and fingerprint)."""
    decisions = plan_run(cfg, store)
    return len(decisions), sum(d.action != "skip" for d in decisions)


def run_experiment(
    path: str | Path,
    overrides: dict[str, Any] | None = None,
    workers: int = 1,
    cpus_per_client: float = 1.0,
    echo=print,
    wait: bool = False,
    gpus_per_client: float | None = None,
) -> str:
    """Run every missing unit of the experiment, then write the report; returns the report summary. The
    experiment holds its workspace for the whole sweep; its parallel simulations run under that hold."""
    if workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {workers}")
    values, synth = read_experiment(path, overrides)
    ensure_federation(values, synth, echo)
    groups = plan_groups(values, workers)
    with WorkspaceLock(groups[0].workspace_path).acquire(wait=wait, echo=echo):
        return _run_groups(path, groups, workers, (cpus_per_client, gpus_per_client), echo)


def _run_groups(path, groups: list[RunConfig], workers: int, resources: tuple[float, float | None], echo) -> str:
    store = RunStore(groups[0].store_path)
    try:
        for unit in store.mark_interrupted(message="its run ended without a word (the workspace was free)"):
            echo(f"unit {unit}: left running by a run that is gone; it continues from its last round")
        for g in groups:
            ingest_sites(g, echo)  # once: later groups find the cache unless image size or crop differ
        progress = [unit_progress(g, store) for g in groups]
    finally:
        store.close()
    todo = [(i, g) for i, g in enumerate(groups) if progress[i][1]]
    t0 = time.perf_counter()
    echo(
        f"experiment {path}: {sum(t for t, _ in progress)} units in {len(groups)} group(s), "
        f"{sum(n for _, n in progress)} to run"
    )
    lock = threading.Lock()

    def run(item: tuple[int, RunConfig]) -> None:
        i, g = item
        tag = f"w{i}" if workers > 1 else ""

        def say(line: str) -> None:
            with lock:
                echo(f"[{g.protocol}/{','.join(g.backbones)}] {line}" if workers > 1 else line)

        run_simulation(g, resources[0], say, tag=tag or g.protocol, ingest=False, gpus_per_client=resources[1])

    try:
        if workers > 1:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                for fut in [pool.submit(run, item) for item in todo]:
                    fut.result()
        else:
            for item in todo:
                run(item)
    except BaseException:
        stop_all()
        raise
    store = RunStore(groups[0].store_path, readonly=True)
    try:
        summary = write_report(store, groups[0].workspace_path / "reports")
    finally:
        store.close()
    echo(f"\nexperiment wall time {time.perf_counter() - t0:.0f} s; store {groups[0].store_path}")
    return summary
