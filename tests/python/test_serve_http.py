"""aimass serve in-process (starlette TestClient / httpx ASGI): every status code, the three protocols,
tokens and rate limits, admin, metrics and the dashboard's JSON."""
import asyncio
import json
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("starlette")
import httpx  # noqa: E402

with warnings.catch_warnings():   # starlette's note that it prefers httpx2
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient  # noqa: E402

from aimass.serve import ServeConfig, Server, TokenTable, create_app, hash_token  # noqa: E402
from aimass.serve.auth import TokenBucket  # noqa: E402
from serve_util import export_mlp, make_store  # noqa: E402

pytestmark = [pytest.mark.timeout(120), pytest.mark.filterwarnings("ignore::DeprecationWarning")]

X = np.arange(8, dtype=np.float32).reshape(2, 4) / 8


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    reg, nets = make_store(tmp, versions=2, stable=1)
    reg.set_label("mlp", "canary", 2)
    return reg, nets


def ref(nets, v, x=X):
    with torch.no_grad():
        return nets[v - 1](torch.from_numpy(x)).numpy()


def v2_body(x=X, name="x", dt="FP32", **extra):
    return {"inputs": [{"name": name, "datatype": dt, "shape": list(x.shape), "data": x.ravel().tolist()}], **extra}


TOKENS = {"infer": "tok-infer", "mlp_only": "tok-other-model", "admin": "tok-admin", "metrics": "tok-metrics",
          "slow": "tok-limited"}


def token_table():
    return TokenTable.from_dict({"tokens": [
        {"name": "infer", "sha256": hash_token(TOKENS["infer"]), "scopes": ["infer"]},
        {"name": "mlp_only", "sha256": hash_token(TOKENS["mlp_only"]), "scopes": ["infer"], "models": ["other"]},
        {"name": "admin", "sha256": hash_token(TOKENS["admin"]), "scopes": ["admin", "infer"]},
        {"name": "metrics", "sha256": hash_token(TOKENS["metrics"]), "scopes": ["metrics"]},
        {"name": "slow", "sha256": hash_token(TOKENS["slow"]), "scopes": ["infer"], "rate": 0.001, "burst": 2},
    ]})


def bearer(who):
    return {"Authorization": f"Bearer {TOKENS[who]}"}


@pytest.fixture(scope="module")
def client(store):
    reg, _ = store
    srv = Server(reg, ServeConfig(poll_interval_s=0, max_body_bytes=64 << 10))
    with TestClient(create_app(srv)) as c:
        c.srv = srv
        yield c


def test_health_and_metadata(client):
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").status_code == 200
    assert "binary_tensor_data" in client.get("/v2").json()["extensions"]
    meta = client.get("/v2/models/mlp").json()
    assert meta["versions"] == ["1", "2"]
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]
    assert client.get("/v2/models/mlp/versions/2/ready").json() == {"name": "mlp", "ready": True}
    assert client.get("/v2/models/mlp/config").json()["input"][0] == {"name": "x", "data_type": "TYPE_FP32",
                                                                       "dims": [4]}
    assert client.get("/v2/models/nope").status_code == 404
    r = client.get("/v3/nothing")
    assert r.status_code == 404 and r.json()["error"] == "Not Found: GET /v3/nothing"
    assert client.get("/v2/models/mlp/infer").status_code == 405
    assert client.get("/v2/models/mlp/versions/7").status_code == 404


def test_v2_json_infer_routes_versions(client, store):
    _, nets = store
    for path, v in (("/v2/models/mlp/infer", 1), ("/v2/models/mlp/versions/2/infer", 2)):
        r = client.post(path, json=v2_body(id="abc"))
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model_version"] == str(v) and body["id"] == "abc"
        out = body["outputs"][0]
        assert out["datatype"] == "FP32" and out["shape"] == [2, 3]
        np.testing.assert_allclose(np.array(out["data"]).reshape(2, 3), ref(nets, v), rtol=1e-5, atol=1e-5)
    nested = v2_body()
    nested["inputs"][0]["data"] = X.tolist()   # nested lists are accepted too
    assert client.post("/v2/models/mlp/infer", json=nested).status_code == 200


