"""`aimass serve --http native` against `--http uvicorn` on the same store, as real processes: the same
statuses and the same body bytes for hot successes (answered by the C++ front end) and for every error
(forwarded to the Python app), pipelining, forwarding of what the front end does not decode (gzip,
chunked), merged metrics, the idle timeout and the connection cap; and the front end's float layout
against orjson's."""
import gzip
import json
import socket
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import httpx  # noqa: E402
import yaml  # noqa: E402

from aimass import _C  # noqa: E402
from aimass.serve import hash_token  # noqa: E402
from serve_util import make_store, serve_process  # noqa: E402

pytestmark = [pytest.mark.timeout(180),
              pytest.mark.skipif(not hasattr(_C, "NativeFrontend") or not _C.native_frontend_available(),
                                 reason="the native front end was compiled out (no OpenSSL libcrypto at build time)")]

X = (np.arange(8, dtype=np.float32).reshape(2, 4) - 3.3) / 7
TOK = {"infer": "tok-infer", "other": "tok-other", "metrics": "tok-metrics", "slow": "tok-slow", "admin": "tok-admin",
       "odd": "tok-odd", "oddrate": "tok-oddrate"}
# a token name the 403 message quotes, with a quote, a tab, accents and a code point past U+FFFF: json.dumps
# escapes each (\uXXXX, a surrogate pair for the emoji), and the front end must write the same bytes
ODD_NAME = 'm\u00e9trique "q"\t\u00fc\U0001F600'



def auth(who):
    return {"Authorization": f"Bearer {TOK[who]}"}


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("native")
    reg, nets = make_store(tmp, versions=2, stable=1)
    reg.set_label("mlp", "canary", 2)
    tokens = tmp / "tokens.yml"
    tokens.write_text(yaml.safe_dump({"tokens": [
        {"name": "infer", "sha256": hash_token(TOK["infer"]), "scopes": ["infer"]},
        {"name": "other", "sha256": hash_token(TOK["other"]), "scopes": ["infer"], "models": ["other"]},
        {"name": "metrics", "sha256": hash_token(TOK["metrics"]), "scopes": ["metrics"]},
        {"name": "slow", "sha256": hash_token(TOK["slow"]), "scopes": ["infer"], "rate": 0.001, "burst": 2},
        {"name": "admin", "sha256": hash_token(TOK["admin"]), "scopes": ["admin", "infer"]},
        {"name": ODD_NAME, "sha256": hash_token(TOK["odd"]), "scopes": ["metrics"]},
        # json.dumps writes DEL as \u007f (orjson keeps it): the 429 below quotes this name
        {"name": ODD_NAME + "\x7f", "sha256": hash_token(TOK["oddrate"]), "scopes": ["infer"], "rate": 1e-6,
         "burst": 1}]}, allow_unicode=True),
        encoding="utf-8")
    args = ("--tokens", str(tokens), "--max-body-mb", "0.0625")
    with serve_process(tmp / "store", *args) as py, serve_process(tmp / "store", *args, "--http", "native") as nat:
        yield py, nat, nets


def native_answers(srv):
    return httpx.get(srv.url + "/api/status", headers=auth("admin")).json()["native"]["answers"]


def v2_json(x=X, **extra):
    return json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": list(x.shape),
                                   "data": x.ravel().tolist()}], **extra}).encode()


def v2_binary(x=X, outputs=None, binary_out=True):
    head = {"inputs": [{"name": "x", "datatype": "FP32", "shape": list(x.shape),
                        "parameters": {"binary_data_size": x.nbytes}}]}
    if outputs is not None:
        head["outputs"] = outputs
    if binary_out is not None:
        head["parameters"] = {"binary_data_output": binary_out}
    h = json.dumps(head).encode()
    return h + x.tobytes(), {"Inference-Header-Content-Length": str(len(h)), "Content-Type": "application/octet-stream"}


