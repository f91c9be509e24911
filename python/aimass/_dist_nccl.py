"""The NCCL path of aimass.dist: collectives on CUDA tensors (torch CUDA tensors,
cupy arrays).

One NCCL communicator is made per job on the first CUDA collective (rank 0's
ncclUniqueId travels over a private duplicate of the MPI communicator) on the
device of that first tensor. Each collective is enqueued on the tensor's current
stream (torch.cuda.current_stream() / cupy's current stream), so it is ordered
after the kernels that produced the input; the blocking calls and synchronize()
then wait for it on the host, polling NCCL's asynchronous error and the stall
timeout: a rank that never submits, or dies, makes the others raise
aimass.DistributedError (the communicator is aborted) instead of hanging.

Before enqueueing, ranks exchange a 64-bit signature of (name, kind, shape,
dtype, op, root) with a non-blocking MPI allgather (one small host message per
collective, AIMASS_NCCL_CHECK=0 turns it off): a mismatch raises
DistributedError on every rank with what each rank submitted, never a hang or a
silent wrong result. Unlike host tensors, CUDA collectives are not fused and must
be called in the same order on every rank (as in torch.distributed).
"""
from __future__ import annotations

import hashlib
import os
import sys
import threading
import time
from typing import Any, List, Optional

import numpy as np

from . import cuda as _cuda
from ._array import is_torch
from ._cuda_array import describe, empty_like

__all__ = ["library_path"]

_lock = threading.Lock()
_state: dict = {"comm": None, "mpi": None, "failed": None}
_FLOAT = ("float16", "bfloat16", "float32", "float64")


def library_path() -> str:
    """Where libnccl is loaded from: AIMASS_NCCL_LIBRARY, else the nvidia-nccl wheel, else the system's."""
    env = os.environ.get("AIMASS_NCCL_LIBRARY")
    if env:
        return env
    try:
        import nvidia.nccl as _w  # namespace package of the nvidia-nccl-cu* wheels
        for base in list(_w.__path__):
            p = os.path.join(base, "lib", "libnccl.so.2")
            if os.path.exists(p):
                return p
    except ImportError:
        pass
    return "libnccl.so.2"


def _error(msg: str):
    from . import DistributedError
    return DistributedError(msg)


def _wait(req, timeout: float, what: str) -> None:
    """Polls a non-blocking MPI request up to `timeout` seconds (a dead peer never hangs a rank)."""
    start, sleep = time.monotonic(), 0.0
    while not req.Test():
        if time.monotonic() - start > timeout:
            raise _error(f"{what}: not every rank took part within {timeout:g} s (a rank skipped it, called "
                         "collectives in another order, or died)")
        time.sleep(sleep)
        sleep = min(1e-3, sleep + 1e-5)


_TEXT = 512  # bytes of each rank's text in _gather_text


def _gather_text(mpi, text: str, timeout: float, what: str) -> List[str]:
    """Every rank's `text` (cut to 512 bytes), with the deadline of _wait."""
    mine = np.zeros(_TEXT, np.uint8)
    raw = text.encode()[:_TEXT]
    mine[:len(raw)] = np.frombuffer(raw, np.uint8)
    every = np.empty((mpi.Get_size(), _TEXT), np.uint8)
    _wait(mpi.Iallgather(mine, every), timeout, what)
    return [bytes(row).rstrip(b"\0").decode(errors="replace") for row in every]


def _default_timeout() -> float:
    return float(os.environ.get("AIMASS_COMM_TIMEOUT", 60))


def _agree(mpi, ok: bool, why: str) -> None:
    """Every rank learns whether every rank is ready; a failure anywhere raises everywhere."""
    reasons = _gather_text(mpi, "" if ok else (why or "failed"), _default_timeout(), "starting NCCL")
    bad = [f"rank {r}: {w}" for r, w in enumerate(reasons) if w]
    if bad:
        raise _error("the NCCL backend cannot start: " + "; ".join(bad))


