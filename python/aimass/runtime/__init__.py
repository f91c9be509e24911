"""aimass.runtime: run exported models in-process with dynamic batching.

    aimass.runtime.export(model, (example,), "model.aimass")          # torch.fx -> .aimass
    with aimass.runtime.Session("model.aimass") as sess:
        out = sess.run({"x": batch})                                  # blocking, GIL released
        fut = sess.submit({"x": row}, deadline_ms=5, priority=1)      # concurrent.futures.Future
        out = await sess.run_async({"x": row})

The model file, executor and batcher are C++ (aimass_core/src/runtime); this
module converts arrays and wires futures. See docs/model-format.md.
"""
from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import math
import numbers
import operator
import os
import threading
import weakref
from typing import Any, Dict, List, Mapping, Optional

import numpy as np

from .. import _C
from .._array import as_numpy, float32_array, like
from ._export import FORMAT_VERSION, SUPPORTED, UnsupportedOpError, export
from ._onnx import SUPPORTED_ONNX, from_onnx

_rt = _C.runtime

__all__ = ["export", "from_onnx", "SUPPORTED_ONNX", "load", "Model", "Session", "UnsupportedOpError", "FORMAT_VERSION", "SUPPORTED"]


class Model:
    """A loaded (memory-mapped, validated) .aimass file."""

    def __init__(self, path):
        self._m = _rt.Model.load(os.fspath(path))

    @property
    def signature(self) -> dict:
        return {"inputs": list(self._m.inputs), "outputs": list(self._m.outputs)}

    @property
    def metadata(self) -> dict:
        return dict(self._m.metadata)

    @property
    def format_version(self) -> int:
        return self._m.format_version

    def __repr__(self):
        return f"aimass.runtime.Model({self._m.path!r}, {self._m.num_nodes} nodes)"


def load(path) -> Model:
    """Memory-map and validate an .aimass file (OSError, aimass.CorruptDataError or ValueError on bad files)."""
    return Model(path)


def _convert_inputs(specs, inputs: Mapping[str, Any], where: str) -> List[np.ndarray]:
    if not isinstance(inputs, Mapping):
        raise TypeError(f"{where}: inputs must be a dict of input name -> array, got {type(inputs).__name__}")
    names = [s["name"] for s in specs]
    extra = set(inputs) - set(names)
    missing = [n for n in names if n not in inputs]
    if missing or extra:
        raise ValueError(f"{where}: the model takes inputs {names}; missing {missing}, unknown {sorted(extra)}")
    arrays = []
    for s in specs:
        x = inputs[s["name"]]
        what = f"input '{s['name']}'"
        shape = tuple(as_numpy(x, what)[0].shape)  # as given: ascontiguousarray makes a scalar 1-D
        row = tuple(s["shape"][1:])  # -1: a dynamic (sequence) dim, any size

        def fits(got, want):
            return len(got) == len(want) and all(w == -1 or g == w for g, w in zip(got, want))

        single = fits(shape, row)
        if not single and not (len(shape) == len(row) + 1 and fits(shape[1:], row)):
            given = f"[{', '.join(map(str, shape))}]" + (" (a scalar)" if not shape else "")
            raise ValueError(f"{where}: {what} has shape {given}; the model expects "
                             f"[batch, {', '.join(map(str, row))}] or one example [{', '.join(map(str, row))}]")
        if s["dtype"] == "float32":
            a = float32_array(x, what)
        else:
            a, dt = as_numpy(x, what)
            if dt not in ("int64", "int32", "int16", "int8", "uint8", "bool"):
                raise TypeError(f"{where}: {what} must hold integer indices, got {dt}")
            a = np.ascontiguousarray(a, dtype=np.int64)
        if single:  # a single example without the batch dimension
            a = a.reshape((1,) + shape)
        arrays.append(np.ascontiguousarray(a))
    return arrays


# Longest deadline a request may carry (about 31.7 years): past it the batcher's clock
# arithmetic would overflow. Priorities are C ints.
MAX_DEADLINE_MS = 1e12
PRIORITY_RANGE = (-(2 ** 31), 2 ** 31 - 1)
_INT_LIMITS = {"max_batch_size": (1, 2 ** 31 - 1), "max_queue_delay_us": (0, int(MAX_DEADLINE_MS) * 1000),
               "queue_capacity": (1, 2 ** 24), "num_threads": (1, 4096)}


def _timeout_us(deadline_ms: Optional[float]) -> int:
    """A request's deadline for the batcher: microseconds from now, -1 for none."""
    if deadline_ms is None:
        return -1
    if isinstance(deadline_ms, bool) or not isinstance(deadline_ms, numbers.Real):
        raise TypeError(f"deadline_ms must be None (no deadline) or a number of milliseconds in "
                        f"[0, {MAX_DEADLINE_MS:g}], got {type(deadline_ms).__name__} {deadline_ms!r}")
    d = float(deadline_ms)
    if not (math.isfinite(d) and 0 <= d <= MAX_DEADLINE_MS):
        raise ValueError(f"deadline_ms must be None (no deadline) or a finite number of milliseconds in "
                         f"[0, {MAX_DEADLINE_MS:g}], got {deadline_ms!r}")
    return int(d * 1000)


