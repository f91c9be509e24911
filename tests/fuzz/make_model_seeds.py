"""Writes the seed inputs of the model fuzz targets (run once; the fuzzer grows them):
tests/fuzz/corpus/model/seed-*    small .aimass files exported from torch (every op kind,
                                  fp32, int8 and int4 weights)
tests/fuzz/corpus/graph/seed-*    graph JSON texts over fuzz_graph.cc's fixed tensors
tests/fuzz/crashes/model/issue16-*  issue 16's model-file repros (wrapping shapes, UB casts)

    PYTHONPATH=$PWD/python python3 tests/fuzz/make_model_seeds.py
"""
import json
import os
import struct
import tempfile

from make_seeds import _out  # the data targets' writer (same folder layout)


def _file(tensors, nodes, inputs, outputs, data=b""):
    h = {k: {"dtype": dt, "shape": sh, "data_offsets": off} for k, (dt, sh, off) in tensors.items()}
    h["__metadata__"] = {"aimass.format_version": "1",
                         "aimass.signature": json.dumps({"inputs": inputs, "outputs": outputs}),
                         "aimass.graph": json.dumps({"nodes": nodes})}
    b = json.dumps(h).encode()
    return struct.pack("<Q", len(b)) + b + data


def _node(op, name, ins, out, params=None, attrs=None):
    return {"op": op, "name": name, "inputs": ins, "outputs": [out], "params": params or {}, "attrs": attrs or {}}


def model_seeds():
    import torch
    from torch import nn
    import torch.nn.functional as F
    import aimass.runtime as rt

    class Misc(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(6, 4)
            self.ln = nn.LayerNorm(4)
            self.fc = nn.Linear(12, 3)

        def forward(self, ids, img):
            e = self.ln(self.emb(ids))
            z = F.log_softmax(self.fc(e.reshape(e.size(0), -1)), dim=1)
            p = F.avg_pool2d(img, 2) * 2.0 - 1.0
            return z, F.adaptive_avg_pool2d(p, 1) / 3.0

    class Cnn(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(2, 3, 3, padding=1, stride=1, dilation=1, groups=1)
            self.bn = nn.BatchNorm2d(3)
            self.fc = nn.Linear(3 * 3 * 3, 4)

        def forward(self, x):
            x = F.max_pool2d(F.relu(self.bn(self.c(x))), 2)
            return torch.softmax(self.fc(x.flatten(1)), dim=1)

    torch.manual_seed(0)
    seeds = {
        "mlp": (nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8), nn.GELU(), nn.Linear(8, 4),
                              nn.Tanh()), (torch.randn(2, 8),), {}),
        "mlp-int8": (nn.Sequential(nn.Linear(8, 16), nn.SiLU(), nn.Linear(16, 4)), (torch.randn(2, 8),),
                     {"quantize": "int8"}),
        "mlp-int4": (nn.Sequential(nn.Linear(64, 8), nn.Sigmoid(), nn.Linear(8, 4)), (torch.randn(2, 64),),
                     {"quantize": "int4"}),
        "cnn": (Cnn(), (torch.randn(2, 2, 6, 6),), {}),
        "misc": (Misc(), (torch.randint(0, 6, (2, 3)), torch.randn(2, 2, 4, 4)), {}),
    }
    with tempfile.TemporaryDirectory() as tmp:
        for name, (net, ex, kw) in seeds.items():
            p = os.path.join(tmp, name + ".aimass")
            rt.export(net.eval(), ex, p, **kw)
            _out("model", f"seed-{name}", open(p, "rb").read())

    # the repros: shapes that wrap around 2^64 to the stored byte count, a reshape
    # whose product wraps, JSON numbers that are UB when cast to int64
    f32 = lambda n, s: {"name": n, "dtype": "float32", "shape": [-1] + s}  # noqa: E731
    i64 = lambda n, s: {"name": n, "dtype": "int64", "shape": [-1] + s}  # noqa: E731
    _out("model", "issue16-embedding-2p62x4", _file({"emb.weight": ("F32", [2 ** 62, 4], [0, 0])},
         [_node("embedding", "emb", ["ids"], "out", {"weight": "emb.weight"})], [i64("ids", [3])],
         [f32("out", [3, 4])]), "crashes")
    _out("model", "issue16-linear-2p62x16", _file({"fc.weight": ("F32", [2 ** 62, 16], [0, 0])},
         [_node("linear", "fc", ["x"], "y", {"weight": "fc.weight"})], [f32("x", [16])], [f32("y", [16])]),
         "crashes")
    _out("model", "issue16-reshape-wraps", _file({}, [_node("reshape", "r", ["x"], "y",
         attrs={"shape": [2 ** 62, 4, 4, 16]})], [f32("x", [16])], [f32("y", [16])]), "crashes")
    bad = _file({"w": ("F32", [4], [0, 16])}, [_node("identity", "i", ["x"], "y")], [f32("x", [4])],
                [f32("y", [4])], bytes(16))
    (hl,) = struct.unpack("<Q", bad[:8])
    hdr = bad[8:8 + hl].replace(b'"shape": [4]', b'"shape": [9.3e18]')
    _out("model", "issue16-json-2p63", struct.pack("<Q", len(hdr)) + hdr + bad[8 + hl:], "crashes")
    _out("model", "issue16-conv-padding-2p39", _file({"w": ("F32", [1, 1, 1, 1], [0, 4])},
         [_node("conv2d", "c", ["x"], "y", {"weight": "w"}, {"stride": 1, "padding": 2 ** 39, "dilation": 1,
                                                           "groups": 1})],
         [f32("x", [1, 2, 2])], [f32("y", [1, 2, 2])], bytes(4)), "crashes")


