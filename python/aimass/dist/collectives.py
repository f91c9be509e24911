"""Collectives with Horovod's names and arguments (allreduce, broadcast, allgather,
reducescatter, grouped_allreduce, barrier, join; alltoall is in _alltoall.py) on numpy arrays and torch
tensors.

Host tensors go through the engine (matched across ranks by name, fused, reduced over
MPI / shared memory); CUDA tensors take the NCCL path (global process set only). Results
come back as the input's kind. With torch tensors that require grad, allreduce,
broadcast, allgather, reducescatter and alltoall are differentiable, as in Horovod
(the gradient of an allreduce is the allreduce of the gradient, and so on).
"""
from __future__ import annotations

import time
from typing import Any, Optional, Sequence

import numpy as np

from .._array import bfloat16_bits, is_torch
from .._cuda_array import is_cuda_array
from .._C import _comm_lean as _lean
from .._C import _comm_lean_torch
from .._C import _comm_result_array
from . import _core
from ._core import GroupHandle, Handle, global_process_set, synchronize
from ._ops import Average, check_compression, check_op, resolve_op

__all__ = [
    "allreduce", "allreduce_", "allreduce_async", "allreduce_async_", "grouped_allreduce", "grouped_allreduce_",
    "grouped_allreduce_async", "grouped_allreduce_async_", "broadcast", "broadcast_", "broadcast_async",
    "broadcast_async_", "allgather", "allgather_async", "reducescatter", "reducescatter_async", "reduce_scatter",
    "reduce_scatter_async", "barrier", "join", "GroupHandle", "grouped_allgather",
    "grouped_allgather_async", "grouped_reducescatter", "grouped_reducescatter_async",
    "sparse_allreduce_async",
]


def _torch():
    import torch
    return torch


def _wants_grad(t) -> bool:
    return is_torch(t) and t.requires_grad and _torch().is_grad_enabled()


def _check_factor(f, what):
    if isinstance(f, bool) or not isinstance(f, (int, float)) or not np.isfinite(f):
        raise ValueError(f"{what} must be a finite number, got {f!r}")
    return float(f)


def _scale(x, f: float, inplace: bool):
    """x * f (a new array/tensor unless inplace); integers are scaled in float64 and truncated."""
    if f == 1.0:
        return x
    if is_torch(x):
        torch = _torch()
        if x.dtype == torch.bool:
            raise TypeError("prescale_factor/postscale_factor do not apply to bool tensors")
        if x.dtype.is_floating_point:
            return x.mul_(f) if inplace else x * f
        y = (x.double() * f).to(x.dtype)
        return x.copy_(y) if inplace else y
    if x.dtype == np.bool_:
        raise TypeError("prescale_factor/postscale_factor do not apply to bool arrays")
    if inplace:
        np.multiply(x, f, out=x, casting="unsafe")
        return x
    return (x * f).astype(x.dtype, copy=False)


# ------------------------------------------------------------------ allreduce

