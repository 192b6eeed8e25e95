"""``mdmt bench``: the figures that decide a user's wall time, each printed with its device and settings.

Sections (``--sections``):
- ``train``: local training img/s (the project's ``train_local``: uint8 cache -> device, augmentation on
  the device) and its ratio to a raw train step of the same backbone measured in this process with the
  batch already on the device, configured alike (dtype, batch, channels_last, compile);
- ``round``: a 7-site Flower simulation, one local epoch per round: round overhead ratio
  (round wall time - slowest site's training) / round wall time, and the bytes each site sent;
- ``bytes``: bytes per round per site of the backbone's update as fp32, fp16 and 8-bit;
- ``ingest``: ``mdmt ingest`` img/s against a bare ``pydicom`` decode of the same files, 1 core and all;
- ``scaling``: Flower simulation round time and peak memory (PSS of every process of the run) at 2, 7,
  20 and 50 virtual sites with a tiny model.
``--quick`` shrinks every section to run on a CPU in a few minutes; the printed settings say what ran.
A section whose dependencies are missing (Flower, pydicom on a bare GPU machine) says so and is skipped.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mdmt.errors import ConfigError
from mdmt.store import RunStore

SECTIONS = ("train", "bytes", "ingest", "round", "scaling")


@dataclass
class Settings:
    quick: bool = False
    device: str = "auto"
    backbone: str = "resnet18"
    image_size: int = 256
    batch_size: int = 128
    steps: int = 50
    compile: str = "auto"  # auto (both on a GPU, eager only on a CPU) | on | off
    scale: float = 1.0  # synthetic federation size for round/ingest (1.0 = the published datasets' counts)
    sim_image_size: int = 64
    rounds: int = 3
    scaling_sites: tuple[int, ...] = (2, 7, 20, 50)
    scaling_rounds: int = 2
    workspace: Path = Path("runs/bench")
    fed_dir: Path | None = None  # an existing synthetic federation instead of making one at ``scale``

    @classmethod
    def for_mode(cls, quick: bool, **over: Any) -> Settings:
        s = (
            cls(
                quick=True,
                image_size=64,
                batch_size=32,
                steps=6,
                scale=0.04,
                sim_image_size=32,
                rounds=2,
                scaling_rounds=1,
            )
            if quick
            else cls()
        )
        for k, v in over.items():
            if v is not None:
                setattr(s, k, v)
        return s


@dataclass
class Figure:
    section: str
    name: str
    value: float | None
    unit: str
    device: str
    settings: str
    note: str = ""

    def line(self) -> str:
        if self.value is None:
            shown = "not measured"
        elif self.unit == "MiB":
            shown = f"{self.value:,.1f} MiB"
        elif self.unit in ("img/s", "B") or abs(self.value) >= 100:
            shown = f"{self.value:,.0f} {self.unit}".rstrip()
        else:
            shown = f"{self.value:.3f} {self.unit}".rstrip()
        return f"{self.section:8} {self.name:44} {shown:>18}   {self.device}; {self.settings}" + (
            f" ({self.note})" if self.note else ""
        )


@dataclass
class Bench:
    settings: Settings
    command: str
    echo: Callable[[str], None] = print
    figures: list[Figure] = field(default_factory=list)

    def add(self, *args: Any, **kw: Any) -> Figure:
        f = Figure(*args, **kw)
        self.figures.append(f)
        self.echo(f.line())
        return f


def device_name(device) -> str:
    # deferred: torch, pydicom and flwr load per section, which is skipped where one is missing
    import torch

    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__})"
    return (
        f"CPU {platform.processor() or platform.machine()} x{os.cpu_count()} threads {torch.get_num_threads()} "
        f"(torch {torch.__version__})"
    )


# ---- train -------------------------------------------------------------------------------------


def _sync(device) -> None:
    # deferred: torch, pydicom and flwr load per section, which is skipped where one is missing
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _random_data(n: int, size: int, seed: int = 0):
    # deferred: torch, pydicom and flwr load per section, which is skipped where one is missing
    from mdmt.ml.train import TaskData

    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, size, size), dtype=np.uint8)
    y_prog = rng.integers(0, 2, n)
    y_sev = np.where(rng.random(n) < 0.5, rng.integers(0, 4, n), -1)
    y_prog = np.where(y_sev >= 0, -1, y_prog)  # like the federation: one task per image
    return TaskData(images, y_prog.astype(np.int64), y_sev.astype(np.int64), [])


def raw_step_rate(backbone: str, size: int, batch: int, steps: int, device, compile_model: bool) -> float:
    """img/s of forward + masked two-task loss + backward + Adam on a batch already on the device, with the
    dtype and memory format local training uses there."""
    # deferred: torch, pydicom and flwr load per section, which is skipped where one is missing
    import torch

    # deferred: torch, pydicom and flwr load per section, which is skipped where one is missing
    from mdmt.ml.loss import mdmt_loss

    # deferred: torch, pydicom and flwr load per section, which is skipped where one is missing
    from mdmt.ml.model import build_model

    # deferred: torch, pydicom and flwr load per section, which is skipped where one is missing
    from mdmt.ml.train import autocast

    model = build_model(backbone, seed=0).to(device).train()
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    forward = torch.compile(model) if compile_model else model
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, weight_decay=1e-5)
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(batch, 3, size, size, device=device, generator=gen)
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    y_prog = torch.randint(0, 2, (batch,), device=device, generator=gen)
    y_sev = torch.where(
        torch.rand(batch, device=device, generator=gen) < 0.5,
        torch.randint(0, 4, (batch,), device=device, generator=gen),
        -1,
    )
    y_prog = torch.where(y_sev >= 0, -1, y_prog)

    def step() -> None:
        with autocast(device):
            lp, ls = forward(x)
        loss = mdmt_loss(lp, ls, y_prog, y_sev).total
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3):
        step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return steps * batch / (time.perf_counter() - t0)


def local_train_rate(
    backbone: str, size: int, batch: int, steps: int, device, compile_model: bool, augment: str
) -> float:
    """img/s of the project's local training call (``train_local``), timed whole: cache upload, feeding,
    on-device augmentation, optimiser, the end-of-round loss read-out."""
    # deferred: torch, pydicom and flwr load per section, which is skipped where one is missing
    from mdmt.ml.augment import get_augment

    # deferred: torch, pydicom and flwr load per section, which is skipped where one is missing
    from mdmt.ml.model import build_model

    # deferred: torch, pydicom and flwr load per section, which is skipped where one is missing
    from mdmt.ml.train import train_local

    data = _random_data(batch * min(steps, 16), size)
    model = build_model(backbone, seed=0)
    kw = dict(batch_size=batch, device=device, augment=get_augment(augment), compile_model=compile_model)
    train_local(model, data, steps=3, **kw)  # warm-up: kernels, allocator, compilation
    _sync(device)
    res = train_local(model, data, steps=steps, **kw)
    return steps * batch / res.seconds


def section_train(b: Bench, device) -> None:
    s = b.settings
    dev = device_name(device)
    compiles = (
        [False, True]
        if (s.compile == "auto" and device.type == "cuda")
        else [s.compile == "on"]
        if s.compile != "auto"
        else [False]
    )
    dtype = "bf16 autocast, channels_last" if device.type == "cuda" else "fp32"
    for comp in compiles:
        cfg = (
            f"{s.backbone} {s.image_size} px, batch {s.batch_size}, {s.steps} steps, {dtype}, "
            f"{'torch.compile' if comp else 'eager'}"
        )
        raw = raw_step_rate(s.backbone, s.image_size, s.batch_size, s.steps, device, comp)
        b.add("train", "raw step (batch on the device)", raw, "img/s", dev, cfg)
        for aug in ("paper", "none"):
            local = local_train_rate(s.backbone, s.image_size, s.batch_size, s.steps, device, comp, aug)
            b.add("train", f"local training, augment {aug}", local, "img/s", dev, cfg)
            b.add("train", f"local / raw, augment {aug}", local / raw, "x", dev, cfg)


# ---- bytes -------------------------------------------------------------------------------------


def update_bytes(backbone: str) -> dict[str, int]:
    """Bytes a site sends per round for this backbone's update, per encoding."""
    # deferred: torch, pydicom and flwr load per section, which is skipped where one is missing
    from mdmt.fed.compress import encode_update, payload_bytes

    # deferred: torch, pydicom and flwr load per section, which is skipped where one is missing
    from mdmt.ml.model import build_model

    model = build_model(backbone, seed=0)
    base = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    rng = np.random.default_rng(0)
    local = {k: v + rng.normal(0, 1e-3, v.shape).astype(v.dtype) if v.dtype.kind == "f" else v for k, v in base.items()}
    return {mode: payload_bytes(encode_update(local, base, mode)) for mode in ("none", "fp16", "int8")}


