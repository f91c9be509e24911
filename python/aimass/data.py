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
import warnings
from collections import deque
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence

import numpy as np

from ._io import atomic_path, atomic_write_text, fsync_dir
from . import _C
from ._array import as_numpy

CorruptDataError = _C.CorruptDataError

FORMAT_NAME = "aimass-records"
FORMAT_VERSION = 1
INDEX_FILE = "index.json"

__all__ = [
    "write", "open", "Dataset", "Loader", "CorruptDataError", "crc32c",
    "Cast", "Normalize", "RandomCrop", "RandomHorizontalFlip", "OneHot", "CFunc",
    "clean", "CleanReport", "from_csv", "from_npy", "from_image_folder", "split", "Splits", "open_split",
    "inspect",
]


def crc32c(data, impl: str = "auto", crc: int = 0) -> int:
    """CRC32C of a bytes-like object ('auto' uses SSE4.2 when present; 'scalar'/'sse42' force one)."""
    return _C.data_crc32c(data, impl, crc)


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
        atomic_write_text(os.path.join(tmp, INDEX_FILE), json.dumps(index, indent=1))
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


class CFunc(_Transform):
    """A user transform compiled to a C function that the C++ workers call without
    the GIL, e.g. a numba ``@cfunc(types.int32(types.voidptr, types.int64, types.voidptr,
    types.int64, types.int64, types.uint64))``. C signature (docs/format.md)::

        int32_t fn(const void* in, int64_t in_bytes, void* out, int64_t out_bytes,
                   int64_t record, uint64_t seed);   // return 0 on success

    `in` is the field as stored for one record (in_bytes = prod(stored shape) *
    itemsize), `out` the sample's slot of dtype `dtype` and per-sample `shape`
    (out_bytes bytes, all of which fn must write); `record` is the dataset index and
    `seed` a per-sample value derived from (seed, epoch, record, field) for
    reproducible randomness. A non-zero return stops the epoch with ValueError.
    `fn` is a numba cfunc (its ``.address``), a ctypes function pointer (ctypes
    callbacks take the GIL, so they are for testing), or an int address; the loader
    keeps `fn` alive. It must be the only transform on its field."""
    kind = 5

    def __init__(self, field: str, fn, dtype: str, shape):
        super().__init__(field)
        if hasattr(fn, "address"):
            address = int(fn.address)
        elif isinstance(fn, int):
            address = fn
        else:
            import ctypes
            if not isinstance(fn, ctypes._CFuncPtr):
                raise TypeError("CFunc: fn must be a numba cfunc, a ctypes function pointer or an address, "
                                f"got {type(fn).__name__}")
            address = ctypes.cast(fn, ctypes.c_void_p).value
        if not address:
            raise ValueError("CFunc: fn has a null address")
        if dtype not in _DTYPES:
            raise TypeError(f"CFunc: dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        self.fn = fn
        self.address, self.dtype = int(address), dtype
        self.shape = [int(d) for d in ((shape,) if isinstance(shape, int) else shape)]

    def spec(self) -> dict:
        d = super().spec()
        del d["fn"]
        return d


# ---------------------------------------------------------------- loader
def _default_rank_world():
    dist = sys.modules.get("aimass.dist")
    if dist is not None and dist.is_initialized():
        return dist.rank(), dist.size()
    return 0, 1


def _pinned_allocator():
    """((alloc, free) addresses of aimass._cuda's cudaHostAlloc-backed allocator, "") when
    pinned memory can be had here, else (None, why not)."""
    from . import cuda
    m = cuda._module()
    if m is None:
        return None, "aimass was built without CUDA (nvcc was not found at build time)"
    if m.device_count() == 0:
        return None, f"no CUDA device is available ({m.last_error()})"
    return tuple(m.data_pinned_allocator()), ""


_pin_warned = False


def _warn_unpinned(why: str) -> None:
    # like torch.utils.data.DataLoader: say it once, then carry on with pageable memory
    global _pin_warned
    if not _pin_warned:
        _pin_warned = True
        warnings.warn(f"Loader: pin_memory=True but {why}; batches use ordinary (pageable) host memory",
                      UserWarning, stacklevel=3)


def _cupy_or_raise():
    missing = []
    try:
        import cupy
    except ImportError:
        cupy = None
        missing.append("cupy is not installed (pip install cupy-cuda12x, matching your CUDA major version)")
    from . import cuda
    gpus = 0
    if cupy is not None:
        try:
            gpus = int(cupy.cuda.runtime.getDeviceCount())
        except Exception as exc:  # cupy raises its CUDARuntimeError without a driver
            reason = str(exc)
        else:
            reason = "the CUDA runtime reports 0 devices"
    else:
        gpus = cuda.device_count()
        reason = (cuda._module().last_error() if cuda.built()
                  else "aimass was built without CUDA and cupy is missing, so no device could be queried")
    if gpus == 0:
        missing.append(f"no CUDA GPU is available ({reason})")
    if missing:
        raise RuntimeError("Loader(output='cupy') needs cupy and a CUDA GPU: " + "; ".join(missing)
                           + ". Use output='numpy' or 'torch' on this machine.")
    return cupy


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

    ``verify``: True checks each record's CRC32C on every read; "once" checks each
    record the first time this loader reads it (shards are immutable once written,
    so later epochs skip the CRC pass); False never checks.

    Batches are dicts of numpy arrays (``output="torch"``: torch tensors) that are
    zero-copy views of pool buffers; a buffer goes back to the pool when its
    arrays are released, so memory stays flat across epochs (keep a copy if you
    hold batches for long: held buffers are not reused, new ones are allocated).

    ``pin_memory=True`` allocates the batch buffers as page-locked (pinned) host
    memory (cudaHostAlloc through aimass's CUDA module), so
    ``batch["x"].to("cuda", non_blocking=True)`` copies asynchronously. Without a
    CUDA device or without aimass's CUDA build it warns once and carries on with
    ordinary memory, as torch's DataLoader does.

    ``output="cupy"`` returns cupy arrays on the current device: each field is
    copied from the (pinned) batch buffer on the loader's own CUDA stream, and the
    current stream is made to wait for that copy, so kernels you launch on it see
    the data without a host synchronisation. bfloat16 fields come as uint16 bit
    patterns (cupy has no bfloat16). Needs cupy and a GPU; otherwise the
    constructor raises RuntimeError naming what is missing.
    """

    def __init__(self, dataset: Dataset, batch_size: int, shuffle: bool = True, seed: int = 0,
                 rank: Optional[int] = None, world_size: Optional[int] = None, drop_last: bool = False,
                 num_threads: Optional[int] = None, prefetch: int = 2,
                 transforms: Optional[Sequence[_Transform]] = None, output: str = "numpy",
                 pin_memory: bool = False, verify=True):
        if not isinstance(dataset, Dataset):
            raise TypeError(f"Loader: dataset must be an aimass.data.Dataset (aimass.data.open(dir)), "
                            f"got {type(dataset).__name__}")
        for nm, v in (("batch_size", batch_size), ("prefetch", prefetch), ("seed", seed)):
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool):
                raise TypeError(f"Loader: {nm} must be an int, got {v!r}")
        if seed < 0:
            raise ValueError(f"Loader: seed must be >= 0, got {seed}")
        if output not in ("numpy", "torch", "cupy"):
            raise ValueError(f"Loader: output must be 'numpy', 'torch' or 'cupy', got {output!r}")
        if not isinstance(pin_memory, bool):
            raise TypeError(f"Loader: pin_memory must be True or False, got {pin_memory!r}")
        cupy = _cupy_or_raise() if output == "cupy" else None
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
        if verify not in (True, False, "once"):
            raise ValueError(f"Loader: verify must be True, False or 'once', got {verify!r}")
        verify_mode = 2 if verify == "once" else int(bool(verify))
        indices = dataset.indices if dataset.indices is not None else np.empty(0, dtype=np.int64)
        if dataset.indices is not None and dataset.indices.size == 0:
            raise ValueError("Loader: the dataset is empty")
        host_alloc = host_free = 0
        self.pin_memory = False
        if pin_memory or cupy is not None:  # cupy output stages through pinned buffers when it can
            allocator, why = _pinned_allocator()
            if allocator is not None:
                host_alloc, host_free = allocator
                self.pin_memory = True
            elif pin_memory:
                _warn_unpinned(why)
        self._core = _C.DataLoader(dataset._reader, indices, self.batch_size, self.shuffle, self.seed,
                                   self.rank, self.world_size, self.drop_last, int(num_threads), int(prefetch),
                                   verify_mode, [t.spec() for t in transforms], host_alloc, host_free)
        self._outputs = self._core.outputs()
        self._names = [o[0] for o in self._outputs]
        self._bf16 = [o[1] == "bfloat16" for o in self._outputs]
        self._epoch = 0
        self._batch = 0  # batches of the current epoch already handed out
        self._transforms = transforms  # keeps user C functions alive while workers call them
        self._torch = None
        if output == "torch":
            import torch
            self._torch = torch
        self._cupy = cupy
        if cupy is not None:
            self._stream = cupy.cuda.Stream(non_blocking=True)
            self._inflight = deque()  # (copy-done event, host arrays kept out of the pool until then)

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

    @property
    def buffers_allocated(self) -> int:
        """Batch buffers allocated so far; it stops growing once the pool covers the
        prefetch window and the batches you hold (buffers are reused across epochs)."""
        return self._core.buffers_allocated

    def _to_cupy(self, arrays) -> Dict[str, Any]:
        cp, stream = self._cupy, self._stream
        out = {}
        with stream:  # allocate and copy on the loader's stream
            for nm, a in zip(self._names, arrays):
                d = cp.empty(a.shape, dtype=a.dtype)
                d.set(a, stream=stream)
                out[nm] = d
        done = stream.record()
        cp.cuda.get_current_stream().wait_event(done)  # the user's stream sees the copied data
        if self.pin_memory:
            # an async copy from pinned memory reads the buffer later: keep it from the pool until done
            inflight = self._inflight
            inflight.append((done, arrays))
            while inflight and inflight[0][0].done:
                inflight.popleft()
        return out

    def _wrap(self, arrays) -> Dict[str, Any]:
        if self._cupy is not None:
            return self._to_cupy(arrays)
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


# ---------------------------------------------------------------- clean
class CleanReport(dict):
    """What clean() dropped and why: {"input": N, "kept": K, "dropped": {reason: count},
    "dropped_indices": {reason: [indices]}}. Printed by clean()."""

    def __str__(self) -> str:
        lines = [f"clean: {self['input']} records in, {self['kept']} kept, "
                 f"{self['input'] - self['kept']} dropped"]
        for reason, count in self["dropped"].items():
            idx = self["dropped_indices"][reason]
            more = " ..." if len(idx) > 10 else ""
            lines.append(f"  {reason}: {count} (records {idx[:10]}{more})")
        return "\n".join(lines)


def _as_arrays(data) -> Dict[str, np.ndarray]:
    if isinstance(data, Dataset):
        return {name: data.column(name) for name in data.fields}
    if isinstance(data, Mapping):
        out = {}
        for k, v in data.items():
            a, _ = as_numpy(v, f"data[{k!r}]")
            out[k] = a
        return out
    raise TypeError(f"expected a Dataset or a dict of arrays, got {type(data).__name__}")


def clean(data, label: Optional[str] = None, classes=None, out_dir: Optional[str] = None,
          verbose: bool = True, **write_kwargs):
    """Drop rows with NaN values, exact-duplicate records and labels outside `classes`.

    `data` is a dict of arrays or a Dataset; `classes` is an int (labels 0..classes-1)
    or a list of allowed label values. Returns (cleaned dict of arrays, CleanReport),
    or (Dataset, CleanReport) when `out_dir` is given (the cleaned data is written
    there). Nothing is dropped silently: the report lists every dropped index."""
    arrays = _as_arrays(data)
    n = {len(a) for a in arrays.values()}
    if len(n) != 1:
        raise ValueError(f"clean: fields have different record counts {sorted(n)}")
    n = n.pop()
    drop = np.zeros(n, dtype=bool)
    reasons: Dict[str, np.ndarray] = {}
    nan = np.zeros(n, dtype=bool)
    for a in arrays.values():
        if a.dtype.kind == "f":
            nan |= np.isnan(a.reshape(n, -1)).any(axis=1)
    reasons["missing or NaN value"] = nan
    drop |= nan
    if classes is not None:
        if label is None or label not in arrays:
            raise ValueError(f"clean: classes given, so label= must name a field; fields are {list(arrays)}")
        allowed = np.arange(classes) if isinstance(classes, (int, np.integer)) else np.asarray(list(classes))
        bad = ~np.isin(arrays[label].reshape(n, -1)[:, 0], allowed) & ~drop
        reasons[f"label outside classes {allowed.tolist() if allowed.size <= 20 else f'({allowed.size})'}"] = bad
        drop |= bad
    # exact duplicates: identical bytes across every field; the first copy stays
    rows = np.concatenate([np.ascontiguousarray(a).reshape(n, -1).view(np.uint8).reshape(n, -1)
                           for a in arrays.values()], axis=1) if n else np.zeros((0, 1), np.uint8)
    keyed = np.ascontiguousarray(rows).view(np.dtype((np.void, rows.shape[1]))).ravel()
    cand = np.flatnonzero(~drop)
    _, first = np.unique(keyed[cand], return_index=True)
    dup = np.zeros(n, dtype=bool)
    dup[cand] = True
    dup[cand[first]] = False
    reasons["exact duplicate of an earlier record"] = dup
    drop |= dup
    keep = ~drop
    report = CleanReport(input=int(n), kept=int(keep.sum()),
                         dropped={r: int(m.sum()) for r, m in reasons.items()},
                         dropped_indices={r: np.flatnonzero(m).tolist() for r, m in reasons.items()})
    if verbose:
        print(report)
    cleaned = {k: a[keep] for k, a in arrays.items()}
    if out_dir is not None:
        return write(out_dir, cleaned, **write_kwargs), report
    return cleaned, report


# ---------------------------------------------------------------- converters
def from_npy(path: str, out_dir: str, name: str = "x", **write_kwargs) -> Dataset:
    """Convert a .npy file (one field called `name`) or a .npz archive (one field per key)."""
    path = os.fspath(path)
    if path.endswith(".npz"):
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    elif path.endswith(".npy"):
        arrays = {name: np.load(path, mmap_mode="r", allow_pickle=False)}
    else:
        raise ValueError(f"from_npy: {path} is neither .npy nor .npz")
    return write(out_dir, arrays, **write_kwargs)


def from_csv(path: str, out_dir: str, label: str, delimiter: str = ",", clean_rows: bool = True,
             **write_kwargs) -> Dataset:
    """Convert a CSV with a header row: the `label` column becomes field "label"
    (int64; string labels are mapped to class ids, kept in metadata["classes"]),
    every other column becomes one float32 feature of field "x" [N, F].
    With clean_rows, rows with missing values and exact duplicates are dropped
    and reported (see clean())."""
    # everything as text first: an empty cell must become "missing", never a fill value
    import csv
    with builtins_open(path, newline="", encoding="utf-8") as f:
        rows = [r for r in csv.reader(f, delimiter=delimiter) if r]
    if not rows:
        raise ValueError(f"from_csv: {path} is empty")
    names = [c.strip() for c in rows[0]]
    bad = [i + 2 for i, r in enumerate(rows[1:]) if len(r) != len(names)]
    if bad:
        raise ValueError(f"from_csv: rows {bad[:10]} do not have {len(names)} columns like the header")
    if label not in names:
        raise ValueError(f"from_csv: label column {label!r} not in the header {names}")
    cells = np.char.strip(np.array(rows[1:], dtype=str).reshape(len(rows) - 1, len(names)))
    table = {c: cells[:, j] for j, c in enumerate(names)}
    feats = [c for c in names if c != label]
    if not feats:
        raise ValueError("from_csv: the CSV has no feature columns besides the label")
    x = np.empty((len(cells), len(feats)), dtype=np.float32)
    for j, c in enumerate(feats):
        col = table[c]
        ok = col != ""
        x[:, j] = np.nan
        try:
            x[ok, j] = col[ok].astype(np.float32)
        except ValueError:
            raise ValueError(f"from_csv: column {c!r} is not numeric") from None
    lab = table[label]
    missing = lab == ""
    x[missing, 0] = np.nan  # a missing label makes the row incomplete: clean() drops it
    metadata = {"label_field": "label", "features": feats}
    try:
        y = np.where(missing, "-1", lab).astype(np.int64)
    except ValueError:  # class names: ids in sorted order, names kept in metadata
        classes = np.unique(lab[~missing])
        y = np.searchsorted(classes, lab).astype(np.int64)
        metadata["classes"] = classes.tolist()
    arrays = {"x": x, "label": y}
    if clean_rows:
        arrays, _ = clean(arrays, label="label")
    return write(out_dir, arrays, metadata=metadata, **write_kwargs)


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def from_image_folder(root: str, out_dir: str, size=(64, 64), **write_kwargs) -> Dataset:
    """Convert root/<class>/*.jpg (class = subfolder name, sorted) into fields
    "image" uint8[H, W, 3] (decoded by Pillow, RGB, resized to `size` = (H, W)) and
    "label" int64; metadata["classes"] lists the class names."""
    try:
        from PIL import Image
    except ImportError as exc:
        raise ImportError("from_image_folder needs Pillow: python -m pip install Pillow") from exc
    root = os.fspath(root)
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    if not classes:
        raise ValueError(f"from_image_folder: {root} has no class subfolders (expected root/<class>/*.jpg)")
    files, labels = [], []
    for ci, c in enumerate(classes):
        for f in sorted(os.listdir(os.path.join(root, c))):
            if f.lower().endswith(IMAGE_EXTENSIONS):
                files.append(os.path.join(root, c, f))
                labels.append(ci)
    if not files:
        raise ValueError(f"from_image_folder: no images ({', '.join(IMAGE_EXTENSIONS)}) under {root}")
    images = np.empty((len(files), h, w, 3), dtype=np.uint8)
    for i, f in enumerate(files):
        try:
            with Image.open(f) as im:
                images[i] = np.asarray(im.convert("RGB").resize((w, h), Image.BILINEAR))
        except OSError as exc:
            raise ValueError(f"from_image_folder: cannot decode {f}: {exc}") from None
    return write(out_dir, {"image": images, "label": np.asarray(labels, dtype=np.int64)},
                 metadata={"classes": classes, "label_field": "label"}, **write_kwargs)


# ---------------------------------------------------------------- split
class Splits:
    """The result of split(): .train, .valid, .test datasets (views; records not copied)."""

    def __init__(self, parts: Dict[str, Dataset]):
        self._parts = parts
        self.train, self.valid, self.test = parts.get("train"), parts.get("valid"), parts.get("test")

    def __getitem__(self, name: str) -> Dataset:
        return self._parts[name]

    def __repr__(self) -> str:
        return "Splits(" + ", ".join(f"{k}={len(v)}" for k, v in self._parts.items()) + ")"


def _read_config(config) -> dict:
    if isinstance(config, Mapping):
        return dict(config)
    import yaml
    path = os.fspath(config)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"split: config file {path} does not exist")
    with builtins_open(path) as f:
        cfg = yaml.safe_load(f) or {}
    if not isinstance(cfg, dict):
        raise ValueError(f"split: {path} must hold a mapping (data_path, download, splitting)")
    return cfg


def _label_of(ds: Dataset, stratify) -> Optional[str]:
    if stratify is None or stratify is False:
        return None
    if stratify is True:
        name = ds.metadata.get("label_field") or ("label" if "label" in ds.fields else None)
        if name is None:
            raise ValueError("split: stratify=True but the dataset names no label field; pass stratify='<field>'")
        return name
    if stratify not in ds.fields:
        raise ValueError(f"split: stratify field {stratify!r} not in {ds.fields}")
    return stratify


def split(dataset=None, config="config.yml", seed: int = 0, stratify=None, save: bool = True) -> Splits:
    """Split a dataset by the platform config's ``splitting: {train: 70, valid: 15, test: 15}``
    (percentages that must sum to 100). Seeded; with `stratify` (True or a label field)
    each class is split in the same proportions. Splits are int64 index files
    (split-<name>.npy) named in index.json; records are never copied.
    `dataset` may be a Dataset, a directory, or None (the config's data_path)."""
    cfg = _read_config(config)
    if dataset is None:
        if "data_path" not in cfg:
            raise ValueError("split: no dataset given and the config has no data_path")
        dataset = cfg["data_path"]
    ds = dataset if isinstance(dataset, Dataset) else Dataset(dataset)
    if ds.indices is not None:
        raise ValueError("split: split the whole dataset, not a subset")
    parts = cfg.get("splitting")
    if not isinstance(parts, Mapping) or not parts:
        raise ValueError("split: the config needs 'splitting: {train: 70, valid: 15, test: 15}'")
    for k, v in parts.items():
        if not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0:
            raise ValueError(f"split: splitting.{k} must be a percentage >= 0, got {v!r}")
        if not isinstance(k, str) or not k.isidentifier():
            raise ValueError(f"split: split name {k!r} must be an identifier")
    total = sum(parts.values())
    if abs(total - 100) > 1e-9:
        raise ValueError(f"split: splitting percentages must sum to 100, got {total} "
                         f"({', '.join(f'{k}={v}' for k, v in parts.items())})")
    names = list(parts)
    fracs = np.array([parts[k] / 100 for k in names])
    rng = np.random.default_rng(seed)
    label = _label_of(ds, stratify)
    n = len(ds)
    order = rng.permutation(n)
    if label is not None:
        # spread every class evenly over the order: sort by (rank within class + 0.5) / class size,
        # so any prefix holds each class in proportion
        y = ds.column(label).reshape(n, -1)[:, 0][order]
        by_class = np.argsort(y, kind="stable")
        _, starts, counts = np.unique(y[by_class], return_index=True, return_counts=True)
        cls = np.searchsorted(np.unique(y), y[by_class])
        key = (np.arange(n) - starts[cls] + 0.5) / counts[cls]
        order = order[by_class][np.argsort(key, kind="stable")]
    # largest-remainder rounding so the counts add up to n
    raw = fracs * n
    cnt = np.floor(raw).astype(np.int64)
    cnt[np.argsort(-(raw - cnt), kind="stable")[:n - cnt.sum()]] += 1
    edges = np.concatenate([[0], np.cumsum(cnt)])
    chosen = {k: [order[edges[i]:edges[i + 1]]] for i, k in enumerate(names)}
    result = {k: np.sort(np.concatenate(v)).astype(np.int64) for k, v in chosen.items()}
    if save:
        index = _read_index(ds.path)
        index["splits"] = {}
        for k, idx in result.items():
            fname = f"split-{k}.npy"
            with atomic_path(os.path.join(ds.path, fname)) as tmp, builtins_open(tmp, "wb") as f:
                np.save(f, idx)
            index["splits"][k] = fname
        index["split_config"] = {"splitting": dict(parts), "seed": seed, "stratify": label}
        atomic_write_text(os.path.join(ds.path, INDEX_FILE), json.dumps(index, indent=1))
        ds._index = index
    return Splits({k: ds.subset(v) for k, v in result.items()})


def open_split(path: str, name: str) -> Dataset:
    """The split `name` ('train', 'valid', ...) saved by split() for the dataset at `path`."""
    ds = Dataset(path)
    splits = ds._index.get("splits", {})
    if name not in splits:
        raise KeyError(f"{path} has no split {name!r}; it has {sorted(splits)} (run aimass.data.split)")
    return ds.subset(np.load(os.path.join(ds.path, splits[name]), allow_pickle=False))


# ---------------------------------------------------------------- inspect / CLI
def inspect(path: str, verify: bool = True) -> dict:
    """Schema, counts, class balance and (verify) a check of every checksum."""
    ds = Dataset(path)
    info = {"path": ds.path, "records": len(ds), "shards": len(ds.shards),
            "bytes": sum(s["bytes"] for s in ds.shards), "schema": ds.schema,
            "splits": {}, "metadata": ds.metadata}
    for k, f in ds._index.get("splits", {}).items():
        info["splits"][k] = int(np.load(os.path.join(ds.path, f), mmap_mode="r").shape[0])
    label = ds.metadata.get("label_field") or ("label" if "label" in ds.fields else None)
    if label is not None:
        field = next(f for f in ds.schema if f["name"] == label)
        if field["shape"] in ([], [1]) and field["dtype"].startswith(("int", "uint")):
            vals, counts = np.unique(ds.column(label), return_counts=True)
            classes = ds.metadata.get("classes")
            info["class_balance"] = {
                (classes[int(v)] if classes and 0 <= int(v) < len(classes) else str(int(v))): int(c)
                for v, c in zip(vals, counts)}
    if verify:
        info["verified_records"] = ds.verify(sha256=True)
    return info


def _cmd_inspect(args) -> int:
    try:
        info = inspect(args.dir, verify=not args.no_verify)
    except CorruptDataError as exc:
        print(f"CORRUPT: {exc}", file=sys.stderr)
        return 1
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(info, indent=2))
    return 0


def add_cli(sub) -> None:
    """Registers ``aimass data ...`` on the CLI's subparsers."""
    p = sub.add_parser("data", help="inspect and check datasets")
    dsub = p.add_subparsers(dest="data_command")
    q = dsub.add_parser("inspect", help="schema, counts, class balance; verifies every checksum")
    q.add_argument("dir")
    q.add_argument("--no-verify", action="store_true", help="skip the checksum pass")
    q.set_defaults(func=_cmd_inspect)
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])
