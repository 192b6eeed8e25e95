"""A site's own log of the messages it received, kept in the site's workspace."""

from __future__ import annotations

import csv
import fcntl
import time
from pathlib import Path
from typing import Any

import pandas as pd

from shared import protocol as P

MESSAGE_LOG = "messages.csv"
COLUMNS = ("time", "run_id", "message_type", "unit_id", "round", "split")


def append_message_log(site_workspace: Path, *, run_id: int, message_type: str, config: dict[str, Any]) -> None:
    site_workspace.mkdir(parents=True, exist_ok=True)
    path = site_workspace / MESSAGE_LOG
    row = [f"{time.time():.3f}", run_id, message_type, config.get(P.CFG_UNIT, ""), config.get(P.CFG_ROUND, ""),
           config.get(P.CFG_SPLIT, "")]
    with open(path, "a", newline="") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        if fh.tell() == 0:
            csv.writer(fh).writerow(COLUMNS)
        csv.writer(fh).writerow(row)


def read_message_log(site_workspace: Path) -> pd.DataFrame:
    path = Path(site_workspace) / MESSAGE_LOG
    if not path.is_file():
        return pd.DataFrame(columns=list(COLUMNS))
    return pd.read_csv(path, dtype=str, keep_default_na=False)
