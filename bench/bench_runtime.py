"""Runtime benchmarks: batch-1 latency and a client-concurrency sweep.

    python bench/bench_runtime.py [--quick]     # tables with ratios measured in the same run
    pytest bench/bench_runtime.py               # pytest-benchmark latency cases

Baselines, measured in the same process: torch eager (torch.no_grad) and onnxruntime
(same model exported with torch.onnx) when onnxruntime is installed; for the sweep, the
same aimass Session with batching off (max_batch_size=1)."""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import aimass  # noqa: E402
import aimass.runtime as rt  # noqa: E402
from torch import nn  # noqa: E402

try:
    import onnxruntime as ort  # noqa: F401
except ImportError:  # optional baseline
    ort = None

MODELS = {"mlp784": (784, 1024, 1024, 10), "mlp4096": (4096, 4096, 4096, 10)}
# exported models (up to 1.5 GB for the families): removed when the process exits
_TMPDIR = tempfile.TemporaryDirectory(prefix="aimass-bench-")
_TMP = _TMPDIR.name


def make_mlp(dims):
    torch.manual_seed(0)
    layers = []
    for i in range(len(dims) - 1):
        layers.append(nn.Linear(dims[i], dims[i + 1]))
        if i < len(dims) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers).eval()


def exported(name, quantize=None):
    path = os.path.join(_TMP, f"{name}-{quantize or 'fp32'}.aimass")
    if not os.path.exists(path):
        rt.export(make_mlp(MODELS[name]), (torch.randn(2, MODELS[name][0]),), path, quantize=quantize,
                  input_names=["x"])
    return path


def onnx_session(name):
    if ort is None:
        return None
    path = os.path.join(_TMP, f"{name}.onnx")
    if not os.path.exists(path):
        try:
            torch.onnx.export(make_mlp(MODELS[name]), (torch.randn(1, MODELS[name][0]),), path,
                              input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "b"}, "y": {0: "b"}},
                              dynamo=False)
        except Exception as exc:  # torch.onnx needs the onnx package in some versions
            print(f"# onnx export failed ({exc}); onnxruntime baseline skipped", file=sys.stderr)
            return None
    so = ort.SessionOptions()
    so.intra_op_num_threads = aimass.num_threads()
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def runners(name):
    """name -> callable running one batch-1 request."""
    x = np.random.default_rng(0).standard_normal((1, MODELS[name][0])).astype(np.float32)
    xt = torch.from_numpy(x)
    net = make_mlp(MODELS[name])
    out = {}

    def torch_run():
        with torch.no_grad():
            return net(xt)
    out["torch_eager"] = torch_run
    for q in (None, "int8"):
        model = rt.load(exported(name, q))
        ex = rt._rt.Executor(model._m, 1)
        out[f"aimass_{q or 'fp32'}_executor"] = (lambda e=ex: e.run([x]))
    sess = rt.Session(exported(name), max_batch_size=32)
    out["aimass_fp32_session"] = lambda: sess.run({"x": x})
    o = onnx_session(name)
    if o is not None:
        out["onnxruntime"] = lambda: o.run(None, {"x": x})
    return out


def time_call(fn, seconds):
    for _ in range(3):
        fn()
    lat = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or len(lat) < 5:
        t0 = time.perf_counter()
        fn()
        lat.append(time.perf_counter() - t0)
    return np.array(lat)


def latency_table(seconds):
    print("## batch-1 latency (median us, ratio = baseline torch eager / this; >1 is faster)")
    for name in MODELS:
        rs = runners(name)
        med = {k: float(np.median(time_call(f, seconds))) * 1e6 for k, f in rs.items()}
        base = med["torch_eager"]
        for k, v in med.items():
            print(f"{name:8s} {k:26s} {v:10.1f} us   x{base / v:5.2f} vs torch eager")


