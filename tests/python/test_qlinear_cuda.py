"""CUDA quantized linear: runs on a GPU, skips without one (the CPU path is tested elsewhere)."""
import importlib

import numpy as np
import pytest

import aimass
from aimass import compress

qlin = importlib.import_module("aimass.compress.qlinear")


def test_cuda_module_exports_kernels_when_built():
    if not aimass.cuda.built():
        pytest.skip("aimass built without CUDA")
    m = aimass.cuda._module()
    for name in ("qlinear_quantize_int8", "qlinear_dequantize_int8", "qlinear_linear_int8"):
        assert hasattr(m, name)


def test_cuda_array_without_gpu_gives_clear_error():
    if aimass.cuda.is_available():
        pytest.skip("a GPU is present")

    class FakeCuda:  # looks like a device array, but there is no device
        __cuda_array_interface__ = {"shape": (2, 64), "typestr": "<f4", "data": (0, False), "version": 3,
                                    "strides": None}

    p = qlin.pack_linear(np.ones((4, 64), np.int8), np.ones(4, np.float32), bits=8, shape=(4, 64))
    with pytest.raises(RuntimeError, match="CUDA"):
        compress.linear(FakeCuda(), p)


@pytest.mark.skipif(not aimass.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("m", [1, 3, 8, 64])
def test_cuda_linear_matches_cpu(m):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA")
    from aimass.compress import _linear_cuda

    rng = np.random.default_rng(0)
    w = rng.standard_normal((96, 200)).astype(np.float32)
    qw = qlin.quantize_weight(w, bits=8)
    q_dev, s_dev = _linear_cuda.quantize_int8(torch.from_numpy(w).cuda())
    np.testing.assert_array_equal(q_dev.cpu().numpy(), qw.data)
    np.testing.assert_array_equal(s_dev.cpu().numpy(), qw.scale)
    deq = _linear_cuda.dequantize_int8(q_dev, s_dev).cpu().numpy()
    np.testing.assert_array_equal(deq, qw.dequantize())
    x = torch.randn(m, 200)
    b = torch.randn(96)
    y = compress.linear(x.cuda(), qw, b.cuda())
    assert y.is_cuda and y.dtype == torch.float32
    # The CUDA kernel keeps x in fp32; the CPU default rounds x to int16 (about 1e-3 off here), so the
    # reference is the float64 product with the dequantized weight, and the CPU path with fp32 activations.
    truth = (x.double() @ torch.from_numpy(qw.dequantize()).double().T + b.double()).float()
    torch.testing.assert_close(y.cpu(), truth, atol=1e-4, rtol=1e-5)
    ref = compress.linear(x, qw, b, kernel="weight_only", activation_precision="fp32")
    torch.testing.assert_close(y.cpu(), ref, atol=1e-4, rtol=1e-5)
    with pytest.raises(ValueError, match="int8 per-channel"):
        compress.linear(x.cuda(), qlin.quantize_weight(w[:, :192], bits=4, group_size=64))
    with pytest.raises(ValueError, match="in_features"):
        compress.linear(x[:, :199].contiguous().cuda(), qw)
    bad = torch.from_numpy(w).cuda()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        _linear_cuda.quantize_int8(bad)


@pytest.mark.skipif(not aimass.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("m", [1, 5])
def test_cuda_linear_nonfinite_row_is_nan(m):
    """docs/qlinear.md: a row of x holding NaN or +-inf gives an all-NaN row, on the GPU too."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA")
    rng = np.random.default_rng(1)
    for k in (128, 130):  # the kernel's float4 loads, and its scalar path (K % 4 != 0)
        qw = qlin.quantize_weight(rng.standard_normal((40, k)).astype(np.float32), bits=8)
        x = torch.randn(m, k)
        x[0, 3] = float("inf") if k == 128 else float("nan")
        y = compress.linear(x.cuda(), qw).cpu()
        assert torch.isnan(y[0]).all()
        assert torch.isfinite(y[1:]).all()
