"""A site runs only the app its operator approved: the pure part of the check (no Flower import).

A site pins the sha256 of the approved app bundle (FAB) in its site config (``approved-app``, carried into
the node config). The ``flwr-clientapp`` a site's SuperNode starts (:mod:`mdmt.client.appguard`) compares
the run's bundle with it before the bundle is unpacked or any of its code imported.
"""

from __future__ import annotations

import hashlib

from mdmt.fed.node import APPROVED_APP

__all__ = ["APPROVED_APP", "fab_sha256", "verdict"]


def fab_sha256(content: bytes) -> str:
    """The hash Flower names a bundle by (``flwr build``): sha256 of its bytes, hex."""
    return hashlib.sha256(content).hexdigest()


def verdict(approved: str, content: bytes, site: str = "") -> str | None:
    """None when ``content`` (a bundle's bytes) may run at a site that pinned ``approved`` ("" = any);
    otherwise why not (one line)."""
    if not approved:
        return None
    got = fab_sha256(content)
    if got == approved.strip().lower():
        return None
    who = f"site {site}" if site else "this site"
    return (
        f"{who} runs only the approved app {approved[:16]}...; this run's app bundle is {got[:16]}... "
        "(not installed, not imported, no data read)"
    )
