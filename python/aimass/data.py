"""Datasets as sharded, checksummed record files, and a native multi-threaded loader.

    aimass.data.write("ds", {"image": X, "label": y})      # X: uint8[N,32,32,3], y: int64[N]
    ds = aimass.data.open("ds")                             # len(ds), ds[i] -> {"image": ..., "label": ...}
    for batch in aimass.data.Loader(ds, 256, seed=0):       # dict of numpy views (or torch tensors)
        ...

The byte layout is in docs/format.md. Records are read through memory maps by C++
worker threads that check each record's CRC32C, apply fused transforms and fill
batch buffers from a reusable pool; batches reach Python as zero-copy views.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import uuid
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence

import numpy as np

from . import _C
from ._array import as_numpy

CorruptDataError = _C.CorruptDataError

FORMAT_NAME = "aimass-records"
FORMAT_VERSION = 1
INDEX_FILE = "index.json"

__all__ = [
    "write", "open", "Dataset", "Loader", "CorruptDataError", "crc32c",
    "Cast", "Normalize", "RandomCrop", "RandomHorizontalFlip", "OneHot",
]


def crc32c(data, impl: str = "auto", crc: int = 0) -> int:
    """CRC32C of a bytes-like object ('auto' uses SSE4.2 when present; 'scalar'/'sse42' force one)."""
    return _C.data_crc32c(data, impl, crc)


# ---------------------------------------------------------------- atomic files
def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    with builtins_open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


import builtins as _builtins  # noqa: E402  (``open`` below shadows the builtin)

builtins_open = _builtins.open


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
        _atomic_write_text(os.path.join(tmp, INDEX_FILE), json.dumps(index, indent=1))
        _fsync_dir(tmp)
        old = None
        if os.path.exists(out_dir):
            old = f"{tmp}.old"
            os.rename(out_dir, old)
        os.rename(tmp, out_dir)
        _fsync_dir(parent)
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
            _index = _read_index(self.path)
            names = [s["file"] for s in _index["shards"]]
            for nm in names:
                if not os.path.isfile(os.path.join(self.path, nm)):
                    raise CorruptDataError(f"shard {nm} listed in {self.path}/{INDEX_FILE} is missing")
            spec = [(f["name"], f["dtype"], list(f["shape"])) for f in _index["schema"]]
            _reader = _C.DataReader(spec, [os.path.join(self.path, nm) for nm in names], names)
            counts = _reader.shard_records()
            for s, c in zip(_index["shards"], counts):
                if s["records"] != c:
                    raise CorruptDataError(f"shard {s['file']}: index.json says {s['records']} records, "
                                           f"the shard holds {c}; the dataset is damaged")
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


def _read_index(path: str) -> dict:
    ip = os.path.join(path, INDEX_FILE)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"dataset directory {path} does not exist")
    if not os.path.isfile(ip):
        raise FileNotFoundError(f"{path} has no {INDEX_FILE}: not an aimass dataset (write one with "
                                "aimass.data.write)")
    try:
        with builtins_open(ip) as f:
            index = json.load(f)
    except json.JSONDecodeError as exc:
        raise CorruptDataError(f"{ip} is not valid JSON ({exc}); the dataset is damaged") from None
    if index.get("format") != FORMAT_NAME:
        raise ValueError(f"{ip}: not an aimass dataset index (format={index.get('format')!r})")
    if index.get("version") != FORMAT_VERSION:
        raise ValueError(f"{ip}: format version {index.get('version')} is not supported "
                         f"(this aimass reads version {FORMAT_VERSION})")
    for key in ("schema", "shards", "num_records"):
        if key not in index:
            raise CorruptDataError(f"{ip} lacks '{key}'; the dataset is damaged")
    return index


def open(path: str) -> Dataset:  # noqa: A001 - the module's verb, like json.load
    """Open a dataset directory written by :func:`write`."""
    return Dataset(path)


# ---------------------------------------------------------------- transforms
class _Transform:
    kind = -1

    def __init__(self, field: str):
        if not isinstance(field, str) or not field:
            raise TypeError(f"{type(self).__name__}: field must be a field name, got {field!r}")
        self.field = field

    def spec(self) -> dict:
        d = {k: v for k, v in vars(self).items()}
        d["kind"] = self.kind
        return d

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


class Cast(_Transform):
    """x -> dtype(x * scale), e.g. uint8 pixels to float32 in [0, 1]."""
    kind = 0

    def __init__(self, field: str, dtype: str = "float32", scale: float = 1 / 255):
        super().__init__(field)
        if dtype not in ("float32", "float16", "bfloat16"):
            raise TypeError(f"Cast: dtype must be 'float32', 'float16' or 'bfloat16', got {dtype!r}")
        self.dtype, self.scale = dtype, float(scale)


class Normalize(_Transform):
    """x -> (x - mean[c]) / std[c] over the last (channel) dimension; fused with a preceding Cast."""
    kind = 1

    def __init__(self, field: str, mean, std):
        super().__init__(field)
        self.mean = [float(v) for v in np.atleast_1d(mean)]
        self.std = [float(v) for v in np.atleast_1d(std)]


class RandomCrop(_Transform):
    """Zero-pad an HWC image by `padding` and crop a random size[0] x size[1] window (seeded per sample)."""
    kind = 2

    def __init__(self, field: str, size, padding: int = 0):
        super().__init__(field)
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        self.crop_h, self.crop_w, self.padding = int(h), int(w), int(padding)


class RandomHorizontalFlip(_Transform):
    """Mirror an HWC image left-right with probability p (seeded per sample)."""
    kind = 3

    def __init__(self, field: str, p: float = 0.5):
        super().__init__(field)
        self.p = float(p)


class OneHot(_Transform):
    """An integer label -> a one-hot vector of num_classes."""
    kind = 4

    def __init__(self, field: str, num_classes: int, dtype: str = "float32"):
        super().__init__(field)
        self.num_classes, self.dtype = int(num_classes), dtype


# ---------------------------------------------------------------- loader
def _default_rank_world():
    dist = sys.modules.get("aimass.dist")
    if dist is not None and dist.is_initialized():
        return dist.rank(), dist.size()
    return 0, 1


class Loader:
    """Batches of a Dataset, read and transformed by C++ worker threads.

    Order: one global permutation per epoch, a pure function of (seed, epoch),
    identical on every rank. Rank r takes positions r, r + W, r + 2W, ... of it.
    Every rank gets the same number of batches: with ``drop_last=False`` the
    permutation is padded by wrapping around to ceil(N / W) samples per rank (so a
    few samples appear twice when W does not divide N) and the last batch may be
    short; with ``drop_last=True`` each rank takes floor(N / W) samples and only
    full batches. Iterating runs the current epoch from the loader's position and
    then advances the epoch; ``set_epoch(e)`` restarts at epoch e's first batch;
    ``state_dict()``/``load_state_dict()`` resume exactly mid-epoch.

    Batches are dicts of numpy arrays (``output="torch"``: torch tensors) that are
    zero-copy views of pool buffers; a buffer goes back to the pool when its
    arrays are released, so keep a copy if you hold batches for long.
    """

    def __init__(self, dataset: Dataset, batch_size: int, shuffle: bool = True, seed: int = 0,
                 rank: Optional[int] = None, world_size: Optional[int] = None, drop_last: bool = False,
                 num_threads: Optional[int] = None, prefetch: int = 2,
                 transforms: Optional[Sequence[_Transform]] = None, output: str = "numpy",
                 pin_memory: bool = False, verify: bool = True):
        if not isinstance(dataset, Dataset):
            raise TypeError(f"Loader: dataset must be an aimass.data.Dataset (aimass.data.open(dir)), "
                            f"got {type(dataset).__name__}")
        for nm, v in (("batch_size", batch_size), ("prefetch", prefetch), ("seed", seed)):
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool):
                raise TypeError(f"Loader: {nm} must be an int, got {v!r}")
        if seed < 0:
            raise ValueError(f"Loader: seed must be >= 0, got {seed}")
        if output not in ("numpy", "torch"):
            raise ValueError(f"Loader: output must be 'numpy' or 'torch', got {output!r}"
                             + (" (cupy output needs aimass's CUDA build)" if output == "cupy" else ""))
        if pin_memory:
            raise ValueError("Loader: pin_memory=True needs a CUDA device; this build/host has none")
        if (rank is None) != (world_size is None):
            raise ValueError("Loader: give both rank and world_size, or neither (then aimass.dist decides)")
        if rank is None:
            rank, world_size = _default_rank_world()
        if num_threads is None:
            from . import num_threads as _nt
            num_threads = max(1, min(4, _nt()))
        transforms = list(transforms or [])
        for t in transforms:
            if not isinstance(t, _Transform):
                raise TypeError(f"Loader: transforms must be aimass.data transforms (Cast, Normalize, ...), "
                                f"got {type(t).__name__}")
        self.dataset = dataset
        self.batch_size, self.shuffle, self.seed = int(batch_size), bool(shuffle), int(seed)
        self.rank, self.world_size, self.drop_last = int(rank), int(world_size), bool(drop_last)
        self.output = output
        indices = dataset.indices if dataset.indices is not None else np.empty(0, dtype=np.int64)
        if dataset.indices is not None and dataset.indices.size == 0:
            raise ValueError("Loader: the dataset is empty")
        self._core = _C.DataLoader(dataset._reader, indices, self.batch_size, self.shuffle, self.seed,
                                   self.rank, self.world_size, self.drop_last, int(num_threads), int(prefetch),
                                   bool(verify), [t.spec() for t in transforms])
        self._outputs = self._core.outputs()
        self._names = [o[0] for o in self._outputs]
        self._bf16 = [o[1] == "bfloat16" for o in self._outputs]
        self._epoch = 0
        self._batch = 0  # batches of the current epoch already handed out
        self._torch = None
        if output == "torch":
            import torch
            self._torch = torch

    def __len__(self) -> int:
        return self._core.batches_per_epoch

    @property
    def epoch(self) -> int:
        return self._epoch

    def set_epoch(self, epoch: int) -> None:
        """Start epoch `epoch` at its first batch on the next iteration."""
        if not isinstance(epoch, (int, np.integer)) or epoch < 0:
            raise ValueError(f"set_epoch: epoch must be an int >= 0, got {epoch!r}")
        self._epoch, self._batch = int(epoch), 0

    def _fingerprint(self) -> dict:
        return {"num_samples": self._core.num_samples, "batch_size": self.batch_size, "shuffle": self.shuffle,
                "seed": self.seed, "rank": self.rank, "world_size": self.world_size,
                "drop_last": self.drop_last}

    def state_dict(self) -> dict:
        """Where this loader is: {epoch, batch (handed out this epoch), and its configuration}."""
        return {"epoch": self._epoch, "batch": self._batch, **self._fingerprint()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume at `state`: the next batches are exactly those an uninterrupted run would give."""
        fp = self._fingerprint()
        for k, v in fp.items():
            if k in state and state[k] != v:
                raise ValueError(f"load_state_dict: state has {k}={state[k]!r} but this loader has {k}={v!r}; "
                                 "resume needs the same dataset, batch size, seed and world")
        epoch, batch = int(state["epoch"]), int(state["batch"])
        if epoch < 0 or not 0 <= batch <= len(self):
            raise ValueError(f"load_state_dict: epoch {epoch} / batch {batch} out of range")
        self._epoch, self._batch = epoch, batch

    def _wrap(self, arrays) -> Dict[str, Any]:
        t = self._torch
        if t is None:
            return dict(zip(self._names, arrays))
        out = {}
        for nm, a, bf in zip(self._names, arrays, self._bf16):
            ten = t.from_dlpack(a)
            out[nm] = ten.view(t.bfloat16) if bf else ten
        return out

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        core = self._core
        core.start(self._epoch, self._batch)
        while True:
            arrays = core.next()
            if arrays is None:
                break
            self._batch += 1
            yield self._wrap(arrays)
        self._epoch += 1
        self._batch = 0

    def close(self) -> None:
        """Stop the worker threads now (also happens when the loader is garbage collected)."""
        self._core.stop()
