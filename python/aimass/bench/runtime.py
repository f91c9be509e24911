"""Runtime suite: batch-1 latency vs torch eager and onnxruntime, the packed small-batch
kernel vs BLAS per batch size, and the batcher's max_batch_size x max_queue_delay_us grid
(throughput and p99 from concurrent batch-1 clients, against the same Session unbatched)."""
from __future__ import annotations

import os
import tempfile
import threading
import time
from typing import Dict, List, Optional, Tuple

import numpy as np

from ._measure import measure
from ._report import Report

SUITE = "runtime"
MLP = (784, 1024, 1024, 10)


def make_mlp(dims=MLP):
    import torch
    from torch import nn
    torch.manual_seed(0)
    layers: List[nn.Module] = []
    for i in range(len(dims) - 1):
        layers.append(nn.Linear(dims[i], dims[i + 1]))
        if i < len(dims) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers).eval()


def export_mlp(tmp: str, quantize: Optional[str] = None, dims=MLP) -> str:
    import torch
    from .. import runtime as rt
    path = os.path.join(tmp, f"mlp-{'x'.join(map(str, dims))}-{quantize or 'fp32'}.aimass")
    if not os.path.exists(path):
        rt.export(make_mlp(dims), (torch.randn(2, dims[0]),), path, quantize=quantize, input_names=["x"])
    return path


def onnx_session(tmp: str, dims=MLP):
    try:
        import onnxruntime as ort
        import torch
    except ImportError:
        return None
    path = os.path.join(tmp, "mlp.onnx")
    try:
        torch.onnx.export(make_mlp(dims), (torch.randn(1, dims[0]),), path, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "b"}, "y": {0: "b"}}, dynamo=False)
    except Exception:  # noqa: BLE001 - the baseline is optional
        return None
    so = ort.SessionOptions()
    import aimass
    so.intra_op_num_threads = aimass.num_threads()
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def latency(report: Report, tmp: str, quick: bool) -> None:
    import torch
    from .. import runtime as rt
    x = np.random.default_rng(0).standard_normal((1, MLP[0])).astype(np.float32)
    xt = torch.from_numpy(x)
    net = make_mlp()
    ws = 0.05 if quick else 0.2
    with torch.no_grad():
        base = measure(lambda: net(xt), window_s=ws)
    o = onnx_session(tmp)
    ort_m = measure(lambda: o.run(None, {"x": x}), window_s=ws) if o is not None else None
    for q in (None, "int8"):
        sess = rt.Session(export_mlp(tmp, q), max_batch_size=1)
        m = measure(lambda: sess.run({"x": x}), window_s=ws)
        sess.close()
        label = q or "fp32"
        report.add(SUITE, f"MLP 784-1024-1024-10 batch 1 {label} (Session.run)", m.seconds, "s",
                   higher_is_better=False, spread=m.spread, stable=m.stable, baseline="torch eager",
                   baseline_value=base.seconds, baseline_spread=base.spread)
        if ort_m is not None:
            report.add(SUITE, f"MLP 784-1024-1024-10 batch 1 {label} (Session.run) vs onnxruntime", m.seconds, "s",
                       higher_is_better=False, spread=m.spread, stable=m.stable, baseline="onnxruntime",
                       baseline_value=ort_m.seconds, baseline_spread=ort_m.spread,
                       goal=1.0 if q is None else None)


def packed_sweep(report: Report, tmp: str, quick: bool) -> int:
    """Executor time per batch with the packed kernel on and off; returns the largest batch where
    the packed kernel still wins (the AIMASS_PACKED_MAX_ROWS this machine wants)."""
    from .. import runtime as rt
    model = rt.load(export_mlp(tmp))
    prev = rt._rt.set_packed_max_rows(0)
    plain = rt._rt.Executor(model._m, 64)
    rt._rt.set_packed_max_rows(64)
    packed = rt._rt.Executor(model._m, 64)
    rt._rt.set_packed_max_rows(prev)
    batches = (1, 4, 16, 64) if quick else (1, 2, 4, 8, 16, 32, 64)
    sp, ss = [], []
    best_rows = 0
    for b in batches:
        x = np.random.default_rng(b).standard_normal((b, MLP[0])).astype(np.float32)
        tp = measure(lambda: packed.run([x]), window_s=0.05 if quick else 0.1).seconds
        ts = measure(lambda: plain.run([x]), window_s=0.05 if quick else 0.1).seconds
        sp.append(tp / b * 1e6)
        ss.append(ts / b * 1e6)
        if tp <= ts:
            best_rows = b
    report.add_sweep("runtime_packed_vs_blas", list(batches), {"packed kernel": sp, "BLAS sgemm/GEMV": ss},
                     xlabel="batch rows", ylabel="us per row (lower is better)", logx=True, logy=True)
    return best_rows


def clients(sess_run, concurrency: int, seconds: float) -> Tuple[float, float, float]:
    """(req/s, p50 s, p99 s) of `concurrency` threads calling sess_run for `seconds`."""
    lats: List[List[float]] = [[] for _ in range(concurrency)]
    stop = [0.0]
    barrier = threading.Barrier(concurrency + 1)

    def client(i):
        barrier.wait()
        while time.perf_counter() < stop[0]:
            t0 = time.perf_counter()
            sess_run()
            lats[i].append(time.perf_counter() - t0)

    ths = [threading.Thread(target=client, args=(i,)) for i in range(concurrency)]
    for t in ths:
        t.start()
    stop[0] = time.perf_counter() + seconds
    t0 = time.perf_counter()
    barrier.wait()
    for t in ths:
        t.join()
    wall = time.perf_counter() - t0
    lat = np.concatenate([np.array(v) for v in lats]) if any(lats) else np.array([np.nan])
    return len(lat) / wall, float(np.percentile(lat, 50)), float(np.percentile(lat, 99))


