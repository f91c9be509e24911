"""ONNX import, the node mappings that need more than one line: MatMul/Gemm, Conv, Gather, Slice,
LSTM/GRU (gate order and the sequence-first layout around them), and positions (Range) used as data."""
from __future__ import annotations

import numpy as np

from ._export_ext import UnsupportedOpError


def _supported():
    from ._onnx import SUPPORTED_ONNX
    return SUPPORTED_ONNX


def _err(node, what):
    return UnsupportedOpError(f"aimass.runtime.from_onnx: node '{node.name or node.output[0]}' (op {node.op_type}): "
                              f"{what}; supported: {_supported()}")


class _OnnxOpsMixin:
    def materialize(self, name):
        """A shape-derived value used as data: positions (Range(0, S)), their embedding lookup, or an
        Unsqueeze(axes=[0]) of either; computed per row (with the batch dim first) by the runtime."""
        prod = self.producer.get(name)
        if prod is None:
            return None
        if prod.op_type == "Range":
            a0, a1 = np.asarray(self.r0[name]), np.asarray(self.r1[name])
            if not (np.array_equal(a0, np.arange(len(a0))) and np.array_equal(a1, np.arange(len(a1)))):
                return None
            for inp, _, _ in self.specs:  # an input whose dim has that length in both runs
                for d in range(1, len(self.shape(inp))):
                    if np.shape(self.r0[inp])[d] == len(a0) and np.shape(self.r1[inp])[d] == len(a1):
                        v = self.emit(prod, "positions", [inp], attrs={"dim": d}, dtype="int64",
                                      out=f"{name}.positions")
                        self.value[name] = v
                        return v
            return None
        if prod.op_type == "Gather" and int(self.attrs_of(prod).get("axis", 0)) == 0:
            table = self.folded(prod.input[0])
            idx = self.value.get(prod.input[1]) or self.materialize(prod.input[1])
            if table is None or table.ndim != 2 or idx is None:
                return None
            v = self.emit(prod, "embedding", [idx], params={"weight": table}, out=f"{name}.embedding")
            self.value[name] = v
            return v
        if prod.op_type == "Unsqueeze":
            src = self.materialize(prod.input[0])
            axes = self.attrs_of(prod).get("axes")
            axes = self.folded(prod.input[1]) if axes is None and len(prod.input) > 1 else axes
            if src is not None and axes is not None and list(np.asarray(axes).reshape(-1)) == [0]:
                self.value[name] = src
                return src
        return None

    def attrs_of(self, node):
        from onnx import helper
        return {a.name: helper.get_attribute_value(a) for a in node.attribute}

    def matmul(self, node, at):
        ins = list(node.input)
        w = self.folded(ins[1])
        if node.op_type == "Gemm":
            if at.get("transA", 0) or w is None:
                raise _err(node, "Gemm with transA or a computed B")
            w = w if at.get("transB", 0) else w.T
            c = self.folded(ins[2]) if len(ins) > 2 and ins[2] else None
            bias = None if c is None else np.broadcast_to(c * at.get("beta", 1.0), (w.shape[0],))
            self.emit(node, "linear", [self.val(node, ins[0], True)],
                      params={"weight": w * at.get("alpha", 1.0), "bias": bias})
        elif w is not None and w.ndim == 2:
            self.emit(node, "linear", [self.val(node, ins[0], True)], params={"weight": w.T})
        else:
            a, b = self.val(node, ins[0], True), self.val(node, ins[1], True)
            if len(self.shape(ins[0])) != len(self.shape(ins[1])):
                raise _err(node, "MatMul of operands with different ranks")
            self.emit(node, "matmul", [a, b])

    def conv(self, node, at):
        ins = list(node.input)
        w = self.folded(ins[1])
        pads = list(at.get("pads", [0] * 4))
        if w is None or w.ndim != 4 or pads[:2] != pads[2:] or at.get("auto_pad", b"NOTSET") not in (b"NOTSET",
                                                                                                    "NOTSET"):
            raise _err(node, "Conv other than 2-D with a constant weight and symmetric explicit pads")
        b = self.folded(ins[2]) if len(ins) > 2 and ins[2] else None
        self.emit(node, "conv2d", [self.val(node, ins[0])], params={"weight": w, "bias": b},
                  attrs={"stride": list(at.get("strides", [1, 1])), "padding": pads[:2],
                         "dilation": list(at.get("dilations", [1, 1])), "groups": int(at.get("group", 1))})

    def gather(self, node, at):
        data, idx = node.input[0], node.input[1]
        axis = int(at.get("axis", 0))
        table, ci = self.folded(data), self.folded(idx)
        if table is not None and axis == 0 and table.ndim == 2:
            self.emit(node, "embedding", [self.val(node, idx)], params={"weight": table})
        elif table is None and ci is not None and ci.ndim == 0:
            rank = len(self.shape(data))
            axis %= rank
            if axis == 0:
                raise _err(node, "Gather along the batch dimension")
            i = int(ci)
            a = {"dim": axis, "start": i}
            if i != -1:
                a["end"] = i + 1
            src = self.val(node, data)
            s = self.emit(node, "slice", [src], attrs=a, dtype=self.dtypes[src], out=f"{node.output[0]}.slice")
            self.emit(node, "reshape", [s], attrs={"shape": self.row_target(node, node.output[0])},
                      dtype=self.dtypes[src])
        else:
            raise _err(node, "Gather other than an embedding lookup or a constant index along a non-batch dim")

    def slice(self, node):
        ins = list(node.input) + [""] * (5 - len(node.input))
        starts, ends = self.folded(ins[1]), self.folded(ins[2])
        axes = self.folded(ins[3]) if ins[3] else None
        steps = self.folded(ins[4]) if ins[4] else None
        if starts is None or ends is None:
            raise _err(node, "Slice bounds that change with the input shape")
        rank = len(self.shape(ins[0]))
        axes = np.arange(len(starts)) if axes is None else axes
        steps = np.ones(len(starts), np.int64) if steps is None else steps
        cur = self.val(node, ins[0])
        dt = self.dtypes[cur]
        for j, (s, e, ax, st) in enumerate(zip(starts, ends, axes, steps)):
            ax = int(ax) % rank
            if ax == 0 or st < 1:
                raise _err(node, "Slice of the batch dimension or with a negative step")
            a = {"dim": ax, "start": int(max(min(s, 2 ** 62), -2 ** 62)), "step": int(st)}
            if e < 2 ** 62:
                a["end"] = int(max(e, -2 ** 62))
            last = j == len(starts) - 1
            cur = self.emit(node, "slice", [cur], attrs=a, dtype=dt, out=None if last else f"{node.output[0]}.{j}")

    def split(self, node, at):
        """Split along a non-batch dim: one slice per output, the sizes read from the probe runs."""
        rank = len(self.shape(node.input[0]))
        axis = int(at.get("axis", 0)) % rank
        if axis == 0 or any(axis in self.dyn(o) for o in node.output if o):
            raise _err(node, "Split along the batch dimension or the sequence length")
        src = self.val(node, node.input[0])
        start = 0
        for o in node.output:
            size = self.shape(o)[axis]
            if o:
                v = self.emit(node, "slice", [src], attrs={"dim": axis, "start": start, "end": start + size},
                              dtype=self.dtypes[src], out=o)
                self.check_batched(node, o)
                self.value[o] = v
            start += size

    def rnn(self, node, at):
        ins, kind = list(node.input) + [""] * 8, node.op_type.lower()
        direction = at.get("direction", b"forward")
        direction = direction.decode() if isinstance(direction, bytes) else direction
        if direction not in ("forward", "bidirectional") or at.get("layout", 0):
            raise _err(node, "a reverse-only RNN or layout=1")
        if ins[4] or ins[5] and (ins[5] not in self.shape_derived or np.any(self.r0[ins[5]])) or any(
                o and o in {i for n in self.model.graph.node for i in n.input} for o in node.output[1:]):
            raise _err(node, "sequence_lens, an initial state or the Y_h/Y_c outputs")
        if kind == "gru" and not at.get("linear_before_reset", 0):
            raise _err(node, "GRU with linear_before_reset=0 (torch's GRU has 1)")
        if ins[0] not in self.time_major:
            raise _err(node, "an RNN input that is not the transposed [batch, seq, features] value")
        w, r = self.folded(ins[1]), self.folded(ins[2])
        b = self.folded(ins[3]) if ins[3] else None
        if w is None or r is None or (ins[3] and b is None):
            raise _err(node, "RNN weights computed from the input (they must be initializers)")
        h = int(at["hidden_size"])
        order = [0, 2, 3, 1] if kind == "lstm" else [1, 0, 2]  # ONNX iofc -> torch ifgo; zrh -> rzn

        def reorder(m):
            return np.concatenate([m[g * h:(g + 1) * h] for g in order])
        params = {}
        ndir = 2 if direction == "bidirectional" else 1
        for d, sfx in enumerate(("", "_reverse")[:ndir]):  # ONNX: direction 0 forward, 1 reverse
            params[f"w_ih_l0{sfx}"], params[f"w_hh_l0{sfx}"] = reorder(w[d]), reorder(r[d])
            if b is not None:
                bd = b[d]
                params[f"b_ih_l0{sfx}"], params[f"b_hh_l0{sfx}"] = reorder(bd[:len(bd) // 2]), reorder(bd[len(bd) // 2:])
        attrs = {"hidden_size": h, "num_layers": 1}
        if ndir == 2:
            attrs["bidirectional"] = 1
        name = self.emit(node, kind, [self.time_major[ins[0]]], params=params, attrs=attrs,
                         out=f"{node.output[0]}.bm")
        if ndir == 2:
            self.bidir_y[node.output[0]] = name
        else:
            self.time_major[node.output[0]] = name
