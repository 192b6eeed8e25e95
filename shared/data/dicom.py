"""The one DICOM reader: a chest X-ray file -> a float32 grey image where bright = more attenuation.

Every image in the system enters through :func:`read_dicom` (or :func:`read_image`, which also takes
PNG/JPEG/TIFF files for sites that were exported that way). The steps, in DICOM's own order:

1. ``pydicom.dcmread``; decode the pixel data with pydicom's own decoders (``pydicom.pixels``),
   which also convert YBR colour data to RGB.
2. Modality LUT: RescaleSlope / RescaleIntercept (or a Modality LUT Sequence), via
   ``pydicom.pixels.apply_modality_lut``. Colour images have no modality LUT.
3. VOI LUT / windowing: *not applied yet* (``voi="none"``); :func:`_apply_voi` is the hook where a later
   change adds ``WindowCenter/WindowWidth`` or a VOI LUT Sequence.
4. Presentation: MONOCHROME1 (bright = less attenuation) is inverted *within the image's own value range*
   after steps 2-3: ``out = min + max - value``, so the minimum and maximum are kept and only the
   direction changes. (The BitsStored range was not used because real files often declare 12/16 bits
   while using a much smaller range, and the inversion must not depend on a header that lies.)
5. Colour (RGB, or YBR converted to RGB): the plain mean of the three channels.

Anything unusable raises :class:`shared.errors.DicomRejected` with a one-line reason (written to
``rejected.csv`` by the ingestion); no other exception escapes :func:`read_dicom`.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from shared.errors import DicomRejected

MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_PARTIAL_422", "YBR_PARTIAL_420", "YBR_ICT", "YBR_RCT")
SUPPORTED_PHOTOMETRIC = MONOCHROME + COLOUR
VOI_MODES = ("none",)  # a later change adds e.g. "window" (WindowCenter/WindowWidth) and "lut"

_IMAGE_MAGIC = (
    b"\x89PNG\r\n\x1a\n",  # PNG
    b"\xff\xd8\xff",  # JPEG
    b"II*\x00",  # TIFF little endian
    b"MM\x00*",  # TIFF big endian
)
_MAX_REASON = 200


def _one_line(exc: BaseException | str) -> str:
    """A short single-line text of an exception, fit for a rejected.csv reason."""
    if isinstance(exc, BaseException):
        msg = str(exc).strip() or exc.__class__.__name__
        text = f"{exc.__class__.__name__}: {msg}" if not isinstance(exc, DicomRejected) else msg
    else:
        text = exc
    text = " ".join(text.split())
    return text if len(text) <= _MAX_REASON else text[: _MAX_REASON - 3] + "..."


def _text(ds: Any, keyword: str) -> str:
    value = ds.get(keyword, "")
    return "" if value is None else str(value).strip()


def _int(ds: Any, keyword: str) -> int | None:
    try:
        value = ds.get(keyword, None)
        return None if value in (None, "") else int(value)
    except (TypeError, ValueError):
        return None


def _read_dataset(path: Path):
    """dcmread with one-line rejections for missing, empty, non-DICOM and truncated files."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    if not path.exists():
        raise DicomRejected("file not found")
    if not path.is_file():
        raise DicomRejected("not a regular file")
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise DicomRejected(f"unreadable file: {_one_line(exc)}") from None
    if size == 0:
        raise DicomRejected("empty file")
    try:
        return pydicom.dcmread(path), False
    except InvalidDicomError:
        pass  # no preamble/'DICM': maybe a bare dataset, tried below
    except Exception as exc:  # pydicom raises many types for damaged files
        raise DicomRejected(f"truncated or unreadable file: {_one_line(exc)}") from None
    # A DICOM dataset written without the 128-byte preamble and file meta is still a DICOM file; accept
    # it only when the forced read finds an image (a text file "parses" into junk tags otherwise).
    try:
        ds = pydicom.dcmread(path, force=True)
        ok = "PixelData" in ds and _int(ds, "Rows") and _int(ds, "Columns")
    except Exception:
        ok = False
    if not ok:
        raise DicomRejected("not a DICOM file (no 'DICM' marker and no readable image elements)")
    return ds, True


