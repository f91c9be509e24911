"""Export -> load -> execute round trips against torch eager, and bad model files."""
import json
import os
import struct

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import aimass  # noqa: E402
import aimass.runtime as rt  # noqa: E402
from torch import nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def close_to_torch(got, ref, rtol=1e-5):
    got = np.asarray(got)
    ref = ref.detach().numpy()
    assert got.shape == ref.shape
    scale = max(float(np.abs(ref).max()), 1e-30)
    np.testing.assert_allclose(got, ref, rtol=rtol, atol=rtol * scale)


def roundtrip(tmp_path, model, x, rows=None, **kw):
    model.eval()
    path = tmp_path / "m.aimass"
    xs = x if isinstance(x, tuple) else (x,)
    rt.export(model, xs, path, **kw)
    m = rt.load(path)
    ex = rt._rt.Executor(m._m, 8)
    arrays = [t.numpy() if t.dtype != torch.int64 else t.numpy() for t in xs]
    outs = ex.run(arrays)
    with torch.no_grad():
        ref = model(*xs)
    return m, ex, outs, ref


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Dropout(0.5), nn.Linear(64, 32), nn.GELU(),
                                 nn.Linear(32, 10), nn.Softmax(dim=1))

    def forward(self, x):
        return self.net(x)


class CatDogCNN(nn.Module):
    """The platform's cat/dog example: (conv-relu-pool) x2, linear, on 64x64x3 images."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(32 * 16 * 16, 2)

    def forward(self, x):
        x = self.pool(F.relu(self.bn1(self.conv1(x))))
        x = self.pool(F.relu(self.conv2(x)))
        return self.fc(x.view(x.size(0), -1))


class ResidualBlock(nn.Module):
    def __init__(self, c=8):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, stride=2, padding=1, bias=False)
        self.c1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.b1 = nn.BatchNorm2d(c)
        self.c2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.b2 = nn.BatchNorm2d(c)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(c, 5)

    def forward(self, x):
        x = self.stem(x)
        y = F.relu(self.b1(self.c1(x)))
        y = self.b2(self.c2(y))
        x = F.relu(x + y)
        return F.log_softmax(self.head(torch.flatten(self.gap(x), 1)), dim=-1)


class LNGeluBlock(nn.Module):
    """A transformer MLP block: x + W2 gelu(W1 LN(x)), on [batch, tokens, dim]."""

    def __init__(self, d=32):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 4 * d)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(4 * d, d)
        self.drop = nn.Dropout(0.1)

    def forward(self, x):
        return x + self.drop(self.fc2(self.act(self.fc1(self.ln(x)))))


def randomize_bn(model):
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=g) - 0.5)


def test_mlp_roundtrip(tmp_path):
    torch.manual_seed(0)
    m, ex, outs, ref = roundtrip(tmp_path, MLP(), torch.randn(5, 20))
    close_to_torch(outs[0], ref)
    assert m.signature["inputs"] == [{"name": "x", "dtype": "float32", "shape": (-1, 20)}]
    assert m.metadata["aimass.format_version"] == "1"
    assert "aimass" in m.metadata["aimass.producer"]
    # relu and gelu are fused into the linear before them; dropout is gone
    assert ex.num_steps < m._m.num_nodes


@pytest.mark.parametrize("level", ["scalar", "avx2", "avx512"])
def test_batch1_small_m_path_all_simd_levels(tmp_path, level):
    """Batches of <= 4 rows take the runtime's own GEMV; check it at every SIMD level."""
    torch.manual_seed(0)
    net = MLP().eval()
    path = tmp_path / "m.aimass"
    rt.export(net, (torch.randn(2, 20),), path)
    prev = aimass.cpu_features()["simd"]
    try:
        aimass.set_simd_level(level)
        ex = rt._rt.Executor(rt.load(path)._m, 4)
        for n in (1, 3, 4):
            x = torch.randn(n, 20)
            with torch.no_grad():
                close_to_torch(ex.run([x.numpy()])[0], net(x))
    finally:
        aimass.set_simd_level(prev)


