"""A site runs only the app its operator approved: the ``flwr-clientapp`` that ``mdmt deploy supernode-cmd``
puts first on the SuperNode's PATH. Flower's SuperExec starts ``flwr-clientapp`` by name for every message;
this one is :func:`mdmt.client.appguard.main`, which checks the run's app bundle against the site's
``approved-app`` before the bundle is unpacked or imported (the check itself: :mod:`mdmt.fed.approved`).

The SuperExec starts the other task programs the same way (``flwr.supercore.constant.TASK_TYPE_TO_COMMAND``:
``flwr-agentapp`` for a run whose primary task is an agent app, ``flwr-connector``, ``flwr-model``). The
project runs none of them, so the same folder holds stubs that refuse to start: a run of another kind
cannot slip past the ClientApp check."""

from __future__ import annotations

import os
import sys
from pathlib import Path

GUARD_DIR = "app-guard"  # under the site's workspace: the folder put first on the SuperNode's PATH
CLIENTAPP = "flwr-clientapp"
REFUSED = ("flwr-agentapp", "flwr-connector", "flwr-model")  # task programs a site never starts


def install_guard(workspace: str | Path) -> Path:
    """Write ``<workspace>/app-guard/flwr-clientapp`` (run by this Python) and return the folder."""
    folder = Path(workspace).expanduser() / GUARD_DIR
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / CLIENTAPP
    _write(script, f"#!{sys.executable}\nfrom mdmt.client.appguard import main\n\nraise SystemExit(main())\n")
    for name in REFUSED:
        _write(
            folder / name,
            f"#!/bin/sh\necho '{name}: refused: this site runs ClientApps only (mdmt.ops.deploy.appguard)' >&2\n"
            "exit 1\n",
        )
    return folder


def _write(script: Path, text: str) -> None:
    if not script.is_file() or script.read_text() != text:
        tmp = script.with_name(f".{script.name}.tmp")
        tmp.write_text(text)
        tmp.chmod(0o755)
        os.replace(tmp, script)
