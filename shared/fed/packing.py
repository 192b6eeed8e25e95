"""One unit's arrays as one buffer in numpy's ``.npz`` format (a zip of ``.npy`` members, stored, not
compressed), so that a message carries one Flower Array per model instead of one per tensor.

Flower 1.42 moves every Array of a message, and every 5 MiB chunk of one, as an object of its own: one
HTTP request per object and hop (SuperLink to SuperNode, SuperNode to the ClientApp process), each with a
database write at the SuperLink. A resnet18 with its two heads is 122 tensors; six units in one message
are over a thousand objects, and a packed resnet18 is nine. docs/performance.md has the figures.

Reading is checked, because the buffer comes from the other side: a zip of ``.npy`` members only, stored
(no compression, so the members cannot expand past the buffer), unique names, no pickled objects, and
numeric dtypes only. Anything else is a :class:`~mdmt.errors.ProtocolError` naming what was wrong.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Iterable, Mapping

import numpy as np

from mdmt.errors import ProtocolError

PACKED = "npz"  # the one array name of a packed record
_SUFFIX = ".npy"
_KINDS = "fiub"  # float, signed and unsigned integer, bool


def is_packed(names: Iterable[str]) -> bool:
    """Whether a record with these array names holds one packed buffer."""
    return list(names) == [PACKED]


def pack_arrays(arrays: Mapping[str, np.ndarray]) -> np.ndarray:
    """The arrays as one uint8 buffer (``.npz``, stored); names and order are kept."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, value in arrays.items():
            with zf.open(name + _SUFFIX, "w", force_zip64=True) as fh:
                np.lib.format.write_array(fh, np.asarray(value, order="C"), allow_pickle=False)
    return np.frombuffer(buf.getvalue(), dtype=np.uint8)


def unpack_arrays(buf: np.ndarray, source: str = "the message") -> dict[str, np.ndarray]:
    """The arrays of a buffer written by :func:`pack_arrays`, checked (see the module's text)."""
    if not isinstance(buf, np.ndarray) or buf.dtype != np.uint8 or buf.ndim != 1:
        raise ProtocolError(f"{source}: a packed record must be a 1-D uint8 buffer")
    try:
        zf = zipfile.ZipFile(io.BytesIO(buf.tobytes()))
    except (zipfile.BadZipFile, ValueError, OSError) as exc:
        raise ProtocolError(f"{source}: the packed arrays are not an .npz buffer ({exc})") from None
    out: dict[str, np.ndarray] = {}
    total = 0
    with zf:
        for info in zf.infolist():
            name = info.filename
            if not name.endswith(_SUFFIX) or name[: -len(_SUFFIX)] in out:
                raise ProtocolError(f"{source}: packed member {name!r} is not a unique .npy name")
            if info.compress_type != zipfile.ZIP_STORED:
                raise ProtocolError(f"{source}: packed member {name!r} is compressed; only stored members are read")
            total += info.file_size
            if total > buf.size:
                raise ProtocolError(f"{source}: packed members claim more bytes than the buffer holds")
            try:
                with zf.open(info) as fh:
                    value = np.lib.format.read_array(fh, allow_pickle=False)
            except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
                raise ProtocolError(f"{source}: packed member {name!r} is not a valid .npy array ({exc})") from None
            if value.dtype.kind not in _KINDS:
                raise ProtocolError(f"{source}: packed member {name!r} has dtype {value.dtype}; numbers only")
            out[name[: -len(_SUFFIX)]] = value
    return out
