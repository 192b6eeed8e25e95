"""Ingestion: a site's manifest + image files -> a uint8 array cache that training memory-maps.

Layout (see docs/data-format.md)::

    <cache_root>/<site name>-<sha256(absolute site path)[:8]>/s<size>-<crop>[-voi<voi>]-v<CACHE_VERSION>/
        images.npy     uint8 (N, size, size), np.load(..., mmap_mode="r")
        index.csv      the manifest rows that were cached, in array order (+ crop_fallback 0/1, crop_note)
        records.csv    one record per decoded image (path, file size, mtime_ns, crop input, labels,
                       result): what the next ingest compares against to decode only what changed
        rejected.csv   this ingest's rejected rows (source, stage, reason); a copy of the site's
        meta.json      written last: manifest sha256, size, crop, voi, version, counts, crop fallbacks
        partial-*.npy/.csv   only after an interrupted ingest: the images it had decoded (a journal)

Ingestion is incremental and resumable: an image whose file (size, mtime_ns) and crop input (its row
of the box table, or its mask file) are unchanged is copied from the previous ``images.npy`` (or from
the journal an interrupted run left) instead of being decoded again; labels come from the current
manifest. The result is byte-identical to a from-scratch ingest. When nothing changed, nothing is
written. Every file is written to a temporary name and renamed; meta.json is removed before a rebuild
and written last, so an interrupted ingest never leaves a cache that looks valid.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import secrets
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from mdmt.data.manifest import (
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
from mdmt.data.dicom import VOI_MODES
from mdmt.data.preprocess import CROP_MODES, USER_CROP_MODES
from mdmt.errors import ConfigError, DataError, DicomRejected

CACHE_VERSION = 2
IMAGES = "images.npy"
INDEX = "index.csv"
META = "meta.json"
RECORDS = "records.csv"
JOURNAL_PREFIX = "partial-"
STAGE = "ingest"
MIN_IMAGE_SIZE = 16
LUNG_BOXES = "lung_boxes.csv"  # default crop source of crop="boxes", in the site folder
LUNG_MASKS = "lung_masks"  # default crop source of crop="masks", in the site folder
BOX_COLUMNS = ("image", "top", "left", "bottom", "right")
_MASK_SUFFIXES = (".dcm", ".dicom", ".dic", ".png", ".jpg", ".jpeg", ".tif", ".tiff")

KEY_COLUMNS = ("image", "file_size", "file_mtime_ns", "crop_input")
RESULT_COLUMNS = ("status", "reason", "crop_fallback", "crop_note", "slot")
LABEL_COLUMNS = ("patient_id", "prognosis", "brixia", "split")
RECORD_COLUMNS = KEY_COLUMNS + RESULT_COLUMNS + LABEL_COLUMNS


@dataclass
class SiteData:
    site: str
    images: np.ndarray  # uint8 (N, S, S), memory-mapped
    table: pd.DataFrame  # index.csv rows + y_prog (-1/0/1) and y_sev (-1/0..3), aligned with images
    role: str  # prognosis | severity | both
    cache_dir: Path


def _check_options(image_size: int, crop: str, voi: str = "none") -> None:
    if crop not in CROP_MODES:
        raise ConfigError(f"crop {crop!r} is not one of {', '.join(CROP_MODES)}")
    if voi not in VOI_MODES:
        raise ConfigError(f"voi {voi!r} is not one of {', '.join(VOI_MODES)}")
    if int(image_size) != image_size or image_size < MIN_IMAGE_SIZE:
        raise ConfigError(f"image_size {image_size!r} must be an integer >= {MIN_IMAGE_SIZE}")


def cache_root(workspace: str | Path, cache_dir: str | Path | None = None) -> Path:
    """Where a workspace keeps its site caches: ``cache_dir`` when given, else ``<workspace>/cache``."""
    root = Path(cache_dir) if cache_dir else Path(workspace) / "cache"
    return root.expanduser().resolve()


def cache_dir_for(site_dir: str | Path, cache_root: str | Path, image_size: int, crop: str, voi: str = "none") -> Path:
    """``cache_root / f"{site}-{sha256(abs site path)[:8]}" / f"s{size}-{crop}[-voi{voi}]-v{CACHE_VERSION}"``
    (the ``-voi...`` part only when ``voi`` is not ``"none"``)."""
    _check_options(image_size, crop, voi)
    site = Path(site_dir).resolve()
    key = hashlib.sha256(str(site).encode()).hexdigest()[:8]
    voi_part = "" if voi == "none" else f"-voi{voi}"
    return Path(cache_root) / f"{site.name}-{key}" / f"s{int(image_size)}-{crop}{voi_part}-v{CACHE_VERSION}"


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


def _valid_meta(cdir: Path, mhash: str, image_size: int, crop: str, voi: str = "none") -> dict | None:
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


# ---- crop sources --------------------------------------------------------------------------------


def crop_source_path(site_dir: str | Path, crop: str, crop_source: str | Path | None = None) -> Path | None:
    """Where ``crop="boxes"`` / ``"masks"`` read the lung boxes: ``crop_source`` (a relative path is taken
    relative to the site folder), default ``<site>/lung_boxes.csv`` / ``<site>/lung_masks``. None for the
    other crop modes, which take no source (giving one is a ConfigError)."""
    if crop not in USER_CROP_MODES:
        if crop_source not in (None, ""):
            raise ConfigError(f"crop_source {str(crop_source)!r} is only used with crop 'boxes' or 'masks', not {crop!r}")
        return None
    src = Path(crop_source) if crop_source not in (None, "") else Path(LUNG_BOXES if crop == "boxes" else LUNG_MASKS)
    return src if src.is_absolute() else Path(site_dir) / src


def read_lung_boxes(path: str | Path) -> dict[str, tuple[str, str, str, str]]:
    """A bounding-box table: CSV with columns ``image, top, left, bottom, right`` (pixels of the original
    image; bottom/right exclusive). Returns ``{image: (top, left, bottom, right)}`` as text (checked per
    image at preprocessing; a bad value makes that row fall back). A missing column, an unreadable file or
    an image listed twice is a one-line DataError."""
    path = Path(path)
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except Exception as exc:
        raise DataError(f"{path}: cannot be read as a lung box table ({exc.__class__.__name__}: {exc})") from None
    df.columns = [str(c).strip() for c in df.columns]
    missing = [c for c in BOX_COLUMNS if c not in df.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)}; required: {', '.join(BOX_COLUMNS)}")
    out: dict[str, tuple[str, str, str, str]] = {}
    for i, row in enumerate(df[list(BOX_COLUMNS)].itertuples(index=False), start=2):
        image = str(row[0]).strip()
        if image in out:
            raise DataError(f"{path}:row {i}: image {image!r} is listed twice")
        out[image] = tuple(str(v).strip() for v in row[1:])  # type: ignore[assignment]
    return out


def _mask_file(mask_dir: Path, image: str) -> Path | None:
    """``<mask_dir>/<image>.png``, else ``<mask_dir>/<image with its extension replaced by .png>``."""
    appended = mask_dir / (image + ".png")
    if appended.is_file():
        return appended
    p = Path(image)
    if p.suffix.lower() in _MASK_SUFFIXES:
        replaced = mask_dir / p.with_suffix(".png")
        if replaced.is_file():
            return replaced
    return None


def _crop_input(crop: str, image: str, src: Path | None, boxes: dict | None) -> tuple[str, tuple | None, str | None, str]:
    """(record key text, box for the worker, mask path for the worker, note when the source has nothing)."""
    if crop == "boxes":
        if boxes is None:
            return "box:", None, None, f"no box table {src}"
        box = boxes.get(image)
        if box is None:
            return "box:", None, None, f"no row for this image in {src.name}"
        return "box:" + ",".join(box), box, None, ""
    if crop == "masks":
        if src is None or not src.is_dir():
            return "mask:", None, None, f"no mask folder {src}"
        mask = _mask_file(src, image)
        if mask is None:
            return "mask:", None, None, f"no mask file {src.name}/{image}.png"
        st = mask.stat()
        return f"mask:{mask.relative_to(src).as_posix()}:{st.st_size}:{st.st_mtime_ns}", None, str(mask), ""
    return "", None, None, ""


# ---- the worker ------------------------------------------------------------------------------------


def _read_mask(path: str) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        return np.asarray(im)


def _process_one(task: tuple) -> tuple:
    """Worker: read + preprocess one file.

    ``task = (path, size, crop[, voi, box, mask_path, note])``. Returns ``('ok', uint8 array, fallback,
    crop_note)`` or ``('rejected', reason)``."""
    from mdmt.data.dicom import read_image
    from mdmt.data.preprocess import preprocess_with_info

    path, size, crop = task[:3]
    extra = list(task[3:7])
    voi, box, mask_path, note = extra + ["none", None, None, ""][len(extra) :]
    try:
        img, _ = read_image(path, voi=voi)
    except DicomRejected as exc:
        return ("rejected", str(exc))
    except Exception as exc:  # read_image should not let anything else out; be safe in a pool
        return ("rejected", f"unreadable: {exc.__class__.__name__}: {' '.join(str(exc).split())[:180]}")
    mask = None
    if mask_path:
        try:
            mask = _read_mask(mask_path)
        except Exception as exc:
            note = f"unreadable mask {Path(mask_path).name}: {exc.__class__.__name__}"
    try:
        out, info = preprocess_with_info(img, size, crop, box=box, mask=mask)
    except Exception as exc:
        return ("rejected", f"preprocessing failed: {exc.__class__.__name__}: {' '.join(str(exc).split())[:160]}")
    fallback = bool(info["fallback"])
    crop_note = (note or info["reason"]) if fallback else ""
    return ("ok", out, fallback, " ".join(str(crop_note).split()))


def _resolve_workers(workers: int) -> int:
    try:
        w = int(workers)
    except (TypeError, ValueError):
        raise ConfigError(f"workers {workers!r} must be an integer >= 0 (0 = one per CPU core)") from None
    if w < 0:
        raise ConfigError(f"workers {workers!r} must be >= 0 (0 = one per CPU core)")
    return w or (os.cpu_count() or 1)


def _watch_parent(parent: int) -> None:
    """Pool worker initializer: exit when the ingesting process is gone (e.g. killed with SIGKILL),
    instead of waiting forever on the task queue as an orphan."""
    import threading

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="watch-parent").start()


@contextmanager
def _results(tasks: list, workers: int):
    """An iterator of :func:`_process_one` results in task order; a process pool when workers > 1.

    The pool's processes start here, before the caller opens its progress bar (no fork with its thread)."""
    if workers <= 1 or len(tasks) <= 1:
        yield (_process_one(t) for t in tasks)
        return
    from concurrent.futures import ProcessPoolExecutor

    n = min(workers, len(tasks))
    chunk = max(1, min(16, len(tasks) // (n * 4)))
    ex = ProcessPoolExecutor(max_workers=n, initializer=_watch_parent, initargs=(os.getpid(),))
    try:
        yield ex.map(_process_one, tasks, chunksize=chunk)
    except BaseException:
        ex.shutdown(wait=False, cancel_futures=True)
        raise
    ex.shutdown(wait=True)


# ---- records and journals ---------------------------------------------------------------------------


@dataclass
class _Entry:
    """One decoded image's result: where its pixels are (array + slot) when status is 'ok'."""

    status: str  # ok | rejected
    reason: str
    fallback: int
    note: str
    array: np.ndarray | None
    slot: int
    labels: tuple | None = None


def _key(image: str, size: int, mtime_ns: int, crop_input: str) -> tuple[str, int, int, str]:
    return (image, int(size), int(mtime_ns), crop_input)


def _read_entries(csv_path: Path, npy_path: Path, image_size: int, with_labels: bool) -> dict:
    """Entries of a records.csv (+ images.npy) or a journal; {} when missing or inconsistent."""
    try:
        arr = np.load(npy_path, mmap_mode="r")
        if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[1:] != (image_size, image_size):
            return {}
        out = {}
        with open(csv_path, newline="") as fh:
            reader = csv.reader(fh)
            header = next(reader)
            col = {c: k for k, c in enumerate(header)}
            need = KEY_COLUMNS + RESULT_COLUMNS + (LABEL_COLUMNS if with_labels else ())
            if any(c not in col for c in need):
                return {}
            for row in reader:
                if len(row) != len(header):
                    continue  # a line cut short by an interruption
                try:
                    key = _key(row[col["image"]], row[col["file_size"]], row[col["file_mtime_ns"]], row[col["crop_input"]])
                    status, slot = row[col["status"]], int(row[col["slot"]])
                    fallback = int(row[col["crop_fallback"]] or 0)
                except ValueError:
                    continue
                if status not in ("ok", "rejected") or (status == "ok" and not 0 <= slot < len(arr)):
                    continue
                labels = tuple(row[col[c]] for c in LABEL_COLUMNS) if with_labels else None
                out[key] = _Entry(status, row[col["reason"]], fallback, row[col["crop_note"]], arr, slot, labels)
        return out
    except Exception:
        return {}


def _journals(cdir: Path) -> list[tuple[Path, Path]]:
    return [(p, p.with_suffix(".npy")) for p in sorted(cdir.glob(f"{JOURNAL_PREFIX}*.csv"))]


class _Journal:
    """What this run decodes, written as it goes (array slot first, then its CSV line), so that an
    interrupted ingest is resumed instead of redone."""

    def __init__(self, cdir: Path, n: int, image_size: int):
        token = f"{JOURNAL_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
        self.csv_path, self.npy_path = cdir / f"{token}.csv", cdir / f"{token}.npy"
        self.arr = np.lib.format.open_memmap(self.npy_path, mode="w+", dtype=np.uint8, shape=(n, image_size, image_size))
        self.fh = open(self.csv_path, "w", newline="")
        self.writer = csv.writer(self.fh)
        self.writer.writerow(KEY_COLUMNS + RESULT_COLUMNS)
        self.fh.flush()

    def add(self, slot: int, key: tuple, res: tuple) -> _Entry:
        if res[0] == "ok":
            self.arr[slot] = res[1]
            entry = _Entry("ok", "", int(res[2]), res[3], self.arr, slot)
        else:
            entry = _Entry("rejected", res[1], 0, "", None, -1)
        self.writer.writerow(list(key) + [entry.status, entry.reason, entry.fallback, entry.note, entry.slot])
        if slot % 16 == 15:
            self.fh.flush()
        return entry

    def close(self) -> None:
        if not self.fh.closed:
            self.arr.flush()
            self.fh.close()


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


def _summary(site: str, meta: dict, cdir: Path, reused: bool, t0: float, rej_file: Path, in_cache: bool,
             decoded: int, reused_images: int, relabelled: int, notes: list[str]) -> dict:
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


def _plan(df: pd.DataFrame, site_dir: Path, image_size: int, crop: str, voi: str, src: Path | None,
          boxes: dict | None) -> list[_Row]:
    rows = []
    no_label = unlabelled(df).to_numpy()
    for i, image in enumerate(df["image"]):
        if no_label[i]:
            rows.append(_Row(i, image, reason="no label (prognosis and brixia both empty)"))
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
        crop_input, box, mask, note = _crop_input(crop, image, src, boxes)
        key = _key(image, st.st_size, st.st_mtime_ns, crop_input)
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
    _check_options(image_size, crop, voi)
    image_size = int(image_size)
    n_workers = _resolve_workers(workers)
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
        raise DataError(f"cache folder {cdir} cannot be written ({exc.__class__.__name__}: {exc}); choose another cache root") from None

    plan = _plan(df, site_dir, image_size, crop, voi, src, boxes)
    todo = [r for r in plan if r.key is not None]
    old = {} if force else _read_entries(cdir / RECORDS, cdir / IMAGES, image_size, with_labels=True)

    if not force:
        meta = _valid_meta(cdir, mhash, image_size, crop, voi)
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
        raise DataError(f"cache folder {cdir} cannot be written ({exc.__class__.__name__}: {exc}); choose another cache root") from None

    lookup: dict = {}
    if not force:
        for csv_path, npy_path in _journals(cdir):
            lookup.update(_read_entries(csv_path, npy_path, image_size, with_labels=False))
        lookup.update(old)
    state: dict = {}
    try:
        journal, decoded = _decode_missing(todo, lookup, cdir, image_size, n_workers, progress, site, state)
        return _build(df, site_dir, site, cdir, mhash, image_size, crop, voi, src, plan, lookup, journal,
                      decoded, t0, notes)
    except BaseException:
        if state.get("journal") is not None:
            state["journal"].close()
        for leftover in (_tmp(cdir / IMAGES), _tmp(cdir / INDEX), _tmp(cdir / RECORDS), _tmp(cdir / META), _tmp(cdir / REJECTED)):
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
    from tqdm.auto import tqdm

    with _results([r.task for r in need], workers) as results:
        # opened after the pool's processes started, so they inherit neither its file nor the bar's thread
        journal = state["journal"] = _Journal(cdir, len(need), image_size)
        with tqdm(total=len(need), desc=f"ingest {site}", unit="img", disable=not progress) as bar:
            for slot, (r, res) in enumerate(zip(need, results)):
                lookup[r.key] = journal.add(slot, r.key, res)
                bar.update(1)
    journal.close()
    return journal, seen


def _build(df, site_dir, site, cdir, mhash, image_size, crop, voi, src, plan, lookup, journal, decoded, t0, notes) -> dict:
    kept: list[tuple[_Row, _Entry]] = []
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
    if journal is not None and len(journal.arr) == n and all(e.array is journal.arr and e.slot == k for k, (_, e) in enumerate(kept)):
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
    for csv_path, npy_path in _journals(cdir):  # the cache is complete: the journals are no longer needed
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
        ingest_site(fed / name, cache_root, image_size, crop, workers, progress, force, voi=voi, crop_source=crop_source)
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
    voi: str = "none",
    crop_source: str | Path | None = None,
    workers: int = 1,
) -> SiteData:
    """The site's cached images (memory-mapped) and aligned table; ingests first (incrementally: only new
    or changed images are decoded) unless ``ingest_if_missing=False``, which checks only that the cache
    matches the manifest and raises DataError otherwise. ``workers`` defaults to 1 here because this runs
    inside training processes; ``ingest_site`` defaults to one worker per core."""
    _check_options(image_size, crop, voi)
    site_dir = Path(site_dir).resolve()
    cdir = cache_dir_for(site_dir, cache_root, image_size, crop, voi)
    if ingest_if_missing:
        ingest_site(site_dir, cache_root, image_size, crop, workers=workers, progress=progress, voi=voi,
                    crop_source=crop_source)
    else:
        read_manifest(site_dir)  # a one-line DataError for a missing or bad manifest
        if _valid_meta(cdir, manifest_hash(site_dir), image_size, crop, voi) is None:
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
