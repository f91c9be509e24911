import numpy as np
import pytest

from aimass.compress import calibrate

torch = pytest.importorskip("torch")


def batches(seed=0, n=4, size=(64, 128)):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(size).astype(np.float32) * 2 + 0.5 for _ in range(n)]


def heavy_tailed(seed=0, n=200_000):
    rng = np.random.default_rng(seed)
    return rng.standard_t(2, size=n).astype(np.float32)


@pytest.mark.parametrize("bits", [8, 4])
def test_minmax_is_exact(bits):
    bs = batches()
    allv = np.concatenate([b.ravel() for b in bs])
    lo, hi = np.float32(allv.min()), np.float32(allv.max())
    c = calibrate(bs, method="minmax", bits=bits, scheme="asymmetric")
    qmax = np.float32(255 if bits == 8 else 15)
    scale = np.float32((max(hi, 0) - min(lo, 0)) / qmax)
    assert c.observed_min == lo and c.observed_max == hi and c.min == lo and c.max == hi
    assert np.float32(c.scale) == scale
    assert c.zero_point == int(np.clip(np.rint(-min(lo, np.float32(0)) / scale), 0, qmax))
    s = calibrate(bs, method="minmax", bits=bits, scheme="symmetric")
    assert np.float32(s.scale) == np.float32(max(abs(lo), abs(hi)) / np.float32(127 if bits == 8 else 7))
    assert s.zero_point is None and s.min == -s.max


def test_inputs_torch_single_array_and_generator_agree():
    bs = batches()
    ref = calibrate(bs, method="minmax")
    assert calibrate((torch.from_numpy(b) for b in bs), method="minmax") == ref
    assert calibrate(np.stack(bs), method="minmax") == ref
    assert calibrate([torch.from_numpy(b).to(torch.bfloat16) for b in bs]).method == "minmax"


@pytest.mark.parametrize("scheme", ["symmetric", "asymmetric"])
def test_percentile_clips_outliers(scheme):
    x = np.random.default_rng(1).standard_normal(100_000).astype(np.float32)
    x[:5] = [1e3, -800.0, 500.0, 900.0, -1e3]  # rare huge outliers
    mm = calibrate(x, method="minmax", scheme=scheme)
    pc = calibrate(x, method="percentile", scheme=scheme, percentile=99.9)
    assert pc.max < 10 and pc.min > -10  # the range follows the bulk, not the outliers
    assert mm.max >= 900
    assert pc.scale < mm.scale / 50
    inliers = x[5:]
    err_pc = np.mean((pc.fake_quantize(inliers) - inliers) ** 2)
    err_mm = np.mean((mm.fake_quantize(inliers) - inliers) ** 2)
    assert err_pc < err_mm / 100
    # outliers saturate at the edge of the range instead of overflowing
    q = pc.quantize(x[:5])
    assert q.max() == pc.qmax and q.min() == pc.qmin


@pytest.mark.parametrize("scheme", ["symmetric", "asymmetric"])
@pytest.mark.parametrize("bits", [8, 4])
def test_mse_beats_minmax_on_heavy_tails(scheme, bits):
    x = heavy_tailed()
    mm = calibrate(x, method="minmax", scheme=scheme, bits=bits)
    ms = calibrate(x, method="mse", scheme=scheme, bits=bits)
    err = lambda c: float(np.mean((c.fake_quantize(x).astype(np.float64) - x) ** 2))
    assert err(ms) < err(mm)
    assert ms.max < mm.max  # it clipped


def test_calibrate_bad_inputs():
    good = batches(n=1)
    with pytest.raises(ValueError, match="method must be"):
        calibrate(good, method="kl")
    with pytest.raises(ValueError, match="bits must be 8 or 4"):
        calibrate(good, bits=16)
    with pytest.raises(ValueError, match="scheme must be"):
        calibrate(good, scheme="affine")
    with pytest.raises(ValueError, match="percentile must be"):
        calibrate(good, method="percentile", percentile=101)
    with pytest.raises(ValueError, match="batches is empty"):
        calibrate([])
    with pytest.raises(ValueError, match="no elements"):
        calibrate([np.zeros((0,), np.float32)])
    bad = good[0].copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match=r"batches\[1\] contains NaN"):
        calibrate([good[0], bad])
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        calibrate([np.zeros(4, np.int64)])
    with pytest.raises(TypeError, match="batches must be"):
        calibrate(3.5)
