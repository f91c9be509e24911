"""Golden tests for aimass.compress.quantize against an independent numpy
reference written here (fp32 arithmetic, np.rint = round half to even), compared
bit for bit at every SIMD level this machine has."""
import array

import numpy as np
import pytest

import aimass
from aimass.compress import QuantizedTensor, dequantize, quantize

torch = pytest.importorskip("torch")

_ORDER = ["scalar", "avx2", "avx512"]
LEVELS = _ORDER[: _ORDER.index(aimass.cpu_features()["simd"]) + 1]


@pytest.fixture(params=LEVELS)
def simd(request):
    best = aimass.cpu_features()["simd"]
    aimass.set_simd_level(request.param)
    yield request.param
    aimass.set_simd_level(best)


# ----------------------------------------------------------------- reference
def ref_blocks(w, granularity, axis, group_size):
    """[C, nblocks, L] view of w's blocks and a function mapping q blocks back to w's shape."""
    shape = w.shape
    if granularity == "tensor":
        return w.reshape(1, 1, -1), lambda q: q.reshape(shape)
    c = shape[axis]
    seq = np.moveaxis(w, axis, 0).reshape(c, -1)  # channel c's sequence in (outer, inner) row-major order
    rest = np.moveaxis(w, axis, 0).shape
    k = seq.shape[1]
    g = k if granularity == "channel" else group_size
    return seq.reshape(c, k // g, g), lambda q: np.moveaxis(q.reshape(rest), 0, axis)


def ref_quantize(w, bits, scheme, granularity, axis, group_size):
    w = w.astype(np.float32)
    blocks, unblock = ref_blocks(w, granularity, axis, group_size)
    mn, mx = blocks.min(axis=-1), blocks.max(axis=-1)
    if scheme == "symmetric":
        qmax = np.float32(127 if bits == 8 else 7)
        scale = (np.maximum(np.abs(mn), np.abs(mx)) / qmax).astype(np.float32)
        scale[scale == 0] = np.float32(1)
        q = np.clip(np.rint(blocks / scale[..., None]), -qmax, qmax)
        zp = None
    else:
        qmax = np.float32(255 if bits == 8 else 15)
        lo, hi = np.minimum(mn, np.float32(0)), np.maximum(mx, np.float32(0))
        scale = ((hi - lo) / qmax).astype(np.float32)
        scale[scale == 0] = np.float32(1)
        zpf = np.clip(np.rint(-lo / scale), np.float32(0), qmax)
        q = np.clip(np.rint(blocks / scale[..., None]) + zpf[..., None], np.float32(0), qmax)
        zp = zpf.astype(np.int32)
    q = unblock(q).astype(np.int32)
    if granularity == "tensor":
        scale, zp = scale.reshape(()), None if zp is None else zp.reshape(())
    elif granularity == "channel":
        scale, zp = scale.reshape(-1), None if zp is None else zp.reshape(-1)
    if bits == 8:
        data = q.astype(np.int8 if scheme == "symmetric" else np.uint8)
    else:
        flat = (q.reshape(-1) & 0xF).astype(np.uint8)
        if flat.size % 2:
            flat = np.concatenate([flat, np.zeros(1, np.uint8)])
        data = flat[0::2] | (flat[1::2] << 4)
    return data, scale, zp, q


def ref_dequantize(q, scale, zp, w_shape, granularity, axis, group_size):
    blocks, unblock = ref_blocks(q.astype(np.int32), granularity, axis, group_size)
    s = np.asarray(scale, np.float32).reshape(blocks.shape[0], blocks.shape[1], 1)
    z = 0 if zp is None else np.asarray(zp, np.int32).reshape(s.shape)
    return unblock(((blocks - z).astype(np.float32) * s).astype(np.float32))


# (shape, axis, group sizes valid for that axis) incl. odd sizes and SIMD tails
CASES = [
    ((64, 96), 0, 32),
    ((64, 96), 1, 16),
    ((33, 65), 0, 13),
    ((33, 65), 1, 11),
    ((7, 12, 5), 1, 7),
    ((7, 12, 5), 2, 12),
    ((3, 4, 5, 6), -2, 9),
    ((129,), 0, 1),
    ((40, 259), 0, 37),
    ((3, 5, 70), 1, 30),  # long inner runs: the strided (non-transposed) walk
    ((3, 4, 65), 1, 13),
]


def make_weights(shape, seed):
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal(shape) * rng.uniform(0.01, 3)).astype(np.float32)
    if len(shape) >= 2:
        w[1] = 0.0  # a zero row/slab: scale 1.0, never NaN
        w[2] = np.abs(w[2])  # an all-positive row: asymmetric lo = 0
    # exact ties at .5 of a scale step to exercise round-half-even
    return w


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("scheme", ["symmetric", "asymmetric"])
@pytest.mark.parametrize("granularity", ["tensor", "channel", "group"])
def test_quantize_matches_reference_bit_for_bit(simd, bits, scheme, granularity):
    for seed, (shape, axis, g) in enumerate(CASES):
        w = make_weights(shape, seed)
        q = quantize(w, bits=bits, scheme=scheme, granularity=granularity, axis=axis, group_size=g)
        data, scale, zp, qvals = ref_quantize(w, bits, scheme, granularity, axis % len(shape), g)
        ctx = f"shape={shape} axis={axis} g={g} level={simd}"
        assert q.scale.dtype == np.float32 and q.scale.shape == scale.shape, ctx
        np.testing.assert_array_equal(q.scale.view(np.uint32), scale.view(np.uint32), err_msg=ctx)
        if zp is None:
            assert q.zero_point is None
        else:
            assert q.zero_point.dtype == np.int32
            np.testing.assert_array_equal(q.zero_point, zp, err_msg=ctx)
        assert q.data.dtype == data.dtype, ctx
        np.testing.assert_array_equal(q.data.reshape(-1), data.reshape(-1), err_msg=ctx)
        if bits == 4 and shape[-1] % 2 == 0:
            assert q.data.shape == shape[:-1] + (shape[-1] // 2,)
        # dequantize: bit for bit against (q - zp) * scale in fp32
        deq = q.dequantize()
        ref = ref_dequantize(qvals, scale, zp, shape, granularity, axis % len(shape), g)
        assert deq.shape == shape and deq.dtype == np.float32
        np.testing.assert_array_equal(deq.view(np.uint32), ref.view(np.uint32), err_msg=ctx)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("scheme", ["symmetric", "asymmetric"])
@pytest.mark.parametrize("granularity", ["tensor", "channel", "group"])
def test_dequantize_error_within_documented_bound(bits, scheme, granularity):
    w = make_weights((48, 256), 7)
    w[5] += 2.5  # a row far from zero: asymmetric zero point at the edge
    q = quantize(w, bits=bits, scheme=scheme, granularity=granularity, group_size=64)
    err = np.abs(q.dequantize() - w)
    blocks, unblock = ref_blocks(np.zeros_like(w), granularity, 0, 64)
    s = np.broadcast_to(np.asarray(q.scale).reshape(blocks.shape[0], blocks.shape[1], 1), blocks.shape)
    s = unblock(np.ascontiguousarray(s))
    # docs/numerics.md: |w' - w| <= scale * (1/2 + 2^-14) for both schemes
    bound = s * (0.5 + 2.0 ** -14)
    assert np.all(err <= bound)


def test_round_half_to_even_and_saturation():
    # scale = 127/127 = 1: w = k + 0.5 rounds to the even neighbour
    w = np.array([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5]], np.float32)
    q = quantize(w, bits=8, scheme="symmetric", granularity="tensor")
    assert q.scale == np.float32(1.0)
    np.testing.assert_array_equal(q.data, [[127, 0, 2, 2, 0, -2, -2, 126]])
    # 4-bit symmetric: values never reach -8 (range is -7..7); nibble = q & 0xF
    w4 = np.array([-7.0, 7.0, -3.0, 0.0, 1.0], np.float32)
    q4 = quantize(w4, bits=4, scheme="symmetric", granularity="tensor")
    assert q4.data.tolist() == [0x79, 0x0D, 0x01]  # (-7 & 15)=9 | 7<<4 ; -3&15=13 | 0 ; 1 | high nibble 0


