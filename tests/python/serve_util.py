"""Shared helpers of the test_serve_* files: tiny exported models, a registry store, a server process."""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
# child processes import the aimass this test imported (in-tree build or installed wheel alike)
import aimass as _aimass  # noqa: E402
PKG_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(_aimass.__file__)))



def export_mlp(path, seed: int, d_in: int = 4, hidden: int = 16, d_out: int = 3, layers: int = 1):
    """A small torch MLP exported to .aimass; different seeds give different outputs."""
    import torch
    from torch import nn

    import aimass.runtime as rt
    torch.manual_seed(seed)
    mods = [nn.Linear(d_in, hidden), nn.ReLU()]
    for _ in range(layers - 1):
        mods += [nn.Linear(hidden, hidden), nn.ReLU()]
    net = nn.Sequential(*mods, nn.Linear(hidden, d_out)).eval()
    rt.export(net, (torch.randn(2, d_in),), path, input_names=["x"])
    return net


def make_store(tmp: Path, versions: int = 2, name: str = "mlp", stable: int = 1, **kw):
    """A registry store holding `versions` versions of `name` (seeds 1..n), label 'stable' on `stable`."""
    from aimass.registry import Registry
    reg = Registry(str(tmp / "store"))
    nets = []
    for v in range(1, versions + 1):
        p = tmp / f"{name}_v{v}.aimass"
        nets.append(export_mlp(p, seed=v, **kw))
        got = reg.push(str(p), name, label="stable" if v == stable else None)
        assert got == v
    return reg, nets


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m aimass serve` on 127.0.0.1 and a free port; stop() sends SIGTERM and returns the exit code."""

    def __init__(self, store, *args, env=None, timeout_s: float = 60.0):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        e = dict(os.environ)
        e["PYTHONPATH"] = PKG_ROOT + os.pathsep + e.get("PYTHONPATH", "")
        e.update(env or {})
        self.log = open(Path(str(store)).parent / f"serve_{self.port}.log", "w+")
        self.proc = subprocess.Popen([sys.executable, "-m", "aimass", "serve", "--store", str(store),
                                      "--port", str(self.port), *args], stdout=self.log, stderr=subprocess.STDOUT,
                                     env=e)
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(self.url + "/v2/health/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"server not ready after {timeout_s} s:\n{self.output()}")
            time.sleep(0.1)

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def terminate(self) -> None:
        self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout: float = 60.0) -> int:
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.terminate()
            try:
                return self.wait(60)
            finally:
                self.kill()
        return self.proc.returncode


@contextlib.contextmanager
def serve_process(store, *args, **kw):
    srv = ServerProcess(store, *args, **kw)
    try:
        yield srv
    finally:
        srv.kill()
        srv.log.close()