def _submit_allreduce(t, op: str, name, compressor, timeout, inplace, prescale, postscale, process_set,
                      legacy_compression=False, blocking=False) -> Handle:
    ps = _core._resolve_set(process_set)
    eng = ps._engine_checked()
    prescale = _check_factor(prescale, "prescale_factor")
    postscale = _check_factor(postscale, "postscale_factor")
    wire, ctx, decompress, orig = "", None, None, None
    builtin = getattr(compressor, "wire", None)
    # (only compression needs the dtype's name here: str() of a numpy dtype costs microseconds)
    dt0 = "" if compressor is _Plain else str(getattr(t, "dtype", "")).replace("torch.", "")
    if builtin and dt0 == "float32":
        wire = "float16" if builtin == "fp16" else "bfloat16"  # the engine converts while packing
    elif builtin and dt0 in ("float16", "bfloat16"):
        pass  # already 16 bits on the wire
    elif builtin and legacy_compression:
        raise TypeError(f"compression={builtin!r} applies to float32 tensors, got {dt0 or type(t).__name__}")
    elif compressor is not _Plain and (not builtin or (is_torch(t) and t.dtype.is_floating_point)):
        # a user-defined compressor (or a float64 tensor under fp16/bf16): compress in Python, as Horovod
        orig = t if inplace else None
        t, ctx = compressor.compress(t)
        decompress = compressor.decompress
        inplace = inplace and t is orig
        if orig is t:
            orig = None
    if prescale != 1.0:
        t = _scale(t, prescale, inplace)

    def finish(v):
        if postscale != 1.0:
            v = _scale(v, postscale, True)
        if decompress is not None:
            v = decompress(v, ctx)
        if orig is not None:
            orig.copy_(v) if is_torch(orig) else np.copyto(orig, v, casting="unsafe")
            v = orig
        return v

    fin = finish if (postscale != 1.0 or decompress is not None or orig is not None) else None
    if is_cuda_array(t):
        if ps is not global_process_set:
            raise NotImplementedError("process sets apply to host tensors; CUDA tensors use the job's NCCL "
                                      "communicator (global_process_set)")
        from .. import _dist_nccl
        nm = _core.make_name("allreduce", name, ps)
        work, out = _dist_nccl.allreduce(t, op, nm, {"float16": "fp16", "bfloat16": "bf16"}.get(wire),
                                         _core.check_timeout(timeout) or _core.default_timeout(), inplace,
                                         ps._mpi_comm, ps.size())
        return Handle(work, None, out, "", None, False, nm, fin, "allreduce")
    a, dt = _core.as_input(t, "allreduce tensor")
    nm = _core.make_name("allreduce", name, ps)
    if inplace:
        if not a.flags.c_contiguous:
            raise ValueError("allreduce_: the tensor must be C-contiguous for an in-place allreduce; "
                             "call .contiguous() or use allreduce()")
        out, keep, result = a, (t, a), t
    else:
        a = _core.contiguous(a)
        out = _comm_result_array(a.dtype, a.shape)  # (recycled from 1 MiB, as the lean lane's results)
        keep, result = (t, a, out), out
    h = eng.submit("allreduce", a, out, nm, dt, op, wire, 0, _core.check_timeout(timeout), blocking)
    return Handle(h, keep, result, dt, t, False, nm, fin, "allreduce")


def _is_none_compressor(c) -> bool:
    from ._ops import NoneCompressor
    return c is NoneCompressor or isinstance(c, NoneCompressor)


# numpy dtypes the lean lane takes, by their (native-order) dtype object; bfloat16 has no numpy dtype
_LEAN_DTYPES = {np.dtype(n): n for n in _core.DTYPES if n != "bfloat16"}
_LEAN_TORCH_DTYPES: dict = {}  # torch dtype -> name (filled on first use)


def _lean_torch_dtypes() -> dict:
    if not _LEAN_TORCH_DTYPES:
        torch = _torch()
        _LEAN_TORCH_DTYPES.update({getattr(torch, n): n for n in _core.DTYPES})
        # from now on the lane takes a CPU tensor's blocking collectives in C++ without its numpy view (8-byte
        # allreduce_: 2.3-3.8 us through the view, numpy 0.35-0.6 us)
        _comm_lean_torch(torch.Tensor, _LEAN_TORCH_DTYPES, _torch_result)
    return _LEAN_TORCH_DTYPES


def _torch_result(r: np.ndarray, bf16: bool):
    """A lane result as a tensor that owns its memory; bfloat16 from its uint16 bits."""
    torch = _torch()
    return torch.from_numpy(r.view(np.int16)).view(torch.bfloat16) if bf16 else torch.from_numpy(r)


def _torch_view(t):
    """(numpy view, dtype name) of a contiguous CPU torch tensor of a dtype the lean lane takes, else None;
    a bfloat16 tensor's view holds its bits as uint16 (the name says what they are).
    (`is_cpu`: `device.type` builds a device object, 0.3 us a call.)"""
    if not t.is_cpu or not t.is_contiguous():
        return None
    dt = _lean_torch_dtypes().get(t.dtype)
    if dt is None:
        return None
    if t.requires_grad:
        t = t.detach()
    return (bfloat16_bits(t) if dt == "bfloat16" else t.numpy()), dt


