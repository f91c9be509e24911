"""int4 weight-only with int16 activations (activation_precision="int16", the default for
int4 weights grouped in multiples of 128 or per-channel): exact integer group dots, the
scalar reference bit for bit at every level that has the kernel, and the documented
error bound against the fp32 dequantized reference."""
import importlib

import numpy as np
import pytest

import aimass
from aimass import compress

qlin = importlib.import_module("aimass.compress.qlinear")

BEST = aimass.cpu_features()["simd"]
LEVELS = ["scalar", "avx2", "avx512"][: ["scalar", "avx2", "avx512"].index(BEST) + 1]
# levels with an int4 int16-activation kernel (all of them)
A16_LEVELS = list(LEVELS)


@pytest.fixture
def level():
    yield
    aimass.set_simd_level(BEST)


def pack_int4(q, scale, group_size):
    """Canonical int4 layout (docs/quant_format.md): element 2j in the low nibble of byte j."""
    n, k = q.shape
    flat = q.reshape(-1)
    if flat.size % 2:
        flat = np.append(flat, np.int8(0))
    nib = (flat & 0xF).astype(np.uint8)
    return qlin.pack_linear(nib[0::2] | (nib[1::2] << 4), scale, bits=4, shape=(n, k), group_size=group_size)


def make(n, k, g, seed, pow2_scales=False):
    rng = np.random.default_rng(seed)
    q = rng.integers(-7, 8, (n, k)).astype(np.int8)
    ng = k // g if g else 1
    if pow2_scales:
        scale = (2.0 ** -rng.integers(1, 4, (n, ng))).astype(np.float32)
    else:
        scale = (rng.random((n, ng)) * 0.05 + 1e-3).astype(np.float32)
    deq = q.astype(np.float64) * np.repeat(scale.astype(np.float64), g or k, axis=1)
    p = pack_int4(q, scale if g else scale.reshape(n), g)
    return rng, q, scale, deq, p


def int16_bound(x, deq):
    """|dx| <= max|x_row| / 65534 per element -> |dy| <= max|x_m| / 65534 * sum_k |deq[n, k]|."""
    amax = np.abs(x).max(axis=1).astype(np.float64)
    return (amax[:, None] / 65534.0) * np.abs(deq).sum(axis=1)[None, :] * (1 + 1e-4)


