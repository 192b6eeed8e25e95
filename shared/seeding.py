"""Seeds flow from one config value; per-site seeds depend on the site name, never on arrival order."""

from __future__ import annotations

import hashlib


def derive_seed(seed: int, *parts: object) -> int:
    """A stable 32-bit seed from the config seed and any labels (site, fold, round, purpose)."""
    text = "\x1f".join([str(int(seed))] + [str(p) for p in parts])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")


def site_seed(seed: int, site: str, purpose: str = "") -> int:
    return derive_seed(seed, "site", site, purpose)
