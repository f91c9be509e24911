"""Hostile .aimass files (issue 16): shapes, offsets and numbers chosen to wrap around
2^64, reach undefined casts or index out of bounds are rejected with a typed error naming
the tensor / node, at load or plan build, never a crash at run time."""
import json
import struct

import numpy as np
import pytest

import aimass
import aimass.runtime as rt


def write_model(path, tensors, nodes, inputs, outputs, data=b"", raw_header=None):
    """A hand-made .aimass file: tensors = {name: (dtype, shape, [begin, end])}."""
    header = {name: {"dtype": dt, "shape": list(shape), "data_offsets": list(offs)}
              for name, (dt, shape, offs) in tensors.items()}
    header["__metadata__"] = {
        "aimass.format_version": "1",
        "aimass.signature": json.dumps({"inputs": inputs, "outputs": outputs}),
        "aimass.graph": json.dumps({"nodes": nodes}),
    }
    h = raw_header if raw_header is not None else json.dumps(header).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)
    return path


def f32(name, shape):
    return {"name": name, "dtype": "float32", "shape": [-1] + list(shape)}


def i64(name, shape):
    return {"name": name, "dtype": "int64", "shape": [-1] + list(shape)}


def node(op, name, inputs, out, params=None, attrs=None):
    return {"op": op, "name": name, "inputs": inputs, "outputs": [out], "params": params or {},
            "attrs": attrs or {}}


# ---------------------------------------------------------------- the repros
def test_embedding_weight_shape_wraps_to_zero_bytes(tmp_path):
    # [2**62, 4] F32 = 2**66 bytes, which wraps to 0 = the stored byte count
    p = write_model(tmp_path / "e.aimass", {"emb.weight": ("F32", [2 ** 62, 4], [0, 0])},
                    [node("embedding", "emb", ["ids"], "out", {"weight": "emb.weight"})],
                    [i64("ids", [3])], [f32("out", [3, 4])])
    with pytest.raises(aimass.CorruptDataError, match="tensor 'emb.weight'.*(overflow|dims must be in)"):
        rt.load(p)


def test_linear_weight_shape_wraps(tmp_path):
    p = write_model(tmp_path / "l.aimass", {"fc.weight": ("F32", [2 ** 62, 16], [0, 0])},
                    [node("linear", "fc", ["x"], "y", {"weight": "fc.weight"})],
                    [f32("x", [16])], [f32("y", [2 ** 62])])
    with pytest.raises(aimass.CorruptDataError, match="tensor 'fc.weight'"):
        rt.Session(p)


@pytest.mark.parametrize("shape", [[2 ** 62, 4], [2 ** 32, 2 ** 32], [-1, -4], [2 ** 41, 1]])
def test_tensor_shapes_checked_at_load(tmp_path, shape):
    p = write_model(tmp_path / "t.aimass", {"w": ("F32", shape, [0, 0])},
                    [node("identity", "i", ["x"], "y")], [f32("x", [4])], [f32("y", [4])])
    with pytest.raises(aimass.CorruptDataError, match="tensor 'w'"):
        rt.load(p)


def test_reshape_dims_whose_product_wraps(tmp_path):
    # 2**32 * 2**32 * 4 wraps to 0 in 64 bits; 2**62 * 4 * 4 wraps to 16 (the input's numel)
    for dims in ([2 ** 32, 2 ** 32, 16], [2 ** 62, 4, 4, 16], [2 ** 40, 2 ** 40, 2 ** 40]):
        p = write_model(tmp_path / "r.aimass", {},
                        [node("reshape", "r", ["x"], "y", attrs={"shape": dims})],
                        [f32("x", [16])], [f32("y", dims)])
        with pytest.raises(ValueError, match="overflow|must be in|reshape|dims must"):
            rt.Session(p)


@pytest.mark.parametrize("bad", ["9.3e18", "1e300", "Infinity", "-Infinity", "NaN", "2.5", "9223372036854775808"])
def test_json_numbers_that_are_not_int64(tmp_path, bad):
    # shape / data_offsets numbers that would be UB when cast to int64
    hdr = ('{"w": {"dtype": "F32", "shape": [%s], "data_offsets": [0, 16]}, "__metadata__": {}}' % bad).encode()
    p = write_model(tmp_path / "n.aimass", {}, [], [], [], data=bytes(16), raw_header=hdr)
    with pytest.raises(aimass.CorruptDataError, match="tensor 'w' shape entry 0.*(int64 range|not an integer)"):
        rt.load(p)
    hdr = ('{"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, %s]}, "__metadata__": {}}' % bad).encode()
    p = write_model(tmp_path / "o.aimass", {}, [], [], [], data=bytes(16), raw_header=hdr)
    with pytest.raises(aimass.CorruptDataError, match="tensor 'w' data_offsets"):
        rt.load(p)


