"""Where a request's time goes inside ``aimass serve`` at concurrency 1: per-stage medians.

    python -m aimass.bench.serve_stages [--targets v2bin,predict,v2json,tfserving,tiny] [--rounds 2] [--seconds 3]

Each target gets its own ``aimass serve --http uvicorn`` process (the probes are in the Python app,
which the native front end's requests skip) on the bench's store (``serve.build_store``) with
probes wrapped around uvicorn's and aimass's functions from outside (``time.perf_counter_ns``; the
served code is not changed), driven by the bench's load generator (``wrk`` when installed) at one
connection. Stages, per request:

- ``read``: the request's first bytes handed to uvicorn -> aimass's handler starts (the kernel's
  receive, HTTP parsing, the ASGI task's start, routing)
- ``body``: -> the body is read (auth and the engine threads' wake-up included)
- ``decode``: -> the model is called (input decoding)
- ``compute``: the model call (``Session.run_async``)
- ``encode``: -> the response is handed to uvicorn
- ``send``: -> the response's socket write returned, of which ``write`` is the write itself
  (the kernel's loopback send, which also delivers to the client and wakes it)
- ``after``: the write -> the handler is done (metrics, the version's release)
- ``turnaround``: the write -> the next request's first bytes (client, kernel and the loop's wake-up)

The client's p50 is about ``read + body + decode + compute + encode + send + turnaround``.
Comparing a target's stages with the tiny model's (same bytes, compute near nothing) shows which
steps the bench model's compute slows down (docs/serving.md, "Where the time goes").
"""
from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional

import numpy as np

STAGES = (("read", "recv", "handle"), ("body", "handle", "body"), ("decode", "body", "run0"),
          ("compute", "run0", "run1"), ("encode", "run1", "send0"), ("send", "send0", "write"),
          ("write", "write0", "write"), ("after", "write", "done"))
TARGETS = ("v2bin", "predict", "v2json", "tfserving", "tiny")


def stage_medians(records: List[dict]) -> Dict[str, float]:
    """Per-stage medians (us) of the probe records, each a dict of perf_counter_ns stamps of one request."""
    out: Dict[str, float] = {}
    for name, a, b in STAGES:
        d = [r[b] - r[a] for r in records if a in r and b in r]
        if d:
            out[name] = float(np.median(d)) / 1e3
    turn = [n["recv"] - r["write"] for r, n in zip(records, records[1:]) if "write" in r and "recv" in n]
    if turn:
        out["turnaround"] = float(np.median(turn)) / 1e3
    out["requests"] = float(len(records))
    return out


def _install_probes(records: List[dict]) -> None:
    """Wrap uvicorn's and aimass's functions with time stamps into `records` (one dict per request)."""
    pc = time.perf_counter_ns
    import uvicorn.protocols.http.h11_impl as h11_impl
    import uvicorn.protocols.http.httptools_impl as httptools_impl

    from .. import runtime
    from ..serve import cli, hot
    cur: dict = {}
    state = {"fresh": True}

    def wrap_received(cls):
        orig = cls.data_received

        def data_received(self, data):
            if state["fresh"]:      # the first bytes of the next request
                state["fresh"] = False
                cur.clear()
                cur["recv"] = pc()
            return orig(self, data)
        cls.data_received = data_received

    wrap_received(httptools_impl.HttpToolsProtocol)
    wrap_received(h11_impl.H11Protocol)
    handle, read_body, send, run_async = hot.handle, hot.read_body, hot._send, runtime.Session.run_async
    write = cli._OneWriteTransport.write

    async def p_handle(*a, **k):
        cur["handle"] = pc()
        try:
            return await handle(*a, **k)
        finally:
            cur["done"] = pc()
            records.append(dict(cur))

    async def p_read_body(*a):
        try:
            return await read_body(*a)
        finally:
            cur["body"] = pc()

    async def p_send(*a):
        cur["send0"] = pc()
        return await send(*a)

    async def p_run_async(self, *a, **k):
        cur["run0"] = pc()
        try:
            return await run_async(self, *a, **k)
        finally:
            cur["run1"] = pc()

    def p_write(self, data):
        held = self._held is not None
        if held:
            cur["write0"] = pc()
        write(self, data)
        if held:
            cur["write"] = pc()
            state["fresh"] = True

    hot.handle, hot.read_body, hot._send = p_handle, p_read_body, p_send
    runtime.Session.run_async = p_run_async
    cli._OneWriteTransport.write = p_write


