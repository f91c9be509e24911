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
