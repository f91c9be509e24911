"""torch.fx export of a torch module to an .aimass file (see docs/model-format.md)."""
from __future__ import annotations

import json
import operator
import os
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from .._io import atomic_path

FORMAT_VERSION = 1

SUPPORTED = (
    "nn.Linear, nn.Conv2d, nn.BatchNorm1d/2d (folded into the conv/linear before it), nn.MaxPool2d, "
    "nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Flatten, nn.ReLU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, "
    "nn.Softmax, nn.LogSoftmax, nn.LayerNorm, nn.Embedding, nn.Dropout, nn.Identity, "
    "F.relu/gelu/silu/sigmoid/tanh/softmax/log_softmax/dropout/max_pool2d/avg_pool2d/adaptive_avg_pool2d, "
    "torch.flatten/reshape, Tensor.view/reshape/flatten/contiguous/size, +, -, *, /"
)


class UnsupportedOpError(ValueError):
    """The module uses an operation the .aimass format cannot express."""


def _unsupported(op: str, node) -> UnsupportedOpError:
    return UnsupportedOpError(f"aimass.runtime.export: unsupported op {op} at node '{node.name}' "
                              f"(fx target {node.target!r}); supported: {SUPPORTED}")


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


class _Exporter:
    def __init__(self, module, example_inputs, quantize):
        import torch
        import torch.fx
        from torch.fx.passes.shape_prop import ShapeProp

        self.torch = torch
        self.quantize = quantize
        module = module.eval()
        try:
            self.gm = torch.fx.symbolic_trace(module)
        except Exception as exc:  # fx raises many kinds for data-dependent control flow
            raise UnsupportedOpError(f"aimass.runtime.export: torch.fx could not trace the module ({exc}); "
                                     "remove data-dependent control flow from forward()") from exc
        with torch.no_grad():
            ShapeProp(self.gm).propagate(*example_inputs)
        self.modules = dict(self.gm.named_modules())
        self.batch = int(example_inputs[0].shape[0])
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
        tm = node.meta.get("tensor_meta")
        if tm is None or not hasattr(tm, "shape"):
            raise UnsupportedOpError(f"aimass.runtime.export: node '{node.name}' does not produce one tensor")
        shape = [int(d) for d in tm.shape]
        if not shape or shape[0] != self.batch:
            raise UnsupportedOpError(
                f"aimass.runtime.export: node '{node.name}' has shape {shape}, which does not keep the batch "
                f"dimension ({self.batch}) first; the runtime batches along dim 0 only")
        return shape

    def val(self, node, who) -> str:
        if node not in self.value:
            raise _unsupported(f"input {node.name} of {who.name} (not a tensor the runtime tracks)", who)
        return self.value[node]

    def emit(self, node, op, inputs, params=None, attrs=None):
        name = node.name
        params_named = {}
        for role, arr in (params or {}).items():
            if arr is None:
                continue
            tname = f"{name}.{role}"
            self.tensors[tname] = np.ascontiguousarray(arr)
            params_named[role] = tname
        self.meta_shape(node)
        entry = {"op": op, "name": name, "inputs": list(inputs), "outputs": [name],
                 "params": params_named, "attrs": attrs or {}}
        self.nodes.append(entry)
        self.value[node] = name
        self.producer[name] = entry
        return entry

    def alias(self, node, src):
        self.value[node] = self.value[src] if src in self.value else self.val(src, node)

    def reshape(self, node, src):
        shape = self.meta_shape(node)
        self.emit(node, "reshape", [self.val(src, node)], attrs={"shape": shape[1:]})

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
                ins.append(self.value[x])
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
            if tm.dtype in (torch.int64, torch.int32):
                dt = "int64"
            elif tm.dtype in (torch.float32, torch.float16, torch.bfloat16):
                dt = "float32"
            else:
                raise TypeError(f"aimass.runtime.export: input '{name}' has dtype {tm.dtype}; "
                                "use float32 or int64 inputs")
            shape = self.meta_shape(n)
            self.inputs.append({"name": name, "dtype": dt, "shape": [-1] + shape[1:]})
            self.value[n] = name
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                continue
            if node.op == "get_attr":
                obj = self.gm
                for part in node.target.split("."):
                    obj = getattr(obj, part)
                self.const[node] = _np(obj)
            elif node.op == "call_module":
                self.call_module(node)
            elif node.op == "call_function":
                self.call_function(node)
            elif node.op == "call_method":
                self.call_method(node)
            elif node.op == "output":
                self.collect_outputs(node.args[0], output_names)
        # graph outputs that are graph inputs or shared need a node of their own
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
            self.outputs.append({"name": name, "dtype": "float32", "shape": [-1] + shape[1:]})


def export(module, example_inputs, path, quantize: Optional[str] = None, prune=None,
           input_names: Optional[Sequence[str]] = None, output_names: Optional[Sequence[str]] = None) -> str:
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
        if x.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32):
            raise TypeError(f"export: example input {i} has dtype {x.dtype}; .aimass inputs are float32 or int64 "
                            "(float16/bfloat16/int32 examples are widened; convert others, e.g. x.float())")
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
        ex = _Exporter(module, example_inputs, quantize).run(input_names, output_names)
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
    if prune_report is not None:
        metadata["aimass.prune"] = json.dumps(prune_report, separators=(",", ":"))
    path = os.fspath(path)
    with atomic_path(path) as tmp:
        save_file(ex.tensors, tmp, metadata=metadata)
    return path
