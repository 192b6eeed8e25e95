"""Where a site's time for one message goes, kept in the site's own log (``timings.jsonl`` in its
workspace); nothing of it leaves the site. ``mdmt bench --sections deploy`` reads it to split a deployed
round into Flower's delivery, process start and imports, data, model builds, training, evaluation and the
way back.

Per message: when the server made it (Flower's ``created_at``), when this ClientApp process started, when
the handler began (Python, Flower and the app imported, the message pulled), when torch and the site's
code were imported, the seconds of each stage summed over the units it carried, and when the reply was
ready.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

TIMING_LOG = "timings.jsonl"
STAGES = ("data", "model", "train", "evaluate")
_seconds: dict[str, float] = defaultdict(float)  # this process's stage totals since the last take()


@contextmanager
def stage(name: str) -> Iterator[None]:
    """Add the seconds of the block to stage ``name``."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        _seconds[name] += time.perf_counter() - t0


def take() -> dict[str, float]:
    """The stage totals since the last call, then zero them."""
    out = {k: round(v, 4) for k, v in _seconds.items()}
    _seconds.clear()
    return out


def process_started() -> float | None:
    """This process's start as a Unix time, to the clock tick (Linux: its start in /proc, against the
    clock since boot), or None where that cannot be read."""
    try:
        ticks = int(Path(f"/proc/{os.getpid()}/stat").read_text().rsplit(") ", 1)[1].split()[19])
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
        return time.time() - age
    except (OSError, ValueError, IndexError, AttributeError):
        return None


class MessageTimer:
    """One message's timeline: create it when the handler starts, ``mark`` points on the way, ``write``
    at the end."""

    def __init__(self, sent: float):
        take()  # stages of an earlier message in this process are not this one's
        self.row: dict[str, Any] = {"sent": round(sent, 3), "process": process_started(), "handler": time.time()}

    def mark(self, name: str) -> None:
        self.row[name] = time.time()

    def write(self, site_workspace: Path, run_id: int, rounds: list[int]) -> None:
        """Append the timeline, with the round of each unit the message carried."""
        self.row.update(done=time.time(), run_id=run_id, rounds=rounds, stages=take())
        site_workspace.mkdir(parents=True, exist_ok=True)
        with open(site_workspace / TIMING_LOG, "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            fh.write(json.dumps(self.row, sort_keys=True) + "\n")


def read_timing_log(site_workspace: Path) -> list[dict[str, Any]]:
    path = Path(site_workspace) / TIMING_LOG
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
