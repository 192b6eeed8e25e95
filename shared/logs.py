"""Logging set-up shared by the CLI, the ServerApp and the ClientApp."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path


def setup_logging(level: int = logging.INFO) -> logging.Logger:
    log = logging.getLogger("mdmt")
    if not log.handlers:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("%(asctime)s mdmt %(levelname)s %(message)s", "%H:%M:%S"))
        log.addHandler(h)
        log.setLevel(level)
        log.propagate = False
    return log


def log_to_workspace(workspace: Path, name: str) -> Path:
    """Also write the 'mdmt' log to ``<workspace>/logs/<name>-<time>.log``; returns the file."""
    log = setup_logging()
    path = Path(workspace) / "logs" / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s mdmt %(levelname)s %(message)s", "%H:%M:%S"))
    log.addHandler(handler)
    return path