def graph_seeds():
    n = _node
    graphs = {
        "linear-relu": [n("linear", "fc", ["v"], "h", {"weight": "w8x8", "bias": "b8"}, {"activation": "relu"}),
                        n("activation", "a", ["h"], "g", attrs={"kind": "gelu"}),
                        n("layer_norm", "ln", ["g"], "l", {"weight": "ln_w"}, {"normalized_shape": [8], "eps": 1e-5}),
                        n("softmax", "sm", ["l"], "s", attrs={"dim": 1}),
                        n("add", "ad", ["s", "v"], "t"), n("mul", "mu", ["t"], "u", attrs={"b_scalar": 0.5}),
                        n("identity", "out", ["u"], "y")],
        "conv-pool": [n("conv2d", "c", ["x"], "c1", {"weight": "conv_w", "bias": "b3"},
                        {"stride": 1, "padding": 1, "dilation": 1, "groups": 1, "activation": "relu"}),
                      n("max_pool2d", "p", ["c1"], "p1", attrs={"kernel_size": 2, "stride": 2, "padding": 0}),
                      n("reshape", "r", ["p1"], "r1", attrs={"shape": [27]}),
                      n("linear", "fc", ["r1"], "y", {"weight": "w8x27", "bias": "b8"})],
        "avg-adaptive": [n("channel_affine", "bn", ["x"], "a1", {"scale": "ch2", "shift": "ch2"}),
                         n("avg_pool2d", "p", ["a1"], "p1", attrs={"kernel_size": 3, "stride": 1, "padding": 1,
                                                                   "count_include_pad": 0}),
                         n("adaptive_avg_pool2d", "g", ["p1"], "g1", attrs={"output_size": [2, 2]}),
                         n("reshape", "r", ["g1"], "r1", attrs={"shape": [8]}),
                         n("log_softmax", "ls", ["r1"], "y", attrs={"dim": 1})],
        "embedding": [n("embedding", "e", ["ids"], "e1", {"weight": "emb"}),
                      n("reshape", "r", ["e1"], "r1", attrs={"shape": [24]}),
                      n("linear", "fc", ["r1"], "l1", {"weight": "w8x24"}),
                      n("div", "d", ["l1"], "y", {"b": "ln_w"})],
        "quantized": [n("linear", "q8", ["v"], "h", {"weight": "q8", "weight_scale": "q8s", "bias": "b8"},
                        {"bits": 8, "group_size": 0}),
                      n("activation", "a", ["h"], "h2", attrs={"kind": "silu"}),
                      n("linear", "q4", ["h2"], "h3", {"weight": "q4", "weight_scale": "q4s"},
                        {"bits": 4, "group_size": 0}),
                      n("sub", "s", ["h3"], "y", {"a": "one"})],
    }
    for name, nodes in graphs.items():
        _out("graph", f"seed-{name}", json.dumps({"nodes": nodes}).encode())
    # attribute numbers that are UB when cast to int64, and a reshape whose product wraps
    _out("graph", "issue16-attr-1e300", json.dumps({"nodes": [n("softmax", "s", ["v"], "y", attrs={"dim": 1e300})]})
         .encode(), "crashes")
    _out("graph", "issue16-attr-nan", b'{"nodes": [{"op": "softmax", "name": "s", "inputs": ["v"], '
         b'"outputs": ["y"], "attrs": {"dim": NaN}}]}', "crashes")
    _out("graph", "issue16-reshape-wraps", json.dumps({"nodes": [
        n("reshape", "r", ["v"], "r1", attrs={"shape": [2 ** 40, 2 ** 40, 2 ** 40]}),
        n("identity", "i", ["r1"], "y")]}).encode(), "crashes")


if __name__ == "__main__":
    model_seeds()
    graph_seeds()