HOT = [  # (path, body, headers): successful requests the front end answers itself
    ("/v2/models/mlp/infer", v2_json(), {}),
    ("/v2/models/mlp/versions/2/infer", v2_json(X[:1]), {}),
    ("/v2/models/mlp/infer", *v2_binary()),
    ("/v2/models/mlp/infer", *v2_binary(binary_out=False)),
    ("/v2/models/mlp/infer", *v2_binary(outputs=[{"name": "output", "parameters": {"binary_data": False}}],
                                        binary_out=None)),
    ("/v2/models/mlp/infer", *v2_binary(outputs=[{"name": "output", "parameters": {"binary_data": True}}],
                                        binary_out=None)),
    ("/v1/models/mlp:predict", json.dumps({"instances": X.tolist()}).encode(), {}),
    ("/v1/models/mlp/versions/2:predict", json.dumps({"instances": X.tolist()}).encode(), {}),
    ("/v1/models/mlp/labels/canary:predict", json.dumps({"instances": X[:1].tolist()}).encode(), {}),
    ("/predict", json.dumps({"input": X.tolist()}).encode(), {}),
    ("/predict", json.dumps({"input": X[0].tolist()}).encode(), {}),
    ("/predict", b'{"input": [1e-7, 0.5, -3, 12345678.9]}', {}),
]

REFUSED = [  # (path, body, headers, token): 401/403 that the front end answers itself in auth.py's words
    ("/v2/models/mlp/infer", v2_json(), {}, None),                             # 401 missing
    ("/v2/models/mlp/infer", v2_json(), {"Authorization": "Bearer nope"}, None),   # 401 unknown
    ("/v2/models/mlp/infer", v2_json(), {"Authorization": "Basic abc"}, None),     # 401 malformed
    ("/v2/models/mlp/infer", v2_json(), {"Authorization": "Bearer"}, None),        # 401 malformed
    ("/predict", b"not even JSON", {}, "other"),                               # 403 model, before the body
    ("/v1/models/mlp:predict", v2_json(), {}, "metrics"),                      # 403 scope
    ("/v2/models/mlp/infer", v2_json(), {}, "odd"),                            # 403 scope, escaped name
]

FORWARDED = [  # (method, path, body, headers, token): everything else, Python's answer either way
    ("POST", "/v2/models/mlp/infer", v2_json(X.astype(np.float64)).replace(b"FP32", b"INT64"), {}, "infer"),
    ("POST", "/v2/models/ghost/infer", v2_json(), {}, "infer"),
    ("POST", "/v2/models/mlp/versions/9/infer", v2_json(), {}, "infer"),
    ("POST", "/v2/models/mlp/versions/x/infer", v2_json(), {}, "infer"),
    ("POST", "/v1/models/mlp/labels/nope:predict", json.dumps({"instances": X.tolist()}).encode(), {}, "infer"),
    ("POST", "/predict", b'{"input": [1, 2', {}, "infer"),
    ("POST", "/predict", b'{"input": [1, 2, 3]}', {}, "infer"),
    ("POST", "/predict", b'{"input": [[1, 2, 3, 4], [1, 2]]}', {}, "infer"),
    ("POST", "/v2/models/mlp/infer", v2_json(id="req-1"), {}, "infer"),        # an id: Python echoes it
    ("GET", "/v2/models/mlp/infer", b"", {}, None),                            # 405 before the token
    ("GET", "/v2/models/mlp/infer", b"", {}, "infer"),                         # 405
    ("GET", "/nowhere", b"", {}, "infer"),                                     # 404
    ("GET", "/v2/health/ready", b"", {}, None),
    ("GET", "/v2/models/mlp", b"", {}, "infer"),
    ("GET", "/v1/models/mlp", b"", {}, "infer"),
    ("POST", "/predict", gzip.compress(json.dumps({"input": X.tolist()}).encode()), {"Content-Encoding": "gzip"},
     "infer"),
    ("POST", "/predict", b"x" * 70000, {}, "infer"),                           # 413 over --max-body-mb
]


def test_hot_successes_are_native_and_byte_identical(servers):
    py, nat, nets = servers
    before = native_answers(nat)
    for path, body, hdr in HOT:
        h = {**hdr, **auth("infer")}
        a = httpx.post(py.url + path, content=body, headers=h)
        b = httpx.post(nat.url + path, content=body, headers=h)
        assert a.status_code == b.status_code == 200, (path, a.text, b.text)
        assert a.content == b.content, (path, a.content[:300], b.content[:300])
        assert a.headers["content-type"] == b.headers["content-type"]
        assert a.headers.get("inference-header-content-length") == b.headers.get("inference-header-content-length")
    assert native_answers(nat) - before == len(HOT)


