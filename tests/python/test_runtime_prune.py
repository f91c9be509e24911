"""export(prune=...): magnitude / n:m / channel pruning before (optional) quantization."""
import copy
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import aimass.runtime as rt  # noqa: E402
import importlib  # noqa: E402
from aimass.compress import prune as cprune  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402
from torch import nn  # noqa: E402

ql = importlib.import_module("aimass.compress.qlinear")


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 64), nn.GELU(), nn.Dropout(0.1),
                         nn.Linear(64, 10)).eval()


def run(path, x):
    with rt.Session(path) as sess:
        return sess.run({"x": x})["output"]


X = np.random.default_rng(0).standard_normal((5, 64)).astype(np.float32)


@pytest.mark.parametrize("spec", [{"method": "magnitude", "sparsity": 0.6},
                                  {"method": "magnitude", "sparsity": 0.3, "scope": "layer"},
                                  {"method": "n:m", "n": 2, "m": 4}])
def test_zeroing_methods_equal_torch_on_the_pruned_module(tmp_path, spec):
    net = mlp()
    before = copy.deepcopy(net.state_dict())
    path = tmp_path / "p.aimass"
    rt.export(net, (torch.randn(2, 64),), path, prune=spec, input_names=["x"])
    for k, v in net.state_dict().items():  # the caller's module is not modified
        assert torch.equal(v, before[k])
    ref_net = copy.deepcopy(net)
    cprune.prune_model(ref_net, spec["method"], spec.get("sparsity", 0.5), scope=spec.get("scope"),
                       n=spec.get("n", 2), m=spec.get("m", 4))
    with torch.no_grad():
        ref = ref_net(torch.from_numpy(X)).numpy()
    np.testing.assert_allclose(run(path, X), ref, rtol=1e-5, atol=1e-5)
    tensors = load_file(str(path))
    ws = [v for k, v in tensors.items() if k.endswith(".weight")]
    zero = sum(int((w == 0).sum()) for w in ws) / sum(w.size for w in ws)
    if spec["method"] == "n:m":
        assert zero >= 0.5
        for w in ws:  # every group of 4 along the inputs keeps at most 2
            assert ((w.reshape(w.shape[0], -1, 4) != 0).sum(-1) <= 2).all()
    else:
        assert zero >= spec["sparsity"] - 0.01
    meta = json.loads(rt.load(path).metadata["aimass.prune"])
    assert meta["method"] == spec["method"] and 0 < meta["kept_fraction"] < 1


def test_channel_pruning_shrinks_the_next_layer_and_matches_zeroed_rows(tmp_path):
    net = mlp()
    path = tmp_path / "c.aimass"
    rt.export(net, (torch.randn(2, 64),), path, prune={"method": "channel", "sparsity": 0.25}, input_names=["x"])
    tensors = load_file(str(path))
    names = [n["name"] for n in json.loads(rt.load(path).metadata["aimass.graph"])["nodes"] if n["op"] == "linear"]
    shapes = [tensors[f"{n}.weight"].shape for n in names]
    assert shapes == [(72, 64), (48, 72), (10, 48)]  # hidden rows (and the next inputs) shrink; outputs stay
    # Reference: torch with the pruned rows zeroed (biases kept), shapes unchanged.
    ref_net = copy.deepcopy(net)
    with torch.no_grad():
        for lin in (ref_net[0], ref_net[2]):
            keep = cprune.prune_mask(lin.weight, "channel", 0.25)
            lin.weight.mul_(torch.from_numpy(keep))
        ref = ref_net(torch.from_numpy(X)).numpy()
    np.testing.assert_allclose(run(path, X), ref, rtol=1e-5, atol=1e-5)
    meta = json.loads(rt.load(path).metadata["aimass.prune"])
    assert meta["method"] == "channel" and meta["layers"]["0"] == {"kept": 72, "rows": 96}


