"""The choices a site's data preparation offers, each named once, and where a workspace keeps its caches.
The modules that act on them (mdmt.data.preprocess, mdmt.data.dicom, mdmt.data.cache, mdmt.data.splits)
and the run config import them from here, so a config is checked, and the CLI built, without loading
pydicom, scipy or pandas."""

from __future__ import annotations

from pathlib import Path

CROP_MODES = ("lung", "none", "boxes", "masks")
USER_CROP_MODES = ("boxes", "masks")  # the box comes from the caller (a table or a mask)
VOI_MODES = ("none", "auto")
MIN_IMAGE_SIZE = 32  # pixels: below it the backbones' last feature map is smaller than 1x1
# loco: leave one centre out (the site's own train/val/test assignment, a held-out centre evaluates all rows);
# cv: patient-level k-fold at every site.
PROTOCOLS = ("loco", "cv")


def cache_root(workspace: str | Path, cache_dir: str | Path | None = None) -> Path:
    """Where a workspace keeps its site caches: ``cache_dir`` when given, else ``<workspace>/cache``."""
    root = Path(cache_dir) if cache_dir else Path(workspace) / "cache"
    return root.expanduser().resolve()