def test_zero_tensor_gets_unit_scale():
    for scheme in ("symmetric", "asymmetric"):
        q = quantize(np.zeros((4, 8), np.float32), bits=4, scheme=scheme, granularity="group", group_size=4)
        assert np.all(q.scale == 1.0)
        assert np.all(q.dequantize() == 0.0)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_inputs_are_widened_exactly(simd, dtype):
    # leading axis (fused widen+scan+quantize per channel) and other layouts (whole-tensor widen)
    for shape, axis, g in [((32, 64), 0, 16), ((32, 64), 1, 8), ((9, 35), 0, 7), ((5, 26), 1, 5)]:
        w = make_weights(shape, 3)
        w.reshape(-1)[:3] = [6e-8, -1e-7, 3e-5]  # fp16 subnormals
        t = torch.from_numpy(w).to(getattr(torch, dtype))
        w32 = t.float().numpy()
        for bits in (8, 4):
            for gran in ("channel", "group", "tensor"):
                q = quantize(t, bits=bits, scheme="asymmetric", granularity=gran, axis=axis, group_size=g)
                assert q.dtype == dtype
                data, scale, zp, _ = ref_quantize(w32, bits, "asymmetric", gran, axis, g)
                np.testing.assert_array_equal(q.data.reshape(-1), data.reshape(-1), err_msg=f"{shape} {gran}")
                np.testing.assert_array_equal(q.scale, scale)
                np.testing.assert_array_equal(q.zero_point, zp)
        if dtype == "float16":  # numpy fp16 too
            q = quantize(w.astype(np.float16), bits=8, scheme="symmetric", granularity="channel", axis=axis)
            ref = ref_quantize(w.astype(np.float16).astype(np.float32), 8, "symmetric", "channel", axis, 0)[0]
            np.testing.assert_array_equal(q.data, ref)