@pytest.mark.parametrize("case", FORWARDED, ids=lambda c: f"{c[0]} {c[1]} {c[4]}")
def test_everything_else_gets_pythons_answer(servers, case):
    py, nat, nets = servers
    method, path, body, hdr, who = case
    h = {**hdr, **(auth(who) if who else {})}
    before = native_answers(nat)
    a = httpx.request(method, py.url + path, content=body or None, headers=h)
    b = httpx.request(method, nat.url + path, content=body or None, headers=h)
    assert a.status_code == b.status_code, (path, a.text, b.text)
    assert a.content == b.content, (path, a.content[:300], b.content[:300])
    assert a.headers.get("retry-after") == b.headers.get("retry-after")
    if a.status_code != 200:
        assert native_answers(nat) == before


@pytest.mark.parametrize("case", REFUSED, ids=lambda c: f"{c[0]} {c[3]} {c[2]}")
def test_auth_refusals_are_native_in_pythons_words(servers, case):
    py, nat, nets = servers
    path, body, hdr, who = case
    h = {**hdr, **(auth(who) if who else {})}
    before = native_answers(nat)
    a = httpx.post(py.url + path, content=body, headers=h)
    b = httpx.post(nat.url + path, content=body, headers=h)
    assert a.status_code == b.status_code and a.status_code in (401, 403), (a.text, b.text)
    assert a.content == b.content, (a.content, b.content)
    assert native_answers(nat) == before + 1
    st = httpx.get(nat.url + "/api/status", headers=auth("admin")).json()
    assert any(e["status"] == a.status_code and e["type"] == "AuthError" and e["error"] == a.json()["error"]
               for e in st["errors"])


def test_rate_limit_is_shared_and_429s(servers):
    py, nat, nets = servers
    body = json.dumps({"input": X[0].tolist()}).encode()
    got = [httpx.post(nat.url + "/predict", content=body, headers=auth("slow")) for _ in range(3)]
    assert [r.status_code for r in got] == [200, 200, 429]
    assert int(got[2].headers["retry-after"]) >= 1 and "over its rate" in got[2].json()["error"]
    # the same bucket limits the routes Python answers
    r = httpx.post(nat.url + "/v2/models/mlp/infer", content=v2_json(id="x"), headers=auth("slow"))
    assert r.status_code == 429


def test_over_rate_is_a_native_429_in_pythons_bytes(servers):
    """Over its token's rate, a hot request gets auth.py's 429 from the front end itself: the same body bytes
    (a token name with a quote, a tab, accents, an emoji and a DEL) and Retry-After, logged as its AuthError."""
    py, nat, nets = servers
    body = json.dumps({"input": X[0].tolist()}).encode()
    a = [httpx.post(py.url + "/predict", content=body, headers=auth("oddrate")) for _ in range(2)]
    before = native_answers(nat)
    b = [httpx.post(nat.url + "/predict", content=body, headers=auth("oddrate")) for _ in range(2)]
    assert [r.status_code for r in a] == [r.status_code for r in b] == [200, 429], (a[1].text, b[1].text)
    assert a[1].content == b[1].content, (a[1].content, b[1].content)
    assert b"\\u007f" in b[1].content and b"\\ud83d\\ude00" in b[1].content
    # str(max(1, int(wait + 0.999))) with wait = 1e6 s less the time since the take: equal within a second
    assert abs(int(a[1].headers["retry-after"]) - int(b[1].headers["retry-after"])) <= 1
    assert native_answers(nat) == before + 2
    st = httpx.get(nat.url + "/api/status", headers=auth("admin")).json()
    assert any(e["status"] == 429 and e["type"] == "AuthError" and e["error"] == a[1].json()["error"]
               for e in st["errors"])


def test_pipelined_requests_answer_in_order(servers):
    py, nat, nets = servers
    ok = json.dumps({"input": X[0].tolist()}).encode()
    bad = b'{"input": [1, 2, 3]}'
    tok = f"Authorization: Bearer {TOK['infer']}\r\n".encode()

    def req(path, body, method=b"POST"):
        return (method + b" " + path + b" HTTP/1.1\r\nHost: t\r\n" + tok + b"Content-Length: %d\r\n\r\n" % len(body)
                + body)
    s = socket.create_connection(("127.0.0.1", nat.port), timeout=30)
    s.sendall(req(b"/predict", ok) + req(b"/predict", bad) + req(b"/v2/health/live", b"", b"GET")
              + req(b"/predict", ok))
    data = b""
    deadline = time.monotonic() + 30
    while data.count(b"HTTP/1.1 ") < 4 and time.monotonic() < deadline:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    s.close()
    statuses = [int(part[:3]) for part in data.split(b"HTTP/1.1 ")[1:]]
    assert statuses == [200, 400, 200, 200], data[:600]


