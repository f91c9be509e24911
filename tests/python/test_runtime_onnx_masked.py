"""runtime.from_onnx on masked attention as torch.onnx.export writes it: nn.MultiheadAttention and
nn.TransformerEncoder with a key_padding_mask input (bool, and float additive), an attn_mask stored in
the model, and F.scaled_dot_product_attention with an attn_mask input (bool, and float additive).
Each imported file is compared with onnxruntime on the same file and with torch eager (rtol 1e-4) on
seeded inputs whose padding differs per row."""
import json
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
import aimass.runtime as rt  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    warnings.filterwarnings("ignore")


def pad_mask(lengths, s):
    return torch.arange(s)[None, :] >= torch.tensor(lengths)[:, None]  # True = padding


class MHA(nn.Module):
    def __init__(self, attn_mask=None):
        super().__init__()
        self.m, self.attn_mask = nn.MultiheadAttention(32, 4, batch_first=True), attn_mask

    def forward(self, x, pad):
        return self.m(x, x, x, key_padding_mask=pad, attn_mask=self.attn_mask, need_weights=False)[0]


class Encoder(nn.Module):
    def __init__(self, norm_first):
        super().__init__()
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True, norm_first=norm_first)
        self.m = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)

    def forward(self, x, pad):
        return self.m(x, src_key_padding_mask=pad)


class SDPA(nn.Module):
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
    return [n["op"] for n in json.loads(rt.load(out).metadata["aimass.graph"])["nodes"]]


@pytest.mark.parametrize("float_mask", [False, True])
def test_multihead_attention_key_padding_mask(tmp_path, float_mask):
    def mask(lengths, s):
        m = pad_mask(lengths, s)
        return torch.where(m, -1e4, 0.0) if float_mask else m
    # (torch's export of a key padding mask in nn.MultiheadAttention traces the sequence length in)
    ops = roundtrip(tmp_path, MHA(), (torch.randn(2, 6, 32), mask([6, 4], 6)),
                    [(torch.randn(1, 6, 32), mask([3], 6)), (torch.randn(3, 6, 32), mask([6, 2, 5], 6))],
                    {0: "b"}, x_axes={0: "b"})
    assert "sdpa" in ops and "matmul" not in ops  # the fused attention, not the decomposed graph


def test_multihead_attention_stored_attn_mask(tmp_path):
    class Causal(MHA):
        def forward(self, x, pad):  # the padding input unused: attn_mask alone
            return self.m(x, x, x, attn_mask=self.attn_mask, need_weights=False)[0] + 0 * pad[..., None]

    causal = torch.triu(torch.full((5, 5), -1e4), 1)
    ops = roundtrip(tmp_path, Causal(causal), (torch.randn(2, 5, 32), torch.zeros(2, 5)),
                    [(torch.randn(3, 5, 32), torch.zeros(3, 5))], {0: "b"}, x_axes={0: "b"})
    assert "sdpa" in ops


def test_attn_mask_with_key_padding_mask_is_reported(tmp_path):
    path = tmp_path / "m.onnx"
    torch.onnx.export(MHA(torch.triu(torch.full((5, 5), -1e4), 1)).eval(), (torch.randn(2, 5, 32), pad_mask([5, 3], 5)),
                      str(path), dynamo=False, opset_version=17, input_names=["x", "m"],
                      dynamic_axes={"x": {0: "b"}, "m": {0: "b"}})
    with pytest.raises(rt.UnsupportedOpError, match="neither a key padding mask"):
        rt.from_onnx(path, tmp_path / "m.aimass")


@pytest.mark.parametrize("norm_first", [False, True])
def test_transformer_encoder_src_key_padding_mask(tmp_path, norm_first):
    ops = roundtrip(tmp_path, Encoder(norm_first), (torch.randn(2, 6, 32), pad_mask([6, 4], 6)),
                    [(torch.randn(1, 6, 32), pad_mask([5], 6)), (torch.randn(4, 6, 32), pad_mask([6, 1, 3, 2], 6))],
                    {0: "b"}, x_axes={0: "b"})
    assert ops.count("sdpa") == 2 and "matmul" not in ops


@pytest.mark.parametrize("float_mask", [False, True])
def test_scaled_dot_product_attention_attn_mask(tmp_path, float_mask):
    def mask(lengths, s):
        keep = ~pad_mask(lengths, s)[:, None, None, :].expand(-1, 1, s, s)
        return torch.where(keep, 0.0, -1e4) if float_mask else keep
    roundtrip(tmp_path, SDPA(), (torch.randn(2, 6, 32), mask([6, 4], 6)),
              [(torch.randn(1, 7, 32), mask([5], 7)), (torch.randn(3, 6, 32), mask([6, 1, 3], 6))],
              {0: "b", 2: "s", 3: "s"})
