"""Autograd functions that make the torch collectives differentiable (Horovod's semantics):
allreduce <-> allreduce of the gradient, broadcast -> sum at the root, allgather ->
this rank's rows of the summed gradient, reducescatter -> allgather, alltoall -> the
reverse alltoall."""
from __future__ import annotations

import torch

from . import collectives as C
from ._alltoall import _alltoall
from ._core import synchronize


class Allreduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, op, name, compression, prescale, postscale, process_set):
        ctx.args = (op, prescale, postscale, process_set)
        return synchronize(C.allreduce_async(tensor, None, name, op, prescale, postscale, process_set,
                                             compression=compression))

    @staticmethod
    def backward(ctx, grad):
        op, pre, post, ps = ctx.args
        if op not in ("sum", "average"):
            raise RuntimeError(f"allreduce with op={op!r} has no gradient in aimass.dist (only Sum and Average)")
        return C.allreduce(grad.contiguous(), None, None, None, op, pre, post, ps), None, None, None, None, None, None


class Broadcast(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, root, name, process_set):
        ctx.args = (root, process_set)
        return synchronize(C.broadcast_async(tensor, root, name, process_set))

    @staticmethod
    def backward(ctx, grad):
        root, ps = ctx.args
        g = C.allreduce(grad.contiguous(), op="sum", process_set=ps)
        if ps.rank() != root:
            g = torch.zeros_like(g)
        return g, None, None, None


class Allgather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, name, process_set):
        ctx.ps = process_set
        ctx.rows = tensor.shape[0] if tensor.dim() else 1
        return synchronize(C.allgather_async(tensor, name, process_set))

    @staticmethod
    def backward(ctx, grad):
        ps = ctx.ps
        g = C.allreduce(grad.contiguous(), op="sum", process_set=ps)
        rows = C.allgather(torch.tensor([ctx.rows], dtype=torch.int64), process_set=ps)
        off = int(rows[:ps.rank()].sum())
        return g.narrow(0, off, ctx.rows), None, None


class ReduceScatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, op, name, process_set, prescale, postscale):
        if op not in ("sum", "average"):
            raise RuntimeError(f"reducescatter with op={op!r} has no gradient in aimass.dist (only Sum and Average)")
        ctx.args = (op, process_set, prescale, postscale)
        return synchronize(C.reducescatter_async(tensor, name, op, process_set, prescale, postscale))

    @staticmethod
    def backward(ctx, grad):
        op, ps, pre, post = ctx.args
        g = C.allgather(grad.contiguous(), process_set=ps) * (pre * post)
        if op == "average":
            g = g / ps.size()
        return g, None, None, None, None, None


class Alltoall(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, splits, name, process_set):
        out, received = _alltoall(tensor, splits, name, process_set, None)
        ctx.ps, ctx.received = process_set, received
        ctx.mark_non_differentiable(received)
        return out, received

    @staticmethod
    def backward(ctx, grad, _unused):
        g, _ = _alltoall(grad.contiguous(), ctx.received, None, ctx.ps, None)
        return g, None, None, None
