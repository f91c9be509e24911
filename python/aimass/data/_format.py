"""The record format seen from Python: write a dataset directory, open it, read records.

The byte layout is in docs/format.md; the shard reader is C++ (aimass._C.DataReader)."""
from __future__ import annotations

import builtins
import hashlib
import json
import os
import shutil
import uuid
from typing import Any, Dict, Iterator, List, Mapping, Optional

import numpy as np

from .._io import atomic_write_text, fsync_dir
from .. import _C
from .._array import as_numpy

CorruptDataError = _C.CorruptDataError

FORMAT_NAME = "aimass-records"
FORMAT_VERSION = 2  # written; version 1 datasets (no schema fingerprint in the shards) are still read
INDEX_FILE = "index.json"

builtins_open = builtins.open  # ``open`` below is the module's verb


def crc32c(data, impl: str = "auto", crc: int = 0) -> int:
    """CRC32C of a bytes-like object ('auto' uses SSE4.2 when present; 'scalar'/'sse42' force one)."""
    return _C.data_crc32c(data, impl, crc)


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with builtins_open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------- write
def _columns(arrays: Mapping[str, Any]):
    if not isinstance(arrays, Mapping) or not arrays:
        raise TypeError("write: arrays must be a non-empty dict {field name: array}, "
                        f"got {type(arrays).__name__}")
    schema, cols, dim0s, n = [], [], [], None
    for name, value in arrays.items():
        if not isinstance(name, str) or not name:
            raise TypeError(f"write: field names must be non-empty strings, got {name!r}")
        if isinstance(value, (list, tuple)):
            # variable first dimension: one array per record, equal trailing dims and dtype
            parts = [as_numpy(v, f"arrays[{name!r}][{i}]") for i, v in enumerate(value)]
            if not parts:
                raise ValueError(f"write: field {name!r} is an empty list")
            dts = {dt for _, dt in parts}
            tails = {p.shape[1:] for p, _ in parts}
            if len(dts) != 1 or len(tails) != 1 or any(p.ndim == 0 for p, _ in parts):
                raise ValueError(f"write: variable field {name!r} needs arrays of one dtype with at least one "
                                 f"dimension and equal trailing dimensions; got dtypes {sorted(dts)}, "
                                 f"trailing shapes {sorted(tails)}")
            dt = dts.pop()
            data = np.ascontiguousarray(np.concatenate([p for p, _ in parts]))
            d0 = np.array([p.shape[0] for p, _ in parts], dtype=np.int64)
            schema.append((name, dt, [-1, *tails.pop()]))
            count = len(parts)
        else:
            a, dt = as_numpy(value, f"arrays[{name!r}]")
            if a.ndim == 0:
                raise ValueError(f"write: field {name!r} is a scalar; give one row per record (shape [N, ...])")
            if dt not in _DTYPES:
                raise TypeError(f"write: field {name!r} has unsupported dtype {dt}; use one of {sorted(_DTYPES)}")
            data, d0 = np.ascontiguousarray(a), None
            schema.append((name, dt, list(a.shape[1:])))
            count = a.shape[0]
        if n is None:
            n = count
        elif count != n:
            raise ValueError(f"write: field {name!r} has {count} records, the first field has {n}; "
                             "every field needs the same number of records")
        cols.append(data)
        dim0s.append(d0)
    return schema, cols, dim0s, int(n)


_DTYPES = {"float32", "float64", "float16", "bfloat16", "int8", "uint8", "int16", "int32", "int64", "bool"}


def write(out_dir: str, arrays: Mapping[str, Any], shard_bytes: int = 64 << 20, overwrite: bool = False,
          metadata: Optional[dict] = None) -> "Dataset":
    """Write `arrays` ({field: array[N, ...]} of numpy/torch arrays, or a list of N arrays
    for a field whose first dimension varies) as a dataset directory, atomically.

    Shards hold about `shard_bytes` each. The whole directory is built under a
    temporary name, fsynced and renamed, so a reader never sees half a dataset.
    `metadata` (JSON-serialisable) is kept in index.json (e.g. {"classes": [...]})."""
    if not isinstance(shard_bytes, int) or isinstance(shard_bytes, bool) or shard_bytes <= 0:
        raise ValueError(f"write: shard_bytes must be a positive int, got {shard_bytes!r}")
    schema, cols, dim0s, n = _columns(arrays)
    out_dir = os.path.abspath(os.fspath(out_dir))
    if os.path.exists(out_dir) and not overwrite:
        raise FileExistsError(f"write: {out_dir} exists; pass overwrite=True to replace it")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(out_dir)}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    os.mkdir(tmp)
    try:
        shards = _C.data_write_shards(tmp, schema, cols, dim0s, n, shard_bytes)
        index = {
            "format": FORMAT_NAME, "version": FORMAT_VERSION, "num_records": n,
            "schema": [{"name": nm, "dtype": dt, "shape": sh} for nm, dt, sh in schema],
            "shards": [{"file": f, "records": r, "bytes": b, "sha256": _sha256(os.path.join(tmp, f))}
                       for f, r, b in shards],
            "splits": {},
            "metadata": metadata or {},
        }
        atomic_write_text(os.path.join(tmp, INDEX_FILE), _index_text(index))
        fsync_dir(tmp)
        old = None
        if os.path.exists(out_dir):
            old = f"{tmp}.old"
            os.rename(out_dir, old)
        os.rename(tmp, out_dir)
        fsync_dir(parent)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Dataset(out_dir)


