"""aimass serve as a real process on 127.0.0.1: stock tritonclient.http (JSON and binary tensors),
a live label switch and a rollback under continuous load with zero failed requests, SIGTERM drain.
Each runs with --http uvicorn and --http native (the C++ front end, which forwards what it does not
answer to the same app)."""
import json
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")
httpclient = pytest.importorskip("tritonclient.http")
import httpx  # noqa: E402
import yaml  # noqa: E402

from aimass import _C  # noqa: E402
from aimass.serve import hash_token  # noqa: E402
from serve_util import PKG_ROOT, export_mlp, make_store, serve_process  # noqa: E402

pytestmark = pytest.mark.timeout(180)

X = (np.arange(8, dtype=np.float32).reshape(2, 4) - 4) / 4
AUTH = {"Authorization": "Bearer test-token"}   # passed as dict(AUTH): tritonclient adds headers to the dict it gets


def ref(net, x=X):
    with torch.no_grad():
        return net(torch.from_numpy(x)).numpy()


NATIVE = hasattr(_C, "NativeFrontend") and _C.native_frontend_available()


@pytest.fixture(params=["uvicorn", "native"])
def http(request):
    if request.param == "native" and not NATIVE:
        pytest.skip("the native front end was compiled out (no OpenSSL libcrypto at build time)")
    return ("--http", request.param)


@pytest.fixture()
def store(tmp_path):
    reg, nets = make_store(tmp_path, versions=1)
    return tmp_path, reg, nets


def test_tritonclient_json_and_binary(store, http):
    tmp, reg, nets = store
    tokens = tmp / "tokens.yml"
    tokens.write_text(yaml.safe_dump({"tokens": [{"name": "t", "sha256": hash_token("test-token"),
                                                  "scopes": ["infer", "admin"]}]}))
    with serve_process(tmp / "store", "--tokens", str(tokens), *http) as srv:
        c = httpclient.InferenceServerClient(url=f"127.0.0.1:{srv.port}")
        assert c.is_server_live() and c.is_server_ready()
        assert c.is_model_ready("mlp", headers=dict(AUTH))
        meta = c.get_model_metadata("mlp", headers=dict(AUTH))
        assert meta["inputs"][0]["datatype"] == "FP32"
        for binary_in in (False, True):
            for binary_out in (False, True):
                inp = httpclient.InferInput("x", list(X.shape), "FP32")
                inp.set_data_from_numpy(X, binary_data=binary_in)
                out = httpclient.InferRequestedOutput("output", binary_data=binary_out)
                res = c.infer("mlp", [inp], outputs=[out], headers=dict(AUTH))
                np.testing.assert_allclose(res.as_numpy("output"), ref(nets[0]), rtol=1e-5, atol=1e-5)
        res = c.infer("mlp", [inp], headers=dict(AUTH), model_version="1")   # no outputs named: all binary
        np.testing.assert_allclose(res.as_numpy("output"), ref(nets[0]), rtol=1e-5, atol=1e-5)
        with pytest.raises(Exception, match="401|token"):
            c.infer("mlp", [inp])
        bad = httpclient.InferInput("x", [2, 4], "INT64")
        bad.set_data_from_numpy(np.zeros((2, 4), np.int64))
        with pytest.raises(Exception, match="input 'x': datatype 'INT64'"):
            c.infer("mlp", [bad], headers=dict(AUTH))
        idx = c.get_model_repository_index(headers=dict(AUTH))
        assert idx[0]["name"] == "mlp" and idx[0]["state"] == "READY"
        c.unload_model("mlp", headers=dict(AUTH))
        assert not c.is_model_ready("mlp", headers=dict(AUTH))
        c.load_model("mlp", headers=dict(AUTH))
        assert c.is_model_ready("mlp", headers=dict(AUTH))
        c.close()
        assert srv.stop() == 0


def test_label_switch_and_rollback_under_load(store, http):
    tmp, reg, nets = store
    nets.append(export_mlp(tmp / "v2.aimass", seed=2))
    want = {"1": ref(nets[0]), "2": ref(nets[1])}
    with serve_process(tmp / "store", "--poll-interval", "0.05", *http) as srv:
        stop = threading.Event()
        seen, failures = [], []

        def load():
            c = httpclient.InferenceServerClient(url=f"127.0.0.1:{srv.port}")
            inp = httpclient.InferInput("x", list(X.shape), "FP32")
            inp.set_data_from_numpy(X, binary_data=True)
            while not stop.is_set():
                try:
                    res = c.infer("mlp", [inp])
                    v = res.get_response()["model_version"]
                    np.testing.assert_allclose(res.as_numpy("output"), want[v], rtol=1e-5, atol=1e-5)
                    seen.append(v)
                except Exception as exc:  # noqa: BLE001 - every failure is recorded and fails the test
                    failures.append(repr(exc))
            c.close()

        threads = [threading.Thread(target=load) for _ in range(4)]
        for t in threads:
            t.start()

        def wait_for(version):
            n = len(seen)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not failures:
                if seen[n:].count(version) >= 20:
                    return
                time.sleep(0.02)
            raise AssertionError(f"version {version} never served; failures {failures[:3]}\n{srv.output()[-2000:]}")

        try:
            wait_for("1")
            assert reg.push(str(tmp / "v2.aimass"), "mlp", label="canary") == 2
            reg.promote("mlp")               # canary -> stable: the server switches live
            wait_for("2")
            reg.rollback("mlp")              # stable back to version 1
            wait_for("1")
        finally:
            stop.set()
            for t in threads:
                t.join(30)
        assert failures == [], failures[:5]
        first2, last2 = seen.index("2"), len(seen) - 1 - seen[::-1].index("2")
        assert "1" in seen[:first2] and "1" in seen[last2:]
        log = srv.output()
        assert '"event": "switch", "model": "mlp", "from": 1, "to": 2' in log
        assert '"event": "switch", "model": "mlp", "from": 2, "to": 1' in log
        st = httpx.get(srv.url + "/api/status").json()
        assert st["switches"] == 2 and st["models"][0]["default"] == 1
        assert srv.stop() == 0