@pytest.mark.parametrize("bad", [1e300, 2.0 ** 63, 2.5, -2.0 ** 70])
def test_graph_attrs_that_are_not_int64(tmp_path, bad):
    p = write_model(tmp_path / "a.aimass", {},
                    [node("softmax", "sm", ["x"], "y", attrs={"dim": bad})], [f32("x", [4])], [f32("y", [4])])
    with pytest.raises(ValueError, match="node 'sm'.*attribute 'dim'"):
        rt.Session(p)
    # NaN / inf are written by Python's json as NaN / Infinity literals
    for lit in ("NaN", "Infinity"):
        g = json.dumps({"nodes": [node("softmax", "sm", ["x"], "y", attrs={"dim": 1})]}).replace('"dim": 1',
                                                                                            '"dim": ' + lit)
        hdr = json.dumps({"__metadata__": {"aimass.format_version": "1", "aimass.graph": g,
                                           "aimass.signature": json.dumps({"inputs": [f32("x", [4])],
                                                                           "outputs": [f32("y", [4])]})}})
        p = write_model(tmp_path / "b.aimass", {}, [], [], [], raw_header=hdr.encode())
        with pytest.raises(ValueError, match="attribute 'dim'.*int64 range"):
            rt.Session(p)


def test_embedding_index_out_of_range_names_node_index_and_range(tmp_path):
    w = np.arange(12, dtype=np.float32).reshape(3, 4)
    p = write_model(tmp_path / "e.aimass", {"emb.weight": ("F32", [3, 4], [0, 48])},
                    [node("embedding", "emb", ["ids"], "out", {"weight": "emb.weight"})],
                    [i64("ids", [2])], [f32("out", [2, 4])], data=w.tobytes())
    with rt.Session(p) as s:
        np.testing.assert_array_equal(s.run({"ids": np.array([[2, 0]])})["out"][0], w[[2, 0]])
        for bad in (3, -1, 2 ** 62, -(2 ** 63)):
            with pytest.raises(ValueError, match=rf"node 'emb' \(embedding\): index {bad} .*valid range \[0, 2\]"):
                s.run({"ids": np.array([[0, bad]])})
        # the session keeps serving after a bad request
        assert s.run({"ids": np.array([[1, 1]])})["out"].shape == (1, 2, 4)


# ---------------------------------------------------------------- header / data region
def test_header_length_past_file_and_offsets_outside_data(tmp_path):
    p = tmp_path / "h.aimass"
    for hlen in (2 ** 64 - 1, 2 ** 63, 100):
        p.write_bytes(struct.pack("<Q", hlen) + b"{}")
        with pytest.raises(aimass.CorruptDataError, match="exceeds the file"):
            rt.load(p)
    for offs in ([0, 20], [8, 24], [2 ** 62, 2 ** 62 + 16], [16, 8], [-16, 0]):
        q = write_model(tmp_path / "o.aimass", {"w": ("F32", [4], offs)},
                        [node("identity", "i", ["x"], "y")], [f32("x", [4])], [f32("y", [4])], data=bytes(16))
        with pytest.raises(aimass.CorruptDataError, match="tensor 'w'"):
            rt.load(q)


@pytest.mark.parametrize("dtype,nbytes", [("F32", 12), ("F16", 16), ("I64", 16), ("I8", 3), ("F64", 8)])
def test_dtype_vs_byte_count(tmp_path, dtype, nbytes):
    p = write_model(tmp_path / "d.aimass", {"w": (dtype, [4], [0, nbytes])},
                    [node("identity", "i", ["x"], "y")], [f32("x", [4])], [f32("y", [4])], data=bytes(64))
    with pytest.raises(aimass.CorruptDataError, match=f"tensor 'w' holds {nbytes} bytes .*dtype {dtype}"):
        rt.load(p)


def test_graph_references_and_cycles(tmp_path):
    sig = ([f32("x", [4])], [f32("y", [4])])
    # a node that reads its own output / a later node's output: a cycle is a forward reference
    p = write_model(tmp_path / "c.aimass", {},
                    [node("add", "a", ["x", "z"], "y"), node("identity", "b", ["y"], "z")], *sig)
    with pytest.raises(ValueError, match="node 'a'.*reads value 'z' that no graph input or earlier node produces"):
        rt.load(p)
    p = write_model(tmp_path / "s.aimass", {}, [node("relu_self", "a", ["y"], "y")], *sig)
    with pytest.raises(ValueError, match="reads value 'y'"):
        rt.load(p)
    p = write_model(tmp_path / "m.aimass", {}, [node("linear", "fc", ["x"], "y", {"weight": "nope"})], *sig)
    with pytest.raises(ValueError, match="tensor 'nope'.*not in the file"):
        rt.load(p)
    p = write_model(tmp_path / "r.aimass", {}, [node("identity", "a", ["x"], "x")], *sig)
    with pytest.raises(ValueError, match="redefines value 'x'"):
        rt.load(p)