def _lean_array(t):
    """(numpy view, dtype name) of a plain C-contiguous host array or CPU torch tensor, else None."""
    if type(t) is np.ndarray:
        dt = _LEAN_DTYPES.get(t.dtype)
        return (t, dt) if dt is not None and t.flags.c_contiguous else None
    return _torch_view(t) if is_torch(t) else None


def _lean_torch(kind: int, t, inplace: bool, name, op, root_rank, root):
    """The lean lane for a CPU torch tensor (no autograd): its numpy view through the lane, a result as a
    tensor that owns the result's memory (torch.from_numpy). None when it does not qualify or the lane
    declines (the general path then runs). Through the general path a torch tensor's blocking 8-byte
    allreduce took 19-27 us against the numpy array's 0.6-1.0 us (2 ranks, same run)."""
    if not is_torch(t) or t.requires_grad:
        return None
    try:
        got = _torch_view(t)
    except (RuntimeError, TypeError):  # (a tensor numpy cannot view)
        return None
    if got is None:
        return None
    a, dt = got
    bf16 = dt == "bfloat16"  # (its uint16 view, labelled for the lane; the result's bits back as bfloat16)
    r = _lean(kind, a, a if inplace else None, name, op, root_rank, root, bf16)
    if r is None:
        return None
    return t if inplace else _torch_result(r, bf16)


def _lean_async(t, name, op, inplace: bool, compression) -> Optional[Handle]:
    """The async allreduce of a numpy array or CPU torch tensor on the global set with no scaling,
    compression or timeout, without the general path's compression / scaling / conversion steps (they
    cost about 6 us of the 9 us a submission took: 1 ms of ResNet-50's 161-gradient step). None when
    the call does not qualify (the full path then runs and reports what is wrong): no engine, no
    name, another dtype, device or layout. The engine sees exactly what the full path would submit."""
    eng = global_process_set._engine
    if eng is None or type(name) is not str or not name:
        return None
    if compression is not None and not _is_none_compressor(compression):
        return None
    got = _lean_array(t)
    if got is None:
        return None
    a, dt = got
    if inplace and not a.flags.writeable:
        return None
    opname = "average" if op is None else check_op(op)
    if inplace:
        h = eng.submit("allreduce", a, a, name, dt, opname, "", 0, 0.0, False)
        return Handle(h, (t, a), t, dt, t, False, name, None, "allreduce")
    out = np.empty_like(a)
    h = eng.submit("allreduce", a, out, name, dt, opname, "", 0, 0.0, False)
    return Handle(h, (t, a, out), out, dt, t, False, name, None, "allreduce")


def allreduce_async(tensor: Any, average: Any = None, name: Optional[str] = None, op: Any = None,
                    prescale_factor: float = 1.0, postscale_factor: float = 1.0,
                    process_set=global_process_set, *, compression: Any = None, timeout: Optional[float] = None
                    ) -> Handle:
    """Start an allreduce of `tensor` into a new tensor; returns a handle for synchronize()/poll()."""
    if (average is None and timeout is None and process_set is global_process_set  # lean lane
            and prescale_factor == 1.0 and postscale_factor == 1.0
            and (h := _lean_async(tensor, name, op, False, compression)) is not None):
        return h
    return _allreduce_handle(tensor, average, name, op, prescale_factor, postscale_factor, process_set, compression,
                             timeout, inplace=False)


def allreduce_async_(tensor: Any, average: Any = None, name: Optional[str] = None, op: Any = None,
                     prescale_factor: float = 1.0, postscale_factor: float = 1.0,
                     process_set=global_process_set, *, compression: Any = None, timeout: Optional[float] = None
                     ) -> Handle:
    """Start an in-place allreduce of `tensor` (C-contiguous, writable); synchronize() returns it."""
    if (average is None and timeout is None and process_set is global_process_set  # lean lane
            and prescale_factor == 1.0 and postscale_factor == 1.0
            and (h := _lean_async(tensor, name, op, True, compression)) is not None):
        return h
    return _allreduce_handle(tensor, average, name, op, prescale_factor, postscale_factor, process_set, compression,
                             timeout, inplace=True)


