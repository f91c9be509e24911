"""NaN and +-inf through every runtime op and every compress.linear path, at every SIMD
level (issue 16). The runtime follows torch: NaN propagates, +-inf give what IEEE gives
(compared with torch in float64, whose placement of NaN / +-inf does not depend on the
summation order). Quantized linears (runtime int8/int4 layers and compress.linear) follow
their own documented contract: a row of x holding NaN or +-inf gives an all-NaN output row."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
import aimass  # noqa: E402
import aimass.runtime as rt  # noqa: E402
from torch import nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

LEVELS = ["scalar", "avx2", "avx512"]
SPECIALS = [np.nan, np.inf, -np.inf]


@pytest.fixture(params=LEVELS)
def level(request):
    prev = aimass.cpu_features()["simd"]
    aimass.set_simd_level(request.param)
    yield request.param
    aimass.set_simd_level(prev)


@pytest.fixture(params=[256, 0], ids=["packed", "no-packed"])
def packed_rows(request):
    prev = rt._rt.set_packed_max_rows(request.param)
    yield request.param
    rt._rt.set_packed_max_rows(prev)


def same_specials(got, ref, rtol=1e-4):
    """NaN where ref is NaN, +inf / -inf where ref has them, finite values close."""
    got = np.asarray(got, np.float64)
    ref = np.asarray(ref, np.float64)
    assert got.shape == ref.shape
    for name, f in (("NaN", np.isnan), ("+inf", np.isposinf), ("-inf", np.isneginf)):
        bad = f(got) != f(ref)
        assert not bad.any(), f"{name} differs at {np.argwhere(bad)[:5].tolist()}: got {got[bad][:5]}, " \
                              f"torch {ref[bad][:5]}"
    fin = np.isfinite(ref)
    scale = max(float(np.abs(ref[fin]).max(initial=0.0)), 1e-30)
    np.testing.assert_allclose(got[fin], ref[fin], rtol=rtol, atol=rtol * scale)


def sprinkle(x, seed, frac=0.1):
    """x with NaN / +inf / -inf at random places (seeded), and one row of each kind."""
    g = np.random.default_rng(seed)
    x = x.copy()
    flat = x.reshape(len(x), -1)
    mask = g.random(flat.shape) < frac
    flat[mask] = g.choice(SPECIALS, size=int(mask.sum()))
    for r, v in enumerate(SPECIALS):
        if r < len(x):
            flat[r, g.integers(flat.shape[1])] = v
    return x


def run_model(tmp_path, net, example, x, **kw):
    path = tmp_path / "m.aimass"
    rt.export(net.eval(), (example,), path, **kw)
    ex = rt._rt.Executor(rt.load(path)._m, 8)
    return ex.run([x])


def ref64(net, x):
    with torch.no_grad():
        return net.double()(torch.from_numpy(x).double()).numpy()


# ------------------------------------------------------------------ the repro
@pytest.mark.parametrize("rows", [1, 3, 8, 300])
def test_nan_through_linear_relu_linear(tmp_path, level, packed_rows, rows):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    x = np.random.default_rng(1).standard_normal((rows, 16)).astype(np.float32)
    x[0, 3] = np.nan  # torch: the whole output row is NaN (the old ReLU turned it into the last bias)
    got = run_model(tmp_path, net, torch.randn(2, 16), x)[0]
    assert np.isnan(got[0]).all()
    assert np.isfinite(got[1:]).all()
    same_specials(got, ref64(net, x))


@pytest.mark.parametrize("act", ["relu", "gelu", "gelu_tanh", "silu", "sigmoid", "tanh"])
@pytest.mark.parametrize("rows", [3, 300])
def test_linear_fused_activation_specials(tmp_path, level, packed_rows, act, rows):
    mods = {"relu": nn.ReLU(), "gelu": nn.GELU(), "gelu_tanh": nn.GELU(approximate="tanh"), "silu": nn.SiLU(),
            "sigmoid": nn.Sigmoid(), "tanh": nn.Tanh()}
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(12, 40), mods[act])
    x = sprinkle(np.random.default_rng(2).standard_normal((rows, 12)).astype(np.float32), 3, frac=0.03)
    got = run_model(tmp_path, net, torch.randn(2, 12), x)[0]
    with torch.no_grad():
        pre = net[0].double()(torch.from_numpy(x).double())
    same_specials(got, scalar_act(mods[act], pre))


def scalar_act(mod, t, every=False):
    """torch's scalar (one element at a time) result: its vectorized GELU gives NaN at +inf
    (and +inf at 3e38) where the formula and torch's scalar path give +inf (3e38), see
    docs/numerics.md. `every`: all elements one at a time, else only the non-finite ones."""
    with torch.no_grad():
        out = mod(t).reshape(-1).clone()
        flat = t.reshape(-1)
        pick = torch.ones_like(flat, dtype=torch.bool) if every else ~torch.isfinite(flat)
        for i in torch.nonzero(pick).reshape(-1).tolist():
            out[i] = mod(flat[i:i + 1])[0]
    return out.reshape(t.shape).numpy()


@pytest.mark.parametrize("act", ["relu", "gelu", "gelu_tanh", "silu", "sigmoid", "tanh"])
def test_standalone_activation_specials(tmp_path, level, act):
    mods = {"relu": nn.ReLU(), "gelu": nn.GELU(), "gelu_tanh": nn.GELU(approximate="tanh"), "silu": nn.SiLU(),
            "sigmoid": nn.Sigmoid(), "tanh": nn.Tanh()}
    x = np.array([[np.nan, np.inf, -np.inf, -0.0, 0.0, 1.5, -1.5, 3e38, -3e38, 1e-40, 88.0, -88.0]] * 3,
                 np.float32)
    got = run_model(tmp_path, mods[act], torch.randn(2, 12), x)[0]
    ref = scalar_act(mods[act], torch.from_numpy(x), every=True)
    same_specials(got, ref)
    if act == "relu":  # -0 stays -0 like torch.relu
        assert np.signbit(got[0, 3]) == np.signbit(ref[0, 3])


class ConvNet(nn.Module):
    def __init__(self, pool):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.pool = pool

    def forward(self, x):
        return self.pool(F.relu(self.conv(x)))


@pytest.mark.parametrize("pool", ["max2", "max3s2p1", "avg2", "avg3p1", "adaptive"])
def test_conv_relu_pool_specials(tmp_path, level, pool):
    pools = {"max2": nn.MaxPool2d(2), "max3s2p1": nn.MaxPool2d(3, stride=2, padding=1), "avg2": nn.AvgPool2d(2),
             "avg3p1": nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False),
             "adaptive": nn.AdaptiveAvgPool2d((3, 2))}
    torch.manual_seed(0)
    net = ConvNet(pools[pool])
    x = sprinkle(np.random.default_rng(4).standard_normal((4, 3, 8, 8)).astype(np.float32), 5, frac=0.01)
    got = run_model(tmp_path, net, torch.randn(2, 3, 8, 8), x)[0]
    same_specials(got, ref64(net, x))


def test_pool_specials_direct(tmp_path, level):
    # pools straight on the special values (no conv before them)
    x = sprinkle(np.random.default_rng(6).standard_normal((4, 2, 6, 6)).astype(np.float32), 7, frac=0.1)
    for mod in (nn.MaxPool2d(2), nn.MaxPool2d(3, stride=1, padding=1), nn.AvgPool2d(2), nn.AdaptiveAvgPool2d(2)):
        got = run_model(tmp_path, mod, torch.randn(2, 2, 6, 6), x)[0]
        with torch.no_grad():
            ref = mod(torch.from_numpy(x)).numpy()
        same_specials(got, ref)


@pytest.mark.parametrize("mod", [
    nn.MaxPool2d(7, stride=1, padding=3), nn.MaxPool2d(5, stride=2, padding=2, dilation=2),
    nn.MaxPool2d(6, stride=3, padding=3), nn.AvgPool2d(7, stride=1, padding=3),
    nn.AvgPool2d(6, stride=2, padding=3, count_include_pad=False), nn.AvgPool2d(5, stride=3, padding=2),
    nn.AvgPool2d(11), nn.AvgPool2d((2, 40), stride=(2, 3)),
    nn.MaxPool2d((3, 33), stride=(1, 4), padding=(1, 16), dilation=(1, 2))],
    ids=["max7", "max5d2", "max6s3", "avg7", "avg6nopad", "avg5s3", "avg11", "avg2x40", "max3x33d2"])
def test_large_window_pools(tmp_path, mod):
    # windows past 16 taps take the two-pass (rows, then columns) block path: same answers as torch,
    # specials included (a NaN or inf reaches only the windows that hold it)
    rng = np.random.default_rng(9)
    w = 301 if max(mod.kernel_size if isinstance(mod.kernel_size, tuple) else (mod.kernel_size,)) > 13 else 11
    x = rng.standard_normal((3, 2, 13, w)).astype(np.float32)
    got = run_model(tmp_path, mod, torch.randn(2, 2, 13, w), x)[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, mod(torch.from_numpy(x)).numpy(), rtol=1e-5, atol=1e-6)
    xs = sprinkle(x, 10, frac=0.02)
    got = run_model(tmp_path, mod, torch.randn(2, 2, 13, w), xs)[0]
    with torch.no_grad():
        same_specials(got, mod(torch.from_numpy(xs)).numpy())


class Softmaxes(nn.Module):
    def __init__(self, dim, log):
        super().__init__()
        self.dim, self.log = dim, log

    def forward(self, x):
        return F.log_softmax(x, self.dim) if self.log else F.softmax(x, self.dim)


@pytest.mark.parametrize("log", [False, True])
@pytest.mark.parametrize("dim", [1, 2])
def test_softmax_specials(tmp_path, level, dim, log):
    x = np.random.default_rng(8).standard_normal((6, 5, 7)).astype(np.float32)
    x[0, 1, 2] = np.nan
    x[1, 2, 3] = np.inf
    x[2, 3, 4] = -np.inf
    x[3, :, :] = -np.inf  # all -inf rows: NaN in torch
    x[4, 0, 0] = np.inf
    x[4, 1, 0] = np.inf  # two +inf
    net = Softmaxes(dim, log)
    got = run_model(tmp_path, net, torch.randn(2, 5, 7), x)[0]
    with torch.no_grad():
        ref = net(torch.from_numpy(x)).numpy()
    same_specials(got, ref)


def test_layer_norm_specials(tmp_path, level):
    torch.manual_seed(0)
    net = nn.Sequential(nn.LayerNorm(16))
    with torch.no_grad():
        net[0].weight.normal_()
        net[0].bias.normal_()
    x = sprinkle(np.random.default_rng(9).standard_normal((5, 16)).astype(np.float32), 10, frac=0.05)
    got = run_model(tmp_path, net, torch.randn(2, 16), x)[0]
    with torch.no_grad():
        ref = net(torch.from_numpy(x)).numpy()
    same_specials(got, ref)


class Binary(nn.Module):
    def forward(self, a, b):
        return (a + b) * 2.0, a - b, a * b, a / b


def test_binary_specials(tmp_path, level):
    vals = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 1.0, -2.5], np.float32)
    a = np.repeat(vals, len(vals))[None].repeat(2, 0)
    b = np.tile(vals, len(vals))[None].repeat(2, 0)
    path = tmp_path / "b.aimass"
    net = Binary().eval()
    rt.export(net, (torch.randn(2, a.shape[1]), torch.randn(2, a.shape[1])), path)
    got = rt._rt.Executor(rt.load(path)._m, 4).run([a, b])
    with torch.no_grad():
        ref = net(torch.from_numpy(a), torch.from_numpy(b))
    for g, r in zip(got, ref):
        same_specials(g, r.numpy())


def test_channel_affine_specials(tmp_path, level):
    # a BatchNorm that cannot be folded (its input is a graph input) runs as channel_affine
    torch.manual_seed(0)
    net = nn.Sequential(nn.BatchNorm2d(3)).eval()
    with torch.no_grad():
        net[0].running_mean.normal_()
        net[0].running_var.uniform_(0.5, 2)
    x = sprinkle(np.random.default_rng(11).standard_normal((3, 3, 4, 4)).astype(np.float32), 12, frac=0.05)
    got = run_model(tmp_path, net, torch.randn(2, 3, 4, 4), x)[0]
    with torch.no_grad():
        ref = net(torch.from_numpy(x)).numpy()
    same_specials(got, ref)


@pytest.mark.parametrize("quantize", ["int8", "int4"])
@pytest.mark.parametrize("rows", [1, 8, 64])
def test_quantized_linear_nonfinite_rows_are_nan(tmp_path, level, quantize, rows):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 16))
    x = np.random.default_rng(13).standard_normal((rows, 128)).astype(np.float32)
    bad = list(range(min(rows, 3)))
    for r, v in zip(bad, SPECIALS):
        x[r, 7] = v
    got = run_model(tmp_path, net, torch.randn(2, 128), x, quantize=quantize)[0]
    assert np.isnan(got[bad]).all()
    assert np.isfinite(np.delete(got, bad, axis=0)).all()


# ------------------------------------------------------------------ compress.linear, every path
@pytest.mark.parametrize("bits,group", [(8, None), (4, 128)])
def test_compress_linear_nonfinite_row_is_nan_on_every_path(level, bits, group):
    import aimass.compress as C
    from aimass.compress.qlinear import quantize_weight
    rng = np.random.default_rng(14)
    qw = quantize_weight(rng.standard_normal((48, 256)).astype(np.float32), bits=bits, group_size=group)
    bias = rng.standard_normal(48).astype(np.float32)
    for kernel in ("auto", "weight_only", "dynamic_int8", "dequant_sgemm"):
        for prec in ("int16", "fp32"):
            for m in (1, 5, 40):
                x = rng.standard_normal((m, 256)).astype(np.float32)
                bad = list(range(min(m, 3)))
                for r, v in zip(bad, SPECIALS):
                    x[r, 100 + r] = v
                y = np.asarray(C.linear(x, qw, bias, kernel=kernel, activation_precision=prec))
                where = f"{kernel}/{prec}/M={m}/{level}"
                assert np.isnan(y[bad]).all(), where
                assert np.isfinite(np.delete(y, bad, axis=0)).all(), where
