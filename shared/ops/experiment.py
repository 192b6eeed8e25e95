"""``mdmt experiment CONFIG.toml``: a grid of methods x backbones x protocols x folds as Flower simulations.

The TOML holds run-config keys (shared/config.py); ``protocol`` may list several ("loco,cv"), so may
``seed`` ("0,1,2" or [0, 1, 2]); ``extends`` names a base file whose keys this one overrides; an
optional ``[synth]`` table builds the synthetic federation first when ``fed-dir`` has no sites. Every
unit goes to the run store; units already done are skipped, so an interrupted sweep resumes where it
stopped. With ``--workers N`` independent groups of units (one backbone x protocol each) run as separate
simulations side by side, each with its own ports and Flower home.
"""

from __future__ import annotations

import csv
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from mdmt.data.manifest import list_sites
from mdmt.data.synth import format_summary, synthesize
from mdmt.errors import ConfigError, MDMTError
from mdmt.fed.config import RunConfig, load_toml
from mdmt.fed.plan import best_checkpoint, source_unit, training_code_digest, unit_keys
from mdmt.fed.workspace import WorkspaceLock
from mdmt.ops.launch import stop_all
from mdmt.ops.loco import ingest_sites, plan_run, prepare_config, run_simulation, site_roles
from mdmt.results.report import write_report
from mdmt.store import RunStore

SYNTH_KEYS = {"scale", "image-size", "seed", "both-site"}


def _read_file(path: Path, seen: tuple[Path, ...] = ()) -> tuple[dict[str, Any], dict[str, Any]]:
    """(values, synth) of one file on top of the file it ``extends`` (a path relative to it)."""
    if path.resolve() in seen:
        raise ConfigError(f"{path}: 'extends' comes back to this file ({' -> '.join(str(p) for p in seen)})")
    raw = load_toml(path)
    synth = raw.pop("synth", {}) or {}
    if not isinstance(synth, dict):
        raise ConfigError(f"{path}: 'synth' must be a table ([synth])")
    unknown = set(synth) - SYNTH_KEYS
    if unknown:
        raise ConfigError(
            f"{path}: unknown key(s) in [synth]: {', '.join(sorted(unknown))}; valid: {', '.join(sorted(SYNTH_KEYS))}"
        )
    base = raw.pop("extends", "")
    if not base:
        return raw, synth
    if not isinstance(base, str):
        raise ConfigError(f"{path}: 'extends' must be the path of another experiment file, got {base!r}")
    values, base_synth = _read_file(path.parent / base, (*seen, path.resolve()))
    return values | raw, base_synth | synth


