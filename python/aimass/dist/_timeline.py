"""Chrome-trace timeline of collectives (Horovod's ``start_timeline``/``stop_timeline``).

Per collective it records, on this rank's track (pid = rank, one tid per kind):
``SUBMIT`` (instant, when the call handed the tensor to the engine), ``IN_FLIGHT``
(submit until the result was collected: negotiation across ranks, fusion and the data
transfer run in this span), ``WAIT`` (the part the caller spent blocked in synchronize)
and, with ``mark_cycles=True``, the engine's cycle/fusion counters as counter tracks at
each completion. The file is a JSON array written atomically at ``stop_timeline()``;
open it in Perfetto (ui.perfetto.dev) or chrome://tracing. Each rank writes its own file
(``path`` with ``.rank<N>`` before the extension when the job has several ranks).
"""
from __future__ import annotations

import json
import os
import threading
import time
from typing import Optional

from .. import _C
from .._io import atomic_write_text

_state = {"path": None, "events": None, "rank": 0, "t0": 0.0, "mark_cycles": False}
_mu = threading.Lock()
_TIDS = {"allreduce": 1, "broadcast": 2, "allgather": 3, "reduce_scatter": 4, "alltoall": 5, "barrier": 6}
_MAX_EVENTS = 2_000_000  # ~200 MB of JSON; later events are dropped (counted in the metadata)


def active() -> bool:
    return _state["events"] is not None


def marks_cycles() -> bool:
    return _state["events"] is not None and _state["mark_cycles"]


def _us(t: float) -> float:
    return round((t - _state["t0"]) * 1e6, 3)


def start(path: str, rank: int, mark_cycles: bool = False) -> None:
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise TypeError(f"start_timeline: file_path must be a path, got {path!r}")
    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(d):
        raise FileNotFoundError(f"start_timeline: directory {d!r} does not exist")
    with _mu:
        _state.update(path=path, events=[], rank=rank, t0=time.perf_counter(), mark_cycles=bool(mark_cycles),
                      dropped=0)
        _C._comm_lean_pause(True)  # the lean lane records nothing: every call takes the full path
        ev = _state["events"]
        ev.append({"name": "process_name", "ph": "M", "pid": rank, "args": {"name": f"rank {rank}"}})
        for kind, tid in _TIDS.items():
            ev.append({"name": "thread_name", "ph": "M", "pid": rank, "tid": tid, "args": {"name": kind}})


def _add(e: dict) -> None:
    ev = _state["events"]
    if ev is None:
        return
    if len(ev) >= _MAX_EVENTS:
        _state["dropped"] += 1
        return
    ev.append(e)


def submitted(name: str, kind: str) -> Optional[float]:
    if _state["events"] is None:
        return None
    t = time.perf_counter()
    with _mu:
        _add({"name": "SUBMIT", "ph": "i", "s": "t", "ts": _us(t), "pid": _state["rank"],
              "tid": _TIDS.get(kind, 7), "args": {"tensor": name}})
    return t


def finished(name: str, kind: str, t_submit: Optional[float], t_wait: float, counters: Optional[dict] = None) -> None:
    if _state["events"] is None or t_submit is None:
        return
    t = time.perf_counter()
    pid, tid = _state["rank"], _TIDS.get(kind, 7)
    with _mu:
        _add({"name": f"{kind} {name}", "cat": "IN_FLIGHT", "ph": "X", "ts": _us(t_submit),
              "dur": _us(t) - _us(t_submit), "pid": pid, "tid": tid, "args": {"tensor": name}})
        if t - t_wait > 1e-6:
            _add({"name": "WAIT", "cat": "WAIT", "ph": "X", "ts": _us(t_wait), "dur": _us(t) - _us(t_wait),
                  "pid": pid, "tid": tid, "args": {"tensor": name}})
        if counters and _state["mark_cycles"]:
            _add({"name": "engine", "ph": "C", "ts": _us(t), "pid": pid, "args": counters})


def stop() -> Optional[str]:
    """Write the file (atomically) and stop recording; returns the path written."""
    with _mu:
        ev, path = _state["events"], _state["path"]
        if ev is None:
            return None
        _state["events"] = None
        _C._comm_lean_pause(False)
        if _state.get("dropped"):
            ev.append({"name": "dropped_events", "ph": "M", "pid": _state["rank"],
                       "args": {"count": _state["dropped"]}})
    atomic_write_text(path, json.dumps(ev, separators=(",", ":")))
    return path
