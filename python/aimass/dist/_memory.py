"""Arrays in node-shared memory for collectives (as MPI_Alloc_mem / ncclMemAlloc): ``empty``, ``zeros`` and
``is_shared``.

Where the engine reduces shared host buffers in the local peers' mappings (``engine.shared_buffers``,
agreed at ``init()``), ``empty(shape, dtype)`` returns an array backed by a ``_C.SharedHostBuffer`` (a
sealed memfd the node's other ranks map): an in-place ``allreduce_`` / ``allreduce_async_`` of it, on
every rank, is reduced with plain loads and stores in every rank's array (``stats()["ll_mapped"]`` for
blocking calls in the caller's thread, ``stats()["shm_mapped"]`` through the engine), with no kernel copy.
Elsewhere (before ``init()``, ``AIMASS_SHM_MAP=0``, no shared-memory segment, a cma probe failed, memfd
unavailable, several nodes: the hierarchical paths read the node's peers through the kernel, where private
memory on huge pages moves faster than a shared buffer's 4 KiB pages) it returns ordinary memory, and
``is_shared(x)`` says which one an array got.

A numpy dtype gives a numpy array; a torch dtype (``torch.float32``, ``torch.bfloat16``, ...) a CPU
tensor over the same memory (``torch.frombuffer``). The array (and every view of it, numpy or torch)
keeps the buffer alive; the memory goes with the last of them (and the last peer's mapping)."""
from __future__ import annotations

import numbers
import sys
from typing import Any

import numpy as np

from . import _core
from ._process_sets import ProcessSet, global_process_set

_NUMPY_DTYPES = tuple(np.dtype(n) for n in _core.DTYPES if n != "bfloat16")


def _shape(shape: Any, what: str) -> tuple:
    if isinstance(shape, numbers.Integral) and not isinstance(shape, bool):
        shape = (shape,)
    try:
        dims = tuple(shape)
    except TypeError:
        raise TypeError(f"{what}: shape must be an int or a sequence of ints, got {type(shape).__name__}") from None
    for d in dims:
        if isinstance(d, bool) or not isinstance(d, numbers.Integral):
            raise TypeError(f"{what}: shape must hold ints, got {d!r} ({type(d).__name__}) in {shape!r}")
        if d < 0:
            raise ValueError(f"{what}: shape must not have negative dimensions, got {dims}")
    return tuple(int(d) for d in dims)


def _torch_dtype(dtype: Any):
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(dtype, torch.dtype):
        return torch
    return None


def _dtype(dtype: Any, what: str):
    """(torch module or None, dtype, itemsize) for a dtype the collectives take; TypeError else."""
    torch = _torch_dtype(dtype)
    if torch is not None:
        name = str(dtype).replace("torch.", "")
        if name not in _core.DTYPES:
            raise TypeError(f"{what}: dtype {dtype} is not one the collectives take ({', '.join(_core.DTYPES)})")
        return torch, dtype, torch.empty((), dtype=dtype).element_size()
    if isinstance(dtype, str) and dtype == "bfloat16":
        raise TypeError(f"{what}: numpy has no bfloat16; pass torch.bfloat16 for a torch tensor")
    try:
        dt = np.dtype(dtype)
    except TypeError as exc:
        raise TypeError(f"{what}: {dtype!r} is not a dtype: {exc}") from None
    if dt not in _NUMPY_DTYPES:
        raise TypeError(f"{what}: dtype {dt} is not one the collectives take "
                        f"({', '.join(str(d) for d in _NUMPY_DTYPES)}, or a torch dtype incl. torch.bfloat16)")
    return None, dt, dt.itemsize


def _maps_peers(process_set) -> bool:
    if not isinstance(process_set, ProcessSet):
        raise TypeError(f"process_set must be an aimass.dist.ProcessSet, got {type(process_set).__name__}")
    if not _core.is_initialized():
        return False
    eng = getattr(process_set, "_engine", None)
    return eng is not None and bool(getattr(eng, "shared_buffers", False))


def _alloc(shape, dtype, process_set, what, zero):
    dims = _shape(shape, what)
    torch, dt, itemsize = _dtype(dtype, what)
    count = 1
    for d in dims:
        count *= d
    nbytes = count * itemsize
    if nbytes > sys.maxsize:
        raise ValueError(f"{what}: {dims} of {dt} is {nbytes} bytes, more than can be addressed")
    buf = None
    if _maps_peers(process_set):
        from .. import _C
        try:
            buf = _C.SharedHostBuffer(max(nbytes, 1))  # zeroed (a fresh memfd); one byte for an empty array
        except (OSError, MemoryError):  # no memfd here, or no memory for it: ordinary memory (is_shared says so)
            buf = None
    if torch is not None:
        if buf is None:
            return (torch.zeros if zero else torch.empty)(dims, dtype=dt)
        # the tensor keeps `buf` alive (torch.frombuffer holds the exporter), and so does every view of it
        return torch.frombuffer(buf, dtype=torch.uint8)[:nbytes].view(dt).view(dims)
    if buf is None:
        return (np.zeros if zero else np.empty)(dims, dtype=dt)
    # the array's base (a memoryview of `buf`) keeps the buffer alive, and views keep the array
    return np.frombuffer(buf, dtype=dt, count=count).reshape(dims)


def empty(shape: Any, dtype: Any = np.float32, *, process_set: ProcessSet = global_process_set):
    """An uninitialised C-contiguous array of `shape` and `dtype` in memory the node's other ranks map, where
    `process_set`'s engine reduces there (see the module docstring); ordinary memory otherwise (``is_shared``).
    dtype: a numpy dtype (numpy array) or a torch dtype (CPU tensor). Shared memory comes zeroed."""
    return _alloc(shape, dtype, process_set, "aimass.dist.empty", zero=False)


def zeros(shape: Any, dtype: Any = np.float32, *, process_set: ProcessSet = global_process_set):
    """As :func:`empty`, filled with zeros."""
    return _alloc(shape, dtype, process_set, "aimass.dist.zeros", zero=True)


def _byte_bounds(a: np.ndarray):
    try:
        from numpy.lib.array_utils import byte_bounds  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        byte_bounds = np.byte_bounds
    return byte_bounds(a)


def is_shared(x: Any) -> bool:
    """Whether the memory of `x` (a numpy array or CPU torch tensor, or a view of one) lies in one of this
    process's shared host buffers (``empty`` / ``zeros`` on an engine that maps the peers', gradient buckets)."""
    if isinstance(x, np.ndarray):
        lo, hi = _byte_bounds(x)  # the span a strided view touches
        addr, nbytes = lo, hi - lo
    else:
        torch = sys.modules.get("torch")
        if torch is None or not isinstance(x, torch.Tensor):
            raise TypeError(f"is_shared takes a numpy array or a torch tensor, got {type(x).__name__}")
        if x.device.type != "cpu":
            return False
        st = x.untyped_storage()  # the whole allocation the tensor (or view) lives in
        addr, nbytes = st.data_ptr(), st.nbytes()
    if nbytes == 0 and addr == 0:
        return False
    from .. import _C
    return bool(_C._comm_in_shared_buffer(addr, nbytes))
