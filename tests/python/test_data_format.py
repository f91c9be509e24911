"""Record format, write/open, Dataset access, corruption detection (aimass.data)."""
import json
import os

import numpy as np
import pytest

import aimass
import aimass.data as D


@pytest.fixture
def xy():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (300, 4, 4, 3), dtype=np.uint8), rng.integers(0, 10, 300).astype(np.int64)


def test_crc32c_known_vector_and_paths_agree():
    assert D.crc32c(b"123456789", "scalar") == 0xE3069283
    data = np.random.default_rng(1).integers(0, 256, 10007, dtype=np.uint8)
    ref = D.crc32c(data, "scalar")
    if aimass.cpu_features()["sse4.2"]:
        assert D.crc32c(data, "sse42") == ref
    before = aimass._C.simd_level()
    for level in ("scalar", "avx2", "avx512"):
        aimass.set_simd_level(level)
        try:
            assert D.crc32c(data) == ref
        finally:
            aimass.set_simd_level(before)
    with pytest.raises(ValueError, match="impl"):
        D.crc32c(b"x", "fast")


def _impls():
    out = ["scalar"]
    if aimass.cpu_features()["sse4.2"]:
        out.append("sse42")
    if _has_avx512_crc():
        out.append("avx512")
    return out


def _has_avx512_crc():
    try:
        D.crc32c(b"", "avx512")
        return True
    except ValueError:
        return False


def _bitwise_crc32c(data: bytes, crc: int = 0) -> int:
    """The CRC one bit at a time: the definition every table and SIMD path must match."""
    c = crc ^ 0xFFFFFFFF
    for byte in data:
        c ^= byte
        for _ in range(8):
            c = (c >> 1) ^ (0x82F63B78 & -(c & 1))
    return c ^ 0xFFFFFFFF


def test_crc32c_every_path_every_length_and_alignment():
    buf = np.random.default_rng(2).integers(0, 256, 4200, dtype=np.uint8)
    lengths = list(range(0, 301)) + [511, 512, 513, 767, 768, 769, 1023, 1024, 3080, 4096]
    impls = _impls()
    for n in (0, 1, 7, 8, 9, 63, 64, 65, 255, 256, 257, 300):
        assert D.crc32c(buf[:n], "scalar", 0x12345678) == _bitwise_crc32c(buf[:n].tobytes(), 0x12345678)
    for off in range(0, 9):  # unaligned starts
        for n in lengths:
            a = buf[off:off + n]
            init = (n * 2654435761 + off) & 0xFFFFFFFF
            ref = D.crc32c(a, "scalar", init)
            for impl in impls:
                assert D.crc32c(a, impl, init) == ref, (impl, off, n)
            got, copy = aimass._C.data_crc32c_copy(a, "auto", init)
            assert got == ref and np.array_equal(copy, a), (off, n)
            for impl in set(impls) & {"sse42", "avx512"}:
                got, copy = aimass._C.data_crc32c_copy(a, impl, init)
                assert got == ref and np.array_equal(copy, a), (impl, off, n)
    # chaining: the CRC of a + b continues from the CRC of a (the loader chains field by field)
    for impl in impls:
        for cut in (0, 3, 8, 255, 256, 1000, 3072):
            assert D.crc32c(buf[cut:3080], impl, D.crc32c(buf[:cut], impl)) == D.crc32c(buf[:3080], "scalar")


def test_crc32c_dispatch_follows_the_simd_level():
    before = aimass._C.simd_level()
    try:
        aimass.set_simd_level("scalar")
        assert aimass._C.data_crc32c_impl() == "scalar"
        aimass.set_simd_level("avx2")
        assert aimass._C.data_crc32c_impl() in ("sse42", "scalar")
        aimass.set_simd_level("avx512")
        assert aimass._C.data_crc32c_impl() == ("avx512" if _has_avx512_crc() else
                                                 "sse42" if aimass.cpu_features()["sse4.2"] else "scalar")
    finally:
        aimass.set_simd_level(before)
    if not _has_avx512_crc():
        with pytest.raises(ValueError, match="VPCLMULQDQ"):
            D.crc32c(b"x", "avx512")


