"""The serve benchmark's load generators: Debian's ``wrk`` (C, one thread; pre-built request bytes through
a Lua script) and an asyncio client in this process, both closed-loop over keep-alive loopback
connections; plus the small helpers the suite starts servers with (free port, readiness wait) and the
server process's CPU time per request."""
from __future__ import annotations

import asyncio
import math
import os
import shutil
import socket
import subprocess
import tempfile
import time
from typing import Dict, List, Optional

import numpy as np

# wrk sends the bench's pre-built request bytes as they are and prints one parseable line
WRK_LUA = r'''
local f = assert(io.open(os.getenv("AIMASS_WRK_REQUEST"), "rb"))
local raw = f:read("*a")
f:close()
request = function() return raw end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("AIMASS_WRK %d %d %d %.1f %.1f\n", summary.requests, summary.duration,
    e.status + e.connect + e.read + e.write + e.timeout, latency:percentile(50), latency:percentile(99)))
end
'''


def wrk_path() -> Optional[str]:
    """Debian's wrk, unless AIMASS_BENCH_CLIENT=python asks for the asyncio generator."""
    if os.environ.get("AIMASS_BENCH_CLIENT", "").lower() == "python":
        return None
    return shutil.which("wrk")


def wrk_load(wrk: str, port: int, req: bytes, conc: int, seconds: float, workdir: str) -> dict:
    """One wrk run (one thread, `conc` keep-alive connections, whole seconds): n, errors, rps, p50/p99 us."""
    lua, body = os.path.join(workdir, "aimass_wrk.lua"), os.path.join(workdir, f"request-{port}-{hash(req)}.http")
    if not os.path.exists(lua):
        with open(lua, "w") as f:
            f.write(WRK_LUA)
    if not os.path.exists(body):
        with open(body, "wb") as f:
            f.write(req)
    secs = max(1, math.ceil(seconds - 1e-9))
    out = subprocess.run([wrk, "-t1", f"-c{conc}", f"-d{secs}s", "--timeout", "30s", "-s", lua,
                          f"http://127.0.0.1:{port}/"], capture_output=True, text=True, timeout=secs + 60,
                         env=dict(os.environ, AIMASS_WRK_REQUEST=body))
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("AIMASS_WRK ")), None)
    if out.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed (exit {out.returncode}): {out.stderr.strip() or out.stdout.strip()}")
    n, dur_us, errors, p50, p99 = line.split()[1:]
    n = int(n)
    return {"n": n, "errors": int(errors), "rps": n / (int(dur_us) * 1e-6), "p50_us": float(p50),
            "p99_us": float(p99) if n else float("nan")}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(port: int, path: str, proc, timeout: float = 120) -> None:
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
    raise RuntimeError(f"server on port {port} did not come up in {timeout:.0f} s")


def http_request(path: str, body: bytes, headers=()) -> bytes:
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
        if lines[0].split()[1] != "200":
            errors.append(lines[0])
        if hdr.get("connection", "").lower() == "close" or lines[0].startswith("HTTP/1.0"):
            writer.close()
            reader = writer = None
    if writer is not None:
        writer.close()


async def _load(port, req, conc, count, seconds):
    lat: List[int] = []
    errors: List[str] = []
    state = {"left": count}
    t0 = time.perf_counter()
    await asyncio.gather(*[_one_conn(port, req, lat, errors, state, t0 + seconds) for _ in range(conc)])
    return lat, errors, time.perf_counter() - t0


def cpu_seconds(pid: int) -> Optional[float]:
    """User + system CPU time of a process and its threads (Linux /proc), None elsewhere."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def load(port: int, req: bytes, conc: int, count: int, seconds: float, warmup: int = 100,
         pid: Optional[int] = None, wrk: Optional[str] = None, workdir: Optional[str] = None) -> Dict[str, float]:
    """One closed-loop point: wrk for `seconds` (rounded up to whole seconds) when given, else the asyncio
    generator for at most `count` requests and `seconds`. Both after `warmup` requests."""
    try:
        import uvloop
        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    runner(_load(port, req, conc, warmup, 30))
    cpu0 = cpu_seconds(pid) if pid else None
    if wrk is not None:
        r = wrk_load(wrk, port, req, conc, seconds, workdir or tempfile.gettempdir())
    else:
        lat, errors, wall = runner(_load(port, req, conc, count, seconds))
        a = np.array(lat, dtype=np.float64) / 1e3 if lat else np.array([np.nan])
        r = {"n": len(lat), "errors": len(errors), "rps": len(lat) / wall, "p50_us": float(np.percentile(a, 50)),
             "p99_us": float(np.percentile(a, 99))}
    cpu1 = cpu_seconds(pid) if pid else None
    r["cpu_us"] = ((cpu1 - cpu0) / max(1, r["n"]) * 1e6 if cpu0 is not None and cpu1 is not None
                   else float("nan"))
    return r
