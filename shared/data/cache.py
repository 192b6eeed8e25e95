"""Ingestion: a site's manifest + image files -> a uint8 array cache that training memory-maps.

Layout (see docs/data-format.md)::

    <cache_root>/<site name>-<sha256(absolute site path)[:8]>/s<size>-<crop>-v<CACHE_VERSION>/
        images.npy     uint8 (N, size, size), np.load(..., mmap_mode="r")
        index.csv      the manifest rows that were cached, in array order (+ crop_fallback 0/1)
        rejected.csv   this ingest's rejected rows (source, stage, reason); a copy of the site's
        meta.json      written last: manifest sha256, size, crop, version, counts, crop fallbacks

A cache is reused when meta.json matches the manifest hash, size, crop and version; otherwise it is
rebuilt. Every file is written to a temporary name and renamed; meta.json is removed before a rebuild
and written last, so an interrupted ingest never leaves a cache that looks valid.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from shared.data.manifest import (
    REJECTED,
    REJECTED_COLUMNS,
    brixia_global,
    list_sites,
    manifest_hash,
    read_manifest,
    read_rejected,
    severity_class,
    site_role,
    unlabelled,
    write_rejected,
)
from shared.data.preprocess import CROP_MODES
from shared.errors import ConfigError, DataError, DicomRejected

CACHE_VERSION = 1
IMAGES = "images.npy"
INDEX = "index.csv"
META = "meta.json"
STAGE = "ingest"
MIN_IMAGE_SIZE = 16


@dataclass
class SiteData:
    site: str
    images: np.ndarray  # uint8 (N, S, S), memory-mapped
    table: pd.DataFrame  # index.csv rows + y_prog (-1/0/1) and y_sev (-1/0..3), aligned with images
    role: str  # prognosis | severity | both
    cache_dir: Path


def _check_options(image_size: int, crop: str) -> None:
    if crop not in CROP_MODES:
        raise ConfigError(f"crop {crop!r} is not one of {', '.join(CROP_MODES)}")
    if int(image_size) != image_size or image_size < MIN_IMAGE_SIZE:
        raise ConfigError(f"image_size {image_size!r} must be an integer >= {MIN_IMAGE_SIZE}")


def cache_dir_for(site_dir: str | Path, cache_root: str | Path, image_size: int, crop: str) -> Path:
    """``cache_root / f"{site}-{sha256(abs site path)[:8]}" / f"s{size}-{crop}-v{CACHE_VERSION}"``."""
    _check_options(image_size, crop)
    site = Path(site_dir).resolve()
    key = hashlib.sha256(str(site).encode()).hexdigest()[:8]
    return Path(cache_root) / f"{site.name}-{key}" / f"s{int(image_size)}-{crop}-v{CACHE_VERSION}"


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = _tmp(path)
    tmp.write_text(text)
    os.replace(tmp, path)


def _write_csv_atomic(path: Path, df: pd.DataFrame) -> None:
    tmp = _tmp(path)
    df.to_csv(tmp, index=False)
    os.replace(tmp, path)


def _valid_meta(cdir: Path, mhash: str, image_size: int, crop: str) -> dict | None:
    """The cache's meta when it is complete and matches, else None."""
    try:
        meta = json.loads((cdir / META).read_text())
        ok = (
            meta.get("version") == CACHE_VERSION
            and meta.get("manifest_sha256") == mhash
            and meta.get("image_size") == int(image_size)
            and meta.get("crop") == crop
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


def _process_one(task: tuple[str, int, str]) -> tuple:
    """Worker: read + preprocess one file. ('ok', uint8 array, fallback) or ('rejected', reason)."""
    from shared.data.dicom import read_image
    from shared.data.preprocess import preprocess_with_info

    path, size, crop = task
    try:
        img, _ = read_image(path)
    except DicomRejected as exc:
        return ("rejected", str(exc))
    except Exception as exc:  # read_image should not let anything else out; be safe in a pool
        return ("rejected", f"unreadable: {exc.__class__.__name__}: {' '.join(str(exc).split())[:180]}")
    try:
        out, info = preprocess_with_info(img, size, crop)
    except Exception as exc:
        return ("rejected", f"preprocessing failed: {exc.__class__.__name__}: {' '.join(str(exc).split())[:160]}")
    return ("ok", out, bool(info["fallback"]))


def _iter_results(tasks: list, workers: int):
    if workers <= 1 or len(tasks) <= 1:
        for t in tasks:
            yield _process_one(t)
        return
    from concurrent.futures import ProcessPoolExecutor

    chunk = max(1, min(16, len(tasks) // (workers * 4)))
    with ProcessPoolExecutor(max_workers=min(workers, len(tasks))) as ex:
        yield from ex.map(_process_one, tasks, chunksize=chunk)


def _site_writable(site_dir: Path) -> bool:
    return os.access(site_dir, os.W_OK | os.X_OK)


def _publish_rejected(site_dir: Path, cdir: Path, rows: list[tuple[str, str]]) -> tuple[Path, bool]:
    """Write the ingest rows to the site's rejected.csv (other stages kept) and a copy into the cache.

    Returns (the file a user should read, whether it is the cache copy because the site is read-only).
    """
    copy = pd.DataFrame([(s, STAGE, r) for s, r in rows], columns=list(REJECTED_COLUMNS))
    _write_csv_atomic(cdir / REJECTED, copy)
    if _site_writable(site_dir):
        try:
            current = read_rejected(site_dir)
            current = current[current["stage"] == STAGE]
            same = list(zip(current["source"], current["reason"])) == [tuple(r) for r in rows]
            if not same:
                write_rejected(site_dir, STAGE, rows)
            return site_dir / REJECTED, False
        except OSError:
            pass
    return cdir / REJECTED, True


def _summary(site: str, meta: dict, cdir: Path, reused: bool, t0: float, rej_file: Path, in_cache: bool) -> dict:
    out = {
        "site": site,
        "cached": int(meta["counts"]["cached"]),
        "rejected": int(meta["counts"]["rejected"]),
        "reused": reused,
        "seconds": round(time.perf_counter() - t0, 3),
        "cache_dir": str(cdir),
        "crop_fallbacks": int(meta.get("crop_fallbacks", 0)),
        "rejected_file": str(rej_file) if meta["counts"]["rejected"] else None,
        "rejected_in_cache_dir": bool(in_cache),
    }
    if in_cache and meta["counts"]["rejected"]:
        out["note"] = f"site folder is not writable; rejected list written to {rej_file}"
    return out


def ingest_site(
    site_dir: str | Path,
    cache_root: str | Path,
    image_size: int = 256,
    crop: str = "lung",
    workers: int = 1,
    progress: bool = True,
    force: bool = False,
) -> dict:
    """Cache one site's labelled, readable images; list the rest in rejected.csv. Returns a summary dict
    (site, cached, rejected, reused, seconds, cache_dir, crop_fallbacks, rejected_file,
    rejected_in_cache_dir[, note]). Raises DataError for a bad manifest or when every image is rejected."""
    t0 = time.perf_counter()
    _check_options(image_size, crop)
    image_size = int(image_size)
    site_dir = Path(site_dir).resolve()
    df = read_manifest(site_dir)
    mhash = manifest_hash(site_dir)
    site = site_dir.name
    cdir = cache_dir_for(site_dir, cache_root, image_size, crop)

    if not force:
        meta = _valid_meta(cdir, mhash, image_size, crop)
        if meta is not None:
            rows = []
            if (cdir / REJECTED).is_file():
                old = pd.read_csv(cdir / REJECTED, dtype=str, keep_default_na=False)
                rows = list(zip(old["source"], old["reason"]))
            try:
                rej_file, in_cache = _publish_rejected(site_dir, cdir, rows)
            except OSError:
                rej_file, in_cache = cdir / REJECTED, True
            return _summary(site, meta, cdir, True, t0, rej_file, in_cache)

    try:
        cdir.mkdir(parents=True, exist_ok=True)
        (cdir / META).unlink(missing_ok=True)
    except OSError as exc:
        raise DataError(f"cache folder {cdir} cannot be written ({exc.__class__.__name__}: {exc}); choose another cache root") from None

    rejected: list[tuple[int, str, str]] = []  # (manifest row, source, reason)
    todo: list[int] = []
    no_label = unlabelled(df).to_numpy()
    for i, image in enumerate(df["image"]):
        if no_label[i]:
            rejected.append((i, image, "no label (prognosis and brixia both empty)"))
        elif not (site_dir / image).exists():
            rejected.append((i, image, "file not found"))
        else:
            todo.append(i)

    tmp_images = _tmp(cdir / IMAGES)
    try:
        return _build(df, site_dir, site, cdir, mhash, image_size, crop, workers, progress, rejected, todo, t0)
    except BaseException:
        for leftover in (tmp_images, _tmp(cdir / "images.shrink.npy"), _tmp(cdir / INDEX), _tmp(cdir / META)):
            leftover.unlink(missing_ok=True)
        raise


def _build(df, site_dir, site, cdir, mhash, image_size, crop, workers, progress, rejected, todo, t0) -> dict:
    kept: list[int] = []
    fallback: list[int] = []
    tmp_images = _tmp(cdir / IMAGES)
    arr = None
    if todo:
        from tqdm.auto import tqdm

        arr = np.lib.format.open_memmap(tmp_images, mode="w+", dtype=np.uint8, shape=(len(todo), image_size, image_size))
        tasks = [(str(site_dir / df["image"].iat[i]), image_size, crop) for i in todo]
        results = _iter_results(tasks, int(workers))
        with tqdm(total=len(tasks), desc=f"ingest {site}", unit="img", disable=not progress) as bar:
            for i, res in zip(todo, results):
                if res[0] == "ok":
                    arr[len(kept)] = res[1]
                    kept.append(i)
                    fallback.append(int(res[2]))
                else:
                    rejected.append((i, df["image"].iat[i], res[1]))
                bar.update(1)
    rejected.sort()
    rows = [(src, reason) for _, src, reason in rejected]
    try:
        rej_file, in_cache = _publish_rejected(site_dir, cdir, rows)
    except OSError as exc:
        raise DataError(f"cannot write rejected.csv for site {site} ({exc.__class__.__name__}: {exc})") from None

    if not kept:
        del arr
        tmp_images.unlink(missing_ok=True)
        raise DataError(f"site {site}: all {len(df)} manifest rows were rejected; see {rej_file}")

    if len(kept) < len(todo):  # shrink to the images that were kept
        arr.flush()
        final = np.lib.format.open_memmap(_tmp(cdir / "images.shrink.npy"), mode="w+", dtype=np.uint8, shape=(len(kept), image_size, image_size))
        n = len(kept)
        for s in range(0, n, 256):
            final[s : min(s + 256, n)] = arr[s : min(s + 256, n)]
        final.flush()
        shrink_path = Path(final.filename)
        del final, arr
        os.replace(shrink_path, tmp_images)
    else:
        arr.flush()
        del arr
    os.replace(tmp_images, cdir / IMAGES)

    index = df.iloc[kept].copy()
    index["crop_fallback"] = fallback
    _write_csv_atomic(cdir / INDEX, index)
    meta = {
        "version": CACHE_VERSION,
        "site": site,
        "site_dir": str(site_dir),
        "manifest_sha256": mhash,
        "image_size": image_size,
        "crop": crop,
        "counts": {"manifest_rows": len(df), "cached": len(kept), "rejected": len(rows)},
        "crop_fallbacks": int(sum(fallback)),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    _write_text_atomic(cdir / META, json.dumps(meta, indent=2) + "\n")
    return _summary(site, meta, cdir, False, t0, rej_file, in_cache)


def ingest_federation(
    fed_dir: str | Path,
    cache_root: str | Path,
    image_size: int = 256,
    crop: str = "lung",
    workers: int = 1,
    progress: bool = True,
    force: bool = False,
) -> list[dict]:
    """:func:`ingest_site` for every site of a federation, in site-name order."""
    fed = Path(fed_dir)
    return [
        ingest_site(fed / name, cache_root, image_size, crop, workers, progress, force)
        for name in list_sites(fed)
    ]


def _y_prog(v: str) -> int:
    return {"MILD": 0, "SEVERE": 1}.get(v, -1)


def _y_sev(v: str) -> int:
    return severity_class(brixia_global(v)) if v else -1


def load_site(
    site_dir: str | Path,
    cache_root: str | Path,
    image_size: int = 256,
    crop: str = "lung",
    ingest_if_missing: bool = True,
    progress: bool = False,
) -> SiteData:
    """The site's cached images (memory-mapped) and aligned table; ingests first when the cache is missing
    or stale (unless ``ingest_if_missing=False``, which raises DataError instead)."""
    _check_options(image_size, crop)
    site_dir = Path(site_dir).resolve()
    cdir = cache_dir_for(site_dir, cache_root, image_size, crop)
    if ingest_if_missing:
        ingest_site(site_dir, cache_root, image_size, crop, progress=progress)
    else:
        read_manifest(site_dir)  # a one-line DataError for a missing or bad manifest
        if _valid_meta(cdir, manifest_hash(site_dir), image_size, crop) is None:
            raise DataError(f"site {site_dir.name}: no up-to-date cache in {cdir}; run ingestion first")
    images = np.load(cdir / IMAGES, mmap_mode="r")
    table = pd.read_csv(cdir / INDEX, dtype=str, keep_default_na=False)
    if len(table) != len(images):
        raise DataError(f"cache {cdir}: index.csv has {len(table)} rows but images.npy {len(images)}; delete it and ingest again")
    if "crop_fallback" in table.columns:
        table["crop_fallback"] = table["crop_fallback"].astype(int)
    table["y_prog"] = table["prognosis"].map(_y_prog).astype(int)
    table["y_sev"] = table["brixia"].map(_y_sev).astype(int)
    return SiteData(site=site_dir.name, images=images, table=table, role=site_role(table), cache_dir=cdir)