def test_v2_binary_infer(client, store):
    _, nets = store
    head = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 4],
                                   "parameters": {"binary_data_size": X.nbytes}}],
                       "parameters": {"binary_data_output": True}}).encode()
    r = client.post("/v2/models/mlp/infer", content=head + X.tobytes(),
                    headers={"Inference-Header-Content-Length": str(len(head))})
    assert r.status_code == 200, r.text
    n = int(r.headers["inference-header-content-length"])
    meta = json.loads(r.content[:n])
    assert meta["outputs"][0]["parameters"]["binary_data_size"] == 2 * 3 * 4
    np.testing.assert_allclose(np.frombuffer(r.content[n:], np.float32).reshape(2, 3), ref(nets, 1), rtol=1e-5,
                               atol=1e-5)
    # a binary size that does not match the shape names the input
    bad = head.replace(str(X.nbytes).encode(), b"16")
    r = client.post("/v2/models/mlp/infer", content=bad + X.tobytes()[:16],
                    headers={"Inference-Header-Content-Length": str(len(bad))})
    assert r.status_code == 400 and "input 'x'" in r.json()["error"]


def test_v2_binary_header_reuse(client, store):
    """Requests repeating a binary header skip its decoding (kserve.Plan): same answers and errors as the
    full path, per version, for each output mode; bodies of the wrong size and requests with an id too."""
    _, nets = store
    srv = client.srv

    def post(head, data, path="/v2/models/mlp/infer"):
        return client.post(path, content=head + data, headers={"Inference-Header-Content-Length": str(len(head))})

    def head_of(outputs=None, binary_out=True, **extra):
        req = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 4],
                           "parameters": {"binary_data_size": X.nbytes}}], **extra}
        if binary_out:
            req["parameters"] = {"binary_data_output": True}
        if outputs is not None:
            req["outputs"] = outputs
        return json.dumps(req).encode()

    def result(r):
        assert r.status_code == 200, r.text
        n = r.headers.get("inference-header-content-length")
        if n is None:
            return np.asarray(r.json()["outputs"][0]["data"], np.float32).reshape(2, 3)
        assert json.loads(r.content[:int(n)])["outputs"][0]["shape"] == [2, 3]
        return np.frombuffer(r.content[int(n):], np.float32).reshape(2, 3)

    heads = [head_of(), head_of(binary_out=False), head_of([{"name": "output", "parameters": {"binary_data": False}}],
                                                            binary_out=True)]
    for head in heads:
        for k in range(3):                  # the first request caches the header, the next ones reuse it
            x = (X * (k + 1)).astype(np.float32)
            for v, path in ((1, "/v2/models/mlp/infer"), (2, "/v2/models/mlp/versions/2/infer")):
                np.testing.assert_allclose(result(post(head, x.tobytes(), path)), ref(nets, v, x), rtol=1e-5,
                                           atol=1e-5)
    st = srv.manager.models["mlp"]
    assert all(set(st.versions[v].plans) >= set(heads) for v in (1, 2))
    r = post(heads[0], X.tobytes()[:-4])    # a cached header with a short binary section: the full path's 400
    assert r.status_code == 400 and "binary section holds 28 bytes" in r.json()["error"], r.text
    r = post(heads[0], X.tobytes(), "/v2/models/nope/infer")
    assert r.status_code == 404 and "unknown model 'nope'" in r.json()["error"]
    r = post(heads[0], X.tobytes(), "/v2/models/mlp/versions/x/infer")
    assert r.status_code == 400 and "version must be a positive integer" in r.json()["error"]
    for _ in range(2):                      # a header that decodes but names an unknown output
        r = post(head_of([{"name": "nope"}]), X.tobytes())
        assert r.status_code == 400 and "unknown output 'nope'" in r.json()["error"], r.text
    with_id = head_of(id="req-7")           # echoed, and not cached (every request would differ)
    for _ in range(2):
        r = post(with_id, X.tobytes())
        assert json.loads(r.content[:int(r.headers["inference-header-content-length"])])["id"] == "req-7"
    assert with_id not in st.versions[1].plans


