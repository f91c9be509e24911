"""ONNX import: runtime.from_onnx(path_or_model, out_path) maps an ONNX graph (opset 13+) onto the
.aimass op set. The `onnx` package reads the graph; onnxruntime runs it twice (two batch sizes and,
with a symbolic sequence dim, two lengths) to learn every intermediate shape, to fold the shape
arithmetic exporters emit (Shape -> Gather -> Concat -> Reshape) and to tell which dims follow the
sequence length."""
from __future__ import annotations

import json
import os
from typing import Dict, List

import numpy as np

from .._io import atomic_path
from ._export_ext import UnsupportedOpError
from ._onnx_fuse import _OnnxFuseMixin
from ._onnx_ops import _OnnxOpsMixin, _err

_ACT = {"Relu": "relu", "Sigmoid": "sigmoid", "Tanh": "tanh"}
_BIN = {"Add": "add", "Sub": "sub", "Mul": "mul", "Div": "div"}
_CMP = {"Equal": "eq", "Less": "lt", "LessOrEqual": "le", "Greater": "gt", "GreaterOrEqual": "ge"}
_PASS = ("Identity", "Dropout")
_SHAPE_OPS = ("Shape", "Constant", "ConstantOfShape", "Size")
SUPPORTED_ONNX = ("MatMul, Gemm, Conv, Relu, Gelu, Sigmoid, Tanh, Softmax, LogSoftmax, LayerNormalization, "
                  "BatchNormalization, Add, Sub, Mul, Div, Reshape, Flatten, Squeeze, Unsqueeze, Transpose, Concat, "
                  "Gather, Slice, Split, MaxPool, AveragePool, GlobalAveragePool, Identity, Dropout, Cast, Where, Equal, "
                  "Less, Greater, Not, IsNaN, ReduceMean, ReduceSum, LSTM, GRU (+ shape arithmetic on constants); Erf in the GELU "
                  "pattern x * 0.5 * (1 + erf(x / sqrt 2)); nn.MultiheadAttention as torch.onnx.export writes it")