def _allreduce_handle(tensor, average, name, op, prescale, postscale, process_set, compression, timeout, inplace,
                      blocking=False):
    """blocking: the caller synchronizes at once (a small collective may then run in its thread)."""
    opname = resolve_op(op, average)
    legacy = compression is None or isinstance(compression, str)
    c = check_compression(compression)
    if _is_none_compressor(c):
        c = _Plain
    return _submit_allreduce(tensor, opname, name, c, timeout, inplace, prescale, postscale, process_set, legacy,
                             blocking)


class _Plain:
    """No compression (Compression.none and None)."""
    wire = None


def allreduce(tensor: Any, average: Any = None, name: Optional[str] = None, compression: Any = None,
              op: Any = None, prescale_factor: float = 1.0, postscale_factor: float = 1.0,
              process_set=global_process_set, *, timeout: Optional[float] = None):
    """Reduce `tensor` over the ranks of `process_set` (op: Average (default), Sum, Min, Max, Product) and
    return a new tensor of its kind. `compression`: Compression.fp16/.bf16 sends float32 as 16-bit floats
    (summed in fp32 per step). prescale_factor multiplies the input before the reduction, postscale_factor
    the result after it (after the division by size() of Average). Differentiable for torch tensors."""
    if (average is None and compression is None and timeout is None and process_set is global_process_set  # lean lane
            and prescale_factor == 1.0 and postscale_factor == 1.0
            and ((out := _lean(0, tensor, None, name, op, None, None)) is not None
                 or (out := _lean_torch(0, tensor, False, name, op, None, None)) is not None)):
        return out
    if _wants_grad(tensor):
        return _autograd().Allreduce.apply(tensor, resolve_op(op, average), name, compression, prescale_factor,
                                           postscale_factor, process_set)
    return synchronize(_allreduce_handle(tensor, average, name, op, prescale_factor, postscale_factor, process_set,
                                         compression, timeout, False, True))


def allreduce_(tensor: Any, average: Any = None, name: Optional[str] = None, op: Any = None,
               prescale_factor: float = 1.0, postscale_factor: float = 1.0, process_set=global_process_set, *,
               compression: Any = None, timeout: Optional[float] = None):
    """In-place allreduce of `tensor`; returns it."""
    if (average is None and compression is None and timeout is None and process_set is global_process_set  # lean lane
            and prescale_factor == 1.0 and postscale_factor == 1.0
            and (_lean(0, tensor, tensor, name, op, None, None) is not None
                 or _lean_torch(0, tensor, True, name, op, None, None) is not None)):
        return tensor
    return synchronize(_allreduce_handle(tensor, average, name, op, prescale_factor, postscale_factor, process_set,
                                         compression, timeout, True, True))


# ------------------------------------------------------------------ grouped allreduce

def _grouped(tensors, average, name, op, prescale, postscale, process_set, compression, timeout, inplace):
    if not isinstance(tensors, (list, tuple)) or not tensors:
        raise ValueError("grouped_allreduce takes a non-empty list of tensors")
    base = _core.make_name("grouped_allreduce", name, _core._resolve_set(process_set))
    # submitted in one burst: the engine negotiates them in one cycle and fuses them
    return GroupHandle([_allreduce_handle(t, average, f"{base}.{i}", op, prescale, postscale, process_set,
                                          compression, timeout, inplace) for i, t in enumerate(tensors)])


def grouped_allreduce_async(tensors: Sequence[Any], average: Any = None, name: Optional[str] = None, op: Any = None,
                            prescale_factor: float = 1.0, postscale_factor: float = 1.0,
                            process_set=global_process_set, *, compression: Any = None,
                            timeout: Optional[float] = None) -> GroupHandle:
    return _grouped(tensors, average, name, op, prescale_factor, postscale_factor, process_set, compression, timeout,
                    False)


def grouped_allreduce_async_(tensors: Sequence[Any], average: Any = None, name: Optional[str] = None,
                             op: Any = None, prescale_factor: float = 1.0, postscale_factor: float = 1.0,
                             process_set=global_process_set, *, compression: Any = None,
                             timeout: Optional[float] = None) -> GroupHandle:
    return _grouped(tensors, average, name, op, prescale_factor, postscale_factor, process_set, compression, timeout,
                    True)