@pytest.mark.parametrize("body,needle", [
    (v2_body(dt="FP64"), "input 'x': datatype 'FP64' does not match the model's FP32"),
    (v2_body(x=np.zeros((2, 5), np.float32)), "input 'x': shape [2, 5] does not match"),
    (v2_body(name="y"), "unknown input 'y'"),
    ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 4], "data": ["a"] * 8}]}, "input 'x'"),
    ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 4], "data": [1.0] * 7}]}, "holds 7 values"),
    ({"inputs": []}, "non-empty 'inputs'"),
    ([1, 2], "JSON object"),
])
def test_v2_bad_requests_are_400(client, body, needle):
    r = client.post("/v2/models/mlp/infer", json=body)
    assert r.status_code == 400 and needle in r.json()["error"], r.text


def test_malformed_json_and_body_limit(client):
    r = client.post("/v2/models/mlp/infer", content=b"{not json")
    assert r.status_code == 400 and "malformed JSON" in r.json()["error"]
    r = client.post("/v1/models/mlp:predict", content=b"[1,")
    assert r.status_code == 400 and "malformed JSON" in r.json()["error"]
    r = client.post("/v2/models/mlp/infer", content=b" " * (65 << 10))
    assert r.status_code == 413 and "limit" in r.json()["error"]


def test_body_encodings_and_streamed_bodies(client, store):
    """gzip/deflate bodies, their decompressed size limit, and chunked bodies (no Content-Length)."""
    import zlib
    _, nets = store
    raw = json.dumps(v2_body()).encode()
    gz = zlib.compressobj(9, zlib.DEFLATED, 31)
    for enc, body in (("gzip", gz.compress(raw) + gz.flush()), ("deflate", zlib.compress(raw))):
        r = client.post("/v2/models/mlp/infer", content=body, headers={"Content-Encoding": enc})
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(np.array(r.json()["outputs"][0]["data"]).reshape(2, 3), ref(nets, 1),
                                   rtol=1e-5, atol=1e-5)
    r = client.post("/v2/models/mlp/infer", content=raw, headers={"Content-Encoding": "br"})
    assert r.status_code == 400 and "Content-Encoding" in r.json()["error"]
    r = client.post("/v2/models/mlp/infer", content=b"not gzip", headers={"Content-Encoding": "gzip"})
    assert r.status_code == 400 and "not valid gzip" in r.json()["error"]
    bomb = zlib.compress(b" " * (200 << 10))        # small on the wire, over the 64 KiB limit unpacked
    r = client.post("/v2/models/mlp/infer", content=bomb, headers={"Content-Encoding": "deflate"})
    assert r.status_code == 413 and "decompressed" in r.json()["error"]

    def chunks(data, n=1000):
        for i in range(0, len(data), n):
            yield data[i:i + n]
    r = client.post("/v2/models/mlp/infer", content=chunks(raw))          # Transfer-Encoding: chunked
    assert r.status_code == 200, r.text
    r = client.post("/v2/models/mlp/infer", content=chunks(b" " * (65 << 10), 4096))
    assert r.status_code == 413 and "limit" in r.json()["error"]


