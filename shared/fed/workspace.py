"""One workspace, one writer: the lock that a run holds on its workspace.

The process that drives a run (``mdmt loco``, ``mdmt experiment``, a ServerApp started by ``flwr run``
directly) takes an exclusive ``flock`` on ``<workspace>/workspace.lock`` and writes who it is into the
file. The processes it starts for that run (its simulations' ServerApps) inherit ``MDMT_WORKSPACE_OWNER``
and join it instead of taking the lock again. Anyone else finds the workspace busy: one line names the
holder, or the caller waits for it (``--wait``). The kernel releases the lock when its process ends, also
on SIGKILL, so a ``running`` unit found by the next holder was interrupted without a word.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from mdmt.errors import MDMTError

LOCK_FILE = "workspace.lock"
OWNER_ENV = "MDMT_WORKSPACE_OWNER"


class WorkspaceBusy(MDMTError):
    """The workspace is held by another run."""


def read_holder(workspace: Path) -> dict[str, Any]:
    """What the lock file says about its holder (pid, host, command, since, owner); {} when unreadable."""
    try:
        return json.loads((Path(workspace) / LOCK_FILE).read_text() or "{}")
    except (OSError, ValueError):
        return {}


def _describe(holder: dict[str, Any]) -> str:
    if not holder:
        return "another process"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder.get("since", 0))))
    return f"process {holder.get('pid')} on {holder.get('host')} ({holder.get('command', '?')}, since {since})"


class WorkspaceLock:
    """The exclusive lock of one workspace; use as a context manager or call acquire/release."""

    def __init__(self, workspace: str | Path):
        self.workspace = Path(workspace).expanduser().resolve()
        self.path = self.workspace / LOCK_FILE
        self.fd: int | None = None
        self.owner = ""  # this run's owner token, inherited by the processes it starts
        self.joined = False  # True: this process runs under an owner that holds the lock

    @property
    def held_here(self) -> bool:
        """This process took the lock itself (it is the run's driver, not a process the driver started)."""
        return self.fd is not None

    def acquire(self, wait: bool = False, echo=None) -> WorkspaceLock:
        """Take the lock, join the owner that started this process, or raise WorkspaceBusy (one line);
        with ``wait``, block until the holder lets go."""
        self.workspace.mkdir(parents=True, exist_ok=True)
        inherited = os.environ.get(OWNER_ENV, "")
        if inherited and read_holder(self.workspace).get("owner") == inherited and self._held_by_someone():
            self.owner, self.joined = inherited, True
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(read_holder(self.workspace))
            if not wait:
                os.close(fd)
                raise WorkspaceBusy(
                    f"workspace {self.workspace} is in use by {holder}; wait for it (--wait) or use another workspace"
                ) from None
            if echo is not None:
                echo(f"workspace {self.workspace} is in use by {holder}; waiting for it")
            fcntl.flock(fd, fcntl.LOCK_EX)
        self.fd = fd
        self.owner = uuid.uuid4().hex
        os.environ[OWNER_ENV] = self.owner  # what this process starts joins this run
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:3]]),
            "since": time.time(),
            "owner": self.owner,
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        return self

    def _held_by_someone(self) -> bool:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)  # closing drops a lock taken just now
        return False

    def release(self) -> None:
        if self.fd is not None:
            if os.environ.get(OWNER_ENV) == self.owner:
                del os.environ[OWNER_ENV]
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> WorkspaceLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
