"""Graph passes of the exporter: the hand-written attention pattern (q @ k^T, scale, mask, softmax,
@ v, with the view/transpose head split and merge) fused into one sdpa node, dead-node removal."""
from __future__ import annotations

from typing import Dict

import numpy as np

from ._export_ext import UnsupportedOpError


class _FuseMixin:
    def fuse_attention(self):
        """softmax(q @ k^T (/ c | * c) (+ mask), dim=-1) @ v written out by hand -> one sdpa node."""
        by_out = {n["outputs"][0]: n for n in self.nodes}
        uses: Dict[str, int] = {}
        for n in self.nodes:
            for i in n["inputs"]:
                uses[i] = uses.get(i, 0) + 1
        fx_of = {self.value[k]: k for k in self.value}
        drop = set()
        for n in self.nodes:
            if n["op"] != "matmul" or n["attrs"].get("trans_b"):
                continue
            sm = by_out.get(n["inputs"][0])
            if sm is None or sm["op"] != "softmax" or uses.get(sm["outputs"][0]) != 1:
                continue
            rank = len(self.meta_shape(fx_of[sm["outputs"][0]])) if sm["outputs"][0] in fx_of else -1
            if sm["attrs"].get("dim") != rank - 1:
                continue
            chain, cur, scale, mask = [sm], by_out.get(sm["inputs"][0]), 1.0, None
            if cur is not None and cur["op"] == "add" and len(cur["inputs"]) in (1, 2) and not any(
                    k.endswith("_scalar") for k in cur["attrs"]) and uses.get(cur["outputs"][0]) == 1:
                if len(cur["inputs"]) == 2:
                    mask = ("input", cur["inputs"][1])
                    nxt = cur["inputs"][0]
                elif "b" in cur["params"]:
                    mask, nxt = ("param", cur["params"]["b"]), cur["inputs"][0]
                else:
                    continue
                chain.append(cur)
                cur = by_out.get(nxt)
            if cur is not None and cur["op"] in ("div", "mul") and set(cur["attrs"]) == {"b_scalar"} and \
                    not cur["params"] and uses.get(cur["outputs"][0]) == 1:
                c = cur["attrs"]["b_scalar"]
                scale = 1.0 / c if cur["op"] == "div" else c
                chain.append(cur)
                cur = by_out.get(cur["inputs"][0])
            if cur is None or cur["op"] != "matmul" or not cur["attrs"].get("trans_b") or \
                    uses.get(cur["outputs"][0]) != 1:
                continue
            q, k, v = cur["inputs"][0], cur["inputs"][1], n["inputs"][1]
            shapes = [self.meta_shape(fx_of[x]) if x in fx_of else None for x in (q, k, v)]
            if any(sh is None for sh in shapes) or len({len(sh) for sh in shapes}) != 1 or \
                    len({tuple(sh[1:-2]) for sh in shapes}) != 1:
                continue  # q/k/v leading dims must agree (no broadcasting in the fused kernel)
            chain.append(cur)
            attrs = {"scale": float(scale)}
            ins = [q, k, v]
            params = {}
            if mask is not None:
                attrs["mask_kind"] = "add"
                if mask[0] == "input":
                    ins.append(mask[1])
                else:
                    params["mask"] = mask[1]
            n.update({"op": "sdpa", "inputs": ins, "params": params, "attrs": attrs})
            drop.update(x["outputs"][0] for x in chain)
            self.fuse_head_split(n, by_out, uses, drop)
        if drop:
            self.nodes = [n for n in self.nodes if n["outputs"][0] not in drop]

    def fuse_head_split(self, n, by_out, uses, drop):
        """q/k/v = x.view(B, S, H, D).transpose(1, 2) and out.transpose(1, 2): read and write the
        [S, H*D] rows in place (sdpa heads=H) instead of copying each head out and back."""
        srcs, heads = [], None
        for x in n["inputs"][:3]:
            pm = by_out.get(x)
            rs = by_out.get(pm["inputs"][0]) if pm is not None and pm["op"] == "permute" else None
            if rs is None or pm["attrs"]["perm"] != [0, 2, 1, 3] or rs["op"] != "reshape" or uses.get(x) != 1 or \
                    uses.get(rs["outputs"][0]) != 1 or len(rs["attrs"]["shape"]) != 3:
                return
            h = rs["attrs"]["shape"][1]
            if heads not in (None, h) or h < 1:
                return
            heads = h
            srcs.append((pm, rs))
        consumers = [c for c in self.nodes if n["outputs"][0] in c["inputs"]]
        if len(consumers) != 1 or consumers[0]["op"] != "permute" or consumers[0]["attrs"]["perm"] != [0, 2, 1, 3]:
            return
        # (a mask broadcasts against [B, H, Sq, Sk] in both layouts)
        for pm, rs in srcs:
            drop.update((pm["outputs"][0], rs["outputs"][0]))
        n["inputs"] = [rs["inputs"][0] for _, rs in srcs] + n["inputs"][3:]
        n["attrs"]["heads"] = heads
        back = consumers[0]  # [S, H*Dv] rows seen as [S, H, Dv], as the permute produced them
        back.update({"op": "reshape", "attrs": {"shape": [-1, heads, 0]}})
        back["attrs"]["shape"] = self.head_row(back, heads)

    def head_row(self, node, heads):
        fx = {self.value[k]: k for k in self.value}.get(node["outputs"][0])
        row = self.row_target(fx, self.meta_shape(fx)) if fx is not None else None
        if row is None or len(row) != 3:
            raise UnsupportedOpError(f"aimass.runtime.export: cannot fuse the head merge at {node['name']}")
        return row

    def fuse_qkv(self):
        """Self-attention whose q, k and v are three Linear layers of the same input (a BERT block
        written by hand) -> one Linear [3E, in] feeding the fused attention's packed layout (sdpa
        packed=1): the input is read (and, int8, quantized) once, one wider GEMM instead of three.
        Per-output-channel weights, scales and biases concatenate exactly; int4 groups run along K,
        so they concatenate too."""
        by_out = {n["outputs"][0]: n for n in self.nodes}
        uses: Dict[str, int] = {}
        for n in self.nodes:
            for i in n["inputs"]:
                uses[i] = uses.get(i, 0) + 1
        drop = set()
        for n in self.nodes:
            if n["op"] != "sdpa" or not n["attrs"].get("heads") or n["attrs"].get("packed") or len(n["inputs"]) < 3:
                continue
            lin = [by_out.get(x) for x in n["inputs"][:3]]
            if any(li is None or li["op"] != "linear" or uses.get(li["outputs"][0]) != 1 for li in lin) or \
                    len({li["inputs"][0] for li in lin}) != 1 or len({li["outputs"][0] for li in lin}) != 3 or \
                    len({tuple(sorted(li["attrs"].items())) for li in lin}) != 1 or \
                    len({tuple(sorted(k for k in li["params"] if k != "bias")) for li in lin}) != 1:
                continue
            ws = [self.tensors[li["params"]["weight"]] for li in lin]
            if len({w.shape for w in ws}) != 1 or len({w.dtype for w in ws}) != 1:
                continue
            merged = {role: np.concatenate([self.tensors[li["params"][role]] for li in lin])
                      for role in lin[0]["params"] if role != "bias"}
            if any("bias" in li["params"] for li in lin):
                rows = ws[0].shape[0]
                merged["bias"] = np.concatenate([self.tensors[li["params"]["bias"]] if "bias" in li["params"]
                                                 else np.zeros(rows, np.float32) for li in lin])
            q = lin[0]
            for role, arr in merged.items():
                tname = f"{q['name']}.qkv.{role}"
                self.tensors[tname] = np.ascontiguousarray(arr)
                q["params"][role] = tname
            drop.update(li["outputs"][0] for li in lin[1:])
            n["inputs"] = [q["outputs"][0]] + n["inputs"][3:]
            n["attrs"]["packed"] = 1
        if drop:
            self.nodes = [n for n in self.nodes if n["outputs"][0] not in drop]

    def drop_dead_nodes(self):
        """Removes nodes nothing reads (e.g. a transpose folded into matmul's trans_b)."""
        outs = {o["name"] for o in self.outputs}
        while True:
            used = set(outs)
            for n in self.nodes:
                used.update(n["inputs"])
            keep = [n for n in self.nodes if n["outputs"][0] in used or n["op"] == "identity"]
            if len(keep) == len(self.nodes):
                break
            self.nodes = keep
        live = {p for n in self.nodes for p in n["params"].values()}
        self.tensors = {k: v for k, v in self.tensors.items() if k in live}