def test_inference_routes_through_starlette_too(client, store):
    """The hot routes answer the same when Starlette routes them (the app behind hot.dispatch)."""
    _, nets = store
    app = client.app.app      # the Starlette app that hot.dispatch sits in front of
    transport = httpx.ASGITransport(app=app)

    async def go():
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            return (await c.post("/v1/models/mlp/versions/2:predict", json={"inputs": X.tolist()}),
                    await c.post("/v2/models/mlp/infer", json=v2_body()),
                    await c.post("/predict", json={"input": X.tolist()}),
                    await c.post("/v2/models/mlp/versions/x/infer", json=v2_body()))
    tf, v2, flask, bad = asyncio.run(go())
    np.testing.assert_allclose(tf.json()["outputs"], ref(nets, 2), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.array(v2.json()["outputs"][0]["data"]).reshape(2, 3), ref(nets, 1),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(flask.json()["output"], ref(nets, 1), rtol=1e-5, atol=1e-5)
    assert bad.status_code == 400 and "version must be a positive integer" in bad.json()["error"]


def test_tfserving_predict(client, store):
    _, nets = store
    r = client.post("/v1/models/mlp:predict", json={"instances": X.tolist()})
    np.testing.assert_allclose(r.json()["predictions"], ref(nets, 1), rtol=1e-5, atol=1e-5)
    r = client.post("/v1/models/mlp:predict", json={"instances": [{"x": row} for row in X.tolist()]})
    np.testing.assert_allclose(r.json()["predictions"], ref(nets, 1), rtol=1e-5, atol=1e-5)
    r = client.post("/v1/models/mlp/versions/2:predict", json={"inputs": {"x": X.tolist()}})
    np.testing.assert_allclose(r.json()["outputs"], ref(nets, 2), rtol=1e-5, atol=1e-5)
    r = client.post("/v1/models/mlp/labels/canary:predict", json={"inputs": X.tolist()})
    np.testing.assert_allclose(r.json()["outputs"], ref(nets, 2), rtol=1e-5, atol=1e-5)
    assert client.post("/v1/models/mlp/labels/nope:predict", json={"inputs": X.tolist()}).status_code == 404
    r = client.post("/v1/models/mlp:predict", json={"instances": [[1, 2, 3]]})
    assert r.status_code == 400 and "input 'x': shape [1, 3]" in r.json()["error"]
    r = client.post("/v1/models/mlp:predict", json={"instances": [[1, 2, 3, 4]], "inputs": [[1, 2, 3, 4]]})
    assert r.status_code == 400 and "exactly one" in r.json()["error"]
    st = client.get("/v1/models/mlp").json()["model_version_status"]
    assert [s["version"] for s in st] == ["1", "2"] and st[0]["state"] == "AVAILABLE"


def test_flask_predict(client, store):
    _, nets = store
    r = client.post("/predict", json={"input": X[0].tolist()})
    np.testing.assert_allclose(r.json()["output"], ref(nets, 1)[:1], rtol=1e-5, atol=1e-5)
    r = client.post("/predict", json={"inputs": [1]})
    assert r.status_code == 400 and '"input"' in r.json()["error"]


def test_metrics_and_status(client):
    client.post("/v2/models/mlp/infer", json=v2_body())
    text = client.get("/metrics").text
    for name in ("aimass_requests_total{", "aimass_request_latency_seconds_bucket{", "aimass_queue_seconds_bucket{",
                 "aimass_compute_seconds_bucket{", "aimass_batch_size_bucket{", "aimass_model_loaded{",
                 "aimass_runtime_requests_total{", "aimass_ready 1.0", 'aimass_model_ready{model="mlp"} 1.0'):
        assert name in text, name
    assert 'code="200",model="mlp",protocol="v2",version="1"' in text
    assert 'code="400",model="mlp",protocol="v2",version="1"' in text
    client.post("/v2/models/no-such-model/infer", json=v2_body())
    assert 'code="404",model="_unknown"' in client.get("/metrics").text
    st = client.get("/api/status").json()
    assert st["ready"] and st["models"][0]["name"] == "mlp"
    assert {v["version"]: v["labels"] for v in st["models"][0]["versions"]} == {1: ["stable"], 2: ["canary"]}
    assert sum(st["latency"]["counts"]) >= 1 and any(e["status"] == 400 for e in st["errors"])


def test_admin_repository(client):
    idx = client.post("/v2/repository/index").json()
    assert [(m["name"], m["version"], m["state"]) for m in idx] == [("mlp", "1", "READY"), ("mlp", "2", "READY")]
    assert client.post("/v2/repository/models/mlp/unload").status_code == 200
    assert client.get("/v2/models/mlp/ready").status_code == 400
    r = client.post("/v2/models/mlp/infer", json=v2_body())
    assert r.status_code == 503 and "not loaded" in r.json()["error"]
    assert client.get("/v2/repository/index").json()[0]["state"] == "UNAVAILABLE"
    assert client.post("/v2/repository/models/mlp/load").status_code == 200
    assert client.post("/v2/models/mlp/infer", json=v2_body()).status_code == 200
    assert client.post("/v2/repository/models/ghost/load").status_code == 404


def test_draining_is_503(client):
    client.srv.draining = True
    try:
        assert client.get("/v2/health/ready").status_code == 503
        r = client.post("/v2/models/mlp/infer", json=v2_body())
        assert r.status_code == 503 and "draining" in r.json()["error"]
        assert client.get("/v2/health/live").status_code == 200
    finally:
        client.srv.draining = False


def test_tokens_statuses(store):
    reg, _ = store
    srv = Server(reg, ServeConfig(poll_interval_s=0), tokens=token_table())
    with TestClient(create_app(srv)) as c:
        assert c.get("/v2/health/ready").status_code == 200          # health needs no token
        assert c.post("/v2/models/mlp/infer", json=v2_body()).status_code == 401
        r = c.post("/v2/models/mlp/infer", json=v2_body(), headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and "unknown token" in r.json()["error"]
        assert c.post("/v2/models/mlp/infer", json=v2_body(), headers=bearer("infer")).status_code == 200
        r = c.post("/v2/models/mlp/infer", json=v2_body(), headers=bearer("mlp_only"))
        assert r.status_code == 403 and "may not use model 'mlp'" in r.json()["error"]
        r = c.post("/v2/repository/models/mlp/unload", headers=bearer("infer"))
        assert r.status_code == 403 and "scope 'admin'" in r.json()["error"]
        assert c.get("/metrics").status_code == 401
        assert c.get("/metrics", headers=bearer("infer")).status_code == 403
        assert c.get("/metrics", headers=bearer("metrics")).status_code == 200
        assert c.get("/api/status", headers=bearer("admin")).status_code == 200
        assert c.post("/v2/models/mlp/infer", json=v2_body(), headers=bearer("metrics")).status_code == 403
        codes = [c.post("/predict", json={"input": [1, 2, 3, 4]}, headers=bearer("slow")) for _ in range(3)]
        assert [r.status_code for r in codes] == [200, 200, 429]
        assert int(codes[2].headers["Retry-After"]) >= 1 and "over its rate" in codes[2].json()["error"]


def test_token_table_validation(tmp_path):
    for doc, needle in (({"tokens": []}, "non-empty 'tokens'"),
                        ({"tokens": [{"name": "a", "sha256": "plain-token"}]}, "64-hex-digit sha256"),
                        ({"tokens": [{"sha256": "a" * 64, "scopes": ["root"]}]}, "scopes"),
                        ({"tokens": [{"sha256": "a" * 64, "rate": -1}]}, "positive number"),
                        ({"tokens": [{"sha256": "a" * 64, "token": "x"}]}, "unknown keys")):
        with pytest.raises(ValueError, match=needle):
            TokenTable.from_dict(doc)
    p = tmp_path / "t.yml"
    p.write_text("tokens: [")
    with pytest.raises(ValueError, match="not valid YAML"):
        TokenTable.load(p)


def test_token_bucket_refills():
    b = TokenBucket(rate=10.0, burst=2.0, stamp=0.0)
    assert b.take(0.0) == 0 and b.take(0.0) == 0
    assert b.take(0.0) == pytest.approx(0.1)
    assert b.take(0.1) == 0


@pytest.fixture(scope="module")
def slow_store(tmp_path_factory):
    from aimass.registry import Registry
    tmp = tmp_path_factory.mktemp("slow")
    export_mlp(tmp / "slow.aimass", seed=0, d_in=256, hidden=2048, d_out=4, layers=3)
    reg = Registry(str(tmp / "store"))
    reg.push(str(tmp / "slow.aimass"), "slow")
    return reg


def binary_infer(x):
    head = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": list(x.shape),
                                   "parameters": {"binary_data_size": x.nbytes}}]}).encode()
    return head + x.tobytes(), {"Inference-Header-Content-Length": str(len(head))}


