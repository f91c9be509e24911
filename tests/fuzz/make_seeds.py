"""Writes the seed inputs of the data fuzz targets (run once; the fuzzer grows them):
tests/fuzz/corpus/shard/seed-*  (schema byte + shard file, schemas as in fuzz_shard.cc)
tests/fuzz/corpus/index/seed-*  (index.json texts; seed-0 matches fuzz_index.cc's shard)
tests/fuzz/crashes/shard/issue16-*  (issue 16's shard repros, which crashed the old reader)

    PYTHONPATH=$PWD/python python3 tests/fuzz/make_seeds.py
"""
import json
import os
import struct
import tempfile

import numpy as np

import aimass.data as D
from aimass import _C

HERE = os.path.dirname(os.path.abspath(__file__))


def _out(target, name, data, kind="corpus"):
    d = os.path.join(HERE, kind, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def main():
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        sets = [
            {"x": rng.integers(0, 255, (3, 4, 4, 3), dtype=np.uint8), "y": np.arange(3, dtype=np.int64)},
            {"seq": [np.arange(3 * k, dtype=np.int32).reshape(k, 3) for k in (0, 2, 1)],
             "label": np.array([1, 2, 3], np.uint8)},
            {"a": rng.random((4, 2), dtype=np.float32), "b": rng.random((4, 2), dtype=np.float32)},
            {"e": np.zeros((2, 0), np.uint8), "tok": [np.arange(k, dtype=np.int16) for k in (3, 0)],
             "f": np.array([[True], [False]])},
        ]
        for k, arrays in enumerate(sets):
            ds = D.write(os.path.join(tmp, f"s{k}"), arrays)
            shard = open(os.path.join(ds.path, ds.shards[0]["file"]), "rb").read()
            _out("shard", f"seed-{k}", bytes([k]) + shard)
            _out("shard", f"seed-{k}-v2index", bytes([k | 0x80]) + shard)
            _out("index", f"seed-{k + 1}", open(os.path.join(ds.path, "index.json"), "rb").read())
        ds = D.write(os.path.join(tmp, "fz"), {"x": np.full((3, 4), 7, np.uint8), "y": np.arange(3)})
        _out("index", "seed-0", open(os.path.join(ds.path, "index.json"), "rb").read())
        idx = json.load(open(os.path.join(ds.path, "index.json")))
        idx["version"] = 1
        _out("index", "seed-0-v1", json.dumps(idx).encode())
        _repros(open(os.path.join(ds.path, ds.shards[0]["file"]), "rb").read())


def _reseal(buf, start, n):
    t = len(buf) - 32
    struct.pack_into("<I", buf, t + 16, _C.data_mask_crc(D.crc32c(bytes(buf[start:start + n]))))


def _repros(shard):
    """Issue 16's shard findings as fuzz_shard inputs (schema byte 0); each crashed or
    misread with the version-1 reader, each must now be rejected when the shard opens."""
    n, table = struct.unpack_from("<QQ", shard, len(shard) - 32)
    for k, value in enumerate((2**64 - 16, 2**64 - 1)):  # an offset near 2^64, footer CRC resealed
        buf = bytearray(shard)
        struct.pack_into("<Q", buf, table + 8, value)
        _reseal(buf, table, 8 * n + 16)
        _out("shard", f"issue16-offset-near-2-64-{k}", b"\x00" + bytes(buf), "crashes")
    buf = bytearray(shard)  # footer position past the end: 8n + table wraps to the size
    t = len(buf) - 32
    struct.pack_into("<QQ", buf, t, (2**64 - 8) // 8, t + 8)
    _reseal(buf, t, 8)
    _out("shard", "issue16-footer-past-end", b"\x00" + bytes(buf), "crashes")
    buf = bytearray(shard)  # a duplicated offset, footer CRC resealed
    struct.pack_into("<Q", buf, table + 16, struct.unpack_from("<Q", buf, table + 8)[0])
    _reseal(buf, table, 8 * n + 16)
    _out("shard", "issue16-duplicate-offset", b"\x00" + bytes(buf), "crashes")


if __name__ == "__main__":
    main()
