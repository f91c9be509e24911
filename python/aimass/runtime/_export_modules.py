"""Export of the attention, encoder and recurrent modules (kept whole by the tracer) from their
parameters: self-attention as one q/k/v Linear + one fused sdpa node, encoder layers pre/post-norm."""
from __future__ import annotations

import numpy as np

from ._export_ext import _torch_dtype, _unsupported


class _ModuleMixin:
    # -- modules
    def ext_call_module(self, node, mod) -> bool:
        nn = self.torch.nn
        a, kw = list(node.args), dict(node.kwargs)

        def arg(i, key, default=None):
            return a[i] if len(a) > i else kw.get(key, default)

        if isinstance(mod, nn.MultiheadAttention):
            q, k, v = arg(0, "query"), arg(1, "key"), arg(2, "value")
            if arg(7, "is_causal", False) and arg(5, "attn_mask") is None:
                raise _unsupported("MultiheadAttention(is_causal=True) without attn_mask", node)
            out = self.emit_mha(node.name, mod, q, k, v, arg(3, "key_padding_mask"), arg(5, "attn_mask"), node)
            self.set_value(node, out)
        elif isinstance(mod, nn.TransformerEncoderLayer):
            out = self.emit_encoder_layer(node.name, mod, self.val(arg(0, "src"), node), arg(1, "src_mask"),
                                          arg(2, "src_key_padding_mask"), node)
            self.set_value(node, out)
        elif isinstance(mod, nn.TransformerEncoder):
            x = self.val(arg(0, "src"), node)
            mask, kp = arg(1, "mask"), arg(2, "src_key_padding_mask")
            for i, layer in enumerate(mod.layers):
                x = self.emit_encoder_layer(f"{node.name}.{i}", layer, x, mask, kp, node)
            if mod.norm is not None:
                x = self.norm_raw(f"{node.name}.norm", x, mod.norm)
            if kp is not None and getattr(mod, "use_nested_tensor", False):
                # torch's eval fast path runs padded batches as nested tensors: padded positions come out 0
                kpf = self.as_float(kp, node)
                kp3 = self.emit_raw(f"{node.name}.kp3", "reshape", [kpf], attrs={"shape": [-1, 1]})
                x = self.emit_raw(f"{node.name}.zero_pad", "where", [kp3, x], attrs={"a_scalar": 0.0})
            self.set_value(node, x)
        elif isinstance(mod, (nn.LSTM, nn.GRU)):
            kind = "lstm" if isinstance(mod, nn.LSTM) else "gru"
            if not mod.batch_first or getattr(mod, "proj_size", 0):
                raise _unsupported(f"{type(mod).__name__} with batch_first=False or proj_size", node)
            if arg(1, "hx") is not None:
                raise _unsupported(f"{type(mod).__name__} with an initial state", node)
            from ._export import _np
            params = {}
            for l in range(mod.num_layers):
                for sfx in ("", "_reverse") if mod.bidirectional else ("",):
                    for role in ("w_ih", "w_hh", "b_ih", "b_hh"):
                        t = getattr(mod, f"{'weight' if role[0] == 'w' else 'bias'}_{role[2:]}_l{l}{sfx}", None)
                        if t is not None:
                            params[f"{role}_l{l}{sfx}"] = _np(t)
            attrs = {"hidden_size": int(mod.hidden_size), "num_layers": int(mod.num_layers)}
            if mod.bidirectional:
                attrs["bidirectional"] = 1
            self.set_value(node, self.emit_raw(node.name, kind, [self.val(a[0], node)], params=params, attrs=attrs))
        else:
            return False
        return True

    def emit_mha(self, base, mha, q, k, v, key_padding, attn_mask, node) -> str:
        from ._export import _np
        torch = self.torch
        if not mha.batch_first:
            raise _unsupported("MultiheadAttention(batch_first=False): the runtime batches along dim 0", node)
        if mha.bias_k is not None or mha.add_zero_attn:
            raise _unsupported("MultiheadAttention with add_bias_kv or add_zero_attn", node)
        E, H = int(mha.embed_dim), int(mha.num_heads)
        bias = _np(mha.in_proj_bias) if mha.in_proj_bias is not None else None
        bq = bk = bv = None
        if bias is not None:
            bq, bk, bv = bias[:E], bias[E:2 * E], bias[2 * E:]
        attrs = {"heads": H}
        if mha._qkv_same_embed_dim:
            w = _np(mha.in_proj_weight)
            wq, wk, wv = w[:E], w[E:2 * E], w[2 * E:]
        else:
            wq, wk, wv = _np(mha.q_proj_weight), _np(mha.k_proj_weight), _np(mha.v_proj_weight)
        qn = q if isinstance(q, str) else self.val(q, node)
        kn = k if isinstance(k, str) else self.val(k, node)
        vn = v if isinstance(v, str) else self.val(v, node)
        if qn == kn == vn:  # self-attention: one GEMM for q, k and v
            ins = [self.linear_raw(f"{base}.qkv", qn, np.concatenate([wq, wk, wv]),
                                   None if bias is None else np.concatenate([bq, bk, bv]))]
            attrs["packed"] = 1
        else:
            ins = [self.linear_raw(f"{base}.q", qn, wq, bq), self.linear_raw(f"{base}.k", kn, wk, bk),
                   self.linear_raw(f"{base}.v", vn, wv, bv)]
        params = {}
        if attn_mask is not None:
            if attn_mask in self.const:
                m = self.const[attn_mask]
                src_dtype = self.gm_const_dtype.get(attn_mask)
                if src_dtype == torch.bool or m.dtype == np.bool_:
                    m = np.where(m.astype(bool), -np.inf, 0.0).astype(np.float32)
                sq = m.shape[-1]
                causal = np.triu(np.full((m.shape[-2], sq), -np.inf, dtype=np.float32), 1)
                if m.ndim == 2 and m.shape[0] == sq and np.array_equal(m, causal):
                    attrs["causal"] = 1
                else:
                    params["mask"] = m.astype(np.float32)
                    attrs["mask_kind"] = "add"
            else:
                if _torch_dtype(attn_mask) == torch.bool:  # True = masked: flip to sdpa's True = attend
                    mn = self.emit_raw(f"{base}.attn_keep", "compare", [self.as_float(attn_mask, node)],
                                       attrs={"kind": "eq", "b_scalar": 0.0})
                    attrs["mask_kind"] = "bool"
                else:
                    mn = self.as_float(attn_mask, node)
                    attrs["mask_kind"] = "add"
                ins.append(mn)
        if key_padding is not None:
            if "mask_kind" in attrs:
                raise _unsupported("MultiheadAttention with both key_padding_mask and a non-causal attn_mask", node)
            kpn = self.as_float(key_padding, node)
            if _torch_dtype(key_padding) == torch.bool:
                attrs["mask_kind"] = "key_padding"
            else:  # additive float mask per key
                kpn = self.emit_raw(f"{base}.kp_add", "reshape", [kpn], attrs={"shape": [1, 1, -1]})
                attrs["mask_kind"] = "add"
            ins.append(kpn)
        att = self.emit_raw(f"{base}.sdpa", "sdpa", ins, params=params, attrs=attrs)
        o = mha.out_proj
        return self.linear_raw(f"{base}.out_proj", att, _np(o.weight), _np(o.bias) if o.bias is not None else None)

    def emit_encoder_layer(self, base, layer, x, mask, kp, node) -> str:
        from ._export import _np
        F, nn = self.torch.nn.functional, self.torch.nn
        act = layer.activation
        if act is F.relu or isinstance(act, nn.ReLU):
            kind = "relu"
        elif act is F.gelu:
            kind = "gelu"
        elif isinstance(act, nn.GELU):
            kind = "gelu_tanh" if act.approximate == "tanh" else "gelu"
        else:
            raise _unsupported(f"TransformerEncoderLayer activation {act!r}", node)

        def sa(h, tag):
            return self.emit_mha(f"{base}.{tag}", layer.self_attn, h, h, h, kp, mask, node)

        def ff(h):
            l1, l2 = layer.linear1, layer.linear2
            h = self.linear_raw(f"{base}.linear1", h, _np(l1.weight), _np(l1.bias) if l1.bias is not None else None,
                                activation=kind)
            return self.linear_raw(f"{base}.linear2", h, _np(l2.weight), _np(l2.bias) if l2.bias is not None else None)

        def add(a, b, tag):
            return self.emit_raw(f"{base}.{tag}", "add", [a, b])

        if layer.norm_first:
            x = add(x, sa(self.norm_raw(f"{base}.norm1", x, layer.norm1), "sa"), "res1")
            return add(x, ff(self.norm_raw(f"{base}.norm2", x, layer.norm2)), "res2")
        x = self.norm_raw(f"{base}.norm1", add(x, sa(x, "sa"), "res1"), layer.norm1)
        return self.norm_raw(f"{base}.norm2", add(x, ff(x), "res2"), layer.norm2)
