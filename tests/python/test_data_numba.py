"""A real numba @cfunc as a Loader transform: compiled with the documented signature,
called by the C++ workers without the GIL, checked against numpy."""
import numpy as np
import pytest

import aimass.data as D

numba = pytest.importorskip("numba")
from numba import types  # noqa: E402

# The signature docs/format.md documents for D.CFunc.
SIG = types.int32(types.voidptr, types.int64, types.voidptr, types.int64, types.int64, types.uint64)


@numba.cfunc(SIG, nopython=True, cache=False)
def channel_stats(inp, in_bytes, out, out_bytes, record, seed):
    """HWC uint8 image -> float32 [mean_r, mean_g, mean_b, record, seed % 1000]."""
    if out_bytes != 5 * 4 or in_bytes % 3 != 0:
        return 2
    src = numba.carray(inp, (in_bytes,), dtype=np.uint8)
    dst = numba.carray(out, (5,), dtype=np.float32)
    npx = in_bytes // 3
    for c in range(3):
        acc = 0
        for k in range(npx):
            acc += src[3 * k + c]
        dst[c] = acc / npx
    dst[3] = record
    dst[4] = seed % 1000
    return 0


@numba.cfunc(SIG, nopython=True, cache=False)
def invert_or_fail(inp, in_bytes, out, out_bytes, record, seed):
    """255 - x (same shape); fails (returns 5) on record 77."""
    if record == 77:
        return 5
    src = numba.carray(inp, (in_bytes,), dtype=np.uint8)
    dst = numba.carray(out, (out_bytes,), dtype=np.uint8)
    for k in range(in_bytes):
        dst[k] = 255 - src[k]
    return 0


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    rng = np.random.default_rng(8)
    X = rng.integers(0, 256, (400, 6, 7, 3), dtype=np.uint8)
    y = rng.integers(0, 10, 400).astype(np.int64)
    return D.write(tmp_path_factory.mktemp("nb") / "ds", {"img": X, "label": y}), X, y


def test_numba_cfunc_matches_numpy(ds):
    d, X, y = ds
    tf = [D.CFunc("img", channel_stats, "float32", [5])]
    loader = D.Loader(d, 64, shuffle=True, seed=3, num_threads=2, transforms=tf)
    assert loader._outputs[0] == ("img", "float32", [5])
    rows, labels = [], []
    for b in loader:
        assert b["img"].shape[1:] == (5,) and b["img"].dtype == np.float32
        rows.append(b["img"].copy())
        labels.append(b["label"].copy())
    out = np.concatenate(rows)
    lab = np.concatenate(labels)
    rec = out[:, 3].astype(np.int64)  # the record index the worker passed
    assert sorted(rec.tolist()) == list(range(400))
    np.testing.assert_array_equal(lab, y[rec])
    np.testing.assert_allclose(out[:, :3], X[rec].reshape(400, -1, 3).mean(axis=1), rtol=1e-6)
    # the per-sample seed is a function of (seed, epoch, record): independent of threads and batching
    again = D.Loader(d, 50, shuffle=False, seed=3, num_threads=1, transforms=tf)
    by_rec = {int(r[3]): r[4] for b in again for r in b["img"]}
    assert all(by_rec[int(r[3])] == r[4] for r in out)
    assert len({float(v) for v in by_rec.values()}) > 300  # it varies per record
    loader.set_epoch(1)
    next_epoch = {int(r[3]): r[4] for b in loader for r in b["img"]}
    assert sum(next_epoch[k] != v for k, v in by_rec.items()) > 300  # and per epoch


def test_numba_cfunc_same_shape_and_error_code(ds):
    d, X, _ = ds
    tf = [D.CFunc("img", invert_or_fail, "uint8", [6, 7, 3])]
    b = next(iter(D.Loader(d, 64, shuffle=False, transforms=tf)))
    np.testing.assert_array_equal(b["img"], 255 - X[:64])
    with pytest.raises(ValueError, match="CFunc on field 'img' returned 5 for record 77"):
        for _ in D.Loader(d, 64, shuffle=False, num_threads=2, transforms=tf):
            pass
    # a wrong output size reaches the function as out_bytes, which it can refuse
    with pytest.raises(ValueError, match="returned 2"):
        next(iter(D.Loader(d, 8, transforms=[D.CFunc("img", channel_stats, "float32", [4])])))
