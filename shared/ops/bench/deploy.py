"""``mdmt bench``'s deploy section: a real deployment on loopback (TLS SuperLink with SuperNode
authentication, three registered SuperNodes: two prognosis centres and the severity site), one job of six
LOCO units in lockstep (three backbones, each centre held out in turn), and what its rounds cost.

- **Overhead per unit-round**, from round 2 on (round 1 holds discovery and each site's first cache build):

      (wall from round 2's messages to the last unit's end - sum over round trips of the slowest site's
       training) / unit-rounds

  the warm section's formula, on a deployment.
- **Breakdown** of a round trip, from the sites' own timing logs (mdmt.fed.timing): the slowest site's
  message of each trip from round 2, averaged over trips: Flower's delivery (the server's message to the
  ClientApp process's start: polling), the process's start (Python, Flower, the app, the message pulled),
  torch and the site's code, data, model builds, training, evaluation, the rest of the site's work, and
  what is left of the trip (the reply's way back, the server's aggregation, checkpoints and store).
- **Message size** to the site that trains every unit, per round.
- Two jobs in one bench run: the units' models and updates as one Flower Array per tensor (Flower's own
  layout, ``pack-arrays = false``), then packed (mdmt.fed.packing, the default).
- **Coordinator disk**: the SuperLink's state folder (its SQLite database with WAL) sampled through the run:
  its peak in round 1, its peak from round 2 on, and its size at the end.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from mdmt.ops.bench.common import Bench, fed_label, short_device

BACKBONES = ("resnet18", "shufflenet_v2_x1_0", "efficientnet_lite0")


class JobFailed(RuntimeError):
    """The deployed job did not complete (its supervisor used up its resubmissions)."""


class DiskProbe:
    """Samples the bytes under a folder every ``every`` seconds, with the time of each sample."""

    def __init__(self, folder: Path, every: float = 0.5):
        self.folder, self.every = folder, every
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.time(), folder_bytes(self.folder)))
            self._stop.wait(self.every)

    def __enter__(self) -> DiskProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)
        self.samples.append((time.time(), folder_bytes(self.folder)))

    def save(self, path: Path) -> None:
        """The samples as CSV (Unix time, bytes)."""
        path.write_text("time,bytes\n" + "".join(f"{t:.2f},{b}\n" for t, b in self.samples))

    def peak(self, start: float = 0.0, end: float = float("inf")) -> int:
        return max((b for t, b in self.samples if start <= t <= end), default=0)


def folder_bytes(folder: Path) -> int:
    total = 0
    for p in folder.rglob("*") if folder.is_dir() else []:
        try:
            if p.is_file():
                total += p.stat().st_size
        except OSError:
            pass
    return total


def store_rounds(store_path: Path) -> tuple[dict[int, dict[str, float]], dict[int, dict[str, float]], float, int]:
    """(round -> site -> training seconds summed over units, round -> site -> bytes sent to it summed over
    units, the last unit's end, unit-rounds from round 2 on) of a job's store."""
    # deferred: the store module is light, but bench sections import lazily
    from mdmt.store import RunStore

    store = RunStore(store_path, readonly=True)
    try:
        units = store.units()
        train: dict[int, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        down: dict[int, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        unit_rounds = 0
        for u in units:
            rows = store.metrics(u["unit_id"])
            unit_rounds += len({m["round"] for m in rows if m["site"] == "*" and m["split"] == "round"} - {1})
            for m in rows:
                if m["site"] != "*" and m["split"] == "train":
                    if m["name"] == "seconds":
                        train[m["round"]][m["site"]] += m["value"]
                    elif m["name"] == "bytes_down":
                        down[m["round"]][m["site"]] += m["value"]
        end = max(u["ended"] for u in units)
    finally:
        store.close()
    return train, down, end, unit_rounds


PARTS = (
    ("Flower delivery (server's message to the ClientApp process)", "sent", "process"),
    ("process start: Python, Flower, the app, the message pulled", "process", "handler"),
    ("torch and the site's code imported", "handler", "imported"),
)


def trips_of(rows: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """The sites' timing lines grouped by round trip (the server makes a trip's messages together)."""
    out: list[list[dict[str, Any]]] = []
    for r in sorted(rows, key=lambda r: r["sent"]):
        if out and r["sent"] - out[-1][0]["sent"] <= 1.0:
            out[-1].append(r)
        else:
            out.append([r])
    return out


def breakdown(trips: list[list[dict[str, Any]]], wall: float) -> list[tuple[str, float]]:
    """Seconds per round trip of each part of the slowest message (the last reply ready) of each trip,
    averaged over ``trips``; the last part is the trip's remainder: the reply's way back, the server's
    aggregation, checkpoints and store, until the next trip's messages are made."""
    last = [max(t, key=lambda r: r["done"]) for t in trips]
    n = max(len(last), 1)
    out = []
    for name, a, b in PARTS:
        out.append((name, sum(r[b] - r[a] for r in last if r.get(a) is not None and r.get(b) is not None) / n))
    for k in ("data", "model", "train", "evaluate"):
        out.append((f"site: {k}", sum(r["stages"].get(k, 0.0) for r in last) / n))
    rest = sum(r["done"] - r["imported"] - sum(r["stages"].values()) for r in last) / n
    out.append(("site: the rest (update encoding, logs)", rest))
    out.append(("server: reply back, aggregation, checkpoints, store", wall / n - sum(v for _, v in out)))
    return out


