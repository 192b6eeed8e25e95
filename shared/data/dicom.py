"""The one DICOM reader: a chest X-ray file -> a float32 grey image where bright = more attenuation.

Every image in the system enters through :func:`read_dicom` (or :func:`read_image`, which also takes
PNG/JPEG/TIFF files for sites that were exported that way). The steps, in DICOM's own order:

1. ``pydicom.dcmread``; decode the pixel data with pydicom's own decoders (``pydicom.pixels``),
   which also convert YBR colour data to RGB. Native (uncompressed) little and big endian, implicit or
   explicit VR, and Deflated data need nothing more; compressed transfer syntaxes go through pydicom's
   plugins: RLE (pydicom itself, or pylibjpeg-rle), JPEG 2000 (pylibjpeg-openjpeg, or Pillow when built
   with OpenJPEG), JPEG baseline 8-bit (Pillow, or pylibjpeg-libjpeg), JPEG extended 12-bit, JPEG lossless
   and JPEG-LS (pylibjpeg-libjpeg, GPL-3, optional; or pyjpegls / gdcm when installed). A syntax without an
   installed decoder is a one-line rejection naming the optional extra that brings one.
2. Modality LUT: RescaleSlope / RescaleIntercept (or a Modality LUT Sequence), via
   ``pydicom.pixels.apply_modality_lut``. Colour images have no modality LUT.
3. VOI LUT / windowing, by ``voi``: ``"none"`` (default) leaves the values alone; ``"auto"`` applies the
   file's VOI LUT Sequence, else its WindowCenter/WindowWidth (the first window when there are several),
   via ``pydicom.pixels.apply_voi_lut``, and does nothing when the file has neither.
4. Presentation: MONOCHROME1 (bright = less attenuation) is inverted *within the image's own value range*
   after steps 2-3: ``out = min + max - value``, so the minimum and maximum are kept and only the
   direction changes. (The BitsStored range was not used because real files often declare 12/16 bits
   while using a much smaller range, and the inversion must not depend on a header that lies.)
5. Colour (RGB, or YBR converted to RGB): the plain mean of the three channels.

Before any pixel data is read or inflated, the header's Rows x Columns x frames is checked against a cap
(:func:`max_pixels`: 100 megapixels unless ``MDMT_MAX_MEGAPIXELS`` says otherwise; the largest real
radiographs are about 20). A Deflated file's header is read from the first few kilobytes of its inflated
stream, so a small file that declares a huge image is refused without being inflated.

Anything unusable raises :class:`mdmt.errors.DicomRejected` with a one-line reason (written to
``rejected.csv`` by the ingestion); no other exception escapes :func:`read_dicom`.
"""

from __future__ import annotations

import io
import os
import re
import warnings
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_dataset, read_file_meta_info
from pydicom.pixels import apply_modality_lut, apply_voi_lut, as_pixel_options, convert_color_space, get_decoder
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from mdmt.data.options import VOI_MODES
from mdmt.errors import DicomRejected

MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_PARTIAL_422", "YBR_PARTIAL_420", "YBR_ICT", "YBR_RCT")
SUPPORTED_PHOTOMETRIC = MONOCHROME + COLOUR
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"  # the SOP class of a DICOMDIR

# Which optional package brings a decoder for a compressed transfer syntax (named in the rejection).
_JPEG_EXTRA = "install the 'jpeg' extra (pip install 'mdmt-federation[jpeg]'"
_LIBJPEG = "pylibjpeg + pylibjpeg-libjpeg, GPL-3"
_OPENJPEG = "pylibjpeg + pylibjpeg-openjpeg, MIT"
_RLE = "pylibjpeg + pylibjpeg-rle, MIT"
_DECODER_PACKAGE = {
    "1.2.840.10008.1.2.4.50": _LIBJPEG,  # JPEG Baseline (Pillow normally decodes it)
    "1.2.840.10008.1.2.4.51": _LIBJPEG,  # JPEG Extended 12-bit
    "1.2.840.10008.1.2.4.57": _LIBJPEG,  # JPEG Lossless
    "1.2.840.10008.1.2.4.70": _LIBJPEG,  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.80": _LIBJPEG + "; or pyjpegls",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81": _LIBJPEG + "; or pyjpegls",  # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.90": _OPENJPEG,  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91": _OPENJPEG,  # JPEG 2000
    "1.2.840.10008.1.2.4.201": _OPENJPEG,  # HTJ2K Lossless
    "1.2.840.10008.1.2.4.202": _OPENJPEG,  # HTJ2K Lossless RPCL
    "1.2.840.10008.1.2.4.203": _OPENJPEG,  # HTJ2K
    "1.2.840.10008.1.2.5": _RLE,  # RLE Lossless (pydicom decodes it natively)
}

