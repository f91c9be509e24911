"""HTTP serving benchmark: aimass serve against a Flask /predict app running the same torch model per
request (the platform's documented pattern), and Triton-style JSON against binary tensors.

    python bench/bench_serve.py [--quick] [--plot docs/serving_latency.png] [--json out.json]

Loopback only, bounded in requests and time per point. One closed-loop load generator (asyncio,
keep-alive connections, pre-built requests) runs in this process; each server runs in its own
process. Concurrency sweeps 1/4/16/64 connections. Same model (MLP 784-1024-1024-10, fp32), same
request rows (1 per request), same run: figures are ratios against baselines measured here.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
PY = os.path.join(HERE, "..", "python")
sys.path.insert(0, PY)
sys.path.insert(0, HERE)
DIMS = (784, 1024, 1024, 10)

FLASK_APP = r'''
import sys, torch
from flask import Flask, jsonify, request
sys.path.insert(0, %r)
from bench_runtime import make_mlp
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


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(port, path, proc, timeout=120):
    import httpx
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}{path}", timeout=2).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError("server did not come up")


def http_request(path, body: bytes, headers=()):
    h = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", f"Content-Length: {len(body)}", *headers]
    return ("\r\n".join(h) + "\r\n\r\n").encode() + body


async def _one_conn(port, req, lat, errors, state, deadline):
    reader = writer = None
    while state["left"] > 0 and time.perf_counter() < deadline:
        state["left"] -= 1
        t0 = time.perf_counter_ns()
        if writer is None:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(req)
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        hdr = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
        if "content-length" in hdr:
            await reader.readexactly(int(hdr["content-length"]))
        else:
            await reader.read()
        lat.append(time.perf_counter_ns() - t0)
        if not lines[0].split()[1] == "200":
            errors.append(lines[0])
        if hdr.get("connection", "").lower() == "close" or lines[0].startswith("HTTP/1.0"):
            writer.close()
            reader = writer = None
    if writer is not None:
        writer.close()


async def _load(port, req, conc, count, seconds):
    lat, errors = [], []
    state = {"left": count}
    t0 = time.perf_counter()
    await asyncio.gather(*[_one_conn(port, req, lat, errors, state, t0 + seconds) for _ in range(conc)])
    wall = time.perf_counter() - t0
    return lat, errors, wall


def cpu_seconds(pid):
    """User + system CPU time of a process and its threads (Linux /proc), None elsewhere."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def load(port, req, conc, count, seconds, warmup=100, pid=None):
    try:
        import uvloop
        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    runner(_load(port, req, conc, warmup, 30))
    cpu0 = cpu_seconds(pid) if pid else None
    lat, errors, wall = runner(_load(port, req, conc, count, seconds))
    cpu1 = cpu_seconds(pid) if pid else None
    a = np.array(lat) / 1e3
    return {"n": len(lat), "errors": len(errors), "rps": len(lat) / wall, "p50_us": float(np.percentile(a, 50)),
            "p99_us": float(np.percentile(a, 99)),
            "cpu_us": (cpu1 - cpu0) / max(1, len(lat)) * 1e6 if cpu0 is not None and cpu1 is not None else float("nan")}


