"""Hostile shards, index.json edits and loader arguments (issue 16): every one is a
typed error that says what is damaged; nothing crashes, nothing reads garbage."""
import json
import os
import struct

import numpy as np
import pytest

import aimass
import aimass.data as D
from aimass import _C, cli

TAIL = 32


def _mask(crc):
    return _C.data_mask_crc(crc)


class ShardBytes:
    """A shard file's bytes with helpers to rewrite the footer and re-seal its CRC."""

    def __init__(self, path):
        self.path = path
        self.buf = bytearray(open(path, "rb").read())

    @property
    def n(self):
        return struct.unpack_from("<Q", self.buf, len(self.buf) - TAIL)[0]

    @property
    def table(self):
        return struct.unpack_from("<Q", self.buf, len(self.buf) - TAIL + 8)[0]

    def offsets(self):
        return list(struct.unpack_from(f"<{self.n}Q", self.buf, self.table))

    def set_offset(self, i, v):
        struct.pack_into("<Q", self.buf, self.table + 8 * i, v)

    def set_tail(self, n=None, table=None):
        t = len(self.buf) - TAIL
        if n is not None:
            struct.pack_into("<Q", self.buf, t, n)
        if table is not None:
            struct.pack_into("<Q", self.buf, t + 8, table)

    def reseal(self, covered=None):
        """Recompute the footer CRC as an attacker would (over `covered` bytes from the table)."""
        t = len(self.buf) - TAIL
        start = self.table
        n = covered if covered is not None else t + 16 - start
        data = bytes(self.buf[start:start + n]) if start + n <= len(self.buf) else bytes(self.buf[t:t + 16])
        struct.pack_into("<I", self.buf, t + 16, _mask(D.crc32c(data)))

    def save(self):
        open(self.path, "wb").write(bytes(self.buf))


@pytest.fixture
def ds(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (40, 6), dtype=np.uint8)
    return D.write(tmp_path / "ds", {"x": x, "y": np.arange(40)}, shard_bytes=1 << 20)


def _shard(ds):
    return ShardBytes(os.path.join(ds.path, ds.shards[0]["file"]))


def _inspect_fails(path, capsys, code=1, match=None):
    """`aimass data inspect` exits with `code` and one line on stderr, never a traceback."""
    assert cli.main(["data", "inspect", str(path)]) == code
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    if match:
        assert match in err, err
    return err


# ---------------------------------------------------------------- record shards
@pytest.mark.parametrize("value", [2**64 - 16, 2**64 - 9, 2**64 - 1, 2**63])
def test_offset_near_2_64_with_resealed_footer(ds, capsys, value):
    s = _shard(ds)
    s.set_offset(3, value)
    s.reseal()
    s.save()
    with pytest.raises(aimass.CorruptDataError, match="offset table: record 3 .*outside the data region"):
        D.open(ds.path)
    _inspect_fails(ds.path, capsys, match="record 3")


def test_footer_position_past_the_end_whose_crc_covers_8_bytes(ds, capsys):
    s = _shard(ds)
    size = len(s.buf)
    # opos + 8 n + 32 wraps around 2^64 to the file size: the old reader took it
    table = size - TAIL + 8
    n = (2**64 - 8) // 8
    assert (table + 8 * n + TAIL) % 2**64 == size
    s.set_tail(n=n, table=table)
    s.reseal(covered=8)
    s.save()
    with pytest.raises(aimass.CorruptDataError, match="footer") as e:
        D.open(ds.path)
    assert "truncated" not in str(e.value)
    _inspect_fails(ds.path, capsys, match="footer")


@pytest.mark.parametrize("edit", ["duplicate", "swap", "inside_previous_frame", "zero", "into_table"])
def test_offsets_must_increase_inside_the_data(ds, capsys, edit):
    s = _shard(ds)
    off = s.offsets()
    if edit == "duplicate":
        s.set_offset(3, off[2])
    elif edit == "swap":
        s.set_offset(2, off[3])
        s.set_offset(3, off[2])
    elif edit == "inside_previous_frame":
        s.set_offset(3, off[2] + 8)
    elif edit == "zero":
        s.set_offset(0, 0)
    else:
        s.set_offset(39, s.table)
    s.reseal()
    s.save()
    with pytest.raises(aimass.CorruptDataError, match="offset table"):
        D.open(ds.path)
    _inspect_fails(ds.path, capsys, match="offset table")