def _ensure_transfer_syntax(ds: Any, forced: bool) -> None:
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    meta = getattr(ds, "file_meta", None)
    if meta is not None and meta.get("TransferSyntaxUID", None):
        return
    if not forced:
        raise DicomRejected("truncated or unreadable file: file meta incomplete (no Transfer Syntax UID)")
    implicit, little = getattr(ds, "original_encoding", (True, True))
    if meta is None:
        ds.file_meta = meta = FileMetaDataset()
    if implicit:
        meta.TransferSyntaxUID = ImplicitVRLittleEndian
    else:
        meta.TransferSyntaxUID = ExplicitVRLittleEndian if little else ExplicitVRBigEndian


def _decode(ds: Any) -> tuple[np.ndarray, str]:
    """Decoded pixels (YBR converted to RGB by pydicom where it can) and their photometric interpretation."""
    from pydicom.pixels import as_pixel_options, convert_color_space, get_decoder

    tsyntax = ds.file_meta.TransferSyntaxUID
    ts_name = getattr(tsyntax, "name", str(tsyntax))
    try:
        decoder = get_decoder(tsyntax)
    except NotImplementedError:
        raise DicomRejected(f"unsupported transfer syntax {ts_name}") from None
    if not decoder.is_available:
        raise DicomRejected(f"no decoder installed for transfer syntax {ts_name}")
    try:
        arr, info = decoder.as_array(ds, validate=True, raw=False, **as_pixel_options(ds))
    except ValueError as exc:
        text = str(exc)
        if "less than expected" in text or "truncated" in text.lower():
            m = re.search(r"\((\d+) vs (\d+) bytes\)", text)
            detail = f"{m.group(1)} of {m.group(2)} bytes" if m else _one_line(exc)
            raise DicomRejected(f"truncated file: pixel data incomplete ({detail})") from None
        raise DicomRejected(f"cannot decode pixel data ({ts_name}): {_one_line(exc)}") from None
    except Exception as exc:
        raise DicomRejected(f"cannot decode pixel data ({ts_name}): {_one_line(exc)}") from None
    photometric = str(info.get("photometric_interpretation", _text(ds, "PhotometricInterpretation")))
    if photometric.startswith("YBR"):
        try:
            arr = convert_color_space(arr, photometric, "RGB")
        except Exception as exc:
            raise DicomRejected(f"unsupported photometric interpretation {photometric}: {_one_line(exc)}") from None
        photometric = "RGB"
    return np.asarray(arr), photometric


def _apply_modality(arr: np.ndarray, ds: Any) -> np.ndarray:
    from pydicom.pixels import apply_modality_lut

    try:
        out = apply_modality_lut(arr, ds)
    except Exception as exc:
        raise DicomRejected(f"cannot apply rescale / modality LUT: {_one_line(exc)}") from None
    return np.asarray(out, dtype=np.float64)


def _apply_voi(arr: np.ndarray, ds: Any, voi: str) -> np.ndarray:
    """VOI LUT / windowing hook. Only ``"none"`` exists now; it returns the values unchanged."""
    if voi == "none":
        return arr
    raise ValueError(f"unknown VOI mode {voi!r}; choose one of {', '.join(VOI_MODES)}")


def invert_monochrome1(arr: np.ndarray) -> np.ndarray:
    """MONOCHROME1 -> MONOCHROME2 within the image's own range: ``min + max - value``."""
    lo, hi = float(np.min(arr)), float(np.max(arr))
    return (lo + hi) - arr


