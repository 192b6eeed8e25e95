"""``mdmt bench``'s Flower simulation sections: round (round overhead ratio and bytes up on the synthetic
federation) and scaling (round time and peak memory at growing virtual site counts)."""

from __future__ import annotations

import shutil
import statistics
import threading
import time
from pathlib import Path
from typing import Any

from mdmt.ops.bench.common import Bench, Settings, fed_label, short_device
from mdmt.store import RunStore


class MemoryProbe:
    """Peak summed PSS of the processes of one simulation (found by its token, Ray's daemons included)."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __call__(self, sim) -> None:
        # deferred: torch, pydicom and flwr load per section, which is skipped where one is missing
        from mdmt.ops.launch import processes_with_token

        def sample() -> None:
            while not self._stop.is_set():
                total = 0
                for pid in processes_with_token(sim.token, f"RAY_TMPDIR={sim.ray_tmp}"):
                    total += _pss(pid)
                self.peak = max(self.peak, total)
                self._stop.wait(0.25)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()

    def stop(self) -> int:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        return self.peak


def _pss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def simulate(
    s: Settings,
    fed: Path,
    tag: str,
    sites: list[str],
    holdout: str,
    backbone: str,
    image_size: int,
    rounds: int,
    batch: int,
    echo,
    extra: dict[str, Any] | None = None,
) -> tuple[Path, int, float]:
    """A real Flower simulation of one MDMT unit; returns (store, peak memory bytes, wall seconds)."""
    # deferred: torch, pydicom and flwr load per section, which is skipped where one is missing
    from mdmt.ops.loco import prepare_config, run_simulation

    ws = s.workspace / tag
    shutil.rmtree(ws / "store.sqlite", ignore_errors=True)
    for p in (ws / "store.sqlite", ws / "store.sqlite-wal", ws / "store.sqlite-shm"):
        p.unlink(missing_ok=True)
    shutil.rmtree(ws / "checkpoints", ignore_errors=True)
    cfg = prepare_config(
        {
            "method": "mdmt",
            "backbone": backbone,
            "fed-dir": str(fed),
            "workspace": str(ws),
            "cache-dir": str(s.workspace / "cache"),
            "sites": ",".join(sites),
            "holdouts": holdout,
            "image-size": image_size,
            "num-rounds": rounds,
            "local-epochs": 1,
            "batch-size": batch,
            "device": s.device,
            "seed": 0,
            "round-timeout": 3600.0,
        }
        | dict(extra or {})
    )
    # deferred: torch, pydicom and flwr load per section, which is skipped where one is missing
    from mdmt.data.ingest import ingest_site

    t0 = time.perf_counter()
    for site in cfg.site_list:
        ingest_site(cfg.fed_path / site, cfg.cache_path, image_size=cfg.image_size, crop=cfg.crop, progress=False)
    probe = MemoryProbe()
    try:
        run_simulation(cfg, echo=lambda line: None, tag=tag, ingest=False, on_start=probe)
    finally:
        peak = probe.stop()
    return cfg.store_path, peak, time.perf_counter() - t0


def _round_rows(store_path: Path) -> dict[int, dict[str, Any]]:

    store = RunStore(store_path, readonly=True)
    try:
        unit = store.units()[0]["unit_id"]
        rows = store.metrics(unit)
    finally:
        store.close()
    out: dict[int, dict[str, Any]] = {}
    for m in rows:
        r = out.setdefault(m["round"], {"site_train": [], "bytes_up": []})
        if m["site"] == "*" and m["split"] == "round":
            r[m["name"]] = m["value"]
        elif m["split"] == "train" and m["name"] == "seconds":
            r["site_train"].append(m["value"])
        elif m["split"] == "train" and m["name"] == "bytes_up":
            r["bytes_up"].append(m["value"])
    return out


def section_round(b: Bench, fed: Path) -> None:
    # deferred: torch, pydicom and flwr load per section, which is skipped where one is missing
    from mdmt.data.manifest import list_sites

    s = b.settings
    sites = list_sites(fed)
    store, _, wall = simulate(
        s, fed, "round", sites, "A", s.backbone, s.sim_image_size, s.rounds, min(s.batch_size, 32), b.echo
    )
    rows = _round_rows(store)
    steady = [r for rnd, r in sorted(rows.items()) if rnd > 1] or list(rows.values())
    cfg = (
        f"{len(sites)}-site simulation of {fed_label(fed)}, mdmt {s.backbone} {s.sim_image_size} px, 1 local epoch, "
        f"rounds {'2..' if len(rows) > 1 else ''}{len(rows)}"
    )
    dev = f"Flower simulation on {short_device(s)}"
    ratios = [(r["seconds"] - max(r["site_train"])) / r["seconds"] for r in steady]
    b.add("round", "round wall time", statistics.mean(r["seconds"] for r in steady), "s", dev, cfg)
    b.add("round", "slowest site's training", statistics.mean(max(r["site_train"]) for r in steady), "s", dev, cfg)
    b.add(
        "round",
        "round overhead ratio",
        statistics.mean(ratios),
        "",
        dev,
        cfg,
        note="(round wall - slowest site's training) / round wall; evaluation of every site included",
    )
    up = [v for r in steady for v in r["bytes_up"]]
    b.add(
        "round",
        "bytes up per site per round (fp16)",
        statistics.mean(up) / 2**20,
        "MiB",
        dev,
        cfg,
        note="measured by Flower's ArrayRecord",
    )
    b.add("round", "simulation wall time", wall, "s", dev, cfg, note="start, ingest and all rounds")


def scaling_federation(s: Settings, fed: Path, n: int) -> Path:
    """``n`` virtual sites, each a link to one of the synthetic prognosis centres (their data repeats)."""
    # deferred: torch, pydicom and flwr load per section, which is skipped where one is missing
    from mdmt.data.manifest import list_sites, read_manifest, site_role

    out = s.workspace / f"scaling-{s.scale:g}"
    out.mkdir(parents=True, exist_ok=True)
    sources = [x for x in list_sites(fed) if site_role(read_manifest(fed / x)) == "prognosis"]
    for i in range(n):
        link = out / f"S{i + 1:02d}"
        if not link.exists():
            link.symlink_to((fed / sources[i % len(sources)]).resolve(), target_is_directory=True)
    return out


def section_scaling(b: Bench, fed: Path) -> None:
    s = b.settings
    tiny = "shufflenet_v2_x0_5"
    for n in s.scaling_sites:
        sfed = scaling_federation(s, fed, max(s.scaling_sites))
        sites = [f"S{i + 1:02d}" for i in range(n)]
        store, peak, wall = simulate(s, sfed, f"scaling-{n}", sites, sites[0], tiny, 32, s.scaling_rounds, 16, b.echo)
        rows = _round_rows(store)
        cfg = f"{n} virtual sites (site 1 held out), {tiny} 32 px, {s.scaling_rounds} round(s)"
        dev = f"Flower simulation on {short_device(s)}"
        b.add(
            "scaling",
            f"{n} sites: round wall time",
            statistics.mean(r["seconds"] for r in rows.values()),
            "s",
            dev,
            cfg,
        )
        b.add("scaling", f"{n} sites: peak memory (PSS, all processes)", peak / 2**20, "MiB", dev, cfg)
        b.add("scaling", f"{n} sites: simulation wall time", wall, "s", dev, cfg, note="start and ingest included")