def test_catdog_cnn_roundtrip(tmp_path):
    torch.manual_seed(0)
    net = CatDogCNN()
    randomize_bn(net)
    _, ex, outs, ref = roundtrip(tmp_path, net, torch.randn(3, 3, 64, 64))
    close_to_torch(outs[0], ref)


@pytest.mark.parametrize("level", ["scalar", "avx2", "avx512"])
def test_conv_strides_dilation_groups_all_levels(tmp_path, level):
    """Conv im2col edge cases (padding runs, stride > 1, dilation, groups, 1x1, odd sizes,
    pixel counts that are not a multiple of the 32-pixel panels) at each SIMD level, for
    one sample (split inside the sample) and several (whole samples per thread)."""
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(),
                        nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=2), nn.Tanh(),
                        nn.Conv2d(8, 6, 1), nn.Conv2d(6, 5, (3, 2), stride=(1, 3), padding=(0, 1)),
                        nn.MaxPool2d(2), nn.Flatten()).eval()
    path = tmp_path / "m.aimass"
    rt.export(net, (torch.randn(2, 3, 27, 21),), path)
    prev, n0 = aimass.cpu_features()["simd"], aimass.num_threads()
    try:
        aimass.set_simd_level(level)
        for threads in (1, 2):
            aimass.set_num_threads(threads)
            ex = rt._rt.Executor(rt.load(path)._m, 8)
            for n in (1, 5):
                x = torch.randn(n, 3, 27, 21)
                with torch.no_grad():
                    close_to_torch(ex.run([x.numpy()])[0], net(x))
    finally:
        aimass.set_simd_level(prev)
        aimass.set_num_threads(n0)


def test_max_pool_nan_and_inf_windows(tmp_path):
    """2x2 max pooling keeps NaN wherever a window has one (as torch does) and +-inf
    mixes give the max, not NaN."""
    net = nn.Sequential(nn.MaxPool2d(2)).eval()
    path = tmp_path / "m.aimass"
    rt.export(net, (torch.randn(2, 2, 4, 6),), path)
    x = torch.randn(3, 2, 4, 6)
    x[0, 0, 0, 0] = float("nan")
    x[0, 0, 1, 3] = float("nan")
    x[1, 1, 2, 2], x[1, 1, 3, 3] = float("inf"), float("-inf")
    x[2, 0, 2, 4] = float("-inf")
    x[2, 0, 0, 0], x[2, 0, 0, 1] = float("nan"), float("inf")
    ex = rt._rt.Executor(rt.load(path)._m, 4)
    np.testing.assert_array_equal(ex.run([x.numpy()])[0], net(x).numpy())


def test_residual_block_roundtrip(tmp_path):
    torch.manual_seed(0)
    net = ResidualBlock()
    randomize_bn(net)
    _, _, outs, ref = roundtrip(tmp_path, net, torch.randn(4, 3, 17, 17))
    close_to_torch(outs[0], ref)


def test_layernorm_gelu_block_roundtrip(tmp_path):
    torch.manual_seed(0)
    _, _, outs, ref = roundtrip(tmp_path, LNGeluBlock(), torch.randn(3, 7, 32))
    close_to_torch(outs[0], ref)


class Misc(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 6)
        self.avg = nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False)
        self.bn = nn.BatchNorm1d(6)
        self.lin = nn.Linear(6 * 4, 4)
        self.offset = nn.Parameter(torch.randn(4))

    def forward(self, ids, img):
        e = self.emb(ids)                        # [B, 4, 6]
        e = torch.sigmoid(e) * 2.0 - 0.5
        e = e.reshape(e.shape[0], -1)
        h = torch.tanh(self.lin(e)) + self.offset
        p = self.avg(img)                        # [B, 2, 4, 4]
        p = F.silu(F.max_pool2d(p, 2)) / 3.0     # [B, 2, 2, 2]
        return F.log_softmax(h, dim=1), p.flatten(1), F.adaptive_avg_pool2d(img, (3, 2))


