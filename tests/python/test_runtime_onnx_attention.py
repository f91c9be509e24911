"""runtime.from_onnx on the subgraphs torch.onnx.export writes for GELU at opsets without a Gelu op
(Div/Erf/Add/Mul, both product orders) and for nn.MultiheadAttention / nn.TransformerEncoder
(batch_first, post- and pre-norm): each compared with onnxruntime on the same file and with torch
eager (rtol 1e-4). An Erf outside the GELU pattern and an attention block computing something
else are reported (UnsupportedOpError naming the node), never mis-mapped.

Masked attention as torch.onnx.export writes it: nn.MultiheadAttention and nn.TransformerEncoder with
a key_padding_mask input (bool, and float additive), an attn_mask stored in the model, and
F.scaled_dot_product_attention with an attn_mask input (bool, and float additive), on seeded inputs
whose padding differs per row."""
import math
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
import aimass.runtime as rt  # noqa: E402
from aimass.runtime import UnsupportedOpError  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    warnings.filterwarnings("ignore")


def export(tmp_path, model, x, opset=17):
    path = tmp_path / "m.onnx"
    torch.onnx.export(model.eval(), (x,), str(path), dynamo=False, opset_version=opset, input_names=["x"],
                      dynamic_axes={"x": {0: "b"}})
    return path


def check(tmp_path, model, path, xs, rtol=1e-4):
    out = rt.from_onnx(path, tmp_path / "m.aimass")
    so = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with rt.Session(out) as s:
        for x in xs:
            got = s.run({"x": x.numpy()})
            g = got[s.signature["outputs"][0]["name"]]
            with torch.no_grad():
                ref_t = model(x).numpy()
            ref_o = so.run(None, {"x": x.numpy()})[0]
            for ref in (ref_t, ref_o):
                np.testing.assert_allclose(g, ref, rtol=rtol, atol=rtol * np.abs(ref).max())
    return out


def ops_in(path):
    return {n["op"] for n in __import__("json").loads(rt.load(path).metadata["aimass.graph"])["nodes"]}


class GeluMLP(nn.Module):
    def __init__(self, form):
        super().__init__()
        self.a, self.b, self.form = nn.Linear(16, 32), nn.Linear(32, 8), form

    def forward(self, x):
        h = self.a(x)
        if self.form == "torch":
            h = nn.functional.gelu(h)  # x * 0.5 * (1 + erf(x / sqrt2)) below opset 20
        else:  # the Hugging Face spelling: 0.5 * x * (1 + erf(x * (1 / sqrt2)))
            h = 0.5 * h * (1.0 + torch.erf(h * (1.0 / math.sqrt(2.0))))
        return self.b(h)


@pytest.mark.parametrize("form", ["torch", "hf"])
def test_erf_gelu_at_opset_17_becomes_gelu(tmp_path, form):
    m = GeluMLP(form)
    p = export(tmp_path, m, torch.randn(2, 16))
    assert "Erf" in {n.op_type for n in onnx.load(str(p)).graph.node}
    out = check(tmp_path, m, p, [torch.randn(1, 16), torch.randn(5, 16) * 3])
    assert "activation" in ops_in(out) and "mul" not in ops_in(out)


def test_erf_outside_gelu_is_reported(tmp_path):
    class E(nn.Module):
        def forward(self, x):
            return torch.erf(x) * 2.0

    p = export(tmp_path, E(), torch.randn(2, 4))
    with pytest.raises(UnsupportedOpError, match="Erf"):
        rt.from_onnx(p, tmp_path / "m.aimass")


class MHA(nn.Module):
    def __init__(self, mask=None):
        super().__init__()
        self.m, self.mask = nn.MultiheadAttention(32, 4, batch_first=True), mask

    def forward(self, x):
        return self.m(x, x, x, need_weights=False, attn_mask=self.mask)[0]


def test_multihead_attention(tmp_path):
    m = MHA()
    p = export(tmp_path, m, torch.randn(2, 6, 32))
    out = check(tmp_path, m, p, [torch.randn(1, 6, 32), torch.randn(3, 6, 32)])
    assert "sdpa" in ops_in(out)


@pytest.mark.parametrize("norm_first,act", [(False, "relu"), (True, "gelu")])
def test_transformer_encoder(tmp_path, norm_first, act):
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True, norm_first=norm_first,
                                       activation=act)
    m = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    p = export(tmp_path, m, torch.randn(2, 5, 32))
    out = check(tmp_path, m, p, [torch.randn(1, 5, 32), torch.randn(4, 5, 32)])
    assert sum(1 for _ in ops_in(out) if _ == "sdpa") == 1


def test_attention_with_a_stored_mask_is_mapped_and_checked(tmp_path):
    # an additive float mask inside the block: mapped onto the fused attention's stored mask, after the
    # check against onnxruntime's own values for the subgraph (a block it cannot map is reported:
    # test_runtime_onnx_masked.py)
    m = MHA(torch.triu(torch.full((5, 5), -1e4), 1))
    p = export(tmp_path, m, torch.randn(2, 5, 32))
    out = check(tmp_path, m, p, [torch.randn(1, 5, 32), torch.randn(3, 5, 32)])
    assert "sdpa" in ops_in(out)


# -- masked attention
def pad_mask(lengths, s):
    return torch.arange(s)[None, :] >= torch.tensor(lengths)[:, None]  # True = padding


