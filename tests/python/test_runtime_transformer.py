"""Transformer encoders through the runtime: nn.TransformerEncoder(Layer) pre/post-norm with padding
masks, nn.MultiheadAttention, F.scaled_dot_product_attention (mask, causal), a hand-written BERT
block, a dynamic sequence length, the tensor ops they use, and int8/int4 Linear layers."""
import json
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import aimass.runtime as rt  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from aimass.runtime import zoo  # noqa: E402

from _rt_util import check_session, close  # noqa: E402

LENS = (9, 4, 17)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def padded(n, d=32):
    x = torch.randn(2, n, d)
    kp = torch.zeros(2, n, dtype=torch.bool)
    kp[1, n // 2 + 1:] = True
    return x, kp


class Enc(nn.Module):
    def __init__(self, norm_first, act, final_norm=False):
        super().__init__()
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.1, activation=act, batch_first=True,
                                           norm_first=norm_first)
        self.e = nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(32) if final_norm else None,
                                       enable_nested_tensor=not norm_first)

    def forward(self, x, kp):
        return self.e(x, src_key_padding_mask=kp)


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("act", ["relu", "gelu"])
def test_transformer_encoder_padding_mask(tmp_path, norm_first, act):
    check_session(tmp_path, Enc(norm_first, act, final_norm=norm_first), padded, LENS, dynamic_seq=True)


def test_encoder_layer_alone_and_causal_mask(tmp_path):
    layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True).eval()
    check_session(tmp_path, layer, lambda n: (torch.randn(2, n, 32),), LENS, dynamic_seq=True)

    class Causal(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True, activation="gelu")
            self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(9))

        def forward(self, x):
            return self.l(x, src_mask=self.mask, is_causal=True)
    # the square causal mask becomes the kernel's causal flag, so any length runs
    check_session(tmp_path, Causal(), lambda n: (torch.randn(2, 9, 32),), (9,), name="causal")
    path = tmp_path / "causal.aimass"
    graph = rt.load(path).metadata["aimass.graph"]
    assert '"causal":1' in graph


def test_multihead_attention_self_and_cross(tmp_path):
    mha = nn.MultiheadAttention(32, 4, batch_first=True).eval()

    class Self(nn.Module):
        def __init__(self):
            super().__init__()
            self.m = mha

        def forward(self, x, kp):
            return self.m(x, x, x, key_padding_mask=kp, need_weights=False)[0]
    check_session(tmp_path, Self(), padded, LENS, dynamic_seq=True, name="self")
    graph = rt.load(tmp_path / "self.aimass").metadata["aimass.graph"]
    assert '"packed":1' in graph  # q, k, v from one GEMM
    check_session(tmp_path, mha, lambda n: tuple(torch.randn(2, n, 32) for _ in range(3)), LENS,
                  dynamic_seq=True, name="cross")


