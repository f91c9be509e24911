"""torch.fx export of a torch module to an .aimass file (see docs/model-format.md)."""
from __future__ import annotations

import json
import operator
import os
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from .._io import atomic_path
from ._export_ext import UnsupportedOpError, _ExtMixin, _unsupported
from ._export_fuse import _FuseMixin
from ._export_modules import _ModuleMixin
from ._export_trace import propagate_shapes, trace

FORMAT_VERSION = 1

SUPPORTED = (
    "nn.Linear, nn.Conv2d, nn.BatchNorm1d/2d (folded into the conv/linear before it), nn.MaxPool2d, "
    "nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Flatten, nn.ReLU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, "
    "nn.Softmax, nn.LogSoftmax, nn.LayerNorm, nn.Embedding, nn.Dropout, nn.Identity, "
    "F.relu/gelu/silu/sigmoid/tanh/softmax/log_softmax/dropout/max_pool2d/avg_pool2d/adaptive_avg_pool2d, "
    "torch.flatten/reshape, Tensor.view/reshape/flatten/contiguous/size, +, -, *, /, "
    "torch.matmul/bmm/@ between activations, transpose/permute/unsqueeze/squeeze, indexing with slices/ints/None, "
    "torch.cat/stack, mean/sum/amax/amin over dims, torch.where/masked_fill, comparisons, ~, float()/long()/to(), "
    "torch.arange(x.size(d)) positions, F.scaled_dot_product_attention, F.linear/layer_norm, "
    "nn.MultiheadAttention, nn.TransformerEncoderLayer/TransformerEncoder (batch_first), "
    "nn.LSTM/nn.GRU (batch_first, uni- or bidirectional)"
)


def _pair(v) -> List[int]:
    if isinstance(v, (tuple, list)):
        if len(v) == 1:
            return [int(v[0]), int(v[0])]
        return [int(v[0]), int(v[1])]
    return [int(v), int(v)]


def _np(t) -> np.ndarray:
    return np.ascontiguousarray(t.detach().cpu().to(dtype=__import__("torch").float32).numpy())


def _quantize_linear(w: np.ndarray, bits: int):
    """Symmetric weight quantization through aimass.compress (docs/quant_format.md): int8 per output
    channel, int4 in groups of 32 along K (per-channel when 32 does not divide K)."""
    from ..compress.qlinear import quantize_weight

    k = w.shape[1]
    group = 32 if bits == 4 and k % 32 == 0 else 0
    qw = quantize_weight(w, bits=bits, group_size=group or None)
    return np.ascontiguousarray(qw.data), np.ascontiguousarray(qw.scale, dtype=np.float32), group


