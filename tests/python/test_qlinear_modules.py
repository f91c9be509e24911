"""quantize_model / QuantizedLinear on a small MLP: outputs within the documented
tolerance of the fp32 model (docs/qlinear.md)."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from aimass.compress import QuantizedLinear, dequantize_weight, quantize_model  # noqa: E402


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 256), nn.GELU(), nn.Linear(256, 10, bias=False))


def rel_err(a, b):
    return float((a - b).norm() / b.norm())  # relative Frobenius error


@pytest.mark.parametrize("bits,tol", [(8, 0.03), (4, 0.25)])
@pytest.mark.parametrize("batch", [1, 5, 64])
def test_mlp_within_tolerance(bits, tol, batch):
    model = mlp()
    x = torch.randn(batch, 256)
    ref = model(x).detach()
    q = quantize_model(model, bits=bits, group_size=128)
    assert q is model
    assert sum(isinstance(m, QuantizedLinear) for m in model.modules()) == 3
    y = model(x)
    assert y.dtype == torch.float32 and y.shape == ref.shape and not y.requires_grad
    assert rel_err(y, ref) < tol


def test_min_features_bias_and_group_skip():
    model = mlp()
    quantize_model(model, bits=4, group_size=128, min_features=512)
    kinds = [type(m).__name__ for m in model]
    assert kinds == ["Linear", "GELU", "QuantizedLinear", "GELU", "Linear"]
    assert model[2].bias is not None and model[2].group_size == 128
    m2 = nn.Sequential(nn.Linear(96, 8))  # 128 does not divide 96: stays fp32
    quantize_model(m2, bits=4, group_size=128)
    assert isinstance(m2[0], nn.Linear)
    single = quantize_model(nn.Linear(64, 4), bits=8)
    assert isinstance(single, QuantizedLinear)


def test_state_dict_roundtrip_and_dtypes():
    model = quantize_model(mlp(1), bits=8)
    x = torch.randn(3, 256)
    y = model(x)
    fresh = quantize_model(mlp(2), bits=8)
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(fresh(x), y)
    yh = model(x.to(torch.bfloat16))
    assert yh.dtype == torch.bfloat16
    assert model(x.t().contiguous().t()).shape == (3, 10)  # non-contiguous input is made contiguous
    assert model(torch.randn(2, 4, 256)).shape == (2, 4, 10)


def test_bad_arguments():
    with pytest.raises(ValueError, match="bits"):
        quantize_model(mlp(), bits=2)
    with pytest.raises(ValueError, match="group_size"):
        quantize_model(mlp(), bits=4, group_size=None)
    with pytest.raises(TypeError, match="nn.Module"):
        quantize_model(object())
    layer = quantize_model(nn.Linear(64, 4), bits=8)
    with pytest.raises(ValueError, match="in_features=64"):
        layer(torch.randn(2, 63))


def test_activation_precision_option():
    from aimass import compress
    torch.manual_seed(4)
    lin = nn.Linear(256, 48)
    q16 = quantize_model(nn.Linear(256, 48), bits=8)
    q16.load_state_dict(quantize_model(lin, bits=8).state_dict())
    q32 = QuantizedLinear.from_linear(lin, bits=8, activation_precision="fp32")
    assert "activation_precision='int16'" in repr(q16) and q32.activation_precision == "fp32"
    x = torch.randn(2, 3, 256, requires_grad=True)
    y16, y32 = q16(x), q32(x)
    assert y16.shape == (2, 3, 48) and not y16.requires_grad
    # the module's fast path is the same computation as compress.linear
    torch.testing.assert_close(y16, compress.linear(x.detach(), q16.packed(), q16.bias), rtol=0, atol=0)
    torch.testing.assert_close(y32, compress.linear(x.detach(), q32.packed(), q32.bias, activation_precision="fp32"),
                               rtol=0, atol=0)
    # int16 rounding: |dy| <= max|x_row| / 65534 * sum|w_row|
    w = torch.from_numpy(compress.dequantize_weight(q32.packed())).double()
    bound = x.detach().abs().amax(-1, keepdim=True).double() / 65534 * w.abs().sum(1) + 1e-5
    assert ((y16.double() - y32.double()).abs() <= bound).all()
    with pytest.raises(ValueError, match="activation_precision"):
        quantize_model(nn.Linear(64, 4), bits=8, activation_precision="int8")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("packed_first", [False, True])
def test_half_and_bfloat16_modules_keep_fp32_scales(dtype, packed_first):
    """model.half() / .to(torch.bfloat16) on a quantized model: the scales stay fp32 (no
    rounding of the quantization grid), the bias follows the module, and it runs in x's
    dtype whether or not it had been packed before the cast."""
    torch.manual_seed(5)
    model = quantize_model(nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 8)), bits=8)
    x = torch.randn(4, 64)
    ref = model(x)
    if packed_first:
        model(x)
    model = model.to(dtype)
    assert model[0].qscale.dtype == torch.float32 and model[0].bias.dtype == dtype
    y = model(x.to(dtype))
    assert y.dtype == dtype
    tol = 2e-2 if dtype == torch.bfloat16 else 2e-3
    torch.testing.assert_close(y.float(), ref, rtol=tol, atol=tol * float(ref.abs().max()))
    assert model.state_dict()["0.qscale"].dtype == torch.float32


def test_fast_path_follows_bias_and_option_changes():
    """forward's cached binding arguments follow a reassigned bias buffer, a bias set to None,
    a bias assigned as an nn.Parameter, and changed kernel / activation_precision."""
    torch.manual_seed(3)
    q = QuantizedLinear.from_linear(nn.Linear(256, 67), bits=4, group_size=128)
    x = torch.randn(1, 256)
    with torch.no_grad():
        y0 = q(x)
        nobias = q(x) - q.bias
        q.bias = torch.full((67,), 2.0)
        torch.testing.assert_close(q(x), nobias + 2.0)
        q.bias = None
        torch.testing.assert_close(q(x), nobias)
        q.bias = nn.Parameter(torch.full((67,), -1.0), requires_grad=False)
        torch.testing.assert_close(q(x), nobias - 1.0)
        q.bias = None
        q.activation_precision = "fp32"
        y32 = q(x)
        q.activation_precision = "int16"
        q.kernel = "dynamic_int8"
        y8 = q(x)
    exact = torch.from_numpy(x.numpy().astype(np.float64) @ dequantize_weight(q.packed()).T)
    assert (y32.double() - exact).abs().max() < 1e-5 * exact.abs().max()
    assert (y8.double() - exact).abs().max() < 2e-2 * exact.abs().max()
    assert not torch.equal(y32, y8) and not torch.equal(y0, nobias)
