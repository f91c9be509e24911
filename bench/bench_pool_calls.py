"""Per-call spread of one model family (default: BERT mini at 2 threads, batch 1), aimass against onnxruntime,
with the engine's run-long polling off and on (aimass/parallel.h RunScope) in the same process.

Each round runs every contender once after a gap (default 50 ms, so every pool has gone idle, as a
service's sporadic request finds it), in a rotating order. Prints p10/p50/p90 per contender, the ratio of
medians to onnxruntime, and for the aimass calls, from /proc: the CPU time and context switches of the
other threads (the pool's workers) and of the caller, and how often the caller and a worker ended the
call on the same CPU. Timings on a shared machine are noisy: compare the contenders of one run only.

    python bench/bench_pool_calls.py [--family bert-mini] [--batch 1] [--rounds 60] [--threads 2] [--gap-ms 50]
                                     [--run-spin-us 0 5000]
"""
import argparse
import ctypes
import os
import tempfile
import time

import numpy as np
import torch

import aimass
import aimass.runtime as rt
from aimass import _C
from aimass.bench.runtime_families import families

try:
    import onnxruntime as ort
except ImportError:  # the baseline is optional
    ort = None

_libc = ctypes.CDLL(None)


def _threads():
    """tid -> (last cpu, runtime ns, voluntary switches, involuntary switches) for this process's threads."""
    out = {}
    base = f"/proc/{os.getpid()}/task"
    for tid in os.listdir(base):
        try:
            with open(f"{base}/{tid}/stat") as f:
                cpu = int(f.read().rsplit(")", 1)[1].split()[36])
            with open(f"{base}/{tid}/schedstat") as f:
                ns = int(f.read().split()[0])
            sw = {}
            with open(f"{base}/{tid}/status") as f:
                for line in f:
                    if "ctxt_switches" in line:
                        k, v = line.split(":")
                        sw[k] = int(v)
            out[int(tid)] = (cpu, ns, sw["voluntary_ctxt_switches"], sw["nonvoluntary_ctxt_switches"])
        except (OSError, ValueError, KeyError, IndexError):
            pass  # a thread that ended meanwhile
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--gap-ms", type=float, default=50.0)
    ap.add_argument("--family", default="bert-mini", choices=sorted(families(False)))
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--run-spin-us", type=int, nargs="+", default=[0, _C.run_spin_us()],
                    help="aimass contenders: AIMASS_RUN_SPIN_US values (0 = workers park between ops)")
    args = ap.parse_args(argv)
    if args.rounds < 1 or args.threads < 1 or args.gap_ms < 0 or args.batch < 1:
        ap.error("--rounds, --threads, --batch must be >= 1 and --gap-ms >= 0")
    if any(not 0 <= us <= 1000000 for us in args.run_spin_us):
        ap.error("--run-spin-us values must be in [0, 1000000]")

    make_model, make_inputs, _, dyn, _ = families(False)[args.family]
    torch.manual_seed(0)
    model = make_model().eval()
    xs = make_inputs(args.batch)
    names = ["input_ids", "attention_mask"] if len(xs) == 2 else ["x"]
    aimass.set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    arrays = [x.numpy() for x in xs]
    default_spin = _C.run_spin_us()
    with tempfile.TemporaryDirectory(prefix="aimass-pool-calls-") as tmp:
        path = rt.export(model, make_inputs(2), os.path.join(tmp, "m.aimass"), dynamic_seq=True if dyn else None,
                         input_names=names)
        ex = rt._rt.Executor(rt.load(path)._m, args.batch)
        fns = {}
        if ort is not None:
            onnx_path = os.path.join(tmp, "m.onnx")
            torch.onnx.export(model, make_inputs(2), onnx_path, dynamo=False, opset_version=20, input_names=names,
                              dynamic_axes={n: ({0: "b", 1: "s"} if dyn else {0: "b"}) for n in names})
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = args.threads
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            so = ort.InferenceSession(onnx_path, opts, providers=["CPUExecutionProvider"])
            feeds = dict(zip(names, arrays))
            fns["onnxruntime"] = (None, lambda: so.run(None, feeds))
        for us in args.run_spin_us:
            fns[f"aimass run_spin_us={us}"] = (us, lambda: ex.run(arrays))
        with torch.no_grad():
            ref = model(*xs).numpy()
        for k, (us, fn) in fns.items():
            for _ in range(3):
                fn()
            if us is not None:
                _C.set_run_spin_us(us)
                err = np.abs(ex.run(arrays)[0] - ref).max() / max(np.abs(ref).max(), 1e-30)
                assert err < 1e-3, f"{k}: max rel err {err:.1e} against torch"
        keys = list(fns)
        times = {k: [] for k in keys}
        stats = {k: [] for k in keys if fns[k][0] is not None}
        me = _libc.syscall(186)  # gettid on x86-64
        try:
            for r in range(args.rounds):
                for j in range(len(keys)):
                    k = keys[(r + j) % len(keys)]
                    us, fn = fns[k]
                    if us is not None:
                        _C.set_run_spin_us(us)
                    time.sleep(args.gap_ms / 1e3)
                    a = _threads() if us is not None else None
                    t0 = time.perf_counter()
                    fn()
                    dt = time.perf_counter() - t0
                    times[k].append(dt * 1e3)
                    if a is None:
                        continue
                    b = _threads()
                    moved = [t for t in b if t in a and t != me and b[t][1] != a[t][1]]
                    caller = b.get(me), a.get(me)
                    stats[k].append((
                        sum(b[t][1] - a[t][1] for t in moved) / 1e6,
                        sum(b[t][2] - a[t][2] for t in moved),
                        caller[0][3] - caller[1][3] if None not in caller else 0,
                        any(b[t][0] == caller[0][0] for t in moved) if caller[0] else False,
                    ))
        finally:
            _C.set_run_spin_us(default_spin)
    print(f"# {args.family}, batch {args.batch}, {args.threads} threads, "
          f"{args.rounds} interleaved rounds, {args.gap_ms:g} ms gap before each call; load average "
          f"{os.getloadavg()[0]:.2f}")
    base = np.median(times["onnxruntime"]) if "onnxruntime" in times else None
    for k in keys:
        p = np.percentile(times[k], [10, 50, 90])
        line = f"{k:24s} p10/p50/p90 {p[0]:6.2f} / {p[1]:6.2f} / {p[2]:6.2f} ms"
        if base is not None and k != "onnxruntime":
            line += f"  ortx{base / p[1]:5.2f}"
        if k in stats and stats[k]:
            s = np.array(stats[k], dtype=float)
            line += (f" | workers: {np.median(s[:, 0]):5.2f} ms cpu, {np.median(s[:, 1]):4.1f} voluntary switches;"
                     f" caller {np.median(s[:, 2]):3.1f} involuntary; same cpu at end in {s[:, 3].mean() * 100:3.0f}%")
        print(line)


if __name__ == "__main__":
    main()