class _Exporter(_ExtMixin, _ModuleMixin, _FuseMixin):
    def __init__(self, module, example_inputs, quantize, dynamic_seq=None):
        import torch
        import torch.fx

        self.torch = torch
        self.quantize = quantize
        module = module.eval()
        try:
            self.gm = trace(module, len(example_inputs))
        except Exception as exc:  # fx raises many kinds for data-dependent control flow
            raise UnsupportedOpError(f"aimass.runtime.export: torch.fx could not trace the module ({exc}); "
                                     "remove data-dependent control flow from forward()") from exc
        self.shapes, self.dyn, self.seq_dims = propagate_shapes(self.gm, example_inputs, dynamic_seq)
        self.modules = dict(self.gm.named_modules())
        self.batch = int(example_inputs[0].shape[0])
        self.expanded = set()  # fx nodes torch computes without the batch dim (positions): batched here
        self.dtypes: Dict[str, str] = {}  # value name -> "float32" | "int64"
        self.gm_const_dtype: Dict[Any, Any] = {}  # get_attr node -> torch dtype
        self.nodes: List[dict] = []
        self.tensors: Dict[str, np.ndarray] = {}
        self.value: Dict[Any, str] = {}     # fx node -> value name
        self.const: Dict[Any, np.ndarray] = {}  # fx node -> constant tensor (get_attr)
        self.producer: Dict[str, dict] = {}   # value name -> emitted node
        self.users = {n: len(n.users) for n in self.gm.graph.nodes}
        self.inputs: List[dict] = []
        self.outputs: List[dict] = []

    # -- helpers
    def meta_shape(self, node) -> List[int]:
        shape = self.shapes.get(node)
        if shape is None:
            raise UnsupportedOpError(f"aimass.runtime.export: node '{node.name}' does not produce one tensor")
        shape = list(shape)
        if node in self.expanded or ((not shape or shape[0] != self.batch or self.is_bcast(node))
                                     and any(i in self.expanded for i in node.all_input_nodes)):
            self.expanded.add(node)
            return [self.batch] + shape
        if not shape or shape[0] != self.batch:
            raise UnsupportedOpError(
                f"aimass.runtime.export: node '{node.name}' has shape {shape}, which does not keep the batch "
                f"dimension ({self.batch}) first; the runtime batches along dim 0 only")
        return shape

    def val(self, node, who) -> str:
        if node not in self.value:
            raise _unsupported(f"input {node.name} of {who.name} (not a tensor the runtime tracks)", who)
        return self.value[node]

    def emit(self, node, op, inputs, params=None, attrs=None, out_dtype="float32"):
        self.meta_shape(node)
        name = self.emit_raw(node.name, op, inputs, params, attrs, out_dtype)
        self.value[node] = name
        return self.producer[name]

    def alias(self, node, src):
        self.value[node] = self.value[src] if src in self.value else self.val(src, node)

    def reshape(self, node, src):
        shape = self.meta_shape(node)
        if src in self.expanded and node not in self.expanded:  # [S, D] -> [1, S, D]: already batched
            self.alias(node, src)
            return
        name = self.val(src, node)
        self.emit(node, "reshape", [name], attrs={"shape": self.row_target(node, shape)},
                  out_dtype=self.dtypes.get(name, "float32"))

    def act(self, node, src, kind):
        self.emit(node, "activation", [self.val(src, node)], attrs={"kind": kind})

    def softmax(self, node, src, dim, log):
        if dim is None:
            raise _unsupported("softmax without dim", node)
        rank = len(self.meta_shape(node))
        dim = int(dim) % rank
        if dim == 0:
            raise _unsupported("softmax over the batch dimension", node)
        self.emit(node, "log_softmax" if log else "softmax", [self.val(src, node)], attrs={"dim": dim})

    def binary(self, node, op, a, b):
        torch = self.torch
        ins, params, attrs = [], {}, {}
        for role, x in (("a", a), ("b", b)):
            if isinstance(x, (int, float)) and not isinstance(x, bool):
                attrs[f"{role}_scalar"] = float(x)
            elif x in self.const:
                params[role] = self.const[x]
            elif isinstance(x, torch.fx.Node) and x in self.value:
                ins.append(self.as_float(x, node))
            else:
                raise _unsupported(f"{op} with operand {x!r}", node)
        if not ins:
            raise _unsupported(f"{op} of two constants", node)
        self.emit(node, op, ins, params=params, attrs=attrs)

    def pool(self, node, src, kind, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False,
              count_include_pad=True, divisor_override=None):
        if ceil_mode:
            raise _unsupported(f"{kind} with ceil_mode=True", node)
        if divisor_override is not None:
            raise _unsupported(f"{kind} with divisor_override", node)
        k = _pair(kernel_size)
        s = _pair(stride) if stride not in (None, [], ()) else k
        attrs = {"kernel_size": k, "stride": s, "padding": _pair(padding)}
        if kind == "max_pool2d":
            attrs["dilation"] = _pair(dilation)
        else:
            attrs["count_include_pad"] = 1 if count_include_pad else 0
        self.emit(node, kind, [self.val(src, node)], attrs=attrs)

    def adaptive(self, node, src, output_size):
        shape = self.meta_shape(node)
        self.emit(node, "adaptive_avg_pool2d", [self.val(src, node)], attrs={"output_size": shape[2:4]})

    def fold_bn(self, node, bn, src) -> bool:
        """Folds an eval-mode BatchNorm into the linear/conv that produced its input."""
        torch = self.torch
        name = self.value.get(src)
        prod = self.producer.get(name)
        if prod is None or prod["op"] not in ("linear", "conv2d") or self.users[src] != 1 \
                or prod["attrs"].get("bits") or prod["attrs"].get("activation"):
            return False
        if bn.running_mean is None:
            return False
        inv = (bn.weight.detach() if bn.weight is not None else torch.ones_like(bn.running_mean)) / \
            torch.sqrt(bn.running_var + bn.eps)
        shift = (bn.bias.detach() if bn.bias is not None else torch.zeros_like(bn.running_mean)) - \
            bn.running_mean * inv
        wname = prod["params"]["weight"]
        w = torch.from_numpy(self.tensors[wname].astype(np.float64))
        inv64, shift64 = inv.double(), shift.double()
        w = w * inv64.reshape(-1, *([1] * (w.dim() - 1)))
        bname = prod["params"].get("bias")
        b = torch.from_numpy(self.tensors[bname].astype(np.float64)) if bname else torch.zeros_like(inv64)
        b = b * inv64 + shift64
        self.tensors[wname] = np.ascontiguousarray(w.float().numpy())
        bname = bname or f"{prod['name']}.bias"
        self.tensors[bname] = np.ascontiguousarray(b.float().numpy())
        prod["params"]["bias"] = bname
        self.value[node] = name
        return True

    # -- module handlers
    def call_module(self, node):
        nn = self.torch.nn
        mod = self.modules[node.target]
        src = node.args[0] if node.args else None
        if isinstance(mod, nn.Linear):
            w = _np(mod.weight)
            b = _np(mod.bias) if mod.bias is not None else None
            if self.quantize:
                bits = 8 if self.quantize == "int8" else 4
                q, scale, group = _quantize_linear(w, bits)
                self.emit(node, "linear", [self.val(src, node)], params={"weight": q, "weight_scale": scale,
                                                                          "bias": b},
                          attrs={"bits": bits, "group_size": group})
            else:
                self.emit(node, "linear", [self.val(src, node)], params={"weight": w, "bias": b})
        elif isinstance(mod, nn.Conv2d):
            if mod.padding_mode != "zeros":
                raise _unsupported(f"Conv2d padding_mode={mod.padding_mode!r}", node)
            pad = mod.padding
            if isinstance(pad, str):
                if pad == "valid":
                    pad = (0, 0)
                else:  # 'same' with stride 1: symmetric only when (k-1)*d is even
                    pad = []
                    for k, d in zip(mod.kernel_size, mod.dilation):
                        total = d * (k - 1)
                        if total % 2:
                            raise _unsupported("Conv2d padding='same' with asymmetric padding", node)
                        pad.append(total // 2)
            self.emit(node, "conv2d", [self.val(src, node)],
                      params={"weight": _np(mod.weight), "bias": _np(mod.bias) if mod.bias is not None else None},
                      attrs={"stride": _pair(mod.stride), "padding": _pair(pad), "dilation": _pair(mod.dilation),
                             "groups": int(mod.groups)})
        elif isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)):
            if not self.fold_bn(node, mod, src):
                if mod.running_mean is None:
                    raise _unsupported("BatchNorm without running statistics (track_running_stats=False)", node)
                torch = self.torch
                inv = (mod.weight.detach() if mod.weight is not None else torch.ones_like(mod.running_mean)) / \
                    torch.sqrt(mod.running_var + mod.eps)
                shift = (mod.bias.detach() if mod.bias is not None else torch.zeros_like(inv)) - \
                    mod.running_mean * inv
                self.emit(node, "channel_affine", [self.val(src, node)],
                          params={"scale": _np(inv), "shift": _np(shift)})
        elif isinstance(mod, nn.MaxPool2d):
            if mod.return_indices:
                raise _unsupported("MaxPool2d(return_indices=True)", node)
            self.pool(node, src, "max_pool2d", mod.kernel_size, mod.stride, mod.padding, mod.dilation, mod.ceil_mode)
        elif isinstance(mod, nn.AvgPool2d):
            self.pool(node, src, "avg_pool2d", mod.kernel_size, mod.stride, mod.padding, 1, mod.ceil_mode,
                      mod.count_include_pad, mod.divisor_override)
        elif isinstance(mod, nn.AdaptiveAvgPool2d):
            self.adaptive(node, src, mod.output_size)
        elif isinstance(mod, nn.Flatten):
            self.reshape(node, src)
        elif isinstance(mod, nn.ReLU):
            self.act(node, src, "relu")
        elif isinstance(mod, nn.GELU):
            self.act(node, src, "gelu_tanh" if mod.approximate == "tanh" else "gelu")
        elif isinstance(mod, nn.SiLU):
            self.act(node, src, "silu")
        elif isinstance(mod, nn.Sigmoid):
            self.act(node, src, "sigmoid")
        elif isinstance(mod, nn.Tanh):
            self.act(node, src, "tanh")
        elif isinstance(mod, nn.Softmax):
            self.softmax(node, src, mod.dim, False)
        elif isinstance(mod, nn.LogSoftmax):
            self.softmax(node, src, mod.dim, True)
        elif isinstance(mod, nn.LayerNorm):
            self.emit(node, "layer_norm", [self.val(src, node)],
                      params={"weight": _np(mod.weight) if mod.weight is not None else None,
                              "bias": _np(mod.bias) if getattr(mod, "bias", None) is not None else None},
                      attrs={"normalized_shape": [int(d) for d in mod.normalized_shape], "eps": float(mod.eps)})
        elif isinstance(mod, nn.Embedding):
            if mod.max_norm is not None:
                raise _unsupported("Embedding(max_norm=...)", node)
            self.emit(node, "embedding", [self.val(src, node)], params={"weight": _np(mod.weight)})
        elif isinstance(mod, (nn.Dropout, nn.Dropout2d, nn.Identity)):
            self.alias(node, src)
        elif self.ext_call_module(node, mod):
            pass
        else:
            raise _unsupported(f"module {type(mod).__module__}.{type(mod).__name__}", node)

    def call_function(self, node):
        torch = self.torch
        F = torch.nn.functional
        t = node.target
        a = list(node.args)
        kw = dict(node.kwargs)
        if t in (operator.add, torch.add):
            if kw.get("alpha", 1) != 1:
                raise _unsupported("add with alpha", node)
            self.binary(node, "add", a[0], a[1] if len(a) > 1 else kw["other"])
        elif t in (operator.sub, torch.sub):
            self.binary(node, "sub", a[0], a[1] if len(a) > 1 else kw["other"])
        elif t in (operator.mul, torch.mul):
            self.binary(node, "mul", a[0], a[1] if len(a) > 1 else kw["other"])
        elif t in (operator.truediv, torch.div):
            if kw.get("rounding_mode") is not None:
                raise _unsupported("div with rounding_mode", node)
            self.binary(node, "div", a[0], a[1] if len(a) > 1 else kw["other"])
        elif t in (F.relu, torch.relu):
            self.act(node, a[0], "relu")
        elif t is F.gelu:
            self.act(node, a[0], "gelu_tanh" if kw.get("approximate", "none") == "tanh" else "gelu")
        elif t is F.silu:
            self.act(node, a[0], "silu")
        elif t in (torch.sigmoid, F.sigmoid):
            self.act(node, a[0], "sigmoid")
        elif t in (torch.tanh, F.tanh):
            self.act(node, a[0], "tanh")
        elif t in (F.softmax, torch.softmax):
            self.softmax(node, a[0], a[1] if len(a) > 1 else kw.get("dim"), False)
        elif t in (F.log_softmax, torch.log_softmax):
            self.softmax(node, a[0], a[1] if len(a) > 1 else kw.get("dim"), True)
        elif t in (torch.flatten, torch.reshape):
            self.reshape(node, a[0])
        elif t in (F.dropout, F.dropout2d):
            self.alias(node, a[0])
        elif t is F.max_pool2d:
            if kw.get("return_indices") or (len(a) > 6 and a[6]):
                raise _unsupported("max_pool2d(return_indices=True)", node)
            names = ["kernel_size", "stride", "padding", "dilation", "ceil_mode"]
            args = dict(zip(names, a[1:6]))
            args.update({k: v for k, v in kw.items() if k in names})
            self.pool(node, a[0], "max_pool2d", **args)
        elif t is F.avg_pool2d:
            names = ["kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override"]
            args = dict(zip(names, a[1:7]))
            args.update({k: v for k, v in kw.items() if k in names})
            self.pool(node, a[0], "avg_pool2d", **args)
        elif t is F.adaptive_avg_pool2d:
            self.adaptive(node, a[0], a[1] if len(a) > 1 else kw.get("output_size"))
        elif t is getattr and a[1] == "shape":
            pass  # x.shape: only feeds view/reshape arguments
        elif t is operator.getitem and isinstance(a[0], torch.fx.Node) and a[0].op in ("call_method", "call_function") \
                and (a[0].target in ("size",) or a[0].target is getattr):
            pass  # x.size(0) / x.shape[0]: a shape query consumed by view/reshape
        elif self.ext_call_function(node):
            pass
        else:
            raise _unsupported(f"function {getattr(t, '__module__', '')}.{getattr(t, '__name__', t)}", node)

    def call_method(self, node):
        m = node.target
        a = list(node.args)
        kw = dict(node.kwargs)
        if m in ("view", "reshape", "flatten"):
            self.reshape(node, a[0])
        elif m in ("contiguous",):
            self.alias(node, a[0])
        elif m == "size":
            pass
        elif m in ("relu", "sigmoid", "tanh"):
            self.act(node, a[0], m)
        elif m in ("softmax", "log_softmax"):
            self.softmax(node, a[0], a[1] if len(a) > 1 else kw.get("dim"), m == "log_softmax")
        elif m in ("add", "sub", "mul", "div"):
            self.binary(node, m, a[0], a[1] if len(a) > 1 else kw["other"])
        elif self.ext_call_method(node):
            pass
        else:
            raise _unsupported(f"method Tensor.{m}", node)

    def run(self, input_names, output_names):
        torch = self.torch
        placeholders = [n for n in self.gm.graph.nodes if n.op == "placeholder"]
        if input_names is not None and len(input_names) != len(placeholders):
            raise ValueError(f"aimass.runtime.export: input_names has {len(input_names)} names but the module "
                             f"takes {len(placeholders)} inputs")
        for i, n in enumerate(placeholders):
            name = input_names[i] if input_names else str(n.target)
            tm = n.meta["tensor_meta"]
            if tm.dtype in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool):
                dt = "int64"
            elif tm.dtype in (torch.float32, torch.float16, torch.bfloat16):
                dt = "float32"
            else:
                raise TypeError(f"aimass.runtime.export: input '{name}' has dtype {tm.dtype}; "
                                "use float32 or int64 inputs")
            shape = self.meta_shape(n)
            self.inputs.append({"name": name, "dtype": dt, "shape": self.signature_shape(n, shape)})
            self.value[n] = name
            self.dtypes[name] = dt
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                continue
            if node.op == "get_attr":
                obj = self.gm
                for part in node.target.split("."):
                    obj = getattr(obj, part)
                self.gm_const_dtype[node] = obj.dtype
                self.const[node] = _np(obj)
            elif node.op == "call_module":
                self.call_module(node)
            elif node.op == "call_function":
                self.call_function(node)
            elif node.op == "call_method":
                self.call_method(node)
            elif node.op == "output":
                self.collect_outputs(node.args[0], output_names)
        self.drop_dead_nodes()
        self.fuse_attention()
        self.fuse_qkv()
        self.drop_dead_nodes()
        return self

    def collect_outputs(self, out, output_names):
        if isinstance(out, dict):
            items = list(out.items())
        elif isinstance(out, (tuple, list)):
            items = [(f"output_{i}", o) for i, o in enumerate(out)]
        else:
            items = [("output", out)]
        if output_names is not None:
            if len(output_names) != len(items):
                raise ValueError(f"aimass.runtime.export: output_names has {len(output_names)} names but the "
                                 f"module returns {len(items)} tensors")
            items = [(nm, o) for nm, (_, o) in zip(output_names, items)]
        for name, o in items:
            if o not in self.value:
                raise UnsupportedOpError(f"aimass.runtime.export: output '{name}' is not a tensor the runtime "
                                         "computes")
            src = self.value[o]
            shape = self.meta_shape(o)
            # Rename the producing value to the output name (or add an identity node).
            self.nodes.append({"op": "identity", "name": f"output.{name}", "inputs": [src], "outputs": [name],
                               "params": {}, "attrs": {}})
            self.outputs.append({"name": name, "dtype": self.dtypes.get(src, "float32"),
                                 "shape": self.signature_shape(o, shape)})