def grouped_allreduce(tensors: Sequence[Any], average: Any = None, name: Optional[str] = None,
                      compression: Any = None, op: Any = None, prescale_factor: float = 1.0,
                      postscale_factor: float = 1.0, process_set=global_process_set, *,
                      timeout: Optional[float] = None) -> list:
    """Allreduce a list of tensors together (reduced in one negotiation and fused); returns a list."""
    return synchronize(grouped_allreduce_async(tensors, average, name, op, prescale_factor, postscale_factor,
                                               process_set, compression=compression, timeout=timeout))


def grouped_allreduce_(tensors: Sequence[Any], average: Any = None, name: Optional[str] = None, op: Any = None,
                       prescale_factor: float = 1.0, postscale_factor: float = 1.0, process_set=global_process_set,
                       *, compression: Any = None, timeout: Optional[float] = None) -> list:
    return synchronize(grouped_allreduce_async_(tensors, average, name, op, prescale_factor, postscale_factor,
                                                process_set, compression=compression, timeout=timeout))


# ------------------------------------------------------------------ broadcast

def _root(root_rank, root, ps) -> int:
    if root_rank is None and root is None:
        r = 0
    elif root_rank is not None and root is not None and root_rank != root:
        raise ValueError(f"broadcast: root_rank={root_rank!r} and root={root!r} disagree; give one")
    else:
        r = root_rank if root_rank is not None else root
    n = ps.size()
    if isinstance(r, bool) or not isinstance(r, (int, np.integer)) or not 0 <= r < n:
        raise ValueError(f"broadcast: root must be a rank in [0, {n}), got {r!r}")
    return int(r)


def _broadcast_handle(t, root_rank, name, process_set, root, timeout, inplace, blocking=False) -> Handle:
    ps = _core._resolve_set(process_set)
    eng = ps._engine_checked()
    r = _root(root_rank, root, ps)
    if is_cuda_array(t):
        if ps is not global_process_set:
            raise NotImplementedError("process sets apply to host tensors; CUDA tensors use global_process_set")
        from .. import _dist_nccl
        nm = _core.make_name("broadcast", name, ps)
        work, out = _dist_nccl.broadcast(t, r, nm, _core.check_timeout(timeout) or _core.default_timeout(), inplace,
                                         ps._mpi_comm)
        return Handle(work, None, out, "", None, False, nm, None, "broadcast")
    a, dt = _core.as_input(t, "broadcast tensor")
    nm = _core.make_name("broadcast", name, ps)
    if inplace:
        if not a.flags.c_contiguous:
            raise ValueError("broadcast_: the tensor must be C-contiguous; call .contiguous() or use broadcast()")
        out, keep, result = a, (t, a), t
    else:
        a = _core.contiguous(a)
        out = np.empty_like(a)
        keep, result = (t, a, out), out
    h = eng.submit("broadcast", a, out, nm, dt, "sum", "", r, _core.check_timeout(timeout), blocking)
    return Handle(h, keep, result, dt, t, False, nm, None, "broadcast")


def broadcast_async(tensor: Any, root_rank: Optional[int] = None, name: Optional[str] = None,
                    process_set=global_process_set, *, root: Optional[int] = None, timeout: Optional[float] = None,
                    inplace: bool = False) -> Handle:
    """Start a broadcast of root_rank's `tensor` into a new tensor (`root` is the old spelling)."""
    return _broadcast_handle(tensor, root_rank, name, process_set, root, timeout, inplace)


def broadcast_async_(tensor: Any, root_rank: Optional[int] = None, name: Optional[str] = None,
                     process_set=global_process_set, *, root: Optional[int] = None,
                     timeout: Optional[float] = None) -> Handle:
    """Start an in-place broadcast into `tensor`."""
    return _broadcast_handle(tensor, root_rank, name, process_set, root, timeout, True)