def read_dicom(path: str | Path, voi: str = "none") -> tuple[np.ndarray, dict]:
    """Read one DICOM image as float32 (rows, cols), bright = more attenuation, and a metadata dict.

    The dict holds ``photometric`` (as stored in the file), ``manufacturer``, ``rows``, ``cols``,
    ``bits_stored``, ``modality``, ``transfer_syntax``, ``rescale_slope``, ``rescale_intercept`` and
    ``inverted`` (True for MONOCHROME1). Raises :class:`DicomRejected` with a one-line reason.
    """
    if voi not in VOI_MODES:
        raise ValueError(f"unknown VOI mode {voi!r}; choose one of {', '.join(VOI_MODES)}")
    path = Path(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns on many harmless header quirks
        try:
            return _read_dicom(path, voi)
        except DicomRejected:
            raise
        except MemoryError:
            raise DicomRejected("image too large to decode in memory") from None
        except Exception as exc:  # the contract: nothing but DicomRejected escapes
            raise DicomRejected(f"unreadable DICOM: {_one_line(exc)}") from None


def _read_dicom(path: Path, voi: str) -> tuple[np.ndarray, dict]:
    ds, forced = _read_dataset(path)
    _ensure_transfer_syntax(ds, forced)  # before the element checks: a cut-off header reads as empty
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise DicomRejected("no pixel data")
    if "PixelData" not in ds:
        raise DicomRejected("float pixel data is not supported")
    frames = _int(ds, "NumberOfFrames")
    if frames is not None and frames > 1:
        raise DicomRejected(f"multi-frame image (NumberOfFrames={frames})")
    rows, cols = _int(ds, "Rows"), _int(ds, "Columns")
    if not rows or not cols:
        raise DicomRejected("no image size (Rows/Columns missing or zero)")
    stored_pi = _text(ds, "PhotometricInterpretation").upper()
    if stored_pi not in SUPPORTED_PHOTOMETRIC:
        raise DicomRejected(f"unsupported photometric interpretation {stored_pi or '(missing)'}")
    tsyntax = ds.file_meta.TransferSyntaxUID
    meta = {
        "photometric": stored_pi,
        "manufacturer": _text(ds, "Manufacturer"),
        "rows": rows,
        "cols": cols,
        "bits_stored": _int(ds, "BitsStored"),
        "modality": _text(ds, "Modality"),
        "transfer_syntax": str(getattr(tsyntax, "name", tsyntax)),
        "rescale_slope": float(ds.get("RescaleSlope", 1) or 1),
        "rescale_intercept": float(ds.get("RescaleIntercept", 0) or 0),
        "inverted": False,
    }

    arr, photometric = _decode(ds)
    if photometric in MONOCHROME:
        if arr.ndim != 2:
            raise DicomRejected(f"unexpected pixel array shape {arr.shape} for a single-frame grey image")
        img = _apply_modality(arr, ds)
        img = _apply_voi(img, ds, voi)
        if photometric == "MONOCHROME1":
            img = invert_monochrome1(img)
            meta["inverted"] = True
    elif photometric == "RGB":
        if arr.ndim != 3 or arr.shape[-1] != 3:
            raise DicomRejected(f"unexpected pixel array shape {arr.shape} for a single-frame colour image")
        img = arr.astype(np.float64).mean(axis=-1)
    else:
        raise DicomRejected(f"unsupported photometric interpretation {photometric}")
    img = np.ascontiguousarray(img, dtype=np.float32)
    if not np.all(np.isfinite(img)):
        raise DicomRejected("pixel values are not finite after rescale")
    if img.shape != (rows, cols):
        raise DicomRejected(f"pixel array shape {img.shape} does not match Rows x Columns {rows}x{cols}")
    return img, meta


def _read_plain_image(path: Path) -> tuple[np.ndarray, dict]:
    """PNG/JPEG/TIFF via Pillow: grey as stored (bright = attenuation assumed), colour averaged."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            fmt = im.format or ""
            if im.mode in ("RGB", "RGBA", "P", "CMYK", "YCbCr", "LA", "PA"):
                arr = np.asarray(im.convert("RGB"), dtype=np.float64).mean(axis=-1)
            else:
                arr = np.asarray(im, dtype=np.float64)
            n_frames = getattr(im, "n_frames", 1)
    except Exception as exc:
        raise DicomRejected(f"truncated or unreadable image file: {_one_line(exc)}") from None
    if n_frames > 1:
        raise DicomRejected(f"multi-frame image ({n_frames} frames)")
    if arr.ndim != 2 or arr.size == 0:
        raise DicomRejected(f"unexpected image shape {arr.shape}")
    meta = {
        "photometric": "MONOCHROME2",
        "manufacturer": "",
        "rows": int(arr.shape[0]),
        "cols": int(arr.shape[1]),
        "bits_stored": None,
        "modality": "",
        "transfer_syntax": fmt,
        "rescale_slope": 1.0,
        "rescale_intercept": 0.0,
        "inverted": False,
    }
    return np.ascontiguousarray(arr, dtype=np.float32), meta


def read_image(path: str | Path) -> tuple[np.ndarray, dict]:
    """:func:`read_dicom`, or Pillow for files that start like PNG, JPEG or TIFF. Same contract."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            head = f.read(8)
    except FileNotFoundError:
        raise DicomRejected("file not found") from None
    except OSError as exc:
        raise DicomRejected(f"unreadable file: {_one_line(exc)}") from None
    if any(head.startswith(m) for m in _IMAGE_MAGIC):
        return _read_plain_image(path)
    return read_dicom(path)
