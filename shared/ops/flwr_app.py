"""The Flower app that every ``flwr run`` of this project submits, found the same way from a checkout
and from an installed wheel.

The ServerApp and ClientApp are modules of the installed package (``mdmt.server.app``, ``mdmt.client.app``),
and runtime dependency installation is always off, so the bundle Flower ships needs no source: it is one
generated ``pyproject.toml`` that names the installed components and carries the schema's defaults
(:class:`mdmt.fed.config.RunConfig`). Every machine of a federation runs the ``mdmt`` it has installed.
"""

from __future__ import annotations

import os
import sysconfig
import tempfile
from pathlib import Path

import tomli_w

from mdmt import __version__
from mdmt.fed.config import RunConfig

PROJECT = "mdmt-federation"  # Flower's app name rule: letters, digits and hyphens, at most 32 characters
PUBLISHER = "mdmt"
COMPONENTS = {"serverapp": "mdmt.server.app:app", "clientapp": "mdmt.client.app:app"}


def app_manifest() -> dict:
    """The app's pyproject as a mapping: the installed components and the schema's defaults."""
    return {
        "project": {
            "name": PROJECT,
            "version": __version__,
            "description": "Federated multi-dataset multi-task learning for COVID-19 prognosis (mdmt)",
            "license": "Apache-2.0",
            "dependencies": [],  # installed on every machine; Flower never installs anything per run
        },
        "tool": {
            "flwr": {
                "app": {
                    "publisher": PUBLISHER,
                    "components": dict(COMPONENTS),
                    "config": RunConfig().to_mapping(),
                }
            }
        },
    }


def flwr_app_dir(parent: Path) -> Path:
    """Write the app folder under ``parent`` (``parent/app/pyproject.toml``) and return it.

    The file is replaced atomically and only when its text changes, so runs that share a folder never
    see a half-written app.
    """
    folder = Path(parent).resolve() / "app"
    folder.mkdir(parents=True, exist_ok=True)
    text = tomli_w.dumps(app_manifest())
    target = folder / "pyproject.toml"
    if not target.is_file() or target.read_text() != text:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".pyproject-", suffix=".toml")
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, target)
    return folder


OFFLINE_ENV = "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"
PTH_NAME = "mdmt-flower-offline.pth"


def pin_runtime_installation_off() -> Path:
    """Turn Flower's per-run dependency installation off for every Python process of this environment
    (``flwr``, the SuperLink it auto-starts, the SuperExec and the apps): a ``.pth`` file in site-packages
    sets ``FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1`` unless the caller's environment sets it. Every
    dependency is installed once, with the project; a run never reaches for the network. Returns the file."""
    path = Path(sysconfig.get_path("purelib")) / PTH_NAME
    path.write_text(f'import os; os.environ.setdefault("{OFFLINE_ENV}", "1")\n')
    return path


if __name__ == "__main__":
    print(f"wrote {pin_runtime_installation_off()}")