def test_offset_moved_by_a_whole_frame_is_caught_on_read(ds):
    """Increasing offsets that do not match the frames: each length must fill its frame."""
    s = _shard(ds)
    off = s.offsets()
    s.set_offset(3, off[2] + 16)  # record 2's frame now looks 16 bytes long
    s.reseal()
    s.save()
    d = D.open(ds.path)
    np.testing.assert_array_equal(d[1]["y"], 1)
    for i in (2, 3):
        with pytest.raises(aimass.CorruptDataError, match=f"record {i}"):
            d[i]
    with pytest.raises(aimass.CorruptDataError, match="record [23]"):
        for _ in D.Loader(d, 8, shuffle=False, num_threads=1):
            pass
    with pytest.raises(aimass.CorruptDataError):
        d.verify(sha256=False)


def test_reserved_footer_bytes_are_checked(ds, capsys):
    s = _shard(ds)
    s.buf[len(s.buf) - TAIL + 20] = 1  # not covered by the footer CRC
    s.save()
    with pytest.raises(aimass.CorruptDataError, match="reserved footer bytes"):
        D.open(ds.path)
    _inspect_fails(ds.path, capsys, match="reserved footer")


@pytest.mark.parametrize("part,match", [
    ("magic", "footer magic"),
    ("count", "record count is damaged"),
    ("table", "offset-table position is damaged"),
    ("crc", "footer checksum mismatch"),
])
def test_damaged_footer_on_a_full_size_file_says_what(ds, capsys, part, match):
    s = _shard(ds)
    t = len(s.buf) - TAIL
    if part == "magic":
        s.buf[-3] ^= 0x20
    elif part == "count":
        s.set_tail(n=s.n + 1)
    elif part == "table":
        s.set_tail(table=s.table - 8)
    else:
        s.buf[t + 17] ^= 0x01
    s.save()
    with pytest.raises(aimass.CorruptDataError, match=match) as e:
        D.open(ds.path)
    assert "truncated" not in str(e.value)
    _inspect_fails(ds.path, capsys, match=match)


def test_truncation_is_still_reported_as_truncation(ds):
    s = _shard(ds)
    cut = s.offsets()[5] + 3
    os.truncate(s.path, cut)
    with pytest.raises(aimass.CorruptDataError, match="truncated.*record 5 is incomplete"):
        D.open(ds.path)


def test_bad_shard_header_fields(ds):
    s = _shard(ds)
    s.buf[24] = 7  # reserved header bytes (covered by the header CRC)
    s.save()
    with pytest.raises(aimass.CorruptDataError, match="header checksum"):
        D.open(ds.path)


# ---------------------------------------------------------------- schema fingerprint
def _edit_index(path, fn):
    ip = os.path.join(path, "index.json")
    idx = json.load(open(ip))
    fn(idx)
    open(ip, "w").write(json.dumps(idx))


def test_reordered_equal_size_fields_fail_on_open(tmp_path, capsys):
    a = np.arange(40, dtype=np.uint8).reshape(10, 4)
    ds = D.write(tmp_path / "ds", {"a": a, "b": a + 100})
    _edit_index(ds.path, lambda idx: idx["schema"].reverse())
    with pytest.raises(aimass.CorruptDataError, match="schema does not match the one the shard was written with"):
        D.open(ds.path)
    _inspect_fails(ds.path, capsys, match="schema fingerprint")
    # renamed, or retyped to a type of equal size: the same
    _edit_index(ds.path, lambda idx: idx["schema"].reverse())
    assert D.open(ds.path)[3]["b"].tolist() == (a[3] + 100).tolist()
    for edit in (lambda idx: idx["schema"][0].update(name="c"),
                 lambda idx: idx["schema"][0].update(dtype="int8"),
                 lambda idx: idx["schema"][0].update(shape=[2, 2])):
        ds2 = D.write(tmp_path / "e", {"a": a, "b": a + 100}, overwrite=True)
        _edit_index(ds2.path, edit)
        with pytest.raises(aimass.CorruptDataError, match="schema fingerprint"):
            D.open(ds2.path)


def test_inspect_reports_version_and_fingerprint(ds):
    info = D.inspect(ds.path)
    assert info["format_version"] == 2 and info["shard_versions"] == [2]
    assert len(info["schema_fingerprint"]) == 16


def _write_v1_dataset(path, x):
    """A version-1 dataset as aimass 0.1 wrote it (16-byte shard header, no fingerprint)."""
    os.makedirs(path)
    crc = lambda b: _mask(D.crc32c(b))  # noqa: E731
    head = b"AIMASSRC" + struct.pack("<I", 1)
    out = bytearray(head + struct.pack("<I", crc(head)))
    offsets = []
    for row in x:
        payload = row.tobytes()
        offsets.append(len(out))
        ln = struct.pack("<Q", len(payload))
        out += ln + struct.pack("<I", crc(ln)) + payload + struct.pack("<I", crc(payload))
    table = len(out)
    body = struct.pack(f"<{len(offsets)}Q", *offsets) + struct.pack("<QQ", len(offsets), table)
    out += body + struct.pack("<II", crc(body), 0) + b"AIMRECFT"
    open(os.path.join(path, "part-00000.rec"), "wb").write(bytes(out))
    idx = {"format": "aimass-records", "version": 1, "num_records": len(x),
           "schema": [{"name": "x", "dtype": "uint8", "shape": list(x.shape[1:])}],
           "shards": [{"file": "part-00000.rec", "records": len(x), "bytes": len(out), "sha256": "0" * 64}],
           "splits": {}, "metadata": {}}
    open(os.path.join(path, "index.json"), "w").write(json.dumps(idx))