def run_with_blocker(reg, config, then):
    """Start a big request on the slow model, wait until the executor runs it, then call `then(client)`."""
    srv = Server(reg, config)

    async def main():
        await srv.manager.start()
        try:
            transport = httpx.ASGITransport(app=create_app(srv))
            async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=60) as c:
                body, hdr = binary_infer(np.ones((1500, 256), np.float32))
                blocker = asyncio.create_task(c.post("/v2/models/slow/infer", content=body, headers=hdr))
                sess = srv.manager.current("slow").session
                while not (sess.stats()["requests"]["submitted"] == 1 and sess.stats()["queue_depth"] == 0):
                    await asyncio.sleep(0.001)
                out = await then(c, sess)
                assert (await blocker).status_code == 200
                return out
        finally:
            await srv.manager.stop()
    return asyncio.run(main())


def test_queue_full_is_503(slow_store):
    async def then(c, sess):
        first = asyncio.create_task(c.post("/v1/models/slow:predict", json={"instances": [[0.0] * 256]}))
        while sess.stats()["queue_depth"] < 1:
            await asyncio.sleep(0.001)
        r = await c.post("/v1/models/slow:predict", json={"instances": [[0.0] * 256]})
        assert (await first).status_code == 200
        return r
    r = run_with_blocker(slow_store, ServeConfig(poll_interval_s=0, max_batch_size=1, queue_capacity=1), then)
    assert r.status_code == 503 and "queue full" in r.json()["error"] and r.headers["Retry-After"] == "1"


