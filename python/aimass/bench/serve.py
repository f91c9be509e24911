"""Serve suite: HTTP concurrency vs req/s and p99 for ``aimass serve`` against a Flask
``/predict`` app running the same torch model per request (the platform's documented
pattern), and Triton-style JSON against binary tensors; HTTP overhead per request is the
server's p50 at one connection minus ``Session.run``'s p50 in-process.

Loopback only, bounded in time (and, with the asyncio generator, in requests) per point. One
closed-loop load generator drives every target with the same pre-built request over keep-alive
connections: Debian's ``wrk`` (C, one thread) when it is installed, else an asyncio client in
this process (its own Python cost per request then counts in every target's latency and, on a
small machine, takes a core from the servers). Each server runs in its own process. Targets are
interleaved per round so all see the same machine load."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional

import numpy as np

from ._loadgen import free_port, http_request, load, wait_http, wrk_path
from ._loadgen import cpu_seconds, wrk_load  # noqa: F401  (this module's names since before the split)
from ._report import Report
from .runtime import MLP

SUITE = "serve"

FLASK_APP = r'''
import sys, torch
from flask import Flask, jsonify, request
from aimass.bench.runtime import make_mlp
model = make_mlp(%r)
model.load_state_dict(torch.load(sys.argv[1]))
app = Flask(__name__)

@app.route("/predict", methods=["POST"])
def predict():
    x = torch.tensor(request.get_json()["input"], dtype=torch.float32)
    with torch.no_grad():
        y = model(x)
    return jsonify({"output": y.tolist()})

app.run(host="127.0.0.1", port=int(sys.argv[2]), threaded=True)
'''


def compute_totals(port: int):
    """(sum seconds, count) of the server's aimass_compute_seconds histogram (all versions)."""
    import re

    import httpx
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return tuple(sum(float(v) for v in re.findall(rf"^aimass_compute_seconds_{k}{{[^}}]*}} (\S+)$", text, re.M))
                 for k in ("sum", "count"))


def session_p50(sess, x: np.ndarray, n: int = 3000, gap_us: float = 0.0):
    """p50 and p99 (us) of in-process Session.run on one row, after a warm-up. gap_us > 0: the calls
    are paced, the thread sleeping that long between them as a server idles between the requests of
    one connection (the engine's idle threads then go to sleep and other processes use the caches)."""
    for _ in range(300):
        sess.run({"x": x})
    t = np.empty(n)
    for i in range(n):
        if gap_us:
            time.sleep(gap_us * 1e-6)
        t0 = time.perf_counter_ns()
        sess.run({"x": x})
        t[i] = time.perf_counter_ns() - t0
    return float(np.percentile(t / 1e3, 50)), float(np.percentile(t / 1e3, 99))


# labels of the concurrency-1 HTTP-cost points (--only bare, tiny), and the pacing of Session.run
BARE = "bare uvicorn ASGI app (no model)"
BARE_MODEL = "bare uvicorn ASGI app + Session.run (no aimass serve code)"
# `aimass serve`'s two modes, each started with its --http named so that a label says which mode ran
# whatever the default is (native where the front end is built, serve.cli.default_http)
UVICORN_SERVE = "aimass serve --http uvicorn"   # the ASGI app answers every request
NATIVE_SERVE = "aimass serve --http native"     # C++ front end, uvicorn behind it
PROTOCOLS = (" /predict", " v2 JSON", " v2 binary", " TF-Serving :predict")
TINY = UVICORN_SERVE + " v2 binary, tiny model"
NATIVE = "native C++ front end + Batcher, v2 binary (no Python)"
NATIVE_JSON = "native C++ front end + Batcher, /predict JSON (no Python)"
PACED_GAP_US = 200.0


def default_label() -> str:
    """The label of the mode `aimass serve` runs without --http on this build."""
    from ..serve.cli import default_http
    return NATIVE_SERVE if default_http() == "native" else UVICORN_SERVE


def _v2_binary(model: str, x: np.ndarray) -> bytes:
    head = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": list(x.shape),
                                   "parameters": {"binary_data_size": x.nbytes}}],
                       "parameters": {"binary_data_output": True}}).encode()
    return http_request(f"/v2/models/{model}/infer", head + x.tobytes(),
                        ["Content-Type: application/octet-stream", f"Inference-Header-Content-Length: {len(head)}"])


