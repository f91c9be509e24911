"""The serve bench's compiled floor (aimass.bench._native_floor over aimass_core/src/serve): a C++
HTTP/1.1 keep-alive server around the runtime's Batcher. It must answer what the bench sends with the
model's own results, keep pipelined answers in order, refuse malformed or oversized requests with the
right status (400 naming the input, 404, 405, 413, 431, 501, 505) and survive any bytes."""
import json
import random
import socket
import subprocess
import sys
import threading

import numpy as np
import pytest

from aimass import _C
from aimass.bench import serve as bs

pytestmark = pytest.mark.timeout(120)
torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    import aimass.runtime as rt
    from aimass.bench.runtime import make_mlp
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("nf") / "m.aimass"
    rt.export(make_mlp((8, 16, 3)), (torch.randn(2, 8),), path, input_names=["x"])
    return str(path)


@pytest.fixture(scope="module", params=[True, False], ids=["inline", "queued"])
def server(model, request):
    """The floor server as the bench runs it (a lone request inline), and with every request queued in the
    batcher and answered through the completion thread (the path of several connections at once)."""
    srv = _C.NativeFloorServer(model, model_name="m", max_body_bytes=4096, max_header_bytes=1024,
                               run_inline=request.param)
    t = threading.Thread(target=srv.serve, daemon=True)
    t.start()
    yield srv
    srv.stop()
    t.join(10)
    assert not t.is_alive()


def _ref(model, x):
    import aimass.runtime as rt
    s = rt.Session(model)
    try:
        return s.run({"x": x})["output"]
    finally:
        s.close()


