"""pin_memory and output="cupy": CPU-only behaviour here, GPU paths when a GPU is present."""
import ctypes
import gc
import warnings

import numpy as np
import pytest

import aimass
import aimass.cuda
import aimass.data as D

GPU = aimass.cuda.is_available()


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    rng = np.random.default_rng(3)
    X = rng.integers(0, 256, (300, 8, 8, 3), dtype=np.uint8)
    y = rng.integers(0, 10, 300).astype(np.int64)
    return D.write(tmp_path_factory.mktemp("pin") / "ds", {"x": X, "label": y}), X, y


def _all(loader):
    return [{k: np.array(v.numpy() if hasattr(v, "numpy") else v) for k, v in b.items()} for b in loader]


@pytest.mark.skipif(GPU, reason="a GPU is present: pinning really happens")
def test_pin_memory_without_cuda_warns_once_and_loads_the_same(ds, monkeypatch):
    d, X, _ = ds
    monkeypatch.setattr(D._loader, "_pin_warned", False)
    with pytest.warns(UserWarning, match="pin_memory=True but .*pageable"):
        pinned = D.Loader(d, 64, seed=4, pin_memory=True)
    assert pinned.pin_memory is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second loader says nothing
        again = D.Loader(d, 64, seed=4, pin_memory=True, output="torch")
    plain = D.Loader(d, 64, seed=4)
    for a, b, c in zip(_all(pinned), _all(plain), _all(again)):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
            np.testing.assert_array_equal(a[k], c[k])
    with pytest.raises(TypeError, match="pin_memory"):
        D.Loader(d, 4, pin_memory="yes")


def test_cupy_output_names_what_is_missing(ds):
    d = ds[0]
    try:
        import cupy  # noqa: F401
        have_cupy = True
    except ImportError:
        have_cupy = False
    if have_cupy and GPU:
        pytest.skip("cupy and a GPU are present")
    with pytest.raises(RuntimeError, match="needs cupy and a CUDA GPU") as err:
        D.Loader(d, 4, output="cupy")
    msg = str(err.value)
    assert ("cupy is not installed" in msg) == (not have_cupy)
    assert "no CUDA GPU is available" in msg or GPU
    with pytest.raises(ValueError, match="'numpy', 'torch' or 'cupy'"):
        D.Loader(d, 4, output="jax")


# ------------------------------------------------------------- the allocator plumbing, on CPU
_ALLOC = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_size_t)
_FREE = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
_libc = ctypes.CDLL(None)
_libc.aligned_alloc.restype = ctypes.c_void_p
_libc.aligned_alloc.argtypes = [ctypes.c_size_t, ctypes.c_size_t]
_libc.free.argtypes = [ctypes.c_void_p]
_live = {}
_counts = {"alloc": 0, "free": 0}


@_ALLOC
def _counting_alloc(n):
    p = _libc.aligned_alloc(4096, n)
    _live[p] = n
    _counts["alloc"] += 1
    return p


@_FREE
def _counting_free(p):
    assert _live.pop(p, None) is not None, "freed a pointer the allocator did not hand out"
    _counts["free"] += 1
    _libc.free(p)


@_ALLOC
def _failing_alloc(n):
    return None


def _addr(f):
    return ctypes.cast(f, ctypes.c_void_p).value


def test_pinned_path_allocates_every_buffer_through_the_allocator(ds, monkeypatch):
    """Stands in for cudaHostAlloc/cudaFreeHost: every batch buffer comes from the
    allocator the CUDA module would hand over, and goes back to it."""
    d, X, y = ds
    monkeypatch.setattr(D._loader, "_pinned_allocator", lambda: ((_addr(_counting_alloc), _addr(_counting_free)), ""))
    _counts.update(alloc=0, free=0)
    loader = D.Loader(d, 64, seed=2, pin_memory=True, num_threads=2)
    assert loader.pin_memory is True
    got = _all(loader) + _all(loader)  # two epochs
    plain = D.Loader(d, 64, seed=2)
    ref = _all(plain) + _all(plain)
    assert len(got) == len(ref) == 10
    for a, b in zip(got, ref):
        np.testing.assert_array_equal(a["x"], b["x"])
    n_buffers = loader.buffers_allocated
    assert _counts["alloc"] == 2 * n_buffers  # two fields per batch
    del loader, got
    gc.collect()
    assert _counts["free"] == _counts["alloc"] and not _live

    monkeypatch.setattr(D._loader, "_pinned_allocator", lambda: ((_addr(_failing_alloc), _addr(_counting_free)), ""))
    with pytest.raises(RuntimeError, match="pinned .*host memory"):
        next(iter(D.Loader(d, 64, pin_memory=True)))


# ------------------------------------------------------------- GPU
@pytest.mark.skipif(not GPU, reason="no CUDA device (aimass.cuda.is_available() is False)")
def test_pinned_buffers_are_page_locked_and_copy_async(tmp_path):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA")
    rng = np.random.default_rng(1)
    X = rng.integers(0, 256, (500, 32, 32, 3), dtype=np.uint8)
    d = D.write(str(tmp_path / "ds"), {"x": X, "label": np.arange(500)})
    m = aimass.cuda.module()
    before = m.data_pinned_bytes_in_use()
    loader = D.Loader(d, 100, shuffle=False, pin_memory=True, output="torch")
    assert loader.pin_memory
    for k, b in enumerate(loader):
        assert m.data_is_pinned(b["x"].data_ptr()) and b["x"].is_pinned()
        g = b["x"].to("cuda", non_blocking=True)
        torch.cuda.current_stream().synchronize()
        assert torch.equal(g.cpu(), torch.from_numpy(X[100 * k:100 * (k + 1)]))
    assert m.data_pinned_bytes_in_use() > before
    del loader, b
    gc.collect()
    assert m.data_pinned_bytes_in_use() == before


@pytest.mark.skipif(not GPU, reason="no CUDA device (aimass.cuda.is_available() is False)")
def test_cupy_output_matches_numpy(tmp_path):
    cp = pytest.importorskip("cupy")
    rng = np.random.default_rng(2)
    X = rng.integers(0, 256, (300, 8, 8, 3), dtype=np.uint8)
    d = D.write(str(tmp_path / "ds"), {"x": X, "label": np.arange(300)})
    tf = [D.Cast("x"), D.Normalize("x", [0.5] * 3, [0.25] * 3)]
    ref = _all(D.Loader(d, 64, seed=1, transforms=tf))
    for epoch in range(2):  # the second epoch reuses buffers whose copies must have finished
        loader = D.Loader(d, 64, seed=1, transforms=tf, output="cupy")
        for a, b in zip(loader, ref):
            assert isinstance(a["x"], cp.ndarray) and a["x"].dtype == cp.float32
            np.testing.assert_allclose(cp.asnumpy(a["x"]), b["x"], rtol=1e-6)
            np.testing.assert_array_equal(cp.asnumpy(a["label"]), b["label"])