@pytest.mark.parametrize("level", ["scalar", "avx2", "avx512"])
@pytest.mark.parametrize("where", ["image", "label"])
def test_loader_catches_a_flipped_payload_byte_at_every_simd_level(tmp_path, xy, level, where):
    """The loader checks the payload CRC while copying plain fields into the batch and
    before running transforms on the others: a flip anywhere in any field is caught."""
    X, y = xy
    ds = D.write(tmp_path / "ds", {"image": X, "label": y}, shard_bytes=1 << 20)
    shard = tmp_path / "ds" / ds.shards[0]["file"]
    off = _frame_offset(shard, 123) + 12 + (5 if where == "image" else X[0].nbytes + 3)
    buf = bytearray(open(shard, "rb").read())
    buf[off] ^= 0x40
    open(shard, "wb").write(bytes(buf))
    ds = D.open(tmp_path / "ds")
    before = aimass._C.simd_level()
    aimass.set_simd_level(level)
    try:
        for tf in ([], [D.Cast("image"), D.Normalize("image", [0.5] * 3, [0.2] * 3)]):
            for verify in (True, "once"):
                with pytest.raises(aimass.CorruptDataError, match="part-00000.rec record 123: payload checksum"):
                    for _ in D.Loader(ds, 32, shuffle=True, seed=1, num_threads=2, transforms=tf, verify=verify):
                        pass
        # the records around it read back exactly
        good = np.setdiff1d(np.arange(300), [123])
        loader = D.Loader(ds.subset(good), 64, shuffle=False, num_threads=2)
        got = np.concatenate([b["image"].copy() for b in loader])
        np.testing.assert_array_equal(got, X[good])
    finally:
        aimass.set_simd_level(before)


def test_write_open_roundtrip_and_shards(tmp_path, xy):
    X, y = xy
    ds = D.write(tmp_path / "ds", {"image": X, "label": y}, shard_bytes=10_000)
    assert len(ds) == 300 and len(ds.shards) > 1
    assert ds.schema == [{"name": "image", "dtype": "uint8", "shape": [4, 4, 3]},
                         {"name": "label", "dtype": "int64", "shape": []}]
    ds2 = D.open(tmp_path / "ds")
    for i in (0, 123, 299, -1):
        r = ds2[i]
        np.testing.assert_array_equal(r["image"], X[i])
        assert r["label"] == y[i]
    assert ds2.verify() == 300
    idx = json.load(open(tmp_path / "ds" / "index.json"))
    assert sum(s["records"] for s in idx["shards"]) == 300
    assert all(len(s["sha256"]) == 64 for s in idx["shards"])
    # only the final names remain: no temporaries
    assert sorted(os.listdir(tmp_path)) == ["ds"]
    assert all(f == "index.json" or f.endswith(".rec") for f in os.listdir(tmp_path / "ds"))
    with pytest.raises(IndexError):
        ds2[300]
    np.testing.assert_array_equal(ds2.column("label"), y)


def test_torch_input_variable_field_and_overwrite(tmp_path):
    torch = pytest.importorskip("torch")
    x = torch.arange(12, dtype=torch.float32).reshape(6, 2)
    seqs = [np.arange(k, dtype=np.int32) for k in (0, 3, 1, 5, 2, 4)]
    ds = D.write(tmp_path / "v", {"x": x, "seq": seqs})
    assert ds.schema[1]["shape"] == [-1]
    for i, s in enumerate(seqs):
        np.testing.assert_array_equal(ds[i]["seq"], s)
        np.testing.assert_array_equal(ds[i]["x"], x[i].numpy())
    with pytest.raises(FileExistsError):
        D.write(tmp_path / "v", {"x": x})
    ds = D.write(tmp_path / "v", {"x": x}, overwrite=True)
    assert ds.fields == ["x"]
    with pytest.raises(ValueError, match="variable first dimension"):
        D.Loader(D.open(D.write(tmp_path / "w", {"seq": seqs}).path), 2)