_IMAGE_MAGIC = (
    b"\x89PNG\r\n\x1a\n",  # PNG
    b"\xff\xd8\xff",  # JPEG
    b"II*\x00",  # TIFF little endian
    b"MM\x00*",  # TIFF big endian
)
_MAX_REASON = 200
DICM_OFFSET = 128  # a DICOM file: any 128-byte preamble (a TIFF header, say), then b"DICM"
MAX_MEGAPIXELS_ENV = "MDMT_MAX_MEGAPIXELS"
DEFAULT_MAX_MEGAPIXELS = 100.0
_HEADER_BYTES = 1 << 20  # of a Deflated stream, inflated to read the header (the elements before the pixels)
_PIXEL_DATA = 0x7FE00010


def max_pixels() -> int:
    """The largest Rows x Columns x frames an image may declare: ``MDMT_MAX_MEGAPIXELS`` million (default
    100). Checked from the header before any pixel data is read or inflated."""
    raw = os.environ.get(MAX_MEGAPIXELS_ENV, "")
    try:
        mp = float(raw) if raw.strip() else DEFAULT_MAX_MEGAPIXELS
    except ValueError:
        mp = float("nan")
    if not (mp > 0 and mp != float("inf")):
        raise DicomRejected(f"{MAX_MEGAPIXELS_ENV}={raw!r} is not a positive number of megapixels")
    return int(mp * 1_000_000)


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


def _declared_pixels(ds: Any) -> int:
    rows, cols = _int(ds, "Rows") or 0, _int(ds, "Columns") or 0
    return rows * cols * max(_int(ds, "NumberOfFrames") or 1, 1)


def _check_pixel_count(count: int, what: str) -> None:
    cap = max_pixels()
    if count > cap:
        raise DicomRejected(
            f"{what} declares {count / 1e6:.1f} megapixels, more than the cap of {cap / 1e6:g} "
            f"(set {MAX_MEGAPIXELS_ENV} to raise it); refused before decoding"
        )


def _header(path: Path) -> Any:
    """The dataset's elements before the pixel data, without reading or inflating the pixels; None when
    the file has no DICOM file meta (a bare dataset is checked after its forced read)."""
    try:
        meta = read_file_meta_info(path)
    except Exception:
        return None
    if meta.get("TransferSyntaxUID", None) != DeflatedExplicitVRLittleEndian:
        return pydicom.dcmread(path, stop_before_pixels=True)
    # Deflated: the whole dataset is one zlib stream after the file meta; inflate only its first part.
    length = int(meta.get("FileMetaInformationGroupLength", 0) or 0)
    if not length:
        raise DicomRejected("truncated or unreadable file: Deflated file without a file meta group length")
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    head = bytearray()
    with path.open("rb") as fh:
        fh.seek(DICM_OFFSET + 4 + 12 + length)
        while len(head) < _HEADER_BYTES:
            chunk = fh.read(1 << 16)
            if not chunk:
                break
            head += inflater.decompress(chunk, _HEADER_BYTES - len(head))
            if inflater.unconsumed_tail:
                break
    return read_dataset(
        io.BytesIO(bytes(head)),
        is_implicit_VR=False,
        is_little_endian=True,
        stop_when=lambda tag, vr, length: tag == _PIXEL_DATA,
    )


def _read_dataset(path: Path):
    """dcmread with one-line rejections for missing, empty, non-DICOM, truncated and oversized files."""

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
        header = _header(path)
    except DicomRejected:
        raise
    except Exception as exc:
        raise DicomRejected(f"truncated or unreadable file: {_one_line(exc)}") from None
    if header is not None:
        _check_pixel_count(_declared_pixels(header), "the header")
    try:
        return pydicom.dcmread(path), False
    except InvalidDicomError:
        pass  # no preamble/'DICM': maybe a bare dataset, tried below
    except Exception as exc:  # pydicom raises many types for damaged files
        raise DicomRejected(f"truncated or unreadable file: {_one_line(exc)}") from None
    # A DICOM dataset written without the 128-byte preamble and file meta is still a DICOM file; accept
    # it only when the forced read finds an image (a text file "parses" into junk tags otherwise).
    try:
        ds = pydicom.dcmread(path, force=True, defer_size=1 << 16)  # large values stay on disk until used
        ok = "PixelData" in ds and _int(ds, "Rows") and _int(ds, "Columns")
    except Exception:
        ok = False
    if not ok:
        raise DicomRejected("not a DICOM file (no 'DICM' marker and no readable image elements)")
    _check_pixel_count(_declared_pixels(ds), "the header")
    return ds, True


def _ensure_transfer_syntax(ds: Any, forced: bool) -> None:

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


