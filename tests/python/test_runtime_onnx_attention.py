"""runtime.from_onnx on the subgraphs torch.onnx.export writes for GELU at opsets without a Gelu op
(Div/Erf/Add/Mul, both product orders) and for nn.MultiheadAttention / nn.TransformerEncoder
(batch_first, post- and pre-norm): each compared with onnxruntime on the same file and with torch
eager (rtol 1e-4). An Erf outside the GELU pattern and an attention block computing something
else are reported (UnsupportedOpError naming the node), never mis-mapped."""
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
