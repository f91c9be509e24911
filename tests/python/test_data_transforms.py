"""Fused native transforms against numpy references."""
import numpy as np
import pytest

import aimass.data as D


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    rng = np.random.default_rng(5)
    n = 200
    X = rng.integers(0, 256, (n, 6, 5, 3), dtype=np.uint8)
    y = rng.integers(0, 10, n).astype(np.int64)
    return D.write(tmp_path_factory.mktemp("tf") / "ds", {"img": X, "label": y, "id": np.arange(n)}), X, y


def one_batch(d, transforms, **kw):
    return next(iter(D.Loader(d, 200, shuffle=False, transforms=transforms, **kw)))


def test_cast_normalize_float32_and_float16(ds):
    d, X, _ = ds
    mean, std = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]
    b = one_batch(d, [D.Cast("img", scale=1 / 255), D.Normalize("img", mean, std)])
    ref = (X.astype(np.float32) / 255 - np.float32(mean)) / np.float32(std)
    assert b["img"].dtype == np.float32
    np.testing.assert_allclose(b["img"], ref, rtol=1e-5, atol=1e-5)
    b = one_batch(d, [D.Cast("img", "float16", scale=2.0)])
    assert b["img"].dtype == np.float16
    np.testing.assert_array_equal(b["img"], (X.astype(np.float32) * 2).astype(np.float16))
    with pytest.raises(TypeError, match="Cast"):
        D.Loader(d, 4, transforms=[D.Normalize("img", mean, std)])
    with pytest.raises(ValueError, match="mean/std"):
        D.Loader(d, 4, transforms=[D.Cast("img"), D.Normalize("img", [0.1, 0.2], [1, 1])])


def test_one_hot(ds):
    d, _, y = ds
    b = one_batch(d, [D.OneHot("label", 10)])
    np.testing.assert_array_equal(b["label"], np.eye(10, dtype=np.float32)[y])
    with pytest.raises(ValueError, match="outside"):
        next(iter(D.Loader(d, 200, transforms=[D.OneHot("label", 5)])))
    with pytest.raises(TypeError, match="integer label"):
        D.Loader(d, 4, transforms=[D.OneHot("img", 10)])


def test_flip_always_and_never(ds):
    d, X, _ = ds
    b = one_batch(d, [D.RandomHorizontalFlip("img", p=1.0)])
    np.testing.assert_array_equal(b["img"], X[:, :, ::-1, :])
    b = one_batch(d, [D.RandomHorizontalFlip("img", p=0.0)])
    np.testing.assert_array_equal(b["img"], X)


def crops(img, h, w, pad):
    p = np.pad(img, ((pad, pad), (pad, pad), (0, 0)))
    return [p[i:i + h, j:j + w] for i in range(p.shape[0] - h + 1) for j in range(p.shape[1] - w + 1)]


def test_random_crop_flip_matches_a_numpy_window_and_is_seeded(ds):
    d, X, _ = ds
    tf = [D.RandomCrop("img", (4, 5), padding=2), D.RandomHorizontalFlip("img"), D.Cast("img", scale=1.0),
          D.Normalize("img", [10, 20, 30], [2, 4, 8])]
    b = one_batch(d, tf, seed=9)
    assert b["img"].shape == (200, 4, 5, 3)
    flipped = 0
    for i in range(200):
        out = b["img"][i]
        cands = crops(X[i].astype(np.float32), 4, 5, 2)
        norm = lambda c: (c - np.float32([10, 20, 30])) / np.float32([2, 4, 8])  # noqa: E731
        plain = any(np.allclose(out, norm(c)) for c in cands)
        mirrored = any(np.allclose(out, norm(c[:, ::-1])) for c in cands)
        assert plain or mirrored, i
        flipped += mirrored and not plain
    assert 50 < flipped < 150  # p = 0.5 over 200 samples
    # the same seed gives the same pixels whatever the threads, rank layout or batch size
    again = np.concatenate([x["img"] for x in D.Loader(d, 7, shuffle=False, seed=9, transforms=tf, num_threads=3)])
    np.testing.assert_array_equal(again, b["img"])
    other = one_batch(d, tf, seed=10)
    assert not np.array_equal(other["img"], b["img"])
    # a new epoch draws new crops
    loader = D.Loader(d, 200, shuffle=False, seed=9, transforms=tf)
    e0 = next(iter(loader))["img"].copy()
    loader.set_epoch(1)
    assert not np.array_equal(next(iter(loader))["img"], e0)


def test_transform_order_errors(ds):
    d, _, _ = ds
    with pytest.raises(ValueError, match="before"):
        D.Loader(d, 4, transforms=[D.Cast("img"), D.RandomHorizontalFlip("img")])
    with pytest.raises(ValueError, match="does not fit"):
        D.Loader(d, 4, transforms=[D.RandomCrop("img", 20)])
    with pytest.raises(ValueError, match="HWC"):
        D.Loader(d, 4, transforms=[D.RandomHorizontalFlip("label")])
    with pytest.raises(TypeError, match="dtype"):
        D.Cast("img", "int8")


