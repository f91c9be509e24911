"""quantize_model / QuantizedLinear on a small MLP: outputs within the documented
tolerance of the fp32 model (docs/qlinear.md)."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from aimass.compress import QuantizedLinear, quantize_model  # noqa: E402


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