def test_chunked_and_expect_continue(servers):
    py, nat, nets = servers
    body = json.dumps({"input": X.tolist()}).encode()

    def chunks():
        for i in range(0, len(body), 7):
            yield body[i:i + 7]
    a = httpx.post(py.url + "/predict", content=chunks(), headers=auth("infer"))
    b = httpx.post(nat.url + "/predict", content=chunks(), headers=auth("infer"))
    assert a.status_code == b.status_code == 200 and a.content == b.content
    s = socket.create_connection(("127.0.0.1", nat.port), timeout=30)
    s.sendall(b"POST /predict HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nAuthorization: Bearer "
              + TOK["infer"].encode() + b"\r\nContent-Length: %d\r\n\r\n" % len(body))
    assert s.recv(100).startswith(b"HTTP/1.1 100 Continue")
    s.sendall(body)
    resp = b""
    while b'"output"' not in resp or not resp.endswith(b"}"):
        chunk = s.recv(65536)
        if not chunk:
            break
        resp += chunk
    s.close()
    assert resp.startswith(b"HTTP/1.1 200") and resp.endswith(a.content)


def test_metrics_merge_native_counts(servers):
    py, nat, nets = servers
    body = json.dumps({"instances": X.tolist()}).encode()
    for _ in range(5):
        assert httpx.post(nat.url + "/v1/models/mlp:predict", content=body, headers=auth("infer")).status_code == 200
    text = httpx.get(nat.url + "/metrics", headers=auth("metrics")).text
    line = [x for x in text.splitlines() if x.startswith("aimass_requests_total{") and 'protocol="v1"' in x
            and 'code="200"' in x and 'version="1"' in x]
    assert line and float(line[0].split()[-1]) >= 5
    assert 'aimass_request_latency_seconds_count{model="mlp",version="1"}' in text
    st = httpx.get(nat.url + "/api/status", headers=auth("metrics")).json()
    assert any(r["protocol"] == "v1" and r["code"] == "200" and r["count"] >= 5 for r in st["requests"])


def test_idle_timeout(tmp_path):
    make_store(tmp_path, versions=1)
    with serve_process(tmp_path / "store", "--http", "native", "--idle-timeout", "0.3") as srv:
        a = socket.create_connection(("127.0.0.1", srv.port), timeout=30)
        a.settimeout(30)
        assert a.recv(10) == b""             # idle: closed by the server after the timeout
        a.close()
        assert srv.stop() == 0


def test_connection_cap(tmp_path):
    make_store(tmp_path, versions=1)
    with serve_process(tmp_path / "store", "--http", "native", "--max-connections", "2") as srv:
        conns = [socket.create_connection(("127.0.0.1", srv.port), timeout=30) for _ in range(3)]
        for c in conns:
            c.settimeout(30)
        assert conns[2].recv(10) == b""      # over the cap: closed at once
        conns[0].sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: t\r\n\r\n")
        assert conns[0].recv(4096).startswith(b"HTTP/1.1 200")
        for c in conns:
            c.close()
        assert srv.stop() == 0


def test_float_layout_matches_orjson():
    orjson = pytest.importorskip("orjson")
    rng = np.random.default_rng(7)
    bits = rng.integers(0, 2 ** 32, 200_000, dtype=np.uint64).astype(np.uint32)
    vals = np.concatenate([bits.view(np.float32),
                           np.float32([0, -0.0, 1, 0.1, 1e-7, 1e-5, 1e13, 1e14, 123456790, 3.4e38, 1.4e-45,
                                       np.inf, -np.inf, np.nan]),
                           (rng.standard_normal(20_000) * 10.0 ** rng.integers(-8, 9, 20_000)).astype(np.float32)])
    assert _C.f32_json(vals) == orjson.dumps(vals, option=orjson.OPT_SERIALIZE_NUMPY)