def _communicator(device: int, mpi_comm: Any):
    """The job's NCCL communicator, made collectively on first use."""
    with _lock:
        if _state["failed"] is not None:
            raise _error(f"the NCCL communicator failed earlier ({_state['failed']}); call aimass.dist.shutdown() "
                         "and init() again")
        c = _state["comm"]
        if c is not None:
            if c.device != device:
                raise ValueError(f"aimass.dist uses CUDA device {c.device} for NCCL on this rank; got a tensor on "
                                 f"device {device}: keep one device per rank (torch.cuda.set_device(local_rank))")
            return c
        mpi = mpi_comm.Dup()  # our id/signature traffic never mixes with the user's messages
        ok, why, m = True, "", None
        try:
            m = _cuda.module()
            m.nccl_load(library_path())
        except Exception as exc:  # reported on every rank by _agree
            ok, why = False, str(exc)
        try:
            _agree(mpi, ok, why)
            uid = np.frombuffer(m.nccl_unique_id(), np.uint8).copy() if mpi.Get_rank() == 0 else None
            n = np.array([0 if uid is None else uid.size], np.int64)
            _wait(mpi.Ibcast(n, root=0), _default_timeout(), "starting NCCL")
            buf = uid if uid is not None else np.empty(int(n[0]), np.uint8)
            _wait(mpi.Ibcast(buf, root=0), _default_timeout(), "starting NCCL")
            uid = buf.tobytes()
            c = m.NcclComm(uid, mpi.Get_size(), mpi.Get_rank(), device)
        except BaseException:
            mpi.Free()
            raise
        _state["comm"], _state["mpi"] = c, mpi
        return c


def shutdown(peer_failed: bool = False) -> None:
    """Releases the NCCL communicator. peer_failed: a peer died or stalled (aimass.dist saw it), so
    outstanding NCCL work may never finish: abort instead of ncclCommDestroy, which would wait for it."""
    with _lock:
        c, mpi = _state["comm"], _state["mpi"]
        _state.update(comm=None, mpi=None, failed=None)
    if c is not None:
        if peer_failed:
            c.abort()
        del c  # ncclCommDestroy (aborted communicators were already released)
    if mpi is not None and not peer_failed:
        try:
            mpi.Free()
        except Exception:  # MPI may already be finalising at exit
            pass


def _signature_check(mpi, desc: str, timeout: float) -> None:
    if os.environ.get("AIMASS_NCCL_CHECK", "1") == "0":
        return
    mine = np.array([int.from_bytes(hashlib.blake2b(desc.encode(), digest_size=8).digest(), "little",
                                    signed=True)], dtype=np.int64)
    allsig = np.empty(mpi.Get_size(), dtype=np.int64)
    req = mpi.Iallgather(mine, allsig)
    start, sleep = time.monotonic(), 0.0
    while not req.Test():
        if time.monotonic() - start > timeout:
            with _lock:
                _state["failed"] = f"'{desc}' timed out after {timeout:g} s"
            raise _error(f"CUDA collective {desc} on rank {mpi.Get_rank()}: not every rank submitted a collective "
                         f"within {timeout:g} s (a rank skipped it, called collectives in another order, or died)")
        time.sleep(sleep)
        sleep = min(1e-3, sleep + 1e-5)
    if np.all(allsig == allsig[0]):
        return
    # every rank saw the mismatch, so every rank takes this step (still with the deadline)
    every = _gather_text(mpi, desc, timeout, f"CUDA collective {desc}")
    lines = "; ".join(f"rank {r}: {d}" for r, d in enumerate(every))
    raise _error(f"CUDA collectives do not match across ranks ({lines}); call the same collectives with the same "
                 "shape, dtype and op in the same order on every rank")


class _Work:
    """What dist.Handle waits on for a CUDA collective."""

    __slots__ = ("comm", "stream", "timeout", "done")
    buffers_in_use = False  # a timed-out NCCL collective is aborted (ncclCommAbort), not left posted

    def __init__(self, comm, stream: int, timeout: float):
        self.comm, self.stream, self.timeout, self.done = comm, stream, timeout, False

    def wait(self):
        if not self.done:
            self.comm.wait(self.stream, self.timeout)
            self.done = True

    def poll(self) -> bool:
        if not self.done:
            self.done = bool(self.comm.query(self.stream))
        return self.done


