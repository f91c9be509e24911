"""Tracing for export: torch.fx with the attention/encoder/recurrent modules as leaves, and shape
propagation that learns which dims follow a dynamic sequence length."""
from __future__ import annotations

from typing import Dict


def _leaf_types():
    import torch.nn as nn
    return (nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerEncoder, nn.LSTM, nn.GRU)


def trace(module, n_inputs: int):
    """torch.fx graph of `module` with attention/encoder/recurrent modules kept whole (the exporter
    decomposes them from their parameters; their forward has control flow fx cannot trace)."""
    import torch
    import torch.fx

    leaves = _leaf_types()

    class _Tracer(torch.fx.Tracer):
        def is_leaf_module(self, m, qualname):
            return isinstance(m, leaves) or super().is_leaf_module(m, qualname)

    root = module
    if isinstance(module, leaves):  # a bare leaf: trace a wrapper that calls it
        names = [f"input_{i}" for i in range(n_inputs)]
        first = isinstance(module, (torch.nn.MultiheadAttention, torch.nn.LSTM, torch.nn.GRU))
        src = (f"def forward(self, {', '.join(names)}):\n"
               f"    return self.inner({', '.join(names)}){'[0]' if first else ''}\n")
        ns: Dict[str, object] = {}
        exec(src, ns)  # noqa: S102 - a fixed template, names generated above
        root = type("Wrapped", (torch.nn.Module,), {"forward": ns["forward"]})()
        root.inner = module
    graph = _Tracer().trace(root)
    return torch.fx.GraphModule(root, graph)


def _shapes(gm) -> Dict[object, tuple]:
    out = {}
    for n in gm.graph.nodes:
        tm = n.meta.get("tensor_meta")
        if tm is not None and hasattr(tm, "shape"):
            out[n] = tuple(int(d) for d in tm.shape)
    return out


def propagate_shapes(gm, example_inputs, dynamic_seq):
    """Runs ShapeProp; with dynamic_seq, once more with every sequence dim one longer, to learn which
    dims of which nodes follow the sequence length. Returns (shapes, dynamic dims per node, seq dims
    of the inputs {index: dim})."""
    import torch
    from torch.fx.passes.shape_prop import ShapeProp

    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    seq_dims: Dict[int, int] = {}
    if dynamic_seq is True:
        seq_dims = {i: 1 for i, x in enumerate(example_inputs) if x.dim() >= 2}
    elif isinstance(dynamic_seq, dict):
        for k, d in dynamic_seq.items():
            idx = k if isinstance(k, int) else next((i for i, p in enumerate(placeholders) if p.target == k), None)
            if idx is None or not 0 <= idx < len(example_inputs):
                raise ValueError(f"export: dynamic_seq names input {k!r}, which the module does not take")
            if not isinstance(d, int) or not 1 <= d < example_inputs[idx].dim():
                raise ValueError(f"export: dynamic_seq dim {d!r} of input {k!r} must be a non-batch dim")
            seq_dims[idx] = d
    elif dynamic_seq not in (None, False):
        raise TypeError(f"export: dynamic_seq must be None, True or a dict {{input: dim}}, got {dynamic_seq!r}")
    lens = {int(example_inputs[i].shape[d]) for i, d in seq_dims.items()}
    if len(lens) > 1:
        raise ValueError(f"export: the dynamic sequence dims of the example inputs differ in length ({sorted(lens)})")
    dyn: Dict[object, set] = {}
    with torch.no_grad():
        if seq_dims:
            longer = [torch.cat([x, x.narrow(seq_dims[i], 0, 1)], seq_dims[i]) if i in seq_dims else x
                      for i, x in enumerate(example_inputs)]
            ShapeProp(gm).propagate(*longer)
            s1 = _shapes(gm)
        ShapeProp(gm).propagate(*example_inputs)
        s0 = _shapes(gm)
    if seq_dims:
        for n, sh in s0.items():
            o = s1.get(n)
            if o is not None and len(o) == len(sh):
                d = {i for i, (a, b) in enumerate(zip(sh, o)) if a != b}
                if d:
                    dyn[n] = d
    seq = lens.pop() if lens else 0
    return s0, dyn, (seq_dims, seq)
