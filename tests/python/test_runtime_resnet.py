"""ResNet-18 and ResNet-50 (written out as torchvision defines them) through the runtime: BatchNorm
folded into the convs, residual add + ReLU fused into the conv step, global average pooling."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
import aimass.runtime as rt  # noqa: E402
from aimass.runtime import zoo  # noqa: E402

from _rt_util import close  # noqa: E402


def randomize_bn(model):
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.1, 0.1)
    return model.eval()


@pytest.mark.parametrize("name,blocks,expected_steps", [("resnet18", 8, 25), ("resnet50", 16, 58)])
def test_resnet_matches_torch_with_fused_residuals(tmp_path, name, blocks, expected_steps):
    torch.manual_seed(0)
    model = randomize_bn(getattr(zoo, name)(num_classes=10))
    x = torch.randn(2, 3, 64, 64)
    path = tmp_path / f"{name}.aimass"
    rt.export(model, (x,), path)
    graph = rt.load(path).metadata["aimass.graph"]
    assert "batch_norm" not in graph and '"channel_affine"' not in graph  # every BN folded
    ex = rt._rt.Executor(rt.load(path)._m, 4)
    # every block's `out += identity; relu(out)` runs inside its last conv step
    assert ex.num_steps == expected_steps
    with torch.no_grad():
        ref = model(x)
    close(ex.run([x.numpy()])[0], ref)
    with rt.Session(path) as s:  # single rows through the batcher too
        got = s.run({"x": x[:1].numpy()})["output"]
    close(got, ref[:1])


def test_residual_relu_keeps_nan_like_torch(tmp_path):
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c = torch.nn.Conv2d(2, 2, 3, padding=1)

        def forward(self, x):
            y = self.c(x)
            y += x
            return torch.relu(y)
    torch.manual_seed(0)
    m = Block().eval()
    x = torch.randn(1, 2, 5, 5)
    x[0, 0, 2, 2] = float("nan")
    rt.export(m, (x,), tmp_path / "b.aimass")
    ex = rt._rt.Executor(rt.load(tmp_path / "b.aimass")._m, 1)
    assert ex.num_steps == 2  # conv(+residual+relu), output
    got = ex.run([x.numpy()])[0]
    with torch.no_grad():
        ref = m(x).numpy()
    np.testing.assert_array_equal(np.isnan(got), np.isnan(ref))
    close(np.nan_to_num(got), torch.from_numpy(np.nan_to_num(ref)))