def read_experiment(path: str | Path, overrides: dict[str, Any] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(run-config values, synth options) of an experiment file, flags applied on top."""
    values, synth = _read_file(Path(path))
    return values | dict(overrides or {}), synth


def seeds_of(values: dict[str, Any]) -> list[int]:
    """The seeds an experiment runs: ``seed`` as one number, a list, or a comma-separated string."""
    raw = values.get("seed", RunConfig().seed)
    items = raw if isinstance(raw, list) else str(raw).split(",")
    try:
        seeds = [int(str(x).strip()) for x in items if str(x).strip()]
    except ValueError:
        raise ConfigError(f'seed: {raw!r} is not a seed or a list of seeds (e.g. 0 or "0,1,2")') from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"seed: {raw!r} must name at least one seed, each once")
    return seeds


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
    """One validated config per simulation: all of a protocol and seed's units together, or with several
    workers one group per backbone x protocol x seed (ft's phase 1 stays with its ft units)."""
    protocols = [p.strip() for p in str(values.get("protocol", "loco")).split(",") if p.strip()]
    groups = []
    for seed in seeds_of(values):
        for proto in protocols:
            cfg = prepare_config(values | {"protocol": proto, "seed": seed})
            if workers > 1:
                groups += [cfg.replace(backbone=b) for b in cfg.backbones]
            else:
                groups.append(cfg)
    return groups


def _group_tag(g: RunConfig, groups: list[RunConfig]) -> str:
    return g.protocol if len({x.seed for x in groups}) == 1 else f"{g.protocol}-seed{g.seed}"


def restore_sources(cfg: RunConfig, store: RunStore, echo=print) -> list[str]:
    """Units another unit starts from (ft's phase 1) that the store holds as done but whose checkpoint is
    gone (a store kept without its workspace, e.g. in a fresh checkout) while a unit that starts from them
    is still to run: they are removed from the store so that this run trains them again (the same seed and
    recipe give the same model). Returns their ids."""
    keys = unit_keys(cfg, site_roles(cfg))
    removed = []
    for key in keys:
        src = source_unit(key)
        if src is None or store.unit_status(key) == "done":
            continue
        path = best_checkpoint(cfg, src)
        if src.unit_id not in removed and store.unit_status(src) == "done" and not path.is_file():
            store.delete_units([src.unit_id])
            removed.append(src.unit_id)
            echo(
                f"unit {src.unit_id}: done in the store but its checkpoint {path} is gone; "
                f"it runs again for {key.unit_id}"
            )
    return removed


def unit_progress(cfg: RunConfig, store: RunStore) -> tuple[int, int]:
    """(units of the group, units left to run): decided as the ServerApp decides (id and fingerprint)."""
    decisions = plan_run(cfg, store)
    return len(decisions), sum(d.action != "skip" for d in decisions)


SITTING_FIELDS = ("config", "started", "wall_s", "units", "to_run", "outcome", "commit", "training_code")


def _commit() -> str:
    """The commit of the checkout this package runs from (with '+changes' when tracked files outside docs/
    differ from it: a run store kept under docs/ changes as sittings write it); '' for an installed package
    outside git."""
    where = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=where, capture_output=True, text=True)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "-uno", "--", ":/", ":(top,exclude)docs"],
            cwd=where,
            capture_output=True,
            text=True,
        )
    except OSError:
        return ""
    if head.returncode != 0:
        return ""
    return head.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


def log_sitting(
    path, store_dir: Path, started: tuple[str, str], wall: float, counts: tuple[int, int], outcome: str
) -> Path:
    """Append one row per sitting to experiments.csv beside the run store: which config ran, when, for how
    long, how it ended, at which commit of the code (``started`` = (time, commit), both taken when the
    sitting began), its units and units left to run (``counts``) and with which training code. A sweep that
    takes several sittings adds its wall times from here."""
    out = store_dir / "experiments.csv"
    new = not out.is_file()
    with open(out, "a", newline="") as fh:
        w = csv.writer(fh)
        if new:
            w.writerow(SITTING_FIELDS)
        w.writerow(
            [
                Path(path).as_posix(),
                started[0],
                f"{wall:.0f}",
                *counts,
                outcome,
                started[1],
                training_code_digest(),
            ]
        )
    return out


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
            restore_sources(g, store, echo)
        progress = [unit_progress(g, store) for g in groups]
    finally:
        store.close()
    todo = [(i, g) for i, g in enumerate(groups) if progress[i][1]]
    t0 = time.perf_counter()
    started = (time.strftime("%Y-%m-%dT%H:%M:%S%z"), _commit())
    outcome = "stopped"
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

        run_simulation(
            g, resources[0], say, tag=tag or _group_tag(g, groups), ingest=False, gpus_per_client=resources[1]
        )

    try:
        if workers > 1:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                for fut in [pool.submit(run, item) for item in todo]:
                    fut.result()
        else:
            for item in todo:
                run(item)
        outcome = "finished"
    except BaseException:
        stop_all()
        raise
    finally:
        counts = (sum(t for t, _ in progress), sum(n for _, n in progress))
        log_sitting(path, groups[0].store_path.parent, started, time.perf_counter() - t0, counts, outcome)
    store = RunStore(groups[0].store_path, readonly=True)
    try:
        summary = write_report(store, groups[0].workspace_path / "reports")
    finally:
        store.close()
    echo(f"\nexperiment wall time {time.perf_counter() - t0:.0f} s; store {groups[0].store_path}")
    return summary