def section_bytes(b: Bench) -> None:
    s = b.settings
    sizes = update_bytes(s.backbone)
    for mode, label in (("none", "fp32 weights"), ("fp16", "fp16 update"), ("int8", "8-bit update")):
        b.add(
            "bytes",
            f"per site per round, {label}",
            sizes[mode] / 2**20,
            "MiB",
            "-",
            f"{s.backbone} arrays, before message framing",
            note=f"{sizes[mode] / sizes['none']:.3f} of fp32",
        )


# ---- ingest ------------------------------------------------------------------------------------


def _decode(path: str) -> int:
    # deferred: torch, pydicom and flwr load per section, which is skipped where one is missing
    import pydicom

    return int(pydicom.dcmread(path).pixel_array.size)


def bare_decode_rate(files: list[Path], workers: int) -> float:
    t0 = time.perf_counter()
    if workers <= 1:
        for f in files:
            _decode(str(f))
    else:
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(_decode, [str(f) for f in files], chunksize=8))
    return len(files) / (time.perf_counter() - t0)


def section_ingest(b: Bench, fed: Path) -> None:
    # deferred: torch, pydicom and flwr load per section, which is skipped where one is missing
    from mdmt.data.ingest import ingest_site

    # deferred: torch, pydicom and flwr load per section, which is skipped where one is missing
    from mdmt.data.manifest import list_sites, read_manifest

    s = b.settings
    site = max(list_sites(fed), key=lambda x: len(read_manifest(fed / x)))
    files = [fed / site / f for f in read_manifest(fed / site)["image"]]
    cores = os.cpu_count() or 1
    dev = f"CPU x{cores}"
    cfg = f"site {site} of {_fed_label(fed)}, {len(files)} DICOM files, cache {s.image_size} px, crop lung"
    for workers, label in ((1, "1 core"), (cores, f"{cores} cores")):
        bare = bare_decode_rate(files, workers)
        root = s.workspace / "ingest-cache"
        shutil.rmtree(root, ignore_errors=True)
        t0 = time.perf_counter()
        ingest_site(fed / site, root, image_size=s.image_size, crop="lung", workers=workers, progress=False, force=True)
        ours = len(files) / (time.perf_counter() - t0)
        b.add("ingest", f"bare pydicom decode, {label}", bare, "img/s", dev, cfg)
        b.add("ingest", f"mdmt ingest, {label}", ours, "img/s", dev, cfg)
        b.add(
            "ingest",
            f"mdmt ingest / bare decode, {label}",
            ours / bare,
            "x",
            dev,
            cfg,
            note="ingest also crops, resizes, hashes and writes the cache",
        )
    shutil.rmtree(s.workspace / "ingest-cache", ignore_errors=True)