def batcher_grid(report: Report, tmp: str, quick: bool) -> Dict[str, int]:
    """max_batch_size x max_queue_delay_us at 16 clients; returns the best knobs whose p99 stays
    within 2x the unbatched p99."""
    from .. import runtime as rt
    path = export_mlp(tmp)
    x = np.random.default_rng(1).standard_normal((1, MLP[0])).astype(np.float32)
    conc = 16
    secs = 0.4 if quick else 1.5
    sizes = (1, 8, 32) if quick else (1, 4, 8, 16, 32, 64)
    delays = (100, 500) if quick else (0, 100, 250, 500, 1000, 2000)

    def at(bs, delay):
        sess = rt.Session(path, max_batch_size=bs, max_queue_delay_us=delay)
        sess.run({"x": x})
        try:
            return clients(lambda: sess.run({"x": x}), conc, secs)
        finally:
            sess.close()

    base_rps, base_p50, base_p99 = at(1, 0)
    series_rps = {f"delay {d} us": [] for d in delays}
    series_p99 = {f"delay {d} us": [] for d in delays}
    best = (base_rps, 1, 0, base_p99)
    for bs in sizes:
        for d in delays:
            rps, p50, p99 = (base_rps, base_p50, base_p99) if bs == 1 else at(bs, d)
            series_rps[f"delay {d} us"].append(rps)
            series_p99[f"delay {d} us"].append(p99 * 1e6)
            if rps > best[0] and p99 <= 2 * base_p99:
                best = (rps, bs, d, p99)
    report.add_sweep("batcher_throughput", list(sizes), series_rps, xlabel="max_batch_size",
                     ylabel=f"req/s at {conc} clients (higher is better)", logx=True)
    report.add_sweep("batcher_p99", list(sizes), series_p99, xlabel="max_batch_size",
                     ylabel=f"p99 us at {conc} clients (lower is better)", logx=True)
    report.add(SUITE, f"Session {conc} clients batch-1, best batching (max_batch_size={best[1]}, "
               f"delay={best[2]} us)", best[0], "req/s", higher_is_better=True,
               baseline="same Session, batching off", baseline_value=base_rps, goal=3.0)
    report.add(SUITE, f"Session {conc} clients p99 at those knobs", best[3], "s", higher_is_better=False,
               baseline="same Session, batching off", baseline_value=base_p99)
    return {"session_max_batch_size": int(best[1]), "session_max_queue_delay_us": int(best[2])}


def thread_sweep(report: Report, tmp: str, quick: bool) -> int:
    """Batch-1 Session latency vs engine threads; returns the best count."""
    import aimass
    from .. import runtime as rt
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    counts = sorted({1, max(1, cores // 2), cores})
    x = np.random.default_rng(0).standard_normal((1, MLP[0])).astype(np.float32)
    old = aimass.num_threads()
    times = []
    try:
        for n in counts:
            aimass.set_num_threads(n)
            sess = rt.Session(export_mlp(tmp), max_batch_size=1)
            times.append(measure(lambda: sess.run({"x": x}), window_s=0.05 if quick else 0.2).seconds * 1e6)
            sess.close()
    finally:
        aimass.set_num_threads(old)
    report.add_sweep("runtime_latency_vs_threads", counts, {"MLP 784 batch 1": times}, xlabel="engine threads",
                     ylabel="us per request (lower is better)")
    return counts[int(np.argmin(times))]


def simd_sweep(report: Report, tmp: str, quick: bool) -> str:
    """Batch-1 Session latency at each SIMD level this CPU has; returns the fastest level."""
    import aimass
    from .. import runtime as rt
    detected = aimass.cpu_features()["simd"]
    levels = ["scalar", "avx2", "avx512"]
    levels = levels[:levels.index(detected) + 1] if detected in levels else [detected]
    x = np.random.default_rng(0).standard_normal((1, MLP[0])).astype(np.float32)
    times = []
    try:
        for lv in levels:
            aimass.set_simd_level(lv)
            sess = rt.Session(export_mlp(tmp), max_batch_size=1)  # plans (and packs) at this level
            times.append(measure(lambda: sess.run({"x": x}), window_s=0.05 if quick else 0.2).seconds * 1e6)
            sess.close()
    finally:
        aimass.set_simd_level(detected)
    report.add_sweep("runtime_latency_vs_simd", list(range(len(levels))), {"MLP 784 batch 1 (x: " +
                     ", ".join(f"{i}={lv}" for i, lv in enumerate(levels)) + ")": times},
                     xlabel="SIMD level", ylabel="us per request (lower is better)")
    return levels[int(np.argmin(times))]


def run(report: Report, quick: bool = False, progress=None) -> Dict[str, int]:
    tmp = tempfile.mkdtemp(prefix="aimass_bench_rt_")
    import shutil
    try:
        latency(report, tmp, quick)
        if progress:
            progress("runtime: latency done")
        knobs = {"packed_max_rows": packed_sweep(report, tmp, quick)}
        if progress:
            progress("runtime: packed sweep done")
        knobs["num_threads"] = thread_sweep(report, tmp, quick)
        knobs["simd"] = simd_sweep(report, tmp, quick)
        knobs.update(batcher_grid(report, tmp, quick))
        if progress:
            progress("runtime: batcher grid done; model families next")
        from . import runtime_families
        runtime_families.run(report, quick, progress)
        return knobs
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
