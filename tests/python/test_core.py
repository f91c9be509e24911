import numpy as np
import pytest

import aimass
from aimass import _array


def test_cpu_features_reports_selected_level():
    f = aimass.cpu_features()
    assert f["simd"] in ("scalar", "avx2", "avx512")
    if f["simd"] == "avx512":
        assert f["avx512f"] and f["avx512vnni"]
    if f["simd"] != "scalar":
        assert f["avx2"] and f["fma"] and f["f16c"]


def test_simd_level_can_be_capped_and_restored():
    before = aimass.cpu_features()["simd"]  # may already be capped by AIMASS_SIMD
    assert aimass.set_simd_level("scalar") == "scalar"
    assert aimass.cpu_features()["simd"] == "scalar"
    assert aimass.set_simd_level(before) == before
    with pytest.raises(ValueError, match="scalar"):
        aimass.set_simd_level("sse9")


def test_threads_setting_validates():
    n = aimass.num_threads()
    aimass.set_num_threads(1)
    assert aimass.num_threads() == 1
    aimass.set_num_threads(n)
    with pytest.raises(ValueError):
        aimass.set_num_threads(0)


def test_error_types_are_exported():
    assert issubclass(aimass.DistributedError, RuntimeError)
    assert issubclass(aimass.CorruptDataError, ValueError)
    assert issubclass(aimass.QueueFullError, RuntimeError)


def test_cuda_is_optional():
    import aimass.cuda as cuda
    assert isinstance(cuda.is_available(), bool)
    if not cuda.is_available():
        with pytest.raises(RuntimeError):
            cuda.module()


def test_unknown_attribute():
    with pytest.raises(AttributeError):
        aimass.does_not_exist


def test_array_conversions_zero_copy():
    torch = pytest.importorskip("torch")
    t = torch.arange(6, dtype=torch.float32)
    a, dt = _array.as_numpy(t)
    assert dt == "float32" and a.ctypes.data == t.data_ptr()
    b = torch.tensor([1.0, -2.5], dtype=torch.bfloat16)
    np.testing.assert_array_equal(_array.float32_array(b), b.float().numpy())
    with pytest.raises(TypeError, match="numpy array"):
        _array.as_numpy(object(), "w")


def test_cli_info(capsys):
    from aimass import cli
    assert cli.main(["info"]) == 0
    assert "cpu_features" in capsys.readouterr().out


def test_kernels_demo_runs_small_and_reports_sane_numbers():
    from aimass.demo import kernels
    r = kernels.run(n=256, k=512, repeats=2)
    assert r["int8_linear_rel_err"] < 0.02  # int8 per-channel weight-only
    assert r["int4_g128_linear_rel_err"] < 0.2  # int4 symmetric, groups of 128
    assert r["pruned_2of4_kept"] == 0.5
    assert r["int8_linear_ms"] > 0 and r["fp32_blas_gemv_ms"] > 0