def broadcast(tensor: Any, root_rank: Optional[int] = None, name: Optional[str] = None,
              process_set=global_process_set, *, root: Optional[int] = None, timeout: Optional[float] = None):
    """Return root_rank's `tensor` on every rank (a new tensor); every rank passes the same shape and dtype.
    Differentiable for torch tensors (the root gets the sum of the gradients, the others zeros)."""
    if (timeout is None and process_set is global_process_set  # lean lane
            and ((out := _lean(1, tensor, None, name, None, root_rank, root)) is not None
                 or (out := _lean_torch(1, tensor, False, name, None, root_rank, root)) is not None)):
        return out
    if _wants_grad(tensor):
        ps = _core._resolve_set(process_set)
        return _autograd().Broadcast.apply(tensor, _root(root_rank, root, ps), name, ps)
    return synchronize(_broadcast_handle(tensor, root_rank, name, process_set, root, timeout, False, True))


def broadcast_(tensor: Any, root_rank: Optional[int] = None, name: Optional[str] = None,
               process_set=global_process_set, *, root: Optional[int] = None, timeout: Optional[float] = None):
    """Overwrite `tensor` with root_rank's values, in place; returns it."""
    if (timeout is None and process_set is global_process_set  # lean lane
            and (_lean(1, tensor, tensor, name, None, root_rank, root) is not None
                 or _lean_torch(1, tensor, True, name, None, root_rank, root) is not None)):
        return tensor
    return synchronize(_broadcast_handle(tensor, root_rank, name, process_set, root, timeout, True, True))


# ------------------------------------------------------------------ allgather

def allgather_async(tensor: Any, name: Optional[str] = None, process_set=global_process_set, *,
                    timeout: Optional[float] = None) -> Handle:
    return _allgather_handle(tensor, name, process_set, timeout)


def _allgather_handle(tensor, name, process_set, timeout, blocking=False) -> Handle:
    ps = _core._resolve_set(process_set)
    eng = ps._engine_checked()
    if is_cuda_array(tensor):
        if ps is not global_process_set:
            raise NotImplementedError("process sets apply to host tensors; CUDA tensors use global_process_set")
        from .. import _dist_nccl
        nm = _core.make_name("allgather", name, ps)
        work, out = _dist_nccl.allgather(tensor, nm, _core.check_timeout(timeout) or _core.default_timeout(),
                                         ps._mpi_comm)
        return Handle(work, None, out, "", None, False, nm, None, "allgather")
    a, dt = _core.as_input(tensor, "allgather tensor")
    if a.ndim == 0:
        a = a.reshape(1)
    a = _core.contiguous(a)
    nm = _core.make_name("allgather", name, ps)
    h = eng.submit("allgather", a, None, nm, dt, "sum", "", 0, _core.check_timeout(timeout), blocking)
    return Handle(h, (tensor, a), None, dt, tensor, True, nm, None, "allgather")


def allgather(tensor: Any, name: Optional[str] = None, process_set=global_process_set, *,
              timeout: Optional[float] = None):
    """Concatenate every rank's `tensor` along dimension 0 (in rank order). Dimension 0 may differ by rank;
    the other dimensions and the dtype must match. Differentiable for torch tensors."""
    if (timeout is None and process_set is global_process_set  # lean lane
            and ((got := _lean(2, tensor, None, name, None, None, None)) is not None
                 or (got := _lean_torch(2, tensor, False, name, None, None, None)) is not None)):
        return got
    if _wants_grad(tensor):
        return _autograd().Allgather.apply(tensor, name, _core._resolve_set(process_set))
    return synchronize(_allgather_handle(tensor, name, process_set, timeout, True))


def grouped_allgather_async(tensors: Sequence[Any], name: Optional[str] = None, process_set=global_process_set, *,
                            timeout: Optional[float] = None) -> GroupHandle:
    if not isinstance(tensors, (list, tuple)) or not tensors:
        raise ValueError("grouped_allgather takes a non-empty list of tensors")
    base = _core.make_name("grouped_allgather", name, _core._resolve_set(process_set))
    return GroupHandle([allgather_async(t, f"{base}.{i}", process_set, timeout=timeout)
                        for i, t in enumerate(tensors)])


def grouped_allgather(tensors: Sequence[Any], name: Optional[str] = None, process_set=global_process_set, *,
                      timeout: Optional[float] = None) -> list:
    """Allgather a list of tensors together; returns a list."""
    return synchronize(grouped_allgather_async(tensors, name, process_set, timeout=timeout))