def test_deadline_is_504(slow_store):
    async def then(c, sess):
        body = v2_body(x=np.zeros((1, 256), np.float32), parameters={"timeout": 1000})   # 1 ms, in us
        return await c.post("/v2/models/slow/infer", json=body)
    r = run_with_blocker(slow_store, ServeConfig(poll_interval_s=0, max_batch_size=1), then)
    assert r.status_code == 504 and "deadline" in r.json()["error"]


def test_one_write_transport():
    """uvicorn's status line + headers and the body leave in one writelines; a header block that nothing
    follows (100 Continue, the start of a stream) is sent on the next loop step; close flushes first."""
    from aimass.serve.cli import _OneWriteTransport, _one_write_protocol

    class Fake:
        def __init__(self):
            self.calls = []

        def write(self, data):
            self.calls.append(("write", bytes(data)))

        def writelines(self, chunks):
            self.calls.append(("writelines", [bytes(c) for c in chunks]))

        def close(self):
            self.calls.append(("close",))

        def is_closing(self):
            return False

        def get_extra_info(self, name, default=None):
            return ("127.0.0.1", 1) if name == "peername" else default

    async def run():
        fake = Fake()
        t = _OneWriteTransport(fake, asyncio.get_running_loop())
        head = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n"
        t.write(head)
        assert fake.calls == []                 # held
        t.write(b"{}")
        assert fake.calls == [("writelines", [head, b"{}"])]
        t.write(b"plain bytes")                 # not a header block: straight through
        assert fake.calls[-1] == ("write", b"plain bytes")
        cont = b"HTTP/1.1 100 Continue\r\n\r\n"
        t.write(cont)
        await asyncio.sleep(0)                  # nothing followed in that step: sent on the next
        await asyncio.sleep(0)
        assert fake.calls[-1] == ("write", cont)
        t.write(head)
        t.close()
        assert fake.calls[-2:] == [("write", head), ("close",)]
        assert t.get_extra_info("peername") == ("127.0.0.1", 1)     # the rest is the transport's

    asyncio.run(run())
    import uvicorn.protocols.http.h11_impl as h11_impl
    assert issubclass(_one_write_protocol(h11_impl.H11Protocol), h11_impl.H11Protocol)
