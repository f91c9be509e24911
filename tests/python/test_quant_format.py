"""docs/quant_format.md checked against the code: small tensors whose quantized values are
known, and the bytes at the offsets the document states."""
import json
import struct

import numpy as np
import pytest

from aimass.compress import quantize


def raw_header(path):
    raw = open(path, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def test_int8_symmetric_bytes_and_channel_scale():
    # scale = max|w_row| / 127: rows chosen so that scale is 1 and 2, q = rint(w / scale)
    w = np.array([[127, -127, 3, -3.4], [254, -2, 5, 0]], np.float32)
    qt = quantize(w, bits=8, scheme="symmetric", granularity="channel", axis=0)
    assert qt.data.dtype == np.int8 and qt.data.shape == (2, 4) and qt.zero_point is None
    np.testing.assert_array_equal(qt.scale, [1.0, 2.0])
    b = qt.data.tobytes()
    K = 4
    want = {(0, 0): 127, (0, 1): -127, (0, 2): 3, (0, 3): -3, (1, 0): 127, (1, 1): -1, (1, 2): 2, (1, 3): 0}
    for (n, k), q in want.items():  # byte n*K + k, two's complement; rint half to even: 5/2 -> 2
        assert b[n * K + k] == q & 0xFF, (n, k)


def test_int4_symmetric_nibble_order():
    # one block, max|w| = 7 -> scale 1, q = w
    q = np.array([7, -7, 1, -1, 0, 3, -5, 2], np.float32)
    qt = quantize(q.reshape(2, 4), bits=4, scheme="symmetric", granularity="tensor")
    assert qt.data.dtype == np.uint8 and qt.data.shape == (2, 2) and qt.scale.shape == ()
    b = qt.data.tobytes()
    for j in range(4):  # element 2j low nibble, 2j+1 high nibble, two's complement nibbles
        assert b[j] == (int(q[2 * j]) & 0xF) | ((int(q[2 * j + 1]) & 0xF) << 4), j
    assert b[0] == 0x97
    # decode rule (v ^ 8) - 8
    nib = np.stack([qt.data.reshape(-1) & 0xF, qt.data.reshape(-1) >> 4], 1).reshape(-1).astype(np.int32)
    np.testing.assert_array_equal((nib ^ 8) - 8, q)


def test_int4_odd_numel_and_asymmetric_zero_point():
    # 5 elements in [0, 15]: lo = 0, hi = 15 -> scale 1, zero_point 0, nibble = q
    w = np.array([0, 15, 7, 8, 1], np.float32)
    qt = quantize(w, bits=4, scheme="asymmetric", granularity="tensor")
    assert qt.data.shape == (3,) and qt.zero_point.dtype == np.int32 and qt.zero_point.shape == ()
    b = qt.data.tobytes()
    assert b == bytes([0 | 15 << 4, 7 | 8 << 4, 1])  # the odd last element leaves the high nibble 0
    # a negative range: lo = -55, hi = 200 -> scale 255/255 = 1, zero_point 55, q = w + 55
    qa = quantize(np.array([-55, 200, 0, 3], np.float32), bits=8, scheme="asymmetric", granularity="tensor")
    assert int(qa.zero_point) == 55 and float(qa.scale) == 1.0
    assert qa.data.dtype == np.uint8 and qa.data.tobytes() == bytes([0, 255, 55, 58])


def test_group_scale_placement():
    # [C=2, K=8], G=4: scale[c, k // G]; block maxima 7, 14, 21, 28 (x/7 -> 1, 2, 3, 4)
    w = np.zeros((2, 8), np.float32)
    for c in range(2):
        for g in range(2):
            w[c, g * 4] = 7.0 * (1 + c * 2 + g)
    qt = quantize(w, bits=4, scheme="symmetric", granularity="group", axis=0, group_size=4)
    assert qt.scale.shape == (2, 2)
    np.testing.assert_array_equal(qt.scale, [[1, 2], [3, 4]])
    # every block's first element is q = 7 -> nibble 7 at element c*8 + 4g (even: a low nibble)
    b = qt.data.tobytes()
    for c in range(2):
        for g in range(2):
            e = c * 8 + g * 4
            assert b[e // 2] & 0xF == 7


def test_channel_axis_of_a_3d_tensor():
    # S = [2, 3, 2], axis 1: channel c owns (o, c, i); scale[c] = max over those / 127
    w = np.zeros((2, 3, 2), np.float32)
    w[1, 0, 1], w[0, 1, 0], w[1, 2, 0] = 127.0, -254.0, 381.0
    qt = quantize(w, bits=8, scheme="symmetric", granularity="channel", axis=1)
    np.testing.assert_array_equal(qt.scale, [1, 2, 3])
    b = qt.data.tobytes()  # flat row-major order of S
    assert b[1 * 6 + 0 * 2 + 1] == 127 and b[0 * 6 + 1 * 2 + 0] == (-127) & 0xFF and b[1 * 6 + 2 * 2 + 0] == 127


@pytest.mark.parametrize("scheme", ["symmetric", "asymmetric"])
def test_saved_file_keys_dtypes_and_metadata(tmp_path, scheme):
    w = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)
    qt = quantize(w, bits=4, scheme=scheme, granularity="group", axis=0, group_size=4)
    p = tmp_path / "q.safetensors"
    qt.save(p)
    hdr, data = raw_header(p)
    meta = hdr.pop("__metadata__")
    want = {"data": ("U8", [4, 4]), "scale": ("F32", [4, 2])}
    if scheme == "asymmetric":
        want["zero_point"] = ("I32", [4, 2])
    assert {k: (v["dtype"], v["shape"]) for k, v in hdr.items()} == want
    assert meta == {"format": "aimass.quantized", "version": "1", "bits": "4", "scheme": scheme,
                    "granularity": "group", "axis": "0", "group_size": "4", "shape": "4,8", "dtype": "float32"}
    b0, b1 = hdr["data"]["data_offsets"]
    assert data[b0:b1] == qt.data.tobytes()
    s0, s1 = hdr["scale"]["data_offsets"]
    assert data[s0:s1] == qt.scale.astype("<f4").tobytes()


@pytest.mark.parametrize("bits", [8, 4])
def test_aimass_file_quantized_linear(tmp_path, bits):
    torch = pytest.importorskip("torch")
    import aimass.runtime as rt
    from aimass.compress.qlinear import quantize_weight
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 3))
    p = tmp_path / "q.aimass"
    rt.export(net, (torch.randn(2, 64),), p, quantize=f"int{bits}")
    hdr, data = raw_header(p)
    g = json.loads(hdr["__metadata__"]["aimass.graph"])
    lin = next(n for n in g["nodes"] if n["op"] == "linear")
    assert lin["attrs"]["bits"] == bits and lin["attrs"]["group_size"] == (0 if bits == 8 else 32)
    w, s = hdr[lin["params"]["weight"]], hdr[lin["params"]["weight_scale"]]
    if bits == 8:
        assert (w["dtype"], w["shape"], s["dtype"], s["shape"]) == ("I8", [3, 64], "F32", [3])
    else:
        assert (w["dtype"], w["shape"], s["dtype"], s["shape"]) == ("U8", [3, 32], "F32", [3, 2])
    ref = quantize_weight(net[0].weight.detach().numpy(), bits=bits, group_size=None if bits == 8 else 32)
    assert data[w["data_offsets"][0]:w["data_offsets"][1]] == ref.data.tobytes()
    assert data[s["data_offsets"][0]:s["data_offsets"][1]] == ref.scale.astype("<f4").tobytes()
    if bits == 4:  # q[n, k] is nibble k & 1 of byte (n*K + k) >> 1
        raw = np.frombuffer(data[w["data_offsets"][0]:w["data_offsets"][1]], np.uint8)
        n, k = 2, 37
        v = (raw[(n * 64 + k) >> 1] >> (4 * (k & 1))) & 0xF
        wq = np.clip(np.rint(net[0].weight.detach().numpy()[n, k] / ref.scale[n, k // 32]), -7, 7)
        assert ((int(v) ^ 8) - 8) == int(wq)