def build_store(tmp: str):
    """The bench's store under tmp/store: the MLP as 'mlp' (its torch weights in tmp/mlp.pt, for Flask)
    and a 784x10 linear 'tiny', both at 'stable'. Returns (MLP file, tiny file, one input row)."""
    import torch
    from .. import runtime as rt
    from ..registry import Registry
    from .runtime import make_mlp
    net = make_mlp(MLP)
    torch.save(net.state_dict(), os.path.join(tmp, "mlp.pt"))
    path = os.path.join(tmp, "mlp.aimass")
    rt.export(net, (torch.randn(2, MLP[0]),), path, input_names=["x"])
    tiny_path = os.path.join(tmp, "tiny.aimass")
    rt.export(make_mlp((MLP[0], MLP[-1])), (torch.randn(2, MLP[0]),), tiny_path, input_names=["x"])
    reg = Registry(os.path.join(tmp, "store"))
    reg.push(path, "mlp", label="stable")     # /predict's model: the first by name
    reg.push(tiny_path, "tiny", label="stable")
    x = np.random.default_rng(0).standard_normal((1, MLP[0])).astype(np.float32)
    return path, tiny_path, x


def sweep(quick: bool = False, concurrency=(1, 4, 16, 64), seconds: Optional[float] = None,
          requests: Optional[int] = None, rounds: int = 3, serve_args=(), only=None, log=print) -> dict:
    """Run the sweep; returns {"session_p50_us", "session_p99_us", "runs": {label: {conc: figures}}} and,
    with a concurrency-1 point, "session_tiny_p50_us" and "session_paced_p50_us".
    Session.run's p50 is measured in this process at the start and again in every concurrency-1 round
    (next to the HTTP rounds, under the same machine load); the figure is the median of those. So are
    Session.run on the tiny model (784x10 linear: a request costs the same bytes, the compute nearly
    nothing) and Session.run on the MLP paced PACED_GAP_US apart. At concurrency 1 the same server
    also answers v2 binary on the tiny model, and a bare uvicorn app (_bare_asgi, same settings) gives
    the floor of server + client + loopback TCP with no aimass code at all; the same app calling
    Session.run on the MLP per request gives that floor with the model's compute in between; the native
    floor (_native_floor: a C++ epoll HTTP server around the same Batcher, --only native) gives it with no
    Python on the request path, for v2 binary and /predict JSON."""
    from .. import runtime as rt
    seconds = seconds or (2.0 if quick else 4.0)
    count = requests or (2000 if quick else 20000)
    wrk = wrk_path()
    tmp = tempfile.mkdtemp(prefix="aimass-bench-serve-")
    procs = []
    sess = sess_tiny = None
    try:
        path, tiny_path, x = build_store(tmp)
        sess = rt.Session(path)
        n_sess = 1000 if quick else 3000
        s50, s99 = session_p50(sess, x, n_sess)
        sess_p50s, sess_p99s = [s50], [s99]
        log(f"Session.run in-process, batch 1: p50 {s50:.1f} us, p99 {s99:.1f} us")
        sess_tiny = rt.Session(tiny_path)
        tiny_p50s: List[float] = []
        paced_p50s: List[float] = []
        predict = http_request("/predict", json.dumps({"input": x.tolist()}).encode(),
                               ["Content-Type: application/json"])
        v2_json = http_request("/v2/models/mlp/infer", json.dumps(
            {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, MLP[0]], "data": x.ravel().tolist()}]}
        ).encode(), ["Content-Type: application/json"])
        v2_bin = _v2_binary("mlp", x)
        tf_row = http_request("/v1/models/mlp:predict", json.dumps({"instances": x.tolist()}).encode(),
                              ["Content-Type: application/json"])
        results: dict = {"session_p50_us": s50, "session_p99_us": s99, "runs": {},
                         "generator": "wrk (one thread)" if wrk else "asyncio (this process)"}
        log(f"load generator: {results['generator']}")

        def want(what):
            return only is None or what in only

        # the servers import this same aimass (an in-tree checkout too, not only an installed one)
        pkg_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (pkg_root, os.environ.get("PYTHONPATH")) if p))
        targets = []
        floor = []      # the concurrency-1 HTTP-cost points
        protocols = (("predict", " /predict", predict), ("v2json", " v2 JSON", v2_json),
                     ("v2bin", " v2 binary", v2_bin), ("tfserving", " TF-Serving :predict", tf_row))
        # aimass serve in both modes; under --http native the C++ front end answers these and uvicorn
        # stays behind it. The tiny model's floor point is taken from the uvicorn server.
        for http, key, serve_label, extra in (("uvicorn", "", UVICORN_SERVE, ("tiny",)),
                                               ("native", "native-", NATIVE_SERVE, ())):
            if not any(want(w) for w in (*(key + k for k, _, _ in protocols), *extra)):
                continue
            port = free_port()
            proc = subprocess.Popen([sys.executable, "-m", "aimass", "serve", "--store", os.path.join(tmp, "store"),
                                     "--port", str(port), "--log-level", "warning", "--http", http, *serve_args],
                                    env=env)
            procs.append(proc)
            wait_http(port, "/v2/health/ready", proc)
            for what, suffix, req in protocols:
                if want(key + what):
                    targets.append((serve_label + suffix, port, req, proc.pid))
            if "tiny" in extra and want("tiny"):
                floor.append((TINY, port, _v2_binary("tiny", x), proc.pid))
        if want("bare"):
            port = free_port()
            proc = subprocess.Popen([sys.executable, "-m", "aimass.bench._bare_asgi", str(port)], env=env)
            procs.append(proc)
            wait_http(port, "/", proc)
            floor.append((BARE, port, v2_bin, proc.pid))
            port = free_port()      # the same app calling Session.run on the MLP before answering
            proc = subprocess.Popen([sys.executable, "-m", "aimass.bench._bare_asgi", str(port), path], env=env)
            procs.append(proc)
            wait_http(port, "/", proc)
            floor.append((BARE_MODEL, port, v2_bin, proc.pid))
        if want("native"):   # the compiled floor: the same model and request bytes, no Python per request
            port = free_port()
            proc = subprocess.Popen([sys.executable, "-m", "aimass.bench._native_floor", str(port), path,
                                     "--name", "mlp"], env=env)
            procs.append(proc)
            wait_http(port, "/", proc)
            floor.append((NATIVE, port, v2_bin, proc.pid))
            floor.append((NATIVE_JSON, port, predict, proc.pid))
        if want("flask"):
            port = free_port()
            app = os.path.join(tmp, "flask_app.py")
            with open(app, "w") as f:
                f.write(FLASK_APP % (MLP,))
            proc = subprocess.Popen([sys.executable, app, os.path.join(tmp, "mlp.pt"), str(port)], env=env,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            procs.append(proc)
            wait_http(port, "/", proc)
            targets.append(("Flask /predict (torch)", port, predict, proc.pid))
        for c in concurrency:
            got: Dict[str, list] = {}
            for _ in range(rounds):
                if c == 1:      # the baselines beside each round, under the same machine load
                    p50, p99 = session_p50(sess, x, n_sess // 2)
                    sess_p50s.append(p50)
                    sess_p99s.append(p99)
                    tiny_p50s.append(session_p50(sess_tiny, x, n_sess // 2)[0])
                    paced_p50s.append(session_p50(sess, x, n_sess // 4, gap_us=PACED_GAP_US)[0])
                for label, port, req, pid in targets + (floor if c == 1 else []):
                    aimass = label.startswith("aimass")   # (the bare app has no /metrics)
                    before = compute_totals(port) if aimass else None
                    r = load(port, req, c, count // rounds, seconds / rounds, pid=pid, wrk=wrk, workdir=tmp)
                    if aimass:  # the server's own compute time per batch in this round (from its metrics)
                        after = compute_totals(port)
                        r["server_compute_us"] = (after[0] - before[0]) / max(1.0, after[1] - before[1]) * 1e6
                    got.setdefault(label, []).append(r)
            if c == 1 and targets and targets[0][0].startswith("aimass"):
                # the floor of the HTTP stack itself (uvicorn + starlette + this client): a health check
                live = b"GET /v2/health/live HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
                mode = NATIVE_SERVE if targets[0][0].startswith(NATIVE_SERVE) else UVICORN_SERVE
                got[mode + " GET /v2/health/live"] = [
                    load(targets[0][1], live, 1, count // rounds, seconds / rounds, pid=targets[0][3], wrk=wrk,
                         workdir=tmp)
                    for _ in range(rounds)]
            if c == 1 and len(sess_p50s) > 1:
                s50, s99 = float(np.median(sess_p50s)), float(np.median(sess_p99s))
                results.update(session_p50_us=s50, session_p99_us=s99, session_p50_rounds_us=sess_p50s,
                               session_tiny_p50_us=float(np.median(tiny_p50s)),
                               session_paced_p50_us=float(np.median(paced_p50s)), paced_gap_us=PACED_GAP_US)
                log(f"Session.run in-process, batch 1, median of {len(sess_p50s)} measurements beside the rounds: "
                    f"p50 {s50:.1f} us (each: {', '.join(f'{v:.0f}' for v in sess_p50s)}); paced "
                    f"{PACED_GAP_US:.0f} us apart: {results['session_paced_p50_us']:.1f} us; tiny model: "
                    f"{results['session_tiny_p50_us']:.1f} us")
            for label, rs in got.items():
                r = {k: float(np.median([v.get(k, np.nan) for v in rs])) for k in rs[0]}
                r["rps_spread"] = float((max(v["rps"] for v in rs) - min(v["rps"] for v in rs)) / max(r["rps"], 1e-9))
                results["runs"].setdefault(label, {})[c] = r
                log(f"{label:24s} c={c:3d}: {r['rps']:8.0f} req/s  p50 {r['p50_us']:8.1f} us  p99 "
                    f"{r['p99_us']:8.1f} us  server CPU {r['cpu_us']:6.1f} us/req  ({int(r['n'])} req/round, "
                    f"{int(r['errors'])} errors)")
        return results
    finally:
        for sess in (sess, sess_tiny):
            if sess is not None:
                sess.close()
        for proc in procs:
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(tmp, ignore_errors=True)


def run(report: Report, quick: bool = False, progress=None) -> dict:
    concs = (1, 4, 16, 64)
    res = sweep(quick=quick, concurrency=concs, rounds=2 if quick else 3,
                log=(lambda m: progress(f"serve: {m}")) if progress else (lambda m: None))
    runs = res["runs"]
    flask = runs.get("Flask /predict (torch)", {})
    for label, by_c in runs.items():
        if label.startswith("Flask") or label.endswith("/v2/health/live") or label in (TINY, BARE, BARE_MODEL, NATIVE,
                                                                                     NATIVE_JSON):
            continue
        for c, r in by_c.items():
            f = flask.get(c)
            report.add(SUITE, f"{label}, {c} connections, req/s", r["rps"], "req/s", higher_is_better=True,
                       spread=r["rps_spread"], baseline="Flask /predict (torch)" if f else None,
                       baseline_value=f["rps"] if f else None,
                       goal=5.0 if (c == 16 and label.endswith("/predict") and f) else None)
            report.add(SUITE, f"{label}, {c} connections, p99", r["p99_us"] * 1e-6, "s", higher_is_better=False,
                       baseline="Flask /predict (torch)" if f else None,
                       baseline_value=f["p99_us"] * 1e-6 if f else None)
    default = default_label()
    for label in [mode + p for mode in (UVICORN_SERVE, NATIVE_SERVE) for p in PROTOCOLS]:
        if 1 in runs.get(label, {}):
            over = (runs[label][1]["p50_us"] - res["session_p50_us"]) * 1e-6
            report.add(SUITE, f"HTTP overhead per request ({label} p50 - Session.run p50), 1 connection", over, "s",
                       higher_is_better=False, goal_text="< 150 us", baseline=None,
                       note="aimass serve's default mode" if label.startswith(default) else "")
            report.figures[-1].goal_met = over < 150e-6
    if 1 in runs.get(BARE, {}):
        report.add(SUITE, f"HTTP floor: {BARE} p50, 1 connection", runs[BARE][1]["p50_us"] * 1e-6, "s",
                   higher_is_better=False, note="uvicorn + loopback TCP + load generator, no aimass code")
    if 1 in runs.get(BARE_MODEL, {}):
        report.add(SUITE, f"HTTP floor with the model: {BARE_MODEL} p50 - Session.run p50, 1 connection",
                   (runs[BARE_MODEL][1]["p50_us"] - res["session_p50_us"]) * 1e-6, "s", higher_is_better=False,
                   note="uvicorn + loopback TCP + load generator after each request's compute swept the caches")
    for label in (NATIVE, NATIVE_JSON):
        if 1 in runs.get(label, {}):
            report.add(SUITE, f"HTTP floor, compiled: {label} p50 - Session.run p50, 1 connection",
                       (runs[label][1]["p50_us"] - res["session_p50_us"]) * 1e-6, "s", higher_is_better=False,
                       note="C++ epoll front end around the same Batcher: loopback TCP + load generator + parsing")
    if 1 in runs.get(TINY, {}) and "session_tiny_p50_us" in res:
        report.add(SUITE, f"HTTP overhead per request ({TINY} p50 - its Session.run p50), 1 connection",
                   (runs[TINY][1]["p50_us"] - res["session_tiny_p50_us"]) * 1e-6, "s", higher_is_better=False,
                   note="the overhead without a 7 MB model sweeping the caches between requests")
    labels = [k for k in runs if len(runs[k]) > 1]
    report.add_sweep("serve_throughput", list(concs), {k: [runs[k].get(c, {}).get("rps") for c in concs]
                                                       for k in labels}, xlabel="concurrent connections",
                     ylabel="req/s (higher is better)", logx=True, logy=True)
    report.add_sweep("serve_p99", list(concs), {k: [(runs[k].get(c, {}).get("p99_us") or 0) / 1e3 or None
                                                    for c in concs] for k in labels},
                     xlabel="concurrent connections", ylabel="p99 ms (lower is better)", logx=True, logy=True)
    return {}
