"""Export: the q/k/v Linear layers of a self-attention block (same input, used only by the fused
attention) become one Linear [3E, in] feeding sdpa packed=1 (fp32, int8, int4), equal to torch and to
the unfused graph; cross-attention (k/v from another input) keeps its three Linear layers. int8
models also run ReLU/GELU and the residual add in the int8 GEMM's epilogue: same answer as unfused."""
import importlib
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import aimass.runtime as rt  # noqa: E402
from aimass.runtime import _export_fuse, zoo  # noqa: E402
from torch import nn  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402
from torch.nn import functional as F  # noqa: E402


def nodes(path):
    return json.loads(rt.load(path).metadata["aimass.graph"])["nodes"]


def tokens(b, s, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 100, (b, s), generator=g)
    mask = torch.ones(b, s, dtype=torch.long)
    mask[0, s - 3:] = 0
    return ids, mask


def run(path, ids, mask):
    with rt.Session(path) as s:
        out = s.run({"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
    return next(iter(out.values()))


@pytest.mark.parametrize("quantize", [None, "int8", "int4"])
def test_bert_block_qkv_becomes_one_linear(tmp_path, quantize, monkeypatch):
    torch.manual_seed(0)
    m = zoo.bert_encoder(vocab=100, hidden=64, layers=2, heads=4, ffn=128, max_len=64).eval()
    ex = tokens(2, 9)
    p = rt.export(m, ex, tmp_path / "m.aimass", quantize=quantize, dynamic_seq=True,
                  input_names=["input_ids", "attention_mask"])
    g = nodes(p)
    att = [n for n in g if n["op"] == "sdpa"]
    assert len(att) == 2 and all(n["attrs"].get("packed") == 1 and len(n["inputs"]) == 2 for n in att)
    assert sum(n["op"] == "linear" for n in g) == 2 * 4  # qkv, o, f1, f2 per layer
    monkeypatch.setattr(_export_fuse._FuseMixin, "fuse_qkv", lambda self: None)
    p0 = rt.export(m, ex, tmp_path / "m0.aimass", quantize=quantize, dynamic_seq=True,
                   input_names=["input_ids", "attention_mask"])
    assert sum(n["op"] == "linear" for n in nodes(p0)) == 2 * 6
    for b, s in ((1, 9), (3, 20)):
        ids, mask = tokens(b, s, seed=b)
        got, unfused = run(p, ids, mask), run(p0, ids, mask)
        # per-row activation quantization and per-channel weights: merging changes nothing
        np.testing.assert_allclose(got, unfused, rtol=1e-5, atol=1e-5 * np.abs(unfused).max())
        with torch.no_grad():
            ref = m(ids, mask).numpy()
        tol = 1e-4 if quantize is None else 5e-2 if quantize == "int8" else 2e-1
        np.testing.assert_allclose(got, ref, rtol=tol, atol=tol * np.abs(ref).max())


class Cross(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 32)

    def forward(self, x, y):
        b, s, _ = x.shape
        q, k, v = (t.view(b, -1, 4, 8).transpose(1, 2) for t in (self.q(x), self.k(y), self.v(y)))
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, s, 32)


def test_cross_attention_keeps_three_linears(tmp_path):
    torch.manual_seed(0)
    m = Cross().eval()
    x, y = torch.randn(2, 5, 32), torch.randn(2, 5, 32)
    p = rt.export(m, (x, y), tmp_path / "c.aimass", input_names=["x", "y"])
    g = nodes(p)
    assert sum(n["op"] == "linear" for n in g) == 3
    assert not any(n["attrs"].get("packed") for n in g if n["op"] == "sdpa")
    with rt.Session(p) as s:
        got = next(iter(s.run({"x": x.numpy(), "y": y.numpy()}).values()))
    np.testing.assert_allclose(got, m(x, y).detach().numpy(), rtol=1e-4, atol=1e-5)


class ResMLP(nn.Module):
    def __init__(self, act):
        super().__init__()
        self.a, self.b, self.c, self.act = nn.Linear(64, 256), nn.Linear(256, 64), nn.Linear(64, 64), act

    def forward(self, x):
        h = x + self.b(self.act(self.a(x)))  # act fused into a's epilogue, residual into b's
        return h + self.c(h)


@pytest.mark.parametrize("act", [nn.GELU(), nn.ReLU(), nn.GELU(approximate="tanh"), nn.SiLU()])
@pytest.mark.parametrize("rows", [1, 200])
def test_int8_epilogue_fusion_equals_unfused(tmp_path, act, rows):
    torch.manual_seed(0)
    m = ResMLP(act).eval()
    p = rt.export(m, (torch.randn(2, 64),), tmp_path / "q.aimass", quantize="int8", input_names=["x"])
    x = np.random.default_rng(rows).standard_normal((rows, 64)).astype(np.float32)
    if rows > 1:
        x[rows // 2, 5] = np.nan  # a non-finite row stays NaN through the fused epilogue
    with rt.Session(p) as s:
        got = next(iter(s.run({"x": x}).values()))
    # the reference: the compress kernels layer by layer, act and residual applied apart
    g = nodes(p)
    ql = importlib.import_module("aimass.compress.qlinear")
    t = load_file(str(p))
    lin = {n["name"]: n for n in g if n["op"] == "linear"}

    def layer(h, name):
        w, sc = t[lin[name]["params"]["weight"]], t[lin[name]["params"]["weight_scale"]]
        pk = ql.pack_linear(w, sc, bits=8, shape=(sc.shape[0], h.shape[1]), group_size=0)
        return np.asarray(ql.linear(h, pk, t[lin[name]["params"]["bias"]]))
    names = list(lin)
    with torch.no_grad():
        h = x + layer(act(torch.from_numpy(layer(x, names[0]))).numpy(), names[1])
    ref = h + layer(h, names[2])
    assert np.isnan(got[rows // 2]).all() == (rows > 1)
    ok = ~np.isnan(ref).any(axis=1)
    np.testing.assert_allclose(got[ok], ref[ok], rtol=1e-5, atol=1e-5 * np.abs(ref[ok]).max())