def test_mutated_hot_requests_get_pythons_status_and_bytes(servers):
    """Differential: 150 randomly mutated hot requests (bytes of the JSON bodies and binary headers
    replaced, cut or repeated; the binary header length moved) get the same status and body from both
    modes, so the front end never accepts what Python refuses nor words an answer differently."""
    py, nat, nets = servers
    rng = np.random.default_rng(3)
    alphabet = np.frombuffer(b'0123456789.,[]{}":eE-+ xtrufalsn', dtype=np.uint8)
    seeds = [(p, b, h) for p, b, h in HOT]
    for i in range(150):
        path, body, hdr = seeds[i % len(seeds)]
        b = bytearray(body)
        hdr = dict(hdr)
        head_len = int(hdr.get("Inference-Header-Content-Length", len(b)))
        for _ in range(int(rng.integers(1, 4))):
            kind = int(rng.integers(0, 4))
            at = int(rng.integers(0, max(1, head_len)))
            if kind == 0:
                b[at] = int(rng.choice(alphabet))
            elif kind == 1:
                n = int(rng.integers(1, 6))
                del b[at:at + n]
                head_len -= min(n, head_len - at)
            elif kind == 2:
                n = int(rng.integers(1, 6))
                b[at:at] = b[at:at + n]
                head_len += len(b[at:at + n]) if at + n <= head_len else 0
            elif "Inference-Header-Content-Length" in hdr:
                head_len += int(rng.integers(-3, 4))
        if "Inference-Header-Content-Length" in hdr:
            hdr["Inference-Header-Content-Length"] = str(head_len)
        h = {**hdr, **auth("infer")}
        a = httpx.post(py.url + path, content=bytes(b), headers=h)
        r = httpx.post(nat.url + path, content=bytes(b), headers=h)
        assert a.status_code == r.status_code, (i, path, bytes(b)[:200], a.text[:200], r.text[:200])
        assert a.content == r.content, (i, path, bytes(b)[:200], a.content[:200], r.content[:200])


def test_queue_full_is_503_with_retry_after_and_pythons_body(tmp_path):
    """--queue-capacity 1 and requests that each keep the model busy for a while: a burst overflows the
    queue. The front end answers the 503 itself (counted in its answers) with uvicorn's Retry-After and
    body bytes; the other requests of the burst succeed."""
    from concurrent.futures import ThreadPoolExecutor

    from aimass.registry import Registry
    from serve_util import export_mlp
    reg = Registry(str(tmp_path / "store"))
    export_mlp(tmp_path / "big.aimass", seed=3, hidden=512, layers=4)
    reg.push(str(tmp_path / "big.aimass"), "big", label="stable")
    x = np.random.default_rng(0).standard_normal((256, 4)).astype(np.float32)
    body = json.dumps({"instances": x.tolist()}).encode()
    want = (b'{"error": "model \'big\' is overloaded (queue full): submit: the request queue is full '
            b'(queue_capacity=1); retry later or raise queue_capacity; retry later"}')
    args = ("--queue-capacity", "1", "--max-batch-size", "1", "--log-level", "warning")
    logged = []
    with serve_process(tmp_path / "store", *args) as py, serve_process(tmp_path / "store", *args, "--http",
                                                                        "native") as nat:
        for srv in (py, nat):
            before = httpx.get(srv.url + "/api/status").json().get("native", {}).get("answers", 0)
            sent, full = 0, []

            def one(_):
                return httpx.post(srv.url + "/v1/models/big:predict", content=body, timeout=60)

            with ThreadPoolExecutor(16) as pool:
                for _ in range(10):              # bounded: a burst of 16 overflows a 1-deep queue at once
                    rs = list(pool.map(one, range(16)))
                    sent += len(rs)
                    assert {r.status_code for r in rs} <= {200, 503}
                    full += [r for r in rs if r.status_code == 503]
                    if full:
                        break
            assert full, f"no 503 in {sent} requests"
            for r in full:
                assert r.headers["retry-after"] == "1"
                assert r.headers["content-type"] == "application/json"
                assert r.content == want
            if srv is nat:                       # every request of the bursts, 503s included, was native
                assert httpx.get(nat.url + "/api/status").json()["native"]["answers"] - before == sent
            assert srv.stop() == 0
            # one JSON error line per 503, the same in both modes but for the time stamp
            lines = [json.loads(x) for x in srv.output().splitlines() if '"request_failed"' in x]
            assert len(lines) == len(full)
            logged.append({k: v for k, v in lines[0].items() if k != "ts"})
    assert logged[0] == logged[1]
    assert logged[0]["status"] == 503 and logged[0]["model"] == "big" and logged[0]["version"] == 1
