"""``mdmt bench``'s ingest section: ``mdmt ingest`` img/s against a bare ``pydicom`` decode of the same files,
on 1 core and on all."""

from __future__ import annotations

import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from mdmt.ops.bench.common import Bench, fed_label


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
    cfg = f"site {site} of {fed_label(fed)}, {len(files)} DICOM files, cache {s.image_size} px, crop lung"
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
