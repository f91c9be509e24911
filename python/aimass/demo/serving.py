"""The demo's last steps: push to the registry, label stable, serve over HTTP with a token,
ask through the KServe v2 and TF-Serving routes, read the metrics, stop the server."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Callable, Dict

import numpy as np


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _call(url: str, token: str, body=None, timeout: float = 30.0):
    req = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(),
                                 headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
                                 method="GET" if body is None else "POST")
    with urllib.request.urlopen(req, timeout=timeout) as r:  # noqa: S310 - loopback only
        data = r.read()
    return json.loads(data) if r.headers.get("Content-Type", "").startswith("application/json") else data.decode()


def push(out: str, models: Dict[str, str], metrics: Dict[str, dict], name: str, log: Callable) -> dict:
    """fp32 pushed and labelled stable, int8 pushed and labelled canary; returns the versions."""
    from ..registry import Registry
    reg = Registry(os.path.join(out, "registry"))
    versions = {}
    for kind, label in (("fp32", "stable"), ("int8", "canary")):
        versions[kind] = reg.push(models[kind], name, label=label, metrics=metrics[kind], source=models[kind])
        log(f"      registry: {name} v{versions[kind]} ({kind}) labelled {label}")
    return {"store": os.path.join(out, "registry"), "name": name, "versions": versions,
            "stable": reg.resolve(name, label="stable").version}


def serve_and_ask(out: str, name: str, x: np.ndarray, y: np.ndarray, log: Callable, n: int = 5) -> dict:
    """Start `aimass serve` on a free loopback port with a fresh token, ask it for n test images
    through both protocols, read /metrics, stop it with SIGTERM (graceful drain)."""
    from ..serve.auth import hash_token, new_token
    token = new_token()
    tokens = os.path.join(out, "tokens.yml")
    from .._io import atomic_write_text
    atomic_write_text(tokens, "tokens:\n  - name: demo\n    sha256: " + hash_token(token)
                      + "\n    scopes: [infer, metrics]\n")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    logf = open(os.path.join(out, "serve.log"), "w")
    proc = subprocess.Popen([sys.executable, "-m", "aimass", "serve", "--store", os.path.join(out, "registry"),
                             "--host", "127.0.0.1", "--port", str(port), "--tokens", tokens, "--log-level",
                             "warning"], stdout=logf, stderr=subprocess.STDOUT, env=env)
    result = {"url": url, "tokens": tokens}
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"aimass serve exited with {proc.returncode}; see {logf.name}")
            try:
                urllib.request.urlopen(url + "/v2/health/ready", timeout=2)  # noqa: S310
                break
            except (urllib.error.URLError, OSError):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"aimass serve did not become ready in 60 s; see {logf.name}") from None
                time.sleep(0.1)
        log(f"      serving {url} (token in {tokens}: scopes infer, metrics)")
        meta = _call(f"{url}/v2/models/{name}", token)
        inp = meta["inputs"][0]
        batch = x[:n]
        v2 = _call(f"{url}/v2/models/{name}/infer", token, {"inputs": [
            {"name": inp["name"], "shape": list(batch.shape), "datatype": "FP32", "data": batch.ravel().tolist()}]})
        out0 = v2["outputs"][0]
        v2_pred = np.asarray(out0["data"]).reshape(out0["shape"]).argmax(1)
        tf = _call(f"{url}/v1/models/{name}:predict", token, {"instances": batch.tolist()})
        tf_pred = np.asarray(tf["predictions"]).argmax(1)
        metrics = _call(f"{url}/metrics", token)
        requests = [line for line in metrics.splitlines() if line.startswith("aimass_") and name in line
                    and "_total" in line][:4]
        log(f"      KServe v2   POST /v2/models/{name}/infer      -> {v2_pred.tolist()}")
        log(f"      TF-Serving  POST /v1/models/{name}:predict    -> {tf_pred.tolist()}")
        log(f"      true labels                                      {y[:n].tolist()}")
        for line in requests:
            log(f"      metrics  {line}")
        result.update(kserve=v2_pred.tolist(), tfserving=tf_pred.tolist(), labels=y[:n].tolist(),
                      metrics_lines=requests, model_version=v2.get("model_version"))
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                result["exit_code"] = proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                result["exit_code"] = proc.wait(10)
        logf.close()
    log(f"      server stopped (SIGTERM, drained; exit {result['exit_code']})")
    return result