class CatDogCNN(nn.Module):
    """The platform's cat/dog example: (conv-relu-pool) x2, linear, on 64x64x3 images."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(32 * 16 * 16, 2)

    def forward(self, x):
        x = self.pool(torch.relu(self.conv1(x)))
        x = self.pool(torch.relu(self.conv2(x)))
        return self.fc(torch.flatten(x, 1))


def cnn_table(seconds):
    print("## cat/dog CNN (conv: packed im2col + packed GEMM on the pool; sgemm at the scalar level), median us, ratio vs torch eager")
    torch.manual_seed(0)
    net = CatDogCNN().eval()
    path = os.path.join(_TMP, "cnn.aimass")
    rt.export(net, (torch.randn(2, 3, 64, 64),), path, input_names=["x"])
    ex = rt._rt.Executor(rt.load(path)._m, 32)
    for b in (1, 32):
        x = torch.randn(b, 3, 64, 64)
        xn = x.numpy()

        def torch_run():
            with torch.no_grad():
                return net(x)
        tt = float(np.median(time_call(torch_run, seconds))) * 1e6
        ta = float(np.median(time_call(lambda: ex.run([xn]), seconds))) * 1e6
        print(f"cnn batch {b:2d}: torch eager {tt:9.1f} us, aimass fp32 {ta:9.1f} us, x{tt / ta:5.2f}")


def sweep(name, concurrency, per_client_s, batched, onnx=None):
    """(throughput req/s, p50 us, p99 us, batch stats or None) of `concurrency` client threads."""
    x = np.random.default_rng(1).standard_normal((1, MODELS[name][0])).astype(np.float32)
    sess = None
    if onnx is None:
        sess = rt.Session(exported(name), max_batch_size=32 if batched else 1, max_queue_delay_us=500)
        call = lambda: sess.run({"x": x})  # noqa: E731
    else:
        call = lambda: onnx.run(None, {"x": x})  # noqa: E731
    call()
    lats = [[] for _ in range(concurrency)]
    stop = time.perf_counter() + per_client_s
    barrier = threading.Barrier(concurrency + 1)

    def client(i):
        barrier.wait()
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            call()
            lats[i].append(time.perf_counter() - t0)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(concurrency)]
    for t in threads:
        t.start()
    t0 = time.perf_counter()
    barrier.wait()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    info = None
    if sess is not None:
        st = sess.stats()
        sess.close()
        mean = lambda h: h["sum"] / max(h["count"], 1)  # noqa: E731
        info = {"rows": mean(st["batch_rows"]), "compute_us": mean(st["compute_us"]),
                "queue_us": mean(st["queue_us"]), "inline": st["inline_runs"] / max(st["batches"], 1)}
    all_lat = np.concatenate([np.array(lat) for lat in lats]) * 1e6
    return len(all_lat) / wall, float(np.percentile(all_lat, 50)), float(np.percentile(all_lat, 99)), info


def sweep_table(name, seconds, levels=(1, 4, 16, 64), rounds=3):
    """Batched and unbatched runs alternate `rounds` times per level (the machine is shared: a
    burst of load then hits both sides); medians over the rounds, ratio = median of per-round ratios."""
    print(f"## concurrency sweep, {name}, batch-1 requests from N Python threads, {rounds} alternating rounds of "
          f"{seconds:.1f} s (throughput req/s, p50/p99 us; ratios vs the same Session with batching off; "
          "batched: mean rows per batch, mean compute us per batch)")
    o = onnx_session(name)
    for c in levels:
        rb, ru = [], []
        for _ in range(rounds):
            rb.append(sweep(name, c, seconds, True))
            ru.append(sweep(name, c, seconds, False))
        med = lambda rs, k: float(np.median([r[k] for r in rs]))  # noqa: E731
        tb, p50b, p99b = med(rb, 0), med(rb, 1), med(rb, 2)
        tu, p50u, p99u = med(ru, 0), med(ru, 1), med(ru, 2)
        ratio = float(np.median([b[0] / u[0] for b, u in zip(rb, ru)]))
        p99r = float(np.median([b[2] / u[2] for b, u in zip(rb, ru)]))
        rows = float(np.median([b[3]["rows"] for b in rb]))
        comp = float(np.median([b[3]["compute_us"] for b in rb]))
        line = (f"c={c:3d} batched {tb:8.0f} req/s p50 {p50b:8.0f} p99 {p99b:8.0f} | unbatched {tu:8.0f} req/s "
                f"p50 {p50u:8.0f} p99 {p99u:8.0f} | throughput x{ratio:5.2f} (rounds: "
                f"{' '.join(f'{b[0] / u[0]:.2f}' for b, u in zip(rb, ru))}), p99 x{p99r:5.2f} | "
                f"batch rows {rows:4.1f}, compute {comp:6.0f} us")
        if o is not None:
            to, p50o, p99o, _ = sweep(name, c, seconds, False, onnx=o)
            line += f" | onnxruntime {to:8.0f} req/s p99 {p99o:8.0f}"
        print(line, flush=True)


def packed_table(seconds):
    """Executor latency per batch size: the packed small-M kernel vs sgemm (GEMV at <= 4 rows)."""
    print("## fp32 Linear: packed small-M kernel vs BLAS sgemm (GEMV at <= 4 rows), executor median us per batch")
    for name in MODELS:
        d = MODELS[name][0]
        model = rt.load(exported(name))
        prev = rt._rt.set_packed_max_rows(0)
        plain = rt._rt.Executor(model._m, 64)
        rt._rt.set_packed_max_rows(prev)
        packed = rt._rt.Executor(model._m, 64)
        for b in (1, 2, 4, 8, 16, 32, 64):
            x = np.random.default_rng(b).standard_normal((b, d)).astype(np.float32)
            tp = float(np.median(time_call(lambda: packed.run([x]), seconds / 4))) * 1e6
            ts = float(np.median(time_call(lambda: plain.run([x]), seconds / 4))) * 1e6
            print(f"{name:8s} batch {b:3d}: packed {tp:9.1f} us ({tp / b:7.1f}/row), sgemm {ts:9.1f} us "
                  f"({ts / b:7.1f}/row), x{ts / tp:5.2f}", flush=True)


# ------------------------------------------------------------------ pytest-benchmark cases
@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("impl", ["torch_eager", "aimass_fp32_executor", "aimass_int8_executor",
                                  "aimass_fp32_session", "onnxruntime"])
def test_latency_batch1(benchmark, model, impl):
    rs = runners(model)
    if impl not in rs:
        pytest.skip(f"{impl} not available")
    benchmark.group = f"latency-{model}"
    benchmark(rs[impl])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="short runs (the machine is shared)")
    ap.add_argument("--sweep-model", nargs="+", default=list(MODELS), choices=list(MODELS),
                    help="models for the concurrency sweep (default: both MLPs)")
    ap.add_argument("--sweep-only", action="store_true", help="only the concurrency sweep")
    ap.add_argument("--rounds", type=int, default=3, help="alternating batched/unbatched rounds per level")
    ap.add_argument("--gc-freeze", action="store_true",
                    help="gc.freeze() after setup (as latency-critical services do): full collections then skip "
                         "torch's heap; applied to both sides of every ratio")
    ap.add_argument("--threads", type=int, default=None,
                    help="engine (+ BLAS panels) + torch threads (default: leave as is)"
                    )
    ap.add_argument("--families", action="store_true",
                    help="the model-family tables instead (BERT, ResNet-50, LSTM vs torch/onnxruntime; "
                         "aimass.bench.runtime_families)")
    args, rest = ap.parse_known_args()
    if args.families:
        from aimass.bench.runtime_families import main as families_main
        families_main((["--quick"] if args.quick else []) + rest)
        return
    if args.threads:
        aimass.set_num_threads(args.threads)
        torch.set_num_threads(args.threads)
    sec = 0.5 if args.quick else 3.0
    print(f"# aimass {aimass.__version__}, threads={aimass.num_threads()}, torch threads={torch.get_num_threads()}, "
          f"simd={aimass.cpu_features()['simd']}, onnxruntime={'yes' if ort else 'no'}")
    if not args.sweep_only:
        latency_table(sec)
        packed_table(sec)
        cnn_table(sec)
    for name in args.sweep_model:
        exported(name)
    if args.gc_freeze:
        import gc
        gc.collect()
        gc.freeze()
    for name in args.sweep_model:
        # the 4096-wide MLP streams 134 MB per batch-1 run (~4 ms): longer rounds for enough requests
        sweep_table(name, sec * 2 if name == "mlp784" else sec * 4, rounds=args.rounds)


if __name__ == "__main__":
    main()
