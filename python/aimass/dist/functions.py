"""Model/optimizer/object helpers with Horovod's names: broadcast_parameters,
broadcast_optimizer_state, broadcast_object, allgather_object."""
from __future__ import annotations

import io
import pickle
from typing import Any, List, Optional

import numpy as np

from . import _core
from ._core import global_process_set, synchronize
from .collectives import allgather, broadcast, broadcast_async


def _torch():
    try:
        import torch
    except ImportError as exc:  # pragma: no cover
        raise ImportError("this part of aimass.dist needs torch") from exc
    return torch


def broadcast_parameters(params: Any, root_rank: int = 0, process_set=global_process_set) -> None:
    """Overwrite every tensor in `params` (a state_dict, or (name, tensor) pairs such as
    model.named_parameters()) with root_rank's values, in place."""
    torch = _torch()
    if hasattr(params, "items"):
        items = list(params.items())
    elif isinstance(params, (list, tuple)) or hasattr(params, "__iter__"):
        items = list(params)
        if any(not (isinstance(x, tuple) and len(x) == 2) for x in items):
            raise ValueError("broadcast_parameters takes a state_dict or (name, tensor) pairs such as "
                             "model.named_parameters()")
    else:
        raise ValueError(f"invalid params of type: {type(params).__name__}")
    handles = []
    with torch.no_grad():
        for name, t in items:
            if t is None:
                continue
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"broadcast_parameters: {name!r} is a {type(t).__name__}, not a torch tensor")
            target = t.data if t.requires_grad else t
            nm = f"bcast.param.{name}"
            if target.is_contiguous():
                handles.append((None, broadcast_async(target, root_rank, nm, process_set, inplace=True)))
            else:
                handles.append((target, broadcast_async(target.contiguous(), root_rank, nm, process_set)))
        for target, h in handles:
            out = synchronize(h)
            if target is not None:
                target.copy_(out)


def broadcast_object(obj: Any, root_rank: int = 0, name: Optional[str] = None, process_set=global_process_set):
    """Return root_rank's `obj` (any picklable object) on every rank. Collective."""
    ps = _core._resolve_set(process_set)
    base = name or _core.make_name("broadcast_object", None, ps)
    if ps.rank() == root_rank:
        data = np.frombuffer(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL), dtype=np.uint8)
        length = np.array([data.size], dtype=np.int64)
    else:
        data, length = None, np.zeros(1, dtype=np.int64)
    length = broadcast(length, root_rank, f"{base}.len", ps)
    buf = data.copy() if data is not None else np.zeros(int(length[0]), dtype=np.uint8)
    buf = broadcast(buf, root_rank, f"{base}.data", ps)
    if ps.rank() == root_rank:
        return obj
    return pickle.loads(buf.tobytes())


def allgather_object(obj: Any, name: Optional[str] = None, process_set=global_process_set) -> List[Any]:
    """Return the list of every rank's `obj` (picklable), in rank order. Collective."""
    ps = _core._resolve_set(process_set)
    base = name or _core.make_name("allgather_object", None, ps)
    data = np.frombuffer(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL), dtype=np.uint8).copy()
    sizes = allgather(np.array([data.size], dtype=np.int64), f"{base}.len", ps)
    blob = allgather(data, f"{base}.data", ps)
    out, off = [], 0
    for n in sizes.tolist():
        out.append(pickle.loads(blob[off:off + n].tobytes()))
        off += n
    return out


def broadcast_optimizer_state(optimizer: Any, root_rank: int = 0, process_set=global_process_set) -> None:
    """Give every rank root_rank's optimizer state (state_dict: moments, steps, hyper-parameters such as
    the learning rate)."""
    torch = _torch()
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"broadcast_optimizer_state takes a torch optimizer, got {type(optimizer).__name__}")
    ps = _core._resolve_set(process_set)
    state = None
    if ps.rank() == root_rank:
        buf = io.BytesIO()
        torch.save(optimizer.state_dict(), buf)
        state = buf.getvalue()
    state = broadcast_object(state, root_rank, "bcast.optstate", ps)
    if ps.rank() != root_rank:
        optimizer.load_state_dict(torch.load(io.BytesIO(state), weights_only=False))
