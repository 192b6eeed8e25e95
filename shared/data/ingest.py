"""Ingestion: a site's manifest + image files -> the uint8 array cache of :mod:`mdmt.data.cache`.

Ingestion is incremental and resumable: an image whose file (size, mtime_ns) and crop input (its row
of the box table, or its mask file) are unchanged is copied from the previous ``images.npy`` (or from
the journal an interrupted run left) instead of being decoded again; labels come from the current
manifest. The result is byte-identical to a from-scratch ingest. When nothing changed, nothing is
written. Every file is written to a temporary name and renamed; meta.json is removed before a rebuild
and written last, so an interrupted ingest never leaves a cache that looks valid.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from mdmt.data.cache import (
    CACHE_VERSION,
    IMAGES,
    INDEX,
    META,
    RECORDS,
    SiteData,
    cache_dir_for,
    check_options,
    open_site,
    valid_meta,
)
from mdmt.data.crop_source import crop_input, crop_source_path, read_lung_boxes
from mdmt.data.manifest import (
    REJECTED,
    REJECTED_COLUMNS,
    list_sites,
    manifest_hash,
    outside_site,
    read_manifest,
    read_rejected,
    unlabelled,
    write_rejected,
)
from mdmt.data.options import USER_CROP_MODES
from mdmt.data.records import (
    LABEL_COLUMNS,
    RECORD_COLUMNS,
    Entry,
    Journal,
    journal_files,
    read_entries,
    record_key,
    removable_journals,
)
from mdmt.data.worker import decode_results, resolve_workers
from mdmt.errors import DataError

STAGE = "ingest"


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


# ---- rejected.csv and the summary ----------------------------------------------------------------


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


def _summary(
    site: str,
    meta: dict,
    cdir: Path,
    reused: bool,
    t0: float,
    rej_file: Path,
    in_cache: bool,
    decoded: int,
    reused_images: int,
    relabelled: int,
    notes: list[str],
) -> dict:
    out = {
        "site": site,
        "cached": int(meta["counts"]["cached"]),
        "rejected": int(meta["counts"]["rejected"]),
        "reused": reused,
        "decoded": int(decoded),
        "reused_images": int(reused_images),
        "relabelled": int(relabelled),
        "seconds": round(time.perf_counter() - t0, 3),
        "cache_dir": str(cdir),
        "crop_fallbacks": int(meta.get("crop_fallbacks", 0)),
        "rejected_file": str(rej_file) if meta["counts"]["rejected"] else None,
        "rejected_in_cache_dir": bool(in_cache),
    }
    notes = list(notes)
    if in_cache and meta["counts"]["rejected"]:
        notes.insert(0, f"site folder is not writable; rejected list written to {rej_file}")
    if notes:
        out["note"] = "; ".join(notes)
    return out


# ---- ingestion --------------------------------------------------------------------------------------


@dataclass
class _Row:
    i: int  # manifest row
    image: str
    key: tuple | None = None  # None: rejected before decoding
    reason: str = ""
    task: tuple | None = None


def _plan(
    df: pd.DataFrame, site_dir: Path, image_size: int, crop: str, voi: str, src: Path | None, boxes: dict | None
) -> list[_Row]:
    rows = []
    no_label = unlabelled(df).to_numpy()
    for i, image in enumerate(df["image"]):
        if no_label[i]:
            rows.append(_Row(i, image, reason="no label (prognosis and brixia both empty)"))
            continue
        escape = outside_site(image)
        if escape:
            rows.append(_Row(i, image, reason=escape))
            continue
        path = site_dir / image
        try:
            st = os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            rows.append(_Row(i, image, reason="file not found"))
            continue
        except OSError as exc:
            rows.append(_Row(i, image, reason=f"unreadable file: {exc.strerror or exc.__class__.__name__}"))
            continue
        crop_key, box, mask, note = crop_input(crop, image, src, boxes)
        key = record_key(image, st.st_size, st.st_mtime_ns, crop_key)
        rows.append(_Row(i, image, key=key, task=(str(path), image_size, crop, voi, box, mask, note)))
    return rows


def ingest_site(
    site_dir: str | Path,
    cache_root: str | Path,
    image_size: int = 256,
    crop: str = "lung",
    workers: int = 0,
    progress: bool = True,
    force: bool = False,
    voi: str = "none",
    crop_source: str | Path | None = None,
) -> dict:
    """Cache one site's labelled, readable images; list the rest in rejected.csv.

    ``workers``: processes decoding in parallel, 0 = one per CPU core. ``force``: decode everything again.
    ``voi``: ``"none"`` or ``"auto"`` (see :func:`mdmt.data.dicom.read_dicom`). ``crop_source``: the box
    table (``crop="boxes"``) or mask folder (``crop="masks"``), relative to the site folder unless absolute.

    Returns a summary dict (site, cached, rejected, reused (nothing changed, nothing written), decoded,
    reused_images, relabelled, seconds, cache_dir, crop_fallbacks, rejected_file,
    rejected_in_cache_dir[, note]). Raises DataError for a bad manifest or when every image is rejected."""
    t0 = time.perf_counter()
    check_options(image_size, crop, voi)
    image_size = int(image_size)
    n_workers = resolve_workers(workers)
    site_dir = Path(site_dir).resolve()
    df = read_manifest(site_dir)
    mhash = manifest_hash(site_dir)
    site = site_dir.name
    cdir = cache_dir_for(site_dir, cache_root, image_size, crop, voi)
    src = crop_source_path(site_dir, crop, crop_source)
    notes: list[str] = []
    boxes = None
    if crop == "boxes" and src is not None and src.is_file():
        boxes = read_lung_boxes(src)
    if crop in USER_CROP_MODES and src is not None and not src.exists():
        notes.append(f"crop source {src} not found: every image falls back to the whole image")

    try:
        cdir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(
            f"cache folder {cdir} cannot be written ({exc.__class__.__name__}: {exc}); choose another cache root"
        ) from None

    plan = _plan(df, site_dir, image_size, crop, voi, src, boxes)
    todo = [r for r in plan if r.key is not None]
    old = {} if force else read_entries(cdir / RECORDS, cdir / IMAGES, image_size, with_labels=True)

    if not force:
        meta = valid_meta(cdir, mhash, image_size, crop, voi)
        if meta is not None and len(old) == len(todo) and all(r.key in old for r in todo):
            rows = []
            if (cdir / REJECTED).is_file():
                prev = pd.read_csv(cdir / REJECTED, dtype=str, keep_default_na=False)
                rows = list(zip(prev["source"], prev["reason"]))
            try:
                rej_file, in_cache = _publish_rejected(site_dir, cdir, rows)
            except OSError:
                rej_file, in_cache = cdir / REJECTED, True
            return _summary(site, meta, cdir, True, t0, rej_file, in_cache, 0, len(todo), 0, notes)

    try:
        (cdir / META).unlink(missing_ok=True)
        if force:
            (cdir / RECORDS).unlink(missing_ok=True)
    except OSError as exc:
        raise DataError(
            f"cache folder {cdir} cannot be written ({exc.__class__.__name__}: {exc}); choose another cache root"
        ) from None

    lookup: dict = {}
    if not force:
        for csv_path, npy_path in journal_files(cdir):
            lookup.update(read_entries(csv_path, npy_path, image_size, with_labels=False))
        lookup.update(old)
    state: dict = {}
    try:
        journal, decoded = _decode_missing(todo, lookup, cdir, image_size, n_workers, progress, site, state)
        return _build(
            df, site_dir, site, cdir, mhash, image_size, crop, voi, src, plan, lookup, journal, decoded, t0, notes
        )
    except BaseException:
        if state.get("journal") is not None:
            state["journal"].close()
        for leftover in (
            _tmp(cdir / IMAGES),
            _tmp(cdir / INDEX),
            _tmp(cdir / RECORDS),
            _tmp(cdir / META),
            _tmp(cdir / REJECTED),
        ):
            leftover.unlink(missing_ok=True)
        raise


def _decode_missing(todo, lookup, cdir, image_size, workers, progress, site, state):
    """Decode the rows whose key has no reusable entry into a new journal and add them to ``lookup``.
    Returns (the journal or None, the set of keys decoded now)."""
    need: list[_Row] = []
    seen = set()
    for r in todo:
        if r.key not in lookup and r.key not in seen:
            seen.add(r.key)
            need.append(r)
    if not need:
        return None, set()
    with decode_results([r.task for r in need], workers) as results:
        # opened after the pool's processes started, so they inherit neither its file nor the bar's thread
        journal = state["journal"] = Journal(cdir, len(need), image_size)
        with tqdm(total=len(need), desc=f"ingest {site}", unit="img", disable=not progress) as bar:
            for slot, (r, res) in enumerate(zip(need, results)):
                lookup[r.key] = journal.add(slot, r.key, res)
                bar.update(1)
    journal.close()
    return journal, seen


def _build(
    df, site_dir, site, cdir, mhash, image_size, crop, voi, src, plan, lookup, journal, decoded, t0, notes
) -> dict:
    kept: list[tuple[_Row, Entry]] = []
    rejected: list[tuple[str, str]] = []
    reused_images = relabelled = 0
    label_cols = df[list(LABEL_COLUMNS)].to_numpy()
    for r in plan:
        if r.key is None:
            rejected.append((r.image, r.reason))
            continue
        e = lookup[r.key]
        if r.key not in decoded:
            reused_images += 1
        if e.labels is not None and e.labels != tuple(label_cols[r.i]):
            relabelled += 1
        if e.status == "ok":
            kept.append((r, e))
        else:
            rejected.append((r.image, e.reason))
    try:
        rej_file, in_cache = _publish_rejected(site_dir, cdir, rejected)
    except OSError as exc:
        raise DataError(f"cannot write rejected.csv for site {site} ({exc.__class__.__name__}: {exc})") from None
    if not kept:
        raise DataError(f"site {site}: all {len(df)} manifest rows were rejected; see {rej_file}")

    # images.npy: the journal itself when it holds exactly the kept images in order, else a copy
    n = len(kept)
    (cdir / RECORDS).unlink(missing_ok=True)  # records.csv describes images.npy: never one without the other
    if (
        journal is not None
        and len(journal.arr) == n
        and all(e.array is journal.arr and e.slot == k for k, (_, e) in enumerate(kept))
    ):
        os.replace(journal.npy_path, cdir / IMAGES)  # from scratch with nothing rejected: no copy needed
    else:
        tmp_images = _tmp(cdir / IMAGES)
        final = np.lib.format.open_memmap(tmp_images, mode="w+", dtype=np.uint8, shape=(n, image_size, image_size))
        for k, (_, e) in enumerate(kept):
            final[k] = e.array[e.slot]
        final.flush()
        del final
        os.replace(tmp_images, cdir / IMAGES)

    index = df.iloc[[r.i for r, _ in kept]].copy()
    index["crop_fallback"] = [e.fallback for _, e in kept]
    index["crop_note"] = [e.note for _, e in kept]
    _write_csv_atomic(cdir / INDEX, index)

    records = []
    slot_of = {r.i: k for k, (r, _) in enumerate(kept)}
    for r in plan:
        if r.key is None:
            continue
        e = lookup[r.key]
        slot = slot_of.get(r.i, -1)
        records.append(list(r.key) + [e.status, e.reason, e.fallback, e.note, slot] + list(label_cols[r.i]))
    _write_csv_atomic(cdir / RECORDS, pd.DataFrame(records, columns=list(RECORD_COLUMNS)))

    meta = {
        "version": CACHE_VERSION,
        "site": site,
        "site_dir": str(site_dir),
        "manifest_sha256": mhash,
        "image_size": image_size,
        "crop": crop,
        "voi": voi,
        "crop_source": str(src) if src is not None else None,
        "counts": {"manifest_rows": len(df), "cached": n, "rejected": len(rejected)},
        "crop_fallbacks": int(sum(e.fallback for _, e in kept)),
        "decoded": len(decoded),
        "reused_images": int(reused_images),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    _write_text_atomic(cdir / META, json.dumps(meta, indent=2) + "\n")
    for csv_path, npy_path in removable_journals(cdir):  # the cache is complete: this run's journal is done
        csv_path.unlink(missing_ok=True)
        npy_path.unlink(missing_ok=True)
    return _summary(site, meta, cdir, False, t0, rej_file, in_cache, len(decoded), reused_images, relabelled, notes)


def ingest_federation(
    fed_dir: str | Path,
    cache_root: str | Path,
    image_size: int = 256,
    crop: str = "lung",
    workers: int = 0,
    progress: bool = True,
    force: bool = False,
    voi: str = "none",
    crop_source: str | Path | None = None,
) -> list[dict]:
    """:func:`ingest_site` for every site of a federation, in site-name order (a relative
    ``crop_source`` is looked up in each site folder)."""
    fed = Path(fed_dir)
    return [
        ingest_site(
            fed / name, cache_root, image_size, crop, workers, progress, force, voi=voi, crop_source=crop_source
        )
        for name in list_sites(fed)
    ]


def ingest_and_load_site(
    site_dir: str | Path,
    cache_root: str | Path,
    image_size: int = 256,
    crop: str = "lung",
    progress: bool = False,
    voi: str = "none",
    crop_source: str | Path | None = None,
    workers: int = 1,
) -> SiteData:
    """:func:`ingest_site` (incrementally: only new or changed images are decoded), then the site's cached
    images (memory-mapped) and aligned table, as :func:`mdmt.data.cache.load_site` returns them.
    ``workers`` defaults to 1 here because this runs inside training processes; ``ingest_site`` defaults
    to one worker per core."""
    check_options(image_size, crop, voi)
    site_dir = Path(site_dir).resolve()
    cdir = cache_dir_for(site_dir, cache_root, image_size, crop, voi)
    ingest_site(
        site_dir, cache_root, image_size, crop, workers=workers, progress=progress, voi=voi, crop_source=crop_source
    )
    return open_site(site_dir, cdir)