def test_half_inputs_with_nan_are_rejected():
    w = make_weights((8, 16), 1)
    w[2, 3] = np.nan
    for dtype in (torch.float16, torch.bfloat16):
        for axis in (0, 1):
            with pytest.raises(ValueError, match="NaN or Inf"):
                quantize(torch.from_numpy(w).to(dtype), axis=axis)
    h = w.astype(np.float16)
    h[2, 3] = np.float16(np.inf)
    with pytest.raises(ValueError, match="NaN or Inf"):
        quantize(h)


def test_torch_dlpack_and_buffer_inputs_match_numpy():
    w = make_weights((16, 40), 5)
    ref = quantize(w, bits=4, scheme="symmetric", granularity="group", group_size=8)
    for x in (torch.from_numpy(w), torch.from_numpy(w).requires_grad_(True)):
        q = quantize(x, bits=4, scheme="symmetric", granularity="group", group_size=8)
        np.testing.assert_array_equal(q.data, ref.data)
        np.testing.assert_array_equal(q.scale, ref.scale)

    class DL:  # only __dlpack__
        def __init__(self, a):
            self.a = a

        def __dlpack__(self, **kw):
            return self.a.__dlpack__(**kw)

        def __dlpack_device__(self):
            return self.a.__dlpack_device__()

    q = quantize(DL(w), bits=4, scheme="symmetric", granularity="group", group_size=8)
    np.testing.assert_array_equal(q.data, ref.data)
    buf = array.array("f", w.reshape(-1).tolist())
    qb = quantize(buf, bits=8, scheme="symmetric", granularity="tensor")
    np.testing.assert_array_equal(qb.data, quantize(w.reshape(-1), granularity="tensor").data)


@pytest.mark.parametrize("scheme", ["symmetric", "asymmetric"])
@pytest.mark.parametrize("bits,granularity", [(8, "tensor"), (8, "channel"), (4, "group"), (4, "channel")])
def test_safetensors_round_trip(tmp_path, bits, scheme, granularity):
    w = make_weights((12, 33), 11)
    q = quantize(w, bits=bits, scheme=scheme, granularity=granularity, axis=1, group_size=3)
    p = tmp_path / "w.safetensors"
    q.save(p)
    r = QuantizedTensor.load(p)
    for f in ("bits", "scheme", "granularity", "axis", "group_size", "shape", "dtype"):
        assert getattr(r, f) == getattr(q, f), f
    np.testing.assert_array_equal(r.data, q.data)
    np.testing.assert_array_equal(r.scale, q.scale)
    assert (r.zero_point is None) == (q.zero_point is None)
    if q.zero_point is not None:
        np.testing.assert_array_equal(r.zero_point, q.zero_point)
    np.testing.assert_array_equal(r.dequantize(), dequantize(q))
    assert [x.name for x in tmp_path.iterdir()] == ["w.safetensors"]  # no temporary left behind