def _exchange(port, raw: bytes, n_responses=1, timeout=10.0):
    """Sends raw bytes, reads until n_responses whole responses (or the server closes); returns
    ([(status, headers, body)], closed)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        s.sendall(raw)
        buf, out, closed = b"", [], False
        while len(out) < n_responses:
            while b"\r\n\r\n" not in buf:
                chunk = s.recv(65536)
                if not chunk:
                    return out, True
                buf += chunk
            head, _, rest = buf.partition(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            hdr = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
            n = int(hdr["content-length"])
            while len(rest) < n:
                chunk = s.recv(65536)
                if not chunk:
                    return out, True
                rest += chunk
            out.append((int(lines[0].split()[1]), hdr, rest[:n]))
            buf = rest[n:]
        s.settimeout(0.5)
        try:
            closed = s.recv(1) == b""
        except socket.timeout:
            closed = False
        return out, closed
    finally:
        s.close()


def _v2bin(x, name="m"):
    head = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": list(x.shape),
                                   "parameters": {"binary_data_size": x.nbytes}}],
                       "parameters": {"binary_data_output": True}}).encode()
    return bs.http_request(f"/v2/models/{name}/infer", head + x.tobytes(),
                           [f"Inference-Header-Content-Length: {len(head)}"])


def test_answers_with_the_models_results(server, model):
    x = np.random.default_rng(1).standard_normal((3, 8)).astype(np.float32)
    ref = _ref(model, x)
    (st, hdr, body), = _exchange(server.port, _v2bin(x))[0]
    assert st == 200
    n = int(hdr["inference-header-content-length"])
    head = json.loads(body[:n])
    assert head["outputs"][0]["shape"] == [3, 3] and head["model_name"] == "m"
    np.testing.assert_allclose(np.frombuffer(body[n:], np.float32).reshape(3, 3), ref, rtol=1e-5, atol=1e-6)
    # KServe v2 JSON tensors (nested data) and /predict
    req = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [3, 8], "data": x.tolist()}]}).encode()
    (st, _, body), = _exchange(server.port, bs.http_request("/v2/models/m/infer", req))[0]
    assert st == 200
    got = np.array(json.loads(body)["outputs"][0]["data"]).reshape(3, 3)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    req = json.dumps({"input": x.tolist()}).encode()
    (st, _, body), = _exchange(server.port, bs.http_request("/predict", req))[0]
    assert st == 200
    np.testing.assert_allclose(np.array(json.loads(body)["output"]), ref, rtol=1e-5, atol=1e-6)


def test_pipelined_requests_answered_in_order_on_one_connection(server, model):
    xs = [np.full((1, 8), v, np.float32) for v in (0.5, -1.0, 2.0)]
    raw = b"".join(_v2bin(x) for x in xs) + b"GET /v2/health/live HTTP/1.1\r\nHost: a\r\n\r\n"
    got, closed = _exchange(server.port, raw, n_responses=4)
    assert [g[0] for g in got] == [200, 200, 200, 200] and not closed
    for (st, hdr, body), x in zip(got, xs):
        n = int(hdr["inference-header-content-length"])
        np.testing.assert_allclose(np.frombuffer(body[n:], np.float32), _ref(model, x).ravel(), rtol=1e-5, atol=1e-6)
    # Connection: close is honoured after the answer
    got, closed = _exchange(server.port, b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n")
    assert got[0][0] == 200 and got[0][1].get("connection") == "close" and closed


@pytest.mark.parametrize("raw, status, words", [
    (b"GARBAGE\r\n\r\n", 400, "request line"),
    (b"\x16\x03\x01\x00\xa5\x01\x00", 400, "control character"),                 # a TLS hello
    (b"GET / HTTP/2.0\r\n\r\n", 505, "HTTP/1"),
    (b"POST /predict HTTP/1.1\r\nContent-Length: 99999\r\n\r\n", 413, "over the server's limit"),
    (b"GET / HTTP/1.1\r\nX: " + b"a" * 2000 + b"\r\n\r\n", 431, "head"),
    (b"POST /predict HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 501, "Content-Length"),
    (b"POST /predict HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab", 400, "conflicting"),
])
def test_malformed_or_oversized_requests_get_a_status_and_the_connection_closes(server, raw, status, words):
    got, closed = _exchange(server.port, raw)
    assert got and got[0][0] == status, got
    assert words in json.loads(got[0][2])["error"]
    assert closed


@pytest.mark.parametrize("body, words", [
    ({"inputs": [{"name": "x", "datatype": "INT64", "shape": [1, 8], "data": [0] * 8}]}, "input 'x': datatype"),
    ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 7], "data": [0] * 7}]}, "input 'x': wrong shape"),
    ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 8], "data": [0] * 7}]}, "input 'x': 'data' holds 7"),
    ({"inputs": [{"name": "y", "datatype": "FP32", "shape": [1, 8], "data": [0] * 8}]}, "unknown input 'y'"),
    ({"inputs": []}, "missing input 'x'"),
    ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 8], "data": ["a"] * 8}]}, "input 'x'"),
    ({"inputs": "x"}, "'inputs' must be a list"),
])
def test_bad_tensors_are_400_naming_the_input_and_keep_the_connection(server, body, words):
    raw = bs.http_request("/v2/models/m/infer", json.dumps(body).encode())
    got, closed = _exchange(server.port, raw + b"GET /v2/health/ready HTTP/1.1\r\n\r\n", n_responses=2)
    assert got[0][0] == 400 and words in json.loads(got[0][2])["error"], got[0]
    assert got[1][0] == 200 and not closed


def test_binary_sizes_routes_and_methods(server):
    x = np.zeros((1, 8), np.float32)
    good = _v2bin(x)
    short = good[:-4].replace(b"Content-Length: %d" % (len(good) - good.index(b"\r\n\r\n") - 4),
                              b"Content-Length: %d" % (len(good) - good.index(b"\r\n\r\n") - 8))
    cases = [(short, 400, "input 'x'"),
             (bs.http_request("/v2/models/m/infer", b"{not json"), 400, "malformed JSON"),
             (bs.http_request("/v2/models/m/infer", b"{}", ["Inference-Header-Content-Length: 99"]), 400, "past"),
             (bs.http_request("/predict", b'{"input": [1, 2, 3]}'), 400, "whole rows"),
             (bs.http_request("/v2/models/other/infer", b"{}"), 404, "not found"),
             (b"GET /predict HTTP/1.1\r\n\r\n", 405, "POST")]
    for raw, status, words in cases:
        got, closed = _exchange(server.port, raw)
        assert got[0][0] == status and words in json.loads(got[0][2])["error"], (raw[:60], got)


def test_random_bytes_never_stop_the_server(server, model):
    rng = random.Random(3)
    seeds = [_v2bin(np.zeros((1, 8), np.float32)), bs.http_request("/predict", b'{"input": [[1,2,3,4,5,6,7,8]]}')]
    before = server.requests
    for _ in range(150):
        raw = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 6)):
            i = rng.randrange(len(raw))
            op = rng.randrange(3)
            if op == 0:
                raw[i] = rng.randrange(256)
            elif op == 1:
                raw.insert(i, rng.randrange(256))
            else:
                del raw[i:i + rng.randint(1, 8)]
        s = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        s.sendall(bytes(raw))
        s.shutdown(socket.SHUT_WR)      # the server must answer or close, never wait forever
        s.settimeout(10)
        while s.recv(65536):
            pass
        s.close()
    assert server.requests > before
    got, _ = _exchange(server.port, _v2bin(np.ones((1, 8), np.float32)))
    assert got[0][0] == 200


def test_command_line_tool_serves_and_stops_on_sigterm(model):
    import httpx
    port = bs.free_port()
    proc = subprocess.Popen([sys.executable, "-m", "aimass.bench._native_floor", str(port), model, "--name", "m"])
    try:
        bs.wait_http(port, "/v2/health/live", proc, timeout=60)
        r = httpx.post(f"http://127.0.0.1:{port}/predict", json={"input": [0.0] * 8}, timeout=10)
        assert r.status_code == 200 and len(r.json()["output"][0]) == 3
    finally:
        proc.terminate()
        assert proc.wait(30) == 0


def test_bad_options_are_typed_errors(model, tmp_path):
    with pytest.raises(ValueError, match="port"):
        _C.NativeFloorServer(model, port=70000)
    with pytest.raises(ValueError, match="model_name"):
        _C.NativeFloorServer(model, model_name="a/b")
    with pytest.raises(ValueError, match="numeric address"):
        _C.NativeFloorServer(model, host="not-an-address")
    with pytest.raises(OSError):
        _C.NativeFloorServer(str(tmp_path / "missing.aimass"))


def test_predict_fast_reader_and_general_reader_agree(server, model):
    """/predict bodies that the fast number reader takes ({"input": nested numbers}) and those it leaves
    to the general JSON reader (other keys, spacing, a number alone) give the same answers; bad numbers
    are a 400 either way."""
    x = np.random.default_rng(2).standard_normal((2, 8)).astype(np.float32)
    ref = _ref(model, x)
    vals = ", ".join(repr(float(v)) for v in x.ravel())
    for body in (json.dumps({"input": x.tolist()}), ' {\n "input" : [ %s ] } ' % vals,
                 json.dumps({"extra": 1, "input": x.ravel().tolist()}), json.dumps({"input": x.tolist(), "z": None})):
        (st, _, out), = _exchange(server.port, bs.http_request("/predict", body.encode()))[0]
        assert st == 200, out
        np.testing.assert_allclose(np.array(json.loads(out)["output"]), ref, rtol=1e-5, atol=1e-6)
    for body, words in (('{"input": [1, 2, 3, 4, 5, 6, 7, inf]}', "malformed JSON"),
                        ('{"input": [1, 2, 3, 4, 5, 6, 7, 0x1]}', "malformed JSON"),
                        ('{"input": [1, 2, 3, 4, 5, 6, 7, "8"]}', "only numbers"),
                        ('{"input": [1, 2, 3, 4, 5, 6, 7, 8,]}', "malformed JSON"),
                        ('{"input": [1, 2, 3, 4, 5, 6, 7, 8]', "malformed JSON"),
                        ('{"inputs": [1, 2, 3, 4, 5, 6, 7, 8]}', "'input'")):
        (st, _, out), = _exchange(server.port, bs.http_request("/predict", body.encode()))[0]
        assert st == 400 and words in json.loads(out)["error"], (body, out)


def test_concurrent_connections_are_batched_and_each_gets_its_own_answer(server, model, request):
    """Requests from many connections at once go through the batcher's queue (not one by one inline),
    and every connection gets the answer to its own rows, in order, over several rounds."""
    rng = np.random.default_rng(9)
    xs = [rng.standard_normal((1, 8)).astype(np.float32) for _ in range(24)]
    refs = _ref(model, np.concatenate(xs))
    socks = [socket.create_connection(("127.0.0.1", server.port), timeout=20) for _ in xs]
    try:
        for _ in range(4):
            for s, x in zip(socks, xs):        # every connection sends before any answer is read
                s.sendall(_v2bin(x) * 2)       # two pipelined requests per connection
            for i, s in enumerate(socks):
                buf = b""
                for _ in range(2):
                    while b"\r\n\r\n" not in buf:
                        buf += s.recv(65536)
                    head, _, rest = buf.partition(b"\r\n\r\n")
                    hdr = dict(ln.split(": ", 1) for ln in head.decode().split("\r\n")[1:])
                    n = int(hdr["content-length"])
                    while len(rest) < n:
                        rest += s.recv(65536)
                    assert head.startswith(b"HTTP/1.1 200"), head
                    k = int(hdr["inference-header-content-length"])
                    np.testing.assert_allclose(np.frombuffer(rest[k:n], np.float32), refs[i], rtol=1e-5, atol=1e-6)
                    buf = rest[n:]
                assert buf == b""
    finally:
        for s in socks:
            s.close()
    if request.node.callspec.id.startswith("queued"):
        assert server.inline_runs == 0     # every answer above came back through the completion thread