# ---------------------------------------------------------------- read
class Dataset:
    """A dataset directory opened for reading (memory-mapped shards).

    ``len(ds)``, ``ds[i]`` -> {field: numpy array} (checksum verified), ``ds.schema``,
    ``ds.subset(indices)`` -> a view on some records (splits are such views)."""

    def __init__(self, path: str, indices: Optional[np.ndarray] = None, _reader=None, _index=None):
        self.path = os.path.abspath(os.fspath(path))
        if _reader is None:
            # the engine checks index.json (keys, types, counts, shard names) and opens every
            # shard against it (records, bytes, schema fingerprint); Python keeps the document
            ip, text = _index_bytes(self.path)
            _reader = _C.DataReader.open(self.path, text, ip)
            _index = _index_doc(ip, text)
        self._reader = _reader
        self._index = _index
        self.indices = None if indices is None else np.ascontiguousarray(indices, dtype=np.int64)
        if self.indices is not None and self.indices.size and (
                self.indices.min() < 0 or self.indices.max() >= len(_reader)):
            raise ValueError(f"subset indices must be in [0, {len(_reader)})")

    @property
    def schema(self) -> List[dict]:
        return [dict(f) for f in self._index["schema"]]

    @property
    def fields(self) -> List[str]:
        return [f["name"] for f in self._index["schema"]]

    @property
    def metadata(self) -> dict:
        return dict(self._index.get("metadata", {}))

    @property
    def shards(self) -> List[dict]:
        return [dict(s) for s in self._index["shards"]]

    def __len__(self) -> int:
        return len(self._reader) if self.indices is None else int(self.indices.size)

    def _record_index(self, i) -> int:
        if not isinstance(i, (int, np.integer)) or isinstance(i, bool):
            raise TypeError(f"Dataset indices must be integers, got {type(i).__name__}")
        n = len(self)
        j = int(i) + n if i < 0 else int(i)
        if not 0 <= j < n:
            raise IndexError(f"record {i} is out of range for a dataset of {n} records")
        return j if self.indices is None else int(self.indices[j])

    def __getitem__(self, i) -> Dict[str, np.ndarray]:
        vals = self._reader.record(self._record_index(i), True)
        return dict(zip(self.fields, vals))

    def __iter__(self) -> Iterator[Dict[str, np.ndarray]]:
        for i in range(len(self)):
            yield self[i]

    def subset(self, indices) -> "Dataset":
        """A view on records `indices` (positions in this dataset); records are not copied."""
        idx = np.asarray(indices, dtype=np.int64)
        if idx.ndim != 1:
            raise ValueError("subset: indices must be one-dimensional")
        if self.indices is not None:
            if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
                raise ValueError(f"subset indices must be in [0, {len(self)})")
            idx = self.indices[idx]
        return Dataset(self.path, idx, self._reader, self._index)

    def column(self, name: str) -> np.ndarray:
        """A fixed-shape field of every record, stacked (reads all records)."""
        if name not in self.fields:
            raise KeyError(f"unknown field {name!r}; fields are {self.fields}")
        from ._loader import Loader
        loader = Loader(self, batch_size=max(1, min(len(self), 4096)), shuffle=False, rank=0, world_size=1,
                        num_threads=1)
        return np.concatenate([b[name].copy() for b in loader])

    def verify(self, sha256: bool = True) -> int:
        """Check every record's checksums (and each shard's sha256); returns the records checked."""
        if sha256:
            for s in self._index["shards"]:
                got = _sha256(os.path.join(self.path, s["file"]))
                if got != s["sha256"]:
                    raise CorruptDataError(f"shard {s['file']}: sha256 {got} does not match index.json "
                                           f"({s['sha256']}); the shard is damaged")
        return self._reader.verify_all()

    def __repr__(self) -> str:
        sch = ", ".join(f"{f['name']}: {f['dtype']}{f['shape']}" for f in self._index["schema"])
        return f"Dataset({self.path!r}, {len(self)} records, {{{sch}}})"