# ------------------------------------------------------------------ reduce-scatter

def _reduce_scatter_handle(t, op, name, process_set, timeout, prescale=1.0, postscale=1.0, blocking=False) -> Handle:
    ps = _core._resolve_set(process_set)
    eng = ps._engine_checked()
    op = check_op(op)
    prescale = _check_factor(prescale, "prescale_factor")
    postscale = _check_factor(postscale, "postscale_factor")
    fin = (lambda v: _scale(v, postscale, True)) if postscale != 1.0 else None
    if is_cuda_array(t):
        if ps is not global_process_set:
            raise NotImplementedError("process sets apply to host tensors; CUDA tensors use global_process_set")
        from .. import _dist_nccl
        nm = _core.make_name("reduce_scatter", name, ps)
        t = _scale(t, prescale, False)
        work, out = _dist_nccl.reduce_scatter(t, op, nm, _core.check_timeout(timeout) or _core.default_timeout(),
                                              ps._mpi_comm, ps.size(), ps.rank())
        return Handle(work, None, out, "", None, False, nm, fin, "reduce_scatter")
    t = _scale(t, prescale, False)
    a, dt = _core.as_input(t, "reduce_scatter tensor")
    if a.ndim == 0:
        raise ValueError("reduce_scatter: the tensor needs at least one dimension (it is split along dimension 0)")
    a = _core.contiguous(a)
    nm = _core.make_name("reduce_scatter", name, ps)
    h = eng.submit("reduce_scatter", a, None, nm, dt, op, "", 0, _core.check_timeout(timeout), blocking)
    return Handle(h, (t, a), None, dt, t, True, nm, fin, "reduce_scatter")


def reduce_scatter_async(t: Any, op: Any = "average", name: Optional[str] = None, timeout: Optional[float] = None,
                         process_set=global_process_set) -> Handle:
    return _reduce_scatter_handle(t, op, name, process_set, timeout)


def reduce_scatter(t: Any, op: Any = "average", name: Optional[str] = None, timeout: Optional[float] = None,
                   process_set=global_process_set):
    """Reduce `t` over all ranks and return this rank's block of dimension 0 (blocks as numpy.array_split:
    the first N % size ranks get one row more)."""
    if (timeout is None and process_set is global_process_set  # lean lane
            and ((got := _lean(3, t, None, name, op, None, None)) is not None
                 or (got := _lean_torch(3, t, False, name, op, None, None)) is not None)):
        return got
    return synchronize(_reduce_scatter_handle(t, op, name, process_set, timeout, blocking=True))


def reducescatter_async(tensor: Any, name: Optional[str] = None, op: Any = Average, process_set=global_process_set,
                        prescale_factor: float = 1.0, postscale_factor: float = 1.0, *,
                        timeout: Optional[float] = None) -> Handle:
    return _reduce_scatter_handle(tensor, op, name, process_set, timeout, prescale_factor, postscale_factor)


def reducescatter(tensor: Any, name: Optional[str] = None, compression: Any = None, op: Any = Average,
                  process_set=global_process_set, prescale_factor: float = 1.0, postscale_factor: float = 1.0, *,
                  timeout: Optional[float] = None):
    """Horovod's spelling of reduce_scatter (op defaults to Average). `compression` runs the compressor's
    compress/decompress around the collective (Horovod's behaviour). Differentiable for torch tensors."""
    c = check_compression(compression)
    t, ctx = (tensor, None) if _is_none_compressor(c) else c.compress(tensor)
    if _wants_grad(t):
        out = _autograd().ReduceScatter.apply(t, check_op(op), name, _core._resolve_set(process_set),
                                              prescale_factor, postscale_factor)
    else:
        out = synchronize(_reduce_scatter_handle(t, op, name, process_set, timeout, prescale_factor,
                                                 postscale_factor, blocking=True))
    return out if _is_none_compressor(c) else c.decompress(out, ctx)


