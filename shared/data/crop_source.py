"""Crop inputs of ``crop="boxes"`` / ``"masks"``: where a site's lung box table or mask folder is, reading
the box table, and the per-image crop input (the box or mask file the worker uses, and the text that
keys it in records.csv)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from mdmt.data.options import USER_CROP_MODES
from mdmt.errors import ConfigError, DataError

LUNG_BOXES = "lung_boxes.csv"  # default crop source of crop="boxes", in the site folder
LUNG_MASKS = "lung_masks"  # default crop source of crop="masks", in the site folder
BOX_COLUMNS = ("image", "top", "left", "bottom", "right")
_MASK_SUFFIXES = (".dcm", ".dicom", ".dic", ".png", ".jpg", ".jpeg", ".tif", ".tiff")


def crop_source_path(site_dir: str | Path, crop: str, crop_source: str | Path | None = None) -> Path | None:
    """Where ``crop="boxes"`` / ``"masks"`` read the lung boxes: ``crop_source`` (a relative path is taken
    relative to the site folder), default ``<site>/lung_boxes.csv`` / ``<site>/lung_masks``. None for the
    other crop modes, which take no source (giving one is a ConfigError)."""
    if crop not in USER_CROP_MODES:
        if crop_source not in (None, ""):
            raise ConfigError(
                f"crop_source {str(crop_source)!r} is only used with crop 'boxes' or 'masks', not {crop!r}"
            )
        return None
    src = Path(crop_source) if crop_source not in (None, "") else Path(LUNG_BOXES if crop == "boxes" else LUNG_MASKS)
    return src if src.is_absolute() else Path(site_dir) / src


def read_lung_boxes(path: str | Path) -> dict[str, tuple[str, str, str, str]]:
    """A bounding-box table: CSV with columns ``image, top, left, bottom, right`` (pixels of the original
    image; bottom/right exclusive). Returns ``{image: (top, left, bottom, right)}`` as text (checked per
    image at preprocessing; a bad value makes that row fall back). A missing column, an unreadable file or
    an image listed twice is a one-line DataError."""
    path = Path(path)
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except Exception as exc:
        raise DataError(f"{path}: cannot be read as a lung box table ({exc.__class__.__name__}: {exc})") from None
    df.columns = [str(c).strip() for c in df.columns]
    missing = [c for c in BOX_COLUMNS if c not in df.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)}; required: {', '.join(BOX_COLUMNS)}")
    out: dict[str, tuple[str, str, str, str]] = {}
    for i, row in enumerate(df[list(BOX_COLUMNS)].itertuples(index=False), start=2):
        image = str(row[0]).strip()
        if image in out:
            raise DataError(f"{path}:row {i}: image {image!r} is listed twice")
        out[image] = tuple(str(v).strip() for v in row[1:])  # type: ignore[assignment]
    return out


def _mask_file(mask_dir: Path, image: str) -> Path | None:
    """``<mask_dir>/<image>.png``, else ``<mask_dir>/<image with its extension replaced by .png>``."""
    appended = mask_dir / (image + ".png")
    if appended.is_file():
        return appended
    p = Path(image)
    if p.suffix.lower() in _MASK_SUFFIXES:
        replaced = mask_dir / p.with_suffix(".png")
        if replaced.is_file():
            return replaced
    return None


def crop_input(
    crop: str, image: str, src: Path | None, boxes: dict | None
) -> tuple[str, tuple | None, str | None, str]:
    """(record key text, box for the worker, mask path for the worker, note when the source has nothing)."""
    if crop == "boxes":
        if boxes is None:
            return "box:", None, None, f"no box table {src}"
        box = boxes.get(image)
        if box is None:
            return "box:", None, None, f"no row for this image in {src.name}"
        return "box:" + ",".join(box), box, None, ""
    if crop == "masks":
        if src is None or not src.is_dir():
            return "mask:", None, None, f"no mask folder {src}"
        mask = _mask_file(src, image)
        if mask is None:
            return "mask:", None, None, f"no mask file {src.name}/{image}.png"
        st = mask.stat()
        return f"mask:{mask.relative_to(src).as_posix()}:{st.st_size}:{st.st_mtime_ns}", None, str(mask), ""
    return "", None, None, ""