# ---- simulations -------------------------------------------------------------------------------


def federation(s: Settings) -> Path:
    """The synthetic federation the round and ingest sections use (made once per scale)."""
    # deferred: torch, pydicom and flwr load per section, which is skipped where one is missing
    from mdmt.data.synth import synthesize

    if s.fed_dir is not None:
        return Path(s.fed_dir).resolve()
    fed = s.workspace / f"federation-{s.scale:g}"
    if not (fed / "BRIXIA" / "manifest.csv").is_file():
        synthesize(fed, scale=s.scale, image_size=max(64, min(s.image_size, 320)), seed=0, progress=False)
    return fed


def _short_device(s: Settings) -> str:
    # deferred: torch, pydicom and flwr load per section, which is skipped where one is missing
    from mdmt.ml.train import resolve_device

    device = resolve_device(s.device)
    return device_name(device).split(" (torch")[0]


def _fed_label(fed: Path) -> str:
    # deferred: torch, pydicom and flwr load per section, which is skipped where one is missing
    from mdmt.data.manifest import list_sites, read_manifest

    return f"federation {fed.name} ({sum(len(read_manifest(fed / x)) for x in list_sites(fed))} images)"


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


def _simulate(
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
    store, _, wall = _simulate(
        s, fed, "round", sites, "A", s.backbone, s.sim_image_size, s.rounds, min(s.batch_size, 32), b.echo
    )
    rows = _round_rows(store)
    steady = [r for rnd, r in sorted(rows.items()) if rnd > 1] or list(rows.values())
    cfg = (
        f"{len(sites)}-site simulation of {_fed_label(fed)}, mdmt {s.backbone} {s.sim_image_size} px, 1 local epoch, "
        f"rounds {'2..' if len(rows) > 1 else ''}{len(rows)}"
    )
    dev = f"Flower simulation on {_short_device(s)}"
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
        store, peak, wall = _simulate(s, sfed, f"scaling-{n}", sites, sites[0], tiny, 32, s.scaling_rounds, 16, b.echo)
        rows = _round_rows(store)
        cfg = f"{n} virtual sites (site 1 held out), {tiny} 32 px, {s.scaling_rounds} round(s)"
        dev = f"Flower simulation on {_short_device(s)}"
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


# ---- driver ------------------------------------------------------------------------------------


def run_bench(
    settings: Settings,
    sections: tuple[str, ...] = SECTIONS,
    command: str = "mdmt bench",
    echo: Callable[[str], None] = print,
) -> Bench:
    # deferred: torch, pydicom and flwr load per section, which is skipped where one is missing
    from mdmt.ml.train import resolve_device

    s = settings
    s.workspace = Path(s.workspace).resolve()
    s.workspace.mkdir(parents=True, exist_ok=True)
    device = resolve_device(s.device)
    b = Bench(s, command, echo)
    echo(f"{command}   (python {platform.python_version()}, {device_name(device)}; workspace {s.workspace})")
    echo(f"{'section':8} {'figure':44} {'value':>18}   device; settings")
    t0 = time.perf_counter()
    fed, missing = None, ""
    for name in sections:
        start = time.perf_counter()
        try:
            if name == "train":
                section_train(b, device)
            elif name == "bytes":
                section_bytes(b)
            elif missing:  # the synthetic federation could not be made
                b.add(name, "section skipped", None, "", "-", "-", note=f"needs {missing}")
            else:
                try:
                    fed = fed or federation(s)
                except ImportError as exc:
                    missing = exc.name or str(exc)
                    raise
                {"ingest": section_ingest, "round": section_round, "scaling": section_scaling}[name](b, fed)
        except ImportError as exc:  # a GPU machine without Flower or pydicom
            b.add(name, "section skipped", None, "", "-", "-", note=f"needs {exc.name}")
        echo(f"{'':8} ({name}: {time.perf_counter() - start:.0f} s)")
    echo(f"bench wall time {time.perf_counter() - t0:.0f} s")
    out = s.workspace / f"bench-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(
        json.dumps(
            {
                "command": command,
                "settings": {k: str(v) for k, v in asdict(s).items()},
                "figures": [asdict(f) for f in b.figures],
            },
            indent=1,
        )
    )
    echo(f"figures: {out}")
    return b


