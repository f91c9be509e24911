"""The native reader of the JSON hot routes' numeric bodies (_C.json_number_body, used by /predict and
TF-Serving rows): it must give exactly what orjson/json + np.asarray(float32) give, and decline (None)
every body the general path should parse or refuse itself."""
import json
import random

import numpy as np
import pytest

from aimass import _C


def _ref(body: bytes, key: str):
    return np.asarray(json.loads(body)[key], dtype=np.float32)


@pytest.mark.parametrize("body", [
    b'{"input": [1, 2, 3]}', b'{"input":[[0.1,0.2],[0.3,0.4]]}', b' {\n\t"input" :\r [ [ -0.0 , 1e-3 ] ] } ',
    b'{"input": [1E+2, -2.5e-1, 0, 12345678901234, 3.4028234663852886e38]}',
    b'{"input": [[[1], [2]], [[3], [4]]]}', b'{"input": [0.30000000000000004, 1.0000001192092896]}',
    b'{"input": [123456789012345, -123456789012345]}', b'{"input": [1e-50, 5e-324]}',
])
def test_matches_the_json_path(body):
    got = _C.json_number_body(body, "input")
    ref = _ref(body, "input")
    assert got is not None and got.dtype == np.float32 and got.shape == ref.shape
    np.testing.assert_array_equal(got, ref)


def test_random_bodies_match_bit_for_bit():
    rng = random.Random(5)
    for _ in range(300):
        shape = [rng.randint(1, 4) for _ in range(rng.randint(1, 3))]
        a = np.random.default_rng(rng.randrange(1 << 30)).standard_normal(shape) * 10 ** rng.randint(-8, 8)
        for body in (json.dumps({"instances": a.tolist()}).encode(),
                     json.dumps({"instances": a.astype(np.float32).tolist()}, indent=rng.choice([None, 1])).encode()):
            got = _C.json_number_body(body, "instances")
            np.testing.assert_array_equal(got, _ref(body, "instances"))


@pytest.mark.parametrize("body", [
    b'{"input": []}', b'{"input": [[]]}', b'{"input": [[1, 2], [3]]}', b'{"input": [1, [2]]}', b'{"input": [[1], 2]}',
    b'{"input": [true]}', b'{"input": ["1"]}', b'{"input": [NaN]}', b'{"input": [Infinity]}', b'{"input": [inf]}',
    b'{"input": [01]}', b'{"input": [1.]}', b'{"input": [.5]}', b'{"input": [0x10]}', b'{"input": [+1]}',
    b'{"input": [1e400]}', b'{"input": [1e39]}', b'{"input": [1234567890123456]}', b'{"input": [1,]}',
    b'{"input": [1, 2]', b'{"input": [1, 2]} x', b'{"input": [1], "other": 2}', b'{"other": [1]}',
    b'{"inputs": [1]}', b'{"in\\u0070ut": [1]}', b'[1, 2]', b'', b'{"input": 1}',
    b'{"input": ' + b'[' * 40 + b'1' + b']' * 40 + b'}',
])
def test_declines_everything_else(body):
    assert _C.json_number_body(body, "input") is None


def _v2(inputs):
    return json.dumps({"inputs": inputs}, ensure_ascii=False).encode()


def test_v2_inputs_match_the_json_path():
    rng = np.random.default_rng(4)
    a, b = rng.standard_normal((2, 3)), rng.standard_normal(5).astype(np.float32)
    body = _v2([{"name": "a", "datatype": "FP32", "shape": [2, 3], "data": a.tolist()},
                {"data": b.tolist(), "shape": [1, 5], "datatype": "FP32", "name": "b\u00e9"}])
    got = _C.json_v2_inputs(body)
    ref = json.loads(body)["inputs"]
    assert [(g["name"], g["datatype"], g["shape"]) for g in got] == \
        [(r["name"], r["datatype"], r["shape"]) for r in ref]
    for g, r in zip(got, ref):
        np.testing.assert_array_equal(g["data"], np.asarray(r["data"], dtype=np.float32))
        assert g["data"].dtype == np.float32


