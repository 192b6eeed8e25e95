"""Update compression: sites send (local - global) as fp16 or int8; the server adds it back."""

import numpy as np
import pytest
import torch

from mdmt.errors import ProtocolError
from mdmt.fed.compress import SCALE, decode_update, encode_update, payload_bytes
from mdmt.ml.model import build_model


def _pair(seed=0, step=1e-3):
    model = build_model("resnet18", seed=seed)
    base = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    rng = np.random.default_rng(seed)
    local = {
        k: (v + rng.normal(0, step, v.shape).astype(v.dtype)) if v.dtype.kind == "f" else np.asarray(v + 3)
        for k, v in base.items()
    }
    return base, local


def test_fp16_halves_the_bytes_and_restores_the_weights_to_half_precision_of_the_update():
    base, local = _pair()
    sent = encode_update(local, base, "fp16")
    full = payload_bytes(encode_update(local, base, "none"))
    ints = sum(v.nbytes for v in base.values() if v.dtype.kind != "f")
    assert payload_bytes(sent) - ints == (full - ints) // 2
    back = decode_update(sent, base, "fp16")
    for k, v in local.items():
        if v.dtype.kind != "f":
            assert back[k].dtype == v.dtype and np.array_equal(back[k], v)  # integer buffers: exact
        else:
            delta = v - base[k]
            assert back[k].dtype == np.float32
            # float16 keeps 11 significant bits of each update value
            assert np.all(np.abs((back[k] - base[k]) - delta) <= np.abs(delta) * 2**-10 + 1e-7), k


def test_int8_is_a_quarter_with_one_scale_per_tensor_and_bounded_error():
    base, local = _pair()
    sent = encode_update(local, base, "int8")
    floats = [k for k, v in base.items() if v.dtype.kind == "f"]
    assert all(sent[k].dtype == np.int8 and sent[k + SCALE].shape == (1,) for k in floats)
    float_bytes = sum(base[k].nbytes for k in floats)
    assert sum(sent[k].nbytes for k in floats) == float_bytes // 4
    back = decode_update(sent, base, "int8")
    for k in floats:
        delta = local[k] - base[k]
        err = np.abs((back[k] - base[k]) - delta).max()
        assert err <= np.abs(delta).max() / 127 / 2 * 1.01 + 1e-9, k  # half a quantisation step


def test_none_sends_the_weights_and_fp16_falls_back_to_fp32_where_the_update_overflows():
    base, local = _pair()
    assert all(
        np.array_equal(v, local[k]) for k, v in decode_update(encode_update(local, base, "none"), base, "none").items()
    )
    name = next(k for k, v in base.items() if v.dtype.kind == "f")
    local[name] = local[name] + 1e5  # past float16's range
    sent = encode_update(local, base, "fp16")
    assert sent[name].dtype == np.float32
    np.testing.assert_allclose(decode_update(sent, base, "fp16")[name], local[name], rtol=1e-6)


def test_encode_accepts_torch_state_dicts():
    base, local = _pair()
    torch_local = {k: torch.from_numpy(v) for k, v in local.items()}
    a, b = encode_update(torch_local, base, "fp16"), encode_update(local, base, "fp16")
    assert all(np.array_equal(a[k], b[k]) for k in b)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda s, n: s.pop(n), "missing"),
        (lambda s, n: s.pop(n + SCALE), "without its scale"),
        (lambda s, n: s.__setitem__(n, s[n][:1]), "shape"),
    ],
)
def test_a_malformed_update_is_named(damage, message):
    base, local = _pair()
    sent = encode_update(local, base, "int8")
    name = next(k for k, v in base.items() if v.dtype.kind == "f" and v.size > 1)
    damage(sent, name)
    with pytest.raises(ProtocolError, match=message):
        decode_update(sent, base, "int8")
