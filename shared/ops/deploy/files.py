"""The files the deploy verbs write: the certificate folder's layout and the CA key's own folder, where a
site's key pair goes, and how secrets (owner-only, 0600, in owner-only folders) and public files (0644) are
written."""

from __future__ import annotations

import os
from pathlib import Path

from mdmt.errors import ConfigError, MDMTError

# Certificate folder layout (``mdmt deploy certs --out DIR``): what the SuperLink reads (mounts).
CA_CERT = "ca.pem"
SERVER_CERT = "server.pem"
SERVER_KEY = "server.key"
CA_PREVIOUS = "ca-previous.pem"
CA_BUNDLE = "ca-bundle.pem"
PREVIOUS_DIR = "previous"
# The CA key lives apart, in ``--ca-dir`` (default: the certificate folder's sibling ``<name>-ca``, mode 0700),
# so the folder the SuperLink reads never holds it.
CA_KEY = "ca.key"
CA_DIR_SUFFIX = "-ca"


def default_ca_dir(out: str | Path) -> Path:
    """The CA key's folder for the certificate folder ``out``: its sibling ``<name>-ca``
    (``/etc/mdmt/certs`` -> ``/etc/mdmt/certs-ca``)."""
    path = Path(os.path.abspath(Path(out).expanduser()))
    if not path.name:
        raise ConfigError(f"--out {out}: give a certificate folder below the root (e.g. /etc/mdmt/certs)")
    return path.with_name(path.name + CA_DIR_SUFFIX)


def site_key_paths(out: str | Path, site: str) -> tuple[Path, Path]:
    """A site's key pair in ``out``: (``site-<site>``, ``site-<site>.pub``)."""
    private = Path(out).expanduser() / f"site-{site}"
    return private, private.with_name(private.name + ".pub")


def write_private(path: Path, data: bytes) -> None:
    """Write a secret readable by its owner only (created 0600, never world-readable for a moment)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


def write_public(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def make_dir(path: Path, what: str, private: bool = False) -> None:
    """Create ``path`` (and its parents); one-line MDMTError naming the ``what`` folder otherwise.
    ``private``: the folder is (made) owner-only, mode 0700."""
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700 if private else 0o777)
        if private and path.stat().st_mode & 0o077:
            os.chmod(path, 0o700)
    except OSError as exc:
        raise MDMTError(f"{path}: cannot create the {what} folder ({exc.strerror or exc})") from None