def cmd_bench(a) -> None:

    sections = tuple(x.strip() for x in a.sections.split(",") if x.strip())
    bad = [x for x in sections if x not in SECTIONS]
    if bad:
        raise ConfigError(f"--sections: unknown '{bad[0]}'; choose from {', '.join(SECTIONS)}")
    sites = tuple(int(x) for x in a.scaling_sites.split(",")) if a.scaling_sites else None
    s = Settings.for_mode(
        a.quick,
        device=a.device,
        backbone=a.backbone,
        image_size=a.image_size,
        batch_size=a.batch_size,
        steps=a.steps,
        compile=a.compile,
        scale=a.scale,
        workspace=Path(a.workspace),
        scaling_sites=sites,
        fed_dir=Path(a.fed_dir) if a.fed_dir else None,
    )
    run_bench(s, sections, command="mdmt " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["bench"] else "mdmt bench")


def add_arguments(subparsers) -> None:
    p = subparsers.add_parser(
        "bench",
        help="measure training throughput vs the raw step, round overhead, update "
        "bytes, ingestion and simulation scaling",
    )
    p.add_argument("--quick", action="store_true", help="small settings that run on a CPU in a few minutes")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default auto)")
    p.add_argument("--backbone", default=None, help="default resnet18")
    p.add_argument("--image-size", type=int, default=None, help="train section image side (default 256; quick 64)")
    p.add_argument("--batch-size", type=int, default=None, help="default 128; quick 32")
    p.add_argument("--steps", type=int, default=None, help="timed training steps (default 50; quick 6)")
    p.add_argument(
        "--compile",
        default=None,
        choices=("auto", "on", "off"),
        help="torch.compile in the train section (auto: eager and compiled on a GPU, eager on a CPU)",
    )
    p.add_argument("--scale", type=float, default=None, help="synthetic federation scale (default 1.0; quick 0.04)")
    p.add_argument("--fed-dir", default=None, help="use this synthetic federation instead of making one at --scale")
    p.add_argument("--scaling-sites", default="", help="virtual site counts (default 2,7,20,50)")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated: {', '.join(SECTIONS)}")
    p.add_argument("--workspace", default="runs/bench", help="federations, caches and the figures' JSON")
    p.set_defaults(fn=cmd_bench)
