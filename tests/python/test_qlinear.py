"""Fused quantized linear: every kernel at every SIMD level against a numpy
reference of dequant(W) @ x, plus bad inputs. The quantizer here is test-local
(numpy, per docs/quant_format.md) so the kernels are checked independently."""
import numpy as np
import pytest

import aimass
from aimass import compress
import importlib

qlin = importlib.import_module("aimass.compress.qlinear")  # the module; compress.linear is the function

BEST = aimass.cpu_features()["simd"]
LEVELS = ["scalar", "avx2", "avx512"][: ["scalar", "avx2", "avx512"].index(BEST) + 1]
MS = [1, 3, 8, 64, 257]


class QT:
    """Duck-typed QuantizedTensor (fields of docs/quant_format.md)."""

    def __init__(self, data, scale, bits, group_size, shape, granularity, scheme="symmetric", axis=0,
                 zero_point=None):
        self.data, self.scale, self.zero_point, self.bits = data, scale, zero_point, bits
        self.group_size, self.shape, self.scheme, self.granularity, self.axis = group_size, shape, scheme, granularity, axis


def ref_quantize(w, bits, group_size):
    n, k = w.shape
    qmax = np.float32(127 if bits == 8 else 7)
    g = group_size or k
    blocks = w.reshape(n, k // g, g)
    scale = (np.abs(blocks).max(axis=2) / qmax).astype(np.float32)
    scale[scale == 0] = 1
    q = np.clip(np.rint(blocks / scale[..., None]), -qmax, qmax).astype(np.int8).reshape(n, k)
    deq = (q.reshape(n, k // g, g).astype(np.float32) * scale[..., None]).reshape(n, k)
    if bits == 4:
        flat = q.reshape(-1)
        if flat.size % 2:
            flat = np.append(flat, np.int8(0))
        nib = (flat & 0xF).astype(np.uint8)
        data = nib[0::2] | (nib[1::2] << 4)
    else:
        data = q
    gran = "group" if group_size else "channel"
    return QT(data, scale if group_size else scale.reshape(n), bits, group_size or None, (n, k), gran), q, scale, deq


# (bits, N, K, group_size): per-channel, grouped, K not a multiple of 64, odd sizes
CONFIGS = [(8, 67, 320, 0), (8, 45, 200, 0), (8, 32, 256, 64), (8, 19, 96, 16),
           (4, 45, 384, 128), (4, 33, 160, 32), (4, 21, 99, 0), (4, 40, 256, 64)]


@pytest.fixture
def level():
    yield
    aimass.set_simd_level(BEST)


def make(cfg, seed=0):
    bits, n, k, g = cfg
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, k)).astype(np.float32)
    qt, q, scale, deq = ref_quantize(w, bits, g)
    return rng, w, qt, q, scale, deq


def dynamic_reference(x, q, scale, group_size):
    """Exactly what the dynamic int8 path computes, in numpy."""
    amax = np.abs(x).max(axis=1)
    inv = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    qx = np.clip(np.rint(x * inv[:, None]), -127, 127).astype(np.int64)
    sx = (amax / np.float32(127)).astype(np.float32)
    n, k = q.shape
    g = group_size or k
    dots = np.einsum("mgk,ngk->mng", qx.reshape(-1, k // g, g), q.astype(np.int64).reshape(n, k // g, g))
    return (dots.astype(np.float64) * scale.reshape(n, -1)[None]).sum(-1) * sx[:, None]


def int16_reference(x, q, scale):
    """What the int16-activation weight-only path computes (int8 per-channel weights), in
    numpy, through the same two byte planes the VNNI kernel uses."""
    x = np.asarray(x, np.float32)
    amax = np.abs(x).max(axis=1)
    inv = np.where(amax > 0, np.float32(32767) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    qx = np.clip(np.rint(x * inv[:, None]), -32767, 32767).astype(np.int64)
    sx = (amax / np.float32(32767)).astype(np.float32)
    w = q.astype(np.int64)
    lo, hi = qx & 0xFF, (qx >> 8) + 128  # u8 planes: q = 256 * (hi - 128) + lo
    assert lo.min() >= 0 and lo.max() <= 255 and hi.min() >= 0 and hi.max() <= 255
    acc_lo, acc_hi = lo @ w.T, hi @ w.T  # the kernel's int32 accumulators (summed over lanes)
    assert np.abs(acc_lo).max(initial=0) < 2**31 and np.abs(acc_hi).max(initial=0) < 2**31
    dot = 256 * (acc_hi - 128 * w.sum(axis=1)[None]) + acc_lo
    np.testing.assert_array_equal(dot, qx @ w.T)
    ys = (sx[:, None] * scale.reshape(-1)[None, :]).astype(np.float32)
    return (dot.astype(np.float64) * ys.astype(np.float64)).astype(np.float32)


def int16_bound(x, deq):
    """Documented bound of the int16 activation rounding: |dx| <= max|x_row| / 65534 per
    element, so |dy[m, n]| <= max|x_m| / 65534 * sum_k |deq[n, k]| (plus fp32 rounding)."""
    amax = np.abs(x).max(axis=1).astype(np.float64)
    return (amax[:, None] / 65534.0) * np.abs(deq.astype(np.float64)).sum(axis=1)[None, :] * (1 + 1e-4)


@pytest.mark.parametrize("lvl", LEVELS)
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"int{c[0]}_N{c[1]}_K{c[2]}_G{c[3]}")
def test_kernels_match_reference(lvl, cfg, level):
    aimass.set_simd_level(lvl)
    rng, w, qt, q, scale, deq = make(cfg)
    bits, n, k, g = cfg
    bias = rng.standard_normal(n).astype(np.float32)
    dyn_ok = g == 0 or g % 64 == 0
    for m in MS:
        x = rng.standard_normal((m, k)).astype(np.float32)
        ref = x.astype(np.float64) @ deq.T.astype(np.float64)
        tol = 1e-5 * np.abs(ref).max()
        for kernel in ("weight_only", "dequant_sgemm", "auto"):
            for b in (None, bias):
                y = compress.linear(x, qt, b, kernel=kernel, activation_precision="fp32")
                assert y.dtype == np.float32 and y.shape == (m, n)
                r = ref + (b if b is not None else 0)
                if kernel == "auto" and qt_kernel(qt, m) == "dynamic_int8":
                    assert np.abs(y - r).max() <= 2e-2 * np.abs(ref).max()
                else:
                    np.testing.assert_allclose(y, r, rtol=0, atol=tol)
        # default activation_precision="int16": int8 per-channel weights round x to 16 bits
        y16 = compress.linear(x, qt, bias, kernel="weight_only")
        if bits == 4 and g % 128 == 0:  # int4 int16 path: test_qlinear_int4_a16.py
            assert qlin.packed(qt).plan(m, "weight_only") == ("weight_only", "int16")
            assert (np.abs(y16.astype(np.float64) - bias - ref) <= int16_bound(x, deq) + tol).all()
        elif bits == 8 and g == 0:
            assert qlin.packed(qt).plan(m, "weight_only") == ("weight_only", "int16")
            np.testing.assert_array_equal(y16, int16_reference(x, q, scale) + bias)
            assert (np.abs(y16.astype(np.float64) - bias - ref) <= int16_bound(x, deq) + tol).all()
        else:
            assert qlin.packed(qt).plan(m, "weight_only") == ("weight_only", "fp32")
            np.testing.assert_allclose(y16, ref + bias, rtol=0, atol=tol)
        if dyn_ok:
            y = compress.linear(x, qt, bias, kernel="dynamic_int8")
            dref = dynamic_reference(x, q, scale, g) + bias
            np.testing.assert_allclose(y, dref, rtol=0, atol=2e-5 * np.abs(dref).max())
            # documented bound of the dynamic path's extra error vs the dequantized fp32 reference
            assert np.abs(y - bias - ref).max() <= 2e-2 * np.abs(ref).max()
        else:
            with pytest.raises(ValueError, match="group_size"):
                compress.linear(x, qt, kernel="dynamic_int8")


def qt_kernel(qt, m):
    return qlin.packed(qt).kernel_for(m)


@pytest.mark.parametrize("cfg", [CONFIGS[0], CONFIGS[4], CONFIGS[3]], ids=str)
def test_simd_levels_agree_with_scalar(cfg, level):
    rng, w, qt, q, scale, deq = make(cfg, seed=3)
    x = rng.standard_normal((9, cfg[2])).astype(np.float32)
    out, act = {}, {}
    for lvl in LEVELS:
        aimass.set_simd_level(lvl)
        act[lvl] = qlin.packed(qt).plan(9, "weight_only")[1]
        out[lvl] = {kn: compress.linear(x, qt, kernel=kn, activation_precision="fp32")
                    for kn in ("weight_only", "dequant_sgemm")}
        out[lvl]["weight_only_int16"] = compress.linear(x, qt, kernel="weight_only")
        if cfg[3] == 0 or cfg[3] % 64 == 0:
            out[lvl]["dynamic_int8"] = compress.linear(x, qt, kernel="dynamic_int8")
    for lvl in LEVELS[1:]:
        for kn, y in out[lvl].items():
            if kn == "weight_only_int16" and act[lvl] != act["scalar"]:
                continue  # a level without the weights' int16 kernel runs fp32 activations
            s = out["scalar"][kn]
            np.testing.assert_allclose(y, s, rtol=0, atol=1e-5 * np.abs(s).max(), err_msg=f"{lvl} {kn}")
        if act[lvl] == "int16":
            # exact integer dot products: every level gives the same bits
            np.testing.assert_array_equal(out[lvl]["weight_only_int16"], out["scalar"]["weight_only_int16"])


def test_auto_thresholds_and_threads_deterministic(level):
    rng, w, qt, q, scale, deq = make((8, 64, 256, 0))
    p = qlin.packed(qt)
    assert p is qlin.packed(qt)  # prepacked once, cached on the weight object
    if BEST != "scalar":
        assert p.kernel_for(1) == "weight_only" and p.kernel_for(256) == "dynamic_int8"
    aimass.set_simd_level("scalar")
    assert p.kernel_for(1) == "weight_only" and p.kernel_for(256) == "dequant_sgemm"
    aimass.set_simd_level(BEST)
    x = rng.standard_normal((33, 256)).astype(np.float32)
    n0 = aimass.num_threads()
    try:
        aimass.set_num_threads(1)
        a = [compress.linear(x, qt, kernel=k) for k in ("weight_only", "dynamic_int8")]
        aimass.set_num_threads(2)
        b = [compress.linear(x, qt, kernel=k) for k in ("weight_only", "dynamic_int8")]
    finally:
        aimass.set_num_threads(n0)
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)


def test_torch_inputs_and_leading_dims():
    torch = pytest.importorskip("torch")
    rng, w, qt, q, scale, deq = make((4, 24, 128, 64))
    x = torch.randn(2, 3, 128)
    y = compress.linear(x, qt, torch.ones(24), kernel="weight_only")
    assert isinstance(y, torch.Tensor) and y.dtype == torch.float32 and y.shape == (2, 3, 24)
    ref = x.reshape(-1, 128).double().numpy() @ deq.T.astype(np.float64) + 1
    np.testing.assert_allclose(y.reshape(-1, 24).numpy(), ref, atol=1e-4)
    for dt in (torch.float16, torch.bfloat16):
        xh = x.to(dt)
        yh = compress.linear(xh, qt, kernel="weight_only")
        assert yh.dtype == torch.float32
        ref = xh.float().reshape(-1, 128).double().numpy() @ deq.T.astype(np.float64)
        np.testing.assert_allclose(yh.reshape(-1, 24).numpy(), ref, atol=1e-4)
    xg = torch.randn(4, 128, requires_grad=True)
    assert compress.linear(xg, qt).shape == (4, 24)


def test_pack_linear_raw_arrays_and_1d_x():
    rng, w, qt, q, scale, deq = make((8, 16, 64, 0))
    p = qlin.pack_linear(qt.data, qt.scale, bits=8, shape=(16, 64))
    assert repr(p).startswith("PackedLinear(int8") and p.nbytes >= 16 * 64
    x = rng.standard_normal(64).astype(np.float32)
    np.testing.assert_allclose(p(x, activation_precision="fp32"), deq @ x, atol=1e-4)
    assert (np.abs(p(x) - deq @ x) <= int16_bound(x[None], deq)[0] + 1e-5).all()
    np.testing.assert_array_equal(qlin.dequantize_weight(p), deq)


def test_zero_rows_nan_and_empty_batch():
    rng, w, qt, q, scale, deq = make((8, 16, 64, 0))
    x = np.zeros((3, 64), np.float32)
    x[1] = rng.standard_normal(64)
    x[2, 5] = np.nan
    for kernel in ("weight_only", "dynamic_int8", "dequant_sgemm"):
        for act in ("int16", "fp32"):
            y = compress.linear(x, qt, kernel=kernel, activation_precision=act)
            assert (y[0] == 0).all() and np.isfinite(y[1]).all() and np.isnan(y[2]).all(), (kernel, act)
    x[2, 5] = np.inf
    assert np.isnan(compress.linear(x, qt, kernel="weight_only")[2]).all()
    assert compress.linear(np.zeros((0, 64), np.float32), qt).shape == (0, 16)


def test_bad_inputs():
    rng, w, qt, q, scale, deq = make((8, 16, 64, 0))
    x = rng.standard_normal((4, 64)).astype(np.float32)
    with pytest.raises(ValueError, match="in_features=64"):
        compress.linear(x[:, :63].copy(), qt)
    with pytest.raises(TypeError, match="float32"):
        compress.linear(x.astype(np.float64), qt)
    with pytest.raises(TypeError, match="float32"):
        compress.linear(x.astype(np.int32), qt)
    with pytest.raises(ValueError, match="contiguous"):
        compress.linear(np.asfortranarray(x), qt)
    with pytest.raises(ValueError, match="bias must have shape"):
        compress.linear(x, qt, np.ones(15, np.float32))
    with pytest.raises(ValueError, match="kernel"):
        compress.linear(x, qt, kernel="fast")
    with pytest.raises(ValueError, match="activation_precision"):
        compress.linear(x, qt, activation_precision="int8")
    with pytest.raises(ValueError, match="activation_precision"):
        qlin.packed(qt).plan(1, activation_precision="bf16")
    with pytest.raises(ValueError, match="activation_precision"):
        aimass._C.qlinear_linear(qlin.packed(qt)._handle, x, None, "auto", "int4")
    with pytest.raises(ValueError, match="symmetric"):
        compress.linear(x, QT(qt.data, qt.scale, 8, None, (16, 64), "channel", scheme="asymmetric",
                              zero_point=np.zeros(16, np.int32)))
    with pytest.raises(ValueError, match="axis"):
        compress.linear(x, QT(qt.data, qt.scale, 8, None, (16, 64), "channel", axis=1))
    with pytest.raises(ValueError, match="bits"):
        compress.linear(x, QT(qt.data, qt.scale, 3, None, (16, 64), "channel"))
    with pytest.raises(ValueError, match="2-D"):
        compress.linear(x, QT(qt.data, qt.scale, 8, None, (2, 8, 64), "channel"))
    with pytest.raises(ValueError, match="granularity"):
        compress.linear(x, QT(qt.data, qt.scale, 8, None, (16, 64), "block"))
    with pytest.raises(TypeError, match="lacks"):
        compress.linear(x, object())
    bad = q.copy()
    bad[3, 7] = -128
    with pytest.raises(ValueError, match="-128"):
        qlin.pack_linear(bad, scale.reshape(16), bits=8, shape=(16, 64))
    with pytest.raises(ValueError, match="scale has"):
        qlin.pack_linear(q, np.ones(15, np.float32), bits=8, shape=(16, 64))
    with pytest.raises(ValueError, match="finite and > 0"):
        qlin.pack_linear(q, np.zeros(16, np.float32), bits=8, shape=(16, 64))
    with pytest.raises(TypeError, match="int8"):
        qlin.pack_linear(q.astype(np.int16), scale.reshape(16), bits=8, shape=(16, 64))
    with pytest.raises(TypeError, match="float32"):
        qlin.pack_linear(q, scale.reshape(16).astype(np.float64), bits=8, shape=(16, 64))
    with pytest.raises(ValueError, match="divide"):
        qlin.pack_linear(q, np.ones(16 * 3, np.float32), bits=8, shape=(16, 64), group_size=24)
    with pytest.raises(ValueError, match="bytes"):
        qlin.pack_linear(np.zeros(100, np.uint8), np.ones(16, np.float32), bits=4, shape=(16, 64))
    nib = np.full(16 * 32, 0x88, np.uint8)  # nibble -8 is outside symmetric int4
    with pytest.raises(ValueError, match="-8"):
        qlin.pack_linear(nib, np.ones(16, np.float32), bits=4, shape=(16, 64))


def test_quantize_weight_matches_contract():
    rng = np.random.default_rng(5)
    w = rng.standard_normal((12, 64)).astype(np.float32)
    w[3] = 0
    for bits, g in ((8, None), (4, 32), (8, 16)):
        mine = qlin.quantize_weight(w, bits=bits, group_size=g)
        ref, q, scale, deq = ref_quantize(w, bits, g or 0)
        np.testing.assert_array_equal(np.asarray(mine.data).reshape(-1), np.asarray(ref.data).reshape(-1))
        np.testing.assert_array_equal(mine.scale.reshape(-1), scale.reshape(-1))
        np.testing.assert_array_equal(mine.dequantize(), deq)
    with pytest.raises(ValueError, match="NaN"):
        qlin.quantize_weight(np.full((2, 4), np.nan, np.float32))


def test_quantized_tensor_caches_its_packed_weight():
    from aimass import compress
    w = np.random.default_rng(3).standard_normal((64, 256)).astype(np.float32)
    for q in (compress.quantize(w, bits=8), compress.quantize(w, bits=4, granularity="group", group_size=128)):
        assert qlin.packed(q) is qlin.packed(q)  # prepacked once, not per call


@pytest.mark.parametrize("lvl", LEVELS)
def test_odd_shapes_every_tile_and_tail(lvl, level):
    """Tails in M, N and K for the tiled kernels (VNNI blocks: 6-row x 64-column dynamic
    tiles and 1-3-row x 64-column int16 weight-only tiles; AVX2 int16 weight-only: 2-row and
    1-row x 4-weight-row tiles), at 1 and 2 threads."""
    aimass.set_simd_level(lvl)
    n0 = aimass.num_threads()
    try:
        for threads in (1, 2):
            aimass.set_num_threads(threads)
            for i, (n, k) in enumerate([(1, 1), (15, 63), (17, 129), (63, 64), (65, 300), (130, 200)]):
                rng, w, qt, q, scale, deq = make((8, n, k, 0), seed=10 + i)
                for m in (1, 2, 3, 4, 5, 6, 7, 13):
                    x = rng.standard_normal((m, k)).astype(np.float32)
                    ref = x.astype(np.float64) @ deq.T.astype(np.float64)
                    y = compress.linear(x, qt, kernel="dynamic_int8")
                    dref = dynamic_reference(x, q, scale, 0)
                    np.testing.assert_allclose(y, dref, rtol=0, atol=2e-5 * np.abs(dref).max() + 1e-30,
                                               err_msg=f"dynamic N={n} K={k} M={m}")
                    y16 = compress.linear(x, qt, kernel="weight_only")
                    np.testing.assert_array_equal(y16, int16_reference(x, q, scale), err_msg=f"N={n} K={k} M={m}")
                    assert (np.abs(y16 - ref) <= int16_bound(x, deq) + 1e-5 * np.abs(ref).max()).all()
    finally:
        aimass.set_num_threads(n0)


def test_plan_reports_the_activation_format():
    rng, w, qt, q, scale, deq = make((8, 64, 256, 0))
    p = qlin.packed(qt)
    assert p.plan(1, "weight_only", "fp32") == ("weight_only", "fp32")
    assert p.plan(1, "dynamic_int8") == ("dynamic_int8", "int8")
    assert p.plan(1, "dequant_sgemm") == ("dequant_sgemm", "fp32")
    if BEST != "scalar":
        assert p.plan(1) == ("weight_only", "int16") and p.plan(256)[1] == "int8"
    p4 = qlin.packed(make((4, 64, 256, 64))[2])
    assert p4.plan(1, "weight_only") == ("weight_only", "fp32")  # int4 groups of 64: no int16 path


def test_int16_activations_outlier_rows():
    """A row with one large outlier: the int16 rounding error scales with max|x_row| and
    stays within the documented bound; the fp32 path is exact."""
    rng, w, qt, q, scale, deq = make((8, 48, 512, 0), seed=7)
    x = rng.standard_normal((3, 512)).astype(np.float32)
    x[1, 17] = 200.0
    x[2] *= 1e-30  # tiny but nonzero: the per-row scale adapts
    ref = x.astype(np.float64) @ deq.T.astype(np.float64)
    y16 = compress.linear(x, qt, kernel="weight_only")
    y32 = compress.linear(x, qt, kernel="weight_only", activation_precision="fp32")
    np.testing.assert_array_equal(y16, int16_reference(x, q, scale))
    assert (np.abs(y16 - ref) <= int16_bound(x, deq) + 1e-5 * np.abs(ref).max(axis=1, keepdims=True)).all()
    np.testing.assert_allclose(y32, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max(axis=1, keepdims=True).max())


@pytest.mark.skipif(BEST != "avx512", reason="needs AVX-512 VNNI")
def test_dynamic_panels_built_when_first_call_ran_at_a_capped_level(level):
    rng, w, qt, q, scale, deq = make((8, 40, 192, 0), seed=11)
    p = qlin.packed(qt)
    x = rng.standard_normal((9, 192)).astype(np.float32)
    before = p.nbytes
    aimass.set_simd_level("avx2")
    a = compress.linear(x, p, kernel="dynamic_int8")
    aimass.set_simd_level("avx512")
    b = compress.linear(x, p, kernel="dynamic_int8")
    dref = dynamic_reference(x, q, scale, 0)
    for y in (a, b):
        np.testing.assert_allclose(y, dref, rtol=0, atol=2e-5 * np.abs(dref).max())
    # int8 per-channel weights on a VNNI CPU are packed as VNNI blocks only (N rounded to 64,
    # x Kp, + N fp32 scales and int32 row sums); the AVX2 call rebuilt the int8 rows once, the
    # dynamic path added its column sums and corrections
    assert before == 64 * 256 + 40 * 8
    assert p.nbytes == before + 40 * 256 + 40 * 8


@pytest.mark.skipif(BEST != "avx512", reason="needs AVX-512 VNNI")
def test_int8_rows_rebuilt_from_vnni_blocks_for_every_kernel(level):
    """Kernels that read int8 rows (fp32 activations, dequant_sgemm, capped levels) get rows
    rebuilt from the VNNI blocks, bit for bit the packed weights; K not a multiple of 4."""
    rng, w, qt, q, scale, deq = make((8, 70, 131, 0), seed=13)
    x = rng.standard_normal((3, 131)).astype(np.float32)
    ref = x.astype(np.float64) @ deq.T.astype(np.float64)
    p = qlin.packed(qt)
    assert p.nbytes == 128 * 256 + 70 * 8  # blocks, scales and row sums only so far
    y32 = compress.linear(x, p, kernel="weight_only", activation_precision="fp32")
    np.testing.assert_allclose(y32, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    ys = compress.linear(x, p, kernel="dequant_sgemm")
    np.testing.assert_allclose(ys, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    y16 = compress.linear(x, p, kernel="weight_only")
    np.testing.assert_array_equal(y16, int16_reference(x, q, scale))
    aimass.set_simd_level("avx2")
    np.testing.assert_array_equal(compress.linear(x, p, kernel="weight_only"), y16)
    assert p.nbytes == 128 * 256 + 70 * 8 + 70 * 256  # the rows, once


@pytest.mark.skipif(BEST != "avx512", reason="needs AVX-512 VNNI")
def test_vnni_blocks_split_over_threads_match_the_reference(level):
    """Column chunks of the VNNI block kernels fall on 64-column boundaries: a layer wide
    enough to be split at batch 1 gives the same bits at 1 and 2 threads."""
    n0 = aimass.num_threads()
    try:
        rng, w, qt, q, scale, deq = make((8, 1100, 100, 0), seed=12)
        for m in (1, 3, 8):
            x = rng.standard_normal((m, 100)).astype(np.float32)
            out = {}
            for threads in (1, 2):
                aimass.set_num_threads(threads)
                out[threads] = (compress.linear(x, qt, kernel="weight_only"), compress.linear(x, qt, kernel="dynamic_int8"))
            np.testing.assert_array_equal(out[2][0], int16_reference(x, q, scale))
            np.testing.assert_array_equal(out[1][0], out[2][0])
            np.testing.assert_array_equal(out[1][1], out[2][1])
    finally:
        aimass.set_num_threads(n0)


def test_int16_path_limits_to_k_65536():
    """Lane sums of the VNNI planes stay below 2^31 only while Kp <= 65536: longer rows
    run the fp32-activation kernel (exact)."""
    for k, want in ((65536, "int16"), (65537, "fp32")):
        rng, w, qt, q, scale, deq = make((8, 3, k, 0), seed=k)
        p = qlin.packed(qt)
        assert p.plan(1, "weight_only") == ("weight_only", want)
        x = rng.standard_normal((2, k)).astype(np.float32)
        y = compress.linear(x, p, kernel="weight_only")
        ref = x.astype(np.float64) @ deq.T.astype(np.float64)
        if want == "int16":
            np.testing.assert_array_equal(y, int16_reference(x, q, scale))
        np.testing.assert_allclose(y, ref, rtol=0, atol=int16_bound(x, deq).max() + 1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("n,m,k", [(200, 700, 256), (256, 1024, 256), (64, 193, 256), (192, 300, 4096),
                                   (256, 128, 256), (256, 128, 1024), (256, 150, 256), (128, 97, 512)])
def test_dynamic_rows_split_over_threads(n, m, k, level):
    # few 64-column blocks and many rows: the dynamic int8 GEMM splits the rows over the threads
    # too (qlinear.cc run_dynamic: by rows only while the weight fits in L2, else by both); every
    # thread count gives the same bits, equal to the reference
    rng, w, qt, q, scale, deq = make((8, n, k, 0), seed=4)
    x = rng.standard_normal((m, k)).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    n0 = aimass.num_threads()
    try:
        outs = []
        for t in (1, 2, 3):
            aimass.set_num_threads(t)
            outs.append(compress.linear(x, qt, bias, kernel="dynamic_int8"))
    finally:
        aimass.set_num_threads(n0)
    for o in outs[1:]:
        np.testing.assert_array_equal(o, outs[0])
    ref = dynamic_reference(x, q, scale, 0) + bias
    np.testing.assert_allclose(outs[0], ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("m,k", [(128, 256), (16, 2048), (150, 1024)])
def test_dynamic_quantization_in_the_gemm_job_keeps_nonfinite_rows_nan(m, k, level):
    # the activation rows are quantized in blocks claimed by the GEMM's own chunks (qlinear.cc
    # run_dynamic); a NaN or inf row in any block still gives an all-NaN output row, at every
    # thread count, and the other rows keep the same bits
    rng, w, qt, q, scale, deq = make((8, 256, k, 0), seed=5)
    x = rng.standard_normal((m, k)).astype(np.float32)
    bad = sorted({0, m // 3, m - 1})
    x[bad[0], 3] = np.nan
    x[bad[1], k - 1] = np.inf
    x[bad[2], k // 2] = -np.inf
    n0 = aimass.num_threads()
    try:
        outs = []
        for t in (1, 2, 3):
            aimass.set_num_threads(t)
            outs.append(compress.linear(x, qt, kernel="dynamic_int8"))
    finally:
        aimass.set_num_threads(n0)
    good = np.setdiff1d(np.arange(m), bad)
    for o in outs:
        assert np.isnan(o[bad]).all()
        np.testing.assert_array_equal(o[good], outs[0][good])
    ref = dynamic_reference(x[good], q, scale, 0)
    np.testing.assert_allclose(outs[0][good], ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("pos", [0, 17, 31, 40, 63, 64, 99])
def test_dynamic_nonfinite_anywhere_in_the_row(pos, level):
    # the row scan runs two chains of 32 values and a masked tail (K = 100): NaN / inf in any
    # lane of any of them makes the row NaN; the other rows equal the reference
    rng, w, qt, q, scale, deq = make((8, 24, 100, 0), seed=5)
    x = rng.standard_normal((3, 100)).astype(np.float32)
    for bad in (np.nan, np.inf, -np.inf):
        xb = x.copy()
        xb[1, pos] = bad
        y = compress.linear(xb, qt, kernel="dynamic_int8")
        assert np.isnan(y[1]).all() and np.isfinite(y[[0, 2]]).all(), (pos, bad)
        ref = dynamic_reference(x[[0, 2]], q, scale, 0)
        np.testing.assert_allclose(y[[0, 2]], ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