def no_decoder_reason(tsyntax: Any) -> str:
    """The one-line rejection for a compressed transfer syntax that no installed package decodes."""
    name = getattr(tsyntax, "name", str(tsyntax))
    package = _DECODER_PACKAGE.get(str(tsyntax))
    hint = f"; {_JPEG_EXTRA}: {package})" if package else ""
    return f"no decoder installed for transfer syntax {name}{hint}"


def _cannot_decode(decoder: Any, tsyntax: Any, exc: BaseException) -> str:
    """'cannot decode pixel data (...)', plus the extra to install when a missing plugin may decode it
    (e.g. 12-bit JPEG Extended, which Pillow cannot read but pylibjpeg-libjpeg can)."""
    name = getattr(tsyntax, "name", str(tsyntax))
    text = f"cannot decode pixel data ({name}): {_one_line(exc)}"
    package = _DECODER_PACKAGE.get(str(tsyntax), "")
    missing = " ".join(getattr(decoder, "missing_dependencies", []) or [])
    if package and "pylibjpeg" in missing:  # a pylibjpeg plugin that could decode it is not installed
        hint = f"; the 'jpeg' extra ({package.split(';')[0]}) may decode it"
        text = text[: _MAX_REASON - len(hint)] + hint
    return text


def _decode(ds: Any) -> tuple[np.ndarray, str]:
    """Decoded pixels (YBR converted to RGB by pydicom where it can) and their photometric interpretation."""

    tsyntax = ds.file_meta.TransferSyntaxUID
    ts_name = getattr(tsyntax, "name", str(tsyntax))
    try:
        decoder = get_decoder(tsyntax)
    except NotImplementedError:
        raise DicomRejected(f"unsupported transfer syntax {ts_name}") from None
    if not decoder.is_available:
        raise DicomRejected(no_decoder_reason(tsyntax))
    try:
        arr, info = decoder.as_array(ds, validate=True, raw=False, **as_pixel_options(ds))
    except ValueError as exc:
        text = str(exc)
        if "less than expected" in text or "truncated" in text.lower():
            m = re.search(r"\((\d+) vs (\d+) bytes\)", text)
            detail = f"{m.group(1)} of {m.group(2)} bytes" if m else _one_line(exc)
            raise DicomRejected(f"truncated file: pixel data incomplete ({detail})") from None
        raise DicomRejected(_cannot_decode(decoder, tsyntax, exc)) from None
    except Exception as exc:
        raise DicomRejected(_cannot_decode(decoder, tsyntax, exc)) from None
    photometric = str(info.get("photometric_interpretation", _text(ds, "PhotometricInterpretation")))
    if photometric.startswith("YBR"):
        try:
            arr = convert_color_space(arr, photometric, "RGB")
        except Exception as exc:
            raise DicomRejected(f"unsupported photometric interpretation {photometric}: {_one_line(exc)}") from None
        photometric = "RGB"
    return np.asarray(arr), photometric


def _apply_modality(arr: np.ndarray, ds: Any) -> np.ndarray:

    try:
        out = apply_modality_lut(arr, ds)
    except Exception as exc:
        raise DicomRejected(f"cannot apply rescale / modality LUT: {_one_line(exc)}") from None
    return np.asarray(out, dtype=np.float64)


def _apply_voi(arr: np.ndarray, ds: Any, voi: str) -> tuple[np.ndarray, str]:
    """VOI LUT / windowing after the modality LUT. Returns the values and what was done: ``"none"``,
    ``"lut"`` (VOI LUT Sequence, preferred when both are present), ``"window"`` (WindowCenter /
    WindowWidth, first window) or ``"ignored (...)"`` when the file's VOI data cannot be applied (the
    image is then used without VOI rather than rejected)."""
    if voi == "none":
        return arr, "none"
    if voi != "auto":
        raise ValueError(f"unknown VOI mode {voi!r}; choose one of {', '.join(VOI_MODES)}")

    seq = ds.get("VOILUTSequence", None)
    item = seq[0] if seq else None
    has_lut = item is not None and item.get("LUTDescriptor", None) is not None and item.get("LUTData", None) is not None
    has_window = ds.get("WindowCenter", None) is not None and ds.get("WindowWidth", None) is not None
    if not (has_lut or has_window):
        return arr, "none"
    try:
        if has_lut:
            desc = [int(v) for v in item.LUTDescriptor]
            entries, first = desc[0] or 65536, desc[1]
            # a LUT maps integer input values; clip to its input range first
            x = np.clip(np.floor(arr), first, first + entries - 1).astype(np.int64)
            if desc[2] == 8 and entries > 256:
                # pydicom 3.0 builds the LUT index in the LUT's own dtype (uint8 for 8-bit entries), which
                # wraps for LUTs longer than 256 entries; 16-bit indexing gives the same 8-bit values.
                item.LUTDescriptor = [desc[0], desc[1], 16]
            out, kind = apply_voi_lut(x, ds, index=0, prefer_lut=True), "lut"
        else:
            out, kind = apply_voi_lut(arr, ds, index=0, prefer_lut=True), "window"
        out = np.asarray(out, dtype=np.float64)
        if out.shape != arr.shape or not np.all(np.isfinite(out)):
            raise ValueError("VOI output is not a finite image of the same shape")
        return out, kind
    except Exception as exc:
        return arr, f"ignored ({_one_line(exc)[:120]})"


