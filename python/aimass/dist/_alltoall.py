"""alltoall (Horovod's name and arguments): MPI_Ialltoallv on the process set's own
communicator, after a small allgather that checks every rank agrees on name, dtype and
row shape; waits poll with the stall timeout, so a rank that never calls it makes the
others raise aimass.DistributedError instead of hanging."""
from __future__ import annotations

import time
import zlib
from typing import Any, Optional

import numpy as np

from .._array import is_torch
from .._cuda_array import is_cuda_array
from . import _core
from ._core import global_process_set

__all__ = ["alltoall", "alltoall_async"]


def _wants_grad(t) -> bool:
    import torch
    return is_torch(t) and t.requires_grad and torch.is_grad_enabled()


def alltoall(tensor: Any, splits: Any = None, name: Optional[str] = None, process_set=global_process_set, *,
             timeout: Optional[float] = None):
    """Scatter slices of `tensor` along dimension 0 to every rank and gather what they sent (rank order).

    splits: rows for each rank (len == size, sum == tensor.shape[0]); None splits evenly (dimension 0 must
    then be divisible by size). Returns the output, or (output, received_splits) when splits is given, like
    Horovod (received_splits: int32, the input's kind). Runs as MPI_Ialltoallv on the process set's own communicator after
    a small exchange that checks dtype/shape agreement; a peer that does not call it raises
    aimass.DistributedError after the timeout instead of hanging. Differentiable for torch tensors."""
    if _wants_grad(tensor):
        ps = _core._resolve_set(process_set)
        from ._autograd import Alltoall
        out, received = Alltoall.apply(tensor, splits, name, ps)
    else:
        out, received = _alltoall(tensor, splits, name, process_set, timeout)
    return out if splits is None else (out, received)


def _wait_requests(reqs, timeout: float, what: str):
    from mpi4py import MPI
    start = time.monotonic()
    spins = 0
    while not MPI.Request.Testall(reqs):
        if time.monotonic() - start > timeout:
            for r in reqs:
                try:
                    r.Cancel()
                except Exception:  # pragma: no cover - best effort
                    pass
            raise _core.DistributedError(f"aimass.dist: {what} did not complete within {timeout} s: a rank has "
                                         "not called it (or died); every rank must call the same collectives")
        spins += 1
        time.sleep(0 if spins < 100 else 1e-4)


def _alltoall(tensor, splits, name, process_set, timeout):
    from mpi4py import MPI
    ps = _core._resolve_set(process_set)
    ps._engine_checked()
    if is_cuda_array(tensor):
        raise NotImplementedError("alltoall on CUDA tensors is not supported yet; move the tensor to the CPU")
    a, dt = _core.as_input(tensor, "alltoall tensor")
    if a.ndim == 0:
        raise ValueError("alltoall: the tensor needs at least one dimension (it is split along dimension 0)")
    a = _core.contiguous(a)
    n, me = ps.size(), ps.rank()
    rows = a.shape[0]
    if splits is None:
        if rows % n:
            raise ValueError(f"alltoall: dimension 0 ({rows}) is not divisible by the number of ranks ({n}); "
                             "pass splits=")
        send = np.full(n, rows // n, dtype=np.int64)
    else:
        s, _ = _core.as_input(splits, "alltoall splits")
        send = np.asarray(s).astype(np.int64).reshape(-1)
        if send.size != n or (send < 0).any() or int(send.sum()) != rows:
            raise ValueError(f"alltoall: splits must have {n} non-negative entries summing to dimension 0 "
                             f"({rows}), got {send.tolist()}")
    nm = _core.make_name("alltoall", name, ps)
    row_bytes = int(a.dtype.itemsize * (np.prod(a.shape[1:], dtype=np.int64) if a.ndim > 1 else 1))
    sig = zlib.crc32(f"{nm}|{dt}|{list(a.shape[1:])}".encode())
    info = np.concatenate([[sig], send]).astype(np.int64)
    everyone = np.empty((n, n + 1), dtype=np.int64)
    tmo = _core.check_timeout(timeout) or _core.default_timeout()
    comm = ps._a2a
    t0 = _core._timeline.submitted(nm, "alltoall")
    _wait_requests([comm.Iallgather(info, everyone)], tmo, f"alltoall '{nm}' (agreement)")
    if (everyone[:, 0] != sig).any():
        raise _core.DistributedError(f"aimass.dist: ranks called alltoall with different names, dtypes or row "
                                     f"shapes (this rank: '{nm}', {dt}, rows {list(a.shape[1:])}); every rank must "
                                     "call the same collectives in the same order")
    recv = everyone[:, 1 + me].copy()
    if int(recv.sum()) * row_bytes >= 2 ** 31 or rows * row_bytes >= 2 ** 31:
        raise ValueError("alltoall: more than 2 GiB per rank is not supported; split the tensor")
    out = np.empty((int(recv.sum()),) + a.shape[1:], dtype=a.dtype)
    sc, rc = (send * row_bytes).astype(np.int64), (recv * row_bytes).astype(np.int64)
    sd = np.concatenate([[0], np.cumsum(sc)[:-1]]).astype(np.int64)
    rd = np.concatenate([[0], np.cumsum(rc)[:-1]]).astype(np.int64)
    src = a.reshape(-1).view(np.uint8) if a.size else np.empty(0, np.uint8)
    dst = out.reshape(-1).view(np.uint8) if out.size else np.empty(0, np.uint8)
    req = comm.Ialltoallv([src, (sc.tolist(), sd.tolist()), MPI.BYTE], [dst, (rc.tolist(), rd.tolist()), MPI.BYTE])
    t_wait = time.perf_counter()
    _wait_requests([req], tmo, f"alltoall '{nm}'")
    _core._timeline.finished(nm, "alltoall", t0, t_wait)
    recv32 = recv.astype(np.int32)
    if is_torch(tensor):
        import torch
        return _core.wrap(out, dt, tensor), torch.from_numpy(recv32)
    return out, recv32


def alltoall_async(*args, **kwargs):
    """Not supported: alltoall runs synchronously in aimass.dist."""
    raise NotImplementedError("alltoall_async is not supported by aimass.dist: call alltoall() (it returns the "
                              "result directly); see docs/horovod.md")

