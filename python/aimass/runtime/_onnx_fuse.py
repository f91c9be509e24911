"""Subgraph patterns of from_onnx: what torch.onnx.export writes for a GELU at opsets without a Gelu op
(x * 0.5 * (1 + Erf(x / sqrt 2)), in either product order) and for nn.MultiheadAttention (also inside
nn.TransformerEncoderLayer): a sequence-first packed in-projection, the batch folded into the head
dim, two MatMuls around a Softmax and the out-projection. Each is matched by structure, mapped to
the runtime's ops (activation gelu; linear -> sdpa(packed, heads) -> linear) and, for attention,
checked against the values onnxruntime computed for the same subgraph in the probe runs: a
subgraph that looks like attention but computes something else is reported, never mis-mapped."""
from __future__ import annotations

import math

import numpy as np

from ._onnx_ops import _err

_SQRT2 = math.sqrt(2.0)
# Ops an exported attention block is made of (besides shape arithmetic on constants).
_MHA_OPS = {"Add", "Mul", "Div", "Reshape", "Unsqueeze", "Squeeze", "Transpose", "Gather", "Softmax", "MatMul",
            "Gemm", "Slice", "Split", "Identity", "Cast", "Sqrt"}


class _OnnxFuseMixin:
    def consumers(self, name):
        if not hasattr(self, "_consumers"):
            self._consumers = {}
            for n in self.model.graph.node:
                for i in n.input:
                    self._consumers.setdefault(i, []).append(n)
        return self._consumers.get(name, [])

    def shape_only(self):
        """Every value computed from constants and input shapes only (the run loop learns the same set
        node by node; a pattern needs it ahead)."""
        if not hasattr(self, "_shape_only"):
            self._shape_only = set()
            for n in self.model.graph.node:
                if n.op_type in ("Shape", "Size") or all(i in self.const or i in self._shape_only
                                                         for i in n.input if i):
                    self._shape_only.update(o for o in n.output if o)
        return self._shape_only

    def _scalar(self, name):
        c = self.folded(name)
        return None if c is None or c.size != 1 else float(c.reshape(-1)[0])

    def _other(self, node, name):
        """The input of a binary node that is not `name` (None when both or neither are)."""
        a, b = node.input[0], node.input[1]
        return b if a == name and b != name else a if b == name and a != name else None

    # -- GELU written with Erf
    def erf_gelu(self, node):
        """Erf(x / sqrt2) (or x * 1/sqrt2) -> + 1 -> * x -> * 0.5 (or 0.5 x * (..)): map to activation gelu."""
        src = self.producer.get(node.input[0])
        x = None
        if src is not None and src.op_type in ("Div", "Mul") and len(src.input) == 2:
            for a, c in ((src.input[0], src.input[1]), (src.input[1], src.input[0])):
                s = self._scalar(c)
                if s is not None and (src.op_type == "Div" and abs(s - _SQRT2) < 1e-4 and a == src.input[0]
                                      or src.op_type == "Mul" and abs(s - 1 / _SQRT2) < 1e-4):
                    x = a
        if x is None:
            raise _err(node, "op type Erf outside the GELU pattern x * 0.5 * (1 + erf(x / sqrt(2)))")
        cons = self.consumers(node.output[0])
        add = cons[0] if len(cons) == 1 and cons[0].op_type == "Add" else None
        if add is None or self._scalar(self._other(add, node.output[0]) or "") != 1.0:
            raise _err(node, "op type Erf outside the GELU pattern (no + 1 after it)")
        cons = self.consumers(add.output[0])
        mul = cons[0] if len(cons) == 1 and cons[0].op_type == "Mul" else None
        other = mul and self._other(mul, add.output[0])
        skip = [add, mul]
        if other == x:  # (x * (1 + erf)) * 0.5
            cons = self.consumers(mul.output[0])
            last = cons[0] if len(cons) == 1 and cons[0].op_type == "Mul" else None
            if last is None or self._scalar(self._other(last, mul.output[0]) or "") != 0.5:
                raise _err(node, "op type Erf outside the GELU pattern (no * 0.5)")
            skip.append(last)
        elif other is not None and self.producer.get(other) is not None:  # (x * 0.5) * (1 + erf)
            half = self.producer[other]
            if half.op_type != "Mul" or self._other(half, x) is None or self._scalar(self._other(half, x)) != 0.5:
                raise _err(node, "op type Erf outside the GELU pattern (no 0.5 * x)")
            last = mul
        else:
            raise _err(node, "op type Erf outside the GELU pattern (no * x)")
        self.emit(last, "activation", [self.val(node, x)], attrs={"kind": "gelu"})
        self.skip.update(id(n) for n in skip)

    # -- nn.MultiheadAttention
    def try_mha(self, node):
        """node: MatMul(x_seq_first, W_in [E, 3E]). Returns True when the attention block was mapped."""
        w_in = self.folded(node.input[1])
        if node.op_type != "MatMul" or w_in is None or w_in.ndim != 2 or w_in.shape[1] != 3 * w_in.shape[0]:
            return False
        E = w_in.shape[0]
        region, frontier, end = {id(node): node}, [node.output[0]], None
        while frontier:
            name = frontier.pop()
            for c in self.consumers(name):
                if id(c) in region or c.op_type in ("Shape", "Size"):
                    continue
                if c.op_type not in _MHA_OPS or len(region) > 120:
                    return False
                region[id(c)] = c
                out = c.output[0]
                shp = np.shape(self.r0.get(out))
                # back to batch-major [B, S, E]: Transpose(perm 1,0,2) of the sequence-first result
                if c.op_type == "Transpose" and list(self.attrs_of(c).get("perm", [])) == [1, 0, 2] and \
                        len(shp) == 3 and shp[2] == E and shp[0] == 2:
                    if end is not None:
                        return False
                    end = c
                    continue
                frontier.append(out)
        if end is None:
            return False
        nodes = list(region.values())
        # every value read inside comes from inside, from constants / shape arithmetic, or is x itself;
        # the one exception is a mask added to the scores (key_padding_mask / attn_mask), traced below
        inside = {o for n in nodes for o in n.output}
        mm_out = {n.output[0] for n in nodes if n.op_type == "MatMul"}
        mask_add = [n for n in nodes if n.op_type == "Add" and len(n.input) == 2 and
                    (n.input[0] in mm_out) != (n.input[1] in mm_out) and
                    any(self.consumers(n.output[0])) and
                    all(c.op_type == "Softmax" for c in self.consumers(n.output[0]))]
        mask_in = self._other(mask_add[0], next(i for i in mask_add[0].input if i in mm_out)) \
            if len(mask_add) == 1 else None
        for n in nodes:
            for i in n.input:
                if i and i not in inside and i != node.input[0] and i != mask_in and \
                        i not in self.shape_only() and self.folded(i) is None:
                    return False
        for n in nodes:  # and nothing outside reads an intermediate value
            if n is not end and any(id(c) not in region and c.op_type not in ("Shape", "Size")
                                    for o in n.output for c in self.consumers(o)):
                return False
        mm = [n for n in nodes if n.op_type == "MatMul" and n is not node]
        sm = [n for n in nodes if n.op_type == "Softmax"]
        outp = [n for n in nodes if n.op_type == "Gemm" or n.op_type == "MatMul" and self.folded(n.input[1]) is not None
                and n is not node]
        bias_add = [n for n in self.consumers(node.output[0]) if n.op_type == "Add"]
        if len(sm) != 1 or len(outp) != 1 or len(bias_add) != 1:
            return False
        b_in = self.folded(self._other(bias_add[0], node.output[0]) or "")
        scores = self.shape(sm[0].output[0])  # [B, H, S, S] or [B*H, S, S]
        H = scores[1] if len(scores) == 4 else scores[0] // 2
        if len([n for n in mm if self.folded(n.input[1]) is None]) != 2 or H < 1 or E % H:
            return False
        o = outp[0]
        at = self.attrs_of(o)
        w_out = self.folded(o.input[1])
        if o.op_type == "Gemm":
            if at.get("transA", 0):
                return False
            w_out = (w_out if at.get("transB", 0) else w_out.T) * at.get("alpha", 1.0)
            c = self.folded(o.input[2]) if len(o.input) > 2 and o.input[2] else None
            b_out = None if c is None else np.broadcast_to(c * at.get("beta", 1.0), (E,))
        else:
            w_out = w_out.T
            adds = [n for n in self.consumers(o.output[0]) if n.op_type == "Add" and id(n) in region]
            b_out = self.folded(self._other(adds[0], o.output[0]) or "") if adds else None
        if w_out.shape != (E, E) or b_in is None or b_in.size != 3 * E:
            return False
        # check the mapping against onnxruntime's own values for this subgraph (probe run 0)
        x = np.transpose(np.asarray(self.r0[node.input[0]], np.float64), (1, 0, 2))  # [B, S, E]
        B, S, _ = x.shape
        D = E // H
        mask = None
        if mask_in is not None:
            mask = self._mha_mask(mask_in, B, H, S)
            if mask is None:
                raise _err(node, "an attention block whose mask is neither a key padding mask input ([batch, seq], "
                                 "bool or additive) nor an attn_mask stored in the model (both together, or a "
                                 "per-row 3-D attn_mask, are not mapped)")
        qkv = x @ w_in.astype(np.float64) + b_in.reshape(-1)
        q, k, v = (qkv[..., i * E:(i + 1) * E].reshape(B, S, H, D).transpose(0, 2, 1, 3) for i in range(3))
        s = q @ k.transpose(0, 1, 3, 2) / math.sqrt(D)
        if mask is not None:
            s = s + mask[0]
        with np.errstate(invalid="ignore"):  # a row with every key masked is NaN, as in onnxruntime
            p = np.exp(s - s.max(-1, keepdims=True))
            a = ((p / p.sum(-1, keepdims=True)) @ v).transpose(0, 2, 1, 3).reshape(B, S, E)
        y = a @ w_out.T.astype(np.float64) + (0 if b_out is None else b_out)
        got = np.asarray(self.r0[end.output[0]], np.float64)
        if got.shape != y.shape or not np.allclose(got, y, rtol=1e-3, atol=1e-4, equal_nan=True):
            raise _err(node, "an attention block (packed in-projection, softmax, out-projection) that does not "
                             "compute plain multi-head attention (a different scale or mask?)")
        src = self.time_major[node.input[0]]
        qkv_v = self.emit(node, "linear", [src], params={"weight": w_in.T, "bias": b_in.reshape(-1)},
                          out=f"{node.output[0]}.qkv")
        ins, params, attrs = [qkv_v], None, {"heads": int(H), "packed": 1}
        if mask is not None:
            _, kind, mv, chain = mask
            attrs["mask_kind"] = kind
            if isinstance(mv, np.ndarray):
                params = {"mask": mv}
            else:
                ins.append(mv)
            self.skip.update(id(n) for n in chain)
        att = self.emit(node, "sdpa", ins, params=params, attrs=attrs, out=f"{node.output[0]}.attn")
        self.emit(end, "linear", [att], params={"weight": w_out, "bias": b_out})
        self.skip.update(region)
        return True

    def _mha_mask(self, name, B, H, S):
        """The value torch adds to an exported attention block's scores ([B*H, 1|S, S] after the head
        fold): a constant (attn_mask) or a chain of layout ops (Reshape/Expand/Unsqueeze/Cast/Where on
        constants/Not) from a batch-first value already mapped (key_padding_mask, or its -inf/0 float
        form). Returns (the additive mask [B, H|1, S|1, S] for the check, mask_kind, the runtime value
        or the constant, the chain nodes to skip) or None when it is neither."""
        m0 = self.r0.get(name)
        if m0 is None or np.ndim(m0) not in (2, 3, 4):
            return None
        m0 = np.asarray(m0, np.float64)
        if m0.ndim == 3 and m0.shape[0] == B * H:
            m0 = m0.reshape(B, H, *m0.shape[1:])
        try:
            full = np.broadcast_to(m0, (B, H, S, S))
        except ValueError:
            return None
        const = self.folded(name)
        if const is not None:  # an attn_mask of the model: [S, S] (or [1, S, S]) for every row
            if full.shape != (B, H, S, S) or not (full == full[:1, :1]).all():
                return None
            return full, "add", np.ascontiguousarray(full[0, 0], np.float32), []
        chain, cur = [], name
        while cur not in self.value:
            prod = self.producer.get(cur)
            if prod is None or prod.op_type not in ("Reshape", "Expand", "Unsqueeze", "Squeeze", "Cast", "Where",
                                                    "Not", "Identity"):
                return None
            data = [i for i in prod.input if i and i not in self.shape_only() and self.folded(i) is None]
            if len(data) != 1 or prod.op_type == "Where" and data[0] != prod.input[0]:
                return None
            chain.append(prod)
            cur = data[0]
        src0 = np.asarray(self.r0[cur], np.float64)
        if src0.shape != (B, S) or cur not in self.value:
            return None
        node = chain[-1] if chain else self.producer.get(name)
        ninf = np.where(src0 != 0, -np.inf, 0.0)[:, None, None, :]
        if np.isin(src0, (0.0, 1.0)).all() and np.array_equal(full, np.broadcast_to(ninf, full.shape)):
            return ninf, "key_padding", self.val(node, cur, float_only=True), chain
        if np.array_equal(full, np.broadcast_to(src0[:, None, None, :], full.shape)):
            v = self.emit(node, "reshape", [self.val(node, cur, float_only=True)], attrs={"shape": [1, 1, -1]},
                          out=f"{name}.mask")
            return src0[:, None, None, :], "add", v, chain
        return None