def test_misc_ops_and_multiple_io(tmp_path):
    torch.manual_seed(0)
    ids = torch.randint(0, 50, (3, 4))
    img = torch.randn(3, 2, 8, 8)
    path = tmp_path / "misc.aimass"
    net = Misc().eval()
    rt.export(net, (ids, img), path, input_names=["ids", "img"], output_names=["logp", "pooled", "gap"])
    with rt.Session(path) as sess:
        assert [s["name"] for s in sess.signature["outputs"]] == ["logp", "pooled", "gap"]
        assert sess.signature["inputs"][0]["dtype"] == "int64"
        out = sess.run({"ids": ids, "img": img})
        with torch.no_grad():
            ref = net(ids, img)
        for name, r in zip(["logp", "pooled", "gap"], ref):
            close_to_torch(out[name], r)
        with pytest.raises(ValueError, match=r"\(embedding\): index .* valid range \[0, 49\]"):
            sess.run({"ids": ids + 100, "img": img})


def test_bn_not_after_conv_becomes_affine(tmp_path):
    net = nn.Sequential(nn.ReLU(), nn.BatchNorm1d(10), nn.Linear(10, 3)).eval()
    net[1].running_mean.uniform_(-1, 1)
    _, _, outs, ref = roundtrip(tmp_path, net, torch.randn(4, 10))
    close_to_torch(outs[0], ref)


def test_unsupported_op_names_op_and_node(tmp_path):
    class Bad(nn.Module):
        def forward(self, x):
            return torch.cumsum(x, dim=1)

    with pytest.raises(rt.UnsupportedOpError, match=r"cumsum.*node 'cumsum'.*supported: nn.Linear"):
        rt.export(Bad(), (torch.randn(2, 3),), tmp_path / "bad.aimass")
    assert not (tmp_path / "bad.aimass").exists()


def test_batch_mixing_reshape_rejected(tmp_path):
    class Mix(nn.Module):
        def forward(self, x):
            return x.view(-1)

    with pytest.raises(rt.UnsupportedOpError, match="batch dimension"):
        rt.export(Mix(), (torch.randn(2, 3),), tmp_path / "mix.aimass")


def test_export_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="quantize"):
        rt.export(MLP(), (torch.randn(2, 20),), tmp_path / "a.aimass", quantize="int3")
    with pytest.raises(TypeError, match="torch.nn.Module"):
        rt.export(lambda x: x, (torch.randn(2, 20),), tmp_path / "a.aimass")


def test_bad_inputs_rejected(tmp_path):
    path = tmp_path / "mlp.aimass"
    rt.export(MLP(), (torch.randn(2, 20),), path)
    with rt.Session(path) as sess:
        with pytest.raises(ValueError, match=r"shape \[2, 21\].*\[batch, 20\]"):
            sess.run({"x": np.zeros((2, 21), np.float32)})
        with pytest.raises(ValueError, match="missing"):
            sess.run({"y": np.zeros((2, 20), np.float32)})
        with pytest.raises(TypeError):
            sess.run({"x": np.zeros((2, 20), np.int32)})
        # a single example without the batch dimension is accepted
        assert sess.run({"x": np.zeros(20, np.float32)})["output"].shape == (1, 10)


# ------------------------------------------------------------------ bad files
def write_raw(path, header: dict, data: bytes):
    h = json.dumps(header).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)


@pytest.fixture
def good(tmp_path):
    path = tmp_path / "good.aimass"
    rt.export(MLP(), (torch.randn(2, 20),), path)
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    return path, header, raw[8 + n:]


def test_truncated_file(tmp_path, good):
    path, _, _ = good
    raw = path.read_bytes()
    for cut in (0, 5, 40, len(raw) - 100):
        bad = tmp_path / f"cut{cut}.aimass"
        bad.write_bytes(raw[:cut])
        with pytest.raises(aimass.CorruptDataError, match="truncated|malformed"):
            rt.load(bad)


