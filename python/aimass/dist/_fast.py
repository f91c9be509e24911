"""The lean lane of the blocking collectives on numpy arrays.

A blocking ``allreduce``/``broadcast``/``allgather``/``reduce_scatter`` of a C-contiguous numpy
array with a name and no extras (no compression, scaling, timeout or process set) goes straight
to the engine's ``run_blocking``: one call that submits with ``blocking=True`` and waits with the
GIL released. On one node, small tensors then run in the caller's thread through the
low-latency shared-memory channel (docs/comm.md); everything else (and every error) is the
engine's usual path. ``None`` from here means "not handled": the caller takes the full path,
which validates the arguments and raises the usual errors.
"""
from __future__ import annotations

from . import _timeline
from ._ops import ReduceOp
from ._process_sets import global_process_set

ALLREDUCE, BROADCAST, ALLGATHER, REDUCE_SCATTER = 0, 1, 2, 3
_OPS = {"sum": "sum", "average": "average", "avg": "average", "mean": "average", "min": "min", "max": "max",
        "product": "product", "prod": "product"}


def _op_name(op, default: str):
    if op is None:
        return default
    if type(op) is str:
        return _OPS.get(op)
    if isinstance(op, ReduceOp):  # a str enum hashed by member name: look it up by value
        return _OPS.get(op.value)
    return None


def run(kind: int, a, out, name, op=None, root: int = 0, default_op: str = "average"):
    eng = global_process_set._engine
    if eng is None or type(name) is not str or not name or _timeline.active():
        return None
    opn = _op_name(op, default_op)
    if opn is None:
        return None
    return eng.run_blocking(kind, a, out, name, opn, root)


def broadcast_root(root_rank, root):
    """The root when it is a plain valid rank number (else None: the full path checks and raises)."""
    r = root_rank if root is None else (root if root_rank is None else None)
    if type(r) is not int or r < 0:
        return None
    c = global_process_set._comm
    return r if c is not None and r < c.size else None