class _Importer(_OnnxOpsMixin, _OnnxFuseMixin):
    def __init__(self, model):
        import onnx
        from onnx import numpy_helper

        self.onnx = onnx
        opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
        if opset < 13:
            raise ValueError(f"from_onnx: the model has opset {opset}; convert it to opset 13 or newer "
                             "(onnx.version_converter.convert_version)")
        self.model = model
        g = model.graph
        self.const: Dict[str, np.ndarray] = {i.name: numpy_helper.to_array(i) for i in g.initializer}
        self.inputs = [i for i in g.input if i.name not in self.const]
        self.nodes: List[dict] = []
        self.tensors: Dict[str, np.ndarray] = {}
        self.value: Dict[str, str] = {}      # onnx name -> .aimass value
        self.dtypes: Dict[str, str] = {}
        self.time_major: Dict[str, str] = {}  # onnx name of a [S, B, ...] view -> batch-major .aimass value
        # a bidirectional RNN's Y [S, 2, B, H] (and its [S, B, 2, H] transpose): the [B, S, 2H] value
        self.bidir_y: Dict[str, str] = {}
        self.bidir_t: Dict[str, str] = {}
        self.shape_derived: set = set()  # computed from constants and input shapes only
        self.skip: set = set()  # id() of nodes a matched pattern (_onnx_fuse) already mapped

    # -- shapes from two runs
    def probe(self):
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise ImportError("from_onnx runs the graph once in onnxruntime to learn its shapes: "
                              "pip install 'aimass[onnx]' (onnx, onnxruntime)") from exc
        m = self.onnx.ModelProto()
        m.CopyFrom(self.model)
        names = [o for n in m.graph.node for o in n.output if o]
        del m.graph.output[:]
        for nm in names:
            m.graph.output.append(self.onnx.ValueInfoProto(name=nm))
        sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        self.specs, seq_params = [], set()
        for inp in self.inputs:
            t = inp.type.tensor_type
            dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim]
            if not dims:
                raise ValueError(f"from_onnx: input '{inp.name}' has no shape; the runtime needs a batch dim")
            seq_params.update(d for d in dims[1:] if isinstance(d, str))
            self.specs.append((inp.name, t.elem_type, dims))
        if len(seq_params) > 1:
            raise ValueError(f"from_onnx: inputs have several symbolic non-batch dims {sorted(seq_params)}; the "
                             "runtime supports one dynamic sequence length")
        self.dynamic = bool(seq_params)
        runs = []
        rng = np.random.default_rng(0)
        for batch, seq in ((2, 7), (3, 8)):
            feeds = {}
            for name, et, dims in self.specs:
                shape = [batch] + [seq if isinstance(d, str) else d for d in dims[1:]]
                if et == self.onnx.TensorProto.FLOAT:
                    feeds[name] = rng.standard_normal(shape).astype(np.float32)
                elif et in (self.onnx.TensorProto.INT64, self.onnx.TensorProto.INT32, self.onnx.TensorProto.BOOL):
                    dt = {self.onnx.TensorProto.INT64: np.int64, self.onnx.TensorProto.INT32: np.int32,
                          self.onnx.TensorProto.BOOL: np.bool_}[et]
                    feeds[name] = np.ones(shape, dtype=dt)
                    if et == self.onnx.TensorProto.BOOL and len(shape) > 1:  # a mask: alternate, so that
                        # padding (True = pad) and attention (True = attend) masks both leave keys in every row
                        feeds[name] = np.broadcast_to(np.arange(shape[-1]) % 2 == 1, shape).copy()
                else:
                    raise TypeError(f"from_onnx: input '{name}' has ONNX element type {et}; use float32 or int64")
            try:
                out = dict(zip(names, sess.run(None, feeds)))
            except Exception as exc:  # onnxruntime's own error types; the file cannot run at this shape
                raise ValueError(f"from_onnx: onnxruntime cannot run this file at batch {batch}" + (
                    f" and sequence length {seq}" if seq_params else "") + f" ({exc}); an export that traced a "
                    "size into the graph (torch.onnx.export of nn.MultiheadAttention with a key_padding_mask "
                    "fixes the sequence length) needs that dim static in the input shapes") from exc
            out.update(feeds)
            runs.append(out)
        self.r0, self.r1 = runs
        self.seq0 = 7

    def shape(self, name):
        return list(np.shape(self.r0[name]))

    def dyn(self, name):
        return {i for i, (a, b) in enumerate(zip(np.shape(self.r0[name]), np.shape(self.r1[name]))) if a != b}

    def row_target(self, node, name):
        d = self.dyn(name) - {0}
        if len(d) > 1:
            raise _err(node, "a reshape with several dims following the sequence length")
        return [-1 if i in d else v for i, v in enumerate(self.shape(name))][1:]

    def check_batched(self, node, name):
        s0, s1 = np.shape(self.r0[name]), np.shape(self.r1[name])
        if not s0 or s0[0] != 2 or s1[0] != 3:
            raise _err(node, f"value '{name}' of shape {list(s0)} does not keep the batch dimension first")

    # -- emission
    def emit(self, node, op, inputs, params=None, attrs=None, dtype="float32", out=None):
        out = out or node.output[0]
        name = f"v{len(self.nodes)}:{out}"  # graph output names stay free for the output nodes
        pn = {}
        for role, arr in (params or {}).items():
            if arr is not None:
                pn[role] = f"{name}.{role}"
                self.tensors[pn[role]] = np.ascontiguousarray(arr, dtype=np.float32)
        self.nodes.append({"op": op, "name": name, "inputs": list(inputs), "outputs": [name], "params": pn,
                           "attrs": attrs or {}})
        self.dtypes[name] = dtype
        if out == node.output[0]:
            self.check_batched(node, out)
            self.value[out] = name
        return name

    def folded(self, name):
        """Value of a tensor that does not depend on the input data (initializer or shape arithmetic)."""
        if name in self.const:
            return self.const[name]
        if name in self.value or name in self.time_major or name in self.bidir_y or name in self.bidir_t:
            return None
        if name in self.shape_derived and self.materialize(name) is not None:
            return None
        a, b = self.r0.get(name), self.r1.get(name)
        if a is not None and b is not None and np.shape(a) == np.shape(b) and np.array_equal(a, b):
            return np.asarray(a)
        return None

    def val(self, node, name, float_only=False):
        if name not in self.value and name in self.shape_derived:
            self.materialize(name)
        if name not in self.value:
            raise _err(node, f"input '{name}' is computed from the data in a way the runtime cannot follow")
        v = self.value[name]
        if float_only and self.dtypes.get(v) == "int64":
            c = f"{v}.float"
            if c not in self.dtypes:
                self.nodes.append({"op": "cast", "name": c, "inputs": [v], "outputs": [c], "params": {},
                                   "attrs": {"to": "float32"}})
                self.dtypes[c] = "float32"
            return c
        return v

    def operands(self, node, roles):
        ins, params, attrs = [], {}, {}
        rank = len(self.shape(node.output[0]))
        for role, name in roles:
            c = self.folded(name)
            if c is None and name in self.shape_derived and name not in self.value:
                a0, a1 = np.asarray(self.r0[name]), np.asarray(self.r1[name])
                if a0.size and a1.size and (a0 == a0.flat[0]).all() and (a1 == a0.flat[0]).all():
                    c = a0.reshape(-1)[:1].reshape(())  # ConstantOfShape(Shape(x)): one value everywhere
            if c is not None:
                if c.ndim == 0 or c.size == 1 and c.ndim < rank:
                    attrs[f"{role}_scalar"] = float(c.reshape(-1)[0])
                else:
                    params[role] = c.astype(np.float32)
            else:
                ins.append(self.val(node, name, float_only=True))
        if not ins:
            raise _err(node, "an op on constants only that changes with the input shape")
        return ins, params, attrs

    def run(self):
        from onnx import helper
        for name, et, dims in self.specs:
            dt = "float32" if et == self.onnx.TensorProto.FLOAT else "int64"
            self.value[name] = name
            self.dtypes[name] = dt
        self.producer = {o: n for n in self.model.graph.node for o in n.output if o}
        for node in self.model.graph.node:
            if id(node) in self.skip:
                continue
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            if node.op_type in ("Shape", "Size") or all(i in self.const or i in self.shape_derived
                                                        for i in node.input if i):
                self.shape_derived.update(o for o in node.output if o)
                continue  # shape arithmetic / constants: read from the probe runs where used
            self.map_node(node, attrs)
        sig_in = [{"name": n, "dtype": self.dtypes[n], "shape": self.sig_shape(n)} for n, _, _ in self.specs]
        sig_out = []
        for o in self.model.graph.output:
            if o.name not in self.value:
                raise UnsupportedOpError(f"from_onnx: graph output '{o.name}' is not computed per batch row")
            oname = o.name
            self.nodes.append({"op": "identity", "name": f"output.{oname}", "inputs": [self.value[oname]],
                               "outputs": [oname], "params": {}, "attrs": {}})
            sig_out.append({"name": oname, "dtype": self.dtypes[self.value[oname]], "shape": self.sig_shape(oname)})
        return sig_in, sig_out

    def sig_shape(self, name):
        d = self.dyn(name)
        out = [-1]
        for i, v in enumerate(self.shape(name)[1:], start=1):
            if i in d and v != self.seq0:
                raise UnsupportedOpError(f"from_onnx: '{name}' dim {i} follows the sequence length without being it")
            out.append(-1 if i in d else int(v))
        return out

    def map_node(self, node, at):  # noqa: C901 - one branch per op type
        op, ins, out = node.op_type, list(node.input), node.output[0]
        if op in _PASS or (op == "Cast" and at.get("to") == 1 and self.dtypes.get(self.value.get(ins[0])) == "float32"):
            self.value[out] = self.val(node, ins[0])
        elif op in _ACT:
            self.emit(node, "activation", [self.val(node, ins[0])], attrs={"kind": _ACT[op]})
        elif op == "Gelu":
            self.emit(node, "activation", [self.val(node, ins[0])],
                      attrs={"kind": "gelu_tanh" if at.get("approximate", b"none") in (b"tanh", "tanh") else "gelu"})
        elif op in _BIN:
            i, p, a = self.operands(node, (("a", ins[0]), ("b", ins[1])))
            self.emit(node, _BIN[op], i, params=p, attrs=a)
        elif op in _CMP or op == "Not":
            roles = (("a", ins[0]), ("b", ins[1])) if op != "Not" else (("a", ins[0]),)
            i, p, a = self.operands(node, roles)
            if op == "Not":
                a["b_scalar"] = 0.0
            a["kind"] = _CMP.get(op, "eq")
            self.emit(node, "compare", i, params=p, attrs=a)
        elif op == "Where":
            i, p, a = self.operands(node, (("cond", ins[0]), ("a", ins[1]), ("b", ins[2])))
            self.emit(node, "where", i, params=p, attrs=a)
        elif op == "Cast":
            to = "float32" if at.get("to") in (1, 10, 16) else "int64" if at.get("to") in (6, 7, 9) else None
            if to is None:
                raise _err(node, f"Cast to ONNX type {at.get('to')}")
            src = self.val(node, ins[0])
            if to == "float32" and self.dtypes[src] == "float32" or to == "int64" and self.dtypes[src] == "int64":
                self.value[out] = src
            elif at.get("to") == 9:  # bool: 0/1 floats here
                self.emit(node, "compare", [self.val(node, ins[0], True)], attrs={"kind": "ne", "b_scalar": 0.0})
            else:
                self.emit(node, "cast", [src], attrs={"to": to}, dtype=to)
        elif op == "Erf":
            self.erf_gelu(node)
        elif op in ("MatMul", "Gemm"):
            if op == "MatMul" and ins[0] in self.time_major and self.try_mha(node):
                return
            self.matmul(node, at)
        elif op == "Conv":
            self.conv(node, at)
        elif op in ("MaxPool", "AveragePool"):
            k = list(at["kernel_shape"])
            pads = list(at.get("pads", [0] * 4))
            if len(k) != 2 or pads[:2] != pads[2:] or at.get("ceil_mode", 0) or at.get("auto_pad", b"NOTSET") not in (
                    b"NOTSET", "NOTSET"):
                raise _err(node, "pooling other than 2-D with symmetric pads and ceil_mode=0")
            a = {"kernel_size": k, "stride": list(at.get("strides", [1, 1])), "padding": pads[:2]}
            if op == "MaxPool":
                a["dilation"] = list(at.get("dilations", [1, 1]))
            else:
                a["count_include_pad"] = int(at.get("count_include_pad", 0))
            self.emit(node, "max_pool2d" if op == "MaxPool" else "avg_pool2d", [self.val(node, ins[0])], attrs=a)
        elif op == "GlobalAveragePool":
            self.emit(node, "adaptive_avg_pool2d", [self.val(node, ins[0])], attrs={"output_size": [1, 1]})
        elif op in ("Softmax", "LogSoftmax"):
            rank = len(self.shape(out))
            axis = int(at.get("axis", -1)) % rank
            if axis == 0:
                raise _err(node, "softmax over the batch dimension")
            self.emit(node, op.lower().replace("logsoftmax", "log_softmax"), [self.val(node, ins[0])],
                      attrs={"dim": axis})
        elif op == "LayerNormalization":
            rank = len(self.shape(ins[0]))
            axis = int(at.get("axis", -1)) % rank
            scale, bias = self.folded(ins[1]), self.folded(ins[2]) if len(ins) > 2 and ins[2] else None
            if axis == 0 or scale is None or len(node.output) > 1 and any(node.output[1:]):
                raise _err(node, "LayerNormalization over the batch, with a computed scale, or with mean outputs")
            self.emit(node, "layer_norm", [self.val(node, ins[0])], params={"weight": scale, "bias": bias},
                      attrs={"normalized_shape": self.shape(ins[0])[axis:], "eps": float(at.get("epsilon", 1e-5))})
        elif op == "BatchNormalization":
            sc, b, mean, var = (self.folded(i) for i in ins[1:5])
            inv = sc / np.sqrt(var + at.get("epsilon", 1e-5))
            self.emit(node, "channel_affine", [self.val(node, ins[0])], params={"scale": inv, "shift": b - mean * inv})
        elif op in ("Reshape", "Flatten", "Squeeze", "Unsqueeze"):
            if ins[0] in self.bidir_t and op == "Reshape":
                # [S, B, 2, H] -> [S, B, 2H] (torch's export of a bidirectional layer): the same rows
                tgt = self.folded(ins[1])
                h2 = self.shape(out)[-1] if self.shape(out) else None
                if tgt is None or len(tgt) != 3 or int(tgt[-1]) not in (-1, h2):
                    raise _err(node, "a reshape of a bidirectional RNN output other than [seq, batch, 2*hidden]")
                self.time_major[out] = self.bidir_t[ins[0]]
                return
            if ins[0] in self.time_major or ins[0] in self.bidir_y or ins[0] in self.bidir_t:
                if op == "Squeeze" and ins[0] in self.time_major:  # LSTM's Y [S, 1, B, H] -> [S, B, H]: still the same rows
                    self.time_major[out] = self.time_major[ins[0]]
                    return
                raise _err(node, "a reshape of a time-major (sequence-first) value")
            src = self.val(node, ins[0])
            self.emit(node, "reshape", [src], attrs={"shape": self.row_target(node, out)}, dtype=self.dtypes[src])
        elif op == "Transpose":
            perm = list(at.get("perm", []))
            if perm == [0, 2, 1, 3] and ins[0] in self.bidir_y:
                self.bidir_t[out] = self.bidir_y[ins[0]]
            elif ins[0] in self.bidir_y or ins[0] in self.bidir_t:
                raise _err(node, f"Transpose perm {perm} of a bidirectional RNN output")
            elif perm == [1, 0, 2] and ins[0] in self.time_major:
                self.value[out] = self.time_major[ins[0]]
            elif perm == [1, 0, 2]:
                self.time_major[out] = self.val(node, ins[0])
            elif perm and perm[0] == 0:
                src = self.val(node, ins[0])
                self.emit(node, "permute", [src], attrs={"perm": perm}, dtype=self.dtypes[src])
            else:
                raise _err(node, f"Transpose perm {perm} moves the batch dimension")
        elif op == "Concat":
            axis = int(at["axis"]) % len(self.shape(out))
            if axis == 0:
                raise _err(node, "Concat along the batch dimension")
            srcs = [self.val(node, i) for i in ins]
            self.emit(node, "concat", srcs, attrs={"dim": axis}, dtype=self.dtypes[srcs[0]])
        elif op == "Gather":
            self.gather(node, at)
        elif op == "Slice":
            self.slice(node)
        elif op == "Split":
            self.split(node, at)
        elif op == "IsNaN":  # x != x (F.scaled_dot_product_attention's export zeroes fully masked rows)
            v = self.val(node, ins[0], True)
            self.emit(node, "compare", [v, v], attrs={"kind": "ne"})
        elif op in ("ReduceMean", "ReduceSum"):
            axes = at.get("axes")
            if axes is None and len(ins) > 1 and ins[1]:
                axes = self.folded(ins[1])
            if axes is None:
                raise _err(node, "a reduction over every dim (the batch included)")
            rank = len(self.shape(ins[0]))
            dims = sorted(int(a) % rank for a in np.asarray(axes).reshape(-1))
            if 0 in dims:
                raise _err(node, "a reduction over the batch dimension")
            self.emit(node, "reduce", [self.val(node, ins[0], True)],
                      attrs={"kind": "mean" if op == "ReduceMean" else "sum", "dims": dims,
                             "keepdim": int(at.get("keepdims", 1))})
        elif op in ("LSTM", "GRU"):
            self.rnn(node, at)
        else:
            raise _err(node, f"op type {op} on data")