def _int_arg(name: str, v, lo: int, hi: int, where: str = "") -> int:
    """v as a Python int in [lo, hi]: TypeError for a non-integer, ValueError out of range."""
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        try:
            if isinstance(v, bool):
                raise TypeError
            v = operator.index(v)
        except TypeError:
            raise TypeError(f"{where}{name} must be an int in [{lo}, {hi}], got {type(v).__name__} {v!r}") from None
    v = int(v)
    if not lo <= v <= hi:
        raise ValueError(f"{where}{name} must be an int in [{lo}, {hi}], got {v}")
    return v


def _priority(priority) -> int:
    if type(priority) is int and -2147483648 <= priority <= 2147483647:
        return priority  # the hot paths' common case, without _int_arg's checks
    return _int_arg("priority", priority, *PRIORITY_RANGE)  # raises TypeError / ValueError, or converts


# Sessions still open at interpreter exit are closed first (their scheduler and futures threads
# joined): tearing one down mid-shutdown aborted the process ("terminate called without an active
# exception", exit 134).
_LIVE: "weakref.WeakSet[Session]" = weakref.WeakSet()


@atexit.register
def _close_live_sessions() -> None:
    for sess in list(_LIVE):
        try:
            sess.close()
        except Exception:
            pass


class Session:
    """An in-process inference session: one C++ batcher (scheduler thread) over one executor.

    max_batch_size: rows per executed batch (1 turns batching off); max_queue_delay_us: longest
    wait for more requests when load is evident (a lone request on an idle executor never waits);
    queue_capacity: queued requests before submit/run raise aimass.QueueFullError; num_threads:
    the engine's CPU threads (aimass.set_num_threads; None keeps the current setting)."""

    def __init__(self, path, max_batch_size: Optional[int] = None, max_queue_delay_us: Optional[int] = None,
                 queue_capacity: int = 1024, num_threads: Optional[int] = None):
        from .. import _tuning  # defaults: the machine's tuning profile, else 32 rows and 500 us
        if max_batch_size is None:
            max_batch_size = _tuning.default("session_max_batch_size", 32)
        if max_queue_delay_us is None:
            max_queue_delay_us = _tuning.default("session_max_queue_delay_us", 500)
        max_batch_size = _int_arg("max_batch_size", max_batch_size, *_INT_LIMITS["max_batch_size"], "Session: ")
        max_queue_delay_us = _int_arg("max_queue_delay_us", max_queue_delay_us, *_INT_LIMITS["max_queue_delay_us"],
                                      "Session: ")
        queue_capacity = _int_arg("queue_capacity", queue_capacity, *_INT_LIMITS["queue_capacity"], "Session: ")
        if num_threads is not None:
            num_threads = _int_arg("num_threads", num_threads, *_INT_LIMITS["num_threads"], "Session: ")
            import aimass
            aimass.set_num_threads(num_threads)
        self._model = Model(path)
        self.max_batch_size, self.max_queue_delay_us = max_batch_size, max_queue_delay_us
        self._batcher = _rt.Batcher(self._model._m, max_batch_size, max_queue_delay_us, queue_capacity)
        self._specs_in = list(self._model._m.inputs)
        self._specs_out = list(self._model._m.outputs)
        self._pending: Dict[int, tuple] = {}
        self._lock = threading.Lock()
        self._dispatcher: Optional[threading.Thread] = None
        self._closed = False
        _LIVE.add(self)

    # -- introspection
    @property
    def signature(self) -> dict:
        return self._model.signature

    @property
    def model(self) -> Model:
        return self._model

    def stats(self) -> dict:
        """Counters (requests by outcome, batches, queue depth) and histograms (queue_us, compute_us,
        batch_rows, batch_requests: bucket upper bounds, counts, count, sum)."""
        return self._batcher.stats()

    # -- requests
    def _submit_ticket(self, inputs, deadline_ms, priority, notify, run_inline=False):
        priority = _priority(priority)
        timeout_us = _timeout_us(deadline_ms)
        arrays = _convert_inputs(self._specs_in, inputs, "Session")
        return self._batcher.submit(arrays, priority, timeout_us, notify, run_inline), inputs

    def _result(self, outputs, inputs) -> Dict[str, Any]:
        template = next(iter(inputs.values()))
        return {s["name"]: like(o, template) for s, o in zip(self._specs_out, outputs)}

    def run(self, inputs: Mapping[str, Any], deadline_ms: Optional[float] = None, priority: int = 0) -> Dict[str, Any]:
        """Run one request (any number of rows) and block until its outputs are ready.
        The GIL is released while it waits. Outputs come back as the inputs' kind (numpy/torch)."""
        # Hot path: one C++ call enqueues (or runs inline on an idle session), releases
        # the GIL and waits on the request's own condition variable; C++ checks shapes.
        priority = _priority(priority)
        timeout_us = _timeout_us(deadline_ms)
        out = self._batcher.run_plain(inputs, priority, timeout_us)
        if out is None:  # torch tensors, other dtypes, no batch dim, bad inputs: convert (or explain) here
            arrays = _convert_inputs(self._specs_in, inputs, "Session")
            out = self._result(self._batcher.run(arrays, priority, timeout_us), inputs)
        return out

    def submit(self, inputs: Mapping[str, Any], deadline_ms: Optional[float] = None,
               priority: int = 0) -> concurrent.futures.Future:
        """Queue a request; the Future resolves to the output dict, or to TimeoutError when
        its deadline passes before it runs. Raises aimass.QueueFullError / aimass.ClosedError at once."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        fut.set_running_or_notify_cancel()
        self._enqueue(inputs, deadline_ms, priority, fut)
        return fut

    async def run_async(self, inputs: Mapping[str, Any], deadline_ms: Optional[float] = None,
                        priority: int = 0, inline: bool = False) -> Dict[str, Any]:
        """Awaitable run(): the event loop is never blocked. The request's asyncio future is resolved
        on its loop, one loop wake-up per finished batch (not per request, no concurrent Future).
        inline=True: when the session is idle and not under load (as run() decides), the request runs
        on the calling thread before this returns (blocking the loop for that one compute, with no
        thread hand-off); otherwise it is queued and awaited as usual, never blocking the loop."""
        if inline:
            # plain numpy inputs: one C++ call that runs it here or declines, queueing nothing
            # (about 20 us less Python per request than the ticket path below, which converts)
            priority = _priority(priority)
            out = self._batcher.run_plain(inputs, priority, _timeout_us(deadline_ms), True)
            if out is not None:
                return out
        fut = asyncio.get_running_loop().create_future()
        done = self._enqueue(inputs, deadline_ms, priority, fut, inline)
        if done is not None:
            ticket, inputs = done
            return self._result(ticket.result(), inputs)
        return await fut

    def _enqueue(self, inputs, deadline_ms, priority, fut, run_inline: bool = False):
        """Queue a request whose future the futures thread resolves; with run_inline, returns
        (ticket, inputs) instead when the batcher ran it on this thread."""
        with self._lock:
            ticket, inputs = self._submit_ticket(inputs, deadline_ms, priority, True, run_inline)
            if run_inline and ticket.done():
                return ticket, inputs
            self._pending[ticket.id] = (ticket, fut, inputs)
            if self._dispatcher is None:
                self._dispatcher = threading.Thread(target=self._dispatch, name="aimass-runtime-futures",
                                                    daemon=True)
                self._dispatcher.start()

    @staticmethod
    def _resolve_on_loop(done) -> None:
        for fut, value, exc in done:
            if fut.cancelled():
                continue
            if exc is None:
                fut.set_result(value)
            else:
                fut.set_exception(exc)

    def _dispatch(self):
        # Resolves futures as the scheduler reports finished requests (waits without the GIL):
        # concurrent futures directly, asyncio futures in one call_soon_threadsafe per loop and wake-up.
        while True:
            ids = self._batcher.wait_completed(100_000)
            per_loop: Dict[Any, list] = {}
            for rid in ids:
                with self._lock:
                    entry = self._pending.pop(rid, None)
                if entry is None:   # run_async(inline=True) saw it finish first and returned its result
                    continue
                ticket, fut, inputs = entry
                value = exc = None
                try:
                    value = self._result(ticket.result(), inputs)
                except BaseException as e:  # the request's own error (TimeoutError, ...)
                    exc = e
                if isinstance(fut, concurrent.futures.Future):
                    if exc is None:
                        fut.set_result(value)
                    else:
                        fut.set_exception(exc)
                else:
                    per_loop.setdefault(fut.get_loop(), []).append((fut, value, exc))
            for loop, done in per_loop.items():
                try:
                    loop.call_soon_threadsafe(self._resolve_on_loop, done)
                except RuntimeError:  # that loop is closed: nobody awaits these any more
                    pass
            with self._lock:
                if self._closed and not self._pending:
                    return

    def close(self) -> None:
        """Stop accepting requests (aimass.ClosedError), finish every queued one, stop the scheduler."""
        self._batcher.close()
        with self._lock:
            self._closed = True
            d = self._dispatcher
        if d is not None:
            d.join()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
