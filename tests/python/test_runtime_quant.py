"""int8 / int4 exported models equal the compress kernels run layer by layer."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
import aimass.runtime as rt  # noqa: E402
import importlib  # noqa: E402
ql = importlib.import_module("aimass.compress.qlinear")
from safetensors.numpy import load_file  # noqa: E402
from torch import nn  # noqa: E402


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 64), nn.GELU(), nn.Linear(64, 10)).eval()


@pytest.mark.parametrize("quantize,bits", [("int8", 8), ("int4", 4)])
@pytest.mark.parametrize("rows", [1, 5])
def test_quantized_mlp_matches_compress_kernels(tmp_path, quantize, bits, rows):
    net = mlp()
    path = tmp_path / f"{quantize}.aimass"
    rt.export(net, (torch.randn(2, 64),), path, quantize=quantize, input_names=["x"])
    tensors = load_file(str(path))
    x = np.random.default_rng(0).standard_normal((rows, 64)).astype(np.float32)

    def layer(h, name):
        w = tensors[f"{name}.weight"]
        scale = tensors[f"{name}.weight_scale"]
        n = scale.shape[0]
        k = h.shape[1]
        group = k // scale.shape[1] if scale.ndim == 2 else 0
        p = ql.pack_linear(w, scale, bits=bits, shape=(n, k), group_size=group)
        return np.asarray(ql.linear(h, p, tensors[f"{name}.bias"]))

    names = [n["name"] for n in __import__("json").loads(rt.load(path).metadata["aimass.graph"])["nodes"]
             if n["op"] == "linear"]
    h = np.maximum(layer(x, names[0]), 0)
    h = np.asarray(torch.nn.functional.gelu(torch.from_numpy(layer(h, names[1]))))
    ref = layer(h, names[2])
    with rt.Session(path) as sess:
        got = sess.run({"x": x})["output"]
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    # and close to the float model (quantization error only)
    with torch.no_grad():
        fp = net(torch.from_numpy(x)).numpy()
    tol = 0.05 if bits == 8 else 0.3
    assert np.abs(got - fp).max() <= tol * np.abs(fp).max() + 1e-3
    if bits == 4:
        assert tensors[f"{names[0]}.weight"].dtype == np.uint8
        assert tensors[f"{names[0]}.weight_scale"].shape == (96, 2)  # groups of 32 along K=64
    else:
        assert tensors[f"{names[0]}.weight"].dtype == np.int8


def test_quantize_needs_a_linear(tmp_path):
    with pytest.raises(ValueError, match="no nn.Linear"):
        rt.export(nn.Sequential(nn.ReLU()), (torch.randn(2, 4),), tmp_path / "q.aimass", quantize="int8")