def test_sdpa_causal_and_masks(tmp_path):
    class Causal(nn.Module):
        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                  is_causal=True).transpose(1, 2)
    check_session(tmp_path, Causal(), lambda n: tuple(torch.randn(2, n, 4, 8) for _ in range(3)), LENS,
                  dynamic_seq=True, name="c")

    class Masked(nn.Module):
        def forward(self, q, k, v, m):
            keep = m[:, None, None, :] > 0
            add = (1.0 - m[:, None, None, :]) * -1e4
            return (F.scaled_dot_product_attention(q, k, v, attn_mask=keep),
                    F.scaled_dot_product_attention(q, k, v, attn_mask=add, scale=0.3))

    def inputs(n):
        m = (torch.arange(n)[None].repeat(2, 1) < torch.tensor([[n], [n // 2 + 1]])).float()
        return tuple(torch.randn(2, 3, n, 8) for _ in range(3)) + (m,)
    check_session(tmp_path, Masked(), inputs, LENS, dynamic_seq={0: 2, 1: 2, 2: 2, 3: 1}, name="m")


def test_bert_block_dynamic_length_in_one_session(tmp_path):
    enc = zoo.bert_encoder(vocab=100, hidden=32, layers=2, heads=4, ffn=64, max_len=64)

    def inputs(n):
        ids = torch.randint(0, 100, (2, n))
        mask = torch.ones(2, n, dtype=torch.long)
        mask[1, n // 2:] = 0
        return ids, mask
    path = check_session(tmp_path, enc, inputs, (11, 5, 23, 11), dynamic_seq=True)
    sig = rt.load(path).signature
    assert sig["inputs"][0]["shape"] == (-1, -1) and sig["outputs"][0]["shape"] == (-1, -1, 32)
    ops = [n["op"] for n in json.loads(rt.load(path).metadata["aimass.graph"])["nodes"]]
    # q @ k^T / sqrt(d) + mask -> softmax -> @ v, with the view/transpose head split and merge, is one node
    assert ops.count("sdpa") == 2 and "permute" not in ops and "softmax" not in ops and "matmul" not in ops


def test_static_length_rejects_other_lengths(tmp_path):
    enc = zoo.bert_encoder(vocab=50, hidden=16, layers=1, heads=2, ffn=32, max_len=16)
    ids, mask = torch.randint(0, 50, (1, 8)), torch.ones(1, 8, dtype=torch.long)
    rt.export(enc, (ids, mask), tmp_path / "s.aimass")
    with rt.Session(tmp_path / "s.aimass") as s:
        with pytest.raises(ValueError, match="expects"):
            s.run({"input_ids": np.zeros((1, 5), np.int64), "attention_mask": np.ones((1, 5), np.int64)})
    rt.export(enc, (ids, mask), tmp_path / "d.aimass", dynamic_seq=True)
    with rt.Session(tmp_path / "d.aimass") as s:
        with pytest.raises(ValueError, match="sequence length"):
            s.run({"input_ids": np.zeros((1, 5), np.int64), "attention_mask": np.ones((1, 6), np.int64)})


def test_tensor_ops(tmp_path):
    class Ops(nn.Module):
        def forward(self, x, y):
            a = torch.cat([x, y], dim=-1)
            b = torch.stack([x, y], dim=1).sum(dim=1)
            c = torch.where(x > 0, x, y * 2)
            d = x.masked_fill(y < 0, -1.0)
            e = torch.matmul(x, y.transpose(1, 2)).softmax(dim=1)
            return (a, b, c.mean(dim=(1, 2)), d[:, 1:-1:2, :3], x.amax(-1), (~(x > 0)).float(), e,
                    x[:, 0], x[..., None, 2], torch.bmm(x.permute(0, 2, 1), y))
    check_session(tmp_path, Ops(), lambda n: (torch.randn(2, 9, 5), torch.randn(2, 9, 5)), (9,))


def test_nan_and_inf_propagate_like_torch(tmp_path):
    class M(nn.Module):
        def forward(self, x, y):
            return (torch.matmul(x, y.transpose(1, 2)), x.amax(-1), x.sum(-1), torch.cat([x, y], 1),
                    F.scaled_dot_product_attention(x[:, None], y[:, None], y[:, None]))
    x, y = torch.randn(2, 4, 3), torch.randn(2, 4, 3)
    x[0, 1, 2] = float("nan")
    y[1, 0, 0] = float("inf")
    rt.export(M(), (x, y), tmp_path / "n.aimass")
    with rt.Session(tmp_path / "n.aimass") as s:
        got = s.run({"x": x.numpy(), "y": y.numpy()})
    from torch.nn.attention import SDPBackend, sdpa_kernel
    # torch's math attention (its CPU flash kernel turns a NaN query row into zeros)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        ref = M()(x, y)
    for k, r in zip(sorted(got), ref):
        np.testing.assert_array_equal(np.isnan(got[k]), np.isnan(r.numpy()), err_msg=k)
        np.testing.assert_array_equal(np.isinf(got[k]), np.isinf(r.numpy()), err_msg=k)


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_quantized_transformer_linear_layers(tmp_path, quantize):
    enc = Enc(False, "gelu").eval()
    x, kp = padded(9)
    rt.export(enc, (x, kp), tmp_path / "q.aimass", quantize=quantize, dynamic_seq=True)
    graph = rt.load(tmp_path / "q.aimass").metadata["aimass.graph"]
    assert graph.count('"bits"') == 8  # qkv, out_proj, linear1, linear2 in each of 2 layers
    with rt.Session(tmp_path / "q.aimass") as s:
        for n in (9, 13):
            x, kp = padded(n)
            got = s.run({"x": x.numpy(), "kp": kp.numpy()})["output"]
            with torch.no_grad():
                ref = enc(x, kp).numpy()
            err = np.abs(got - ref).max() / np.abs(ref).max()
            assert err < (0.05 if quantize == "int8" else 0.2), err


def test_unsupported_attention_configs_name_the_node(tmp_path):
    mha = nn.MultiheadAttention(16, 2)  # batch_first=False
    x = torch.randn(3, 2, 16)
    with pytest.raises(rt.UnsupportedOpError, match="batch"):
        rt.export(mha, (x, x, x), tmp_path / "x.aimass")

    class Weights(nn.Module):
        def __init__(self):
            super().__init__()
            self.m = nn.MultiheadAttention(16, 2, batch_first=True)

        def forward(self, x):
            out, w = self.m(x, x, x)
            return out + w.sum()
    with pytest.raises(rt.UnsupportedOpError, match="only the first"):
        rt.export(Weights(), (torch.randn(2, 3, 16),), tmp_path / "w.aimass")
