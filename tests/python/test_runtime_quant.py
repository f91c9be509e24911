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


def test_int8_residual_block_at_large_batch_same_at_every_thread_count(tmp_path):
    # Linear + residual add (fused into the dynamic int8 GEMM's epilogue) at 8 x 128 rows and
    # N = 256 (4 column blocks): the rows split over the threads too; 1, 2 and 3 threads agree
    import aimass

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(256, 256)
            self.b = nn.Linear(256, 1024)
            self.c = nn.Linear(1024, 256)

        def forward(self, x):
            h = x + self.a(x)
            return h + self.c(torch.nn.functional.gelu(self.b(h)))

    torch.manual_seed(0)
    net = Block().eval()
    path = tmp_path / "res.aimass"
    rt.export(net, (torch.randn(2, 128, 256),), path, quantize="int8", input_names=["x"])
    x = np.random.default_rng(1).standard_normal((8, 128, 256)).astype(np.float32)
    n0 = aimass.num_threads()
    outs, outs1 = [], []
    try:
        for t in (1, 2, 3):
            aimass.set_num_threads(t)
            with rt.Session(path) as s:
                outs.append(s.run({"x": x})["output"])
                # one sample (128 rows): the N = 256 layers split 128 rows in parts of 6-row tiles
                outs1.append(s.run({"x": x[:1]})["output"])
    finally:
        aimass.set_num_threads(n0)
    for o in outs[1:]:
        np.testing.assert_array_equal(o, outs[0])
    for o in outs1[1:]:
        np.testing.assert_array_equal(o, outs1[0])
    with torch.no_grad():
        fp = net(torch.from_numpy(x)).numpy()
    assert np.abs(outs[0] - fp).max() <= 0.05 * np.abs(fp).max()
