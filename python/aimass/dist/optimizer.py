"""DistributedOptimizer: Horovod's gradient-averaging optimizer wrapper.

``DistributedOptimizer(opt, ...)`` returns an object whose class is a subclass of both
:class:`DistributedOptimizer` and ``type(opt)`` (named like it, as in Horovod), sharing
``opt``'s param_groups and state. So ``isinstance(x, torch.optim.SGD)``,
``isinstance(x, torch.optim.Optimizer)`` and LR schedulers work, and ``state_dict()`` is
the wrapped optimizer's.

Each gradient is submitted to the engine by a post-accumulate-grad hook as soon as
backward produces it (communication overlaps the rest of backward and is fused with its
neighbours); ``step()`` waits for all of them, then steps.
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import Any

from . import _core
from .collectives import allgather_async, allreduce_async_
from ._core import global_process_set, synchronize
from ._ops import Average, check_compression, check_op

_classes: dict = {}


def _torch():
    try:
        import torch
    except ImportError as exc:  # pragma: no cover
        raise ImportError("aimass.dist.DistributedOptimizer needs torch") from exc
    return torch


def _split(items: list, n: int) -> list:
    """n consecutive groups of near-equal size (the first len % n one longer)."""
    q, r = divmod(len(items), n)
    out, i = [], 0
    for k in range(n):
        j = i + q + (1 if k < r else 0)
        if j > i:
            out.append(items[i:j])
        i = j
    return out


class DistributedOptimizer:
    """Wrap a torch optimizer so that gradients are averaged over the ranks before each step.

    named_parameters: the model's named_parameters() (names must match across ranks); default names follow
    the optimizer's parameter order. compression: Compression.none/.fp16/.bf16 (or a compressor object).
    backward_passes_per_step: gradients accumulate locally over that many backward passes before one
    allreduce. op: Average or Sum. gradient_predivide_factor: with Average, gradients are scaled by
    1/f before the sum and f/size after it. num_groups / groups: reduce gradients in explicit groups
    (num_groups near-equal groups in parameter order, or a list of lists of parameters); each group is
    submitted together once all its gradients are ready. sparse_as_dense: densify sparse gradients (else
    they are allgathered, as in Horovod). process_set: the ranks that train together.
    gradient_as_bucket_view: the gradients become views into flat buckets of at most bucket_bytes
    (:class:`aimass.dist.GradientBuckets`, as DDP's option of that name); each bucket is allreduced in
    place, in one call, as soon as backward produced all of its gradients, and zero_grad() zeroes the
    buckets (keeping the views, whatever set_to_none says). Not with groups/num_groups.

    A parameter that gets no gradient on this rank in a step is reduced as zeros, so no rank waits for it."""

    def __new__(cls, optimizer=None, *args, **kwargs):
        if cls is not DistributedOptimizer:  # a concrete subclass made below
            return object.__new__(cls)
        torch = _torch()
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"DistributedOptimizer wraps a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if isinstance(optimizer, DistributedOptimizer):
            raise ValueError("this optimizer is already a DistributedOptimizer; wrap the plain optimizer once")
        base = type(optimizer)
        sub = _classes.get(base)
        if sub is None:
            sub = type(base.__name__, (DistributedOptimizer, base),
                       {"__module__": base.__module__, "__qualname__": base.__qualname__})
            _classes[base] = sub
        return object.__new__(sub)

    def __init__(self, optimizer, named_parameters=None, compression=None, backward_passes_per_step=1,
                 op=Average, gradient_predivide_factor=1.0, num_groups=0, groups=None, sparse_as_dense=False,
                 process_set=global_process_set, gradient_as_bucket_view=False, bucket_bytes=None):
        torch = _torch()
        ps = _core._resolve_set(process_set)
        ps._engine_checked()
        compression = check_compression(compression)
        if isinstance(backward_passes_per_step, bool) or not isinstance(backward_passes_per_step, int) \
                or backward_passes_per_step < 1:
            raise ValueError(f"backward_passes_per_step must be an int >= 1, got {backward_passes_per_step!r}")
        opname = check_op(op)
        if opname not in ("sum", "average"):
            raise ValueError(f"op must be Average or Sum for gradients, got {op!r}")
        f = gradient_predivide_factor
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not f > 0:
            raise ValueError(f"gradient_predivide_factor must be a number > 0, got {f!r}")
        if f != 1.0 and opname != "average":
            raise ValueError("gradient_predivide_factor not supported with op != Average")
        if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 0:
            raise ValueError(f"num_groups must be an int >= 0, got {num_groups!r}")
        opt_params = [p for g in optimizer.param_groups for p in g["params"]]
        names = self._names_for(opt_params, named_parameters)

        self.__dict__.update(optimizer.__dict__)  # the same param_groups, state, defaults and hooks
        # An LR scheduler made before wrapping patched the wrapped optimizer's step as an instance
        # attribute; copied here it would shadow step() and skip the gradient allreduces. step() calls
        # it after synchronizing instead (it steps the same param_groups and state, and tells the
        # scheduler that the optimizer stepped).
        self._wrapped_step = self.__dict__.pop("step", None)
        self._opt = optimizer
        self._names = names
        self._compression = compression
        self.backward_passes_per_step = backward_passes_per_step
        self.op = opname
        self.gradient_predivide_factor = float(f)
        self._sparse_as_dense = bool(sparse_as_dense)
        self._ps = ps
        self._params = [p for p in opt_params if p.requires_grad]
        self._passes = {p: 0 for p in self._params}
        self._handles = {}  # param or group tuple -> handle (or a callable for sparse gradients)
        self._synchronized = False
        self._should_synchronize = True
        self._group_of = {}
        self._group_ready = {}
        self._set_groups(num_groups, groups)
        self._buckets = None
        if gradient_as_bucket_view:
            if self._group_of:
                raise ValueError("gradient_as_bucket_view=True reduces whole buckets: give no groups/num_groups")
            from .buckets import DEFAULT_BUCKET_BYTES, GradientBuckets
            self._buckets = GradientBuckets(self._params, DEFAULT_BUCKET_BYTES if bucket_bytes is None
                                            else bucket_bytes, name="grad.bucket", process_set=ps)
            for i in range(len(self._buckets)):
                key = tuple(self._buckets.members(i))
                for p in key:
                    self._group_of[p] = key
                self._group_ready[key] = 0
        elif bucket_bytes is not None:
            raise ValueError("bucket_bytes applies with gradient_as_bucket_view=True")
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad) for p in self._params]
        del torch

    # ---------------------------------------------------------------- set-up helpers
    @staticmethod
    def _names_for(opt_params, named_parameters) -> dict:
        if named_parameters is None:
            return {p: f"allreduce.noname.{i}" for i, p in enumerate(opt_params)}
        named = list(named_parameters)
        if any(not (isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str)) for x in named):
            raise ValueError("named_parameters should be a sequence of tuples (name, parameter), usually produced "
                             "by model.named_parameters()")
        all_names = [n for n, _ in named]
        dups = sorted({n for n in all_names if all_names.count(n) > 1})
        if dups:
            raise ValueError(f"Parameter names in named_parameters must be unique. Found duplicates: {dups}")
        names = {p: n for n, p in named}
        missing = [i for i, p in enumerate(opt_params) if p not in names]
        if missing:
            raise ValueError(f"named_parameters was specified, but it does not name the optimizer's parameters at "
                             f"positions {missing}")
        return names

    def _set_groups(self, num_groups, groups):
        if groups is not None and num_groups:
            raise ValueError("give num_groups or groups, not both")
        if isinstance(groups, int) and not isinstance(groups, bool):
            num_groups, groups = groups, None
        if groups is not None:
            if not isinstance(groups, (list, tuple)) or not all(isinstance(g, (list, tuple)) for g in groups):
                raise ValueError("groups must be a list of lists of parameters (or an int: the number of groups)")
            mine = set(self._params)
            seen = set()
            parts = []
            for g in groups:
                g = [p for p in g if p.requires_grad]
                for p in g:
                    if p not in mine:
                        raise ValueError("groups names a parameter the optimizer does not hold")
                    if p in seen:
                        raise ValueError(f"parameter {self._names[p]!r} is in more than one group")
                    seen.add(p)
                if g:
                    parts.append(g)
        elif num_groups:
            # the same order on every rank: sorted by name, not by registration order
            parts = _split(sorted(self._params, key=lambda p: self._names[p]), num_groups)
        else:
            parts = []
        for g in parts:
            key = tuple(g)
            for p in g:
                self._group_of[p] = key
            self._group_ready[key] = 0

    # ---------------------------------------------------------------- communication
    def _grad_for(self, p):
        torch = _torch()
        g = p.grad
        if g is None:
            p.grad = g = torch.zeros_like(p)
        if g.is_sparse and self._sparse_as_dense:
            p.grad = g = g.to_dense()
        if not g.is_sparse and not g.is_contiguous():
            p.grad = g = g.contiguous()
        return g

    def _allreduce(self, p, name):
        g = self._grad_for(p)
        if g.is_sparse:
            return self._sparse_allreduce(p, g, name)
        if self.op == "average":
            pre, post = 1.0 / self.gradient_predivide_factor, self.gradient_predivide_factor
        else:
            pre = post = 1.0
        return allreduce_async_(g, None, name, self.op, pre, post, self._ps, compression=self._compression)

    def _sparse_allreduce(self, p, g, name):
        torch = _torch()
        g = g.coalesce()
        hi = allgather_async(g.indices().t().contiguous(), name=f"{name}.indices", process_set=self._ps)
        hv = allgather_async(g.values().contiguous(), name=f"{name}.values", process_set=self._ps)
        average = self.op == "average"
        n = self._ps.size()

        def finish():
            idx, vals = synchronize(hi), synchronize(hv)
            if average:
                vals = vals / n
            p.grad = torch.sparse_coo_tensor(idx.t(), vals, g.shape, check_invariants=True).coalesce()

        return finish

    def _submit(self, p):
        key = self._group_of.get(p)
        if key is None:
            self._handles[p] = self._allreduce(p, f"grad.{self._names[p]}")
            return
        self._group_ready[key] += 1
        if self._group_ready[key] == len(key):
            self._submit_group(key)

    def _submit_group(self, key):
        if self._buckets is not None:  # one in-place allreduce of the whole bucket
            if self.op == "average":
                pre, post = 1.0 / self.gradient_predivide_factor, self.gradient_predivide_factor
            else:
                pre = post = 1.0
            self._handles[key] = self._buckets.allreduce_async(
                self.op, self._compression, buckets=[self._buckets.bucket_of(key[0])], prescale_factor=pre,
                postscale_factor=post)
            self._group_ready[key] = 0
            return
        # one burst of submissions: negotiated in one engine cycle and fused together
        self._handles[key] = [self._allreduce(q, f"grad.group.{self._names[q]}") for q in key]
        self._group_ready[key] = 0

    def _on_grad(self, p):
        if self._passes[p] >= self.backward_passes_per_step:
            raise AssertionError("Gradients were computed more than backward_passes_per_step times before call to "
                                 "step(). Increase backward_passes_per_step to accumulate gradients locally.")
        self._passes[p] += 1
        if self._passes[p] == self.backward_passes_per_step:
            self._submit(p)

    def synchronize(self) -> None:
        """Wait for every gradient's allreduce (submitting those not started yet: gradients still being
        accumulated, and zeros for parameters without a gradient)."""
        started = set()
        for k in self._handles:
            started.update(k if isinstance(k, tuple) else (k,))
        for key in list(self._group_ready):
            if not any(q in started for q in key):
                self._submit_group(key)
                started.update(key)
        for p in self._params:
            if p not in started:
                self._handles[p] = self._allreduce(p, f"grad.{self._names[p]}")
        try:
            for h in self._handles.values():
                for x in (h if isinstance(h, list) else (h,)):
                    x() if callable(x) else synchronize(x)
        finally:
            self._handles.clear()
            for p in self._params:
                self._passes[p] = 0
            for key in self._group_ready:
                self._group_ready[key] = 0
        self._synchronized = True

    @contextmanager
    def skip_synchronize(self):
        """Make step() skip its synchronize(): for ``synchronize(); clip gradients; with skip_synchronize():
        step()`` (gradient clipping, AMP unscaling)."""
        self._should_synchronize = False
        try:
            yield
        finally:
            self._should_synchronize = True

    def set_backward_passes_per_step(self, passes: int) -> None:
        if isinstance(passes, bool) or not isinstance(passes, int) or passes < 1:
            raise ValueError(f"backward_passes_per_step must be an int >= 1, got {passes!r}")
        if self._handles:
            raise RuntimeError("set_backward_passes_per_step() while gradient allreduces are in flight; call "
                               "step() or synchronize() first")
        self.backward_passes_per_step = passes
        for p in self._params:
            self._passes[p] = 0

    def step(self, closure=None):
        if self._should_synchronize:
            if self._synchronized:
                warnings.warn("optimizer.step() called without optimizer.skip_synchronize() context after "
                              "optimizer.synchronize(). This can cause training slowdown. You may want to consider "
                              "using optimizer.skip_synchronize() context if you use optimizer.synchronize() in "
                              "your code.")
            self.synchronize()
        self._synchronized = False
        if self._wrapped_step is not None:
            return self._wrapped_step(closure)
        return super().step(closure)

    def zero_grad(self, set_to_none: bool = True):
        if self._handles:
            raise RuntimeError("optimizer.zero_grad() was called after loss.backward() but before optimizer.step() "
                               "or optimizer.synchronize() (gradient allreduces are in flight); call step() or "
                               "synchronize() first")
        if self._buckets is not None:  # the gradients stay views into the buckets
            self._buckets.zero_()
            return None
        return super().zero_grad(set_to_none=set_to_none)

    def load_state_dict(self, state_dict: Any) -> None:
        self._handles.clear()
        self._synchronized = False
        self._should_synchronize = True
        for p in self._params:
            self._passes[p] = 0
        super().load_state_dict(state_dict)
        # torch replaces state/param_groups: keep the wrapped optimizer looking at the same ones
        self._opt.__dict__["state"], self._opt.__dict__["param_groups"] = self.state, self.param_groups

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        if "_params" not in self.__dict__:
            return
        for p in param_group["params"] if not hasattr(param_group["params"], "requires_grad") \
                else [param_group["params"]]:
            if p.requires_grad and p not in self._passes:
                self._names[p] = f"allreduce.noname.{len(self._names)}"
                self._params.append(p)
                self._passes[p] = 0
                self._hooks.append(p.register_post_accumulate_grad_hook(self._on_grad))

    def remove_hooks(self) -> None:
        """Detach the gradient hooks (the optimizer then no longer reduces gradients as they are produced)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def add_hooks(self) -> None:
        """Attach the gradient hooks again after remove_hooks() (no-op while attached)."""
        if not self._hooks:
            self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad) for p in self._params]