def run_job(s, fed: Path, root: Path, sites: list[str], centres: list[str], rounds: int, packed: bool):
    """One job on a fresh loopback deployment under ``root``; (store, timing lines of every site, disk probe,
    wall seconds from submit to completed, resubmissions by its supervisor)."""
    # deferred: torch, pydicom and flwr load per section, which is skipped where one is missing
    import tomli_w

    # deferred: the jobs and the deployment pieces import Flower's CLI helpers and cryptography
    from mdmt.fed.timing import read_timing_log
    from mdmt.ops import jobs
    from mdmt.ops.deploy.loopback import CONNECTION, Loopback

    shutil.rmtree(root, ignore_errors=True)
    with Loopback(root, fed, device=s.device) as lb:
        lb.start_superlink()
        for site in sites:
            lb.add_site(site)
        ws = root / "coordinator" / "job"
        config = root / "coordinator" / "bench.toml"
        values = {
            "method": "mdmt",
            "backbone": ",".join(BACKBONES),
            "holdouts": ",".join(centres),
            "sites": ",".join(sites),
            "num-rounds": rounds,
            "image-size": s.sim_image_size,
            "batch-size": min(s.batch_size, 32),
            "local-epochs": 1,
            "concurrent-units": 6,
            "patience": 0,
            "seed": 0,
            "device": s.device,
            "fed-dir": str(fed),
            "workspace": str(ws),
            "round-timeout": 1800.0,
            "pack-arrays": packed,
        }
        config.write_text(tomli_w.dumps(values))
        t0 = time.time()
        with DiskProbe(lb.state) as disk:
            job = jobs.submit(config, CONNECTION, str(lb.flwr_home), echo=lambda line: None)
            rc = jobs.watch(job, poll=2.0, echo=lambda line: None, log_dir=root / "runs")
        wall = time.time() - t0
        disk.save(root / "coordinator" / "state-bytes.csv")
        if rc != 0:
            raise JobFailed(f"the job ended with {job.state}: {job.message}; see {root / 'runs'} and {lb.logs}")
        timings = [r for site in sites for r in read_timing_log(lb.site_workspace(site))]
    return ws / "store.sqlite", timings, disk, wall, job.restarts


def section_deploy(b: Bench, fed: Path) -> None:
    # deferred: torch, pydicom and flwr load per section, which is skipped where one is missing
    from mdmt.data.manifest import list_sites, read_manifest, site_role

    s = b.settings
    roles = {x: site_role(read_manifest(fed / x)) for x in list_sites(fed)}
    centres = [x for x, r in roles.items() if r == "prognosis"][:2]
    sites = centres + [x for x, r in roles.items() if r == "severity"][:1]
    dev = f"deployment on loopback, {short_device(s)}"
    per: dict[str, float] = {}
    for label, packed, rounds in (
        ("packed", True, s.deploy_rounds),
        ("one Array per tensor", False, s.deploy_baseline_rounds),
    ):
        if rounds < 2:
            continue
        cfg = (
            f"TLS SuperLink + {len(sites)} SuperNodes ({', '.join(sites)}) of {fed_label(fed)}; 6 LOCO units of "
            f"mdmt ({', '.join(BACKBONES)} x held-out {', '.join(centres)}) in lockstep, {s.sim_image_size} px, "
            f"{rounds} rounds of 1 local epoch"
        )
        tag = "packed" if packed else "per-tensor"
        try:
            store, timings, disk, job_wall, restarts = run_job(
                s, fed, s.workspace / f"deploy-{tag}", sites, centres, rounds, packed
            )
        except JobFailed as exc:  # reported, and the other job still runs
            b.add("deploy", f"{label}: job failed", None, "", dev, cfg, note=str(exc))
            continue
        train, down, end, unit_rounds = store_rounds(store)
        later = [r for r in timings if min(r.get("rounds") or [0]) >= 2]
        start2 = min(r["sent"] for r in later)
        trips = trips_of(later)
        wall = end - start2
        slowest = sum(max(per_site.values()) for rnd, per_site in train.items() if rnd >= 2)
        per[label] = (wall - slowest) / unit_rounds

        def add(name: str, value: float, unit: str = "s", note: str = "", label=label, cfg=cfg) -> None:
            b.add("deploy", f"{label}: {name}", value, unit, dev, cfg, note=note)

        add("wall per unit-round, rounds 2 on", wall / unit_rounds)
        add("slowest site's training per unit-round", slowest / unit_rounds, note="summed over trips, rounds 2 on")
        add(
            "overhead per unit-round, rounds 2 on",
            per[label],
            note="(wall from round 2 - sum of each trip's slowest site training) / unit-rounds",
        )
        for name, sec in breakdown(trips, wall):
            add(f"per trip: {name}", sec, note="the slowest site's message, mean over trips from round 2")
        biggest = max((max(per_site.values()) for per_site in down.values()), default=0.0)
        add("message to the site training 6 units", biggest / 2**20, "MiB", note="per round")
        add("coordinator state, peak in round 1", disk.peak(0, start2) / 2**20, "MiB")
        add("coordinator state, peak from round 2", disk.peak(start2) / 2**20, "MiB")
        # bounded: the second half of the trips from round 2 needs no more than the first half
        mid = trips[len(trips) // 2][0]["sent"]
        add(f"coordinator state, peak in trips 1-{len(trips) // 2} from round 2", disk.peak(start2, mid) / 2**20, "MiB")
        add(f"coordinator state, peak in the last {len(trips) - len(trips) // 2} trips", disk.peak(mid) / 2**20, "MiB")
        add("coordinator state at the end", disk.samples[-1][1] / 2**20, "MiB")
        add("job wall time", job_wall, note="submit to completed, discovery and caches included")
        add("runs resubmitted by the supervisor", restarts, "", note="a failed Flower run is submitted again")
    if len(per) == 2:
        b.add(
            "deploy",
            "overhead per unit-round, packed / per tensor",
            per["packed"] / per["one Array per tensor"],
            "",
            dev,
            "the two jobs above, in this bench run",
        )
