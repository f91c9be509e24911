"""Process sets (Horovod's ``hvd.ProcessSet``): groups of ranks that run collectives among
themselves. Each registered set is an MPI sub-communicator with its own engine (started by
aimass.dist._core); the global set (id 0) is the job's communicator."""
from __future__ import annotations

from typing import Any, List, Optional

from . import _core as _c  # used at call time only (the two modules import each other)

class ProcessSet:
    """A group of ranks that runs collectives among themselves (Horovod's ``hvd.ProcessSet``).

    ``ProcessSet([0, 2])`` (global ranks) or ``ProcessSet(mpi4py_comm)``; register it with
    ``add_process_set()`` or ``init(process_sets=[...])`` (both collective over every rank), then pass
    ``process_set=`` to any collective. Each set is an MPI sub-communicator with its own engine."""

    def __init__(self, ranks_or_comm: Any = None):
        self.process_set_id: Optional[int] = None
        self._mpi_comm = None  # mpi4py sub-communicator (None on ranks outside the set)
        self._comm = None  # _C.Communicator
        self._engine = None  # _C.CollectiveEngine
        self._a2a = None  # mpi4py duplicate for alltoall
        self._counters: dict = {}
        self._given_comm = None
        if ranks_or_comm is None:
            self.ranks: Optional[List[int]] = None
        elif hasattr(ranks_or_comm, "Get_rank") and hasattr(ranks_or_comm, "Get_size"):
            self._given_comm = ranks_or_comm
            self.ranks = None  # known after registration
        else:
            try:
                ranks = [int(r) for r in ranks_or_comm]
            except TypeError:
                raise TypeError(f"ProcessSet takes a list of ranks or an mpi4py communicator, got "
                                f"{type(ranks_or_comm).__name__}") from None
            if any(isinstance(r, bool) for r in ranks_or_comm):
                raise TypeError("ProcessSet ranks must be ints")
            if not ranks or len(set(ranks)) != len(ranks) or min(ranks) < 0:
                raise ValueError(f"ProcessSet needs distinct ranks >= 0, got {list(ranks_or_comm)!r}")
            self.ranks = sorted(ranks)

    def _require_registered(self):
        if self.process_set_id is None:
            raise ValueError("this ProcessSet is not registered: pass it to aimass.dist.add_process_set() (or "
                             "init(process_sets=[...])) on every rank first")

    def included(self) -> bool:
        """Whether this rank belongs to the set."""
        self._require_registered()
        return self._comm is not None

    def rank(self) -> int:
        """This rank's index within the set."""
        return self._checked().rank

    def size(self) -> int:
        """Number of ranks in the set."""
        self._require_registered()
        return len(self.ranks)

    def _checked(self):
        self._require_registered()
        if self._comm is None:
            raise ValueError(f"rank {_c._world().rank} is not in process set {self.process_set_id} (ranks "
                             f"{self.ranks}); only its ranks may call its collectives")
        return self._comm

    def _engine_checked(self):
        self._checked()
        return self._engine

    def __repr__(self):
        return f"ProcessSet(process_set_id={self.process_set_id}, ranks={self.ranks})"


global_process_set = ProcessSet()
_process_sets: dict = {}  # id -> ProcessSet (the global one is id 0)
_next_set_id = 1


def _resolve_set(process_set) -> ProcessSet:
    if process_set is None:
        process_set = global_process_set
    if not isinstance(process_set, ProcessSet):
        raise TypeError(f"process_set must be an aimass.dist.ProcessSet, got {type(process_set).__name__}")
    _c._world()
    if process_set is not global_process_set and _process_sets.get(process_set.process_set_id) is not process_set:
        raise ValueError(f"{process_set!r} is not registered (or was removed): call add_process_set() first")
    return process_set


def _register(ps: ProcessSet) -> None:
    """Collective over every rank: give `ps` an MPI sub-communicator and, on its ranks, an engine."""
    global _next_set_id
    world = global_process_set._mpi_comm
    if ps.process_set_id is not None:
        raise ValueError(f"{ps!r} is already registered")
    if ps._given_comm is not None:
        mine = ps._given_comm.Get_rank() if ps._given_comm != _mpi_null() else -1
        ranks = world.allgather(world.Get_rank() if mine >= 0 else -1)
        ps.ranks = sorted(r for r in ranks if r >= 0)
    else:
        bad = [r for r in ps.ranks if r >= world.Get_size()]
        if bad:
            raise ValueError(f"ProcessSet ranks {bad} are not ranks of this job (size {world.Get_size()})")
    # every rank must ask for the same set, or the sub-communicator calls would not match
    views = world.allgather(tuple(ps.ranks))
    if any(v != views[0] for v in views):
        raise ValueError(f"add_process_set: ranks disagree on the set: {dict(enumerate(views))}")
    for other in _process_sets.values():
        if other.ranks == ps.ranks:
            raise ValueError(f"a process set with ranks {ps.ranks} is already registered ({other!r})")
    sub = world.Create_group(world.Get_group().Incl(ps.ranks))
    ps.process_set_id = _next_set_id
    _next_set_id += 1
    if sub != _mpi_null():
        _c._start_engine(ps, sub, timeout=_c._default_timeout)
    _process_sets[ps.process_set_id] = ps


def _mpi_finalized() -> bool:
    from mpi4py import MPI
    return MPI.Is_finalized()


def _mpi_null():
    from mpi4py import MPI
    return MPI.COMM_NULL


def add_process_set(process_set: Any) -> ProcessSet:
    """Register a ProcessSet (or a list of ranks) at run time; collective over every rank. Returns the set."""
    ps = process_set if isinstance(process_set, ProcessSet) else ProcessSet(process_set)
    _c._world()
    with _c._lock:
        _register(ps)
    return ps


def remove_process_set(process_set: ProcessSet) -> bool:
    """Unregister a set (collective over every rank); its engine stops. False if it was not registered."""
    if not isinstance(process_set, ProcessSet):
        raise TypeError(f"remove_process_set takes a ProcessSet, got {type(process_set).__name__}")
    if process_set is global_process_set:
        raise ValueError("the global process set cannot be removed")
    _c._world()
    with _c._lock:
        if _process_sets.get(process_set.process_set_id) is not process_set:
            return False
        sub = process_set._mpi_comm
        _c._stop_engine(process_set)
        if sub is not None:
            sub.Free()
        process_set._mpi_comm = None
        del _process_sets[process_set.process_set_id]
        global_process_set._mpi_comm.Barrier()
        process_set.process_set_id = None
        return True