@pytest.mark.parametrize("lvl", LEVELS)
@pytest.mark.parametrize("g", [128, 256, 0])
def test_integer_group_dots_are_exact(lvl, g, level):
    """x rows of small integers plus one 32767 spike quantize to q == x (sx = 1); with
    power-of-two group scales every fp32 step is exact, so y must equal the numpy model
    sum_g scale[n, g] * sum_k q[k] * w[n, k] bit for bit (the int32 accumulators, the
    high/low byte planes and the nibble offset corrections all show up here)."""
    aimass.set_simd_level(lvl)
    n, k = 19, 512
    rng, q, scale, deq, p = make(n, k, g, seed=g + 1, pow2_scales=True)
    x = rng.integers(-300, 301, (5, k)).astype(np.float32)  # negative values exercise the high plane
    x[np.arange(5), rng.integers(0, k, 5)] = 32767
    x[3] = -x[3]  # spike -32767
    want = "int16" if lvl in A16_LEVELS else "fp32"
    assert p.plan(5, "weight_only") == ("weight_only", want)
    gl = g or k
    dots = np.einsum("mgk,ngk->mng", x.astype(np.int64).reshape(5, k // gl, gl),
                     q.astype(np.int64).reshape(n, k // gl, gl))
    ref = (dots * scale.astype(np.float64)[None]).sum(-1)
    assert np.abs(ref).max() < 2**20  # exactly representable at every step
    np.testing.assert_array_equal(compress.linear(x, p, kernel="weight_only"), ref.astype(np.float32))


# N tails inside a 64-column panel block, in its second half (97, 131) and across thread
# chunks (193), K padded to 128 (99, 200, 1000)
@pytest.mark.parametrize("n,k,g", [(45, 384, 128), (21, 99, 0), (40, 512, 256), (67, 1000, 0), (9, 128, 128),
                                   (131, 1000, 0), (97, 384, 128), (1, 200, 0), (193, 256, 128)])
def test_levels_bit_identical_and_within_bound(n, k, g, level):
    """Gaussian rows, tails in M (2-row tiles), N (4-row tiles) and K (padding to 128), at 1
    and 2 threads: every level with the kernel gives the scalar reference's bits, and all
    stay within the documented int16 bound of the exact result."""
    rng, q, scale, deq, p = make(n, k, g, seed=n * k)
    n0 = aimass.num_threads()
    try:
        for m in (1, 2, 3, 5, 17, 33):
            x = rng.standard_normal((m, k)).astype(np.float32)
            x[0, 3] *= 40  # an outlier feature
            ref = x.astype(np.float64) @ deq.T
            bound = int16_bound(x, deq) + 1e-6 * np.abs(ref).max()
            outs = {}
            for lvl in A16_LEVELS:
                aimass.set_simd_level(lvl)
                for threads in (1, 2):
                    aimass.set_num_threads(threads)
                    assert p.plan(m, "weight_only") == ("weight_only", "int16")
                    y = compress.linear(x, p, kernel="weight_only")
                    assert (np.abs(y - ref) <= bound).all(), (lvl, m, threads)
                    outs[(lvl, threads)] = y
            for key, y in outs.items():
                np.testing.assert_array_equal(y, outs[("scalar", 1)], err_msg=f"{key} M={m}")
            y32 = compress.linear(x, p, kernel="weight_only", activation_precision="fp32")
            np.testing.assert_allclose(y32, ref, rtol=0, atol=1e-5 * np.abs(ref).max())
    finally:
        aimass.set_num_threads(n0)


def test_plan_covers_only_whole_blocks(level):
    """Groups of 128k elements (and per-channel) take the int16 path; smaller groups and
    K > 65536 keep fp32 activations."""
    for lvl in LEVELS:
        aimass.set_simd_level(lvl)
        a16 = "int16" if lvl in A16_LEVELS else "fp32"
        assert make(4, 256, 128, 0)[4].plan(1, "weight_only") == ("weight_only", a16)
        assert make(4, 200, 0, 0)[4].plan(1, "weight_only") == ("weight_only", a16)
        assert make(4, 256, 64, 0)[4].plan(1, "weight_only") == ("weight_only", "fp32")
        assert make(4, 256, 128, 0)[4].plan(1, "weight_only", "fp32") == ("weight_only", "fp32")
    aimass.set_simd_level(BEST)
    big = make(2, 65664, 128, 0)[4]  # Kp = 65664 > 65536
    assert big.plan(1, "weight_only") == ("weight_only", "fp32")


@pytest.mark.parametrize("lvl", A16_LEVELS)
def test_zero_nan_inf_rows(lvl, level):
    aimass.set_simd_level(lvl)
    rng, q, scale, deq, p = make(12, 256, 128, seed=5)
    x = np.zeros((4, 256), np.float32)
    x[1] = rng.standard_normal(256)
    x[2, 7] = np.nan
    x[3, 200] = -np.inf
    y = compress.linear(x, p, kernel="weight_only")
    assert (y[0] == 0).all() and np.isfinite(y[1]).all() and np.isnan(y[2]).all() and np.isnan(y[3]).all()
    x[1] *= 1e-30  # tiny rows: the per-row scale adapts
    y = compress.linear(x[:2], p, kernel="weight_only")
    ref = x[:2].astype(np.float64) @ deq.T
    assert (np.abs(y - ref) <= int16_bound(x[:2], deq) + 1e-6 * np.abs(ref).max()).all()


def test_largest_rows_exact(level):
    """K = 65536 per-channel (the limit) with the extreme values: every lane sums 4096
    products of +-32767 and +-7, near the int32 range of the high-plane accumulators; the
    result must match the exact dot (to fp32 rounding) and be the same bits at every level."""
    k = 65536
    q = np.stack([np.full(k, 7), np.full(k, -7), np.random.default_rng(2).integers(-7, 8, k)]).astype(np.int8)
    scale = np.array([0.01, 0.02, 0.03], np.float32)
    p = pack_int4(q, scale, 0)
    x = np.stack([np.ones(k), -np.ones(k), np.random.default_rng(3).standard_normal(k)]).astype(np.float32)
    deq = q.astype(np.float64) * scale.astype(np.float64)[:, None]
    ref = x.astype(np.float64) @ deq.T
    outs = []
    for lvl in A16_LEVELS:
        aimass.set_simd_level(lvl)
        assert p.plan(3, "weight_only") == ("weight_only", "int16")
        outs.append(compress.linear(x, p, kernel="weight_only"))
        assert (np.abs(outs[-1] - ref) <= int16_bound(x, deq) + 1e-6 * np.abs(ref).max()).all(), lvl
    for y in outs[1:]:
        np.testing.assert_array_equal(y, outs[0])


def test_quantized_linear_module_matches_scalar_reference(level):
    """The nn.Module path (QuantizedLinear, bias, 3-D x, odd N, per-channel K = 1000 and
    group 128): at every level the bits of the scalar reference plus the bias, within the
    int16 bound of the fp32 dequantized layer."""
    torch = pytest.importorskip("torch")
    from aimass.compress import QuantizedLinear
    torch.manual_seed(0)
    for n, k, g in ((131, 1000, None), (67, 384, 128)):
        lin = torch.nn.Linear(k, n)
        qm = QuantizedLinear.from_linear(lin, bits=4, group_size=g)
        x = torch.randn(2, 3, k)
        outs = {}
        for lvl in A16_LEVELS:
            aimass.set_simd_level(lvl)
            assert qm.packed().plan(2) == ("weight_only", "int16")
            with torch.no_grad():
                outs[lvl] = qm(x[:, :1]).numpy()  # 2 rows: the weight_only int16 path at every level
        for lvl, y in outs.items():
            np.testing.assert_array_equal(y, outs["scalar"], err_msg=lvl)
        deq = compress.dequantize_weight(qm.packed()).astype(np.float64)
        x2 = x[:, :1].reshape(2, k).numpy()
        ref = x2.astype(np.float64) @ deq.T + lin.bias.detach().numpy()
        bound = int16_bound(x2, deq) + 1e-5 * np.abs(ref).max()
        assert (np.abs(outs["scalar"].reshape(2, n) - ref) <= bound).all()


@pytest.mark.skipif(BEST == "scalar", reason="the panels are built where the CPU has AVX2")
def test_panels_only_until_a_block_kernel_runs(level):
    """int4 weights grouped by 128k (or per-channel) are kept only as 64-column panels (N
    rounded up to 64; per 128-chunk 4096 bytes of nibbles + 64 fp32 scales) beside the
    N x ng scales; the first call of a kernel that reads the nibble blocks (fp32
    activations, dynamic_int8, the scalar level) rebuilds them once (N x Kp / 2 bytes),
    and every result is the same before and after."""
    n, k = 70, 256
    rng, q, scale, deq, p = make(n, k, 128, seed=9)
    assert p.nbytes == 2 * (k // 128) * (4096 + 256) + n * 2 * 4
    before = p.nbytes
    x = rng.standard_normal((3, k)).astype(np.float32)
    y16 = compress.linear(x, p, kernel="weight_only")
    assert p.nbytes == before  # the int16 path reads the panels only
    y32 = compress.linear(x, p, kernel="weight_only", activation_precision="fp32")
    assert p.nbytes == before + n * k // 2
    ref = x.astype(np.float64) @ deq.T
    np.testing.assert_allclose(y32, ref, rtol=0, atol=1e-5 * np.abs(ref).max())
    np.testing.assert_array_equal(compress.linear(x, p, kernel="weight_only"), y16)
    aimass.set_simd_level("scalar")
    np.testing.assert_array_equal(compress.linear(x, p, kernel="weight_only"), y16)
    assert p.nbytes == before + n * k // 2  # rebuilt once


@pytest.mark.parametrize("lvl", [lv for lv in LEVELS if lv != "scalar"])
def test_auto_keeps_int16_weight_only_below_8_rows(lvl, level):
    """kernel='auto' on int4 weights of whole 128-blocks with int16 activations runs the
    panels kernel up to 7 rows (as int8 weights do) and dynamic_int8 from 8; with fp32
    activations, or groups that are not whole blocks, dynamic_int8 from 4 rows."""
    aimass.set_simd_level(lvl)
    for g in (128, 0):
        p = make(70, 256, g, 0)[4]
        for m in range(1, 8):
            assert p.plan(m) == ("weight_only", "int16"), (g, m)
        assert p.plan(8) == ("dynamic_int8", "int8")
        assert p.plan(3, activation_precision="fp32") == ("weight_only", "fp32")
        assert p.plan(4, activation_precision="fp32") == ("dynamic_int8", "int8")
    p64 = make(70, 256, 64, 0)[4]
    assert p64.plan(3) == ("weight_only", "fp32") and p64.plan(4) == ("dynamic_int8", "int8")