def session_p50(path, x, n=3000):
    import aimass.runtime as rt
    with rt.Session(path) as s:
        for _ in range(300):
            s.run({"x": x})
        t = np.empty(n)
        for i in range(n):
            t0 = time.perf_counter_ns()
            s.run({"x": x})
            t[i] = time.perf_counter_ns() - t0
    return float(np.percentile(t / 1e3, 50)), float(np.percentile(t / 1e3, 99))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer requests per point")
    ap.add_argument("--concurrency", default="1,4,16,64")
    ap.add_argument("--seconds", type=float, default=None, help="longest time per point")
    ap.add_argument("--requests", type=int, default=None, help="most requests per point")
    ap.add_argument("--plot", default=None, help="write a latency plot (PNG) here")
    ap.add_argument("--json", default=None, help="write the results as JSON here")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds per point (median reported)")
    ap.add_argument("--serve-args", default="", help="extra `aimass serve` options, e.g. '--threads 1'")
    ap.add_argument("--only", default=None, help="comma-separated subset: predict,v2json,v2bin,flask")
    args = ap.parse_args(argv)
    seconds = args.seconds or (2.0 if args.quick else 4.0)
    count = args.requests or (2000 if args.quick else 20000)
    concs = [int(c) for c in args.concurrency.split(",")]

    import torch

    import aimass.runtime as rt
    from aimass.registry import Registry
    from bench_runtime import make_mlp
    tmp = tempfile.mkdtemp(prefix="aimass-bench-serve-")
    net = make_mlp(DIMS)
    torch.save(net.state_dict(), os.path.join(tmp, "mlp.pt"))
    path = os.path.join(tmp, "mlp.aimass")
    rt.export(net, (torch.randn(2, DIMS[0]),), path, input_names=["x"])
    Registry(os.path.join(tmp, "store")).push(path, "mlp", label="stable")
    x = np.random.default_rng(0).standard_normal((1, DIMS[0])).astype(np.float32)

    s50, s99 = session_p50(path, x)
    print(f"Session.run in-process, batch 1: p50 {s50:.1f} us, p99 {s99:.1f} us", flush=True)

    predict = http_request("/predict", json.dumps({"input": x.tolist()}).encode(),
                           ["Content-Type: application/json"])
    v2_json = http_request("/v2/models/mlp/infer", json.dumps(
        {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, DIMS[0]], "data": x.ravel().tolist()}]}).encode(),
        ["Content-Type: application/json"])
    head = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, DIMS[0]],
                                   "parameters": {"binary_data_size": x.nbytes}}],
                       "parameters": {"binary_data_output": True}}).encode()
    v2_bin = http_request("/v2/models/mlp/infer", head + x.tobytes(),
                          ["Content-Type: application/octet-stream", f"Inference-Header-Content-Length: {len(head)}"])
    env = dict(os.environ, PYTHONPATH=PY + os.pathsep + os.environ.get("PYTHONPATH", ""))
    results = {"session_p50_us": s50, "session_p99_us": s99, "runs": {}}

    def want(what):
        return args.only is None or what in args.only.split(",")

    targets = []     # (label, port, request bytes, server pid)
    procs = []
    try:
        if any(want(w) for w in ("predict", "v2json", "v2bin")):
            port = free_port()
            proc = subprocess.Popen([sys.executable, "-m", "aimass", "serve", "--store", os.path.join(tmp, "store"),
                                     "--port", str(port), "--log-level", "warning", *args.serve_args.split()], env=env)
            procs.append(proc)
            wait_http(port, "/v2/health/ready", proc)
            for what, label, req in (("predict", "aimass serve /predict", predict),
                                     ("v2json", "aimass serve v2 JSON", v2_json),
                                     ("v2bin", "aimass serve v2 binary", v2_bin)):
                if want(what):
                    targets.append((label, port, req, proc.pid))
        if want("flask"):
            port = free_port()
            app = os.path.join(tmp, "flask_app.py")
            with open(app, "w") as f:
                f.write(FLASK_APP % (HERE, DIMS))
            proc = subprocess.Popen([sys.executable, app, os.path.join(tmp, "mlp.pt"), str(port)], env=env,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            procs.append(proc)
            wait_http(port, "/", proc)
            targets.append(("Flask /predict (torch)", port, predict, proc.pid))
        # every target in turn, `rounds` times per concurrency, so that all of them see the same machine
        # load (this machine is shared); each figure is the median over the rounds
        for c in concs:
            got = {}
            for _ in range(args.rounds):
                for label, port, req, pid in targets:
                    got.setdefault(label, []).append(load(port, req, c, count // args.rounds, seconds / args.rounds,
                                                          pid=pid))
            for label, rs in got.items():
                r = {k: float(np.median([x[k] for x in rs])) for k in rs[0]}
                results["runs"].setdefault(label, {})[c] = r
                print(f"{label:24s} c={c:3d}: {r['rps']:8.0f} req/s  p50 {r['p50_us']:8.1f} us  p99 "
                      f"{r['p99_us']:8.1f} us  server CPU {r['cpu_us']:6.1f} us/req  ({int(r['n'])} req/round, "
                      f"{int(r['errors'])} errors)", flush=True)
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(60)

    runs = results["runs"]
    if "aimass serve /predict" in runs and "Flask /predict (torch)" in runs:
        print("\n| concurrency | aimass /predict req/s | Flask req/s | ratio | aimass p99 | Flask p99 | server CPU/req "
              "aimass / Flask |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for c in concs:
            a, f = runs["aimass serve /predict"][c], runs["Flask /predict (torch)"][c]
            print(f"| {c} | {a['rps']:,.0f} | {f['rps']:,.0f} | {a['rps'] / f['rps']:.1f}x | {a['p99_us'] / 1e3:.2f} ms "
                  f"| {f['p99_us'] / 1e3:.2f} ms | {a['cpu_us']:.0f} / {f['cpu_us']:.0f} us |")
    for label in ("aimass serve /predict", "aimass serve v2 JSON", "aimass serve v2 binary"):
        if 1 in runs.get(label, {}):
            print(f"HTTP overhead at concurrency 1, {label}: p50 {runs[label][1]['p50_us']:.1f} us - Session.run "
                  f"{s50:.1f} us = {runs[label][1]['p50_us'] - s50:.1f} us")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    if args.plot:
        plot(results, concs, args.plot)
    return 0


def plot(results, concs, out):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for label, runs in results["runs"].items():
        cs = [c for c in concs if c in runs]
        ax1.plot(cs, [runs[c]["rps"] for c in cs], marker="o", label=label)
        ax2.plot(cs, [runs[c]["p50_us"] / 1e3 for c in cs], marker="o", label=label + " p50")
        ax2.plot(cs, [runs[c]["p99_us"] / 1e3 for c in cs], marker="x", linestyle="--", color=ax2.lines[-1].get_color(),
                 label=label + " p99")
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(concs, [str(c) for c in concs])
        ax.set_xlabel("concurrent connections")
        ax.grid(True, which="both", alpha=0.3)
    ax1.set_ylabel("requests/s")
    ax1.set_title("Throughput (MLP 784-1024-1024-10, 1 row/request)")
    ax2.set_ylabel("latency (ms)")
    ax2.set_title("Latency p50 (solid) / p99 (dashed)")
    ax1.legend(fontsize=7)
    ax2.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"plot: {out}")


if __name__ == "__main__":
    sys.exit(main())