def test_corrupt_header(tmp_path, good):
    path, _, _ = good
    raw = bytearray(path.read_bytes())
    raw[12] = ord("{")  # break the JSON
    bad = tmp_path / "json.aimass"
    bad.write_bytes(bytes(raw))
    with pytest.raises(aimass.CorruptDataError):
        rt.load(bad)
    huge = tmp_path / "huge.aimass"
    huge.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    with pytest.raises(aimass.CorruptDataError, match="exceeds the file"):
        rt.load(huge)


def test_newer_version(tmp_path, good):
    _, header, data = good
    header["__metadata__"]["aimass.format_version"] = "2"
    write_raw(tmp_path / "v2.aimass", header, data)
    with pytest.raises(ValueError, match="format version 2.*upgrade aimass"):
        rt.load(tmp_path / "v2.aimass")


def test_missing_tensor_and_unknown_value(tmp_path, good):
    _, header, data = good
    h = json.loads(json.dumps(header))
    victim = next(k for k in h if k != "__metadata__")
    del h[victim]
    write_raw(tmp_path / "missing.aimass", h, data)
    with pytest.raises(ValueError, match=f"tensor '{victim}'.*not in the file"):
        rt.load(tmp_path / "missing.aimass")
    h = json.loads(json.dumps(header))
    g = json.loads(h["__metadata__"]["aimass.graph"])
    g["nodes"][1]["inputs"] = ["nowhere"]
    h["__metadata__"]["aimass.graph"] = json.dumps(g)
    write_raw(tmp_path / "unknown.aimass", h, data)
    with pytest.raises(ValueError, match="value 'nowhere'"):
        rt.load(tmp_path / "unknown.aimass")
    h = json.loads(json.dumps(header))
    g = json.loads(h["__metadata__"]["aimass.graph"])
    g["nodes"][0]["op"] = "fft"
    h["__metadata__"]["aimass.graph"] = json.dumps(g)
    write_raw(tmp_path / "op.aimass", h, data)
    with pytest.raises(ValueError, match="op 'fft' is not supported.*supported ops: linear"):
        rt.Session(tmp_path / "op.aimass")


def test_offsets_outside_data(tmp_path, good):
    _, header, data = good
    h = json.loads(json.dumps(header))
    victim = next(k for k in h if k != "__metadata__")
    h[victim]["data_offsets"][1] += 4
    write_raw(tmp_path / "off.aimass", h, data)
    with pytest.raises(aimass.CorruptDataError):
        rt.load(tmp_path / "off.aimass")


def test_not_an_aimass_file(tmp_path):
    from safetensors.numpy import save_file
    save_file({"w": np.zeros(3, np.float32)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="not an .aimass model"):
        rt.load(tmp_path / "plain.safetensors")
    with pytest.raises(OSError, match="cannot open"):
        rt.load(tmp_path / "nope.aimass")


def test_arena_reuses_memory_of_dead_values(tmp_path):
    torch.manual_seed(0)
    layers = []
    for _ in range(8):
        layers += [nn.Linear(64, 64), nn.Tanh()]
    net = nn.Sequential(*layers).eval()
    m, ex, outs, ref = roundtrip(tmp_path, net, torch.randn(3, 64))
    close_to_torch(outs[0], ref)
    row = 64 * 4
    # 17 values (input, 8 fused linear+tanh outputs, the output identity) fit in 3 live rows
    assert ex.arena_bytes <= 3 * row * ex.capacity


@pytest.mark.parametrize("act", [nn.ReLU(), nn.GELU(), nn.GELU(approximate="tanh"), nn.SiLU(), nn.Sigmoid(),
                                 nn.Tanh()], ids=["relu", "gelu", "gelu_tanh", "silu", "sigmoid", "tanh"])
def test_activations_fused_and_standalone(tmp_path, act):
    torch.manual_seed(0)
    # after a Linear: fused into its epilogue; after a LayerNorm: a standalone step
    net = nn.Sequential(nn.Linear(16, 24), act, nn.LayerNorm(24), act, nn.Identity(),
                        nn.Linear(24, 5)).eval()
    _, _, outs, ref = roundtrip(tmp_path, net, torch.randn(6, 16) * 3)
    close_to_torch(outs[0], ref)