def test_load_rejects_foreign_and_corrupt_files(tmp_path):
    from safetensors.numpy import save_file
    p = tmp_path / "other.safetensors"
    save_file({"data": np.zeros(4, np.int8)}, str(p), metadata={"format": "pt"})
    with pytest.raises(aimass.CorruptDataError, match="format"):
        QuantizedTensor.load(p)
    q = quantize(make_weights((8, 8), 1), bits=8)
    meta = q.metadata()
    meta["shape"] = "8,9"
    save_file({"data": q.data, "scale": q.scale}, str(p), metadata=meta)
    with pytest.raises(aimass.CorruptDataError, match="inconsistent"):
        QuantizedTensor.load(p)
    p.write_bytes(b"\x00garbage")
    with pytest.raises(aimass.CorruptDataError):
        QuantizedTensor.load(p)


# ----------------------------------------------------------------- bad input
def test_bad_inputs_raise_clear_errors():
    w = make_weights((8, 16), 2)
    with pytest.raises(TypeError, match="w must be float32"):
        quantize(w.astype(np.float64))
    with pytest.raises(TypeError, match="w must be float32"):
        quantize(np.zeros((4, 4), np.int32))
    with pytest.raises(TypeError, match="w must be"):
        quantize("not an array")
    with pytest.raises(ValueError, match="C-contiguous"):
        quantize(w.T)
    with pytest.raises(ValueError, match="C-contiguous"):
        quantize(torch.from_numpy(w).t())
    for bad in (np.nan, np.inf, -np.inf):
        x = w.copy()
        x[3, 5] = bad
        for gran in ("tensor", "channel", "group"):
            with pytest.raises(ValueError, match="NaN or Inf"):
                quantize(x, granularity=gran, group_size=8)
    with pytest.raises(ValueError, match="bits must be 8 or 4"):
        quantize(w, bits=2)
    with pytest.raises(TypeError, match="bits must be an int"):
        quantize(w, bits=8.0)
    with pytest.raises(ValueError, match="group_size=5 must divide"):
        quantize(w, granularity="group", group_size=5)
    with pytest.raises(ValueError, match="group_size=0"):
        quantize(w, granularity="group", group_size=0)
    with pytest.raises(ValueError, match="axis=2 is out of range"):
        quantize(w, granularity="channel", axis=2)
    with pytest.raises(ValueError, match="axis=-3"):
        quantize(w, granularity="channel", axis=-3)
    with pytest.raises(ValueError, match="no elements"):
        quantize(np.zeros((0, 4), np.float32))
    with pytest.raises(ValueError, match="rank >= 1"):
        quantize(np.float32(3.0) * np.ones((), np.float32), granularity="channel")
    with pytest.raises(ValueError, match="scheme must be one of"):
        quantize(w, scheme="sym")
    with pytest.raises(ValueError, match="granularity must be one of"):
        quantize(w, granularity="row")
    with pytest.raises(ValueError, match="overflows float32"):
        quantize(np.array([-3e38, 3e38], np.float32), scheme="asymmetric", granularity="tensor")
    with pytest.raises(TypeError, match="QuantizedTensor"):
        dequantize(w)


def test_scalar_and_tensor_granularity_on_rank0():
    q = quantize(np.array(2.5, np.float32), bits=4, granularity="tensor")
    assert q.data.shape == (1,) and q.dequantize().shape == ()
    assert q.dequantize() == np.float32(2.5)


def test_subnormal_max_never_gives_zero_scale():
    w = np.array([1e-45, 0.0, -1e-45], np.float32)  # max|w| / 127 underflows to 0
    q = quantize(w, bits=8, scheme="symmetric", granularity="tensor")
    assert q.scale > 0 and np.all(np.isfinite(q.dequantize()))