def test_channel_pruning_rejects_what_it_cannot_shrink(tmp_path):
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 2)

        def forward(self, x):
            h = self.a(x)
            return self.c(torch.relu(self.b(h)) + h)

    with pytest.raises(ValueError, match=r"Linear -> \[ReLU.*-> Linear.*'a' is read by"):
        rt.export(Residual().eval(), (torch.randn(2, 8),), tmp_path / "r.aimass", prune={"method": "channel"})
    cnn = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 2)).eval()
    with pytest.raises(ValueError, match="Conv2d layer"):
        rt.export(cnn, (torch.randn(2, 3, 8, 8),), tmp_path / "c.aimass", prune={"method": "channel"})
    with pytest.raises(ValueError, match="no Linear"):
        rt.export(nn.Sequential(nn.Linear(4, 2)).eval(), (torch.randn(2, 4),), tmp_path / "o.aimass",
                  prune={"method": "channel"})


def test_conv_model_magnitude_pruning(tmp_path):
    torch.manual_seed(0)
    cnn = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                        nn.Linear(8 * 8 * 8, 3)).eval()
    path = tmp_path / "cnn.aimass"
    rt.export(cnn, (torch.randn(2, 3, 8, 8),), path, prune={"method": "magnitude", "sparsity": 0.5},
              input_names=["x"])
    ref_net = copy.deepcopy(cnn)
    cprune.prune_model(ref_net, "magnitude", 0.5)
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        ref = ref_net(x).numpy()
    with rt.Session(path) as sess:
        np.testing.assert_allclose(sess.run({"x": x.numpy()})["output"], ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("quantize,bits", [("int8", 8), ("int4", 4)])
def test_pruned_then_quantized_equals_compress_kernels(tmp_path, quantize, bits):
    net = mlp()
    path = tmp_path / "pq.aimass"
    rt.export(net, (torch.randn(2, 64),), path, prune={"method": "channel", "sparsity": 0.25}, quantize=quantize,
              input_names=["x"])
    tensors = load_file(str(path))
    names = [n["name"] for n in json.loads(rt.load(path).metadata["aimass.graph"])["nodes"] if n["op"] == "linear"]

    def layer(h, name):
        w, scale = tensors[f"{name}.weight"], tensors[f"{name}.weight_scale"]
        n, k = scale.shape[0], h.shape[1]
        group = k // scale.shape[1] if scale.ndim == 2 else 0
        return np.asarray(ql.linear(h, ql.pack_linear(w, scale, bits=bits, shape=(n, k), group_size=group),
                                    tensors[f"{name}.bias"]))

    h = np.maximum(layer(X, names[0]), 0)
    h = torch.nn.functional.gelu(torch.from_numpy(layer(h, names[1]))).numpy()
    ref = layer(h, names[2])
    got = run(path, X)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    assert tensors[f"{names[1]}.weight_scale"].shape[0] == 48  # quantized after the shrink


def test_prune_argument_errors(tmp_path):
    net, x, p = mlp(), (torch.randn(2, 64),), tmp_path / "e.aimass"
    with pytest.raises(TypeError, match="prune must be None or a dict"):
        rt.export(net, x, p, prune="magnitude")
    with pytest.raises(ValueError, match="needs 'method'"):
        rt.export(net, x, p, prune={"sparsity": 0.5})
    with pytest.raises(ValueError, match="method must be one of"):
        rt.export(net, x, p, prune={"method": "random"})
    with pytest.raises(ValueError, match="unknown prune keys"):
        rt.export(net, x, p, prune={"method": "magnitude", "amount": 0.5})
    with pytest.raises(ValueError, match="sparsity must be in"):
        rt.export(net, x, p, prune={"method": "magnitude", "sparsity": 1.0})
    with pytest.raises(ValueError, match="'n' and 'm' apply to method 'n:m' only"):
        rt.export(net, x, p, prune={"method": "magnitude", "n": 2})
    with pytest.raises(ValueError, match="scope must be"):
        rt.export(net, x, p, prune={"method": "channel", "scope": "global"})
    with pytest.raises(ValueError, match="multiple of m=3"):
        rt.export(net, x, p, prune={"method": "n:m", "n": 1, "m": 3})