def grouped_reducescatter_async(tensors: Sequence[Any], name: Optional[str] = None, op: Any = Average,
                                process_set=global_process_set, prescale_factor: float = 1.0,
                                postscale_factor: float = 1.0, *, timeout: Optional[float] = None) -> GroupHandle:
    if not isinstance(tensors, (list, tuple)) or not tensors:
        raise ValueError("grouped_reducescatter takes a non-empty list of tensors")
    base = _core.make_name("grouped_reducescatter", name, _core._resolve_set(process_set))
    return GroupHandle([_reduce_scatter_handle(t, op, f"{base}.{i}", process_set, timeout, prescale_factor,
                                               postscale_factor) for i, t in enumerate(tensors)])


def grouped_reducescatter(tensors: Sequence[Any], name: Optional[str] = None, compression: Any = None,
                          op: Any = Average, process_set=global_process_set, prescale_factor: float = 1.0,
                          postscale_factor: float = 1.0, *, timeout: Optional[float] = None) -> list:
    """Reduce-scatter a list of tensors together; returns a list (compression as in reducescatter)."""
    c = check_compression(compression)
    if _is_none_compressor(c):
        return synchronize(grouped_reducescatter_async(tensors, name, op, process_set, prescale_factor,
                                                       postscale_factor, timeout=timeout))
    packed = [c.compress(t) for t in tensors]
    outs = synchronize(grouped_reducescatter_async([t for t, _ in packed], name, op, process_set, prescale_factor,
                                                   postscale_factor, timeout=timeout))
    return [c.decompress(o, ctx) for o, (_, ctx) in zip(outs, packed)]


# ------------------------------------------------------------------ barrier / join

def barrier(process_set=global_process_set, *, timeout: Optional[float] = None, name: Optional[str] = None) -> None:
    """Wait until every rank of the set reaches the barrier (through the engine, so it orders with pending
    collectives)."""
    ps = _core._resolve_set(process_set)
    eng = ps._engine_checked()
    nm = _core.make_name("barrier", name, ps)
    h = eng.submit("barrier", None, None, nm, "float32", "sum", "", 0, _core.check_timeout(timeout), True)
    synchronize(Handle(h, None, None, "float32", None, False, nm, None, "barrier"))


def join(device: int = -1, process_set=global_process_set) -> int:
    """Wait until every rank has joined and return the rank that joined last.

    Unlike Horovod, collectives are not zero-filled for ranks that joined early: every rank must still make
    the same collective calls before join() (give ranks the same number of batches, e.g. with
    aimass.data.Loader's even sharding). The last rank is judged by each rank's wall clock at arrival
    (exact on one node; across nodes as good as their clock sync)."""
    arrived = np.array([time.time()], dtype=np.float64)
    times = synchronize(allgather_async(arrived, name=None, process_set=process_set,
                                        timeout=max(_core.default_timeout(), 3600.0)))
    return int(np.argmax(times))


# ------------------------------------------------------------------ autograd


def _autograd():
    from . import _autograd as m
    return m


def sparse_allreduce_async(*args, **kwargs):
    """Not supported as a function: DistributedOptimizer reduces sparse gradients (allgather) itself."""
    raise NotImplementedError("sparse_allreduce_async is not supported by aimass.dist: DistributedOptimizer "
                              "reduces sparse gradients itself (or pass sparse_as_dense=True); for your own "
                              "sparse tensors allgather indices and values; see docs/horovod.md")


def _install_lean_entries() -> None:
    """allreduce, allreduce_, broadcast and broadcast_ become vectorcall objects (aimass._C): a call with
    plain arguments (the tensor, name=, op= / root_rank=) enters the lean lane with no Python frame in
    between, everything else is passed to the functions above unchanged (their signature and docstring
    are copied onto the objects)."""
    import functools
    import inspect

    from .._C import _comm_lean_entry
    g = globals()
    for fname, kind, inplace in (("allreduce", 0, False), ("allreduce_", 0, True), ("broadcast", 1, False),
                                 ("broadcast_", 1, True)):
        f = g[fname]
        params = inspect.signature(f).parameters.values()
        pos = tuple(p.name for p in params if p.kind is p.POSITIONAL_OR_KEYWORD)
        kwo = tuple(p.name for p in params if p.kind is p.KEYWORD_ONLY)
        g[fname] = functools.update_wrapper(_comm_lean_entry(kind, inplace, f, pos, kwo, global_process_set), f)


_install_lean_entries()
