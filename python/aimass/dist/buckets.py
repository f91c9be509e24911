"""Gradients as views into flat buckets (DDP's ``gradient_as_bucket_view``).

``GradientBuckets(params)`` packs the parameters' gradients into a few flat tensors
("buckets", ``bucket_bytes`` each at most, one dtype and device per bucket) and points every
``p.grad`` at its slice. Autograd then accumulates straight into the buckets, and one allreduce
per bucket reduces every gradient in it: no per-tensor submission, negotiation or unpacking, and
nothing is copied into or out of a fusion buffer (the engine reduces the bucket in place).

    buckets = aimass.dist.GradientBuckets(model.parameters())
    loss.backward()
    buckets.allreduce()          # every gradient averaged over the ranks, in place
    opt.step()
    buckets.zero_()              # instead of opt.zero_grad(): keeps the views

``DistributedOptimizer(opt, ..., gradient_as_bucket_view=True)`` does the same inside the
optimizer: a bucket is submitted as soon as backward produced all of its gradients (the
allreduce overlaps the rest of backward), and ``zero_grad()`` zeroes the buckets.

Buckets are filled in reverse parameter order, as DDP does: backward produces the last layers'
gradients first, so the first bucket is ready first. Every rank must build them from the same
parameters in the same order (the bucket names and sizes are checked by the engine: a mismatch
raises :class:`aimass.DistributedError`). If code replaces ``p.grad`` (``zero_grad(set_to_none=True)``,
``p.grad = t``), :meth:`GradientBuckets.attach` copies the new gradient into the bucket and restores
the view; :meth:`allreduce_async` calls it first.

Host buckets of 2 MiB or more live in memory the node's other ranks map (``_C.SharedHostBuffer``, a sealed
memfd) when the engine can reduce them there (``engine.shared_buffers``, agreed at ``init()``: build the
buckets after it; one node only: across nodes the hierarchical paths go through the kernel, where private
huge pages move 1.2-1.3x faster): every rank's bucket is then reduced with plain loads and stores in every
other rank's mapping, with no kernel copy (docs/comm.md, "Gradients as bucket views").
``GradientBuckets.shared`` says which buckets got there; the others are private huge-page memory as before.
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, List, Optional, Tuple

from ._core import global_process_set, synchronize
from ._ops import check_op

DEFAULT_BUCKET_BYTES = 25 << 20  # DDP's bucket_cap_mb default
# Host buckets of at least this many bytes live in 2 MiB-aligned memory advised as huge pages
# (_C.HostBuffer). torch's allocator gives 4 KiB pages when THP is "madvise" (the common default),
# and the single-copy path's process_vm_readv / _writev walk a peer's buffer page by page: a 25 MiB
# in-place allreduce, 2 ranks, took 8.8-10.5 ms from torch.zeros against 5.0-6.2 ms from huge pages.
HUGE_BUCKET_BYTES = 2 << 20


def _zeros(torch, count: int, dtype, device, shared: bool = False):
    """A flat zeroed bucket and whether it is shared: host memory from _C.HostBuffer when large, else torch's
    own. shared: from _C.SharedHostBuffer (a memfd the local peers map), which the engine reduces with loads
    and stores in every rank's bucket; private huge pages when it cannot be had."""
    nbytes = count * torch.empty((), dtype=dtype).element_size()
    if torch.device(device).type != "cpu" or nbytes < HUGE_BUCKET_BYTES:
        return torch.zeros(count, dtype=dtype, device=device), False
    from .. import _C
    if shared:
        try:
            return torch.frombuffer(_C.SharedHostBuffer(nbytes), dtype=dtype), True
        except OSError:  # no memfd here, or no memory for it: the kernel-copy path on private memory
            pass
    return torch.frombuffer(_C.HostBuffer(nbytes), dtype=dtype), False  # shares and keeps the buffer


def _engine_maps_peers(process_set) -> bool:
    """Whether process_set's engine reduces shared host buffers in the local peers' mappings (agreed at init)."""
    eng = getattr(process_set, "_engine", None)
    return eng is not None and bool(getattr(eng, "shared_buffers", False))


def _torch():
    try:
        import torch
    except ImportError as exc:  # pragma: no cover
        raise ImportError("aimass.dist.GradientBuckets needs torch") from exc
    return torch