def test_bad_inputs(tmp_path, xy):
    X, y = xy
    with pytest.raises(ValueError, match="same number of records"):
        D.write(tmp_path / "a", {"x": X, "y": y[:10]})
    with pytest.raises(TypeError, match="dict"):
        D.write(tmp_path / "a", [X])
    with pytest.raises(ValueError, match="shard_bytes"):
        D.write(tmp_path / "a", {"x": X}, shard_bytes=0)
    with pytest.raises(FileNotFoundError, match="index.json"):
        os.mkdir(tmp_path / "empty")
        D.open(tmp_path / "empty")
    assert not (tmp_path / "a").exists()


def _frame_offset(path, record):
    data = open(path, "rb").read()
    n = int.from_bytes(data[-32:-24], "little")
    table = int.from_bytes(data[-24:-16], "little")
    assert record < n
    return int.from_bytes(data[table + 8 * record: table + 8 * record + 8], "little")


def test_flipped_byte_names_shard_and_record(tmp_path, xy):
    X, y = xy
    ds = D.write(tmp_path / "ds", {"image": X, "label": y}, shard_bytes=10_000)
    shard = tmp_path / "ds" / ds.shards[1]["file"]
    off = _frame_offset(shard, 4) + 12 + 7
    buf = bytearray(open(shard, "rb").read())
    buf[off] ^= 0x01
    open(shard, "wb").write(bytes(buf))
    ds = D.open(tmp_path / "ds")
    first = ds.shards[0]["records"]
    with pytest.raises(aimass.CorruptDataError, match=rf"{ds.shards[1]['file']} record 4\b"):
        ds[first + 4]
    with pytest.raises(aimass.CorruptDataError, match="part-00001.rec"):
        for _ in D.Loader(ds, 32, shuffle=False, num_threads=2):
            pass
    with pytest.raises(aimass.CorruptDataError, match="part-00001.rec record 4"):
        for _ in D.Loader(ds, 32, shuffle=False, verify="once"):
            pass
    assert sum(len(b["label"]) for b in D.Loader(ds, 32, verify=False)) == 300  # the caller opted out
    with pytest.raises(ValueError, match="verify"):
        D.Loader(ds, 32, verify="sometimes")
    with pytest.raises(aimass.CorruptDataError, match="sha256"):
        ds.verify()
    with pytest.raises(aimass.CorruptDataError, match="record 4"):
        ds.verify(sha256=False)


def test_truncated_shard_names_shard_and_record(tmp_path, xy):
    X, y = xy
    ds = D.write(tmp_path / "ds", {"image": X, "label": y}, shard_bytes=10_000)
    shard = tmp_path / "ds" / ds.shards[0]["file"]
    cut = _frame_offset(shard, 6) + 20
    os.truncate(shard, cut)
    with pytest.raises(aimass.CorruptDataError, match=r"part-00000.rec: truncated.*record 6 is incomplete"):
        D.open(tmp_path / "ds")
    os.remove(shard)
    with pytest.raises(aimass.CorruptDataError, match="part-00000.rec .*missing"):
        D.open(tmp_path / "ds")


def test_wrong_schema_is_a_clear_error(tmp_path, xy):
    X, y = xy
    ds = D.write(tmp_path / "ds", {"image": X, "label": y})
    ip = tmp_path / "ds" / "index.json"
    index = json.loads(ip.read_text())
    index["schema"][0]["shape"] = [4, 4, 4]  # 64 bytes instead of the stored 48
    ip.write_text(json.dumps(index))
    with pytest.raises(aimass.CorruptDataError, match="schema does not match"):
        D.open(ds.path)[0]
    index["schema"][0]["shape"] = [4, -4, 3]
    ip.write_text(json.dumps(index))
    with pytest.raises(ValueError, match="only the first dimension may be variable"):
        D.open(ds.path)
    index["schema"][0]["shape"] = [4, 4, 3]
    index["schema"][0]["dtype"] = "complex64"
    ip.write_text(json.dumps(index))
    with pytest.raises(TypeError):
        D.open(ds.path)
    index["version"] = 99
    ip.write_text(json.dumps(index))
    with pytest.raises(ValueError, match="version 99"):
        D.open(ds.path)
