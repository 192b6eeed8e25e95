"""A unit's arrays packed into one buffer (mdmt.fed.packing): exact round trips, and hostile buffers refused
with one line naming what was wrong."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest

from mdmt.errors import ProtocolError
from mdmt.fed.packing import PACKED, is_packed, pack_arrays, unpack_arrays


def test_a_model_round_trips_exactly_with_names_order_dtypes_and_shapes():
    from mdmt.ml.model import build_model

    state = {k: v.numpy() for k, v in build_model("resnet18").state_dict().items()}
    state["update.half"] = np.linspace(-1, 1, 7, dtype=np.float16)
    state["update.int8"] = np.arange(-3, 3, dtype=np.int8).reshape(2, 3)
    buf = pack_arrays(state)
    assert buf.dtype == np.uint8 and buf.ndim == 1
    out = unpack_arrays(buf)
    assert list(out) == list(state)
    for k, v in state.items():
        assert out[k].dtype == v.dtype and out[k].shape == v.shape and np.array_equal(out[k], v), k
    # 0-d buffers (BatchNorm's step counters) stay 0-d
    assert out["backbone.bn1.num_batches_tracked"].shape == ()
    # the payload is the arrays plus a small header per member
    raw = sum(v.nbytes for v in state.values())
    assert raw < buf.nbytes < raw + 400 * len(state)


def test_is_packed_only_for_the_one_packed_name():
    assert is_packed([PACKED]) and not is_packed([PACKED, "x"]) and not is_packed(["w"]) and not is_packed([])


def _zip(members: dict[str, bytes], compression=zipfile.ZIP_STORED) -> np.ndarray:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=compression) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return np.frombuffer(buf.getvalue(), dtype=np.uint8)


def _npy(value) -> bytes:
    out = io.BytesIO()
    np.lib.format.write_array(out, np.asarray(value), allow_pickle=True)
    return out.getvalue()


@pytest.mark.parametrize(
    "buf, message",
    [
        (np.zeros(10, dtype=np.float32), "1-D uint8 buffer"),
        (np.zeros((2, 2), dtype=np.uint8), "1-D uint8 buffer"),
        (np.frombuffer(b"not a zip at all", dtype=np.uint8), "not an .npz buffer"),
        (_zip({"w.txt": b"hello"}), "is not a unique .npy name"),
        (_zip({"w.npy": _npy(np.ones(1000))}, zipfile.ZIP_DEFLATED), "is compressed"),
        (_zip({"w.npy": _npy(np.array([{"a": 1}], dtype=object))}), "not a valid .npy array"),
        (_zip({"w.npy": _npy(np.array(["text"]))}), "has dtype <U4; numbers only"),
        (_zip({"w.npy": b"\x93NUMPY garbage"}), "not a valid .npy array"),
    ],
)
def test_hostile_buffers_are_refused_in_one_line(buf, message):
    with pytest.raises(ProtocolError) as err:
        unpack_arrays(buf, "site B's arrays.1")
    text = str(err.value)
    assert message in text and text.startswith("site B's arrays.1: ") and "\n" not in text


def test_a_duplicate_member_name_is_refused():
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("w.npy", _npy(np.ones(2)))
        with pytest.warns(UserWarning):
            zf.writestr("w.npy", _npy(np.zeros(2)))
    with pytest.raises(ProtocolError, match="'w.npy' is not a unique .npy name"):
        unpack_arrays(np.frombuffer(buf.getvalue(), dtype=np.uint8))


def test_a_member_claiming_more_bytes_than_the_buffer_is_refused():
    buf = bytearray(_zip({"w.npy": _npy(np.ones(4))}).tobytes())
    # the central directory's uncompressed size of the member, set past the buffer
    at = buf.rfind(b"PK\x01\x02")
    buf[at + 24 : at + 28] = (10**9).to_bytes(4, "little")
    with pytest.raises(ProtocolError, match="claim more bytes than the buffer holds"):
        unpack_arrays(np.frombuffer(bytes(buf), dtype=np.uint8))
