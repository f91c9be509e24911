"""runtime.from_onnx on models exported by torch.onnx.export, compared with onnxruntime on the same
file: a CNN, ResNet-18, a BERT-style encoder with a dynamic sequence length, LSTM and GRU."""
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
import aimass.runtime as rt  # noqa: E402
from torch import nn  # noqa: E402
from aimass.runtime import zoo  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    warnings.filterwarnings("ignore")


def to_onnx(tmp_path, model, xs, names, dyn, opset=17):
    path = tmp_path / "m.onnx"
    torch.onnx.export(model.eval(), xs, str(path), dynamo=False, opset_version=opset, input_names=names,
                      dynamic_axes=dyn)
    return path


def compare(tmp_path, path, feeds_list, rtol=1e-4):
    out = rt.from_onnx(path, tmp_path / "m.aimass")
    so = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with rt.Session(out) as s:
        for feeds in feeds_list:
            ref = so.run(None, feeds)
            got = s.run(feeds)
            for o, r in zip(s.signature["outputs"], ref):
                g = got[o["name"]]
                assert g.shape == r.shape
                np.testing.assert_allclose(g, r, rtol=rtol, atol=rtol * max(np.abs(r).max(), 1e-30))
    return out


def test_cnn_and_resnet18(tmp_path):
    cnn = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(8, 8, 3, padding=1, stride=2), nn.Sigmoid(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(8, 4), nn.Softmax(-1))
    x = torch.randn(2, 3, 16, 16)
    p = to_onnx(tmp_path, cnn, (x,), ["x"], {"x": {0: "b"}})
    compare(tmp_path, p, [{"x": x.numpy()}, {"x": torch.randn(5, 3, 16, 16).numpy()}])
    x = torch.randn(2, 3, 64, 64)
    p = to_onnx(tmp_path, zoo.resnet18(10), (x,), ["x"], {"x": {0: "b"}})
    compare(tmp_path, p, [{"x": x.numpy()}])


def test_bert_encoder_dynamic_length(tmp_path):
    enc = zoo.bert_encoder(vocab=100, hidden=32, layers=2, heads=4, ffn=64, max_len=64)

    def feeds(n):
        mask = np.ones((2, n), np.int64)
        mask[1, n // 2:] = 0
        return {"ids": np.random.default_rng(n).integers(0, 100, (2, n)), "mask": mask}
    xs = tuple(torch.from_numpy(v) for v in feeds(9).values())
    p = to_onnx(tmp_path, enc, xs, ["ids", "mask"], {"ids": {0: "b", 1: "s"}, "mask": {0: "b", 1: "s"}}, opset=20)
    out = compare(tmp_path, p, [feeds(9), feeds(4), feeds(15)])
    assert rt.load(out).signature["inputs"][0]["shape"] == (-1, -1)


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU])
def test_rnn(tmp_path, cls, bidirectional):
    # bidirectional: ONNX direction="bidirectional", Y [S, 2, B, H] -> Transpose -> Reshape [S, B, 2H]
    class R(nn.Module):
        def __init__(self):
            super().__init__()
            self.r = cls(8, 16, 2, batch_first=True, bidirectional=bidirectional)

        def forward(self, x):
            return self.r(x)[0]
    p = to_onnx(tmp_path, R(), (torch.randn(2, 5, 8),), ["x"], {"x": {0: "b", 1: "s"}})
    compare(tmp_path, p, [{"x": np.random.default_rng(1).standard_normal((2, 5, 8), np.float32)},
                          {"x": np.random.default_rng(2).standard_normal((3, 11, 8), np.float32)}])


def test_unsupported_op_names_node_and_type(tmp_path):
    from onnx import TensorProto, helper
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 4])
    g = helper.make_graph([helper.make_node("Erf", ["x"], ["y"], name="my_erf")], "g", [x], [y])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(rt.UnsupportedOpError, match="my_erf.*Erf"):
        rt.from_onnx(m, tmp_path / "e.aimass")
    old = helper.make_model(g, opset_imports=[helper.make_opsetid("", 11)])
    with pytest.raises(ValueError, match="opset 11"):
        rt.from_onnx(old, tmp_path / "e.aimass")
    with pytest.raises(TypeError):
        rt.from_onnx(42, tmp_path / "e.aimass")
