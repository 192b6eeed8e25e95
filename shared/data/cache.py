"""The per-site uint8 image cache that training memory-maps: where it lives, when it is valid, reading it.

Layout (see docs/data-format.md)::

    <cache_root>/<site name>-<sha256(absolute site path)[:8]>/s<size>-<crop>[-voi<voi>]-v<CACHE_VERSION>/
        images.npy     uint8 (N, size, size), np.load(..., mmap_mode="r")
        index.csv      the manifest rows that were cached, in array order (+ crop_fallback 0/1, crop_note)
        records.csv    one record per decoded image (path, file size, mtime_ns, crop input, labels,
                       result): what the next ingest compares against to decode only what changed
        rejected.csv   this ingest's rejected rows (source, stage, reason); a copy of the site's
        meta.json      written last: manifest sha256, size, crop, voi, version, counts, crop fallbacks
        partial-*.npy/.csv   only after an interrupted ingest: the images it had decoded (a journal)

A cache is valid when meta.json matches the manifest and options and images.npy has the counted shape;
:mod:`mdmt.data.ingest` writes it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from mdmt.data.manifest import brixia_global, manifest_hash, read_manifest, severity_class, site_role
from mdmt.data.options import CROP_MODES, MIN_IMAGE_SIZE, VOI_MODES
from mdmt.errors import ConfigError, DataError

CACHE_VERSION = 2
IMAGES = "images.npy"
INDEX = "index.csv"
META = "meta.json"
RECORDS = "records.csv"
JOURNAL_PREFIX = "partial-"


@dataclass
class SiteData:
    site: str
    images: np.ndarray  # uint8 (N, S, S), memory-mapped
    table: pd.DataFrame  # index.csv rows + y_prog (-1/0/1) and y_sev (-1/0..3), aligned with images
    role: str  # prognosis | severity | both
    cache_dir: Path


def check_options(image_size: int, crop: str, voi: str = "none") -> None:
    """ConfigError unless ``crop``, ``voi`` and ``image_size`` are ones a cache can be built with."""
    if crop not in CROP_MODES:
        raise ConfigError(f"crop {crop!r} is not one of {', '.join(CROP_MODES)}")
    if voi not in VOI_MODES:
        raise ConfigError(f"voi {voi!r} is not one of {', '.join(VOI_MODES)}")
    if int(image_size) != image_size or image_size < MIN_IMAGE_SIZE:
        raise ConfigError(f"image_size {image_size!r} must be an integer >= {MIN_IMAGE_SIZE}")


def cache_dir_for(site_dir: str | Path, cache_root: str | Path, image_size: int, crop: str, voi: str = "none") -> Path:
    """``cache_root / f"{site}-{sha256(abs site path)[:8]}" / f"s{size}-{crop}[-voi{voi}]-v{CACHE_VERSION}"``
    (the ``-voi...`` part only when ``voi`` is not ``"none"``)."""
    check_options(image_size, crop, voi)
    site = Path(site_dir).resolve()
    key = hashlib.sha256(str(site).encode()).hexdigest()[:8]
    voi_part = "" if voi == "none" else f"-voi{voi}"
    return Path(cache_root) / f"{site.name}-{key}" / f"s{int(image_size)}-{crop}{voi_part}-v{CACHE_VERSION}"


def valid_meta(cdir: Path, mhash: str, image_size: int, crop: str, voi: str = "none") -> dict | None:
    """The cache's meta when it is complete and matches, else None."""
    try:
        meta = json.loads((cdir / META).read_text())
        ok = (
            meta.get("version") == CACHE_VERSION
            and meta.get("manifest_sha256") == mhash
            and meta.get("image_size") == int(image_size)
            and meta.get("crop") == crop
            and meta.get("voi", "none") == voi
            and (cdir / INDEX).is_file()
        )
        if not ok:
            return None
        arr = np.load(cdir / IMAGES, mmap_mode="r")
        if arr.dtype != np.uint8 or arr.shape != (meta["counts"]["cached"], image_size, image_size):
            return None
        return meta
    except Exception:
        return None


def _y_prog(v: str) -> int:
    return {"MILD": 0, "SEVERE": 1}.get(v, -1)


def _y_sev(v: str) -> int:
    return severity_class(brixia_global(v)) if v else -1


def open_site(site_dir: Path, cdir: Path) -> SiteData:
    """The cache in ``cdir`` of the site folder ``site_dir`` (resolved) as it is on disk, without checking it
    against the manifest: images memory-mapped, index.csv + y_prog / y_sev. DataError when the two disagree."""
    images = np.load(cdir / IMAGES, mmap_mode="r")
    table = pd.read_csv(cdir / INDEX, dtype=str, keep_default_na=False)
    if len(table) != len(images):
        raise DataError(
            f"cache {cdir}: index.csv has {len(table)} rows but images.npy {len(images)}; delete it and ingest again"
        )
    if "crop_fallback" in table.columns:
        table["crop_fallback"] = table["crop_fallback"].astype(int)
    table["y_prog"] = table["prognosis"].map(_y_prog).astype(int)
    table["y_sev"] = table["brixia"].map(_y_sev).astype(int)
    return SiteData(site=site_dir.name, images=images, table=table, role=site_role(table), cache_dir=cdir)


def load_site(
    site_dir: str | Path,
    cache_root: str | Path,
    image_size: int = 256,
    crop: str = "lung",
    voi: str = "none",
) -> SiteData:
    """The site's cached images (memory-mapped) and aligned table. Checks only that the cache matches the
    manifest and raises DataError otherwise; :func:`mdmt.data.ingest.ingest_and_load_site` ingests first."""
    check_options(image_size, crop, voi)
    site_dir = Path(site_dir).resolve()
    cdir = cache_dir_for(site_dir, cache_root, image_size, crop, voi)
    read_manifest(site_dir)  # a one-line DataError for a missing or bad manifest
    if valid_meta(cdir, manifest_hash(site_dir), image_size, crop, voi) is None:
        raise DataError(f"site {site_dir.name}: no up-to-date cache in {cdir}; run ingestion first")
    return open_site(site_dir, cdir)