def test_sigterm_drains_inflight_then_exits_0(store, http):
    tmp, reg, nets = store
    with serve_process(tmp / "store", *http) as srv:
        head = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 4],
                                       "parameters": {"binary_data_size": X.nbytes}}],
                           "parameters": {"binary_data_output": True}}).encode()
        body = head + X.tobytes()
        # a request held in flight: its body arrives in two parts, the second after SIGTERM
        s = socket.create_connection(("127.0.0.1", srv.port), timeout=30)
        s.sendall(b"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: t\r\nContent-Type: application/octet-stream\r\n"
                  b"Inference-Header-Content-Length: %d\r\nContent-Length: %d\r\n\r\n" % (len(head), len(body))
                  + body[:10])
        deadline = time.monotonic() + 30
        while httpx.get(srv.url + "/api/status").json()["inflight"] < 1:
            assert time.monotonic() < deadline, "the held request never reached the app"
            time.sleep(0.01)
        srv.terminate()
        while httpx.get(srv.url + "/v2/health/ready").status_code != 503:
            assert time.monotonic() < deadline, "readiness never went false"
            time.sleep(0.01)
        r = httpx.post(srv.url + "/predict", json={"input": X[0].tolist()})
        assert r.status_code == 503 and "draining" in r.json()["error"]
        assert srv.proc.poll() is None          # still serving the held request
        s.sendall(body[10:])
        resp = b""
        while b"\r\n\r\n" not in resp or len(resp) < resp.index(b"\r\n\r\n") + 4 + len(head):
            chunk = s.recv(65536)
            if not chunk:
                break
            resp += chunk
        s.close()
        assert resp.startswith(b"HTTP/1.1 200"), resp[:200]
        assert srv.wait(60) == 0, srv.output()
        assert '"event": "drain"' in srv.output()


def test_non_loopback_without_tokens_is_refused(tmp_path):
    r = subprocess.run([sys.executable, "-m", "aimass", "serve", "--store", str(tmp_path / "s"), "--host",
                        "0.0.0.0"], capture_output=True, text=True, timeout=60,
                       env={"PYTHONPATH": PKG_ROOT, "PATH": "/usr/bin:/bin"})
    assert r.returncode != 0 and "--insecure" in r.stderr
    bad = tmp_path / "tokens.yml"
    bad.write_text("tokens: [{sha256: not-a-hash}]")
    r = subprocess.run([sys.executable, "-m", "aimass", "serve", "--store", str(tmp_path / "s"), "--tokens", str(bad)],
                       capture_output=True, text=True, timeout=60,
                       env={"PYTHONPATH": PKG_ROOT, "PATH": "/usr/bin:/bin"})
    assert r.returncode == 2 and "64-hex-digit sha256" in r.stderr and "Traceback" not in r.stderr


def test_default_mode_is_native_where_built(tmp_path):
    """No --http: the native front end where this build has it (it then answers the hot requests),
    else uvicorn alone with a logged reason."""
    _, nets = make_store(tmp_path, versions=1)
    with serve_process(tmp_path / "store") as srv:
        r = httpx.post(srv.url + "/predict", json={"input": X.tolist()})
        assert r.status_code == 200
        np.testing.assert_allclose(np.asarray(r.json()["output"], np.float32), ref(nets[0]), rtol=1e-5, atol=1e-6)
        st = httpx.get(srv.url + "/api/status").json()
        if NATIVE:
            assert st["native"]["answers"] >= 1
            assert "http_fallback" not in srv.output()
            assert f'"event": "native_http", "url": "{srv.url}"' in srv.output()   # where clients connect
        else:
            assert "native" not in st
            assert '"event": "http_fallback"' in srv.output() and "libcrypto" in srv.output()
        assert srv.stop() == 0


def test_http_fallback_when_the_front_end_is_compiled_out(monkeypatch, caplog, capsys):
    """Where the front end cannot run: no --http falls back to uvicorn with the reason logged; a named
    --http native is refused with the reason; --http uvicorn is taken as asked."""
    from aimass.serve import cli, native
    why = "the native front end was compiled out: test"
    monkeypatch.setattr(native, "unavailable", lambda: why)
    with caplog.at_level("WARNING", logger="aimass.serve"):
        assert cli.resolve_http(None) == "uvicorn"
    rec = json.loads(caplog.records[-1].getMessage())
    assert rec["event"] == "http_fallback" and rec["http"] == "uvicorn" and rec["reason"] == why
    assert cli.default_http() == "uvicorn"
    caplog.clear()
    assert cli.resolve_http("native") is None
    assert f"--http native: {why}" in capsys.readouterr().err
    assert cli.resolve_http("uvicorn") == "uvicorn" and not caplog.records
    monkeypatch.setattr(native, "unavailable", lambda: None)
    assert cli.resolve_http(None) == "native" and cli.default_http() == "native"


def test_native_binds_a_host_name_by_its_address():
    """The front end binds numeric addresses only: --host NAME binds the name's first address (uvicorn
    takes names too), an address or localhost goes as given, an unknown name is an OSError."""
    import ipaddress
    import socket as sk

    from aimass.serve.cli import numeric_host
    for h in ("127.0.0.1", "::1", "0.0.0.0", "localhost"):
        assert numeric_host(h) == h
    ipaddress.ip_address(numeric_host(sk.gethostname()))
    with pytest.raises(OSError):
        numeric_host("no-such-host.invalid")