@pytest.mark.parametrize("op,attrs,msg", [
    ("max_pool2d", {"kernel_size": 0, "stride": 1, "padding": 0}, "kernel/stride"),
    ("max_pool2d", {"kernel_size": 2, "stride": 0, "padding": 0}, "kernel/stride"),
    ("max_pool2d", {"kernel_size": 2, "stride": 1, "padding": -1}, "padding >= 0"),
    ("max_pool2d", {"kernel_size": 2 ** 40, "stride": 1, "padding": 0, "dilation": 2 ** 40}, "overflow"),
    ("max_pool2d", {"kernel_size": 9, "stride": 1, "padding": 0}, "larger than the padded input"),
    ("avg_pool2d", {"kernel_size": 2, "stride": 1, "padding": 2 ** 41}, "must be in"),
    ("avg_pool2d", {"kernel_size": 2, "stride": 1, "padding": [1, 2, 3]}, "must have 2 values"),
    # fuzz_graph finding: padding 2^32 made every window lie outside the image (count overflowed)
    ("avg_pool2d", {"kernel_size": 3, "stride": 2 ** 40, "padding": 2 ** 32, "count_include_pad": 0},
     "must be at most half the window"),
    ("max_pool2d", {"kernel_size": 2, "stride": 1, "padding": 2}, "must be at most half the window"),
    ("adaptive_avg_pool2d", {"output_size": [0, 1]}, "must be positive"),
    ("softmax", {"dim": 0}, "non-batch dimension"),
    ("softmax", {"dim": 9}, "non-batch dimension"),
    ("layer_norm", {"normalized_shape": [4], "eps": -1.0}, "eps"),
    ("layer_norm", {"normalized_shape": [5], "eps": 1e-5}, "does not end the input row"),
    ("add", {"b_scalar": []}, "must be one number"),
])
def test_op_attribute_ranges(tmp_path, op, attrs, msg):
    p = write_model(tmp_path / "a.aimass", {}, [node(op, "n", ["x"], "y", attrs=attrs)],
                    [f32("x", [2, 4, 4])], [f32("y", [2, 4, 4])])
    with pytest.raises(ValueError, match=msg):
        rt.Session(p)


def test_conv_with_huge_padding_and_memory_cap(tmp_path):
    w = np.ones((1, 1, 1, 1), np.float32)
    p = write_model(tmp_path / "c.aimass", {"w": ("F32", [1, 1, 1, 1], [0, 4])},
                    [node("conv2d", "c", ["x"], "y", {"weight": "w"},
                          {"stride": 1, "padding": 2 ** 39, "dilation": 1, "groups": 1})],
                    [f32("x", [1, 2, 2])], [f32("y", [1, 2, 2])], data=w.tobytes())
    # 2^40 x 2^40 output pixels: rejected by checked arithmetic, no allocation is tried
    with pytest.raises(ValueError, match="node 'c'.*(overflow|must be in|bytes)"):
        rt.Session(p)


def test_signature_shapes_checked(tmp_path):
    for shape in ([2 ** 40, 2 ** 40], [2 ** 41]):
        p = write_model(tmp_path / "s.aimass", {}, [node("identity", "i", ["x"], "y")],
                        [f32("x", shape)], [f32("y", shape)])
        with pytest.raises(ValueError, match="signature: x"):
            rt.load(p)


def test_zero_sized_values_rejected(tmp_path):
    # a Linear with a [0, 4] weight would give a 0-wide value and a division by zero later
    p = write_model(tmp_path / "z.aimass", {"w": ("F32", [0, 4], [0, 0])},
                    [node("linear", "fc", ["x"], "h", {"weight": "w"}),
                     node("linear", "fc2", ["h"], "y", {"weight": "w"})],
                    [f32("x", [4])], [f32("y", [4])])
    with pytest.raises(ValueError, match="value 'h'.*must be in \\[1"):
        rt.Session(p)


def test_quantized_linear_attrs_checked(tmp_path):
    for attrs, msg in (({"bits": 1e300}, "attribute 'bits'"), ({"bits": 3}, "bits=3 must be 8 or 4"),
                       ({"bits": 8, "group_size": -4}, "group_size=-4"),
                       ({"bits": 8, "group_size": 0.5}, "attribute 'group_size'")):
        p = write_model(tmp_path / "q.aimass", {"w": ("I8", [4, 4], [0, 16]), "s": ("F32", [4], [16, 32])},
                        [node("linear", "fc", ["x"], "y", {"weight": "w", "weight_scale": "s"}, attrs)],
                        [f32("x", [4])], [f32("y", [4])],
                        data=bytes(16) + np.ones(4, np.float32).tobytes())
        with pytest.raises(ValueError, match=msg):
            rt.Session(p)


