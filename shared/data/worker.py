"""The ingestion worker: one image file -> the cache's uint8 image (read, crop, resize), and the process
pool that runs it over a list of files. Ingestion and ``mdmt predict`` both decode through it."""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image

from mdmt.data.dicom import read_image
from mdmt.data.preprocess import preprocess_with_info
from mdmt.errors import ConfigError, DicomRejected


def _read_mask(path: str) -> np.ndarray:
    with Image.open(path) as im:
        im.load()
        return np.asarray(im)


def decode_one(task: tuple) -> tuple:
    """Worker: read + preprocess one file.

    ``task = (path, size, crop[, voi, box, mask_path, note])``. Returns ``('ok', uint8 array, fallback,
    crop_note)`` or ``('rejected', reason)``."""
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


def resolve_workers(workers: int) -> int:
    """The number of decoding processes for ``workers`` (0 = one per CPU core); ConfigError when negative
    or not an integer."""
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

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="watch-parent").start()


@contextmanager
def decode_results(tasks: list, workers: int):
    """An iterator of :func:`decode_one` results in task order; a process pool when workers > 1.

    The pool's processes start here, before the caller opens its progress bar (no fork with its thread)."""
    if workers <= 1 or len(tasks) <= 1:
        yield (decode_one(t) for t in tasks)
        return
    n = min(workers, len(tasks))
    chunk = max(1, min(16, len(tasks) // (n * 4)))
    ex = ProcessPoolExecutor(max_workers=n, initializer=_watch_parent, initargs=(os.getpid(),))
    try:
        yield ex.map(decode_one, tasks, chunksize=chunk)
    except BaseException:
        ex.shutdown(wait=False, cancel_futures=True)
        raise
    ex.shutdown(wait=True)