def export(module, example_inputs, path, quantize: Optional[str] = None, prune=None,
           input_names: Optional[Sequence[str]] = None, output_names: Optional[Sequence[str]] = None,
           dynamic_seq=None, padding: Optional[dict] = None) -> str:
    """Trace `module` with torch.fx on `example_inputs` and write an .aimass file to `path`.

    quantize: None (fp32), "int8" (per-channel symmetric Linear weights) or "int4" (symmetric,
    groups of 32 along the input features). BatchNorm is folded into the conv/linear before it,
    Dropout becomes identity. Unsupported ops raise UnsupportedOpError naming the op and node.
    prune: None or a dict applied to a copy of the module before tracing (and before quantize):
    {"method": "magnitude", "sparsity": 0.5, "scope": "global"|"layer"} or {"method": "n:m", "n": 2,
    "m": 4} zero weights of every Linear/Conv2d (aimass.compress.prune_model); {"method": "channel",
    "sparsity": s} removes output rows of hidden Linear layers and the next Linear's matching inputs
    (Linear -> elementwise ops -> Linear chains only; anything else raises ValueError). What was
    pruned is stored as the "aimass.prune" metadata entry (docs/runtime.md).
    dynamic_seq: None (every dim but the batch is fixed), True (dim 1 of every input of rank >= 2
    is the sequence length) or a dict {input index or name: dim}; the signature then holds -1 there
    and the runtime plans each length it meets (docs/runtime.md).
    padding: with dynamic_seq, {"mask_input": name, "pad_value": v} lets a Session batch requests of
    different lengths: it pads each to the longest in the batch (the mask input with v, e.g. 0 for a
    1/0 attention mask or 1 for a True-means-padding key mask; other inputs with 0) and returns each
    request its own length; max_waste (default 0.25) caps the fraction of padded positions in a batch.
    Only for models whose positions interact through that mask alone.
    The file is written atomically (temporary name, fsync, rename). Returns `path`."""
    import torch
    from safetensors.numpy import save_file

    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"export: module must be a torch.nn.Module, got {type(module).__name__}")
    if quantize not in (None, "int8", "int4"):
        raise ValueError(f"export: quantize must be None, 'int8' or 'int4', got {quantize!r}")
    prune_spec = None
    if prune is not None:
        from ._prune import check_spec
        prune_spec = check_spec(prune)
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    example_inputs = tuple(example_inputs)
    if not example_inputs or not all(isinstance(x, torch.Tensor) for x in example_inputs):
        raise TypeError("export: example_inputs must be a tensor or a tuple of tensors")
    for i, x in enumerate(example_inputs):
        if x.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
                           torch.int8, torch.uint8, torch.bool):
            raise TypeError(f"export: example input {i} has dtype {x.dtype}; .aimass inputs are float32 or int64 "
                            "(float16/bfloat16/smaller int/bool examples are widened; convert others, e.g. x.float())")
    for arg, names in (("input_names", input_names), ("output_names", output_names)):
        if names is None:
            continue
        if isinstance(names, (str, bytes)) or not all(isinstance(n, str) and n for n in names):
            raise TypeError(f"export: {arg} must be a list of non-empty strings, got {names!r}")
        if len(set(names)) != len(names):
            raise ValueError(f"export: {arg} has duplicate names: {list(names)}")
    if len({int(x.shape[0]) if x.dim() else -1 for x in example_inputs}) != 1 or example_inputs[0].dim() == 0:
        raise ValueError("export: every example input needs the same batch size in dimension 0")
    prune_report = None
    if prune_spec is not None:  # a pruned copy: the caller's module stays as it is
        from ._prune import pruned_copy
        module, prune_report = pruned_copy(module, prune_spec)
    was_training = module.training
    try:
        ex = _Exporter(module, example_inputs, quantize, dynamic_seq).run(input_names, output_names)
    finally:
        module.train(was_training)
    if quantize and not any(n["attrs"].get("bits") for n in ex.nodes):
        raise ValueError(f"export: quantize={quantize!r} but the module has no nn.Linear to quantize")
    metadata = {
        "aimass.format_version": str(FORMAT_VERSION),
        "aimass.producer": f"aimass {__import__('aimass').__version__} (torch {torch.__version__})",
        "aimass.graph": json.dumps({"nodes": ex.nodes}, separators=(",", ":")),
        "aimass.signature": json.dumps({"inputs": ex.inputs, "outputs": ex.outputs}, separators=(",", ":")),
    }
    if quantize:
        metadata["aimass.quantize"] = quantize
    if padding is not None:
        if not isinstance(padding, dict) or set(padding) - {"mask_input", "pad_value", "max_waste"} or \
                "mask_input" not in padding or not 0 <= float(padding.get("max_waste", 0.25)) <= 1:
            raise ValueError("export: padding must be {'mask_input': name, 'pad_value': number, 'max_waste': "
                             f"fraction in [0, 1]}}, got {padding!r}")
        spec = next((i for i in ex.inputs if i["name"] == padding["mask_input"]), None)
        if spec is None or -1 not in spec["shape"][1:]:
            raise ValueError(f"export: padding mask_input {padding['mask_input']!r} must name an input with the "
                             "dynamic sequence dim (export with dynamic_seq)")
        metadata["aimass.padding"] = json.dumps({"mask_input": padding["mask_input"],
                                                 "mask_pad_value": float(padding.get("pad_value", 0)),
                                                 "max_waste": float(padding.get("max_waste", 0.25))})
    if prune_report is not None:
        metadata["aimass.prune"] = json.dumps(prune_report, separators=(",", ":"))
    path = os.fspath(path)
    with atomic_path(path) as tmp:
        save_file(ex.tensors, tmp, metadata=metadata)
    return path
