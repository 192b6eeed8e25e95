"""What the next ingest compares against: records.csv (one record per decoded image of the finished cache)
and the journals an interrupted ingest leaves (``partial-<pid>-<token>.csv/.npy``, written as it goes).

A record is keyed by (image, file size, file mtime_ns, crop input): an image whose key is unchanged is
copied from its array slot instead of being decoded again.
"""

from __future__ import annotations

import csv
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mdmt.data.cache import JOURNAL_PREFIX

KEY_COLUMNS = ("image", "file_size", "file_mtime_ns", "crop_input")
RESULT_COLUMNS = ("status", "reason", "crop_fallback", "crop_note", "slot")
LABEL_COLUMNS = ("patient_id", "prognosis", "brixia", "split")
RECORD_COLUMNS = KEY_COLUMNS + RESULT_COLUMNS + LABEL_COLUMNS


@dataclass
class Entry:
    """One decoded image's result: where its pixels are (array + slot) when status is 'ok'."""

    status: str  # ok | rejected
    reason: str
    fallback: int
    note: str
    array: np.ndarray | None
    slot: int
    labels: tuple | None = None


def record_key(image: str, size: int, mtime_ns: int, crop_input: str) -> tuple[str, int, int, str]:
    """A record's key: while it is unchanged, so is the image decoded for it."""
    return (image, int(size), int(mtime_ns), crop_input)


def read_entries(csv_path: Path, npy_path: Path, image_size: int, with_labels: bool) -> dict:
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
                    key = record_key(
                        row[col["image"]], row[col["file_size"]], row[col["file_mtime_ns"]], row[col["crop_input"]]
                    )
                    status, slot = row[col["status"]], int(row[col["slot"]])
                    fallback = int(row[col["crop_fallback"]] or 0)
                except ValueError:
                    continue
                if status not in ("ok", "rejected") or (status == "ok" and not 0 <= slot < len(arr)):
                    continue
                labels = tuple(row[col[c]] for c in LABEL_COLUMNS) if with_labels else None
                out[key] = Entry(status, row[col["reason"]], fallback, row[col["crop_note"]], arr, slot, labels)
        return out
    except Exception:
        return {}


def journal_files(cdir: Path) -> list[tuple[Path, Path]]:
    """(csv, npy) of every journal in ``cdir``, in name order."""
    return [(p, p.with_suffix(".npy")) for p in sorted(cdir.glob(f"{JOURNAL_PREFIX}*.csv"))]


def journal_owner(csv_path: Path) -> int | None:
    """The process id a journal's name carries (``partial-<pid>-<hex>.csv``), or None."""
    head = csv_path.name[len(JOURNAL_PREFIX) :].split("-", 1)[0]
    return int(head) if head.isdigit() else None


def removable_journals(cdir: Path) -> list[tuple[Path, Path]]:
    """The journals a finished ingest may delete: its own and those of processes that are gone. Another
    running ingest's journal stays (it is still writing it)."""
    out = []
    for csv_path, npy_path in journal_files(cdir):
        pid = journal_owner(csv_path)
        if pid is None or pid == os.getpid() or not Path(f"/proc/{pid}").exists():
            out.append((csv_path, npy_path))
    return out


class Journal:
    """What this run decodes, written as it goes (array slot first, then its CSV line), so that an
    interrupted ingest is resumed instead of redone."""

    def __init__(self, cdir: Path, n: int, image_size: int):
        token = f"{JOURNAL_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
        self.csv_path, self.npy_path = cdir / f"{token}.csv", cdir / f"{token}.npy"
        self.arr = np.lib.format.open_memmap(
            self.npy_path, mode="w+", dtype=np.uint8, shape=(n, image_size, image_size)
        )
        self.fh = open(self.csv_path, "w", newline="")
        self.writer = csv.writer(self.fh)
        self.writer.writerow(KEY_COLUMNS + RESULT_COLUMNS)
        self.fh.flush()

    def add(self, slot: int, key: tuple, res: tuple) -> Entry:
        if res[0] == "ok":
            self.arr[slot] = res[1]
            entry = Entry("ok", "", int(res[2]), res[3], self.arr, slot)
        else:
            entry = Entry("rejected", res[1], 0, "", None, -1)
        self.writer.writerow(list(key) + [entry.status, entry.reason, entry.fallback, entry.note, entry.slot])
        if slot % 16 == 15:
            self.fh.flush()
        return entry

    def close(self) -> None:
        if not self.fh.closed:
            self.arr.flush()
            self.fh.close()