def _index_bytes(path: str):
    """(path of index.json, its bytes) for the dataset directory `path`."""
    ip = os.path.join(path, INDEX_FILE)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"dataset directory {path} does not exist")
    if not os.path.isfile(ip):
        raise FileNotFoundError(f"{path} has no {INDEX_FILE}: not an aimass dataset (write one with "
                                "aimass.data.write)")
    with builtins_open(ip, "rb") as f:
        return ip, f.read()


def _no_duplicate_keys(pairs):
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        dup = sorted({k for k in keys if keys.count(k) > 1})
        raise CorruptDataError(f"a JSON object repeats the keys {dup}")
    return dict(pairs)


def _index_doc(ip: str, text: bytes) -> dict:
    """index.json's document; `text` has already passed the engine's checks."""
    try:
        doc = json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, CorruptDataError
        raise CorruptDataError(f"{ip} cannot be read ({exc}); the dataset is damaged (restore index.json or "
                               "rewrite the dataset)") from None
    for key in ("metadata", "splits"):
        if not isinstance(doc.get(key, {}), dict):
            raise CorruptDataError(f"{ip}: '{key}' must be a JSON object; the dataset is damaged")
    return doc


def _index_text(index: dict) -> str:
    try:
        return json.dumps(index, indent=1, allow_nan=False)
    except ValueError:
        raise ValueError("index.json: metadata must be plain JSON (no NaN or infinity values)") from None


def _read_index(path: str) -> dict:
    """index.json of the dataset directory `path`, checked by the engine."""
    ip, text = _index_bytes(path)
    _C.data_parse_index(text, ip)
    return _index_doc(ip, text)


def open(path: str) -> Dataset:  # noqa: A001 - the module's verb, like json.load
    """Open a dataset directory written by :func:`write`."""
    return Dataset(path)



# ---------------------------------------------------------------- inspect
def _split_files(ds: "Dataset") -> Dict[str, str]:
    """index.json's splits {name: file}, each a plain file name in the dataset directory."""
    splits = ds._index.get("splits") or {}
    if not isinstance(splits, dict) or not all(
            isinstance(k, str) and isinstance(f, str) and f and os.path.basename(f) == f and not f.startswith(".")
            for k, f in splits.items()):
        raise CorruptDataError(f"{ds.path}/{INDEX_FILE}: 'splits' must map split names to file names in the "
                               "dataset directory; the dataset is damaged (run aimass.data.split again)")
    return splits


def _load_split(ds: "Dataset", name: str, fname: str, mmap_mode=None) -> np.ndarray:
    try:
        idx = np.load(os.path.join(ds.path, fname), mmap_mode=mmap_mode, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise CorruptDataError(f"split {name!r} ({fname}) cannot be read ({exc}); run aimass.data.split again") \
            from None
    if idx.ndim != 1 or idx.dtype.kind not in "iu":
        raise CorruptDataError(f"split {name!r} ({fname}) is not a 1-D integer index array; run aimass.data.split "
                               "again")
    return idx


def inspect(path: str, verify: bool = True) -> dict:
    """Schema, counts, class balance and (verify) a check of every checksum."""
    ds = Dataset(path)
    versions = sorted(set(ds._reader.shard_versions()))
    info = {"path": ds.path, "records": len(ds), "shards": len(ds.shards),
            "bytes": sum(s["bytes"] for s in ds.shards), "schema": ds.schema,
            "format_version": ds._index["version"], "shard_versions": versions,
            "schema_fingerprint": ds._reader.schema_fingerprint if 2 in versions else None,
            "splits": {}, "metadata": ds.metadata}
    for k, f in _split_files(ds).items():
        info["splits"][k] = int(_load_split(ds, k, f, mmap_mode="r").shape[0])
    meta = ds.metadata
    label = meta.get("label_field") or "label"
    if label in ds.fields:
        field = next(f for f in ds.schema if f["name"] == label)
        if field["shape"] in ([], [1]) and field["dtype"].startswith(("int", "uint")):
            vals, counts = np.unique(ds.column(label), return_counts=True)
            classes = meta.get("classes") if isinstance(meta.get("classes"), list) else None
            info["class_balance"] = {
                (str(classes[int(v)]) if classes and 0 <= int(v) < len(classes) else str(int(v))): int(c)
                for v, c in zip(vals, counts)}
    if verify:
        info["verified_records"] = ds.verify(sha256=True)
    return info