def invert_monochrome1(arr: np.ndarray) -> np.ndarray:
    """MONOCHROME1 -> MONOCHROME2 within the image's own range: ``min + max - value``."""
    lo, hi = float(np.min(arr)), float(np.max(arr))
    return (lo + hi) - arr


def read_dicom(path: str | Path, voi: str = "none") -> tuple[np.ndarray, dict]:
    """Read one DICOM image as float32 (rows, cols), bright = more attenuation, and a metadata dict.

    ``voi``: ``"none"`` (default) or ``"auto"`` (VOI LUT Sequence, else the first WindowCenter /
    WindowWidth, when the file has them). The dict holds ``photometric`` (as stored in the file),
    ``manufacturer``, ``rows``, ``cols``, ``bits_stored``, ``modality``, ``transfer_syntax``,
    ``rescale_slope``, ``rescale_intercept``, ``inverted`` (True for MONOCHROME1), ``pixel_representation``
    and ``voi`` (what was applied: none, window, lut or "ignored (...)"). Raises :class:`DicomRejected`
    with a one-line reason.
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


def _no_pixel_data_reason(sop_class: str) -> str:
    """'no pixel data', naming the object when its SOP class is a known non-image (SR, presentation state)."""
    if sop_class:
        name = UID(sop_class).name
        if name != sop_class and "Image" not in name:
            return f"no pixel data ({name} object, not an image)"
    return "no pixel data"


def _read_dicom(path: Path, voi: str) -> tuple[np.ndarray, dict]:
    ds, forced = _read_dataset(path)
    _ensure_transfer_syntax(ds, forced)  # before the element checks: a cut-off header reads as empty
    sop_class = str(ds.file_meta.get("MediaStorageSOPClassUID", "") or ds.get("SOPClassUID", "") or "")
    if sop_class == MEDIA_STORAGE_DIRECTORY or "DirectoryRecordSequence" in ds:
        raise DicomRejected("DICOMDIR (a media directory index, not an image)")
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise DicomRejected(_no_pixel_data_reason(sop_class))
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
        "pixel_representation": _int(ds, "PixelRepresentation"),
        "voi": "none",
    }

    arr, photometric = _decode(ds)
    if photometric in MONOCHROME:
        if arr.ndim != 2:
            raise DicomRejected(f"unexpected pixel array shape {arr.shape} for a single-frame grey image")
        img = _apply_modality(arr, ds)
        img, meta["voi"] = _apply_voi(img, ds, voi)
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

    try:
        with Image.open(path) as im:
            _check_pixel_count(im.size[0] * im.size[1] * getattr(im, "n_frames", 1), "the image file")
            im.load()
            fmt = im.format or ""
            if im.mode in ("RGB", "RGBA", "P", "CMYK", "YCbCr", "LA", "PA"):
                arr = np.asarray(im.convert("RGB"), dtype=np.float64).mean(axis=-1)
            else:
                arr = np.asarray(im, dtype=np.float64)
            n_frames = getattr(im, "n_frames", 1)
    except DicomRejected:
        raise
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
        "pixel_representation": None,
        "voi": "none",
    }
    return np.ascontiguousarray(arr, dtype=np.float32), meta


def read_image(path: str | Path, voi: str = "none") -> tuple[np.ndarray, dict]:
    """:func:`read_dicom`, or Pillow for files that start like PNG, JPEG or TIFF (whatever their name's
    extension; ``voi`` does not apply to them). Same contract.

    A file with the DICOM marker at byte 128 is DICOM whatever its preamble holds: "dual-personality"
    files start with a TIFF header. Only files without the marker are sniffed as PNG, JPEG or TIFF."""
    if voi not in VOI_MODES:
        raise ValueError(f"unknown VOI mode {voi!r}; choose one of {', '.join(VOI_MODES)}")
    path = Path(path)
    if path.exists() and not path.is_file():
        raise DicomRejected("not a regular file")
    try:
        with path.open("rb") as f:
            head = f.read(DICM_OFFSET + 4)
    except FileNotFoundError:
        raise DicomRejected("file not found") from None
    except OSError as exc:
        raise DicomRejected(f"unreadable file: {_one_line(exc)}") from None
    if head[DICM_OFFSET:] != b"DICM" and any(head.startswith(m) for m in _IMAGE_MAGIC):
        return _read_plain_image(path)
    return read_dicom(path, voi=voi)
