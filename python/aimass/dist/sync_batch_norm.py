"""SyncBatchNorm: batch normalization whose batch statistics cover every rank's batch
(Horovod's ``hvd.SyncBatchNorm``).

In training, each rank sums its per-channel sum and sum of squares, one allreduce (in
float64) gives the global mean/variance, and backward allreduces the two per-channel
gradient sums, so the result equals BatchNorm over the concatenated batch. Weight and
bias gradients stay local (DistributedOptimizer averages them like any other). In eval
mode with running statistics it is plain batch norm.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from . import _core
from ._core import global_process_set
from .collectives import allreduce


class _SyncBN(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, eps, momentum, ps):
        c = x.shape[1]
        dims = [d for d in range(x.dim()) if d != 1]
        shape = [1, c] + [1] * (x.dim() - 2)
        xd = x.double()
        local = torch.cat([xd.sum(dims), (xd * xd).sum(dims), torch.tensor([x.numel() / c], dtype=torch.float64)])
        tot = allreduce(local, op="sum", process_set=ps)
        n = float(tot[-1])
        if n < 2:
            raise ValueError(f"SyncBatchNorm needs more than one value per channel over all ranks, got {int(n)}")
        mean = tot[:c] / n
        var = (tot[c:2 * c] / n - mean * mean).clamp_min(0)
        if running_mean is not None:
            with torch.no_grad():
                running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
                running_var.mul_(1 - momentum).add_((var * n / (n - 1)).to(running_var.dtype), alpha=momentum)
        invstd = (var + eps).rsqrt()
        mean_s, invstd_s = mean.to(x.dtype).view(shape), invstd.to(x.dtype).view(shape)
        xhat = (x - mean_s) * invstd_s
        y = xhat if weight is None else xhat * weight.view(shape) + bias.view(shape)
        ctx.save_for_backward(xhat, weight, invstd_s)
        ctx.n, ctx.ps, ctx.dims, ctx.shape = n, ps, dims, shape
        return y

    @staticmethod
    def backward(ctx, dy):
        xhat, weight, invstd = ctx.saved_tensors
        dims, shape, c = ctx.dims, ctx.shape, xhat.shape[1]
        sum_dy = dy.sum(dims)
        sum_dy_xhat = (dy * xhat).sum(dims)
        g = allreduce(torch.cat([sum_dy, sum_dy_xhat]).double(), op="sum", process_set=ctx.ps).to(dy.dtype)
        scale = invstd if weight is None else invstd * weight.view(shape)
        dx = scale * (dy - (g[:c].view(shape) + xhat * g[c:].view(shape)) / ctx.n)
        gw = sum_dy_xhat if weight is not None else None
        gb = sum_dy if weight is not None else None
        return dx, gw, gb, None, None, None, None, None


class SyncBatchNorm(_BatchNorm):
    """Batch normalization over the batches of every rank in `process_set` (input: (N, C, ...))."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_set=global_process_set):
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        self.process_set = process_set

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f"SyncBatchNorm expects at least 2-D input (N, C, ...), got {input.dim()}-D")

    def forward(self, input):
        self._check_input_dim(input)
        if input.shape[1] != self.num_features:
            raise ValueError(f"SyncBatchNorm({self.num_features}) got {input.shape[1]} channels")
        if not self.training and self.track_running_stats:
            return F.batch_norm(input, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0,
                                self.eps)
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                momentum = 1.0 / float(self.num_batches_tracked)
        use_running = self.training and self.track_running_stats
        ps = _core._resolve_set(self.process_set)
        return _SyncBN.apply(input, self.weight, self.bias, self.running_mean if use_running else None,
                             self.running_var if use_running else None, self.eps, momentum, ps)