def test_generic_path_matches_fast_path(ds):
    d, X, _ = ds
    geo = [D.RandomCrop("img", 4, padding=1), D.RandomHorizontalFlip("img")]
    f32 = one_batch(d, geo + [D.Cast("img", "float32", 0.5)], seed=4)["img"]
    f16 = one_batch(d, geo + [D.Cast("img", "float16", 0.5)], seed=4)["img"]
    raw = one_batch(d, geo, seed=4)["img"]
    np.testing.assert_array_equal(f16, f32.astype(np.float16))
    np.testing.assert_array_equal(raw.astype(np.float32) * 0.5, f32)


def test_user_cfunc_transform(ds):
    import ctypes
    d, X, _ = ds
    proto = ctypes.CFUNCTYPE(ctypes.c_int32, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64,
                             ctypes.c_int64, ctypes.c_uint64)

    @proto
    def channel_sums(inp, in_bytes, out, out_bytes, record, seed):
        # stands in for a numba cfunc: sum each channel of the HWC uint8 image
        src = np.ctypeslib.as_array((ctypes.c_uint8 * in_bytes).from_address(inp))
        dst = np.ctypeslib.as_array((ctypes.c_float * (out_bytes // 4)).from_address(out))
        dst[:] = src.reshape(-1, 3).sum(axis=0)
        return 0 if record != 150 else 7

    b = next(iter(D.Loader(d, 100, shuffle=False, transforms=[D.CFunc("img", channel_sums, "float32", [3])])))
    np.testing.assert_array_equal(b["img"], X[:100].reshape(100, -1, 3).sum(axis=1).astype(np.float32))
    with pytest.raises(ValueError, match="returned 7 for record 150"):
        for _ in D.Loader(d, 100, shuffle=False, transforms=[D.CFunc("img", channel_sums, "float32", [3])]):
            pass
    with pytest.raises(ValueError, match="only transform"):
        D.Loader(d, 4, transforms=[D.Cast("img"), D.CFunc("img", channel_sums, "float32", [3])])
    with pytest.raises(TypeError, match="cfunc"):
        D.CFunc("img", "not a function", "float32", [3])


def test_cast_normalize_vector_and_four_channels(tmp_path):
    rng = np.random.default_rng(2)
    v = rng.integers(0, 256, (50, 7), dtype=np.uint8)
    img4 = rng.integers(0, 256, (50, 2, 3, 4), dtype=np.uint8)
    d = D.write(tmp_path / "d", {"v": v, "img4": img4})
    b = one_batch(d, [D.Cast("v", scale=0.5), D.Normalize("v", [3.0], [2.0]),
                      D.Cast("img4", scale=1.0), D.Normalize("img4", [1, 2, 3, 4], [1, 2, 4, 8])])
    np.testing.assert_allclose(b["v"], (v * np.float32(0.5) - 3) / 2, rtol=1e-6)
    np.testing.assert_allclose(b["img4"], (img4.astype(np.float32) - [1, 2, 3, 4]) / np.float32([1, 2, 4, 8]),
                               rtol=1e-6)


def test_affine_kernel_is_bit_identical_at_every_simd_level(tmp_path):
    """The u8 -> f32 Cast/Normalize kernel (AVX2 beside its scalar reference), plain and
    mirrored, for 3 and 5 channels and widths that leave kernel tails: same bits everywhere."""
    import aimass
    rng = np.random.default_rng(11)
    for shape in [(5, 37, 3), (4, 9, 5), (3, 70, 3)]:
        X = rng.integers(0, 256, (40, *shape), dtype=np.uint8)
        d = D.write(tmp_path / f"ds{shape[1]}", {"img": X})
        C = shape[-1]
        mean, std = list(rng.uniform(0, 1, C)), list(rng.uniform(0.1, 1, C))
        for geo in ([], [D.RandomHorizontalFlip("img", p=1.0)], [D.RandomCrop("img", (3, 7), padding=2)]):
            tf = geo + [D.Cast("img", scale=1 / 255), D.Normalize("img", mean, std)]
            before = aimass._C.simd_level()
            outs = []
            try:
                for level in ("scalar", "avx2", "avx512"):
                    aimass.set_simd_level(level)
                    outs.append(next(iter(D.Loader(d, 40, shuffle=False, seed=2, transforms=tf)))["img"].copy())
            finally:
                aimass.set_simd_level(before)
            for o in outs[1:]:
                np.testing.assert_array_equal(o, outs[0])
            if not geo:
                ref = (X.astype(np.float32) * np.float32(1 / 255) - np.float32(mean)) / np.float32(std)
                np.testing.assert_allclose(outs[0], ref, rtol=1e-5, atol=1e-5)
            elif geo[0].kind == 3:  # mirrored
                ref = (X[:, :, ::-1].astype(np.float32) * np.float32(1 / 255) - np.float32(mean)) / np.float32(std)
                np.testing.assert_allclose(outs[0], ref, rtol=1e-5, atol=1e-5)