def from_onnx(model, out_path) -> str:
    """Import an ONNX model (a path or an onnx.ModelProto, opset 13+) into an .aimass file at out_path.
    Dim 0 of every input is the batch; one symbolic (dim_param) non-batch dim becomes the dynamic
    sequence length. Raises UnsupportedOpError naming the node and op type it cannot map."""
    try:
        import onnx
    except ImportError as exc:
        raise ImportError("from_onnx needs the onnx package: pip install 'aimass[onnx]'") from exc
    from safetensors.numpy import save_file

    from ._export import FORMAT_VERSION
    if isinstance(model, (str, os.PathLike)):
        model = onnx.load(os.fspath(model))
    if not isinstance(model, onnx.ModelProto):
        raise TypeError(f"from_onnx: expected a path or an onnx.ModelProto, got {type(model).__name__}")
    imp = _Importer(model)
    imp.probe()
    sig_in, sig_out = imp.run()
    used = {i for n in imp.nodes for i in n["inputs"]} | {o["name"] for o in sig_out}
    while True:  # drop nodes nothing reads
        keep = [n for n in imp.nodes if n["outputs"][0] in used or n["op"] == "identity"]
        if len(keep) == len(imp.nodes):
            break
        imp.nodes = keep
        used = {i for n in imp.nodes for i in n["inputs"]} | {o["name"] for o in sig_out}
    live = {p for n in imp.nodes for p in n["params"].values()}
    metadata = {
        "aimass.format_version": str(FORMAT_VERSION),
        "aimass.producer": f"aimass {__import__('aimass').__version__} (onnx {onnx.__version__}, "
                           f"producer {model.producer_name} {model.producer_version})",
        "aimass.graph": json.dumps({"nodes": imp.nodes}, separators=(",", ":")),
        "aimass.signature": json.dumps({"inputs": sig_in, "outputs": sig_out}, separators=(",", ":")),
    }
    out_path = os.fspath(out_path)
    with atomic_path(out_path) as tmp:
        save_file({k: v for k, v in imp.tensors.items() if k in live}, tmp, metadata=metadata)
    return out_path
