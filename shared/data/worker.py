"""The ingestion worker: one image file -> the cache's uint8 image (read, crop, resize), and the process
pool that runs it over a list of files. Ingestion and ``mdmt predict`` both decode through it."""

from __future__ import annotations

import os
import resource
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


MEMORY_ENV = "MDMT_INGEST_MEMORY_MB"
DEFAULT_MEMORY_MB = 4096


def memory_budget() -> int:
    """Bytes a decoding process may allocate beyond what it inherited: ``MDMT_INGEST_MEMORY_MB`` (default
    4096, room for the largest image the pixel cap lets through). Past it a decode fails with MemoryError,
    which rejects that one file, instead of the host's out-of-memory killer ending the site daemon."""
    raw = os.environ.get(MEMORY_ENV, "").strip()
    try:
        mb = int(raw) if raw else DEFAULT_MEMORY_MB
    except ValueError:
        raise ConfigError(f"{MEMORY_ENV}={raw!r} must be a whole number of megabytes") from None
    if mb <= 0:
        raise ConfigError(f"{MEMORY_ENV}={raw!r} must be > 0")
    return mb << 20


def _data_size() -> int:
    """This process's data segment (private heap and anonymous mappings), what RLIMIT_DATA counts."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmData:"):
                return int(line.split()[1]) << 10
    return 0


def _start_worker(parent: int, budget: int) -> None:
    """Pool worker initializer: a memory limit of what the process holds plus ``budget``, and an exit when
    the ingesting process is gone (e.g. killed with SIGKILL) instead of waiting on the queue as an orphan."""
    soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
    limit = _data_size() + budget
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_DATA, (limit, hard))

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="watch-parent").start()


@contextmanager
def decode_results(tasks: list, workers: int):
    """An iterator of :func:`decode_one` results in task order, from a pool of ``workers`` processes (at
    least one) that each run under a memory limit (:func:`memory_budget`).

    The pool's processes start here, before the caller opens its progress bar (no fork with its thread)."""
    if not tasks:
        yield iter(())
        return
    n = max(1, min(workers, len(tasks)))
    chunk = max(1, min(16, len(tasks) // (n * 4)))
    ex = ProcessPoolExecutor(max_workers=n, initializer=_start_worker, initargs=(os.getpid(), memory_budget()))
    try:
        yield ex.map(decode_one, tasks, chunksize=chunk)
    except BaseException:
        ex.shutdown(wait=False, cancel_futures=True)
        raise
    ex.shutdown(wait=True)
