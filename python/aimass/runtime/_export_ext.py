"""Export support beyond the MLP/CNN op set: tracing with the attention and recurrent modules as
leaves, a dynamic sequence dimension, and the handlers of the tensor ops (matmul, permute,
indexing, cat/stack, reductions, where, comparisons, casts, positions, attention)."""
from __future__ import annotations

import operator
from typing import List

import numpy as np


from ._export_trace import _leaf_types


class UnsupportedOpError(ValueError):
    """The module uses an operation the .aimass format cannot express."""


def _unsupported(op: str, node) -> UnsupportedOpError:
    from ._export import SUPPORTED
    return UnsupportedOpError(f"aimass.runtime.export: unsupported op {op} at node '{node.name}' "
                              f"(fx target {node.target!r}); supported: {SUPPORTED}")


def _torch_dtype(node):
    tm = node.meta.get("tensor_meta")
    return getattr(tm, "dtype", None)


def _used(n) -> bool:
    return any(u.op == "output" or u.target is not operator.getitem or _used(u) for u in n.users)


class _ExtMixin:
    """Handlers mixed into runtime._export._Exporter."""

    # -- shapes with a dynamic sequence dim
    def is_bcast(self, node) -> bool:
        ins = [i for i in node.all_input_nodes if i in self.value]
        return bool(ins) and all(i in self.expanded for i in ins)

    def dyn_dims(self, node) -> set:
        d = self.dyn.get(node, set())
        return {i + 1 for i in d} if node in self.expanded else set(d)

    def row_target(self, node, shape) -> List[int]:
        """Per-row reshape target: dims that follow the sequence length become -1 (inferred)."""
        dd = self.dyn_dims(node)
        if len(dd) > 1:
            raise _unsupported(f"reshape to {shape} with {len(dd)} dims that follow the sequence length", node)
        return [-1 if i in dd else int(v) for i, v in enumerate(shape)][1:]

    def signature_shape(self, node, shape) -> List[int]:
        seq = self.seq_dims[1]
        out = [-1]
        for i, v in enumerate(shape[1:], start=1):
            if i in self.dyn_dims(node):
                if v != seq:
                    raise _unsupported(f"graph input/output dim {i} of size {v} that follows the sequence length "
                                       f"({seq}) without being it", node)
                out.append(-1)
            else:
                out.append(int(v))
        return out

    # -- helpers
    def emit_raw(self, name, op, inputs, params=None, attrs=None, dtype="float32") -> str:
        params_named = {}
        for role, arr in (params or {}).items():
            if arr is None:
                continue
            tname = f"{name}.{role}"
            self.tensors[tname] = np.ascontiguousarray(arr)
            params_named[role] = tname
        entry = {"op": op, "name": name, "inputs": list(inputs), "outputs": [name], "params": params_named,
                 "attrs": attrs or {}}
        self.nodes.append(entry)
        self.producer[name] = entry
        self.dtypes[name] = dtype
        return name

    def as_float(self, x, who) -> str:
        name = self.val(x, who)
        if self.dtypes.get(name) != "int64":
            return name
        cast = f"{name}.float"
        if cast not in self.dtypes:
            self.emit_raw(cast, "cast", [name], attrs={"to": "float32"})
        return cast

    def linear_raw(self, name, x, w, b, activation=None) -> str:
        from ._export import _quantize_linear
        attrs = {"activation": activation} if activation else {}
        if self.quantize:
            bits = 8 if self.quantize == "int8" else 4
            q, scale, group = _quantize_linear(w, bits)
            attrs.update({"bits": bits, "group_size": group})
            return self.emit_raw(name, "linear", [x], params={"weight": q, "weight_scale": scale, "bias": b},
                                 attrs=attrs)
        return self.emit_raw(name, "linear", [x], params={"weight": w, "bias": b}, attrs=attrs)

    def norm_raw(self, name, x, mod) -> str:
        from ._export import _np
        return self.emit_raw(name, "layer_norm", [x],
                             params={"weight": _np(mod.weight) if mod.weight is not None else None,
                                     "bias": _np(mod.bias) if getattr(mod, "bias", None) is not None else None},
                             attrs={"normalized_shape": [int(d) for d in mod.normalized_shape],
                                    "eps": float(mod.eps)})

    def rank(self, node) -> int:
        return len(self.meta_shape(node))

    def norm_dim(self, node, src, d, what="dim") -> int:
        r = self.rank(src)
        if src in self.expanded:
            raise _unsupported(f"{what} on a value computed without the batch dim", node)
        d = int(d) + r if int(d) < 0 else int(d)
        if not 1 <= d < r:
            raise _unsupported(f"{what} {d} over the batch dimension (or out of range)", node)
        return d

    def set_value(self, node, name):
        self.value[node] = name

    # -- functions and methods
    def ext_call_function(self, node) -> bool:
        torch = self.torch
        F = torch.nn.functional
        t, a, kw = node.target, list(node.args), dict(node.kwargs)
        if t is operator.getitem and isinstance(a[0], torch.fx.Node) and a[0].op == "call_module" \
                and isinstance(self.modules[a[0].target], _leaf_types()):
            if a[1] == 0:
                self.alias(node, a[0])
            elif _used(node):
                raise _unsupported(f"output {a[1]} of {type(self.modules[a[0].target]).__name__} (only the first, "
                                   "the output sequence, is computed)", node)
            return True
        if t is operator.getitem:
            self.index(node, a[0], a[1])
        elif t in (torch.matmul, operator.matmul, torch.bmm):
            self.matmul(node, a[0], a[1])
        elif t is F.linear:
            w, b = a[1] if len(a) > 1 else kw["weight"], a[2] if len(a) > 2 else kw.get("bias")
            if w not in self.const or (b is not None and b not in self.const):
                raise _unsupported("F.linear with a computed weight", node)
            self.emit(node, "linear", [self.as_float(a[0], node)],
                      params={"weight": self.const[w], "bias": self.const[b] if b is not None else None})
        elif t is F.layer_norm:
            w, b = (a[2] if len(a) > 2 else kw.get("weight")), (a[3] if len(a) > 3 else kw.get("bias"))
            for p in (w, b):
                if p is not None and p not in self.const:
                    raise _unsupported("F.layer_norm with a computed weight", node)
            ns = a[1] if len(a) > 1 else kw["normalized_shape"]
            self.emit(node, "layer_norm", [self.val(a[0], node)],
                      params={"weight": self.const.get(w), "bias": self.const.get(b)},
                      attrs={"normalized_shape": [int(d) for d in ns], "eps": float(a[4] if len(a) > 4 else
                                                                                       kw.get("eps", 1e-5))})
        elif t is torch.transpose:
            self.transpose(node, a[0], a[1], a[2])
        elif t is torch.permute:
            self.permute(node, a[0], a[1] if len(a) > 1 else kw["dims"])
        elif t in (torch.unsqueeze, torch.squeeze):
            self.reshape(node, a[0])
        elif t in (torch.cat, torch.concat, torch.stack):
            self.cat(node, a[0], a[1] if len(a) > 1 else kw.get("dim", 0), t is torch.stack)
        elif t in (torch.mean, torch.sum, torch.amax, torch.amin):
            self.reduce(node, t.__name__, a, kw)
        elif t is torch.where:
            if len(a) + len(kw) < 3:
                raise _unsupported("torch.where(cond) (indices)", node)
            self.where(node, a[0], a[1] if len(a) > 1 else kw["input"], a[2] if len(a) > 2 else kw["other"])
        elif t in _cmp_tables()[0]:
            self.compare(node, _cmp_tables()[0][t], a[0], a[1])
        elif t in (operator.invert, torch.logical_not):
            self.compare(node, "eq", a[0], 0.0)
        elif t is operator.neg:
            self.binary(node, "mul", a[0], -1.0)
        elif t is torch.arange:
            self.arange(node, a, kw)
        elif t is F.scaled_dot_product_attention:
            self.sdpa(node, a, kw)
        else:
            return False
        return True

    def ext_call_method(self, node) -> bool:
        m, a, kw = node.target, list(node.args), dict(node.kwargs)
        torch = self.torch
        if m in ("matmul", "bmm"):
            self.matmul(node, a[0], a[1])
        elif m == "transpose":
            self.transpose(node, a[0], a[1], a[2])
        elif m == "permute":
            dims = a[1:] if len(a) > 2 or not isinstance(a[1], (tuple, list)) else a[1]
            self.permute(node, a[0], dims)
        elif m in ("unsqueeze", "squeeze"):
            self.reshape(node, a[0])
        elif m in ("expand", "expand_as"):
            if self.meta_shape(node) != self.meta_shape(a[0]):
                raise _unsupported("expand that copies data (broadcast in the op that uses it instead)", node)
            self.alias(node, a[0])
        elif m in ("mean", "sum", "amax", "amin"):
            self.reduce(node, m, a, kw)
        elif m == "masked_fill":
            self.where(node, a[1], a[2], a[0])
        elif m in _cmp_tables()[1]:
            self.compare(node, _cmp_tables()[1][m], a[0], a[1])
        elif m in ("logical_not", "__invert__"):
            self.compare(node, "eq", a[0], 0.0)
        elif m in ("float", "long", "int", "bool", "to", "type_as", "type"):
            target = {"float": "float", "long": "long", "int": "long", "bool": "bool"}.get(m)
            if m == "type_as":
                target = "float" if _torch_dtype(a[1]) in (torch.float32, torch.float16, torch.bfloat16) else "long"
            elif m in ("to", "type"):
                dt = next((x for x in list(a[1:]) + list(kw.values()) if isinstance(x, torch.dtype)), None)
                target = None if dt is None else "float" if dt.is_floating_point else "bool" if dt == torch.bool \
                    else "long"
            self.cast(node, a[0], target)
        else:
            return False
        return True

    # -- op handlers
    def matmul(self, node, x, y):
        if y in self.const:
            w = self.const[y]
            if w.ndim != 2:
                raise _unsupported(f"matmul with a {w.ndim}-D constant", node)
            self.emit(node, "linear", [self.as_float(x, node)], params={"weight": np.ascontiguousarray(w.T)})
            return
        if x in self.const:
            raise _unsupported("matmul with a constant left operand", node)
        if self.rank(x) != self.rank(y) or self.rank(x) < 3:
            raise _unsupported("matmul of operands with different ranks (or rank < 3 with the batch)", node)
        bn = self.val(y, node)
        prod, attrs = self.producer.get(bn), {}
        r = self.rank(y)
        if prod is not None and prod["op"] == "permute" and \
                prod["attrs"]["perm"] == list(range(r - 2)) + [r - 1, r - 2]:
            bn, attrs = prod["inputs"][0], {"trans_b": 1}  # q @ k.transpose(-2, -1): no copy
        self.emit(node, "matmul", [self.as_float(x, node), bn], attrs=attrs)

    def transpose(self, node, x, d0, d1):
        r = self.rank(x)
        perm = list(range(r))
        i, j = self.norm_dim(node, x, d0), self.norm_dim(node, x, d1)
        perm[i], perm[j] = perm[j], perm[i]
        self.emit_permute(node, x, perm)

    def permute(self, node, x, dims):
        perm = [int(d) % self.rank(x) for d in dims]
        if perm[0] != 0:
            raise _unsupported(f"permute {list(dims)} that moves the batch dimension", node)
        self.emit_permute(node, x, perm)

    def emit_permute(self, node, x, perm):
        if x in self.expanded:
            raise _unsupported("permute of a value computed without the batch dim", node)
        name = self.val(x, node)
        self.emit(node, "permute", [name], attrs={"perm": perm}, out_dtype=self.dtypes.get(name, "float32"))

    def index(self, node, x, idx):
        torch = self.torch
        if x not in self.value or x in self.expanded:
            raise _unsupported("indexing this value", node)
        idx = idx if isinstance(idx, tuple) else (idx,)
        r = self.rank(x)
        if sum(1 for i in idx if i is Ellipsis) > 1:
            raise _unsupported("indexing with two Ellipses", node)
        n_real = sum(1 for i in idx if i is not None and i is not Ellipsis)
        full: list = []
        for i in idx:
            full.extend([slice(None)] * (r - n_real) if i is Ellipsis else [i])
        cur = self.val(x, node)
        dt = self.dtypes.get(cur, "float32")
        d = 0
        for k, i in enumerate(full):
            if i is None:
                continue
            if isinstance(i, slice):
                if i != slice(None):
                    if d == 0:
                        raise _unsupported("slicing the batch dimension", node)
                    if any(isinstance(v, torch.fx.Node) for v in (i.start, i.stop, i.step)):
                        raise _unsupported("a slice bound computed from the input", node)
                    attrs = {"dim": d, "start": int(i.start or 0), "step": int(i.step or 1)}
                    if i.stop is not None:
                        attrs["end"] = int(i.stop)
                    cur = self.emit_raw(f"{node.name}.s{k}", "slice", [cur], attrs=attrs, dtype=dt)
            elif isinstance(i, int) and not isinstance(i, bool):
                if d == 0:
                    raise _unsupported("indexing the batch dimension", node)
                attrs = {"dim": d, "start": int(i)}
                if i != -1:
                    attrs["end"] = int(i) + 1
                cur = self.emit_raw(f"{node.name}.s{k}", "slice", [cur], attrs=attrs, dtype=dt)
            else:
                raise _unsupported(f"indexing with {type(i).__name__}", node)
            d += 1
        self.emit(node, "reshape", [cur], attrs={"shape": self.row_target(node, self.meta_shape(node))},
                  out_dtype=dt)

    def cat(self, node, xs, dim, stack):
        if not isinstance(xs, (list, tuple)) or not xs or any(x not in self.value or x in self.expanded for x in xs):
            raise _unsupported("cat/stack of values the runtime does not compute per row", node)
        names = []
        out_rank = self.rank(node)
        d = int(dim) % out_rank
        if d == 0:
            raise _unsupported("cat/stack along the batch dimension", node)
        for j, x in enumerate(xs):
            n = self.val(x, node)
            if stack:
                row = self.row_target(x, self.meta_shape(x))
                row.insert(d - 1, 1)
                n = self.emit_raw(f"{node.name}.u{j}", "reshape", [n], attrs={"shape": row},
                                  dtype=self.dtypes.get(n, "float32"))
            names.append(n)
        self.emit(node, "concat", names, attrs={"dim": d}, out_dtype=self.dtypes.get(names[0], "float32"))

    def reduce(self, node, kind, a, kw):
        x = a[0]
        dims = a[1] if len(a) > 1 else kw.get("dim")
        if dims is None:
            raise _unsupported(f"{kind} over every dim (the batch included)", node)
        dims = [dims] if isinstance(dims, int) else list(dims)
        keep = bool(a[2] if len(a) > 2 else kw.get("keepdim", False))
        if kw.get("dtype") is not None:
            raise _unsupported(f"{kind}(dtype=...)", node)
        self.emit(node, "reduce", [self.as_float(x, node)],
                  attrs={"kind": kind[1:] if kind in ("amax", "amin") else kind,
                         "dims": [self.norm_dim(node, x, d) for d in dims], "keepdim": int(keep)})

    def operands(self, node, roles_values):
        torch = self.torch
        ins, params, attrs = [], {}, {}
        for role, x in roles_values:
            if isinstance(x, (int, float)) and not isinstance(x, bool):
                attrs[f"{role}_scalar"] = float(x)
            elif isinstance(x, bool):
                attrs[f"{role}_scalar"] = 1.0 if x else 0.0
            elif x in self.const:
                params[role] = self.const[x].astype(np.float32)
            elif isinstance(x, torch.fx.Node) and x in self.value:
                ins.append(self.as_float(x, node))
            else:
                raise _unsupported(f"operand {x!r}", node)
        if not ins:
            raise _unsupported("an op on constants only", node)
        return ins, params, attrs

    def where(self, node, cond, x, y):
        ins, params, attrs = self.operands(node, (("cond", cond), ("a", x), ("b", y)))
        self.emit(node, "where", ins, params=params, attrs=attrs)

    def compare(self, node, kind, x, y):
        ins, params, attrs = self.operands(node, (("a", x), ("b", y)))
        attrs["kind"] = kind
        self.emit(node, "compare", ins, params=params, attrs=attrs)

    def cast(self, node, x, target):
        name = self.val(x, node)
        cur = self.dtypes.get(name, "float32")
        if target is None or (target == "float" and cur == "float32") or (target == "long" and cur == "int64"):
            self.alias(node, x)
        elif target == "bool":  # bools are float 0/1 here
            self.emit(node, "compare", [self.as_float(x, node)], attrs={"kind": "ne", "b_scalar": 0.0})
        else:
            to = "float32" if target == "float" else "int64"
            self.emit(node, "cast", [name], attrs={"to": to}, out_dtype=to)

    def size_ref(self, n, node):
        """(value node, torch dim) of x.size(d) / x.size()[d] / x.shape[d]."""
        torch = self.torch
        if isinstance(n, torch.fx.Node):
            if n.op == "call_method" and n.target == "size" and len(n.args) > 1:
                return n.args[0], int(n.args[1])
            if n.op == "call_function" and n.target is operator.getitem and isinstance(n.args[0], torch.fx.Node):
                p = n.args[0]
                if (p.op == "call_method" and p.target == "size" and len(p.args) == 1) or \
                        (p.op == "call_function" and p.target is getattr and p.args[1] == "shape"):
                    return p.args[0], int(n.args[1])
        raise _unsupported("torch.arange whose end is not x.size(d) / x.shape[d]", node)

    def arange(self, node, a, kw):
        if len(a) > 1 and a[0] != 0 or kw.get("start", 0) != 0 or len(a) > 2 or "step" in kw:
            raise _unsupported("torch.arange with a start or step", node)
        x, d = self.size_ref(a[0] if a else kw["end"], node)
        d = self.norm_dim(node, x, d)
        self.expanded.add(node)
        self.emit(node, "positions", [self.val(x, node)], attrs={"dim": d}, out_dtype="int64")

    def sdpa(self, node, a, kw):
        torch = self.torch
        names = ["query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale"]
        args = dict(zip(names, a))
        args.update(kw)
        if args.get("enable_gqa"):
            raise _unsupported("scaled_dot_product_attention(enable_gqa=True)", node)
        q, k, v = args["query"], args["key"], args["value"]
        ranks = {self.rank(q), self.rank(k), self.rank(v)}
        if len(ranks) != 1:
            raise _unsupported("scaled_dot_product_attention with q/k/v of different ranks", node)
        ins = [self.as_float(q, node), self.as_float(k, node), self.as_float(v, node)]
        attrs, params = {}, {}
        if args.get("is_causal"):
            attrs["causal"] = 1
        if args.get("scale") is not None:
            attrs["scale"] = float(args["scale"])
        m = args.get("attn_mask")
        if m is not None:
            if m in self.const:
                mv = self.const[m]
                if self.gm_const_dtype.get(m) == torch.bool:
                    mv = np.where(mv.astype(bool), 0.0, -np.inf).astype(np.float32)
                params["mask"] = mv.astype(np.float32)
                attrs["mask_kind"] = "add"
            else:
                attrs["mask_kind"] = "bool" if _torch_dtype(m) == torch.bool else "add"
                ins.append(self.as_float(m, node))
        self.emit(node, "sdpa", ins, params=params, attrs=attrs)


_TABLES: list = []


def _cmp_tables():
    if _TABLES:
        return _TABLES
    import torch
    fn = {operator.eq: "eq", operator.ne: "ne", operator.lt: "lt", operator.le: "le", operator.gt: "gt",
          operator.ge: "ge", torch.eq: "eq", torch.ne: "ne", torch.lt: "lt", torch.le: "le", torch.gt: "gt",
          torch.ge: "ge"}
    meth = {"eq": "eq", "ne": "ne", "lt": "lt", "le": "le", "gt": "gt", "ge": "ge", "__eq__": "eq", "__ne__": "ne"}
    _TABLES.extend([fn, meth])
    return _TABLES