class PadMHA(nn.Module):
    def __init__(self, attn_mask=None):
        super().__init__()
        self.m, self.attn_mask = nn.MultiheadAttention(32, 4, batch_first=True), attn_mask

    def forward(self, x, pad):
        return self.m(x, x, x, key_padding_mask=pad, attn_mask=self.attn_mask, need_weights=False)[0]


class PadEncoder(nn.Module):
    def __init__(self, norm_first):
        super().__init__()
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True, norm_first=norm_first)
        self.m = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)

    def forward(self, x, pad):
        return self.m(x, src_key_padding_mask=pad)


class MaskedSDPA(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv, self.out = nn.Linear(32, 96), nn.Linear(32, 32)

    def forward(self, x, mask):
        b, s, _ = x.shape
        q, k, v = (t.view(b, s, 4, 8).transpose(1, 2) for t in self.qkv(x).chunk(3, dim=-1))
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(a.transpose(1, 2).reshape(b, s, 32))


def roundtrip(tmp_path, model, example, cases, mask_axes, x_axes=None, rtol=1e-4):
    path = tmp_path / "m.onnx"
    torch.onnx.export(model.eval(), example, str(path), dynamo=False, opset_version=17, input_names=["x", "m"],
                      dynamic_axes={"x": x_axes or {0: "b", 1: "s"}, "m": mask_axes})
    out = rt.from_onnx(path, tmp_path / "m.aimass")
    so = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with rt.Session(out) as s:
        for x, m in cases:
            g = s.run({"x": x.numpy(), "m": m.numpy()})[s.signature["outputs"][0]["name"]]
            with torch.no_grad():
                ref_t = model(x, m).numpy()
            ref_o = so.run(None, {"x": x.numpy(), "m": m.numpy()})[0]
            for ref in (ref_o, ref_t):
                np.testing.assert_allclose(g, ref, rtol=rtol, atol=rtol * np.abs(ref).max())
    return [n["op"] for n in __import__("json").loads(rt.load(out).metadata["aimass.graph"])["nodes"]]


@pytest.mark.parametrize("float_mask", [False, True])
def test_multihead_attention_key_padding_mask(tmp_path, float_mask):
    def mask(lengths, s):
        m = pad_mask(lengths, s)
        return torch.where(m, -1e4, 0.0) if float_mask else m
    # (torch's export of a key padding mask in nn.MultiheadAttention traces the sequence length in)
    ops = roundtrip(tmp_path, PadMHA(), (torch.randn(2, 6, 32), mask([6, 4], 6)),
                    [(torch.randn(1, 6, 32), mask([3], 6)), (torch.randn(3, 6, 32), mask([6, 2, 5], 6))],
                    {0: "b"}, x_axes={0: "b"})
    assert "sdpa" in ops and "matmul" not in ops  # the fused attention, not the decomposed graph


def test_multihead_attention_stored_attn_mask(tmp_path):
    class Causal(PadMHA):
        def forward(self, x, pad):  # the padding input unused: attn_mask alone
            return self.m(x, x, x, attn_mask=self.attn_mask, need_weights=False)[0] + 0 * pad[..., None]

    causal = torch.triu(torch.full((5, 5), -1e4), 1)
    ops = roundtrip(tmp_path, Causal(causal), (torch.randn(2, 5, 32), torch.zeros(2, 5)),
                    [(torch.randn(3, 5, 32), torch.zeros(3, 5))], {0: "b"}, x_axes={0: "b"})
    assert "sdpa" in ops


def test_attn_mask_with_key_padding_mask_is_reported(tmp_path):
    path = tmp_path / "m.onnx"
    torch.onnx.export(PadMHA(torch.triu(torch.full((5, 5), -1e4), 1)).eval(), (torch.randn(2, 5, 32), pad_mask([5, 3], 5)),
                      str(path), dynamo=False, opset_version=17, input_names=["x", "m"],
                      dynamic_axes={"x": {0: "b"}, "m": {0: "b"}})
    with pytest.raises(UnsupportedOpError, match="neither a key padding mask"):
        rt.from_onnx(path, tmp_path / "m.aimass")


@pytest.mark.parametrize("norm_first", [False, True])
def test_transformer_encoder_src_key_padding_mask(tmp_path, norm_first):
    ops = roundtrip(tmp_path, PadEncoder(norm_first), (torch.randn(2, 6, 32), pad_mask([6, 4], 6)),
                    [(torch.randn(1, 6, 32), pad_mask([5], 6)), (torch.randn(4, 6, 32), pad_mask([6, 1, 3, 2], 6))],
                    {0: "b"}, x_axes={0: "b"})
    assert ops.count("sdpa") == 2 and "matmul" not in ops


@pytest.mark.parametrize("float_mask", [False, True])
def test_scaled_dot_product_attention_attn_mask(tmp_path, float_mask):
    def mask(lengths, s):
        keep = ~pad_mask(lengths, s)[:, None, None, :].expand(-1, 1, s, s)
        return torch.where(keep, 0.0, -1e4) if float_mask else keep
    roundtrip(tmp_path, MaskedSDPA(), (torch.randn(2, 6, 32), mask([6, 4], 6)),
              [(torch.randn(1, 7, 32), mask([5], 7)), (torch.randn(3, 6, 32), mask([6, 1, 3], 6))],
              {0: "b", 2: "s", 3: "s"})