def _truncating_divide(out: Any, n: int) -> None:
    # integer 'average' matches the host path: the sum divided by the world size, truncated toward zero
    if is_torch(out):
        out.copy_(sys.modules["torch"].div(out, n, rounding_mode="trunc"))
    else:
        cupy = sys.modules["cupy"]
        out[...] = cupy.sign(out) * (cupy.abs(out) // n)


def _count(shape) -> int:
    return int(np.prod(shape, dtype=np.int64)) if shape else 1


def allreduce(t: Any, op: str, name: str, compression: Optional[str], timeout: float, inplace: bool,
              mpi_comm: Any, size: int):
    """Returns (work, result)."""
    a = describe(t, "allreduce tensor")
    work_t, cast_back = t, None
    if compression:
        if a.dtype != "float32":
            if a.dtype not in ("float16", "bfloat16"):
                raise TypeError(f"compression={compression!r} applies to float32 tensors, got {a.dtype}")
        else:  # Horovod-style: send 16-bit floats, cast the result back (casts run on the same stream)
            wire = "float16" if compression in ("fp16", "float16") else "bfloat16"
            work_t = t.to(getattr(sys.modules["torch"], wire)) if is_torch(t) else t.astype(wire)
            cast_back = t
            a = describe(work_t, "allreduce tensor")
    comm = _communicator(a.device, mpi_comm)
    _signature_check(_state["mpi"], f"allreduce '{name}' shape={list(a.shape)} dtype={a.dtype} op={op}", timeout)
    out = work_t if (inplace or cast_back is not None) else empty_like(work_t, a.shape)
    o = describe(out, "allreduce output")
    nccl_op = op if (op != "average" or a.dtype in _FLOAT) else "sum"
    comm.allreduce(a.ptr, o.ptr, _count(a.shape), a.dtype, nccl_op, a.stream)
    if op == "average" and a.dtype not in _FLOAT:
        _truncating_divide(out, size)
    if cast_back is not None:
        res = out.to(t.dtype) if is_torch(t) else out.astype(t.dtype)
        if inplace:
            t.copy_(res) if is_torch(t) else t.__setitem__(Ellipsis, res)
            res = t
        out = res
    return _Work(comm, a.stream, timeout), out


def broadcast(t: Any, root: int, name: str, timeout: float, inplace: bool, mpi_comm: Any):
    a = describe(t, "broadcast tensor")
    comm = _communicator(a.device, mpi_comm)
    _signature_check(_state["mpi"], f"broadcast '{name}' shape={list(a.shape)} dtype={a.dtype} root={root}", timeout)
    out = t if inplace else empty_like(t, a.shape)
    comm.broadcast(a.ptr, describe(out, "broadcast output").ptr, _count(a.shape), a.dtype, root, a.stream)
    return _Work(comm, a.stream, timeout), out


def _rows(mpi, rows: int, rest, dtype: str, what: str, name: str, timeout: float) -> List[int]:
    # the uneven first dimensions travel over MPI; the rest of the shape must agree (signature check)
    _signature_check(mpi, f"{what} '{name}' shape=[*,{','.join(map(str, rest))}] dtype={dtype}", timeout)
    return [int(r) for r in mpi.allgather(rows)]


def allgather(t: Any, name: str, timeout: float, mpi_comm: Any):
    a = describe(t, "allgather tensor")
    shape = a.shape if a.shape else (1,)
    comm = _communicator(a.device, mpi_comm)
    rows = _rows(_state["mpi"], shape[0], shape[1:], a.dtype, "allgather", name, timeout)
    per_row = _count(shape[1:])
    out = empty_like(t, (sum(rows),) + tuple(shape[1:]))
    comm.allgather(a.ptr, describe(out, "allgather output").ptr, [r * per_row for r in rows], a.dtype, a.stream)
    return _Work(comm, a.stream, timeout), out


def reduce_scatter(t: Any, op: str, name: str, timeout: float, mpi_comm: Any, size: int, rank: int):
    a = describe(t, "reduce_scatter tensor")
    if not a.shape:
        raise ValueError("reduce_scatter: the tensor needs at least one dimension (it is split along dimension 0)")
    comm = _communicator(a.device, mpi_comm)
    _signature_check(_state["mpi"], f"reduce_scatter '{name}' shape={list(a.shape)} dtype={a.dtype} op={op}", timeout)
    n0 = a.shape[0]
    rows = [n0 // size + (1 if r < n0 % size else 0) for r in range(size)]  # numpy.array_split blocks
    per_row = _count(a.shape[1:])
    out = empty_like(t, (rows[rank],) + tuple(a.shape[1:]))
    nccl_op = op if (op != "average" or a.dtype in _FLOAT) else "sum"
    comm.reduce_scatter(a.ptr, describe(out, "reduce_scatter output").ptr, [r * per_row for r in rows], a.dtype,
                        nccl_op, a.stream)
    if op == "average" and a.dtype not in _FLOAT:
        _truncating_divide(out, size)
    return _Work(comm, a.stream, timeout), out