class GradientBuckets:
    """Flat gradient buckets for `params` (an iterable of torch parameters; those without requires_grad are
    skipped); bucket_bytes: the most bytes per bucket (a larger parameter gets a bucket of its own).
    name: prefix of the buckets' collective names (unique per GradientBuckets object within a job)."""

    def __init__(self, params: Iterable[Any], bucket_bytes: int = DEFAULT_BUCKET_BYTES, name: str = "grad.bucket",
                 process_set=global_process_set):
        torch = _torch()
        if isinstance(bucket_bytes, bool) or not isinstance(bucket_bytes, int) or bucket_bytes < 1:
            raise ValueError(f"bucket_bytes must be an int >= 1, got {bucket_bytes!r}")
        if not isinstance(name, str) or not name:
            raise ValueError(f"name must be a non-empty string, got {name!r}")
        if isinstance(params, torch.Tensor):
            params = [params]
        plist = []
        seen = set()
        for p in params:
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"GradientBuckets takes torch parameters, got {type(p).__name__}")
            if not p.requires_grad or id(p) in seen:
                continue
            if p.layout != torch.strided:
                raise ValueError("GradientBuckets holds dense parameters only; leave sparse ones out")
            seen.add(id(p))
            plist.append(p)
        if not plist:
            raise ValueError("GradientBuckets got no parameter that requires a gradient")
        self.name = name
        self._ps = process_set
        self.params: List[Any] = plist
        # reverse order, grouped by (dtype, device), cut at bucket_bytes
        open_: Dict[Tuple[Any, Any], List[Any]] = {}
        sizes: Dict[Tuple[Any, Any], int] = {}
        groups: List[List[Any]] = []
        for p in reversed(plist):
            key = (p.dtype, p.device)
            nb = p.numel() * p.element_size()
            cur = open_.get(key)
            if cur is None or sizes[key] + nb > bucket_bytes:  # buckets in the order they are opened
                cur = open_[key] = []
                groups.append(cur)
                sizes[key] = 0
            cur.append(p)
            sizes[key] += nb
        self.buckets: List[Any] = []
        self._members: List[List[Any]] = []
        self._views: Dict[int, Any] = {}
        self._bucket_of: Dict[int, int] = {}
        # host buckets in shared memory when the engine can reduce them in every rank's mapping (every rank
        # decides alike: the engine's probe at init is agreed); else private huge pages for the kernel copies
        shared = _engine_maps_peers(process_set)
        self.shared: List[bool] = []  # per bucket: in memory the local peers map (reduced in their mappings)
        for i, g in enumerate(groups):
            total = sum(p.numel() for p in g)
            flat, on_shared = _zeros(torch, total, g[0].dtype, g[0].device, shared)
            self.shared.append(on_shared)
            off = 0
            for p in g:
                n = p.numel()
                view = flat[off:off + n].view(p.shape)
                if p.grad is not None:
                    view.copy_(p.grad.detach())
                p.grad = view
                self._views[id(p)] = view
                self._bucket_of[id(p)] = i
                off += n
            self.buckets.append(flat)
            self._members.append(g)

    def __len__(self) -> int:
        return len(self.buckets)

    def __repr__(self) -> str:
        mib = sum(b.numel() * b.element_size() for b in self.buckets) / 2**20
        return f"<aimass.dist.GradientBuckets {len(self.params)} parameters in {len(self)} buckets, {mib:.1f} MiB>"

    def members(self, i: int) -> List[Any]:
        """The parameters whose gradients live in bucket i (in bucket order)."""
        return list(self._members[i])

    def bucket_of(self, p: Any) -> int:
        """The index of the bucket holding p's gradient (KeyError for a parameter not bucketed)."""
        try:
            return self._bucket_of[id(p)]
        except KeyError:
            raise KeyError("this parameter's gradient is not in these buckets") from None

    def attach(self, params: Optional[Iterable[Any]] = None) -> None:
        """Make every p.grad the view into its bucket again: a gradient that code replaced is copied in,
        a missing one (set to None) is zeroed."""
        for p in self.params if params is None else params:
            view = self._views[id(p)]
            g = p.grad
            if g is view:
                continue
            if g is None:
                view.zero_()
            elif g.data_ptr() != view.data_ptr():
                if g.is_sparse:
                    g = g.to_dense()
                view.copy_(g.detach())
            p.grad = view

    def zero_(self) -> None:
        """Zero every bucket (every gradient) and keep the views."""
        self.attach()
        for b in self.buckets:
            b.zero_()

    def allreduce_async(self, op: Any = "average", compression: Any = None, timeout: Optional[float] = None,
                        buckets: Optional[Iterable[int]] = None, prescale_factor: float = 1.0,
                        postscale_factor: float = 1.0) -> List[Any]:
        """Start one in-place allreduce per bucket (all, or the given indices); returns their handles."""
        from .collectives import allreduce_async_
        opname = check_op(op)
        idx = range(len(self.buckets)) if buckets is None else list(buckets)
        hs = []
        for i in idx:
            self.attach(self._members[i])
            hs.append(allreduce_async_(self.buckets[i], None, f"{self.name}.{i}", opname, prescale_factor,
                                       postscale_factor, self._ps, compression=compression, timeout=timeout))
        return hs

    def allreduce(self, op: Any = "average", compression: Any = None, timeout: Optional[float] = None) -> None:
        """Allreduce every bucket in place (every p.grad then holds the reduced gradient)."""
        for h in self.allreduce_async(op, compression, timeout):
            synchronize(h)