@pytest.mark.parametrize("body", [
    _v2([]), _v2([{"name": "x", "datatype": "INT64", "shape": [1], "data": [1]}]),
    _v2([{"name": "x", "datatype": "FP32", "shape": [1], "data": [1], "parameters": {}}]),
    _v2([{"name": "x", "datatype": "FP32", "shape": [1]}]),
    _v2([{"name": "x", "datatype": "FP32", "shape": [1.0], "data": [1]}]),
    _v2([{"name": "x", "datatype": "FP32", "shape": [-1], "data": [1]}]),
    _v2([{"name": "x", "datatype": "FP32", "shape": [1], "data": [[1], 2]}]),
    _v2([{"name": "x", "datatype": "FP32", "shape": [1], "data": [True]}]),
    _v2([{"name": "a\"b", "datatype": "FP32", "shape": [1], "data": [1]}]),
    b'{"inputs": [{"name": "x", "name": "y", "datatype": "FP32", "shape": [1], "data": [1]}]}',
    b'{"inputs": [{"name": "\xff", "datatype": "FP32", "shape": [1], "data": [1]}]}',
    b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}], "id": "7"}',
    b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}], "outputs": []}',
    b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}]',
    b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [01], "data": [1]}]}',
])
def test_v2_declines_everything_else(body):
    assert _C.json_v2_inputs(body) is None


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_fast_and_general_predict_bodies_answer_the_same(tmp_path):
    """/predict and TF-Serving rows through the app: a numeric body (native reader) and the same body with an
    extra key (orjson path) give the same outputs, and errors keep the general path's messages."""
    torch = pytest.importorskip("torch")
    from starlette.testclient import TestClient

    import aimass.runtime as rt
    from aimass.bench.runtime import make_mlp
    from aimass.registry import Registry
    from aimass.serve import ServeConfig, Server, create_app

    torch.manual_seed(0)
    rt.export(make_mlp((8, 4)), (torch.randn(2, 8),), tmp_path / "m.aimass", input_names=["x"])
    reg = Registry(str(tmp_path / "store"))
    reg.push(str(tmp_path / "m.aimass"), "m", label="stable")
    x = np.random.default_rng(0).standard_normal((2, 8)).astype(np.float32)
    with TestClient(create_app(Server(reg, ServeConfig(poll_interval_s=0)))) as c:
        a = c.post("/predict", content=json.dumps({"input": x.tolist()}))
        b = c.post("/predict", content=json.dumps({"input": x.tolist(), "note": 1}))
        assert a.status_code == 200 and b.status_code == 200 and a.json() == b.json()
        a = c.post("/v1/models/m:predict", content=json.dumps({"instances": x.tolist()}))
        b = c.post("/v1/models/m:predict", content=json.dumps({"instances": [{"x": r} for r in x.tolist()]}))
        assert a.status_code == 200 and b.status_code == 200 and a.json() == b.json()
        body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 8], "data": x.tolist()}]}
        a = c.post("/v2/models/m/infer", content=json.dumps(body))                 # native reader
        b = c.post("/v2/models/m/infer", content=json.dumps({**body, "id": "r1"}))   # orjson path
        assert a.status_code == 200 and b.status_code == 200 and b.json()["id"] == "r1"
        assert a.json()["outputs"] == b.json()["outputs"]
        body["inputs"][0]["shape"] = [2, 7]
        assert "input 'x'" in c.post("/v2/models/m/infer", content=json.dumps(body)).json()["error"]
        assert c.post("/predict", content=b'{"input": [[1, 2]]}').status_code == 400     # shape, general message
        assert "shape" in c.post("/v1/models/m:predict", content=b'{"instances": [[1, 2]]}').json()["error"]