def probe_main(argv: List[str]) -> int:
    """`aimass serve ARGV` with the probes in; the records go to $AIMASS_STAGES_OUT (JSON) at exit."""
    records: List[dict] = []
    _install_probes(records)

    def dump():
        tmp = os.environ["AIMASS_STAGES_OUT"] + ".tmp"
        with open(tmp, "w") as f:
            json.dump(records, f)
        os.replace(tmp, os.environ["AIMASS_STAGES_OUT"])
    atexit.register(dump)
    from ..cli import main
    return main(["serve", *argv])


def run(targets=("v2bin", "predict", "tiny"), rounds: int = 2, seconds: float = 3.0, serve_args=(),
        log=print) -> dict:
    """{target: {stage: median us, "p50_us": client p50}} (medians over rounds), and Session.run's p50
    measured beside each round."""
    from .. import runtime as rt
    from ._loadgen import free_port, http_request, load, wait_http, wrk_path
    from .serve import _v2_binary, build_store, session_p50
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        raise ValueError(f"unknown targets {unknown}; choose from {', '.join(TARGETS)}")
    tmp = tempfile.mkdtemp(prefix="aimass-serve-stages-")
    try:
        path, _, x = build_store(tmp)
        js = ["Content-Type: application/json"]
        reqs = {"v2bin": _v2_binary("mlp", x), "tiny": _v2_binary("tiny", x),
                "predict": http_request("/predict", json.dumps({"input": x.tolist()}).encode(), js),
                "v2json": http_request("/v2/models/mlp/infer", json.dumps({"inputs": [
                    {"name": "x", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}]}).encode(), js),
                "tfserving": http_request("/v1/models/mlp:predict", json.dumps({"instances": x.tolist()}).encode(), js)}
        pkg_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (pkg_root, os.environ.get("PYTHONPATH")) if p))
        wrk = wrk_path()
        got: Dict[str, List[dict]] = {}
        sess_p50: List[float] = []
        with rt.Session(path) as sess:
            for _ in range(rounds):
                sess_p50.append(session_p50(sess, x, 1000)[0])
                for t in targets:
                    port, out = free_port(), os.path.join(tmp, f"stages-{t}.json")
                    proc = subprocess.Popen([sys.executable, "-m", "aimass.bench.serve_stages", "--probe", "--store",
                                             os.path.join(tmp, "store"), "--port", str(port), "--log-level", "warning",
                                             "--http", "uvicorn", *serve_args], env=dict(env, AIMASS_STAGES_OUT=out))
                    try:
                        wait_http(port, "/v2/health/ready", proc)
                        r = load(port, reqs[t], 1, 100000, seconds, pid=proc.pid, wrk=wrk, workdir=tmp)
                    finally:
                        proc.send_signal(signal.SIGTERM)
                        proc.wait(60)
                    with open(out) as f:
                        st = stage_medians(json.load(f)[100:])    # past the warm-up
                    st.update(p50_us=r["p50_us"], errors=r["errors"])
                    got.setdefault(t, []).append(st)
                    log(f"{t}: p50 {r['p50_us']:.0f} us; " + ", ".join(f"{k} {v:.1f}" for k, v in st.items()
                                                                    if k not in ("p50_us", "errors", "requests")))
        res = {t: {k: float(np.median([s[k] for s in rs if k in s])) for k in rs[0]} for t, rs in got.items()}
        res["session_p50_us"] = float(np.median(sess_p50))
        res["generator"] = "wrk (one thread)" if wrk else "asyncio (this process)"
        return res
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--probe"]:
        return probe_main(argv[1:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", default="v2bin,predict,tiny", help="comma-separated: " + ", ".join(TARGETS))
    ap.add_argument("--rounds", type=int, default=2, help="rounds per target (medians reported)")
    ap.add_argument("--seconds", type=float, default=3.0, help="seconds of load per round")
    ap.add_argument("--serve-args", default="", help="extra `aimass serve` options, e.g. '--threads 1'")
    ap.add_argument("--json", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    res = run(args.targets.split(","), args.rounds, args.seconds, args.serve_args.split(),
              log=lambda m: print(m, flush=True))
    cols = [s for s, _, _ in STAGES] + ["turnaround"]
    print(f"\nconcurrency 1, medians (us), load generator {res['generator']}; Session.run p50 "
          f"{res['session_p50_us']:.1f} us")
    print("| target | client p50 | " + " | ".join(cols) + " |")
    print("|" + " --- |" * (len(cols) + 2))
    for t, st in res.items():
        if isinstance(st, dict):
            print(f"| {t} | {st['p50_us']:.0f} | " + " | ".join(f"{st.get(c, float('nan')):.1f}" for c in cols) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