def test_version_1_datasets_still_open(tmp_path):
    x = np.arange(60, dtype=np.uint8).reshape(10, 6)
    _write_v1_dataset(tmp_path / "v1", x)
    ds = D.open(tmp_path / "v1")
    assert len(ds) == 10 and ds.verify(sha256=False) == 10
    np.testing.assert_array_equal(ds.column("x"), x)
    info = D.inspect(tmp_path / "v1", verify=False)
    assert info["format_version"] == 1 and info["schema_fingerprint"] is None
    # a version-2 index does not accept a version-1 shard (it would skip the fingerprint check)
    _edit_index(str(tmp_path / "v1"), lambda idx: idx.update(version=2))
    with pytest.raises(aimass.CorruptDataError, match="format version 1"):
        D.open(tmp_path / "v1")


# ---------------------------------------------------------------- index.json
@pytest.mark.parametrize("edit,exc,match", [
    (lambda i: i.update(num_records=41), aimass.CorruptDataError, "num_records is 41 but the shards list 40"),
    (lambda i: i.update(num_records=1e300), aimass.CorruptDataError, "num_records"),
    (lambda i: i.update(num_records="40"), aimass.CorruptDataError, "num_records must be an integer"),
    (lambda i: i.update(num_records=39.5), aimass.CorruptDataError, "not an integer"),
    (lambda i: i.pop("shards"), aimass.CorruptDataError, "lacks 'shards'"),
    (lambda i: i.update(schema={"x": 1}), aimass.CorruptDataError, "'schema' must be a list"),
    (lambda i: i["shards"][0].update(file="../ds/part-00000.rec"), aimass.CorruptDataError, "plain file name"),
    (lambda i: i["shards"][0].update(file="/etc/passwd"), aimass.CorruptDataError, "plain file name"),
    (lambda i: i["shards"].append(dict(i["shards"][0])), aimass.CorruptDataError, "listed twice"),
    (lambda i: i["shards"][0].update(records=39), aimass.CorruptDataError, "num_records"),
    (lambda i: i["shards"][0].update(bytes=12), aimass.CorruptDataError, "says 12 bytes"),
    (lambda i: i["schema"][0].update(shape=[2**40, 2**40]), ValueError, "schema: field .x. shape.*overflows"),
    (lambda i: i["schema"][0].update(shape=[2**62, 4]), aimass.CorruptDataError, "shape\\[0\\]"),
    (lambda i: i["schema"][0].update(shape=[float("inf")]), aimass.CorruptDataError, "inf is not an integer"),
    (lambda i: i.update(metadata=[1, 2]), aimass.CorruptDataError, "'metadata' must be a JSON object"),
    (lambda i: i.update(format="other"), ValueError, "not an aimass dataset index"),
])
def test_index_edits_are_reported(ds, capsys, edit, exc, match):
    _edit_index(ds.path, edit)
    with pytest.raises(exc, match=match):
        D.open(ds.path)
    err = _inspect_fails(ds.path, capsys, code=1 if exc is aimass.CorruptDataError else 2)
    assert err.startswith("CORRUPT: " if exc is aimass.CorruptDataError else "error: ")


def test_index_with_repeated_keys_or_bad_splits(ds, capsys):
    ip = os.path.join(ds.path, "index.json")
    text = open(ip).read()
    open(ip, "w").write(text.replace('"splits": {}', '"splits": {}, "splits": {"a": "x.npy"}'))
    with pytest.raises(aimass.CorruptDataError, match="repeats the keys"):
        D.open(ds.path)
    open(ip, "w").write(text.replace('"splits": {}', '"splits": {"train": "../../etc/passwd"}'))
    _inspect_fails(ds.path, capsys, match="splits")
    with pytest.raises(aimass.CorruptDataError, match="splits"):
        D.open_split(ds.path, "train")
    open(os.path.join(ds.path, "t.npy"), "wb").write(b"not numpy")
    open(ip, "w").write(text.replace('"splits": {}', '"splits": {"train": "t.npy"}'))
    _inspect_fails(ds.path, capsys, match="split 'train'")
    np.save(os.path.join(ds.path, "t.npy"), np.array([0, 99]))
    with pytest.raises(aimass.CorruptDataError, match="outside"):
        D.open_split(ds.path, "train")