# ---------------------------------------------------------------- messages (Session / export arguments)
@pytest.fixture
def linear_model(tmp_path):
    torch = pytest.importorskip("torch")
    path = tmp_path / "lin.aimass"
    rt.export(torch.nn.Sequential(torch.nn.Linear(4, 2)).eval(), (torch.randn(2, 4),), path, input_names=["x"])
    return path


def test_scalar_and_wrong_shape_inputs_say_the_real_shape(linear_model):
    with rt.Session(linear_model) as s:
        with pytest.raises(ValueError, match=r"input 'x' has shape \[\] \(a scalar\); the model expects \[batch, 4\]"):
            s.run({"x": np.float32(3.0)})
        with pytest.raises(ValueError, match=r"input 'x' has shape \[5\]; the model expects \[batch, 4\] or one"):
            s.run({"x": np.zeros(5, np.float32)})
        with pytest.raises(ValueError, match=r"input 'x' has shape \[2, 5\]"):
            s.run({"x": np.zeros((2, 5), np.float32)})
        with pytest.raises(ValueError, match=r"input 'x' has shape \[2, 5\]"):
            s.submit({"x": np.zeros((2, 5), np.float64)})
        assert s.run({"x": np.zeros(4, np.float32)})["output"].shape == (1, 2)


@pytest.mark.parametrize("call", ["run", "submit"])
def test_deadline_and_priority_ranges(linear_model, call):
    x = {"x": np.zeros((1, 4), np.float32)}
    with rt.Session(linear_model) as s:
        f = getattr(s, call)
        for bad in (float("inf"), float("nan"), -1.0, 1e300):
            with pytest.raises(ValueError, match=r"deadline_ms must be None \(no deadline\) or a finite number .*\[0, 1e\+12\]"):
                f(x, deadline_ms=bad)
        for bad in ("5", True, [1]):
            with pytest.raises(TypeError, match="deadline_ms must be None"):
                f(x, deadline_ms=bad)
        for bad in (2 ** 70, 2 ** 31, -(2 ** 31) - 1):
            with pytest.raises(ValueError, match=r"priority must be an int in \[-2147483648, 2147483647\]"):
                f(x, priority=bad)
        for bad in (1.5, True, "1", None):
            with pytest.raises(TypeError, match=r"priority must be an int in \[-2147483648, 2147483647\]"):
                f(x, priority=bad)
        # in-range numpy integers and floats are fine
        out = f(x, deadline_ms=np.float32(1e6), priority=np.int64(-3))
        out = out.result() if call == "submit" else out
        assert out["output"].shape == (1, 2)


def test_session_argument_ranges(linear_model):
    for kw, exc, msg in ((dict(max_batch_size=2 ** 70), ValueError, r"max_batch_size must be an int in \[1, 2147483647\]"),
                         (dict(max_batch_size=0), ValueError, "max_batch_size"),
                         (dict(max_batch_size=1.0), TypeError, "max_batch_size must be an int"),
                         (dict(max_queue_delay_us=2 ** 63), ValueError, r"max_queue_delay_us must be an int in \[0, "),
                         (dict(queue_capacity=2 ** 62), ValueError, r"queue_capacity must be an int in \[1, 16777216\]"),
                         (dict(num_threads=2 ** 70), ValueError, r"num_threads must be an int in \[1, 4096\]"),
                         (dict(num_threads="2"), TypeError, "num_threads")):
        with pytest.raises(exc, match=msg):
            rt.Session(linear_model, **kw)


def test_export_argument_messages(tmp_path):
    torch = pytest.importorskip("torch")
    net = torch.nn.Sequential(torch.nn.Linear(4, 2))
    p = tmp_path / "e.aimass"
    with pytest.raises(TypeError, match="input_names must be a list of non-empty strings"):
        rt.export(net, (torch.randn(2, 4),), p, input_names=[3])
    with pytest.raises(TypeError, match="input_names must be a list of non-empty strings"):
        rt.export(net, (torch.randn(2, 4),), p, input_names="xy")
    with pytest.raises(TypeError, match="output_names must be a list of non-empty strings"):
        rt.export(net, (torch.randn(2, 4),), p, output_names=[""])
    with pytest.raises(TypeError, match="example input 0 has dtype torch.float64"):
        rt.export(net, (torch.randn(2, 4, dtype=torch.float64),), p)
