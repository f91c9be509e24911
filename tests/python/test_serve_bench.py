"""The serve benchmark's load generators (wrk and the asyncio fallback) against a tiny loopback
HTTP/1.1 server: counts, errors and latencies come back parsed, and non-200 answers count as errors."""
import http.server
import shutil
import threading

import pytest

from aimass.bench import serve as bs

pytestmark = pytest.mark.timeout(120)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"     # keep-alive, as both servers of the bench answer

    def do_POST(self):
        n = int(self.headers.get("Content-Length", 0))
        body = self.rfile.read(n)
        status = 200 if self.path == "/ok" else 503
        out = b'{"n": %d}' % len(body)
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def port():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv.server_address[1]
    srv.shutdown()
    srv.server_close()


def test_asyncio_generator_counts_and_errors(port):
    ok = bs.http_request("/ok", b'{"input": [1, 2]}', ["Content-Type: application/json"])
    r = bs.load(port, ok, 2, 40, 10.0, warmup=5, wrk=None)
    assert r["n"] == 40 and r["errors"] == 0 and r["rps"] > 0 and 0 < r["p50_us"] <= r["p99_us"]
    bad = bs.http_request("/busy", b"{}")
    r = bs.load(port, bad, 1, 10, 10.0, warmup=0, wrk=None)
    assert r["n"] == 10 and r["errors"] == 10


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed (tests/run_all.sh installs Debian's)")
def test_wrk_generator_sends_the_prebuilt_request(port, tmp_path, monkeypatch):
    monkeypatch.delenv("AIMASS_BENCH_CLIENT", raising=False)
    assert bs.wrk_path() is not None
    monkeypatch.setenv("AIMASS_BENCH_CLIENT", "python")
    assert bs.wrk_path() is None      # the asyncio generator on request
    ok = bs.http_request("/ok", b'{"input": [1, 2]}', ["Content-Type: application/json"])
    r = bs.wrk_load(shutil.which("wrk"), port, ok, 2, 0.5, str(tmp_path))
    assert r["n"] > 0 and r["errors"] == 0 and r["rps"] > 0 and 0 < r["p50_us"] <= r["p99_us"]
    bad = bs.http_request("/busy", b"{}")
    r = bs.wrk_load(shutil.which("wrk"), port, bad, 1, 0.5, str(tmp_path))
    assert r["n"] > 0 and r["errors"] == r["n"]


@pytest.mark.parametrize("with_model", [False, True])
def test_bare_asgi_floor_server_answers_under_serve_settings(tmp_path, with_model):
    """The bench's floor (a bare ASGI app under `aimass serve`'s uvicorn settings, with or without a model
    it runs per request) answers POSTs with any body, keeps the connection alive, and refuses a bad
    command line."""
    import subprocess
    import sys

    import httpx
    from aimass.bench import _bare_asgi
    assert subprocess.run([sys.executable, "-m", "aimass.bench._bare_asgi", "x"], capture_output=True,
                          timeout=60).returncode == 2
    extra = []
    if with_model:
        torch = pytest.importorskip("torch")
        import aimass.runtime as rt
        from aimass.bench.runtime import make_mlp
        rt.export(make_mlp((8, 2)), (torch.randn(2, 8),), tmp_path / "m.aimass", input_names=["x"])
        extra = [str(tmp_path / "m.aimass")]
    port = bs.free_port()
    proc = subprocess.Popen([sys.executable, "-m", "aimass.bench._bare_asgi", str(port), *extra])
    try:
        bs.wait_http(port, "/", proc, timeout=60)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as c:
            for body in (b"", b"x" * 100_000):
                r = c.post("/v2/models/mlp/infer", content=body)
                assert r.status_code == 200 and r.content == _bare_asgi.BODY
                assert r.headers["content-type"] == "application/json"
    finally:
        proc.terminate()
        assert proc.wait(30) == 0


def test_session_p50_paced_and_v2_binary_request(tmp_path):
    """Session.run's p50 helper (back to back and paced) and the bench's pre-built v2 binary request."""
    import json

    import numpy as np
    torch = pytest.importorskip("torch")
    import aimass.runtime as rt
    from aimass.bench.runtime import make_mlp
    path = tmp_path / "tiny.aimass"
    rt.export(make_mlp((8, 2)), (torch.randn(2, 8),), path, input_names=["x"])
    x = np.ones((1, 8), np.float32)
    with rt.Session(path) as sess:
        for gap in (0.0, 50.0):
            p50, p99 = bs.session_p50(sess, x, 50, gap_us=gap)
            assert 0 < p50 <= p99
    req = bs._v2_binary("tiny", x)
    head, _, body = req.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert lines[0] == "POST /v2/models/tiny/infer HTTP/1.1"
    hlen = int(next(v for k, _, v in (ln.partition(": ") for ln in lines[1:]) if k == "Inference-Header-Content-Length"))
    meta = json.loads(body[:hlen])
    assert meta["inputs"][0]["parameters"]["binary_data_size"] == x.nbytes and body[hlen:] == x.tobytes()


def test_stage_medians_from_probe_records():
    from aimass.bench.serve_stages import stage_medians
    recs = [{"recv": 0 + t, "handle": 10_000 + t, "body": 13_000 + t, "run0": 15_000 + t, "run1": 115_000 + t,
             "send0": 120_000 + t, "write0": 125_000 + t, "write": 135_000 + t, "done": 140_000 + t}
            for t in (0, 200_000, 400_000)]
    st = stage_medians(recs)
    assert st == {"read": 10.0, "body": 3.0, "decode": 2.0, "compute": 100.0, "encode": 5.0, "send": 15.0,
                  "write": 10.0, "after": 5.0, "turnaround": 65.0, "requests": 3.0}
    # a request without a model call (an error answered early) has no compute stage but still counts
    st = stage_medians([{"recv": 0, "handle": 1000, "send0": 2000, "write0": 2500, "write": 3000, "done": 4000}])
    assert "compute" not in st and st["read"] == 1.0 and st["send"] == 1.0 and st["requests"] == 1.0


def test_serve_stages_probes_a_real_server():
    """The stage probe wraps a real `aimass serve` process: every stage of a v2 binary request comes back,
    and they add up to no more than the client's p50 (the turnaround aside)."""
    pytest.importorskip("torch")
    from aimass.bench import serve_stages
    res = serve_stages.run(("tiny",), rounds=1, seconds=1.0, log=lambda m: None)
    st = res["tiny"]
    assert st["errors"] == 0 and st["requests"] > 100
    assert all(st[k] > 0 for k in ("read", "body", "decode", "compute", "encode", "send", "write", "after",
                                   "turnaround"))
    assert st["write"] <= st["send"]
    with pytest.raises(ValueError, match="unknown targets"):
        serve_stages.run(("nope",), rounds=1, seconds=1.0)


def test_bare_asgi_runs_the_model_once_per_request():
    """With a model, the floor app calls Session.run once per request, after reading the whole body."""
    import asyncio

    from aimass.bench import _bare_asgi
    calls, sent = [], []

    class Sess:
        def run(self, inputs):
            calls.append(inputs)

    msgs = [{"type": "http.request", "body": b"ab", "more_body": True}, {"type": "http.request", "body": b"c"}]

    async def receive():
        return msgs.pop(0)

    async def send(m):
        sent.append(m)
    old = _bare_asgi.RUN
    _bare_asgi.RUN = (Sess(), {"x": "row"})
    try:
        asyncio.run(_bare_asgi.app({"type": "http"}, receive, send))
    finally:
        _bare_asgi.RUN = old
    assert calls == [{"x": "row"}] and not msgs
    assert sent[0]["status"] == 200 and sent[1]["body"] == _bare_asgi.BODY


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed (tests/run_all.sh installs Debian's)")
def test_sweep_measures_the_native_floor(monkeypatch):
    """--only native: the compiled floor answers the bench's own v2 binary and /predict requests through
    wrk with no errors, at concurrency 1 only, beside the Session.run baseline of the same run."""
    pytest.importorskip("torch")
    monkeypatch.delenv("AIMASS_BENCH_CLIENT", raising=False)
    res = bs.sweep(quick=True, concurrency=(1,), seconds=1, rounds=1, only=["native"], log=lambda m: None)
    assert set(res["runs"]) == {bs.NATIVE, bs.NATIVE_JSON}
    for label in (bs.NATIVE, bs.NATIVE_JSON):
        r = res["runs"][label][1]
        assert r["n"] > 0 and r["errors"] == 0 and 0 < r["p50_us"] <= r["p99_us"]
    assert res["session_p50_us"] > 0 and len(res["session_p50_rounds_us"]) == 2


def test_sweep_measures_serve_http_native(monkeypatch):
    """--only native-*: `aimass serve --http native` answers the bench's v2 binary, v2 JSON, /predict and
    TF-Serving requests through the load generator with no errors, labelled apart from the uvicorn mode."""
    pytest.importorskip("torch")
    from aimass import _C
    if not (hasattr(_C, "NativeFrontend") and _C.native_frontend_available()):
        pytest.skip("the native front end was compiled out (no OpenSSL libcrypto at build time)")
    monkeypatch.delenv("AIMASS_BENCH_CLIENT", raising=False)
    only = ["native-v2bin", "native-v2json", "native-predict", "native-tfserving", "v2bin"]
    res = bs.sweep(quick=True, concurrency=(1,), seconds=1, rounds=1, only=only, log=lambda m: None)
    want = {bs.NATIVE_SERVE + s for s in (" v2 binary", " v2 JSON", " /predict", " TF-Serving :predict")}
    # the uvicorn mode runs with --http uvicorn named, whatever the default: its labels say so
    want |= {bs.UVICORN_SERVE + " v2 binary", bs.UVICORN_SERVE + " GET /v2/health/live"}
    assert set(res["runs"]) == want
    for label in want:
        r = res["runs"][label][1]
        assert r["n"] > 0 and r["errors"] == 0 and 0 < r["p50_us"] <= r["p99_us"]


def test_report_marks_the_default_mode(monkeypatch):
    """The overhead figures name the mode in their label, and the default mode's carry the note."""
    from aimass.bench._report import Report
    fig = {"rps": 1000.0, "rps_spread": 0.0, "p50_us": 200.0, "p99_us": 400.0}
    runs = {mode + p: {1: fig} for mode in (bs.UVICORN_SERVE, bs.NATIVE_SERVE) for p in bs.PROTOCOLS}
    monkeypatch.setattr(bs, "sweep", lambda **kw: {"runs": runs, "session_p50_us": 100.0})
    for mode in ("native", "uvicorn"):
        monkeypatch.setattr("aimass.serve.cli.default_http", lambda m=mode: m)
        rep = Report()
        bs.run(rep, quick=True)
        over = [f for f in rep.figures if f.name.startswith("HTTP overhead per request")]
        assert len(over) == 8 and all(f.goal_met for f in over)
        marked = {f.name for f in over if f.note == "aimass serve's default mode"}
        assert marked == {f.name for f in over if f"--http {mode} " in f.name}
        assert len(marked) == 4