def test_garbage_index_never_crashes_inspect(ds, capsys):
    ip = os.path.join(ds.path, "index.json")
    good = open(ip, "rb").read()
    rng = np.random.default_rng(5)
    for k in range(60):
        buf = bytearray(good)
        for _ in range(1 + k % 4):
            buf[rng.integers(len(buf))] = rng.integers(256)
        open(ip, "wb").write(bytes(buf))
        rc = cli.main(["data", "inspect", ds.path, "--no-verify"])
        captured = capsys.readouterr()
        assert rc in (0, 1, 2) and "Traceback" not in captured.err
        if rc:
            assert len(captured.err.strip().splitlines()) == 1, captured.err


# ---------------------------------------------------------------- loader
@pytest.mark.parametrize("bs", [2**61, 2**63 - 1, 2**40, 41])
def test_huge_batch_size_is_capped_at_the_samples(ds, bs):
    loader = D.Loader(ds, bs, seed=0, num_threads=1)
    assert len(loader) == 1
    batches = list(loader)
    assert len(batches) == 1 and sorted(batches[0]["y"].tolist()) == list(range(40))
    loader = D.Loader(ds, bs, rank=1, world_size=3, shuffle=False)
    assert len(loader) == 1 and len(next(iter(loader))["y"]) == 14


@pytest.mark.parametrize("kw,match", [
    ({"batch_size": 2**63}, "batch_size must be in"),
    ({"batch_size": 0}, "batch_size must be in"),
    ({"batch_size": -(2**63)}, "batch_size must be in"),
    ({"batch_size": 4, "prefetch": 2**40}, "prefetch must be in"),
    ({"batch_size": 4, "num_threads": 2**31}, "num_threads must be in"),
    ({"batch_size": 4, "rank": 3, "world_size": 3}, "rank must be in"),
    ({"batch_size": 4, "rank": 0, "world_size": 2**40}, "world_size must be in"),
    ({"batch_size": 4, "seed": 2**64}, "seed must be in"),
    ({"batch_size": 4, "transforms": [D.OneHot("y", 2**62)]}, "overflows"),
    ({"batch_size": 8, "transforms": [D.OneHot("y", 2**44)]}, "lower batch_size"),
])
def test_loader_arguments_out_of_range(ds, kw, match):
    kw = dict(kw)
    with pytest.raises(ValueError, match=match):
        D.Loader(ds, kw.pop("batch_size"), **kw)


def test_drop_last_with_a_huge_batch(ds):
    with pytest.raises(ValueError, match="no full batch"):
        D.Loader(ds, 2**62, drop_last=True)


def test_load_state_dict_checks_the_dataset_and_keys(tmp_path, ds):
    run = D.Loader(ds, 8, seed=3)
    it = iter(run)
    next(it)
    state = run.state_dict()
    assert len(state["dataset"]) == 32
    other = D.write(tmp_path / "other", {"x": np.ones((40, 6), np.uint8), "y": np.arange(40)})
    with pytest.raises(ValueError, match="another dataset"):
        D.Loader(other, 8, seed=3).load_state_dict(state)
    # a subset of the same size is another sample set too
    with pytest.raises(ValueError, match="another dataset"):
        D.Loader(ds.subset(np.arange(40)[::-1]), 8, seed=3).load_state_dict(state)
    for key in ("epoch", "batch", "dataset", "seed"):
        bad = {k: v for k, v in state.items() if k != key}
        with pytest.raises(ValueError, match=f"lacks '{key}'"):
            D.Loader(ds, 8, seed=3).load_state_dict(bad)
    with pytest.raises(ValueError, match="must be an int"):
        D.Loader(ds, 8, seed=3).load_state_dict({**state, "epoch": "1"})
    with pytest.raises(TypeError, match="state must be a dict"):
        D.Loader(ds, 8, seed=3).load_state_dict([1, 2])
    resumed = D.Loader(D.open(ds.path), 8, seed=3)  # the same dataset reopened: accepted
    resumed.load_state_dict(state)
    assert resumed.state_dict()["batch"] == 1


def test_a_fifo_or_directory_in_a_shards_place(ds, capsys):
    shard = os.path.join(ds.path, ds.shards[0]["file"])
    os.remove(shard)
    os.mkfifo(shard)  # opening it for reading would block forever
    with pytest.raises(aimass.CorruptDataError, match="not a regular file"):
        D.open(ds.path)
    os.remove(shard)
    os.mkdir(shard)
    _inspect_fails(ds.path, capsys, match="not a regular file")
